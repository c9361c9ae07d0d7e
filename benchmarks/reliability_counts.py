"""Run the reliability tests and count what they tried: bad inputs, faults injected, runs resumed, multi-process
runs, and whether anything was lost.

Each test declares what it exercises with pytest's ``record_property`` (``bad_inputs``, ``faults_injected``,
``runs_resumed``, ``distributed_runs``); this script runs the test files with a small plugin that adds those up,
separately for passing and failing tests. "Nothing lost" means every such test passed: each asserts that the
disk holds exactly what it held before a bad input, that a resumed run ends bitwise equal to an uninterrupted
one, and that no weight is non-finite.

    python benchmarks/reliability_counts.py            # about 2-3 minutes on 2 CPU cores
    python benchmarks/reliability_counts.py --out docs/results/reliability_counts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

FILES = ["tests/test_bad_inputs.py", "tests/test_resume.py", "tests/test_reliability.py",
         "tests/test_numerics_property.py", "tests/test_distributed.py", "tests/test_checkpoint.py",
         "tests/test_output_plan.py"]
KINDS = {"bad_inputs": "bad inputs tried", "faults_injected": "faults injected",
         "runs_resumed": "runs resumed", "distributed_runs": "2-process runs compared with 1 process"}


class Tally:
    """A pytest plugin that adds up the ``record_property`` counts and the outcomes."""

    def __init__(self) -> None:
        self.passed: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or (report.when == "setup" and not report.passed):
            outcome = "xfailed" if hasattr(report, "wasxfail") else report.outcome
            self.outcomes[outcome] += 1
            target = self.passed if report.passed else self.failed
            for key, value in report.user_properties:
                target[key] += int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the counts to this JSON file")
    args = parser.parse_args(argv)
    tally = Tally()
    started = time.time()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *FILES], plugins=[tally])
    seconds = time.time() - started
    lost = sum(tally.failed.values()) + tally.outcomes["failed"]
    print("\n| what | count |\n| --- | ---: |")
    for key, label in KINDS.items():
        print(f"| {label} | {tally.passed[key] + tally.failed[key]} |")
    print(f"| tests passed / failed / skipped / expected failures | {tally.outcomes['passed']} / "
          f"{tally.outcomes['failed']} / {tally.outcomes['skipped']} / {tally.outcomes['xfailed']} |")
    print(f"| nothing lost (every such test passed) | {'yes' if lost == 0 else 'NO'} |")
    print(f"\n{seconds:.0f} s for {', '.join(FILES)}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": "python benchmarks/reliability_counts.py", "files": FILES, "seconds": round(seconds),
            "counts": {k: tally.passed[k] + tally.failed[k] for k in KINDS}, "outcomes": dict(tally.outcomes),
            "nothing_lost": lost == 0}, indent=1))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())

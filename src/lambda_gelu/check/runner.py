"""``lambda-gelu check``: the GELU original and its ReLU-ized model through ONNX, int8 PTQ, Marabou, sparsity.

Each section needs an optional extra (``onnx``, ``quant``, ``verify``); a
missing one makes that section say "skipped: ..." instead of failing. An
error raised by a third-party tool on one model is recorded in that model's
entry (``error``) and the other sections still run.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lambda_gelu.check.quantize import quiet_torchao
from lambda_gelu.check.sparsity import activation_sparsity
from lambda_gelu.checkpoint import activation_layout, load_checkpoint
from lambda_gelu.data import Split, load_dataset
from lambda_gelu.metrics import evaluate
from lambda_gelu.pipeline import relu_copy
from lambda_gelu.version import __version__

EXTRAS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
    "quant": ("torchao",),
    "verify": ("maraboupy",),
}
"""The optional extras each section needs, with the modules they provide."""

TITLES = {"gelu": "GELU original", "relu": "ReLU-ized"}
DEMO_CHECKPOINTS = ("checkpoints", ".")
"""Where a run folder given as CKPT keeps relu.safetensors and gelu.safetensors (the demo's layout first)."""


class CheckUsageError(ValueError):
    """Bad input to ``lambda-gelu check`` (reported in one line, exit code 2)."""


@dataclass
class CheckConfig:
    """What ``run_check`` measures, and how hard it tries."""

    epsilon: float = 0.01
    points: int = 10
    timeout_s: float = 10.0
    quant_batch: int = 256  # rows per latency measurement (and per int8 evaluation batch)
    latency_repeats: int = 30
    latency_threads: int = 1
    calibration_examples: int = 1024

    def validate(self) -> None:
        """Raise CheckUsageError for settings no check can run with."""
        if not (self.epsilon >= 0 and self.epsilon != float("inf")):
            raise CheckUsageError(f"--epsilon must be a finite number >= 0, got {self.epsilon}")
        for name in ("points", "quant_batch", "latency_repeats", "latency_threads", "calibration_examples"):
            if getattr(self, name) < 1:
                raise CheckUsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise CheckUsageError(f"--timeout must be > 0 seconds, got {self.timeout_s}")


@dataclass
class Subject:
    """One model of the report: its key (``gelu``/``relu``), where it came from, the model itself."""

    key: str
    source: str
    model: nn.Module
    header: dict[str, Any]

    @property
    def title(self) -> str:
        """Column title in the report ("λ-GELU original" when the original's gates are λ-GELU)."""
        kinds = {spec["kind"] for spec in activation_layout(self.model).values()}
        return "λ-GELU original" if self.key == "gelu" and "lambda_gelu" in kinds else TITLES[self.key]


def missing_extra(extra: str) -> str | None:
    """None if the extra's modules import; otherwise the "skipped: ..." line for the report."""
    missing = []
    for module in EXTRAS[extra]:
        try:
            with quiet_torchao():  # torchao's import notes about CUDA kernels it cannot load
                importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if not missing:
        return None
    return (f"skipped: the {extra} extra is not installed (missing {', '.join(missing)}; "
            f"pip install 'lambda-gelu[{extra}]')")


def _smooth_gates(model: nn.Module) -> list[str]:
    return [name for name, spec in activation_layout(model).items() if spec["kind"] != "relu"]


def _load(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    if not Path(path).exists():
        raise CheckUsageError(f"{path}: no such checkpoint")
    return load_checkpoint(path)


def _run_folder_checkpoints(folder: Path) -> tuple[Path, Path | None]:
    for sub in DEMO_CHECKPOINTS:
        relu = folder / sub / "relu.safetensors"
        if relu.is_file():
            gelu = folder / sub / "gelu.safetensors"
            return relu, gelu if gelu.is_file() else None
    raise CheckUsageError(f"{folder} is a folder without checkpoints/relu.safetensors; pass a checkpoint file")


def load_subjects(checkpoint: str | Path, gelu: str | Path | None = None) -> list[Subject]:
    """The models to compare, GELU original first (when there is one).

    * a run folder (the demo's): its ``checkpoints/relu.safetensors`` and
      ``checkpoints/gelu.safetensors`` (``gelu`` overrides the latter);
    * a checkpoint without smooth gates: it is the ReLU-ized model, ``gelu``
      (optional) the original;
    * a checkpoint with GELU or λ-GELU gates: it is the original, and the
      ReLU-ized model is ``relufy`` of it (every gate swapped for ReLU: for a
      hardened λ-GELU model that is lambda-gelu's last step, for a plain GELU
      model the direct swap). ``gelu`` must not be given then.
    """
    path = Path(checkpoint)
    if path.is_dir():
        path, found = _run_folder_checkpoints(path)
        gelu = gelu if gelu is not None else found
    model, header = _load(path)
    if _smooth_gates(model):
        if gelu is not None:
            raise CheckUsageError(f"{path} has GELU-family gates ({', '.join(_smooth_gates(model))}); pass the "
                                  "ReLU-ized checkpoint as CKPT and this one with --gelu")
        return [Subject("gelu", str(path), model, header),
                Subject("relu", f"relufy({path})", relu_copy(model, include_gelu=True).eval(), header)]
    subjects = [Subject("relu", str(path), model, header)]
    if gelu is not None:
        gelu_model, gelu_header = _load(gelu)
        if not _smooth_gates(gelu_model):
            raise CheckUsageError(f"--gelu {gelu} has no GELU-family gate, so it is not the GELU original; pass the "
                                  "checkpoint the ReLU model was made from")
        subjects.insert(0, Subject("gelu", str(gelu), gelu_model, gelu_header))
    return subjects


def dataset_for(subjects: list[Subject], name: str | None, data_dir: str | None) -> Split:
    """The data set the checkpoints were trained on (``name`` overrides), split with their data seed."""
    metas = [s.header.get("metadata", {}) for s in subjects]
    names = {m.get("dataset") for m in metas if m.get("dataset")}
    seeds = {int(m["data_seed"]) for m in metas if "data_seed" in m}
    if name is None:
        if len(names) > 1:
            raise CheckUsageError(f"the checkpoints were trained on different data sets ({', '.join(sorted(names))})")
        if not names:
            raise CheckUsageError("the checkpoint does not say which data set it was trained on; pass --dataset")
        name = names.pop()
    if len(seeds) > 1:
        raise CheckUsageError(f"the checkpoints were trained on different splits (data seeds {sorted(seeds)})")
    split = load_dataset(name, data_dir, seed=seeds.pop() if seeds else 0)
    for subject in subjects:
        split.check_fits(subject.model, f"the model of {subject.source}")
    return split


def _gate_summary(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for spec in activation_layout(model).values():
        counts[spec["kind"]] = counts.get(spec["kind"], 0) + 1
    return counts


def _versions() -> dict[str, str]:
    versions = {"lambda_gelu": __version__, "python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "torchao", "maraboupy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one model's part of a section; a third-party failure becomes that model's ``error`` entry."""
    try:
        return fn()
    except Exception as error:  # recorded in the report, not hidden: the section shows the error line
        return {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"}


def _onnx_section(subjects: list[Subject], split: Split, folder: Path) -> dict[str, Any]:
    from lambda_gelu.export import OPSET, SMOOTH_GATE_OPS, check_onnx, export_onnx

    def one(subject: Subject) -> dict[str, Any]:
        path = folder / f"{subject.key}.onnx"
        export_onnx(subject.model, split.x_test[:2], path)
        report = check_onnx(subject.model, split.x_test, path)
        return dict(report.to_dict(), path=path.name)

    return {"status": "ok", "opset": OPSET, "smooth_gate_ops": sorted(SMOOTH_GATE_OPS),
            "models": {s.key: _guarded(lambda s=s: one(s)) for s in subjects}}


def _quant_section(subjects: list[Subject], split: Split, config: CheckConfig) -> dict[str, Any]:
    from lambda_gelu.check.quantize import quantization_check

    calibration = list(split.x_train[: config.calibration_examples].split(256))
    calibration = [batch for batch in calibration if len(batch) >= 2]
    return {"status": "ok", "route": "torch.export → torchao prepare_pt2e(X86InductorQuantizer) → calibrate → "
                                     "convert_pt2e → lower_pt2e_quantized_to_x86 (oneDNN int8 kernels)",
            "models": {s.key: _guarded(lambda s=s: quantization_check(
                s.model, calibration, split.x_test, split.y_test, batch=config.quant_batch,
                repeats=config.latency_repeats, threads=config.latency_threads).to_dict()) for s in subjects}}


def _verify_section(subjects: list[Subject], split: Split, config: CheckConfig, folder: Path,
                    onnx: dict[str, Any]) -> dict[str, Any]:
    from lambda_gelu.check.verify import is_mlp, marabou_version, verify_robustness

    points = min(config.points, len(split.x_test))
    domain = (float(split.x_train.min()), float(split.x_train.max()))

    def one(subject: Subject) -> dict[str, Any]:
        if "error" in onnx["models"][subject.key]:
            return {"skipped": "no ONNX file (the export failed)"}
        mlp = is_mlp(subject.model)
        count = points if mlp else 0  # a non-MLP is still offered to Marabou, but asked nothing
        result = verify_robustness(folder / f"{subject.key}.onnx", subject.model, split.x_test[:count],
                                   split.y_test[:count], config.epsilon, config.timeout_s, domain).to_dict()
        if not mlp and result["accepted"]:
            result["skipped"] = "not an MLP (local robustness queries are run for MLP models only)"
        return result

    return {"status": "ok", "verifier": f"Marabou (maraboupy {marabou_version()})", "epsilon": config.epsilon,
            "points": points, "timeout_s": config.timeout_s, "domain": list(domain),
            "models": {s.key: _guarded(lambda s=s: one(s)) for s in subjects}}


def _sparsity_section(subjects: list[Subject], split: Split) -> dict[str, Any]:
    return {"status": "ok", "models": {
        s.key: {"gates": [row.to_dict() for row in activation_sparsity(s.model, split.test_batches())]}
        for s in subjects}}


def run_check(
    subjects: list[Subject],
    split: Split,
    folder: str | Path,
    config: CheckConfig | None = None,
    say: Callable[[str], None] = lambda _line: None,
) -> dict[str, Any]:
    """Run every section on ``subjects``; ONNX files go to ``folder``. Returns the report (JSON-ready)."""
    config = config or CheckConfig()
    config.validate()
    folder = Path(folder)
    started = time.time()
    models = {}
    for s in subjects:
        result = evaluate(s.model, split.test_batches())
        models[s.key] = {"title": s.title, "source": s.source, "gates": _gate_summary(s.model),
                         "test_accuracy": result.accuracy, "test_loss": result.loss}
    report: dict[str, Any] = {"dataset": split.name, "test_examples": len(split.y_test), "config": asdict(config),
                              "versions": _versions(), "cpu": device_summary(), "models": models}

    say("[1/4] ONNX export and onnxruntime parity")
    skipped = missing_extra("onnx")
    report["onnx"] = {"status": skipped} if skipped else _onnx_section(subjects, split, folder)

    say("[2/4] int8 post-training quantization")
    skipped = missing_extra("quant")
    report["quantization"] = {"status": skipped} if skipped else _quant_section(subjects, split, config)

    say(f"[3/4] Marabou: local robustness at ε = {config.epsilon:g} on {config.points} test points")
    skipped = missing_extra("verify") or (report["onnx"]["status"] != "ok" and
                                          "skipped: needs the ONNX files, and the onnx extra is not installed")
    report["verification"] = ({"status": skipped} if skipped else
                              _verify_section(subjects, split, config, folder, report["onnx"]))

    say("[4/4] activation sparsity on the test set")
    report["sparsity"] = _sparsity_section(subjects, split)
    report["seconds"] = round(time.time() - started, 1)
    return report


def progress_printer(enabled: bool) -> Callable[[str], None]:
    """A ``say`` for ``run_check`` that writes to stderr (or nothing)."""
    return (lambda line: print(line, file=sys.stderr, flush=True)) if enabled else (lambda _line: None)


def device_summary() -> str:
    """The CPU the latencies were measured on (best effort)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


"""``lambda-gelu demo``: GELU baseline vs. learned λ-GELU, ReLU-ization vs. the baselines, ONNX export."""

from __future__ import annotations

import copy
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lambda_gelu.calibrate import calibrate
from lambda_gelu.checkpoint import save_checkpoint
from lambda_gelu.convert import convert
from lambda_gelu.data import Split, load_dataset
from lambda_gelu.export import check_onnx, export_onnx
from lambda_gelu.harden import HardenConfig
from lambda_gelu.metrics import Disruption, Evaluation, disruption, evaluate
from lambda_gelu.models import build_model
from lambda_gelu.outputs import staged_dir
from lambda_gelu.pipeline import harden, relu_copy
from lambda_gelu.plots import plot_gates, plot_profile, plot_trajectories
from lambda_gelu.profile import HardnessRecorder, LayerHardness, hardness, profile_table
from lambda_gelu.schedule import Hardener
from lambda_gelu.train import TrainConfig, fit
from lambda_gelu.version import __version__

TARGET_FINAL_GAP = 0.5
TARGET_SWAP_DROP = 0.2


@dataclass
class DemoConfig:
    """Everything the demo does, with the defaults that produce the README's table."""

    dataset: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    hidden: tuple[int, ...] = (128, 128, 128)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, lr=3e-3, weight_decay=0.1))
    harden: HardenConfig = field(default_factory=HardenConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class Row:
    """One method in the comparison table (accuracies in percent)."""

    method: str
    before_swap: float
    after_swap: float | None
    final: float
    final_loss: float
    budget: str

    @property
    def drop(self) -> float | None:
        """Accuracy lost at the swap (positive = worse)."""
        return None if self.after_swap is None else self.before_swap - self.after_swap


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def comparison_table(rows: list[Row], baseline: float) -> str:
    """The Markdown comparison table."""
    lines = [
        "| method | extra steps | acc. before swap | acc. after swap | drop at swap | final acc. | vs GELU "
        "| final loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.method} | {row.budget} | {_fmt(row.before_swap)} | {_fmt(row.after_swap)} | "
            f"{_fmt(row.drop, signed=True)} | {_fmt(row.final)} | {_fmt(row.final - baseline, signed=True)} | "
            f"{row.final_loss:.4f} |"
        )
    return "\n".join(lines)


def _layer_table(d: Disruption) -> str:
    lines = ["| layer | D(λ) at the swap |", "| --- | ---: |"]
    lines += [f"| {name} | {value:.2e} |" for name, value in d.layer_discrepancy.items()]
    return "\n".join(lines)


@dataclass
class _Run:
    """What every phase of one demo run needs."""

    config: DemoConfig
    stage: Path
    split: Split
    progress: bool

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return {
            "in_features": int(self.split.x_train[0].numel()),
            "num_classes": self.split.num_classes,
            "hidden": list(self.config.hidden),
        }

    def say(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr)

    def save(self, name: str, model: nn.Module) -> None:
        meta = {"dataset": self.config.dataset, "data_seed": self.config.seed}
        save_checkpoint(self.stage / "checkpoints" / f"{name}.safetensors", model, "mlp", self.model_kwargs, meta)


def _train_pair(run: _Run) -> tuple[nn.Module, nn.Module, HardnessRecorder]:
    """Phase 1: a GELU baseline and a λ-GELU model with the same architecture and initial weights."""
    train_cfg = replace(run.config.train, seed=run.config.seed)
    torch.manual_seed(run.config.seed)
    gelu_model = build_model("mlp", **run.model_kwargs)
    lam_model = copy.deepcopy(gelu_model)
    convert(lam_model)
    run.say(f"[1/5] training the GELU baseline and the λ-GELU model ({train_cfg.steps} steps each)")
    fit(gelu_model, run.split, train_cfg, desc="GELU", progress=run.progress)
    recorder = HardnessRecorder(lam_model, every=max(1, train_cfg.steps // 200))
    recorder.record(0, force=True)
    fit(lam_model, run.split, train_cfg, recorder=recorder, desc="λ-GELU", progress=run.progress)
    run.save("gelu", gelu_model)
    run.save("lambda_gelu", lam_model)
    return gelu_model, lam_model, recorder


def _profile(run: _Run, lam_model: nn.Module, recorder: HardnessRecorder) -> list[LayerHardness]:
    """Phase 2: the learned hardness profile, its trajectory and plots."""
    run.say("[2/5] hardness profile")
    samples = calibrate(lam_model, run.split.train_batches())
    profile = hardness(lam_model, samples)
    recorder.to_csv(run.stage / "hardness_trajectory.csv")
    plot_profile(profile, run.stage / "plots/profile.png")
    plot_trajectories(recorder, run.stage / "plots/trajectories.png")
    plot_gates(lam_model, samples, run.stage / "plots/gates_learned.png")
    return profile


def _relufy(run: _Run, lam_model: nn.Module) -> tuple[nn.Module, Hardener, Disruption]:
    """Phase 3: deterministic ReLU-ization of a copy of the λ-GELU model; returns the ReLU model."""
    harden_cfg = run.config.harden
    run.say(f"[3/5] ReLU-izing: λ → targets (τ = {harden_cfg.tau:g}) over {harden_cfg.steps} steps")
    hardened = copy.deepcopy(lam_model)
    hardener = harden(hardened, run.split, harden_cfg, progress=run.progress)
    relu_model = relu_copy(hardened, example=run.split.x_test[:2])  # proven: no smooth gate runs
    swap = disruption(hardened, relu_model, run.split.test_batches())
    plot_gates(hardened, calibrate(hardened, run.split.train_batches()), run.stage / "plots/gates_hardened.png")
    run.save("hardened", hardened)
    run.save("relu", relu_model)
    return relu_model, hardener, swap


def _baselines(run: _Run, gelu_model: nn.Module) -> tuple[Disruption, Evaluation]:
    """Phase 4: direct swap of the GELU model, and the swap fine-tuned for as many steps as the hardening."""
    run.say("[4/5] baselines: direct swap, swap + fine-tuning (same steps)")
    swapped = relu_copy(gelu_model, include_gelu=True, example=run.split.x_test[:2])
    direct = disruption(gelu_model, swapped, run.split.test_batches())
    fit(swapped, run.split, run.config.harden.train_config(), desc="swap+FT", progress=run.progress)
    return direct, evaluate(swapped, run.split.test_batches())


def run_demo(
    out: str | Path,
    config: DemoConfig | None = None,
    force: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the whole demo and write its run folder at ``out``; returns the metrics written to metrics.json.

    ``out`` must not exist unless ``force``; the folder is built under a
    temporary name and moved into place only when everything succeeded.
    ``command`` (the command line that ran it) is recorded in the report.
    """
    config = config or DemoConfig()
    started = time.time()
    with staged_dir(out, force=force) as stage:
        (stage / "checkpoints").mkdir()
        (stage / "plots").mkdir()
        split = load_dataset(config.dataset, config.data_dir, seed=config.seed)
        run = _Run(config, stage, split, progress)
        test = split.test_batches()

        gelu_model, lam_model, recorder = _train_pair(run)
        profile = _profile(run, lam_model, recorder)
        relu_model, hardener, ours = _relufy(run, lam_model)
        direct, tuned = _baselines(run, gelu_model)
        gelu_eval, lam_eval = evaluate(gelu_model, test), evaluate(lam_model, test)
        relu_eval = evaluate(relu_model, test)
        budget = f"{config.harden.steps}"
        rows = [
            Row("GELU baseline (no swap)", gelu_eval.accuracy, None, gelu_eval.accuracy, gelu_eval.loss, "0"),
            Row("direct swap GELU → ReLU", direct.accuracy_before, direct.accuracy_after, direct.accuracy_after,
                direct.loss_after, "0"),
            Row("swap + fine-tuning", direct.accuracy_before, direct.accuracy_after, tuned.accuracy,
                tuned.loss, budget),
            Row("lambda-gelu ReLU-ization", ours.accuracy_before, ours.accuracy_after, relu_eval.accuracy,
                relu_eval.loss, budget),
        ]
        table = comparison_table(rows, gelu_eval.accuracy)

        run.say("[5/5] exporting the ReLU model to ONNX and checking it with onnxruntime")
        export_onnx(relu_model, split.x_test[:2], stage / "model.onnx")
        onnx_report = check_onnx(relu_model, split.x_test, stage / "model.onnx")

        gap = relu_eval.accuracy - gelu_eval.accuracy
        drop = ours.accuracy_before - ours.accuracy_after
        metrics = {
            "lambda_gelu_version": __version__,
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "command": command,
            "config": config.to_dict(),
            "test_examples": gelu_eval.count,
            "gelu_baseline": asdict(gelu_eval),
            "lambda_gelu_before_hardening": asdict(lam_eval),
            "profile": [row.to_dict() for row in profile],
            "targets": {k: v.tolist() for k, v in hardener.target.items()},
            "rows": [dict(asdict(row), drop=row.drop) for row in rows],
            "lambda_gelu_swap": ours.to_dict(),
            "direct_swap": direct.to_dict(),
            "onnx": dict(onnx_report.to_dict(), path="model.onnx"),
            "targets_met": {
                f"final within {TARGET_FINAL_GAP} points of GELU": gap >= -TARGET_FINAL_GAP,
                f"drop at swap <= {TARGET_SWAP_DROP} points": drop <= TARGET_SWAP_DROP,
                "no Gelu/Erf/Tanh in ONNX": not onnx_report.smooth_gate_ops,
                "onnxruntime matches PyTorch": onnx_report.parity_ok,
            },
            "seconds": round(time.time() - started, 1),
        }
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (stage / "report.md").write_text(_report(config, metrics, table, profile_table(profile), _layer_table(ours)))
        print(table)
        print()
        for claim, ok in metrics["targets_met"].items():
            print(f"{'ok ' if ok else 'MISSED'} {claim}")
    print(f"\nrun folder: {out}  ({metrics['seconds']} s)")
    return metrics


def _report(config: DemoConfig, metrics: dict[str, Any], table: str, profile_md: str, layers_md: str) -> str:
    onnx = metrics["onnx"]
    met = "\n".join(f"- {'met' if ok else '**missed**'}: {claim}" for claim, ok in metrics["targets_met"].items())
    ops = ", ".join(f"{op} × {n}" for op, n in onnx["op_counts"].items())
    lam = metrics["lambda_gelu_before_hardening"]
    return f"""# lambda-gelu demo

Data set: **{config.dataset}** ({metrics['test_examples']} test examples; one example is
{100 / metrics['test_examples']:.2f} points). Model: MLP, hidden {list(config.hidden)}. Seed {config.seed}.
Training: {config.train.steps} steps, AdamW, lr {config.train.lr}, weight decay {config.train.weight_decay}.
ReLU-ization: {config.harden.steps} steps (λ ramp over {config.harden.ramp_steps}, {config.harden.shape}),
τ = {config.harden.tau:g}, distillation weight {config.harden.distill_weight}; the fine-tuning baseline gets
the same steps, learning rate and schedule.

## Comparison (test accuracy, %)

{table}

The λ-GELU model before ReLU-ization: {lam['accuracy']:.2f}% (loss {lam['loss']:.4f}).

{met}

## Learned hardness profile

{profile_md}

![profile](plots/profile.png)
![trajectories](plots/trajectories.png)
![gates](plots/gates_learned.png)

## At the swap

Each layer's remaining discrepancy D(λ) = E[(f − ReLU)²]/E[ReLU²] on the test set:

{layers_md}

KL(before ‖ after) = {metrics['lambda_gelu_swap']['kl']:.2e}; largest logit change
{metrics['lambda_gelu_swap']['max_abs_logit_change']:.3g}. Direct swap of the GELU model for comparison:
KL = {metrics['direct_swap']['kl']:.2e}, largest logit change {metrics['direct_swap']['max_abs_logit_change']:.3g}.

![gates after hardening](plots/gates_hardened.png)

## ONNX

`model.onnx` (opset 20): {ops}. Smooth-gate ops left: {onnx['smooth_gate_ops'] or 'none'}.
onnxruntime vs PyTorch on the test set: max |Δ| = {onnx['max_abs_diff']:.2e}.

Command: `{metrics['command'] or 'lambda_gelu.demo.run_demo(...)'}`.
Made in {metrics['seconds']} s with lambda-gelu {metrics['lambda_gelu_version']}, torch {metrics['torch_version']}.
"""

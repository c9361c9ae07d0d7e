"""Soak: many thousands of training steps with λ driven to 1e4 and beyond, learning rates too high on purpose and
faults in the data; no NaN may reach the weights.

Four phases on the digits MLP (64-128-128-128-10), each a real :func:`lambda_gelu.train.fit` run:

* ``harden-to-1e6``: a Hardener drives λ to 1e4, 1e5 and 1e6 (layer by layer) while AdamW trains the weights at
  lr 0.05 (17× the default), with distillation.
* ``hardness-lr-too-high``: training from GELU with AdamW lr 0.1 and hardness_lr 0.5 (33× and 25× the defaults).
* ``faulty-data``: 0.2% of the training rows are NaN and 0.2% hold a value of 1e30 (about a quarter of the
  batches hold one of them); AdamW lr 0.03.
* ``divergent-sgd``: SGD lr 50 with momentum 0.9, which diverges; the run must stop with a clear message and a
  last good state on disk that loads and is finite.

Every phase saves its run state every 500 steps. Reported per phase: steps run, steps skipped (non-finite loss
or gradient), whether it stopped and why, the largest λ, whether every weight is finite, test accuracy.

    python benchmarks/soak.py                    # about 2 minutes on 2 CPU cores
    python benchmarks/soak.py --out docs/results/soak.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from lambda_gelu import Hardener, HardnessRecorder, LambdaGELU, convert
from lambda_gelu.data import Split, load_dataset
from lambda_gelu.distill import Teacher
from lambda_gelu.metrics import evaluate
from lambda_gelu.models import build_model
from lambda_gelu.resume import Checkpointer, load_state
from lambda_gelu.train import FitStats, NonFiniteError, TrainConfig, all_finite, fit


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("mlp", in_features=64, num_classes=10, hidden=[128, 128, 128])
    convert(model)
    return model


def _faulty(split: Split, seed: int) -> Split:
    x = split.x_train.clone()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    n_nan, n_huge = round(0.002 * len(x)), round(0.002 * len(x))
    x[order[:n_nan]] = float("nan")
    x[order[n_nan:n_nan + n_huge], 0] = 1e30
    return dataclasses.replace(split, x_train=x)


def _phase(name: str, model: torch.nn.Module, split: Split, config: TrainConfig, folder: Path,
           hardener: Hardener | None = None, distill_weight: float = 0.0) -> dict[str, object]:
    teacher = Teacher(model) if distill_weight else None
    recorder = HardnessRecorder(model, every=10)
    stats = FitStats()
    stopped, last_good_ok = None, None
    started = time.time()
    try:
        fit(model, split, config, hardener=hardener, teacher=teacher, distill_weight=distill_weight, recorder=recorder,
            progress=False, checkpointer=Checkpointer(folder / name, every=500), stats=stats)
    except NonFiniteError as error:
        stopped = str(error)
        if error.last_good is not None:
            saved = load_state(error.last_good)
            last_good_ok = all_finite(saved.get("model").values())
    lam_max = max((float(row["lam_max"]) for row in recorder.rows), default=1.0)
    final = {n: round(float(m.lam.max()), 4) for n, m in model.named_modules() if isinstance(m, LambdaGELU)}
    return {
        "phase": name,
        "steps": config.steps,
        "steps_run": stats.steps_run,
        "skipped": len(stats.skipped),
        "stopped": stopped,
        "last_good_state_finite": last_good_ok,
        "states_saved": len(stats.saved) + (1 if stopped and last_good_ok is not None else 0),
        "largest_lambda": lam_max,
        "final_lambda": final,
        "weights_finite": all_finite(model.parameters()),
        "test_accuracy": evaluate(model, split.test_batches()).accuracy if all_finite(model.parameters()) else None,
        "seconds": round(time.time() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000, help="steps of each phase (hardening: 2/5 of it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    split = load_dataset("digits")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        model = _model(args.seed)
        fit(model, split, TrainConfig(steps=500, seed=args.seed), progress=False)
        names = [n for n, m in model.named_modules() if isinstance(m, LambdaGELU)]
        targets = {name: 10.0 ** (4 + i) for i, name in enumerate(names)}  # 1e4, 1e5, 1e6
        steps = max(1, 2 * args.steps // 5)
        hardener = Hardener(model, targets, total_steps=steps // 2)
        results.append(_phase("harden-to-1e6", model, split,
                              TrainConfig(steps=steps, lr=0.05, warmup=0, seed=args.seed), folder, hardener, 0.5))

        results.append(_phase("hardness-lr-too-high", _model(args.seed), split,
                              TrainConfig(steps=args.steps, lr=0.1, hardness_lr=0.5, seed=args.seed), folder))
        results.append(_phase("faulty-data", _model(args.seed), _faulty(split, args.seed),
                              TrainConfig(steps=args.steps, lr=0.03, seed=args.seed), folder))
        results.append(_phase("divergent-sgd", _model(args.seed), split,
                              TrainConfig(steps=args.steps, optimizer="sgd", lr=50.0, momentum=0.9, warmup=0,
                                          seed=args.seed), folder))
        leftovers = sorted(p.name for p in folder.rglob("*.tmp"))

    total_steps = sum(int(r["steps_run"]) for r in results)
    nan_weights = sum(not r["weights_finite"] for r in results)
    print("| phase | steps run | skipped | stopped | largest λ | weights finite | test acc. | s |")
    print("| --- | ---: | ---: | --- | ---: | --- | ---: | ---: |")
    for r in results:
        stop = "no" if r["stopped"] is None else f"yes (last good state finite: {r['last_good_state_finite']})"
        acc = "–" if r["test_accuracy"] is None else f"{r['test_accuracy']:.2f}"
        print(f"| {r['phase']} | {r['steps_run']} / {r['steps']} | {r['skipped']} | {stop} | "
              f"{r['largest_lambda']:.4g} | {r['weights_finite']} | {acc} | {r['seconds']} |")
    for r in results:
        if r["stopped"]:
            print(f"\n{r['phase']} stopped: {r['stopped']}")
    print(f"\n{total_steps} steps in all; phases that ended with a non-finite weight: {nan_weights}; "
          f"temporary files left: {len(leftovers)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/soak.py " + " ".join(argv or sys.argv[1:]),
                                              "total_steps": total_steps, "phases": results}, indent=1))
    ok = nan_weights == 0 and all(r["stopped"] is None or r["last_good_state_finite"] for r in results)
    return 0 if ok and math.isfinite(total_steps) else 1


if __name__ == "__main__":
    sys.exit(main())

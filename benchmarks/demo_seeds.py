"""Run ``lambda-gelu demo`` for several seeds and print one summary row per seed.

Each seed also draws its own train/test split. Run folders go to
``<out>/seed<N>`` (default out: runs/demo-seeds-tau<τ>; existing ones are
refused unless --force).

Usage: python benchmarks/demo_seeds.py [--seeds 0 1 2 3] [--tau 1e-5] [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lambda_gelu.demo import DemoConfig, run_demo
from lambda_gelu.harden import HardenConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--tau", type=float, default=HardenConfig.tau)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--out", help="folder for the run folders (default runs/demo-seeds-tau<τ>)")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    out = Path(args.out or f"runs/demo-seeds-tau{args.tau:g}")
    rows = []
    for seed in args.seeds:
        config = DemoConfig(dataset=args.dataset, seed=seed, harden=HardenConfig(tau=args.tau))
        metrics = run_demo(out / f"seed{seed}", config, force=args.force, progress=False,
                           command=f"lambda-gelu demo --seed {seed} --tau {args.tau:g} --dataset {args.dataset}")
        rows.append((seed, {row["method"]: row for row in metrics["rows"]}, metrics))
    print(f"\n{args.dataset}, τ = {args.tau:g}")
    print("| seed | GELU baseline | direct swap (drop) | swap + fine-tuning | lambda-gelu (drop at swap) "
          "| lambda-gelu vs GELU | final loss: GELU / swap+FT / lambda-gelu |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for seed, by_method, _ in rows:
        gelu = by_method["GELU baseline (no swap)"]
        direct = by_method["direct swap GELU → ReLU"]
        tuned = by_method["swap + fine-tuning"]
        ours = by_method["lambda-gelu ReLU-ization"]
        print(f"| {seed} | {gelu['final']:.2f} | {direct['final']:.2f} ({direct['drop']:+.2f}) | {tuned['final']:.2f} "
              f"| {ours['final']:.2f} ({ours['drop']:+.2f}) | {ours['final'] - gelu['final']:+.2f} "
              f"| {gelu['final_loss']:.4f} / {tuned['final_loss']:.4f} / {ours['final_loss']:.4f} |")
    summary = [{"seed": seed, "rows": list(by.values())} for seed, by, _ in rows]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

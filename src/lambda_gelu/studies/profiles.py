"""Layerwise hardness profiles: the λ each layer learns, across seeds and initial values λ0.

For each pair, seed and λ0 ∈ {1, 2, 4}, a λ-GELU model trains for S steps
(the library's optimizer-aware scheme, default ``hardness_lr``) from the
seed's initial weights with every λ starting at λ0. Its profile is each
gate's learned λ and its effective hardness λ·σ (σ: the spread of the gate's
pre-activations on the first 1024 training inputs, the calibration set of
:func:`lambda_gelu.pipeline.harden`).

Robustness is measured by the Spearman rank correlation of the per-layer
profile between two seeds (same λ0) and between two initial values (same
seed), averaged over all such pairs of runs, and by each layer's coefficient
of variation (std / mean) over seeds at λ0 = 1 and over every run.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lambda_gelu.calibrate import calibrate
from lambda_gelu.harden import HardenConfig
from lambda_gelu.outputs import staged_dir
from lambda_gelu.pipeline import calibration_batches
from lambda_gelu.profile import hardness
from lambda_gelu.studies.common import (
    PAIRS,
    PairSpec,
    StudyContext,
    fmt_pm,
    footer,
    markdown_table,
    mean_std,
    parse_pairs,
    run_metadata,
    score,
    trained,
    write_csv,
    write_json,
)

LAMBDA_INITS = {"tiny": (1.0, 4.0), "quick": (1.0, 4.0), "full": (1.0, 2.0, 4.0)}
"""Initial λ0 of every gate, per profile."""


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    return [sum(w < v for w in values) + (sum(w == v for w in values) + 1) / 2 for v in values]


def spearman(a: list[float], b: list[float], significant: int = 3) -> float:
    """Spearman rank correlation of two profiles, NaN if either is constant or shorter than 2.

    Values are first rounded to ``significant`` digits, so layers that sit at
    the same λ up to float noise (e.g. 0.1 runs at its floor 1 + 1e-4) tie; ties get
    average ranks.
    """
    if len(a) != len(b):
        raise ValueError(f"profiles of different lengths: {len(a)} and {len(b)}")
    if len(a) < 2:
        return math.nan
    a = [float(f"{v:.{significant}g}") for v in a]
    b = [float(f"{v:.{significant}g}") for v in b]
    ra, rb = torch.tensor(_ranks(a), dtype=torch.float64), torch.tensor(_ranks(b), dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return math.nan if denominator == 0.0 else float((ra * rb).sum()) / denominator


def _mean_finite(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def cv(values: list[float]) -> float:
    """Coefficient of variation std / mean (sample std; 0 for a single value)."""
    mean, std = mean_std(values)
    return std / mean if mean else math.nan


def run_pair(pair: PairSpec, ctx: StudyContext) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (seed, λ0) run of one pair: per-layer profile rows and λ-trajectory rows."""
    split = ctx.split(pair)
    batches = calibration_batches(split, HardenConfig())
    rows, trajectories = [], []
    for seed in ctx.seeds:
        for lam0 in LAMBDA_INITS[ctx.profile]:
            started = time.time()
            model, trajectory = trained(pair, ctx, seed, "lambda_gelu", lam0=lam0)
            metric, _ = score(pair, model, split)
            profile = hardness(model, calibrate(model, batches))
            for index, layer in enumerate(profile):
                rows.append({"pair": pair.name, "seed": seed, "lam0": lam0, "layer": layer.name, "index": index,
                             "lam": layer.lam, "sigma": layer.sigma, "effective": layer.effective,
                             "metric": metric})
            trajectories += [dict(r, pair=pair.name, seed=seed, lam0=lam0) for r in trajectory]
            ctx.say(f"profiles {pair.name} seed {seed} λ0 {lam0:g}: "
                    f"λ = {', '.join(f'{p.lam:.3g}' for p in profile)}; {pair.metric.name} {metric:.3f} "
                    f"({time.time() - started:.0f} s)")
    return rows, trajectories


def robustness(rows: list[dict[str, Any]], seeds: tuple[int, ...], inits: tuple[float, ...]) -> dict[str, Any]:
    """Spearman across seeds and across inits, and per-layer CVs, of one pair's profile rows."""
    layers = sorted({(r["index"], r["layer"]) for r in rows})

    def profile(seed: int, lam0: float, key: str) -> list[float]:
        mine = sorted((r for r in rows if r["seed"] == seed and r["lam0"] == lam0), key=lambda r: r["index"])
        return [float(r[key]) for r in mine]

    out: dict[str, Any] = {}
    for key in ("lam", "effective"):
        across_seeds = [spearman(profile(a, lam0, key), profile(b, lam0, key))
                        for lam0 in inits for a, b in itertools.combinations(seeds, 2)]
        across_inits = [spearman(profile(seed, a, key), profile(seed, b, key))
                        for seed in seeds for a, b in itertools.combinations(inits, 2)]
        out[key] = {
            "spearman_across_seeds": _mean_finite(across_seeds),
            "spearman_across_inits": _mean_finite(across_inits),
            "spearman_pairs": {"seeds": len(across_seeds), "inits": len(across_inits),
                               "undefined": sum(math.isnan(v) for v in across_seeds + across_inits)},
            "layers": {name: _layer_stats(rows, name, key, inits) for _, name in layers},
        }
    out["metric"] = {str(lam0): [r["metric"] for r in rows if r["lam0"] == lam0 and r["index"] == 0]
                     for lam0 in inits}
    out["init_pairs"] = {
        f"{a:g}-{b:g}": {
            "mean_abs_dlog_lam": statistics.fmean(
                abs(math.log(u) - math.log(v))
                for seed in seeds for u, v in zip(profile(seed, a, "lam"), profile(seed, b, "lam"), strict=True)),
            "spearman": _mean_finite([spearman(profile(seed, a, "lam"), profile(seed, b, "lam")) for seed in seeds]),
        }
        for a, b in itertools.combinations(inits, 2)
    }
    return out


def _layer_stats(rows: list[dict[str, Any]], name: str, key: str, inits: tuple[float, ...]) -> dict[str, Any]:
    by_init = {str(lam0): [float(r[key]) for r in rows if r["layer"] == name and r["lam0"] == lam0] for lam0 in inits}
    return {"by_init": by_init, "cv_across_seeds": cv(by_init[str(inits[0])]),
            "cv_all_runs": cv([v for values in by_init.values() for v in values])}


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def report(summary: dict[str, Any], pairs: list[PairSpec], ctx: StudyContext, meta: dict[str, Any]) -> str:
    """The Markdown report: robustness summary, then the per-layer profile of every pair."""
    inits = LAMBDA_INITS[ctx.profile]
    parts = ["# Layerwise hardness profiles\n",
             f"Learned λ per layer after S training steps, mean ± std over seeds {list(ctx.seeds)}, from every "
             f"initial λ0 in {list(inits)}; λ·σ is the effective hardness on the layer's own pre-activations "
             "(calibration set: the first 1024 training inputs). Spearman: mean rank correlation of the per-layer "
             "profile over all pairs of seeds (same λ0) and all pairs of initial values (same seed); n/a where "
             "every profile is flat (all layers at the same λ). CV: coefficient of variation of a layer's λ "
             "over seeds at λ0 = 1, and over all runs (seeds × λ0).\n"]
    rows = []
    for pair in pairs:
        r = summary[pair.name]
        rows.append([pair.title, _fmt(r["lam"]["spearman_across_seeds"]), _fmt(r["lam"]["spearman_across_inits"]),
                     _fmt(r["effective"]["spearman_across_seeds"]), _fmt(r["effective"]["spearman_across_inits"]),
                     _fmt(_mean_finite([v["cv_across_seeds"] for v in r["lam"]["layers"].values()])),
                     _fmt(_mean_finite([v["cv_all_runs"] for v in r["lam"]["layers"].values()])),
                     " / ".join(fmt_pm(v, 2 if pair.metric.name == "accuracy" else 3) for v in r["metric"].values())])
    parts.append(markdown_table(
        ["pair", "ρ_s(λ) seeds", "ρ_s(λ) inits", "ρ_s(λσ) seeds", "ρ_s(λσ) inits", "mean CV(λ) seeds",
         "mean CV(λ) all", f"metric per λ0 {list(inits)}"], rows) + "\n")
    init_pairs = list(summary[pairs[0].name]["init_pairs"]) if pairs else []
    if init_pairs:
        parts.append("Agreement across initial values: for each pair of λ0, the mean over seeds and layers of "
                     f"|log λ_a − log λ_b| (target ≤ {INIT_AGREEMENT_TARGET}), and the Spearman ρ of the two "
                     "profiles (mean over seeds; n/a where a profile is flat).\n")
        parts.append(markdown_table(
            ["pair", *[f"mean \\|Δ log λ\\| λ0 {k}" for k in init_pairs], *[f"ρ_s λ0 {k}" for k in init_pairs]],
            [[pair.title,
              *[_fmt(summary[pair.name]["init_pairs"][k]["mean_abs_dlog_lam"]) for k in init_pairs],
              *[_fmt(summary[pair.name]["init_pairs"][k]["spearman"]) for k in init_pairs]] for pair in pairs]) + "\n")
    for pair in pairs:
        r = summary[pair.name]
        header = ["layer", *[f"λ (λ0={lam0:g})" for lam0 in inits], *[f"λ·σ (λ0={lam0:g})" for lam0 in inits],
                  "CV(λ) seeds", "CV(λ) all"]
        table = []
        for name, lam in r["lam"]["layers"].items():
            eff = r["effective"]["layers"][name]
            table.append([name, *[fmt_pm(v, 3) for v in lam["by_init"].values()],
                          *[fmt_pm(v, 2) for v in eff["by_init"].values()],
                          _fmt(lam["cv_across_seeds"]), _fmt(lam["cv_all_runs"])])
        parts.append(f"## {pair.title}\n\nS = {ctx.steps(pair)} steps.\n")
        parts.append(markdown_table(header, table) + "\n")
        parts.append(f"![{pair.name}](figures/{pair.name}.png)\n")
    parts.append(footer(meta))
    return "\n".join(parts)


INIT_AGREEMENT_TARGET = 0.15
"""Profiles from different λ0 agree when their mean |Δ log λ| is at most this (issue 11's target)."""

DEFAULT_SEEDS = {"tiny": (0, 1), "quick": (0, 1), "full": (0, 1, 2)}
"""Seeds per profile when none are given."""


def run_profiles(out: str | Path, ctx: StudyContext, pairs: list[str] | None = None, force: bool = False
                 ) -> dict[str, Any]:
    """Run the hardness-profile study and write its results folder; returns the per-pair summary."""
    from lambda_gelu.studies.figures import plot_profiles_pair

    specs = parse_pairs(pairs, list(PAIRS))
    ctx = ctx.with_default_seeds(DEFAULT_SEEDS)
    started = time.time()
    inits = LAMBDA_INITS[ctx.profile]
    with staged_dir(out, force=force) as stage:
        (stage / "figures").mkdir()
        all_rows, all_trajectories, summary = [], [], {}
        for pair in specs:
            rows, trajectories = run_pair(pair, ctx)
            summary[pair.name] = robustness(rows, ctx.seeds, inits)
            plot_profiles_pair(summary[pair.name], trajectories, pair, inits, stage / "figures" / f"{pair.name}.png")
            all_rows += rows
            all_trajectories += trajectories
        meta = run_metadata("profiles", ctx, specs, started, {"lambda_inits": list(inits)})
        write_csv(stage / "profiles.csv", all_rows)
        write_csv(stage / "trajectories.csv", all_trajectories)
        write_json(stage / "summary.json", {"meta": meta, "summary": summary})
        (stage / "README.md").write_text(report(summary, specs, ctx, meta))
    ctx.say(f"profiles study done in {(time.time() - started) / 60:.1f} min -> {out}")
    return summary

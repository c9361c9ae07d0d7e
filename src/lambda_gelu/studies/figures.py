"""PNG figures of the studies (matplotlib, Agg backend)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lambda_gelu.studies.common import PairSpec, mean_std

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _lambda_scale(ax: plt.Axes, values: Sequence[float]) -> None:
    """Log scale where λ spans more than a factor 20, symlog if it also goes below 0, else linear, plain ticks."""
    if not values:
        return
    low, high = min(values), max(values)
    if high > 20 * max(low, 1e-3):
        ax.set_yscale("log" if low > 0 else "symlog", **({} if low > 0 else {"linthresh": 1.0}))
    else:
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def plot_relufy_pair(summary: dict[str, Any], pair: PairSpec, path: str | Path) -> Path:
    """Final metric of every method (mean ± std over seeds) and the drop at the swap of the swapping methods."""
    methods = summary["methods"]
    keys = list(methods)
    labels = [methods[k]["label"] for k in keys]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    stats = [mean_std(methods[k]["final"]) for k in keys]
    ax.bar(range(len(keys)), [m for m, _ in stats], yerr=[s for _, s in stats], color=COLORS[: len(keys)], capsize=3)
    ax.axhline(stats[0][0], color="gray", lw=0.8, ls="--", label="GELU baseline")
    low = min(m - s for m, s in stats)
    high = max(m + s for m, s in stats)
    pad = 0.15 * (high - low) + 1e-3
    ax.set_ylim(low - pad, high + pad)
    ax.set_xticks(range(len(keys)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(pair.metric.unit)
    ax.set_title(f"{pair.title}: final metric at equal extra steps")
    ax.legend(fontsize=8)
    swap_keys = [k for k in keys if methods[k]["drop_at_swap"]]
    drops = [mean_std(methods[k]["drop_at_swap"]) for k in swap_keys]
    ax2.bar(range(len(swap_keys)), [m for m, _ in drops], yerr=[s for _, s in drops], capsize=3,
            color=[COLORS[keys.index(k)] for k in swap_keys])
    ax2.axhline(0.0, color="black", lw=0.6)
    ax2.set_xticks(range(len(swap_keys)), [methods[k]["label"] for k in swap_keys], rotation=30, ha="right",
                   fontsize=8)
    ax2.set_ylabel(f"drop at the swap ({pair.metric.damage_unit})")
    ax2.set_title("Drop at the swap")
    return _save(fig, path)


def plot_budget_curves(rows: list[dict[str, Any]], pairs: Sequence[PairSpec], labels: dict[str, str],
                       path: str | Path) -> Path:
    """Per pair: each method's final metric (mean over seeds, ± one std shaded with several) against its
    extra-step budget, GELU dashed."""
    cols = min(3, len(pairs))
    nrows = (len(pairs) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
    for ax, pair in zip(axes.flat, pairs, strict=False):
        mine = [row for row in rows if row["pair"] == pair.name]
        for i, (method, label) in enumerate(labels.items()):
            points: dict[int, list[float]] = defaultdict(list)
            for row in mine:
                if row["method"] == method:
                    points[row["extra_steps"]].append(row["final"])
            xs = sorted(points)
            means = [statistics.fmean(points[x]) for x in xs]
            color = COLORS[i % len(COLORS)]
            ax.plot(xs, means, marker="o", ms=3, color=color, label=label)
            if all(len(points[x]) > 1 for x in xs):  # the seed spread: mean ± one std
                spread = [statistics.stdev(points[x]) for x in xs]
                ax.fill_between(xs, [m - d for m, d in zip(means, spread, strict=True)],
                                [m + d for m, d in zip(means, spread, strict=True)], color=color, alpha=0.12, lw=0)
        gelu = [row["final"] for row in mine if row["method"] == "gelu"]
        if gelu:
            ax.axhline(statistics.fmean(gelu), color="gray", lw=0.8, ls="--", label="GELU")
        ax.set_xlabel("extra steps")
        ax.set_ylabel(pair.metric.unit)
        ax.set_title(pair.title, fontsize=9)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    return _save(fig, path)


def plot_profiles_pair(summary: dict[str, Any], trajectories: list[dict[str, Any]], pair: PairSpec,
                       inits: Sequence[float], path: str | Path) -> Path:
    """Learned λ and λ·σ per layer for every λ0 (mean ± std over seeds), and the λ trajectories."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    layers = list(summary["lam"]["layers"])
    width = 0.8 / len(inits)
    for ax, key, title in ((axes[0], "lam", "learned λ"), (axes[1], "effective", "effective hardness λ·σ")):
        for i, lam0 in enumerate(inits):
            stats = [mean_std(summary[key]["layers"][name]["by_init"][str(lam0)]) for name in layers]
            xs = [j + (i - (len(inits) - 1) / 2) * width for j in range(len(layers))]
            ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=2, color=COLORS[i],
                   label=f"λ0 = {lam0:g}")
        ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{pair.title}: {title}", fontsize=9)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax = axes[2]
    styles = ["-", "--", ":", "-."]
    for i, lam0 in enumerate(inits):
        for j, name in enumerate(layers):
            by_step: dict[int, list[float]] = defaultdict(list)
            for row in trajectories:
                if row["lam0"] == lam0 and row["layer"] == name:
                    by_step[int(row["step"])].append(float(row["lam"]))
            xs = sorted(by_step)
            ax.plot(xs, [statistics.fmean(by_step[x]) for x in xs], ls=styles[i % len(styles)],
                    color=COLORS[j % len(COLORS)], lw=1, label=name if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("λ (mean over seeds)")
    ax.set_title("λ during training (line style: λ0 " + ", ".join(f"{x:g}" for x in inits) + ")", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_dynamics_trajectories(rows: list[dict[str, Any]], pair: PairSpec, variants: Sequence[Any],
                               path: str | Path) -> Path:
    """λ against the step for every variant (one panel each; color: layer; one line per seed)."""
    cols = 4
    nrows = (len(variants) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False, sharex=True)
    for ax, variant in zip(axes.flat, variants, strict=False):
        lines: dict[tuple[str, int], tuple[list[int], list[float]]] = {}
        for row in rows:
            if row["variant"] == variant.key:
                xs, ys = lines.setdefault((row["layer"], row["seed"]), ([], []))
                xs.append(row["step"])
                ys.append(row["lam"])
        layers = list(dict.fromkeys(layer for layer, _ in lines))
        for (layer, _seed), (xs, ys) in lines.items():
            ax.plot(xs, ys, color=COLORS[layers.index(layer) % len(COLORS)], lw=0.9, alpha=0.75)
        ax.axhline(1.0, color="gray", lw=0.6, ls="--")
        _lambda_scale(ax, [y for _, ys in lines.values() for y in ys])
        ax.set_title(variant.label, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
    for ax in list(axes.flat)[len(variants):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=COLORS[i % len(COLORS)], label=name)
               for i, name in enumerate(dict.fromkeys(r["layer"] for r in rows))]
    axes.flat[0].legend(handles=handles, fontsize=6)
    axes.flat[0].set_ylabel("λ")
    fig.suptitle(f"{pair.title}: λ during training (every seed)", fontsize=10)
    return _save(fig, path)


def plot_dynamics_gradients(rows: list[dict[str, Any]], pair: PairSpec, variants: Sequence[Any],
                            path: str | Path) -> Path:
    """|∂L/∂λ| (median over layers and seeds) against the step, one panel per optimizer."""
    optimizers = list(dict.fromkeys(v.optimizer for v in variants))
    fig, axes = plt.subplots(1, len(optimizers), figsize=(6 * len(optimizers), 3.6), squeeze=False)
    for ax, optimizer in zip(axes[0], optimizers, strict=False):
        for i, variant in enumerate(v for v in variants if v.optimizer == optimizer):
            by_step: dict[int, list[float]] = defaultdict(list)
            for row in rows:
                if row["variant"] == variant.key and row["grad_lam"] is not None:
                    by_step[int(row["step"])].append(abs(float(row["grad_lam"])))
            xs = sorted(by_step)
            ys = [max(statistics.median(by_step[x]), 1e-12) for x in xs]
            ax.plot(xs, ys, color=COLORS[i], lw=1, label=variant.label)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("|∂L/∂λ| (median over layers, seeds)")
        ax.set_title(f"{pair.title}: λ's gradient, {optimizer.upper()}", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)

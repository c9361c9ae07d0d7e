"""Learning dynamics of λ: naive λ vs the constrained reparameterization vs the optimizer-aware scheme.

Every variant trains the same model (same initial weights per seed, every λ
starting at 1) under SGD (momentum 0.9, lr ``pair.sgd_lr``, weight decay
5e-4) or AdamW (lr ``pair.lr``, weight decay 0.1), with the same schedule
and data order:

* **naive λ**: λ itself is an ``nn.Parameter`` (f = x·Φ(λx), nothing keeps
  λ >= 1), trained at the weights' learning rate, without or with the
  optimizer's weight decay on λ;
* **constrained**: :class:`~lambda_gelu.LambdaGELU` (λ = exp ρ, read through
  a clamp at λ = 1) with ρ in
  a plain optimizer group (the biases' group: the weights' learning rate, no
  decay, no normalization);
* **scheme**: :func:`lambda_gelu.param_groups` (own group, ``hardness_lr``
  0.02, normalized optimizer-aware update, projection).

Measured per run and layer, every step: λ and ∂L/∂λ (for ρ, ∂L/∂ρ / λ).
Reported: the share of steps with λ < 1 and the smallest λ seen; oscillation
as the share of sign changes of Δλ over the second half of training;
attenuation as the median |∂L/∂λ| over the last 10% of steps divided by that
over the first 10%; the spread (std) of the final λ across seeds; the task
metric.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lambda_gelu.convert import replace_modules
from lambda_gelu.gelu_types import is_gelu
from lambda_gelu.module import LambdaGELU
from lambda_gelu.ops import lambda_gelu
from lambda_gelu.optim import param_groups
from lambda_gelu.outputs import staged_dir
from lambda_gelu.studies.common import (
    PairSpec,
    StudyContext,
    build,
    cached,
    fmt_pm,
    footer,
    markdown_table,
    mean_std,
    parse_pairs,
    run_metadata,
    score,
    train_config,
    write_csv,
    write_json,
)
from lambda_gelu.train import fit

DEFAULT_PAIRS = {"tiny": ("mlp_digits",), "quick": ("mlp_digits",), "full": ("mlp_digits", "mlp_mnist1d")}
"""The pairs of each profile when none are given."""
SGD_WEIGHT_DECAY = 5e-4
ADAMW_WEIGHT_DECAY = 0.1
TRAJECTORY_POINTS = 100
"""λ trajectories are written at about this many steps per run (the statistics use every step)."""


@dataclass(frozen=True)
class Variant:
    """How λ is parameterized and optimized."""

    key: str
    label: str
    parameterization: str  # "naive" | "constrained" | "scheme"
    optimizer: str  # "sgd" | "adamw"
    decay_lambda: bool = False


VARIANTS = (
    Variant("naive_sgd", "naive λ, SGD", "naive", "sgd"),
    Variant("naive_sgd_wd", "naive λ + weight decay, SGD", "naive", "sgd", True),
    Variant("naive_adamw", "naive λ, AdamW", "naive", "adamw"),
    Variant("naive_adamw_wd", "naive λ + weight decay, AdamW", "naive", "adamw", True),
    Variant("constrained_sgd", "λ = exp ρ (clamped at 1), plain group, SGD", "constrained", "sgd"),
    Variant("constrained_adamw", "λ = exp ρ (clamped at 1), plain group, AdamW", "constrained", "adamw"),
    Variant("scheme_sgd", "lambda-gelu scheme, SGD", "scheme", "sgd"),
    Variant("scheme_adamw", "lambda-gelu scheme, AdamW", "scheme", "adamw"),
)


class NaiveLambdaGELU(nn.Module):
    """f(x; λ) = x·Φ(λx) with λ itself a plain parameter: what one would write first."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lambda_gelu(x, self.lam)


def _gates(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (NaiveLambdaGELU, LambdaGELU))}


def _gate_lambda(gate: nn.Module) -> float:
    return float(gate.lam.detach()) if isinstance(gate, NaiveLambdaGELU) else float(gate.lam)


class LambdaProbe:
    """Every step's λ and ∂L/∂λ of each gate; pass as ``recorder`` to :func:`lambda_gelu.train.fit`.

    ∂L/∂λ is captured by a hook on the gate's raw parameter during the
    backward pass: for a naive gate it is the parameter's gradient, for a
    LambdaGELU it is ∂L/∂ρ / λ, since λ = e^ρ gives dλ/dρ = λ.
    """

    def __init__(self, model: nn.Module) -> None:
        self.gates = _gates(model)
        self.lam: dict[str, list[float]] = {name: [_gate_lambda(g)] for name, g in self.gates.items()}
        self.grad: dict[str, list[float]] = {name: [] for name in self.gates}
        self._last: dict[str, float] = {}
        self._handles = []
        for name, gate in self.gates.items():
            raw = gate.lam if isinstance(gate, NaiveLambdaGELU) else gate.log_lam
            self._handles.append(raw.register_hook(self._hook(name, gate)))

    def _hook(self, name: str, gate: nn.Module):
        def hook(grad: torch.Tensor) -> None:
            g = float(grad.detach().float().sum())
            if isinstance(gate, LambdaGELU):
                g /= _gate_lambda(gate)  # ∂L/∂λ = ∂L/∂ρ / λ
            self._last[name] = g

        return hook

    def record(self, step: int) -> None:
        """Log λ after the optimizer step and this step's ∂L/∂λ."""
        for name, gate in self.gates.items():
            self.lam[name].append(_gate_lambda(gate))
            self.grad[name].append(self._last.get(name, 0.0))

    def close(self) -> None:
        """Remove the gradient hooks."""
        for handle in self._handles:
            handle.remove()


def build_variant(pair: PairSpec, ctx: StudyContext, seed: int, variant: Variant) -> nn.Module:
    """The pair's model with the seed's initial weights and every gate made for ``variant`` (λ = 1)."""
    split = ctx.split(pair)
    model = build(pair, ctx, split, seed, "gelu")
    if variant.parameterization == "naive":
        replace_modules(model, lambda m, _n: is_gelu(m), lambda _m, _n: NaiveLambdaGELU(1.0))
    else:
        replace_modules(model, lambda m, _n: is_gelu(m), lambda _m, _n: LambdaGELU(1.0))
    return model.to(ctx.device)


def optimizer_groups(model: nn.Module, variant: Variant, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """The optimizer groups of ``variant``: weights (decay), biases/norms (+ λ or ρ unless decayed), or the scheme's."""
    if variant.parameterization == "scheme":
        return param_groups(model, lr, weight_decay)
    raw = {id(g.lam if isinstance(g, NaiveLambdaGELU) else g.log_lam) for g in _gates(model).values()}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.ndim >= 2 or (id(p) in raw and variant.decay_lambda):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "lr": lr, "weight_decay": weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0}]


def sign_change_share(values: list[float]) -> float:
    """Share of consecutive nonzero steps Δλ whose sign flips (0 = monotone, 1 = flips every step)."""
    deltas = [b - a for a, b in itertools.pairwise(values) if b != a]
    if len(deltas) < 2:
        return 0.0
    flips = sum((a > 0) != (b > 0) for a, b in itertools.pairwise(deltas))
    return flips / (len(deltas) - 1)


def attenuation(grads: list[float]) -> float:
    """Median |∂L/∂λ| over the last 10% of steps ÷ over the first 10% (small = the signal faded)."""
    n = max(1, len(grads) // 10)
    first = statistics.median(abs(g) for g in grads[:n])
    last = statistics.median(abs(g) for g in grads[-n:])
    return last / first if first > 0 else float("nan")


def run_one(pair: PairSpec, ctx: StudyContext, seed: int, variant: Variant) -> tuple[dict[str, Any], LambdaProbe]:
    """Train one variant; returns its per-run statistics and the probe with every step's λ and ∂L/∂λ."""
    split = ctx.split(pair)
    model = build_variant(pair, ctx, seed, variant)
    sgd = variant.optimizer == "sgd"
    lr = pair.sgd_lr if sgd else pair.lr
    weight_decay = SGD_WEIGHT_DECAY if sgd else ADAMW_WEIGHT_DECAY
    config = train_config(pair, ctx, seed, optimizer=variant.optimizer, lr=lr, weight_decay=weight_decay)
    probe = LambdaProbe(model)
    diverged = False
    try:
        fit(model, split, config, recorder=probe, optimizer_groups=optimizer_groups(model, variant, lr, weight_decay),
            desc=variant.key, progress=False)
    except FloatingPointError:
        diverged = True
    probe.close()
    metric = float("nan") if diverged else score(pair, model, split)[0]
    half = len(next(iter(probe.lam.values()))) // 2
    layers = {}
    for name in probe.gates:
        lams = probe.lam[name]
        layers[name] = {
            "final": lams[-1],
            "min": min(lams),
            "share_below_1": sum(v < 1.0 for v in lams[1:]) / max(1, len(lams) - 1),
            "sign_changes": sign_change_share(lams[half:]),
            "attenuation": attenuation(probe.grad[name]),
            "grad_first": statistics.median(abs(g) for g in probe.grad[name][: max(1, len(probe.grad[name]) // 10)]),
            "grad_last": statistics.median(abs(g) for g in probe.grad[name][-max(1, len(probe.grad[name]) // 10):]),
        }
    return {"pair": pair.name, "seed": seed, "variant": variant.key, "metric": metric, "diverged": diverged,
            "layers": layers}, probe


def _run_and_rows(pair: PairSpec, ctx: StudyContext, seed: int, variant: Variant
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    result, probe = run_one(pair, ctx, seed, variant)
    return result, _trajectory_rows(pair, seed, variant, probe)


def _trajectory_rows(pair: PairSpec, seed: int, variant: Variant, probe: LambdaProbe) -> list[dict[str, Any]]:
    rows = []
    steps = len(next(iter(probe.lam.values())))
    every = max(1, steps // TRAJECTORY_POINTS)
    for name in probe.gates:
        for step in range(0, steps, every):
            grad = probe.grad[name][step - 1] if step > 0 else None
            rows.append({"pair": pair.name, "seed": seed, "variant": variant.key, "layer": name, "step": step,
                         "lam": probe.lam[name][step], "grad_lam": grad})
    return rows


def summarize(runs: list[dict[str, Any]], pairs: list[PairSpec]) -> dict[str, Any]:
    """Per pair and variant: the statistics averaged over layers, mean ± std over seeds."""
    summary: dict[str, Any] = {}
    for pair in pairs:
        per_variant = {}
        for variant in VARIANTS:
            mine = [r for r in runs if r["pair"] == pair.name and r["variant"] == variant.key]
            names = list(mine[0]["layers"]) if mine else []

            def over_layers(run: dict[str, Any], key: str, names: list[str] = names) -> float:
                return statistics.fmean(run["layers"][n][key] for n in names)

            final_spread = {n: mean_std([r["layers"][n]["final"] for r in mine])[1] for n in names}
            per_variant[variant.key] = {
                "label": variant.label,
                "metric": [r["metric"] for r in mine],
                "diverged": sum(r["diverged"] for r in mine),
                "min_lambda": min((r["layers"][n]["min"] for r in mine for n in names), default=float("nan")),
                "share_below_1": [over_layers(r, "share_below_1") for r in mine],
                "sign_changes": [over_layers(r, "sign_changes") for r in mine],
                "attenuation": [over_layers(r, "attenuation") for r in mine],
                "final_lambda": {n: [r["layers"][n]["final"] for r in mine] for n in names},
                "final_spread": final_spread,
            }
        summary[pair.name] = per_variant
    return summary


def report(summary: dict[str, Any], pairs: list[PairSpec], ctx: StudyContext, meta: dict[str, Any]) -> str:
    """The Markdown report: one table per pair, then the figures."""
    parts = ["# Learning dynamics of λ\n",
             "Every λ starts at 1. *λ < 1*: share of steps (all layers) with λ below 1, and the smallest λ seen "
             "in any run. *Oscillation*: share of sign changes of Δλ over the second half of training (0 = "
             "monotone). *Attenuation*: median |∂L/∂λ| over the last 10% of steps ÷ over the first 10% (mean "
             "over layers). *Final λ*: per layer, mean ± std over seeds. Mean ± std over seeds "
             f"{list(ctx.seeds)}.\n"]
    for pair in pairs:
        digits = 2 if pair.metric.name == "accuracy" else 3
        rows = []
        for variant in VARIANTS:
            v = summary[pair.name][variant.key]
            finals = "; ".join(fmt_pm(vals, 3) for vals in v["final_lambda"].values())
            rows.append([v["label"], fmt_pm([100 * x for x in v["share_below_1"]], 1) + " %",
                         f"{v['min_lambda']:.3g}", fmt_pm(v["sign_changes"], 2),
                         fmt_pm(v["attenuation"], 3), finals, fmt_pm(v["metric"], digits)
                         + (f" ({v['diverged']} diverged)" if v["diverged"] else "")])
        layers = ", ".join(summary[pair.name][VARIANTS[0].key]["final_lambda"])
        parts.append(f"## {pair.title}\n\nS = {ctx.steps(pair)} steps; layers: {layers}.\n")
        parts.append(markdown_table(["variant", "λ < 1 (steps)", "min λ", "oscillation", "attenuation",
                                     "final λ per layer", pair.metric.unit], rows) + "\n")
        parts.append(f"![trajectories]({'figures'}/{pair.name}_trajectories.png)\n")
        parts.append(f"![gradients]({'figures'}/{pair.name}_gradients.png)\n")
    parts.append(footer(meta))
    return "\n".join(parts)


DEFAULT_SEEDS = {"tiny": (0, 1), "quick": (0, 1), "full": (0, 1, 2)}
"""Seeds per profile when none are given."""


def run_dynamics(out: str | Path, ctx: StudyContext, pairs: list[str] | None = None, force: bool = False
                 ) -> dict[str, Any]:
    """Run the learning-dynamics study and write its results folder; returns the summary."""
    from lambda_gelu.studies.figures import plot_dynamics_gradients, plot_dynamics_trajectories

    specs = parse_pairs(pairs, DEFAULT_PAIRS[ctx.profile])
    ctx = ctx.with_default_seeds(DEFAULT_SEEDS)
    started = time.time()
    with staged_dir(out, force=force) as stage:
        (stage / "figures").mkdir()
        runs, trajectories = [], []
        for pair in specs:
            pair_rows = []
            for seed in ctx.seeds:
                for variant in VARIANTS:
                    t0 = time.time()
                    recipe = {"study": "dynamics", "pair": pair.name, "seed": seed, "variant": variant.__dict__,
                              "train": train_config(pair, ctx, seed).to_dict(), "points": TRAJECTORY_POINTS,
                              "model_kwargs": pair.model_kwargs(ctx.split(pair), ctx.tiny)}
                    result, rows = cached(ctx, f"dynamics-{pair.name}-seed{seed}-{variant.key}", recipe,
                                          lambda p=pair, s=seed, v=variant: _run_and_rows(p, ctx, s, v))
                    runs.append(result)
                    pair_rows += rows
                    finals = ", ".join(f"{v['final']:.3g}" for v in result["layers"].values())
                    ctx.say(f"dynamics {pair.name} seed {seed} {variant.key}: λ = {finals}; "
                            f"{pair.metric.name} {result['metric']:.3f} ({time.time() - t0:.0f} s)")
            plot_dynamics_trajectories(pair_rows, pair, VARIANTS, stage / "figures" / f"{pair.name}_trajectories.png")
            plot_dynamics_gradients(pair_rows, pair, VARIANTS, stage / "figures" / f"{pair.name}_gradients.png")
            trajectories += pair_rows
        summary = summarize(runs, specs)
        meta = run_metadata("dynamics", ctx, specs, started, {
            "variants": [v.__dict__ for v in VARIANTS], "sgd": {"momentum": 0.9, "weight_decay": SGD_WEIGHT_DECAY},
            "adamw": {"weight_decay": ADAMW_WEIGHT_DECAY}})
        write_json(stage / "summary.json", {"meta": meta, "summary": summary, "runs": runs})
        write_csv(stage / "trajectories.csv", trajectories)
        (stage / "README.md").write_text(report(summary, specs, ctx, meta))
    ctx.say(f"dynamics study done in {(time.time() - started) / 60:.1f} min -> {out}")
    return summary

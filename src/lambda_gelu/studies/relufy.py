"""The ReLU-ization table: nine ways to end up with (or without) a ReLU network, at equal extra-step budgets.

For each pair and seed, three models train for S steps from the same
initial weights: GELU, λ-GELU (λ learned from 1) and, for S + E steps, ReLU
from scratch. Then, with E extra steps each:

* **direct swap**: GELU → ReLU, no extra steps;
* **swap + fine-tuning**: the swapped model trains E steps (CE);
* **swap + FT + distillation**: the same with (1 − w)·CE + w·KL(GELU teacher ‖ model), w = 0.5;
* **swap + fold + distillation**: the swap with each gate's per-channel affine fit folded into the Linear
  that reads it (:func:`lambda_gelu.affine_fold.swap_fold_`), then distilled as above;
* **fixed λ = 1, hardened**: the GELU model as LambdaGELU(λ = 1), hardened by
  the deterministic schedule for E steps (the library's defaults), then swapped;
* **learned λ, hardened** (lambda-gelu): the λ-GELU model, hardened the same way, then swapped;
* **learned λ, hardened with fold**: the same with ``HardenConfig(fold=True)``: every step of λ and the
  swap folded into the reading Linear.

The extra-step budget E is the same for the six methods that use it, with the
same learning rate, schedule and data order; each is also run at the other
budgets of the grid {0, E/4, E/2, E, 2E} (full profile), a run of its own with
its own schedule each, for the budget curves. The "steps to recover" of a
method is the smallest budget b in the grid at which its ReLU model is within
``metric.near`` of the smooth model it started from.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from torch import nn

from lambda_gelu.convert import convert
from lambda_gelu.distill import Teacher
from lambda_gelu.metrics import disruption
from lambda_gelu.outputs import staged_dir
from lambda_gelu.pipeline import calibration_batches, harden, relu_copy
from lambda_gelu.studies.common import (
    PAIRS,
    PairSpec,
    StudyContext,
    cached,
    fmt_pm,
    footer,
    harden_config,
    markdown_table,
    mean_std,
    parse_pairs,
    run_metadata,
    score,
    trained,
    write_csv,
    write_json,
)
from lambda_gelu.train import fit

METHODS = (
    ("gelu", "GELU baseline (no swap)"),
    ("relu_scratch", "ReLU from scratch"),
    ("direct_swap", "direct swap"),
    ("swap_ft", "swap + fine-tuning"),
    ("swap_ft_distill", "swap + FT + distillation"),
    ("swap_fold_distill", "swap + fold + distillation"),
    ("harden_fixed", "fixed λ = 1, hardened"),
    ("harden_learned", "lambda-gelu (learned λ, hardened)"),
    ("harden_learned_fold", "lambda-gelu + fold"),
)
"""(key, label) of every method, in table order."""

SWAPPING = ("direct_swap", "swap_ft", "swap_ft_distill", "swap_fold_distill", "harden_fixed", "harden_learned",
            "harden_learned_fold")
BUDGETED = ("swap_ft", "swap_ft_distill", "swap_fold_distill", "harden_fixed", "harden_learned",
            "harden_learned_fold")
OURS = ("harden_learned", "harden_learned_fold")
"""lambda-gelu's recipes, which start from the λ-GELU model; the others are baselines that start from the GELU model."""
SAME_DROP = 0.005
"""Drops at the swap closer than this (points, or % relative bpc) count as equal: half the reported 0.01."""
GRIDS = {"tiny": (1.0,), "quick": (1.0,), "full": (0.25, 0.5, 1.0, 2.0)}
"""Fractions of the extra-step budget E at which each budgeted method is run."""


def _extra_run(method: str, pair: PairSpec, split, seed: int, steps: int, gelu: nn.Module, lam: nn.Module
               ) -> dict[str, float]:
    """One budgeted method with ``steps`` extra steps: start/before-swap/after-swap/final scores."""
    config = harden_config(pair, seed, steps)
    test = split.test_batches(256)
    metric = pair.metric
    fold = calibration_batches(split, config) if method in ("swap_fold_distill", "harden_learned_fold") else None
    if method in ("swap_ft", "swap_ft_distill", "swap_fold_distill"):
        model = relu_copy(gelu, include_gelu=True, example=split.x_test[:2],
                          fold=fold)
        teacher = Teacher(gelu) if method != "swap_ft" else None
        fit(model, split, config.train_config(), teacher=teacher,
            distill_weight=config.distill_weight if teacher else 0.0, desc=method, progress=False)
        final, evaluation = score(pair, model, split)
        return {"final": final, "final_loss": evaluation.loss}
    smooth = copy.deepcopy(gelu if method == "harden_fixed" else lam)
    if method == "harden_fixed":
        convert(smooth)  # λ = 1: the GELU model itself
    with_fold = method == "harden_learned_fold"
    harden(smooth, split, dataclasses.replace(config, fold=with_fold), progress=False)
    relu = relu_copy(smooth, example=split.x_test[:2], fold=fold)
    swap = disruption(smooth, relu, test)
    before = metric.score_parts(swap.accuracy_before, swap.loss_before)
    after = metric.score_parts(swap.accuracy_after, swap.loss_after)
    return {"before_swap": before, "after_swap": after, "final": after, "final_loss": swap.loss_after,
            "max_layer_discrepancy": max(swap.layer_discrepancy.values(), default=0.0), "kl": swap.kl}


def _scores_and_swaps(pair: PairSpec, split, seed: int, gelu: nn.Module, lam: nn.Module, relu: nn.Module
                      ) -> dict[str, Any]:
    """The test metric of the GELU, λ-GELU and ReLU-from-scratch models, and what each swap at budget 0 gives."""
    test = split.test_batches(256)
    (gelu_score, gelu_eval), (lam_score, _), (relu_score, relu_eval) = (score(pair, m, split)
                                                                         for m in (gelu, lam, relu))
    example = split.x_test[:2]
    calibration = calibration_batches(split, harden_config(pair, seed, 1))
    swaps = {
        "direct": disruption(gelu, relu_copy(gelu, include_gelu=True, example=example), test),
        "lam_direct": disruption(lam, relu_copy(lam, example=example), test),
        "folded": disruption(gelu, relu_copy(gelu, include_gelu=True, example=example, fold=calibration), test),
        "lam_folded": disruption(lam, relu_copy(lam, example=example, fold=calibration), test),
    }
    return {"gelu": gelu_score, "gelu_loss": gelu_eval.loss, "lambda_gelu": lam_score, "relu": relu_score,
            "relu_loss": relu_eval.loss,
            "swaps": {k: {"accuracy_after": d.accuracy_after, "loss_after": d.loss_after, "kl": d.kl}
                      for k, d in swaps.items()}}


def run_pair_seed(pair: PairSpec, ctx: StudyContext, seed: int) -> list[dict[str, Any]]:
    """All methods of one pair and seed; one row per (method, extra-step budget)."""
    split = ctx.split(pair)
    metric = pair.metric
    steps, extra = ctx.steps(pair), ctx.harden_steps(pair)
    started = time.time()

    gelu, _ = trained(pair, ctx, seed, "gelu")
    lam, _ = trained(pair, ctx, seed, "lambda_gelu")
    relu, _ = trained(pair, ctx, seed, "relu", steps=steps + extra)
    recipe = {"study": "relufy", "pair": pair.name, "seed": seed, "steps": steps, "extra": extra,
              "test_limit": pair.test_limit.get(ctx.profile), "lr": pair.lr, "batch_size": pair.batch_size,
              "harden": harden_config(pair, seed, 1).to_dict(), "model_kwargs": pair.model_kwargs(split, ctx.tiny)}
    # the three trained models' scores and the four swaps at budget 0: one unit, so a report from a full cache
    # evaluates nothing
    scores = cached(ctx, f"relufy-{pair.name}-seed{seed}-scores", dict(recipe, method="scores"),
                    lambda: _scores_and_swaps(pair, split, seed, gelu, lam, relu))
    gelu_score, lam_score, relu_score = scores["gelu"], scores["lambda_gelu"], scores["relu"]
    at_zero = scores["swaps"]  # budget 0 of each budgeted method: the swap of the model it starts from
    zero_of = {"swap_ft": "direct", "swap_ft_distill": "direct", "swap_fold_distill": "folded",
               "harden_fixed": "direct", "harden_learned": "lam_direct", "harden_learned_fold": "lam_folded"}
    direct = at_zero["direct"]
    direct_after = metric.score_parts(direct["accuracy_after"], direct["loss_after"])

    base = {"pair": pair.name, "seed": seed, "gelu": gelu_score, "lambda_gelu": lam_score}
    rows: list[dict[str, Any]] = [
        dict(base, method="gelu", extra_steps=0, start=gelu_score, before_swap=None, after_swap=None,
             final=gelu_score, final_loss=scores["gelu_loss"]),
        dict(base, method="relu_scratch", extra_steps=extra, start=None, before_swap=None, after_swap=None,
             final=relu_score, final_loss=scores["relu_loss"]),
        dict(base, method="direct_swap", extra_steps=0, start=gelu_score, before_swap=gelu_score,
             after_swap=direct_after, final=direct_after, final_loss=direct["loss_after"], kl=direct["kl"]),
    ]
    for method in BUDGETED:
        start = lam_score if method in OURS else gelu_score
        swap = at_zero[zero_of[method]]
        after = metric.score_parts(swap["accuracy_after"], swap["loss_after"])
        rows.append(dict(base, method=method, extra_steps=0, start=start, before_swap=start, after_swap=after,
                         final=after, final_loss=swap["loss_after"]))
    for fraction in GRIDS[ctx.profile]:
        budget = max(1, round(fraction * extra))
        for method in BUDGETED:
            # each run is one unit of the cache, so that a stopped study resumes at the run it was in
            result = cached(ctx, f"relufy-{pair.name}-seed{seed}-{method}-{budget}",
                            dict(recipe, method=method, budget=budget),
                            lambda method=method, budget=budget: _extra_run(method, pair, split, seed, budget,
                                                                            gelu, lam))
            start = lam_score if method in OURS else gelu_score
            if method in ("swap_ft", "swap_ft_distill", "swap_fold_distill"):
                swap = at_zero[zero_of[method]]
                result.update(before_swap=gelu_score, after_swap=metric.score_parts(swap["accuracy_after"],
                                                                                    swap["loss_after"]))
            rows.append(dict(base, method=method, extra_steps=budget, start=start, **result))
    for row in rows:
        row["vs_gelu"] = metric.damage(gelu_score, row["final"])
        row["drop_at_swap"] = (None if row.get("after_swap") is None
                               else metric.damage(row["before_swap"], row["after_swap"]))
        row["cost_vs_start"] = None if row.get("start") is None else metric.damage(row["start"], row["final"])
    at_e = {r["method"]: r["final"] for r in rows if r["extra_steps"] == extra}
    ctx.say(f"relufy {pair.name} seed {seed}: GELU {gelu_score:.3f}, λ-GELU {lam_score:.3f}, "
            f"ReLU scratch {relu_score:.3f}, lambda-gelu ReLU {at_e.get('harden_learned', float('nan')):.3f}, "
            f"+ fold {at_e.get('harden_learned_fold', float('nan')):.3f}, "
            f"swap + fold + distill {at_e.get('swap_fold_distill', float('nan')):.3f} "
            f"({time.time() - started:.0f} s)")
    return rows


def _steps_to_near(rows: list[dict[str, Any]], near: float) -> int | None:
    """Smallest extra-step budget whose ReLU model is within ``near`` of its start (None: not within the grid)."""
    for row in sorted(rows, key=lambda r: r["extra_steps"]):
        if row["cost_vs_start"] is not None and row["cost_vs_start"] <= near:
            return int(row["extra_steps"])
    return None


def summarize(rows: list[dict[str, Any]], pairs: list[PairSpec], ctx: StudyContext) -> dict[str, Any]:
    """Per pair and method at the full budget: mean ± std over seeds, steps to recover, and the targets."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by[(row["pair"], row["method"])].append(row)
    summary: dict[str, Any] = {}
    for pair in pairs:
        metric, extra = pair.metric, ctx.harden_steps(pair)
        methods: dict[str, Any] = {}
        for key, label in METHODS:
            all_rows = by[(pair.name, key)]
            full = [r for r in all_rows if key not in BUDGETED or r["extra_steps"] == extra]
            per_seed_steps = {}
            if key in SWAPPING:
                for seed in ctx.seeds:
                    mine = [r for r in all_rows if r["seed"] == seed]
                    per_seed_steps[seed] = _steps_to_near(mine, metric.near)
            methods[key] = {
                "label": label,
                "extra_steps": extra if key in BUDGETED or key == "relu_scratch" else 0,
                "final": [r["final"] for r in full],
                "final_loss": [r["final_loss"] for r in full],
                "vs_gelu": [r["vs_gelu"] for r in full],
                "drop_at_swap": [r["drop_at_swap"] for r in full if r["drop_at_swap"] is not None],
                "steps_to_near": per_seed_steps,
            }
        summary[pair.name] = {"title": pair.title, "metric": metric.name, "methods": methods,
                              "targets": _targets(methods, metric)}
    return summary


def _best(methods: dict[str, Any], keys: tuple[str, ...], metric) -> str:
    """The key among ``keys`` with the best mean final metric."""
    best = keys[0]
    for key in keys[1:]:
        if metric.better(mean_std(methods[key]["final"])[0], mean_std(methods[best]["final"])[0]):
            best = key
    return best


def _targets(methods: dict[str, Any], metric) -> dict[str, Any]:
    ours_key = _best(methods, OURS, metric)
    ours = methods[ours_key]
    gap = mean_std(ours["vs_gelu"])[0]
    drops = {k: max(0.0, mean_std(methods[k]["drop_at_swap"])[0]) for k in SWAPPING}  # a gain counts as no drop
    ours_final, ft_final = mean_std(ours["final"])[0], mean_std(methods["swap_ft"]["final"])[0]
    baselines = (*(k for k in BUDGETED if k not in OURS), "direct_swap")
    best_baseline = _best(methods, baselines, metric)
    ours_mean = mean_std(ours["final"])[0]
    base_mean = mean_std(methods[best_baseline]["final"])[0]
    return {
        "best_recipe": ours_key,
        "best_baseline": best_baseline,
        "beats_every_baseline": metric.better(ours_mean, base_mean),
        "outside_spread": (None if min(len(ours["final"]), len(methods[best_baseline]["final"])) < 2 else
                           metric.better(ours_mean, base_mean)
                           and not _within_spread(ours["final"], methods[best_baseline]["final"])),
        "winner": _best(methods, (*baselines, *OURS), metric),
        "within_target_of_gelu": gap <= metric.target,
        "gap_to_gelu": gap,
        # smallest to the precision reported (0.01 points or % rel.): 0.004 against 0.000 is no loss
        "smallest_swap_drop": all(drops[ours_key] <= d + SAME_DROP for d in drops.values()),
        "swap_drops": drops,
        "beats_swap_ft": metric.better(ours_final, ft_final),
        "final_lambda_gelu": ours_final,
        "final_swap_ft": ft_final,
    }


def _steps_text(per_seed: dict[int, int | None], extra: int) -> str:
    if not per_seed:
        return "–"
    return " / ".join(f">{extra}" if v is None else str(v) for v in per_seed.values())


def overview(summary: dict[str, Any], pairs: list[PairSpec]) -> str:
    """Two tables over every pair: each method's final metric, and each swapping method's drop at the swap."""
    finals, drops = [], []
    for pair in pairs:
        methods = summary[pair.name]["methods"]
        digits = 2 if pair.metric.name == "accuracy" else 3
        unit = "acc. %" if pair.metric.name == "accuracy" else "bpc"
        finals.append([f"{pair.title} ({unit})", *[fmt_pm(methods[k]["final"], digits) for k, _ in METHODS]])
        drops.append([f"{pair.title} ({pair.metric.damage_unit})",
                      *[fmt_pm(methods[k]["drop_at_swap"], 2, signed=True) for k in SWAPPING]])
    labels = dict(METHODS)
    return (
        "## All pairs\n\nFinal metric at equal extra-step budgets (mean ± std over seeds; accuracy: higher is "
        "better, bpc: lower is better):\n\n"
        + markdown_table(["pair", *[label for _, label in METHODS]], finals) + "\n\n"
        + "Drop at the swap (positive = the swap cost quality):\n\n"
        + markdown_table(["pair", *[labels[k] for k in SWAPPING]], drops) + "\n"
    )


def budget_table(rows: list[dict[str, Any]], pairs: list[PairSpec], ctx: StudyContext) -> str:
    """The winner (best mean final metric over seeds) among the budgeted methods at each budget, per pair."""
    labels = dict(METHODS)
    table = []
    for pair in pairs:
        by: dict[tuple[int, str], list[float]] = defaultdict(list)
        for row in rows:
            if row["pair"] == pair.name and row["method"] in BUDGETED:
                by[(row["extra_steps"], row["method"])].append(row["final"])
        cells = []
        digits = 2 if pair.metric.name == "accuracy" else 3
        for budget in sorted({b for b, _ in by}):
            finals = {m: {"final": v} for (b, m), v in by.items() if b == budget}
            best = _best(finals, tuple(finals), pair.metric)
            ties = [labels[m] for m in finals
                    if m != best and _within_spread(finals[best]["final"], finals[m]["final"])]
            cell = f"{labels[best]} ({mean_std(finals[best]['final'])[0]:.{digits}f})"
            if len(finals[best]["final"]) > 1:
                cell += "; within the spread: " + ", ".join(ties) if ties else "; clear"
            cells.append(cell)
        table.append([pair.title, *cells])
    header = ["pair", "0", *[f"{fraction:g}·E" for fraction in GRIDS[ctx.profile]]]
    return ("## Which method at which budget\n\nThe best ReLU model (mean final metric over seeds) at each "
            "extra-step budget, and its metric; with several seeds, the methods whose mean is within the two seed "
            "spreads added (std + std) of the best, or \"clear\" where none is. figures/budget_curves.png has every "
            "method's curve.\n\n" + markdown_table(header, table) + "\n")


def _within_spread(a: list[float], b: list[float]) -> bool:
    """Whether two methods' means are no further apart than their seed spreads added (std + std)."""
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    return abs(mean_a - mean_b) <= std_a + std_b


def report(summary: dict[str, Any], pairs: list[PairSpec], ctx: StudyContext, meta: dict[str, Any],
           run_rows: list[dict[str, Any]]) -> str:
    """The Markdown report: the main table per pair, the targets, the figures, how it was made."""
    parts = ["# ReLU-ization table\n",
             "Final metric of each method at the same extra-step budget E (mean ± std over seeds "
             f"{list(ctx.seeds)}), its difference to the GELU baseline, the drop at the swap, and the "
             "extra steps it needed, per seed, before its ReLU model was within 0.1 points (LM: 0.4% relative "
             "bpc) of the smooth model it started from. Accuracy differences are in points (positive = worse); "
             "for the language model every difference is the relative change of bits per character in % "
             "(positive = worse).\n", overview(summary, pairs)]
    target_rows = []
    for pair in pairs:
        s = summary[pair.name]
        metric, extra = pair.metric, ctx.harden_steps(pair)
        digits = 2 if metric.name == "accuracy" else 3
        rows = []
        for key, _ in METHODS:
            m = s["methods"][key]
            rows.append([m["label"], m["extra_steps"], fmt_pm(m["final"], digits),
                         fmt_pm(m["vs_gelu"], 2, signed=True), fmt_pm(m["drop_at_swap"], 2, signed=True)
                         if m["drop_at_swap"] else "–",
                         _steps_text(m["steps_to_near"], round(max(GRIDS[ctx.profile]) * extra))])
        unit = "acc. %" if metric.name == "accuracy" else "bpc"
        worse = "points" if metric.name == "accuracy" else "% rel."
        parts.append(f"## {pair.title}\n\nS = {ctx.steps(pair)} training steps, E = {extra} extra steps.\n")
        parts.append(markdown_table(["method", "extra steps", f"final {unit}", f"worse than GELU ({worse})",
                                     f"drop at swap ({worse})", f"steps to within {metric.near:g} (per seed)"], rows,
                                    "lrrrrr") + "\n")
        parts.append(f"![{pair.name}](figures/{pair.name}.png)\n")
        t = s["targets"]
        met = "met" if t["within_target_of_gelu"] else "**missed**"
        labels = dict(METHODS)
        beats = "yes" if t["beats_every_baseline"] else "**no**"
        target_rows.append([pair.title, labels[t["best_recipe"]], f"{t['gap_to_gelu']:+.2f} ({met})",
                            "yes" if t["smallest_swap_drop"] else "**no**",
                            f"{beats} (best baseline: {labels[t['best_baseline']]})",
                            {True: "yes", False: "no", None: "n/a (one seed)"}[t["outside_spread"]],
                            labels[t["winner"]]])
    wins = sum(summary[p.name]["targets"]["beats_every_baseline"] for p in pairs)
    clear = sum(bool(summary[p.name]["targets"]["outside_spread"]) for p in pairs)
    parts.append("## Targets\n\nAt the budget E, lambda-gelu's better recipe (with or without fold): within 0.5 "
                 "points (LM: 2% relative bpc) of the GELU baseline; the smallest drop at the swap of the swapping "
                 f"methods (within {SAME_DROP}); better than every baseline, swap + fold + distillation included "
                 "(mean final metric), and by more than the two seed spreads added.\n")
    parts.append(markdown_table(["pair", "recipe", "worse than GELU", "smallest swap drop", "beats every baseline",
                                 "outside the spread", "winner"], target_rows, "llrrrrl") + "\n")
    parts.append(f"lambda-gelu beats every baseline on {wins} of {len(pairs)} pairs, outside the seed spread on "
                 f"{clear}.\n")
    parts.append(budget_table(run_rows, pairs, ctx))
    parts.append("![budget curves](figures/budget_curves.png)\n")
    parts.append(footer(meta))
    return "\n".join(parts)


DEFAULT_SEEDS = {"tiny": (0,), "quick": (0,), "full": (0, 1, 2)}
"""Seeds per profile when none are given."""


def run_relufy(out: str | Path, ctx: StudyContext, pairs: list[str] | None = None, force: bool = False
               ) -> dict[str, Any]:
    """Run the ReLU-ization study and write its results folder; returns the summary."""
    from lambda_gelu.studies.figures import plot_budget_curves, plot_relufy_pair

    specs = parse_pairs(pairs, list(PAIRS))
    ctx = ctx.with_default_seeds(DEFAULT_SEEDS)
    started = time.time()
    with staged_dir(out, force=force) as stage:
        (stage / "figures").mkdir()
        rows: list[dict[str, Any]] = []
        for pair in specs:
            for seed in ctx.seeds:
                rows.extend(run_pair_seed(pair, ctx, seed))
        summary = summarize(rows, specs, ctx)
        for pair in specs:
            plot_relufy_pair(summary[pair.name], pair, stage / "figures" / f"{pair.name}.png")
        labels = dict(METHODS)
        plot_budget_curves(rows, specs, {k: labels[k] for k in BUDGETED}, stage / "figures" / "budget_curves.png")
        meta = run_metadata("relufy", ctx, specs, started, {"grid": GRIDS[ctx.profile]})
        write_csv(stage / "runs.csv", rows)
        write_json(stage / "summary.json", {"meta": meta, "summary": summary})
        (stage / "README.md").write_text(report(summary, specs, ctx, meta, rows))
    ctx.say(f"relufy study done in {(time.time() - started) / 60:.1f} min -> {out}")
    return summary

"""The studies: a tiny run of each (far below --quick), their statistics, the cache and the command line."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from lambda_gelu import LambdaGELU
from lambda_gelu.cli import main
from lambda_gelu.studies import PAIRS, StudyContext, run_study
from lambda_gelu.studies.common import ACCURACY, BPC, fmt_pm, trained
from lambda_gelu.studies.dynamics import VARIANTS, LambdaProbe, NaiveLambdaGELU, attenuation, sign_change_share
from lambda_gelu.studies.profiles import robustness, spearman
from lambda_gelu.studies.relufy import BUDGETED, GRIDS, METHODS


def _ctx(**kwargs) -> StudyContext:
    return StudyContext(profile="tiny", progress=False, **kwargs)


@pytest.fixture(scope="module")
def relufy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    out = root / "relufy"
    code = main(["study", "relufy", "--tiny", "--pairs", "mlp_digits", "--seeds", "3", "--out", str(out),
                 "--cache", str(root / "cache"), "--no-progress"])
    assert code == 0
    return out


def test_relufy_resumes_run_by_run_from_its_cache(relufy_run):
    cache = relufy_run.parent / "cache"
    runs = sorted(p for p in cache.glob("relufy-*.json") if "-scores-" not in p.name)
    # one cache unit per (method, budget) run: a stopped study loses at most the run it was in; and one for the
    # scores and swaps at budget 0, so a report from a full cache evaluates nothing
    assert len(runs) == len(BUDGETED) * len(GRIDS["tiny"])
    assert len(list(cache.glob("relufy-mlp_digits-seed3-scores-*.json"))) == 1
    runs[0].unlink()  # as if the study had stopped inside its last run
    again = relufy_run.parent / "again"
    assert main(["study", "relufy", "--tiny", "--pairs", "mlp_digits", "--seeds", "3", "--out", str(again),
                 "--cache", str(cache), "--no-progress"]) == 0
    assert (again / "runs.csv").read_text() == (relufy_run / "runs.csv").read_text()
    counts = json.loads((again / "summary.json").read_text())["meta"]["cache"]
    # the other runs, the scores, and the three trained models
    assert counts["computed"] == 1 and counts["loaded"] == len(runs) - 1 + 1 + 3


def test_relufy_writes_its_results_folder(relufy_run):
    assert {p.name for p in relufy_run.iterdir()} == {"README.md", "runs.csv", "summary.json", "figures"}
    assert {p.name for p in (relufy_run / "figures").iterdir()} == {"mlp_digits.png", "budget_curves.png"}
    report = (relufy_run / "README.md").read_text()
    for _, label in METHODS:
        assert label in report
    assert "lambda-gelu study relufy --tiny" in report  # the exact command
    meta = json.loads((relufy_run / "summary.json").read_text())["meta"]
    assert meta["seeds"] == [3] and meta["versions"]["torch"] == torch.__version__


def test_relufy_rows_are_consistent(relufy_run):
    with open(relufy_run / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    num = lambda v: float(v) if v not in ("", None) else None
    extra = PAIRS["mlp_digits"].harden_steps["tiny"]
    for seed in {r["seed"] for r in rows}:
        mine = {(r["method"], int(r["extra_steps"])): r for r in rows if r["seed"] == seed}
        gelu = num(mine[("gelu", 0)]["final"])
        assert num(mine[("gelu", 0)]["vs_gelu"]) == 0.0
        direct = mine[("direct_swap", 0)]
        # budget 0 of swap + fine-tuning is the direct swap itself
        assert num(mine[("swap_ft", 0)]["final"]) == num(direct["final"])
        assert num(direct["drop_at_swap"]) == pytest.approx(gelu - num(direct["final"]))
        for method in ("harden_fixed", "harden_learned"):
            row = mine[(method, extra)]
            assert num(row["drop_at_swap"]) == pytest.approx(num(row["before_swap"]) - num(row["after_swap"]))
            # hardening reached its target: each layer's D(λ) at the swap is about τ = 1e-5
            assert num(row["max_layer_discrepancy"]) < 1e-3
        assert num(mine[("harden_fixed", extra)]["kl"]) < num(direct["kl"])


def test_profiles_tiny(tmp_path):
    ctx = _ctx(seeds=(0, 1))
    summary = run_study("profiles", tmp_path / "profiles", ctx, ["mlp_digits"])
    with open(tmp_path / "profiles" / "profiles.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 2  # seeds × λ0 {1, 4} × layers
    for row in rows:
        lam = float(row["lam"])
        assert lam >= 1.0
        assert float(row["effective"]) == pytest.approx(lam * float(row["sigma"]), rel=1e-6)
        if float(row["lam0"]) == 4.0:
            assert lam > 2.0  # 40 steps move λ by a factor of e^(±0.8) at most
    layers = summary["mlp_digits"]["lam"]["layers"]
    assert set(layers) == {"blocks.0.act", "blocks.1.act"}
    assert (tmp_path / "profiles" / "figures" / "mlp_digits.png").is_file()


def test_dynamics_tiny(tmp_path):
    summary = run_study("dynamics", tmp_path / "dynamics", _ctx(seeds=(0,)), ["mlp_digits"])["mlp_digits"]
    assert set(summary) == {v.key for v in VARIANTS}
    for key in ("constrained_sgd", "constrained_adamw", "scheme_sgd", "scheme_adamw"):
        assert summary[key]["min_lambda"] >= 1.0 and summary[key]["share_below_1"] == [0.0]
    assert (tmp_path / "dynamics" / "figures" / "mlp_digits_trajectories.png").is_file()
    with open(tmp_path / "dynamics" / "trajectories.csv") as handle:
        assert {r["variant"] for r in csv.DictReader(handle)} == {v.key for v in VARIANTS}


def test_probe_gives_the_same_lambda_gradient_for_both_parameterizations():
    """∂L/∂λ of a LambdaGELU (from ∂L/∂ρ) equals that of a naive λ parameter at the same λ."""
    x = torch.randn(256, dtype=torch.float32)
    target = torch.relu(x)
    grads = []
    for gate in (NaiveLambdaGELU(2.5), LambdaGELU(2.5)):
        model = torch.nn.Sequential(gate)
        probe = LambdaProbe(model)
        ((model(x) - target) ** 2).mean().backward()
        probe.record(1)
        grads.append(probe.grad["0"][0])
        probe.close()
    assert grads[0] == pytest.approx(grads[1], rel=1e-4)
    assert grads[0] < 0  # the loss asks for a harder gate


def test_dynamics_statistics():
    assert sign_change_share([1, 2, 3, 4]) == 0.0
    assert sign_change_share([1, 2, 1, 2, 1]) == 1.0
    assert sign_change_share([1, 1, 2, 2, 3]) == 0.0  # steps without change are ignored
    assert attenuation([1.0] * 10 + [0.01] * 10) == pytest.approx(0.01)


def test_spearman():
    assert spearman([1.0, 2.0, 3.0], [2.0, 4.0, 9.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1.0001, 1.0001, 1.0001], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([1.00010001, 1.0001, 1.00010002], [1.0, 2.0, 3.0]))  # float noise ties
    with pytest.raises(ValueError):
        spearman([1.0], [1.0, 2.0])


def test_agreement_across_initial_values():
    """mean |Δ log λ| per pair of λ0, over seeds and layers, against a hand computation."""
    profiles = {(0, 1.0): [1.0, 2.0], (0, 2.0): [2.0, 2.0], (1, 1.0): [1.0, 4.0], (1, 2.0): [1.0, 1.0]}
    rows = [{"seed": seed, "lam0": lam0, "index": i, "layer": f"l{i}", "lam": lam, "effective": lam, "metric": 0.5}
            for (seed, lam0), lams in profiles.items() for i, lam in enumerate(lams)]
    got = robustness(rows, (0, 1), (1.0, 2.0))["init_pairs"]
    assert list(got) == ["1-2"]
    want = (math.log(2.0) + 0.0 + 0.0 + math.log(4.0)) / 4
    assert got["1-2"]["mean_abs_dlog_lam"] == pytest.approx(want, rel=1e-12)
    assert math.isnan(got["1-2"]["spearman"])  # (2, 2) and (1, 1) are flat: undefined for both seeds


def test_metrics_measure_damage_in_their_units():
    assert ACCURACY.damage(97.0, 96.5) == pytest.approx(0.5)
    assert BPC.damage(2.0, 2.04) == pytest.approx(2.0)  # 2% relative
    assert BPC.better(1.9, 2.0) and not ACCURACY.better(90.0, 91.0)
    assert fmt_pm([1.0, 3.0]) == "2.00 ± 1.41" and fmt_pm([1.0]) == "1.00"


def test_cache_reuses_a_trained_model(tmp_path):
    ctx = _ctx(cache_dir=str(tmp_path / "cache"))
    pair = PAIRS["mlp_digits"]
    first, trajectory = trained(pair, ctx, 0, "lambda_gelu", lam0=2.0)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1
    second, again = trained(pair, ctx, 0, "lambda_gelu", lam0=2.0)
    assert again == trajectory and len(trajectory) > 0
    x = ctx.split(pair).x_test[:8]
    assert torch.equal(first(x), second(x))
    trained(pair, ctx, 0, "lambda_gelu", lam0=4.0)  # a different recipe: a new entry
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_cli_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["study", "relufy", "--tiny", "--pairs", "mlp_imagenet", "--out", str(tmp_path / "x")])
    assert info.value.code == 2
    existing = tmp_path / "exists"
    existing.mkdir()
    assert main(["study", "profiles", "--tiny", "--out", str(existing)]) == 2
    assert "--force" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["study", "dynamics", "--tiny", "--device", "cuda", "--out", str(tmp_path / "y")]) == 2
        assert "CUDA" in capsys.readouterr().err
        assert not (tmp_path / "y").exists()


def test_budget_table_names_the_methods_within_the_seed_spread_of_the_winner():
    from lambda_gelu.studies.relufy import budget_table

    def rows(method: str, budget: int, finals: list[float]) -> list[dict]:
        return [{"pair": "mlp_digits", "method": method, "extra_steps": budget, "final": v} for v in finals]

    data = (rows("swap_ft", 0, [90.0, 90.2]) + rows("harden_learned", 0, [95.0, 95.2])  # clear: 95.1 vs 90.1
            + rows("swap_ft", 16, [96.0, 97.0]) + rows("harden_learned", 16, [96.2, 96.4]))  # 96.5 ± 0.7 vs 96.3
    table = budget_table(data, [PAIRS["mlp_digits"]], _ctx())
    row = next(line for line in table.splitlines() if line.startswith("| MLP × digits"))
    at_zero, at_e = [cell.strip() for cell in row.strip("|").split("|")][1:]
    assert at_zero == "lambda-gelu (learned λ, hardened) (95.10); clear"
    assert at_e == "swap + fine-tuning (96.50); within the spread: lambda-gelu (learned λ, hardened)"

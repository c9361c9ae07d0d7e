"""hardness profiles, HardnessRecorder, evaluate and disruption."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lambda_gelu import HardnessRecorder, LambdaGELU, calibrate, discrepancy, disruption, evaluate, hardness, relufy
from lambda_gelu.profile import profile_table


def _model():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(5, 6), LambdaGELU(init=3.0), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 4),
        LambdaGELU(init=[1.0, 2.0, 4.0, 8.0], num_channels=4), nn.Linear(4, 3),
    )


def _batches(n=3, size=10):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(size, 5, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


# ---------------------------------------------------------------- hardness


def test_hardness_order_and_values():
    model = _model()
    rows = hardness(model)
    assert [r.name for r in rows] == ["1", "3", "5"]
    one, gelu, per = rows
    assert one.lam == pytest.approx(3.0, rel=1e-6) and one.lam_min == one.lam_max == one.lam
    assert one.lam_std == 0.0 and one.num_channels is None
    assert (gelu.lam, gelu.lam_min, gelu.lam_max, gelu.lam_std) == (1.0, 1.0, 1.0, 0.0)
    lams = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    assert per.num_channels == 4
    assert per.lam == pytest.approx(lams.mean().item(), rel=1e-6)
    assert per.lam_min == pytest.approx(1.0, rel=1e-6) and per.lam_max == pytest.approx(8.0, rel=1e-6)
    assert per.lam_std == pytest.approx(lams.std().item(), rel=1e-5)
    assert all(r.sigma is None and r.effective is None for r in rows)
    assert set(one.to_dict()) == {"name", "lam", "lam_min", "lam_max", "lam_std", "num_channels", "sigma", "effective"}


def test_hardness_with_samples():
    model = _model()
    samples = calibrate(model, _batches())
    rows = {r.name: r for r in hardness(model, samples)}
    v1 = samples["1"].double()
    assert rows["1"].sigma == pytest.approx(v1.std().item(), rel=1e-9)
    assert rows["1"].effective == pytest.approx(model[1].lam.item() * v1.std().item(), rel=1e-6)
    v3 = samples["3"].double()
    assert rows["3"].effective == pytest.approx(v3.std().item(), rel=1e-9)  # GELU: λ = 1
    v5 = samples["5"].double()
    assert v5.shape[1] == 4
    sigma_c = v5.std(0)
    assert rows["5"].sigma == pytest.approx(sigma_c.mean().item(), rel=1e-9)
    assert rows["5"].effective == pytest.approx((model[5].lam.double() * sigma_c).mean().item(), rel=1e-6)
    # a layer missing from samples has no σ
    rows = {r.name: r for r in hardness(model, {"1": samples["1"]})}
    assert rows["1"].sigma is not None and rows["5"].sigma is None and rows["5"].effective is None


def test_profile_table():
    model = _model()
    table = profile_table(hardness(model, calibrate(model, _batches())))
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| 1 | 3 |")
    assert "–" in profile_table(hardness(model))  # no σ without samples


# ---------------------------------------------------------------- HardnessRecorder


def test_recorder_every_n_and_files(tmp_path):
    model = _model()
    recorder = HardnessRecorder(model, every=3)
    for step in range(11):
        model[1].set_lambda_(1.0 + step)
        recorder.record(step)
    recorder.record(10, force=True)
    steps = [r["step"] for r in recorder.rows]
    assert steps == [0] * 3 + [3] * 3 + [6] * 3 + [9] * 3 + [10] * 3
    by_layer = recorder.trajectories()
    assert list(by_layer) == ["1", "3", "5"]
    assert by_layer["1"][0] == [0, 3, 6, 9, 10]
    assert by_layer["1"][1] == pytest.approx([1.0, 4.0, 7.0, 10.0, 11.0], rel=1e-5)
    assert by_layer["3"][1] == [1.0] * 5
    row5 = next(r for r in recorder.rows if r["layer"] == "5")
    assert row5["lam_min"] == pytest.approx(1.0, rel=1e-6) and row5["lam_max"] == pytest.approx(8.0, rel=1e-6)

    csv_path, json_path = tmp_path / "lam.csv", tmp_path / "lam.json"
    recorder.to_csv(csv_path)
    recorder.to_json(json_path)
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["step", "layer", "lam", "lam_min", "lam_max"]
        read = list(reader)
    assert len(read) == len(recorder.rows)
    for got, want in zip(read, recorder.rows, strict=True):
        assert int(got["step"]) == want["step"] and got["layer"] == want["layer"]
        for key in ("lam", "lam_min", "lam_max"):
            assert float(got[key]) == want[key]
    assert json.loads(json_path.read_text()) == recorder.rows


def test_recorder_rejects_every():
    with pytest.raises(ValueError):
        HardnessRecorder(_model(), every=0)


# ---------------------------------------------------------------- evaluate


class Logits(nn.Module):
    """A 'model' whose inputs are its logits."""

    def forward(self, x):
        return x


def test_evaluate_accuracy_in_percent():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 1, 2, 1, 2])
    result = evaluate(Logits(), [(logits[:2], targets[:2]), (logits[2:], targets[2:])])
    assert result.accuracy == pytest.approx(60.0)
    assert result.count == 5
    assert result.loss == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)


def test_evaluate_restores_mode_and_rejects_empty():
    model = _model().train()
    evaluate(model, _batches())
    assert model.training
    with pytest.raises(ValueError):
        evaluate(model, [])


# ---------------------------------------------------------------- disruption


def test_disruption_identical_models():
    model = _model()
    result = disruption(model, copy.deepcopy(model), _batches())
    assert result.delta_accuracy == 0.0 and result.delta_loss == 0.0
    assert result.kl == pytest.approx(0.0, abs=1e-7)
    assert result.max_abs_logit_change == 0.0
    assert 0.0 <= result.accuracy_before <= 100.0
    assert set(result.layer_discrepancy) == {"1", "3", "5"}
    d = result.to_dict()
    assert d["delta_accuracy"] == 0.0 and d["delta_loss"] == 0.0 and d["layer_discrepancy"] == result.layer_discrepancy


def test_disruption_known_perturbation():
    model = _model()
    batches = _batches()
    after = copy.deepcopy(model)
    with torch.no_grad():
        after[-1].bias += torch.tensor([100.0, 0.0, 0.0])  # every prediction becomes class 0
    result = disruption(model, after, batches)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        before_logits, after_logits = model(x), after(x)
    acc_before = 100.0 * (before_logits.argmax(-1) == y).float().mean().item()
    acc_after = 100.0 * (y == 0).float().mean().item()
    assert result.accuracy_before == pytest.approx(acc_before)
    assert result.accuracy_after == pytest.approx(acc_after)
    assert result.delta_accuracy == pytest.approx(acc_after - acc_before)
    assert result.loss_after == pytest.approx(F.cross_entropy(after_logits, y).item(), rel=1e-5)
    assert result.delta_loss == pytest.approx(
        F.cross_entropy(after_logits, y).item() - F.cross_entropy(before_logits, y).item(), rel=1e-5
    )
    log_p, log_q = F.log_softmax(before_logits, -1), F.log_softmax(after_logits, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert result.kl == pytest.approx(kl, rel=1e-4)
    assert result.max_abs_logit_change == pytest.approx(100.0, rel=1e-4)


def test_disruption_relufy_and_layer_discrepancy():
    model = _model()
    batches = _batches()
    after = copy.deepcopy(model)
    relufy(after, include_gelu=True)
    result = disruption(model, after, batches)
    assert result.accuracy_before == pytest.approx(evaluate(model, batches).accuracy)
    assert result.accuracy_after == pytest.approx(evaluate(after, batches).accuracy)
    samples = calibrate(model, batches)
    assert result.layer_discrepancy["1"] == pytest.approx(discrepancy(samples["1"], model[1].lam.double()).item())
    assert result.layer_discrepancy["3"] == pytest.approx(discrepancy(samples["3"], 1.0).item())
    per_channel = discrepancy(samples["5"], model[5].lam.double()).mean().item()
    assert result.layer_discrepancy["5"] == pytest.approx(per_channel)
    assert result.max_abs_logit_change > 0

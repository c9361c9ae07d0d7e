"""calibrate (pre-activation reservoirs), discrepancy D(λ), target_lambda λ*, layer_targets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from lambda_gelu import LambdaGELU, calibrate, discrepancy, layer_targets, target_lambda
from lambda_gelu.models import MLP
from lambda_gelu.ops import lambda_gelu


def _model():
    model = MLP(5, 3, hidden=(6, 4), activation="lambda_gelu")
    model.blocks[1].act.set_lambda_(3.0)
    return model


def _batches(n=3, size=8, with_targets=True):
    out = []
    for _ in range(n):
        x = torch.randn(size, 5)
        out.append((x, torch.randint(0, 3, (size,))) if with_targets else x)
    return out


def _manual_inputs(model, batches, rows_of=lambda m, x: x.reshape(-1)):
    """Every activation layer's inputs, recorded by plain forward hooks."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (LambdaGELU, nn.GELU)):
            def hook(mod, inputs, output, name=name):
                seen.setdefault(name, []).append(rows_of(mod, inputs[0].detach()))
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            model(batch[0] if isinstance(batch, tuple) else batch)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(chunks) for name, chunks in seen.items()}


# ---------------------------------------------------------------- calibrate


@pytest.mark.parametrize("with_targets", [True, False])
def test_calibrate_collects_layer_inputs(with_targets):
    model = _model()
    batches = _batches(with_targets=with_targets)
    samples = calibrate(model, batches)
    want = _manual_inputs(model, batches)
    assert list(samples) == ["blocks.0.act", "blocks.1.act"]
    for name in want:
        assert samples[name].dtype == torch.float32 and samples[name].device.type == "cpu"
        torch.testing.assert_close(samples[name], want[name], atol=0, rtol=0)


def test_calibrate_includes_gelu_layers_and_restores_mode():
    model = MLP(5, 3, hidden=(6, 4), activation="gelu")
    model.train()
    samples = calibrate(model, _batches())
    assert list(samples) == ["blocks.0.act", "blocks.1.act"]
    assert model.training
    assert all(m.training for m in model.modules())
    model.eval()
    calibrate(model, _batches())
    assert not model.training


def test_calibrate_runs_in_eval_mode():
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.9), nn.GELU())
    batches = _batches()
    model.train()
    samples = calibrate(model, batches)
    model.eval()
    torch.testing.assert_close(samples["2"], _manual_inputs(model, batches)["2"], atol=0, rtol=0)


def test_calibrate_max_batches():
    model = _model()
    batches = _batches(n=5)
    samples = calibrate(model, batches, max_batches=2)
    assert samples["blocks.0.act"].shape == (2 * 8 * 6,)
    torch.testing.assert_close(samples["blocks.0.act"], _manual_inputs(model, batches[:2])["blocks.0.act"])


def test_calibrate_per_channel_rows():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), LambdaGELU(num_channels=3, channel_dim=1), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 5), LambdaGELU(num_channels=5))
    batches = [torch.randn(2, 2, 6, 6) for _ in range(3)]
    samples = calibrate(model, batches)
    assert samples["1"].shape == (3 * 2 * 16, 3)
    assert samples["4"].shape == (3 * 2, 5)
    want = _manual_inputs(model, batches, rows_of=lambda m, x: x.movedim(m.channel_dim, -1).reshape(-1, m.num_channels))
    torch.testing.assert_close(samples["1"], want["1"], atol=0, rtol=0)
    torch.testing.assert_close(samples["4"], want["4"], atol=0, rtol=0)
    # channel c of the rows is channel c of the conv output
    with torch.no_grad():
        conv_out = model[0](batches[0])
    torch.testing.assert_close(samples["1"][:32, 1], conv_out[:, 1].reshape(-1))


def _row_set(t: torch.Tensor) -> set:
    return {tuple(r) for r in t.reshape(t.shape[0], -1).tolist()}


def test_reservoir_cap_and_determinism():
    model = _model()
    batches = _batches(n=4)
    full = _manual_inputs(model, batches)
    a = calibrate(model, batches, max_values=50, seed=7)
    b = calibrate(model, batches, max_values=50, seed=7)
    c = calibrate(model, batches, max_values=50, seed=8)
    for name in full:
        assert a[name].shape == (50,)
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)
        assert _row_set(a[name]) <= _row_set(full[name])  # a subset of the real inputs
        assert len(_row_set(a[name])) == 50  # without repeats
        assert not torch.equal(a[name], c[name])
    # per-channel: whole rows are kept, at most max_values // C of them
    pc = nn.Sequential(nn.Linear(5, 6), LambdaGELU(num_channels=6))
    full = _manual_inputs(pc, batches, rows_of=lambda m, x: x.reshape(-1, 6))
    kept = calibrate(pc, batches, max_values=20, seed=1)["1"]
    assert kept.shape == (3, 6)
    assert _row_set(kept) <= _row_set(full["1"])


def test_reservoir_is_uniform_over_batches():
    # inputs 0..99 in 10 batches; keep 10: every value should be kept about equally often
    model = nn.Sequential(nn.GELU())
    batches = [torch.arange(10 * i, 10 * i + 10, dtype=torch.float32) for i in range(10)]
    counts = torch.zeros(100)
    for seed in range(150):
        kept = calibrate(model, batches, max_values=10, seed=seed)["0"]
        counts[kept.long()] += 1
    assert counts.sum() == 1500
    first, last = counts[:50].sum().item(), counts[50:].sum().item()
    assert abs(first - last) / 1500 < 0.1
    assert counts.max() < 45  # expectation 15 per value


def test_calibrate_errors():
    with pytest.raises(ValueError, match="no LambdaGELU or GELU"):
        calibrate(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), [torch.randn(1, 2)])
    with pytest.raises(ValueError, match="no data"):
        calibrate(_model(), [])


# ---------------------------------------------------------------- discrepancy


def _direct_d(values: torch.Tensor, lam, approximate="none") -> torch.Tensor:
    v = values.double()
    gap = lambda_gelu(v, torch.as_tensor(lam, dtype=torch.float64), approximate) - v.clamp(min=0)
    return gap.square().mean(0) / v.clamp(min=0).square().mean(0)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("lam", [1.0, 2.5, 10.0, 300.0])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 4.0])
def test_discrepancy_matches_direct_formula(approximate, lam, sigma):
    values = torch.randn(1000) * sigma + 0.1 * sigma
    got = discrepancy(values, lam, approximate)
    assert got.dtype == torch.float64 and got.shape == ()
    want = _direct_d(values, lam, approximate)
    # the direct formula cancels (f − ReLU) in float64; fine for D well above 1e-16
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-18)


def test_discrepancy_per_channel():
    values = torch.randn(500, 3) * torch.tensor([0.2, 1.0, 5.0])
    lam = torch.tensor([1.0, 4.0, 20.0], dtype=torch.float64)
    got = discrepancy(values, lam)
    assert got.shape == (3,)
    torch.testing.assert_close(got, _direct_d(values, lam), rtol=1e-6, atol=1e-18)
    for c in range(3):
        torch.testing.assert_close(got[c], discrepancy(values[:, c], lam[c]), rtol=1e-12, atol=0)


def test_discrepancy_non_positive_inputs_use_second_moment():
    values = -torch.rand(200) - 0.01
    v = values.double()
    want = (lambda_gelu(v, torch.tensor(2.0, dtype=torch.float64)) ** 2).mean() / v.square().mean()
    torch.testing.assert_close(discrepancy(values, 2.0), want, rtol=1e-9, atol=0)


def test_discrepancy_decreases_and_gaussian_law():
    n = 20000  # N(0, 1) quantiles: a deterministic stand-in for a large sample
    q = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    lams = [1.0, 2.0, 5.0, 10.0, 50.0]
    ds = [discrepancy(q, lam).item() for lam in lams]
    assert all(a > b for a, b in itertools.pairwise(ds))
    for lam, d in zip(lams[2:4], ds[2:4], strict=True):  # D ≈ 0.05/(λσ)³ for x ~ N(0, σ²)
        assert d * lam**3 == pytest.approx(0.05, rel=0.1)
    assert discrepancy(3.0 * q, 5.0).item() == pytest.approx(discrepancy(q, 15.0).item(), rel=1e-9)


# ---------------------------------------------------------------- target_lambda


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("sigma", [0.05, 0.4, 2.0])
@pytest.mark.parametrize("tau", [1e-3, 1e-5])
def test_target_lambda_against_brute_force(approximate, sigma, tau):
    values = torch.randn(400) * sigma
    got = target_lambda(values, tau, approximate)
    assert got.dtype == torch.float64 and got.shape == ()
    lam = got.item()
    assert 1.0 <= lam <= 1e6
    # brute force: the smallest λ on a fine log grid with D <= τ brackets the answer
    grid = torch.exp(torch.linspace(0.0, math.log(1e6), 1201, dtype=torch.float64))
    d = discrepancy(values.unsqueeze(1).expand(-1, grid.numel()), grid, approximate)
    k = int(torch.nonzero(d <= tau)[0])
    assert k > 0  # τ is not met at λ = 1 for these inputs
    assert grid[k - 1].item() < lam <= grid[k].item() * (1 + 1e-9)
    # and it is the smallest such λ up to the bisection tolerance
    assert discrepancy(values, lam, approximate).item() <= tau
    assert discrepancy(values, lam / (1 + 4e-6), approximate).item() > tau


@pytest.mark.parametrize(
    ("values", "tau"),
    [(torch.tensor([50.0, 60.0, 70.0]), 1e-5), (torch.randn(300), 0.5), (torch.randn(300) * 100, 1e-5)],
)
def test_target_lambda_is_one_when_gelu_is_close_enough(values, tau):
    assert discrepancy(values, 1.0).item() <= tau
    assert target_lambda(values, tau).item() == 1.0


@pytest.mark.parametrize("lam_max", [3.0, 7.0, 100.0, 1e6])
def test_target_lambda_capped_at_lam_max(lam_max):
    values = torch.randn(100) * 1e-9  # would need λ ~ 1e10
    got = target_lambda(values, lam_max=lam_max).item()
    assert got == pytest.approx(lam_max, rel=1e-12)
    assert got <= lam_max  # "smallest λ in [1, lam_max]"


def test_target_lambda_per_channel_equals_scalar_calls():
    sigmas = torch.tensor([0.02, 0.5, 3.0, 40.0])
    values = torch.randn(300, 5)
    values[:, :4] *= sigmas
    values[:, 4] = values[:, 4].abs() * 10 + 40  # this channel meets τ at λ = 1
    for approximate in ("none", "tanh"):
        got = target_lambda(values, 1e-4, approximate)
        assert got.shape == (5,)
        for c in range(5):
            torch.testing.assert_close(got[c], target_lambda(values[:, c], 1e-4, approximate), rtol=1e-5, atol=0)
        assert got[4].item() == 1.0
        assert all(a > b for a, b in itertools.pairwise(got[:4].tolist()))  # wider inputs, softer λ*


@pytest.mark.parametrize("tau", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_target_lambda_rejects_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        target_lambda(torch.randn(10), tau)


# ---------------------------------------------------------------- layer_targets


def test_layer_targets_keys_and_values():
    model = nn.Sequential(
        nn.Linear(5, 6), LambdaGELU(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 4),
        LambdaGELU(num_channels=4, approximate="tanh"),
    )
    samples = calibrate(model, _batches(n=2))
    assert set(samples) == {"1", "3", "5"}
    targets = layer_targets(model, samples, tau=1e-4)
    assert list(targets) == ["1", "5"]  # GELU layers get no target
    torch.testing.assert_close(targets["1"], target_lambda(samples["1"], 1e-4, "none"), atol=0, rtol=0)
    assert targets["5"].shape == (4,)
    torch.testing.assert_close(targets["5"], target_lambda(samples["5"], 1e-4, "tanh"), atol=0, rtol=0)
    # only the layers present in samples
    assert list(layer_targets(model, {"5": samples["5"]})) == ["5"]

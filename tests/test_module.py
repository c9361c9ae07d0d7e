"""LambdaGELU: the reparameterization, validation, per-channel use, buffers, state dicts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lambda_gelu import LambdaGELU
from lambda_gelu.models import MLP
from lambda_gelu.module import LAMBDA_MAX, RAW_KEY, RAW_MAX, RAW_MIN
from lambda_gelu.ops import lambda_gelu


def test_raw_key_and_bounds():
    assert RAW_KEY == "log_lam"
    assert RAW_MIN == 0.0
    assert RAW_MAX == pytest.approx(math.log(1e6))


@pytest.mark.parametrize("raw", [-1e4, -100.0, -20.0, float("-inf"), -1e-7, RAW_MIN, 1e-7, 5.0, RAW_MAX, 50.0, 1e4])
def test_lambda_at_least_one_and_at_most_max(raw):
    m = LambdaGELU()
    with torch.no_grad():
        m.log_lam.fill_(raw)
    lam = m.lam.item()
    assert 1.0 <= lam <= LAMBDA_MAX * (1 + 1e-6)
    # λ = exp(clamp(ρ, 0, log 1e6))
    assert lam == pytest.approx(math.exp(min(max(raw, 0.0), RAW_MAX)), rel=1e-6)
    y = m(torch.randn(50) * 3)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("raw", [-3.0, 0.0, 2.0, RAW_MAX + 1.0])
def test_gradient_passes_through_the_clamp(raw):
    """dλ/dρ = λ at the bounds' value too, so a gate pushed below 1 still feels the pull back."""
    m = LambdaGELU()
    with torch.no_grad():
        m.log_lam.fill_(raw)
    x = torch.randn(200, dtype=torch.float64)
    m(x).sum().backward()
    lam = m.lam.double()
    dfdlam = (x**2 * torch.exp(-0.5 * (lam * x) ** 2) / math.sqrt(2 * math.pi)).sum()
    assert m.log_lam.grad.item() == pytest.approx(float(dfdlam * lam), rel=1e-5)


def test_lambda_at_least_one_per_channel_after_training_pushes_down():
    m = LambdaGELU(init=[1.0, 2.0, 5.0], num_channels=3)
    with torch.no_grad():
        m.log_lam.copy_(torch.tensor([-1e3, -50.0, -1e30]))
    assert (m.lam >= 1.0).all()


def test_init_one_is_gelu():
    m = LambdaGELU()
    x = torch.linspace(-8, 8, 4001)
    assert m.log_lam.item() == 0.0 and m.lam.item() == 1.0  # λ = 1 exactly
    x64 = x.double()
    torch.testing.assert_close(m(x64), F.gelu(x64), atol=1e-15, rtol=0)
    assert (m(x) - F.gelu(x)).abs().max().item() <= 1e-6
    mt = LambdaGELU(approximate="tanh")
    torch.testing.assert_close(mt(x64), F.gelu(x64, approximate="tanh"), atol=1e-15, rtol=0)


@pytest.mark.parametrize("bad", [0.5, 0.999, 0.0, -2.5, float("nan"), float("inf"), float("-inf")])
def test_init_invalid_raises_naming_value(bad):
    with pytest.raises(ValueError) as info:
        LambdaGELU(init=bad)
    assert f"got {bad:g}" in str(info.value)  # the value as given (%g formatting)


def test_init_invalid_per_channel_names_value():
    with pytest.raises(ValueError, match=r"0\.25"):
        LambdaGELU(init=[1.0, 0.25, 3.0], num_channels=3)
    with pytest.raises(ValueError):
        LambdaGELU(init=[1.0, 2.0], num_channels=3)  # wrong count
    with pytest.raises(ValueError):
        LambdaGELU(num_channels=0)
    with pytest.raises(ValueError):
        LambdaGELU(approximate="erf")  # type: ignore[arg-type]


def test_lam_is_read_only_and_a_copy():
    m = LambdaGELU(init=3.0)
    with pytest.raises(AttributeError):
        m.lam = 5.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        m.lam = torch.tensor(5.0)  # type: ignore[misc]
    lam = m.lam
    lam.fill_(100.0)
    assert m.lam.item() == pytest.approx(3.0, rel=1e-6)
    assert not m.lam.requires_grad


@pytest.mark.parametrize("value", [1.0, 1.00005, 1.5, 3.0, 77.7, 1e3, 1e5, 1e6])
def test_set_lambda_round_trip(value):
    m = LambdaGELU()
    out = m.set_lambda_(value)
    assert out is m
    assert m.lam.item() == pytest.approx(value, rel=2e-6)
    # the raw value round-trips through the state dict
    m2 = LambdaGELU()
    m2.load_state_dict(m.state_dict())
    assert m2.lam.item() == m.lam.item()


def test_set_lambda_per_channel_and_validation():
    m = LambdaGELU(num_channels=4)
    m.set_lambda_([1.0, 2.0, 30.0, 4000.0])
    torch.testing.assert_close(m.lam, torch.tensor([1.0, 2.0, 30.0, 4000.0]), rtol=2e-6, atol=0)
    m.set_lambda_(7.0)  # one value for all channels
    torch.testing.assert_close(m.lam, torch.full((4,), 7.0), rtol=2e-6, atol=0)
    m.set_lambda_(torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(m.lam, torch.tensor([2.0, 3.0, 4.0, 5.0]), rtol=2e-6, atol=0)
    before = m.lam
    for bad in [0.5, float("nan"), float("inf"), 2e6, [2.0, 3.0]]:
        with pytest.raises(ValueError):
            m.set_lambda_(bad)
        torch.testing.assert_close(m.lam, before, atol=0, rtol=0)  # unchanged


def test_gradient_reaches_raw_parameter():
    m = LambdaGELU(init=3.0)
    x = torch.randn(100)
    m(x).sum().backward()
    lam = m.lam.double()
    z = lam * x.double()
    dfdlam = (x.double() ** 2 * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)).sum()
    # ∂L/∂ρ = ∂L/∂λ · λ
    assert m.log_lam.grad.item() == pytest.approx(float(dfdlam * lam), rel=1e-4)


@pytest.mark.parametrize(
    ("shape", "channel_dim"),
    [((2, 4, 5, 3), 1), ((3, 6, 4), -1), ((2, 3, 4), 1), ((5, 4), -1)],
)
def test_per_channel_forward(shape, channel_dim):
    c = shape[channel_dim]
    lams = torch.linspace(1.0, 20.0, c)
    m = LambdaGELU(init=lams, num_channels=c, channel_dim=channel_dim)
    x = torch.randn(shape)
    view = [1] * len(shape)
    view[channel_dim] = c
    want = lambda_gelu(x.double(), m.lam.double().reshape(view))
    torch.testing.assert_close(m(x).double(), want, atol=1e-6, rtol=1e-6)
    # every channel uses its own λ
    for i in range(c):
        torch.testing.assert_close(m(x).select(channel_dim, i), lambda_gelu(x.select(channel_dim, i), m.lam[i]))
    m(x).sum().backward()
    assert m.log_lam.grad.shape == (c,)


def test_learnable_false_is_a_buffer():
    m = LambdaGELU(init=4.0, learnable=False)
    assert not m.learnable
    assert list(m.parameters()) == []
    assert RAW_KEY in dict(m.named_buffers())
    assert list(m.state_dict()) == [RAW_KEY]
    learn = LambdaGELU(init=4.0)
    assert learn.learnable and list(learn.state_dict()) == [RAW_KEY]
    # same key, interchangeable state dicts
    learn.load_state_dict(m.state_dict())
    assert learn.lam.item() == m.lam.item()
    x = torch.randn(20)
    torch.testing.assert_close(m(x), learn(x), atol=0, rtol=0)
    m.set_lambda_(9.0)
    assert m.lam.item() == pytest.approx(9.0, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "contains", "absent"),
    [
        ({}, ["lam=1"], ["num_channels", "approximate", "learnable"]),
        ({"init": 3.5}, ["lam=3.5"], ["learnable"]),
        ({"init": [1.0, 5.0], "num_channels": 2, "channel_dim": 1}, ["num_channels=2", "channel_dim=1", "lam=[1", "5]"],
         []),
        ({"approximate": "tanh"}, ["approximate='tanh'"], []),
        ({"learnable": False, "init": 2.0}, ["learnable=False", "lam=2"], []),
    ],
)
def test_extra_repr(kwargs, contains, absent):
    text = LambdaGELU(**kwargs).extra_repr()
    for part in contains:
        assert part in text
    for part in absent:
        assert part not in text
    assert "LambdaGELU(" in repr(LambdaGELU(**kwargs))


def test_state_dict_keys_in_a_model():
    model = MLP(8, 3, hidden=(6, 5), activation="lambda_gelu")
    keys = [k for k in model.state_dict() if "act" in k]
    assert keys == ["blocks.0.act.log_lam", "blocks.1.act.log_lam"]
    frozen = MLP(8, 3, hidden=(6, 5), activation="relu")
    frozen.blocks[0].act = LambdaGELU(learnable=False)
    frozen.blocks[1].act = LambdaGELU(learnable=False)
    assert set(model.state_dict()) == set(frozen.state_dict())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 20.0])
def test_load_non_finite_raw_raises_naming_layer(bad):
    model = MLP(8, 3, hidden=(6, 5), activation="lambda_gelu")
    model.blocks[0].act.set_lambda_(2.0)
    sd = model.state_dict()
    sd["blocks.0.act.log_lam"] = torch.tensor(bad)
    target = MLP(8, 3, hidden=(6, 5), activation="lambda_gelu")
    before = target.blocks[0].act.lam
    with pytest.raises(RuntimeError, match=r"blocks\.0\.act"):
        target.load_state_dict(sd)
    assert target.blocks[0].act.lam.item() == before.item()  # the bad λ was not loaded
    assert torch.isfinite(target.blocks[0].act.lam).all()


@pytest.mark.parametrize("made_by", ["build_model", "convert"])
def test_a_bad_lambda_is_refused_before_any_weight_is_copied(made_by):
    import lambda_gelu as lg
    from lambda_gelu.models import build_model

    def make(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        if made_by == "build_model":
            return build_model("mlp", in_features=8, num_classes=3, hidden=[6, 5], activation="lambda_gelu")
        model = build_model("mlp", in_features=8, num_classes=3, hidden=[6, 5], activation="gelu")
        lg.convert(model)
        return model

    sd = make(1).state_dict()
    sd["blocks.1.act.log_lam"] = torch.tensor([float("nan")])  # visited after blocks.0's weights
    target = make(0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"blocks\.1\.act.*nothing was loaded"):
        target.load_state_dict(sd)
    after = target.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before), "no weight was copied"
    target.load_state_dict(make(1).state_dict())  # a good one still loads
    assert torch.equal(target.blocks[0].fc.weight, make(1).blocks[0].fc.weight)


def test_load_wrong_shape_raises_naming_layer():
    model = MLP(8, 3, hidden=(6, 5), activation="lambda_gelu")
    sd = model.state_dict()
    sd["blocks.1.act.log_lam"] = torch.zeros(5)
    with pytest.raises(RuntimeError, match=r"blocks\.1\.act"):
        model.load_state_dict(sd)
    per_channel = LambdaGELU(num_channels=3)
    with pytest.raises(RuntimeError, match=r"<root>|shape"):
        per_channel.load_state_dict({RAW_KEY: torch.zeros(())})


def test_load_into_frozen_layer_validates_too():
    m = LambdaGELU(learnable=False)
    with pytest.raises(RuntimeError):
        m.load_state_dict({RAW_KEY: torch.tensor(float("nan"))})
    assert torch.isfinite(m.lam)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_huge_lambda_forward_is_finite_and_relu_like(approximate):
    m = LambdaGELU(num_channels=3, channel_dim=1, approximate=approximate).set_lambda_(1e6)
    x = (torch.randn(4, 3, 5) * 100).requires_grad_(True)
    y = m(x)
    assert torch.isfinite(y).all()
    assert (y - torch.relu(x)).abs().max().item() <= 0.17e-6 + 1e-5
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.log_lam.grad).all()
    # bf16 input too
    yb = m(x.detach().bfloat16())
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb).all()


def test_module_in_a_model_trains_and_moves_lambda():
    model = nn.Sequential(nn.Linear(4, 8), LambdaGELU(init=2.0), nn.Linear(8, 1))
    before = model[1].lam.item()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(64, 4)
    for _ in range(5):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert model[1].lam.item() != before
    assert model[1].lam.item() >= 1.0

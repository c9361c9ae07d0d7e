"""Non-finite steps are skipped and counted or stop the run with its last good state; mixed precision keeps λ in
fp32 and training finite."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from lambda_gelu import LambdaGELU, convert, lambda_gelu
from lambda_gelu.data import load_dataset
from lambda_gelu.harden import HardenConfig
from lambda_gelu.models import build_model
from lambda_gelu.pipeline import harden
from lambda_gelu.resume import Checkpointer, load_state, state_paths
from lambda_gelu.train import BatchStream, FitStats, NonFiniteError, TrainConfig, all_finite, fit

SPLIT = load_dataset("digits")


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(hidden=(16, 16)) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, num_classes=10, hidden=list(hidden))
    convert(model)
    return model


def _with_row(value: float, row: int = 100, feature: int = 0):
    """The digits split with one training value replaced (a fault in the data)."""
    x = SPLIT.x_train.clone()
    x[row, feature] = value
    return dataclasses.replace(SPLIT, x_train=x)


def _steps_holding(split, config: TrainConfig, row: int) -> list[int]:
    """The 1-based steps whose batch holds training row ``row`` (the same stream fit draws)."""
    target = split.x_train[row]
    stream = BatchStream.of_split(split, config.batch_size, config.seed)
    return [step for step in range(1, config.steps + 1)
            if torch.isclose(next(stream)[0], target, rtol=0, atol=0, equal_nan=True).all(dim=1).any()]


def test_all_finite_sees_nan_and_inf_without_overflow():
    assert all_finite([torch.ones(3), None, torch.full((2,), 3e38)])  # no overflow in the check itself
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("-inf")])])
    assert all_finite([])


def test_a_nan_batch_is_skipped_counted_and_the_run_goes_on(record_property):
    split = _with_row(float("nan"))
    config = TrainConfig(steps=45, warmup=5)
    bad = _steps_holding(split, config, row=100)
    assert bad == [9, 26]  # once per epoch (20 batches), where the shuffled order puts row 100
    model = _model()
    stats = FitStats()
    losses = fit(model, split, config, progress=False, stats=stats)
    assert stats.skipped == bad
    assert [i + 1 for i, v in enumerate(losses) if not math.isfinite(v)] == bad
    assert all_finite(model.parameters())
    assert min(losses[-5:]) < losses[0]  # it kept learning
    record_property("faults_injected", len(bad))


def test_too_many_bad_steps_stop_with_a_finite_saved_state(tmp_path, record_property):
    split = _with_row(float("nan"))
    split = dataclasses.replace(split, x_train=torch.full_like(split.x_train, float("nan")))
    model = _model()
    start = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteError, match="3 steps in a row") as info:
        fit(model, split, TrainConfig(steps=50, max_bad_steps=2), progress=False,
            checkpointer=Checkpointer(tmp_path))
    assert isinstance(info.value, FloatingPointError)
    assert info.value.last_good == state_paths(tmp_path)[-1] and str(info.value.last_good) in str(info.value)
    saved = load_state(info.value.last_good)
    assert saved.step == 3 and all(torch.equal(saved.get("model")[k], v) for k, v in start.items())
    assert all_finite(model.parameters())
    record_property("faults_injected", 3)


def test_an_update_that_overflows_stops_at_once(tmp_path, record_property):
    """Finite loss and finite gradients (inputs ×1000 make some ~10), but an SGD update with lr = 3e38 that
    overflows: the run stops after that step, says so, and saves nothing non-finite."""
    split = dataclasses.replace(SPLIT, x_train=SPLIT.x_train * 1000)
    config = TrainConfig(steps=20, optimizer="sgd", lr=3e38, momentum=0.0, weight_decay=0.0, warmup=0)
    with pytest.raises(NonFiniteError, match="non-finite in the update of step 1") as info:
        fit(_model(), split, config, progress=False, checkpointer=Checkpointer(tmp_path, every=1))
    assert info.value.last_good is None and "none saved" in str(info.value)
    assert not state_paths(tmp_path)
    record_property("faults_injected", 1)


def test_default_policy_stops_an_all_nan_run_quickly():
    split = dataclasses.replace(SPLIT, x_train=torch.full_like(SPLIT.x_train, float("nan")))
    stats = FitStats()
    with pytest.raises(NonFiniteError, match="11 steps in a row"):
        fit(_model(), split, TrainConfig(steps=500), progress=False, stats=stats)
    assert stats.skipped == list(range(1, 12))


@pytest.mark.parametrize("bad", [{"amp_dtype": "float8"}, {"max_bad_steps": -1}, {"lr": float("inf")},
                                 {"lr": float("nan")}])
def test_config_refuses_bad_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("amp", ["bfloat16", "float16"])
def test_training_and_hardening_under_cpu_autocast_stay_finite(amp):
    model = _model()
    stats = FitStats()
    losses = fit(model, SPLIT, TrainConfig(steps=60, warmup=5, amp_dtype=amp), progress=False, stats=stats)
    assert all(math.isfinite(v) for v in losses) and not stats.skipped and losses[-1] < losses[0]
    hardener = harden(model, SPLIT, HardenConfig(steps=40, amp_dtype=amp), progress=False)
    for name, layer in hardener.layers.items():
        assert layer.log_lam.dtype == torch.float32
        torch.testing.assert_close(layer.lam.double(), hardener.target[name], rtol=1e-5, atol=0)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all_finite(model.parameters())


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_lambda_gradient_is_reduced_in_fp32_under_autocast(amp):
    """Under autocast the gate sees low-precision activations, but ∂L/∂λ = Σ g·x²φ(λx) is summed in fp32:
    it matches a float64 sum over the same low-precision x and g to 1e-5 (a low-precision sum would be off by
    ~1e-2 over 16384 terms)."""
    torch.manual_seed(0)
    gate = LambdaGELU(init=3.0)
    x = (torch.randn(128, 128) * 2).to(amp)
    with torch.autocast("cpu", dtype=amp):
        y = gate(x)
    assert y.dtype == amp
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    lam = gate.lam.double().requires_grad_(True)
    reference = torch.autograd.grad((lambda_gelu(x.double(), lam) * grad_out.double()).sum(), lam)[0]
    reference = (reference * gate.lam.double()).reshape(1)  # dλ/dρ = λ
    assert gate.log_lam.grad.dtype == torch.float32
    torch.testing.assert_close(gate.log_lam.grad.double(), reference, rtol=1e-5, atol=0)

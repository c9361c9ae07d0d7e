"""lambda_at (the log-space schedule) and the Hardener."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from torch import nn

from lambda_gelu import Hardener, LambdaGELU, lambda_at
from lambda_gelu.distill import Objective, Teacher
from lambda_gelu.losses import kl, kl_divergence, logits

SHAPES = ["linear", "cosine"]


# ---------------------------------------------------------------- lambda_at


@pytest.mark.parametrize("start", [1.0, 1.0001000165939331, 2.0, 3.0, 123.4])
def test_lambda_at_step_zero_is_start(start):
    for shape in SHAPES:
        assert lambda_at(0, start, 1e4, 10, shape) == start  # documented: lambda_at(0, ...) == start
        t = lambda_at(0, torch.tensor([start, start], dtype=torch.float64), torch.tensor([1e4, 50.0]), 10, shape)
        assert t.tolist() == [start, start]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("start", "target"), [(1.0, 3.0), (2.0, 1e6), (7.0, 5.0), (1.0001, 999999.9999999995)])
@pytest.mark.parametrize("total", [1, 7, 100])
def test_lambda_at_end_and_clamping(shape, start, target, total):
    assert lambda_at(total, start, target, total, shape) == target
    assert lambda_at(total + 5, start, target, total, shape) == target
    assert lambda_at(-3, start, target, total, shape) == lambda_at(0, start, target, total, shape)
    assert lambda_at(0, start, target, total, shape) == pytest.approx(start, rel=1e-15)
    t = lambda_at(total, torch.tensor(start), torch.tensor(target, dtype=torch.float64), total, shape)
    assert t.dtype == torch.float64 and t.item() == target


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("start", "target"), [(1.0, 1e3), (2.0, 3.0), (500.0, 4.0)])
def test_lambda_at_monotone(shape, start, target):
    total = 40
    values = [lambda_at(k, start, target, total, shape) for k in range(total + 1)]
    steps = [b - a for a, b in itertools.pairwise(values)]
    if start < target:
        assert all(s > 0 for s in steps)
    else:
        assert all(s < 0 for s in steps)
    assert all(min(start, target) <= v <= max(start, target) for v in values)


@pytest.mark.parametrize("shape", SHAPES)
def test_lambda_at_midpoint_is_geometric_mean(shape):
    assert lambda_at(50, 2.0, 800.0, 100, shape) == pytest.approx(40.0, rel=1e-12)


def test_linear_shape_is_linear_in_log_space():
    values = [lambda_at(k, 3.0, 3000.0, 12, "linear") for k in range(13)]
    ratios = [b / a for a, b in itertools.pairwise(values)]
    assert ratios == pytest.approx([1000.0 ** (1 / 12)] * 12, rel=1e-12)


def test_cosine_shape_is_symmetric_and_eases():
    total, start, target = 20, 2.0, 2000.0
    for k in range(total + 1):
        # w(k) + w(total − k) = 1  ⇔  λ(k)·λ(total − k) = start·target
        assert lambda_at(k, start, target, total) * lambda_at(total - k, start, target, total) == pytest.approx(
            start * target, rel=1e-12
        )
    logs = [math.log(lambda_at(k, start, target, total)) for k in range(total + 1)]
    steps = [b - a for a, b in itertools.pairwise(logs)]
    assert steps[0] < steps[total // 2 - 1] and steps[-1] < steps[total // 2]  # slow start, slow finish
    assert lambda_at(5, start, target, total, "cosine") < lambda_at(5, start, target, total, "linear")


def test_lambda_at_tensors():
    start = torch.tensor([1.0, 2.0, 10.0])
    target = torch.tensor([100.0, 2.0, 5.0])
    for k in range(0, 11):
        got = lambda_at(k, start, target, 10, "linear")
        assert got.shape == (3,) and got.dtype == torch.float64
        for c in range(3):
            assert got[c].item() == pytest.approx(
                lambda_at(k, start[c].item(), target[c].item(), 10, "linear"), rel=1e-12
            )
    # broadcasting a scalar start against per-channel targets
    got = lambda_at(10, 1.0, target, 10)
    assert got.tolist() == target.tolist()
    got = lambda_at(10, start, 50.0, 10)
    assert got.tolist() == [50.0, 50.0, 50.0]
    assert lambda_at(5, torch.tensor(1.0), torch.tensor([4.0, 16.0]), 10).tolist() == pytest.approx([2.0, 4.0])


@pytest.mark.parametrize(("shape", "total"), [("exp", 10), ("cosine", 0), ("linear", -5)])
def test_lambda_at_invalid(shape, total):
    with pytest.raises(ValueError):
        lambda_at(1, 1.0, 2.0, total, shape)  # type: ignore[arg-type]


# ---------------------------------------------------------------- Hardener


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act1 = LambdaGELU(init=2.0)
        self.fc2 = nn.Linear(6, 3)
        self.act2 = LambdaGELU(init=[1.0, 3.0, 10.0], num_channels=3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


TARGETS = {"act1": 200.0, "act2": torch.tensor([50.0, 3.0, 4.0])}  # channel 2 asks to soften: kept at 10


def test_hardener_reaches_targets_and_follows_schedule():
    model = Net()
    hardener = Hardener(model, TARGETS, total_steps=8, shape="linear")
    assert not model.act1.log_lam.requires_grad and not model.act2.log_lam.requires_grad
    assert model.fc1.weight.requires_grad
    start1 = model.act1.lam.double()
    for k in range(1, 9):
        assert not hardener.done
        hardener.step()
        assert hardener.step_count == k
        want1 = lambda_at(k, start1, torch.tensor(200.0, dtype=torch.float64), 8, "linear")
        assert model.act1.lam.item() == pytest.approx(want1.item(), rel=2e-6)
        want2 = hardener.lambdas(k)["act2"]
        torch.testing.assert_close(model.act2.lam.double(), want2, rtol=2e-6, atol=0)
    assert hardener.done
    assert model.act1.lam.item() == pytest.approx(200.0, rel=2e-6)
    torch.testing.assert_close(model.act2.lam, torch.tensor([50.0, 3.0, 10.0]), rtol=2e-6, atol=0)
    # past the end: held at the target
    hardener.step()
    assert model.act1.lam.item() == pytest.approx(200.0, rel=2e-6)


def test_hardener_never_softens():
    model = Net()
    hardener = Hardener(model, {"act1": 1.5, "act2": 1.0}, total_steps=3)
    assert hardener.target["act1"].item() == pytest.approx(2.0, rel=1e-6)
    for _ in range(3):
        hardener.step()
        assert model.act1.lam.item() == pytest.approx(2.0, rel=2e-6)
        torch.testing.assert_close(model.act2.lam, torch.tensor([1.0, 3.0, 10.0]), rtol=2e-6, atol=0)


def test_hardener_weights_still_train():
    model = Net()
    hardener = Hardener(model, {"act1": 50.0}, total_steps=5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    assert all("log_lam" not in n for n, p in model.named_parameters() if p.requires_grad and p.ndim == 0)
    w = model.fc1.weight.detach().clone()
    for _ in range(5):
        hardener.step()
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        assert model.act1.log_lam.grad is None
        opt.step()
    assert not torch.equal(w, model.fc1.weight)
    assert model.act1.lam.item() == pytest.approx(50.0, rel=2e-6)


def test_update_targets_only_raises():
    model = Net()
    hardener = Hardener(model, {"act1": 100.0, "act2": torch.tensor([5.0, 5.0, 20.0])}, total_steps=4)
    hardener.update_targets({"act1": 50.0, "act2": torch.tensor([8.0, 1.0, 30.0]), "unknown": 9.0})
    assert hardener.target["act1"].item() == 100.0
    assert hardener.target["act2"].tolist() == [8.0, 5.0, 30.0]
    hardener.update_targets({"act1": 400.0})
    assert hardener.target["act1"].item() == 400.0


def test_retarget_every():
    model = Net()
    proposals = [200.0, 10.0, 150.0]
    calls = []

    def retarget():
        calls.append(hardener.step_count)
        return {"act1": proposals[len(calls) - 1]}

    hardener = Hardener(model, {"act1": 100.0}, total_steps=6, retarget=retarget, retarget_every=2)
    for _ in range(6):
        hardener.step()
    assert calls == [2, 4, 6]
    assert hardener.target["act1"].item() == 200.0  # raised by 200, not lowered by 10 or 150
    assert model.act1.lam.item() == pytest.approx(200.0, rel=2e-6)


def test_retarget_path_is_monotone():
    model = Net()
    proposals = iter([5.0, 400.0, 3.0, 50.0, 1e3])
    hardener = Hardener(model, {"act1": 100.0}, total_steps=10, retarget=lambda: {"act1": next(proposals)},
                        retarget_every=2)
    lams = []
    for _ in range(10):
        hardener.step()
        lams.append(model.act1.lam.item())
    assert all(b >= a * (1 - 1e-6) for a, b in itertools.pairwise(lams))
    assert lams[-1] == pytest.approx(1e3, rel=2e-6)


def test_teacher_is_a_frozen_copy_beside_the_schedule():
    model = Net()
    x = torch.randn(16, 4)
    with torch.no_grad():
        before = model(x)
    teacher = Teacher(model)
    hardener = Hardener(model, {"act1": 1e4, "act2": 1e4}, total_steps=2)
    assert teacher.model is not model and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    for _ in range(2):
        hardener.step()
    assert teacher.model.act1.lam.item() == pytest.approx(2.0, rel=1e-6)  # not hardened with the student
    torch.testing.assert_close(teacher(x), before)
    with torch.no_grad():
        assert not torch.allclose(model(x), before, atol=1e-4)
    # identical logits: zero loss; hardened student: positive loss with a gradient
    objective = Objective(logits, ((1.0, kl),), teacher)
    assert kl_divergence(before, teacher(x)).item() == pytest.approx(0.0, abs=1e-7)
    loss = objective(model, x)
    assert loss.item() > 0
    loss.backward()
    assert model.fc1.weight.grad is not None and teacher.model.fc1.weight.grad is None


def test_distillation_loss_function():
    logits_ = torch.randn(8, 5)
    assert kl_divergence(logits_, logits_.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_divergence(logits_, logits_ + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    other = torch.randn(8, 5)
    p = torch.softmax(other / 2, -1)
    want = (p * (torch.log(p) - torch.log_softmax(logits_ / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(kl_divergence(logits_, other, temperature=2.0), want)


def test_losses_that_compare_need_a_teacher():
    with pytest.raises(ValueError, match="compares with a teacher"):
        Objective(logits, ((1.0, kl),))(Net(), torch.randn(2, 4))


@pytest.mark.parametrize(
    ("targets", "kwargs"),
    [
        ({"fc1": 3.0}, {}),  # not a LambdaGELU
        ({"nope": 3.0}, {}),
        ({}, {}),
        ({"act1": 3.0}, {"total_steps": 0}),
        ({"act1": 3.0}, {"shape": "exp"}),
        ({"act1": 3.0}, {"retarget_every": 2}),  # no retarget function
        ({"act1": 3.0}, {"retarget_every": -1, "retarget": dict}),
    ],
)
def test_hardener_invalid(targets, kwargs):
    kwargs = {"total_steps": 5, **kwargs}
    with pytest.raises(ValueError):
        Hardener(Net(), targets, **kwargs)


def test_hardener_state_dict_round_trip():
    model = Net()
    hardener = Hardener(model, TARGETS, total_steps=10, shape="cosine")
    hardener.update_targets({"act1": 300.0})
    for _ in range(4):
        hardener.step()
    state = json.loads(json.dumps(hardener.state_dict()))  # plain, JSON-serializable

    resumed_model = copy.deepcopy(model)
    resumed = Hardener(resumed_model, {"act1": 5.0, "act2": 5.0}, total_steps=3, shape="linear")
    resumed.load_state_dict(state)
    assert resumed.step_count == 4 and resumed.total_steps == 10 and resumed.shape == "cosine"
    for k in range(11):
        a, b = hardener.lambdas(k), resumed.lambdas(k)
        for name in a:
            torch.testing.assert_close(torch.as_tensor(a[name]), torch.as_tensor(b[name]), rtol=1e-12, atol=0)
    for _ in range(6):
        hardener.step()
        resumed.step()
        torch.testing.assert_close(model.act1.lam, resumed_model.act1.lam, rtol=0, atol=0)
        torch.testing.assert_close(model.act2.lam, resumed_model.act2.lam, rtol=0, atol=0)
    assert resumed_model.act1.lam.item() == pytest.approx(300.0, rel=2e-6)

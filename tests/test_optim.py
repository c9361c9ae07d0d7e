"""param_groups and the optimizer-aware, normalized update of the hardness parameters ρ = log(λ − 1)."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch
from torch import nn

from lambda_gelu import LambdaGELU, param_groups
from lambda_gelu.models import MLP
from lambda_gelu.module import RAW_MAX, RAW_MIN
from lambda_gelu.optim import DEFAULT_HARDNESS_LR, GROUP_HARDNESS, GROUP_KEY, optimizer_family

RAW_MAX_F32 = torch.tensor(RAW_MAX, dtype=torch.float32).item()
RAW_MIN_F32 = torch.tensor(RAW_MIN, dtype=torch.float32).item()

OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.1),
    "sgd_momentum": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9),
    "sgd_dampening": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, dampening=0.5),
    "sgd_nesterov": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-3),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1),
}


def _hardness_group(groups):
    (group,) = [g for g in groups if g.get(GROUP_KEY) == GROUP_HARDNESS]
    return group


def _rho(m: LambdaGELU) -> float:
    return m.log_lam.item()


class TwoGates(nn.Module):
    """Linear layers, a LayerNorm, a shared LambdaGELU used twice, a frozen gate and a frozen weight."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.act = LambdaGELU(init=2.0)
        self.fc2 = nn.Linear(6, 6, bias=False)
        self.fixed = LambdaGELU(init=3.0, learnable=False)
        self.frozen = nn.Linear(6, 2)
        self.frozen.weight.requires_grad_(False)
        self.per_channel = LambdaGELU(num_channels=2)

    def forward(self, x):
        x = self.act(self.norm(self.fc1(x)))
        x = self.fixed(self.act(self.fc2(x)))
        return self.per_channel(self.frozen(x))


# ---------------------------------------------------------------- param_groups


def test_param_groups_split():
    model = TwoGates()
    model.shared = model.act  # the same module under a second name
    groups = param_groups(model, lr=0.01, weight_decay=0.05, hardness_lr=0.03)
    assert len(groups) == 3
    decay, no_decay, hard = groups
    ids = lambda ps: [id(p) for p in ps]
    assert ids(decay["params"]) == ids([model.fc1.weight, model.fc2.weight])
    assert ids(no_decay["params"]) == ids([model.fc1.bias, model.norm.weight, model.norm.bias, model.frozen.bias])
    assert ids(hard["params"]) == ids([model.act.log_lam, model.per_channel.log_lam])
    assert (decay["lr"], decay["weight_decay"]) == (0.01, 0.05)
    assert (no_decay["lr"], no_decay["weight_decay"]) == (0.01, 0.0)
    assert (hard["lr"], hard["weight_decay"]) == (0.03, 0.0)
    assert hard[GROUP_KEY] == GROUP_HARDNESS
    assert GROUP_KEY not in decay and GROUP_KEY not in no_decay
    # nothing lost, nothing duplicated: exactly the trainable parameters
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    assert set(all_ids) == {id(p) for p in model.parameters() if p.requires_grad}
    # and the result is accepted by torch optimizers
    torch.optim.AdamW(groups)


def test_param_groups_defaults_and_no_hardness():
    model = MLP(5, 3, hidden=(4,), activation="lambda_gelu")
    hard = _hardness_group(param_groups(model, lr=1e-3))
    assert hard["lr"] == DEFAULT_HARDNESS_LR == 0.02
    plain = param_groups(MLP(5, 3, hidden=(4,), activation="gelu"), lr=1e-3, weight_decay=0.1)
    assert len(plain) == 2 and all(GROUP_KEY not in g for g in plain)


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": 0.0}, {"lr": -1.0}, {"lr": 0.1, "weight_decay": -0.1}, {"lr": 0.1, "hardness_lr": -0.01},
     {"lr": 0.1, "rms_beta": 1.0}, {"lr": 0.1, "rms_beta": 0.0}],
)
def test_param_groups_validation(kwargs):
    with pytest.raises(ValueError):
        param_groups(TwoGates(), **kwargs)


@pytest.mark.parametrize(
    ("optimizer", "family"),
    [(torch.optim.SGD, "sgd"), (torch.optim.Adam, "adaptive"), (torch.optim.AdamW, "adaptive"),
     (torch.optim.RMSprop, "adaptive"), (torch.optim.Rprop, "other")],
)
def test_optimizer_family(optimizer, family):
    assert optimizer_family(optimizer([nn.Parameter(torch.zeros(1))], lr=0.1)) == family


# ---------------------------------------------------------------- the normalized step


def _run_gate(opt_name, *, init, scale, steps, hardness_lr, x):
    """Train a lone gate on loss = −scale·Σ f(x; λ) (which asks for a harder gate); return ρ per step."""
    m = LambdaGELU(init=init)
    opt = OPTIMIZERS[opt_name](param_groups(m, lr=0.1, hardness_lr=hardness_lr))
    rhos = [_rho(m)]
    for _ in range(steps):
        opt.zero_grad()
        (-scale * m(x).sum()).backward()
        opt.step()
        rhos.append(_rho(m))
    return rhos


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize(("init", "scale"), [(3.0, 1e-9), (1e3, 1.0), (1e3, 1e-9)])
def test_tiny_gradient_still_moves_rho_by_hardness_lr(opt_name, init, scale):
    # ∂L/∂ρ here is ~1e-9 (scaled loss) or ~λ⁻² (large λ) or both (~1e-15): plain SGD would not move
    x = torch.cat([torch.randn(256), torch.linspace(-0.01, 0.01, 64)])  # some inputs inside |x| < 1/λ
    lr = 2e-3  # small, so λ and hence |∂L/∂ρ| stay nearly constant over the run
    rhos = _run_gate(opt_name, init=init, scale=scale, steps=60, hardness_lr=lr, x=x)
    steps = [b - a for a, b in itertools.pairwise(rhos)]
    assert all(s > 0 for s in steps)  # the direction of the gradient is kept
    late = sum(steps[-10:]) / 10
    assert late == pytest.approx(lr, rel=0.25)
    if opt_name in ("adam", "adamw"):
        assert steps[0] == pytest.approx(lr, rel=0.05)  # Adam: ≈ lr from the first step


def test_without_the_scheme_the_tiny_gradient_does_not_move_rho():
    # control for the test above: the same gate and loss in a group not made by param_groups
    m = LambdaGELU(init=1e3)
    opt = torch.optim.SGD([{"params": [m.log_lam], "lr": 2e-3}], lr=2e-3, momentum=0.9)
    before = _rho(m)
    for _ in range(20):
        opt.zero_grad()
        (-1e-9 * m(torch.randn(256)).sum()).backward()
        opt.step()
    assert abs(_rho(m) - before) < 1e-9


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e6])
def test_consistent_gradient_steady_step_same_under_sgd_and_adamw(scale):
    """A constant ∂L/∂ρ of any size: the steady-state step is hardness_lr under SGD(0.9) and AdamW alike."""
    lr = 0.01
    late = {}
    for opt_name in ("sgd_momentum", "adamw", "sgd_nesterov", "sgd_dampening"):
        m = LambdaGELU(init=2.0)
        opt = OPTIMIZERS[opt_name](param_groups(m, lr=0.1, hardness_lr=lr))
        rhos = [_rho(m)]
        for _ in range(120):
            opt.zero_grad()
            (-scale * m.log_lam).sum().backward()
            opt.step()
            rhos.append(_rho(m))
        late[opt_name] = (rhos[-1] - rhos[-11]) / 10
    for opt_name, step in late.items():
        assert step == pytest.approx(lr, rel=0.05), opt_name
    assert late["sgd_momentum"] / late["adamw"] == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
def test_sustained_hardening_keeps_step_near_hardness_lr(opt_name):
    """A consistent signal while λ grows: |∂L/∂ρ| falls like λ⁻² as the gate hardens.

    The module docstring promises that the normalization stops λ's steps from
    vanishing as λ grows and that a consistent signal moves ρ by about
    ``hardness_lr`` per step. Over 150 steps at the defaults (hardness_lr 0.02,
    rms_beta 0.99) the step should stay within a factor of two of hardness_lr.
    """
    x = torch.randn(256)
    lr = DEFAULT_HARDNESS_LR
    rhos = _run_gate(opt_name, init=10.0, scale=1e-9, steps=150, hardness_lr=lr, x=x)
    late = (rhos[-1] - rhos[-51]) / 50  # the mean step over the last third
    assert late >= 0.5 * lr, f"step fell to {late / lr:.2f} x hardness_lr"


@pytest.mark.parametrize("opt_name", ["sgd", "sgd_momentum", "adamw"])
def test_nan_gradient_is_ignored(opt_name):
    m = LambdaGELU(init=5.0)
    opt = OPTIMIZERS[opt_name](param_groups(m, lr=0.1))
    before = _rho(m)
    m.log_lam.grad = torch.full_like(m.log_lam, float("nan"))
    opt.step()
    assert _rho(m) == before


# ---------------------------------------------------------------- projection


@pytest.mark.parametrize("opt_name", ["sgd", "sgd_momentum", "adamw"])
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_projection_keeps_rho_in_range(opt_name, direction):
    m = LambdaGELU(num_channels=3).set_lambda_([1.0, 8e5, 3.0])
    opt = OPTIMIZERS[opt_name](param_groups(m, lr=0.1, hardness_lr=1.0))
    for _ in range(60):
        opt.zero_grad()
        (-direction * m.log_lam).sum().backward()  # push every ρ up (or down) with a large lr
        opt.step()
        rho = m.log_lam.detach()
        assert (rho >= RAW_MIN_F32).all() and (rho <= RAW_MAX_F32).all()
    rho = m.log_lam.detach()
    bound = RAW_MAX_F32 if direction > 0 else RAW_MIN_F32
    assert (rho == bound).all()  # every channel ended at the bound it was pushed against
    lam = m.lam
    assert torch.isfinite(lam).all() and (lam >= 1.0).all() and (lam <= 1e6 * (1 + 1e-6)).all()


def test_projection_and_normalization_leave_manual_groups_alone():
    hard = LambdaGELU(init=2.0)
    manual = LambdaGELU(init=2.0)
    weight = nn.Parameter(torch.tensor([1.0, -2.0]))
    groups = param_groups(hard, lr=0.1)  # registers the global hooks
    opt = torch.optim.SGD([*groups, {"params": [manual.log_lam, weight], "lr": 0.1}], lr=0.1)
    other = torch.optim.SGD([manual.log_lam], lr=1.0)  # a second optimizer, no hardness group
    with torch.no_grad():
        manual.log_lam.fill_(-50.0)  # below RAW_MIN: must not be clamped
    for p, g in [(hard.log_lam, 1e-9), (manual.log_lam, 1e-9), (weight, 1e-9)]:
        p.grad = torch.full_like(p, g)
    opt.step()
    assert _rho(hard) == pytest.approx(math.log(2.0) - 0.02, abs=1e-6)  # normalized to 1, times hardness lr
    assert _rho(manual) == pytest.approx(-50.0 - 1e-10, abs=1e-6)  # plain SGD, not projected
    assert manual.log_lam.grad.item() == pytest.approx(1e-9)  # its gradient was not rescaled
    torch.testing.assert_close(weight.detach(), torch.tensor([1.0, -2.0]) - 1e-10)
    other.step()
    assert _rho(manual) == pytest.approx(-50.0, abs=1e-6)  # still not projected by the other optimizer
    assert "rms_sq_avg" not in opt.param_groups[-1]


def test_other_groups_update_like_plain_optimizer():
    torch.manual_seed(1)
    model = MLP(6, 3, hidden=(5,), activation="lambda_gelu")
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=0.01), momentum=0.9)
    w = [p for n, p in twin.named_parameters() if "log_lam" not in n]
    plain = torch.optim.SGD(
        [{"params": [p for p in w if p.ndim >= 2], "weight_decay": 0.01},
         {"params": [p for p in w if p.ndim < 2]}], lr=0.1, momentum=0.9,
    )
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(3):
        for o, mdl in ((opt, model), (plain, twin)):
            o.zero_grad()
            nn.functional.cross_entropy(mdl(x), y).backward()
            o.step()
        twin.blocks[0].act.load_state_dict(model.blocks[0].act.state_dict())  # keep λ in step
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if "log_lam" not in name:
            torch.testing.assert_close(p, q)


# ---------------------------------------------------------------- optimizer state


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
def test_optimizer_state_dict_round_trip(opt_name):
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    model = MLP(6, 3, hidden=(5, 4), activation="lambda_gelu")
    for block in model.blocks:
        block.act.set_lambda_(2.0)
    opt = OPTIMIZERS[opt_name](param_groups(model, lr=0.05))

    def train(mdl, o, n):
        for _ in range(n):
            o.zero_grad()
            nn.functional.cross_entropy(mdl(x), y).backward()
            o.step()

    train(model, opt, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    hard_saved = _hardness_group(saved["opt"]["param_groups"])
    assert hard_saved["rms_steps"] == 5
    assert len(hard_saved["rms_sq_avg"]) == 2 and all(t.abs().sum() > 0 for t in hard_saved["rms_sq_avg"])

    resumed = MLP(6, 3, hidden=(5, 4), activation="lambda_gelu")
    resumed.load_state_dict(saved["model"])
    opt2 = OPTIMIZERS[opt_name](param_groups(resumed, lr=0.05))
    opt2.load_state_dict(saved["opt"])
    hard2 = _hardness_group(opt2.param_groups)
    assert hard2["rms_steps"] == 5
    for a, b in zip(hard2["rms_sq_avg"], _hardness_group(opt.param_groups)["rms_sq_avg"], strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)

    train(model, opt, 3)
    train(resumed, opt2, 3)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    # a fresh RMS (not restored) gives a different trajectory: the state matters
    fresh = MLP(6, 3, hidden=(5, 4), activation="lambda_gelu")
    fresh.load_state_dict(saved["model"])
    opt3 = OPTIMIZERS[opt_name](param_groups(fresh, lr=0.05))
    sd = copy.deepcopy(saved["opt"])
    _hardness_group(sd["param_groups"]).update(rms_steps=0, rms_sq_avg=None)
    opt3.load_state_dict(sd)
    train(fresh, opt3, 3)
    assert fresh.blocks[0].act.lam.item() != model.blocks[0].act.lam.item()


# ---------------------------------------------------------------- a real (tiny) training run


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
def test_tiny_training_run_moves_lambda(opt_name):
    torch.manual_seed(3)
    teacher = nn.Linear(8, 3)
    x = torch.randn(256, 8)
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    model = MLP(8, 3, hidden=(16, 16), activation="lambda_gelu")
    for block in model.blocks:
        block.act.set_lambda_(2.0)
    lam0 = [b.act.lam.item() for b in model.blocks]
    groups = param_groups(model, lr=0.05 if opt_name.startswith("sgd") else 5e-3, hardness_lr=0.02)
    opt = (torch.optim.SGD(groups, momentum=0.9) if opt_name.startswith("sgd") else torch.optim.AdamW(groups))
    losses = []
    for step in range(40):
        batch = slice((step * 64) % 256, (step * 64) % 256 + 64)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert all(b.act.lam.item() >= 1.0 for b in model.blocks)
    lam1 = [b.act.lam.item() for b in model.blocks]
    for before, after in zip(lam0, lam1, strict=True):
        # moved by a visible amount in log(λ − 1) (40 steps of 0.02 at most: 0.8)
        assert abs(math.log(after - 1) - math.log(before - 1)) > 0.01
        assert abs(math.log(after - 1) - math.log(before - 1)) <= 40 * 0.02 * 1.5
    assert sum(losses[-5:]) < sum(losses[:5])

"""convert / relufy / replace_modules / convert_fx / register_gelu_type."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lambda_gelu import (
    FunctionalGELUWarning,
    LambdaGELU,
    NoMatchError,
    NotGELUError,
    convert,
    convert_fx,
    functional_gelu_calls,
    register_gelu_type,
    relufy,
    replace_modules,
)
from lambda_gelu.convert import CONVERTED_ATTR, channel_counts
from lambda_gelu.gelu_types import is_gelu
from lambda_gelu.models import MLP

# ``lambda_gelu.convert`` is shadowed by the function of that name in the package namespace
gelu_types = importlib.import_module("lambda_gelu.gelu_types")


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.fc(x))


class Net(nn.Module):
    """stem (Sequential), blocks (ModuleList of Blocks), a GELU shared by ``pre`` and ``post``, a head."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, width), nn.GELU())
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        shared = nn.GELU()
        self.pre = nn.Sequential(nn.Linear(width, width), shared)
        self.post = nn.Sequential(nn.Linear(width, width), shared)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.post(self.pre(x)))


ALL_NET_GATES = ["stem.1", "blocks.0.act", "blocks.1.act", "pre.1", "post.1"]


def _gates(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, (LambdaGELU, nn.ReLU)) or is_gelu(m)}


def _snapshot(model: nn.Module) -> list[tuple[str, int]]:
    return [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)]


def _close(a, b, atol=1e-4):
    """Whole-model outputs: each gate is within 3e-5 of GELU at init, the layers after it add up the gaps."""
    assert (a - b).abs().max().item() <= atol


X = torch.randn(16, 4)


# ---------------------------------------------------------------- selection and bookkeeping


def test_convert_nested_model():
    model = Net()
    ref = copy.deepcopy(model)
    made = []
    changed = convert(model, num_channels=lambda m, n: made.append(n))  # records each build, returns None
    assert made == ["stem.1", "blocks.0.act", "blocks.1.act", "pre.1"]  # the shared gate is built once
    assert changed == ALL_NET_GATES
    assert getattr(model, CONVERTED_ATTR) == tuple(ALL_NET_GATES)
    gates = _gates(model)
    assert list(gates) == ALL_NET_GATES
    assert all(isinstance(m, LambdaGELU) for m in gates.values())
    assert not any(isinstance(m, nn.GELU) for m in model.modules())
    # the shared activation is still one shared object
    assert model.pre[1] is model.post[1]
    assert sum(isinstance(m, LambdaGELU) for m in model.modules()) == 4
    # the weights are untouched and the function is GELU's within 3e-5
    weights = [kv for kv in model.named_parameters() if "log_lam" not in kv[0]]
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), weights, strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    _close(model(X), ref(X))


def test_converted_gates_match_gelu_per_layer():
    model = Net()
    ref = copy.deepcopy(model)
    convert(model)
    for name in ALL_NET_GATES:
        x = torch.randn(50, 6) * 3
        gate, original = model.get_submodule(name), ref.get_submodule(name)
        assert (gate(x) - original(x)).abs().max().item() <= 3e-5
    tanh = nn.Sequential(nn.GELU(approximate="tanh"))
    ref = copy.deepcopy(tanh)
    convert(tanh)
    x = torch.linspace(-6, 6, 1201)
    assert (tanh(x) - ref(x)).abs().max().item() <= 3e-5


def test_second_convert_returns_empty():
    model = Net()
    convert(model)
    lam_ids = [id(m) for m in model.modules() if isinstance(m, LambdaGELU)]
    assert convert(model) == []
    assert getattr(model, CONVERTED_ATTR) == ()
    assert [id(m) for m in model.modules() if isinstance(m, LambdaGELU)] == lam_ids


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (None, ALL_NET_GATES),
        ("blocks.0.act", ["blocks.0.act"]),  # exact
        ("act", ["blocks.0.act", "blocks.1.act"]),  # suffix
        ("1.act", ["blocks.1.act"]),  # dotted suffix
        (r"blocks\.\d+\.act", ["blocks.0.act", "blocks.1.act"]),  # regex, full match
        (r"(stem|pre)\.1", ["stem.1", "pre.1", "post.1"]),  # the shared gate is selected via "pre.1"
        (["stem.1", "blocks.1.act"], ["stem.1", "blocks.1.act"]),
        ("post.1", ["pre.1", "post.1"]),
    ],
)
def test_patterns(patterns, expected):
    model = Net()
    changed = convert(model, patterns=patterns)
    assert changed == expected
    gates = _gates(model)
    for name, module in gates.items():
        assert isinstance(module, LambdaGELU) == (name in expected), name


@pytest.mark.parametrize("pattern", [r"block", "tem.1", "ct", "blocks.0"])
def test_partial_names_do_not_match(pattern):
    # neither the whole name, a suffix at a dot boundary, nor a full regex match
    model = Net()
    with pytest.raises(NoMatchError):
        convert(model, patterns=pattern)


def test_filter_fn_and_patterns_combine():
    model = Net()
    seen = []

    def only_blocks(module, name):
        seen.append(name)
        return name.startswith("blocks")

    assert convert(model, filter_fn=only_blocks) == ["blocks.0.act", "blocks.1.act"]
    assert set(seen) >= {"stem.1", "blocks.0.act", "pre.1"}
    model = Net()
    assert convert(model, patterns="act", filter_fn=lambda m, n: n.endswith("1.act")) == ["blocks.1.act"]


def test_sequential_and_modulelist_roots():
    seq = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 5), nn.GELU(approximate="tanh"))
    ref = copy.deepcopy(seq)
    assert convert(seq) == ["1", "3"]
    assert seq[1].approximate == "none" and seq[3].approximate == "tanh"
    _close(seq(X), ref(X))
    ml = nn.ModuleList([nn.GELU(), nn.Sequential(nn.GELU())])
    assert convert(ml) == ["0", "1.0"]
    assert isinstance(ml[0], LambdaGELU) and isinstance(ml[1][0], LambdaGELU)


def test_root_module_is_never_replaced():
    with pytest.raises(NoMatchError):
        convert(nn.GELU())


def test_convert_not_a_module():
    with pytest.raises(TypeError):
        convert(lambda x: x)  # type: ignore[arg-type]


# ---------------------------------------------------------------- errors leave the model unchanged


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"patterns": ["nope", "nada"]}, ["nope", "nada", "GELU"]),
        ({"filter_fn": lambda m, n: False}, ["filter_fn", "GELU"]),
    ],
)
def test_no_match_error(kwargs, needles):
    model = Net()
    before = _snapshot(model)
    with pytest.raises(NoMatchError) as info:
        convert(model, **kwargs)
    for needle in needles:
        assert needle in str(info.value)
    assert _snapshot(model) == before
    assert not hasattr(model, CONVERTED_ATTR)
    assert isinstance(info.value, ValueError)


def test_no_match_on_model_without_gelu():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    with pytest.raises(NoMatchError, match="GELU"):
        convert(model)
    with pytest.raises(NoMatchError, match="LambdaGELU"):
        relufy(model)


def test_make_raising_midway_leaves_model_unchanged():
    model = Net()
    before = _snapshot(model)
    calls = []

    def make(module, name):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return nn.ReLU()

    with pytest.raises(RuntimeError, match="boom"):
        replace_modules(model, lambda m, n: isinstance(m, nn.GELU), make)
    assert len(calls) == 3
    assert _snapshot(model) == before
    assert all(isinstance(m, nn.GELU) for m in _gates(model).values())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"init": 0.5},  # LambdaGELU rejects it
        {"num_channels": lambda m, n: 6 if n != "blocks.1.act" else -1},  # fails on the third gate
    ],
)
def test_convert_error_leaves_model_unchanged(kwargs):
    model = Net()
    before = _snapshot(model)
    with pytest.raises(ValueError):
        convert(model, **kwargs)
    assert _snapshot(model) == before
    assert not hasattr(model, CONVERTED_ATTR)


def test_replace_modules_does_not_descend_into_replaced():
    model = Net()
    changed = replace_modules(model, lambda m, n: n in ("blocks.0", "blocks.0.act"), lambda m, n: nn.Identity())
    assert changed == ["blocks.0"]
    assert isinstance(model.blocks[0], nn.Identity)


# ---------------------------------------------------------------- round trips


def test_convert_relufy_round_trip_mlp():
    gelu = MLP(8, 3, hidden=(7, 5, 6), activation="gelu")
    x = torch.randn(10, 8)
    lam = copy.deepcopy(gelu)
    assert convert(lam) == ["blocks.0.act", "blocks.1.act", "blocks.2.act"]
    _close(lam(x), gelu(x))

    # a frozen-λ conversion computes the same function and has the same state-dict keys
    frozen = copy.deepcopy(gelu)
    convert(frozen, learnable=False)
    assert torch.equal(frozen(x), lam(x))
    assert list(frozen.state_dict()) == list(lam.state_dict())
    assert sum(p.numel() for p in frozen.parameters()) == sum(p.numel() for p in gelu.parameters())
    # ... also at a trained (non-unit) λ
    for i, value in enumerate([3.0, 40.0, 1e4]):
        lam.blocks[i].act.set_lambda_(value)
    frozen.load_state_dict(lam.state_dict())
    assert torch.equal(frozen(x), lam(x))

    relu_model = MLP(8, 3, hidden=(7, 5, 6), activation="relu")
    ref_weights = {k: v for k, v in lam.state_dict().items() if "log_lam" not in k}
    assert relufy(lam) == ["blocks.0.act", "blocks.1.act", "blocks.2.act"]
    assert not any(isinstance(m, LambdaGELU) for m in lam.modules())
    assert all(isinstance(b.act, nn.ReLU) for b in lam.blocks)
    relu_model.load_state_dict(lam.state_dict())  # strict: exactly the ReLU model's keys
    assert set(lam.state_dict()) == set(ref_weights)
    assert torch.equal(lam(x), relu_model(x))
    assert relufy(lam) == []  # nothing left to swap, no error


def test_relufy_patterns_and_include_gelu():
    model = Net()
    convert(model, patterns="act")
    assert relufy(model, patterns="blocks.0.act") == ["blocks.0.act"]
    assert isinstance(model.blocks[0].act, nn.ReLU) and isinstance(model.blocks[1].act, LambdaGELU)
    assert relufy(model, include_gelu=True) == ["stem.1", "blocks.1.act", "pre.1", "post.1"]
    assert model.pre[1] is model.post[1]
    assert all(isinstance(m, nn.ReLU) for m in _gates(model).values())


def test_tanh_gelu_converts_to_tanh():
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(approximate="tanh"), nn.Linear(6, 2))
    ref = copy.deepcopy(model)
    convert(model)
    assert isinstance(model[1], LambdaGELU) and model[1].approximate == "tanh"
    _close(model(X), ref(X))


def test_per_channel_conversion_with_callable():
    model = MLP(8, 3, hidden=(7, 5), activation="gelu")
    ref = copy.deepcopy(model)
    widths = {"blocks.0.act": 7, "blocks.1.act": 5}
    seen = []

    def channels(module, name):
        seen.append((type(module), name))
        return widths[name]

    convert(model, num_channels=channels, channel_dim=-1, init=1.0)
    assert seen == [(nn.GELU, "blocks.0.act"), (nn.GELU, "blocks.1.act")]
    for name, width in widths.items():
        act = model.get_submodule(name)
        assert act.num_channels == width and act.channel_dim == -1
        assert act.log_lam.shape == (width,)
    x = torch.randn(10, 8)
    _close(model(x), ref(x))
    # per channel λ really is per channel
    model.blocks[0].act.set_lambda_(torch.linspace(1, 50, 7))
    assert not torch.allclose(model(x), ref(x), atol=1e-3)


def test_per_channel_conversion_with_int():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU())
    convert(model, num_channels=4, channel_dim=1)
    assert model[1].num_channels == 4 and model[1].channel_dim == 1
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 4, 4, 4)


# ---------------------------------------------------------------- registry


class MyGELU(nn.Module):
    def __init__(self, tanh: bool = False):
        super().__init__()
        self.tanh = tanh

    def forward(self, x):
        return F.gelu(x, approximate="tanh" if self.tanh else "none")


class MySubGELU(MyGELU):
    pass


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the GELU registry for the test (register_gelu_type mutates a global)."""
    monkeypatch.setattr(gelu_types, "GELU_REGISTRY", dict(gelu_types.GELU_REGISTRY))
    return gelu_types.GELU_REGISTRY


def test_register_gelu_type(registry):
    model = nn.Sequential(nn.Linear(4, 4), MyGELU(), nn.Linear(4, 4), MySubGELU(tanh=True), nn.GELU())
    ref = copy.deepcopy(model)
    register_gelu_type(MyGELU, lambda m: "tanh" if m.tanh else "none")
    assert MyGELU in registry
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a registered class is a leaf: its F.gelu is no functional call
        assert convert(model) == ["1", "3", "4"]
    assert model[1].approximate == "none" and model[3].approximate == "tanh"  # subclass found via the MRO
    _close(model(X), ref(X))


def test_register_gelu_type_fixed_approximation(registry):
    register_gelu_type(MyGELU, "tanh")
    model = nn.Sequential(MyGELU())
    convert(model)
    assert model[0].approximate == "tanh"


def test_register_gelu_type_rejects_non_modules(registry):
    with pytest.raises(TypeError):
        register_gelu_type(int)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        register_gelu_type(nn.GELU())  # type: ignore[arg-type]


def test_unregistered_custom_gelu_is_found_by_what_it_computes():
    """A family's own GELU class (here both forms, chosen per instance) is GELU-family without registration."""
    model = nn.Sequential(nn.Linear(4, 4), MyGELU(), nn.Linear(4, 4), MySubGELU(tanh=True))
    ref = copy.deepcopy(model)
    assert convert(model, check_functional=False) == ["1", "3"]
    assert model[1].approximate == "none" and model[3].approximate == "tanh"
    _close(model(X), ref(X))


class MyQuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


def test_custom_class_named_gelu_that_is_not_gelu_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), MyQuickGELU(), nn.Linear(4, 4), nn.GELU())
    with pytest.raises(NotGELUError, match="MyQuickGELU is neither"):
        convert(model)
    assert isinstance(model[1], MyQuickGELU) and isinstance(model[3], nn.GELU)  # nothing changed


def test_custom_activation_that_is_not_gelu_is_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), Swish(), nn.Linear(4, 4), nn.GELU())
    assert convert(model, check_functional=False) == ["3"]
    assert isinstance(model[1], Swish)


# ---------------------------------------------------------------- functional GELU


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 2)

    def forward(self, x):
        x = self.act(self.fc1(x))
        x = F.gelu(self.fc2(x), approximate="tanh")
        return self.fc3(torch.nn.functional.gelu(x))


class Untraceable(Functional):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 1.0
        return self.fc3(F.gelu(self.act(self.fc2(self.act(self.fc1(x))))))


def test_convert_warns_about_functional_gelu():
    model = Functional()
    with pytest.warns(FunctionalGELUWarning, match="2 functional GELU"):
        assert convert(model) == ["act"]
    assert len(functional_gelu_calls(model)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(Functional(), check_functional=False)  # no warning when asked not to check


def test_convert_warns_for_untraceable_model_by_class():
    model = Untraceable()
    with pytest.warns(FunctionalGELUWarning, match="Untraceable.forward"):
        convert(model)
    with pytest.raises(Exception):  # noqa: B017 - torch.fx's own error is let through
        convert_fx(Untraceable())


def test_no_warning_without_functional_gelu():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(Net())


def test_convert_fx_replaces_functional_gelu():
    model = Functional()
    before = _snapshot(model)
    x = torch.randn(9, 4)
    gm, names = convert_fx(model)
    assert isinstance(gm, torch.fx.GraphModule)
    assert names == ["lambda_gelu_0", "lambda_gelu_1", "act"]
    assert gm.get_submodule("lambda_gelu_0").approximate == "tanh"
    assert gm.get_submodule("lambda_gelu_1").approximate == "none"
    assert isinstance(gm.get_submodule("act"), LambdaGELU)
    assert functional_gelu_calls(gm) == []
    assert not any(n.op == "call_function" and "gelu" in str(n.target) for n in gm.graph.nodes)
    _close(gm(x), model(x))
    # the input model is not changed
    assert _snapshot(model) == before and isinstance(model.act, nn.GELU)
    # λ of the new submodules is trainable and matters
    assert {n for n, _ in gm.named_parameters() if "log_lam" in n} == {
        "lambda_gelu_0.log_lam", "lambda_gelu_1.log_lam", "act.log_lam"}
    gm.get_submodule("lambda_gelu_1").set_lambda_(1e4)
    assert not torch.allclose(gm(x), model(x), atol=1e-4)


def test_convert_fx_frozen_and_init():
    class Plain(nn.Module):
        def forward(self, x):
            return F.gelu(x, approximate="tanh")

    gm, names = convert_fx(Plain(), learnable=False, init=2.0)
    assert names == ["lambda_gelu_0"]
    act = gm.get_submodule("lambda_gelu_0")
    assert act.approximate == "tanh" and not act.learnable and act.lam.item() == pytest.approx(2.0)
    x = torch.randn(20)
    torch.testing.assert_close(gm(x), F.gelu(2 * x, approximate="tanh") / 2)


def test_convert_fx_without_gelu_raises():
    with pytest.raises(NoMatchError):
        convert_fx(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


def test_channel_counts_and_per_channel_dict_conversion():
    model = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 2))
    x = torch.randn(4, 3)
    reference = model(x)
    counts = channel_counts(model, x)
    assert counts == {"1": 5, "3": 7}
    assert convert(model, num_channels=counts) == ["1", "3"]
    assert model[1].lam.shape == (5,) and model[3].lam.shape == (7,)
    torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=0)


def test_per_channel_dict_missing_entry_leaves_model_unchanged():
    model = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 7), nn.GELU())
    with pytest.raises(ValueError, match="no entry for '3'"):
        convert(model, num_channels={"1": 5})
    assert isinstance(model[1], nn.GELU) and isinstance(model[3], nn.GELU)

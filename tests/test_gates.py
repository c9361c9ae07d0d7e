"""Proven ReLU: smooth_gates / assert_relu, every form a GELU takes in torch code, and relufy's proof."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lambda_gelu as lg
from lambda_gelu.gates import function_gates, preserved_modes


def gates_of(model: nn.Module, *args, **kwargs) -> list[tuple[str, str]]:
    return [(op.module, op.op) for op in lg.smooth_gates(model, *args, **kwargs) if op.gate]


class HandTanhGELU(nn.Module):
    """GELU's tanh form written out, as some model code does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class HandMLP(nn.Module):
    """A hand-written GELU in ``forward`` next to an nn.GELU module, then a pooler-style tanh and a softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.fc3 = nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.act(self.fc1(x)))
        h = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))  # GELU by hand
        return torch.softmax(torch.tanh(self.fc3(h)), dim=-1)


class FunctionHolder(nn.Module):
    """A GELU held as a function attribute."""

    def __init__(self, activation=F.gelu) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))


def test_smooth_gates_names_each_form_and_tells_gates_from_other_nonlinearities():
    found = {(op.module, op.op): op for op in lg.smooth_gates(HandMLP(), X)}
    assert found[("act", "gelu")].gate
    assert found[("", "erf")].gate  # x·Φ(x) by hand: erf's result multiplies the tensor it came from
    assert not found[("", "tanh")].gate  # a squashing tanh on the output is not a gate
    assert not found[("", "_softmax")].gate
    assert gates_of(nn.Sequential(nn.Linear(6, 4), HandTanhGELU()), X) == [("1", "tanh")]
    assert gates_of(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), X) == []


@pytest.mark.parametrize(
    ("gate", "op"),
    [(nn.SiLU(), "silu"), (nn.Softplus(), "softplus"), (nn.Mish(), "mish"), (nn.ELU(), "elu"),
     (nn.Hardswish(), "hardswish"), (lambda x: x * torch.sigmoid(1.702 * x), "sigmoid"),
     (lambda x: x / (1.0 + torch.exp(-x)), "exp")],
)
def test_other_smooth_gates_are_gates_too(gate, op):
    model = FunctionHolder(gate) if not isinstance(gate, nn.Module) else nn.Sequential(nn.Linear(6, 4), gate)
    assert op in {name for _module, name in gates_of(model, X)}


def test_assert_relu_raises_naming_the_gates_and_passes_a_relu_model():
    with pytest.raises(lg.SmoothGateError, match=r"2 smooth gate\(s\): gelu in act \(GELU\); erf in <root>") as info:
        lg.assert_relu(HandMLP(), X)
    assert [op.op for op in info.value.gates] == ["gelu", "erf"]
    others = lg.assert_relu(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2), nn.Tanh()), X)
    assert [op.op for op in others] == ["tanh"]


def test_smooth_gates_restores_every_submodule_mode_and_sees_lambda_gelu():
    model = nn.Sequential(nn.Linear(6, 4), lg.LambdaGELU(3.0), nn.Dropout(0.5))
    model.train()
    model[2].eval()  # a mixed model stays mixed
    assert gates_of(model, X) == [("1", "lambda_gelu (λ-GELU, λ = 3)")]
    assert [m.training for m in model.modules()] == [True, True, True, False]
    with preserved_modes(model, training=False):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, True, False]


# ---------------------------------------------------------------- torch's own transformer layers


def encoder_layer(activation) -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation=activation, batch_first=True).eval()


SRC = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))


def relu_reference(layer: nn.Module, cls=nn.TransformerEncoderLayer) -> nn.Module:
    """The same weights in a layer built as ReLU by torch itself: the independent reference."""
    reference = cls(16, 4, 32, dropout=0.0, activation="relu", batch_first=True).eval()
    reference.load_state_dict(layer.state_dict())
    return reference


@pytest.mark.parametrize("activation", ["gelu", nn.GELU(), F.gelu])
def test_transformer_encoder_layer_becomes_relu_on_its_fused_path(activation):
    layer = encoder_layer(activation)
    assert gates_of(layer, SRC) == [("", "gelu (fused TransformerEncoderLayer path)")]
    reference_gelu = layer(SRC)
    assert lg.convert(layer) == ["activation"]
    assert layer.activation_relu_or_gelu == 0  # λ-GELU takes the module path, not the fused GELU
    with torch.no_grad():
        torch.testing.assert_close(layer(SRC), reference_gelu, atol=1e-3, rtol=0)
    layer.activation.set_lambda_(1e4)
    lg.relufy(layer, example=SRC)
    assert layer.activation_relu_or_gelu == 1 and isinstance(layer.activation, nn.ReLU)
    assert gates_of(layer, SRC) == []
    with torch.no_grad():
        torch.testing.assert_close(layer(SRC), relu_reference(layer)(SRC))


def test_transformer_encoder_direct_swap_of_a_gelu_string():
    layer = encoder_layer("gelu")
    assert function_gates(layer)[0].name == "activation"
    lg.relufy(layer, include_gelu=True, example=SRC)
    with torch.no_grad():
        torch.testing.assert_close(layer(SRC), relu_reference(layer)(SRC))


def test_transformer_decoder_layer_and_a_whole_encoder():
    torch.manual_seed(0)
    decoder = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, activation="gelu", batch_first=True).eval()
    memory = torch.randn(2, 5, 16)
    assert lg.convert(decoder) == ["activation"]
    lg.relufy(decoder, example=(SRC, memory))
    reference = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, activation="relu", batch_first=True).eval()
    reference.load_state_dict(decoder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(decoder(SRC, memory), reference(SRC, memory))

    encoder = nn.TransformerEncoder(encoder_layer("gelu"), num_layers=2, enable_nested_tensor=False).eval()
    assert lg.convert(encoder) == ["layers.0.activation", "layers.1.activation"]
    lg.relufy(encoder, example=SRC)
    assert lg.assert_relu(encoder, SRC) == []


def test_function_attribute_and_partial_are_converted():
    for activation, form in [(F.gelu, "none"), (functools.partial(F.gelu, approximate="tanh"), "tanh")]:
        model = FunctionHolder(activation)
        reference = copy.deepcopy(model)
        assert lg.convert(model) == ["activation"]
        assert model.activation.approximate == form
        torch.testing.assert_close(model(X), reference(X), atol=1e-4, rtol=0)
        lg.relufy(model, example=X)
        expected = reference.fc2(torch.relu(reference.fc1(X)))
        torch.testing.assert_close(model(X), expected)


# ---------------------------------------------------------------- refusals


class FunctionalCall(nn.Module):
    """A functional GELU inside forward, next to a module GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.act(self.fc1(x))))


@pytest.mark.parametrize("model_cls", [HandMLP, FunctionalCall])
def test_convert_and_relufy_refuse_gates_they_cannot_reach_and_change_nothing(model_cls):
    model = model_cls()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lg.UnconvertibleGateError, match="no module swap reaches") as info:
        lg.convert(model, example=X)
    assert all(op.module == "" for op in info.value.gates)  # the forward of the root module computes them
    assert isinstance(model.act, nn.GELU)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(lg.UnconvertibleGateError):
        lg.relufy(model, include_gelu=True, example=X)
    assert isinstance(model.act, nn.GELU)


def test_relufy_with_an_example_refuses_a_partial_swap():
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU())
    lg.convert(model)
    with pytest.raises(lg.UnconvertibleGateError, match=r"left out of the swap: lambda_gelu .* in 3"):
        lg.relufy(model, patterns="1", example=X[:, :6])
    assert isinstance(model[1], lg.LambdaGELU)
    assert lg.relufy(model, patterns="1") == ["1"]  # without an example, a partial swap is the user's choice


# ---------------------------------------------------------------- forms that once slipped through


class ScaledErfGELU(nn.Module):
    """x·Φ(x) with the 1/√2 held in a (1,) buffer: a broadcast constant must not hide the x·s(x) link."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.register_buffer("k", torch.tensor([1 / math.sqrt(2)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return 0.5 * h * (1 + torch.erf(h * self.k))


class ViewedSwish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.beta = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h.view(-1, 8) * torch.sigmoid(self.beta * h).reshape(-1, 8)


class SmoothOfSmooth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = 3 * torch.tanh(self.fc(x) / 3)
        return y * torch.sigmoid(1.702 * y)


class HandGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc(x).chunk(2, -1)
        return a * torch.sigmoid(b)


class HandSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        e = torch.exp(h - h.max(-1, keepdim=True).values)
        return torch.tanh(h) * torch.tanh(h) + e / e.sum(-1, keepdim=True)


@pytest.mark.parametrize(("model_cls", "gates", "others"), [
    (ScaledErfGELU, {"erf"}, set()),
    (ViewedSwish, {"sigmoid"}, set()),
    (SmoothOfSmooth, {"sigmoid"}, {"tanh"}),
    (HandGLU, {"sigmoid"}, set()),
    (HandSoftmax, set(), {"tanh", "exp"}),
])
def test_data_flow_sees_through_constants_views_and_smooth_inputs(model_cls, gates, others):
    found = lg.smooth_gates(model_cls(), X)
    assert {op.op for op in found if op.gate} == gates
    assert {op.op for op in found if not op.gate} == others


class ActivationChildAndFunctional(nn.Module):
    """A child named `activation` must not excuse a functional GELU in its parent's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.activation = nn.Linear(6, 8), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.activation(self.fc(x)))


def test_a_functional_gelu_beside_an_activation_child_is_refused():
    with pytest.raises(lg.UnconvertibleGateError, match=r"gelu in <root> \(ActivationChildAndFunctional\)"):
        lg.convert(ActivationChildAndFunctional(), example=X)


def test_per_channel_counts_refuse_a_shared_gate_at_two_widths():
    shared = nn.GELU()
    model = nn.Sequential(nn.Linear(6, 8), shared, nn.Linear(8, 5), shared)
    with pytest.raises(ValueError, match=r"one gate module used at widths \[5, 8\]"):
        lg.channel_counts(model, X)
    assert lg.channel_counts(nn.Sequential(nn.Linear(6, 8), nn.GELU()), X) == {"1": 8}

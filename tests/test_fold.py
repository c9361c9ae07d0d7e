"""Folding λ into the neighbouring layers: same outputs, plain GELU graph, and only where it is exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lambda_gelu import LambdaGELU, convert
from lambda_gelu.convert import channel_counts
from lambda_gelu.fold import fold_lambda
from lambda_gelu.models import MLP, build_model


def _random_lambdas(model: nn.Module, high: float = 6.0) -> None:
    """Give every gate distinct λ values in [1, 1 + high] (per channel where it has channels)."""
    for module in model.modules():
        if isinstance(module, LambdaGELU):
            module.set_lambda_(1.0 + torch.rand(module.log_lam.shape) * high)


def _fold_and_compare(model: nn.Module, x: torch.Tensor, atol: float = 1e-5):
    model.eval()
    folded = copy.deepcopy(model)
    report = fold_lambda(folded, example=x)
    with torch.no_grad():
        want, got = model(x), folded(x)
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)
    assert report.max_abs_diff is not None and report.max_abs_diff <= atol
    return folded, report


def _gates(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, LambdaGELU)]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mlp_folds_every_gate(per_channel, approximate):
    model = MLP(16, 5, hidden=(32, 24, 20), activation="gelu_tanh" if approximate == "tanh" else "gelu")
    x = torch.randn(7, 16)
    counts = channel_counts(model, x) if per_channel else None
    convert(model, num_channels=counts)
    _random_lambdas(model)
    folded, report = _fold_and_compare(model, x)
    assert report.folded == ["blocks.0.act", "blocks.1.act", "blocks.2.act"] and not report.skipped
    assert _gates(folded) == []
    acts = [block.act for block in folded.blocks]
    assert all(type(a) is nn.GELU and a.approximate == approximate for a in acts)
    # the λ went into the weights: the first layer's rows now carry it
    lam0 = model.blocks[0].act.lam
    torch.testing.assert_close(folded.blocks[0].fc.weight, model.blocks[0].fc.weight * lam0.reshape(-1, 1))
    assert "folded 3 of 3" in str(report)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.act1 = LambdaGELU(num_channels=8, channel_dim=1)  # per channel, into a grouped conv
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.act2 = LambdaGELU(num_channels=6, channel_dim=1)  # BatchNorm before, 1×1 conv after
        self.conv3 = nn.Conv2d(6, 4, 1)
        self.act3 = LambdaGELU()  # one λ, through Flatten and Dropout into a Linear
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        x = self.act2(self.bn(self.conv2(self.act1(self.conv1(x)))))
        return self.fc(self.drop(torch.flatten(self.act3(self.conv3(x)), 1)))


def test_conv_model_folds_per_channel_and_per_layer():
    model = ConvNet()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    _random_lambdas(model)
    x = torch.randn(2, 3, 5, 5)
    folded, report = _fold_and_compare(model, x)
    assert report.folded == ["act1", "act2", "act3"]
    decisions = {d.gate: d for d in report.decisions}
    assert decisions["act2"].before == "bn" and decisions["act2"].after == ("conv3",)
    assert decisions["act3"].after == ("fc",)
    assert _gates(folded) == []


class Unfoldable(nn.Module):
    """Gates that must not be folded, each for one reason, and one that may."""

    def __init__(self) -> None:
        super().__init__()
        lin = lambda: nn.Linear(6, 6)
        self.fc1, self.fc2, self.fc3, self.fc4, self.fc5, self.fc6 = lin(), lin(), lin(), lin(), lin(), lin()
        self.fc7, self.fc8, self.fc9, self.fc10, self.fc_x = lin(), lin(), lin(), lin(), lin()
        self.act_res = LambdaGELU()  # its output also feeds the residual add
        self.act_in = LambdaGELU()  # its input is the model's input, not a layer
        self.act_chan = LambdaGELU(num_channels=6, channel_dim=-1)  # per channel through a reshape
        self.act_tied = LambdaGELU()  # the following layer's weight is tied to another layer
        self.fc6.weight = self.fc_x.weight
        self.act_twice = LambdaGELU()  # called twice
        self.act_ok = LambdaGELU()

    def forward(self, x):
        h = self.act_res(self.fc1(x))
        h = self.fc2(h) + h + self.fc3(self.act_in(x))
        h = self.fc5(self.act_chan(self.fc4(h)).reshape(-1, 6))
        h = self.fc6(self.act_tied(h)) + self.fc_x(x)
        h = self.act_twice(self.fc7(h)) + self.act_twice(h)
        return self.fc10(self.act_ok(self.fc9(self.fc8(h))))


def test_only_exact_folds_are_made_and_the_rest_is_explained():
    model = Unfoldable()
    _random_lambdas(model)
    folded, report = _fold_and_compare(model, torch.randn(4, 6))
    skipped = report.skipped
    assert report.folded == ["act_ok"]
    assert "add" in skipped["act_res"]
    assert "input of the model" in skipped["act_in"]
    assert "reshape" in skipped["act_chan"]
    assert "fc6.weight is shared" in skipped["act_tied"]
    assert "called 2 times" in skipped["act_twice"]
    assert _gates(folded) == ["act_res", "act_in", "act_chan", "act_tied", "act_twice"]
    for gate, reason in skipped.items():
        assert f"kept    {gate}: {reason}" in str(report)


def test_transformer_blocks_fold_when_the_root_does_not_trace():
    torch.manual_seed(0)
    model = build_model("vit", num_classes=4, image_size=8, patch_size=4, dim=16, depth=2, heads=2,
                        activation="lambda_gelu")
    _random_lambdas(model, high=20.0)
    _, report = _fold_and_compare(model, torch.randn(3, 1, 8, 8))
    assert report.folded == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    assert {d.traced_in for d in report.decisions} == {"blocks.0", "blocks.1"}


def test_folded_model_exports_as_plain_gelu(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from lambda_gelu.export import check_onnx, export_onnx, op_census

    torch.manual_seed(0)
    model = MLP(12, 4, hidden=(16, 16), activation="lambda_gelu")
    _random_lambdas(model)
    x = torch.randn(5, 12)
    folded, _ = _fold_and_compare(model, x)
    path = export_onnx(folded, x, tmp_path / "folded.onnx")
    onnx_report = check_onnx(folded, x, path, atol=1e-5)
    ops = onnx_report.op_counts
    # two gates → two GELUs (or their Erf form); three Linear layers; nothing that carries λ
    assert ops.get("Gelu", 0) + ops.get("Erf", 0) == 2
    assert ops.get("Gemm", 0) + ops.get("MatMul", 0) == 3
    assert not {"Mul", "Div"} & set(ops), ops
    assert onnx_report.parity_ok
    # unfolded, λ shows up in the graph (so the census above can tell the two apart)
    unfolded = op_census(export_onnx(model, x, tmp_path / "unfolded.onnx"))
    assert unfolded.get("Mul", 0) > 0 and "Gelu" not in unfolded, unfolded

"""``lambda-gelu check``: the real ONNX / int8 / Marabou / sparsity checks on tiny trained MLPs, and its errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lambda_gelu.check import CheckConfig, CheckUsageError, load_subjects, missing_extra, render_markdown, run_check
from lambda_gelu.checkpoint import load_checkpoint, save_checkpoint
from lambda_gelu.cli import main
from lambda_gelu.convert import convert
from lambda_gelu.data import load_dataset

TINY = ["--hidden", "8,8", "--steps", "100", "--lr", "0.02", "--no-progress"]
CHECK = ["--points", "4", "--epsilon", "0.01", "--timeout", "5", "--repeats", "3", "--no-progress"]


def _extra(module: str, extra: str):
    return pytest.importorskip(module, reason=f"the {extra} extra ({module}) is not installed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GELU MLP trained on digits, and its ReLU swap, as checkpoints."""
    folder = tmp_path_factory.mktemp("check")
    gelu, relu = folder / "gelu.safetensors", folder / "relu.safetensors"
    assert main(["train", "--out", str(gelu), "--activation", "gelu", *TINY]) == 0
    assert main(["relufy", str(gelu), "--include-gelu", "--out", str(relu)]) == 0
    return {"folder": folder, "gelu": gelu, "relu": relu}


@pytest.fixture(scope="module")
def report(tiny: dict[str, Path]) -> dict:
    """One real ``lambda-gelu check`` run on the tiny pair; its report.json."""
    out = tiny["folder"] / "report"
    assert main(["check", str(tiny["relu"]), "--gelu", str(tiny["gelu"]), "--out", str(out), *CHECK]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def split():
    return load_dataset("digits", seed=0)


def test_report_files_and_sections(tiny: dict[str, Path], report: dict) -> None:
    out = tiny["folder"] / "report"
    for name in ("report.md", "report.json", "gelu.onnx", "relu.onnx"):
        assert (out / name).is_file(), name
    assert list(report["models"]) == ["gelu", "relu"]
    assert report["models"]["relu"]["gates"] == {"relu": 2} and report["models"]["gelu"]["gates"] == {"gelu": 2}
    markdown = (out / "report.md").read_text()
    for heading in ("## ONNX", "## int8 post-training quantization", "## Formal verification",
                    "## Activation sparsity", "| GELU original | ReLU-ized |"):
        assert heading in markdown
    assert markdown == render_markdown(report)


def test_onnx_census_and_parity(report: dict) -> None:
    _extra("onnxruntime", "onnx")
    onnx = report["onnx"]
    assert onnx["status"] == "ok" and onnx["opset"] == 20
    relu, gelu = onnx["models"]["relu"], onnx["models"]["gelu"]
    assert relu["op_counts"] == {"Gemm": 3, "Relu": 2}
    assert relu["smooth_gate_ops"] == []
    assert gelu["smooth_gate_ops"] == ["Gelu"]
    assert relu["parity_ok"] and gelu["parity_ok"]
    assert relu["max_abs_diff"] < 1e-4 and gelu["max_abs_diff"] < 1e-4


def test_quantization_fuses_linear_relu_but_not_gelu(report: dict) -> None:
    _extra("torchao", "quant")
    section = report["quantization"]
    assert section["status"] == "ok"
    relu, gelu = section["models"]["relu"], section["models"]["gelu"]
    assert relu["int8_op_counts"]["onednn.qlinear_pointwise"] == 3
    assert relu["fp32_ops_left"] == {}
    gated = [row for row in relu["fusions"] if row["gate"]]
    assert [row["pattern"] for row in gated] == ["Linear-ReLU", "Linear-ReLU"]
    assert all(row["gate_fused"] and row["post_op"] == "relu" for row in gated)
    assert [row["compute"] for row in relu["fusions"]] == ["blocks.0.fc", "blocks.1.fc", "head"]
    gelu_gated = [row for row in gelu["fusions"] if row["gate"]]
    assert gelu_gated and not any(row["gate_fused"] for row in gelu_gated)
    assert all(row["gate_ops_left"] for row in gelu_gated)
    for entry in (relu, gelu):  # int8 PTQ of a small MLP keeps nearly every prediction
        assert entry["agreement"] >= 90.0
        assert abs(entry["accuracy_int8"] - entry["accuracy_fp32"]) <= 5.0
        assert entry["latency_fp32_ms"] > 0 and entry["latency_int8_ms"] > 0


def test_int8_graph_matches_fp32_and_the_reference_graph(tiny: dict[str, Path], split) -> None:
    _extra("torchao", "quant")
    from lambda_gelu.check.quantize import quantize_int8, run_fixed_batch

    model, _ = load_checkpoint(tiny["relu"])
    reference, lowered = quantize_int8(model, [split.x_train[:512]], split.x_test[:64])
    with torch.no_grad():
        fp32 = model(split.x_test)
        int8 = run_fixed_batch(lowered, split.x_test, 64)
        qdq = reference(split.x_test)
    scale = float(fp32.abs().max())
    assert float((int8 - qdq).abs().max()) <= 0.02 * scale  # oneDNN kernels compute what the Q/DQ graph says
    assert float((int8 - fp32).abs().max()) <= 0.15 * scale  # and that is close to fp32
    assert int8.shape == fp32.shape


def test_seven_bit_weights_where_onednn_saturates(monkeypatch: pytest.MonkeyPatch) -> None:
    _extra("torchao", "quant")
    from lambda_gelu.check.quantize import SEVEN_BIT_WEIGHTS, int8_quantization_config, needs_seven_bit_weights

    low, high = SEVEN_BIT_WEIGHTS  # a vpmaddubsw pair of u8 x s8 products fits int16 with these, not with 8 bits
    assert 2 * 255 * 127 > 2**15 - 1 >= 2 * 255 * max(-low, high)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert needs_seven_bit_weights()
    narrow, default = int8_quantization_config(True), int8_quantization_config(False)
    assert (narrow.weight.quant_min, narrow.weight.quant_max) == (low, high)
    assert (default.weight.quant_min, default.weight.quant_max) == (-128, 127)
    assert narrow.input_activation == default.input_activation  # activations keep all 8 bits


def test_conv_bn_relu_fuses_and_bn_folds() -> None:
    _extra("torchao", "quant")
    from lambda_gelu.check.quantize import quantization_check

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 10)).eval()
    model[1].running_var.uniform_(0.5, 2.0)
    model[1].running_mean.normal_()
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    result = quantization_check(model, [x], x, y, batch=32, repeats=2)
    conv = result.fusions[0]
    assert conv.pattern == "Conv-BN-ReLU"
    assert conv.int8_op == "qconv_pointwise" and conv.post_op == "relu"
    assert conv.batch_norm_folded and conv.gate_fused
    assert result.fp32_ops_left == {}

    from lambda_gelu.check.sparsity import activation_sparsity

    (gate,) = activation_sparsity(model, [(x, y)])
    with torch.no_grad():
        maps = model[:3](x)
    assert gate.units == 4  # after a convolution, a unit is a channel
    assert gate.exact_zero == pytest.approx(float((maps == 0).float().mean()))
    assert gate.dead_units == int((maps != 0).sum((0, 2, 3)).eq(0).sum())


def test_verification_counts_and_gelu_rejection(report: dict) -> None:
    _extra("maraboupy", "verify")
    section = report["verification"]
    assert section["status"] == "ok" and section["points"] == 4 and section["epsilon"] == 0.01
    relu, gelu = section["models"]["relu"], section["models"]["gelu"]
    assert relu["accepted"] and sum(relu["counts"].values()) == 4
    assert not gelu["accepted"]
    assert "Gelu" in gelu["rejection"] and gelu["unsupported_ops"] == ["Gelu"]
    assert gelu["rejected_at"].startswith("ONNXParser.py")


def _correct_points(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).nonzero().flatten()


def test_marabou_definite_answers(tiny: dict[str, Path], split) -> None:
    _extra("maraboupy", "verify")
    from lambda_gelu.check.verify import verify_robustness
    from lambda_gelu.export import export_onnx

    model, _ = load_checkpoint(tiny["relu"])
    path = export_onnx(model, split.x_test[:2], tiny["folder"] / "marabou.onnx")
    right = _correct_points(model, split.x_test, split.y_test)[0]
    x, label = split.x_test[right : right + 1], split.y_test[right : right + 1]
    at_zero = verify_robustness(path, model, x, label, epsilon=0.0, timeout_s=10, domain=(0.0, 1.0))
    assert at_zero.accepted and at_zero.points[0].status == "verified"
    assert at_zero.points[0].queries == 9  # one per other class

    # an ε-box around x that holds an input the model puts in another class: must be falsified
    with torch.no_grad():
        predicted = model(split.x_test).argmax(-1)
    other = int((predicted != predicted[right]).nonzero()[0])
    epsilon = float((split.x_test[other] - x[0]).abs().max())
    far = verify_robustness(path, model, x, label, epsilon=epsilon, timeout_s=30, domain=(0.0, 1.0))
    point = far.points[0]
    assert point.status == "falsified" and point.counterexample_confirmed
    assert point.counterexample_class != int(label)


def test_lambda_gelu_onnx_is_rejected_by_marabou(tiny: dict[str, Path], split) -> None:
    _extra("maraboupy", "verify")
    from lambda_gelu.check.verify import verify_robustness
    from lambda_gelu.export import export_onnx, op_census

    model, _ = load_checkpoint(tiny["gelu"])
    convert(model)  # GELU → λ-GELU: x·Φ(λx) exports as Erf and Mul of two variables
    path = export_onnx(model, split.x_test[:2], tiny["folder"] / "lambda.onnx")
    assert "Erf" in op_census(path)
    result = verify_robustness(path, model, split.x_test[:1], split.y_test[:1], 0.01, 5)
    assert not result.accepted and result.points == []
    assert result.unsupported_ops == ["Erf"]
    assert result.rejection and result.rejected_at.startswith("ONNXParser.py")


def test_tanh_gelu_onnx_is_rejected_by_marabou(tmp_path: Path) -> None:
    _extra("maraboupy", "verify")
    from lambda_gelu.check.verify import verify_robustness
    from lambda_gelu.export import export_onnx, op_census
    from lambda_gelu.models import build_model

    model = build_model("mlp", in_features=64, num_classes=10, hidden=[8], activation="gelu_tanh").eval()
    path = export_onnx(model, torch.rand(2, 64), tmp_path / "tanh.onnx")
    assert op_census(path) == {"Gelu": 1, "Gemm": 2}  # opset 20 keeps the tanh form as Gelu(approximate="tanh")
    result = verify_robustness(path, model, torch.rand(1, 64), torch.tensor([0]), 0.01, 5)
    assert not result.accepted and "Gelu" in result.rejection


def test_sparsity_matches_a_direct_count(tiny: dict[str, Path], report: dict, split) -> None:
    model, _ = load_checkpoint(tiny["relu"])
    with torch.no_grad():
        pre1 = model.blocks[0].fc(split.x_test)
        pre2 = model.blocks[1].fc(pre1.relu())
    gates = {g["name"]: g for g in report["sparsity"]["models"]["relu"]["gates"]}
    for name, pre in (("blocks.0.act", pre1), ("blocks.1.act", pre2)):
        h = pre.relu()
        assert gates[name]["exact_zero"] == pytest.approx(float((h == 0).float().mean()))
        assert gates[name]["negative_input"] == pytest.approx(float((pre < 0).float().mean()))
        assert gates[name]["dead_units"] == int((h != 0).sum(0).eq(0).sum())
    gelu_gates = report["sparsity"]["models"]["gelu"]["gates"]
    assert [g["kind"] for g in gelu_gates] == ["gelu", "gelu"]
    assert all(g["near_zero"] < 0.05 for g in gelu_gates)  # GELU is (almost) never exactly zero


def test_missing_extras_are_skipped_with_a_reason(tiny: dict[str, Path], split, monkeypatch, tmp_path) -> None:
    for module in ("maraboupy", "torchao", "onnxscript"):
        monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to import
    assert missing_extra("verify").startswith("skipped: the verify extra is not installed")
    subjects = load_subjects(tiny["relu"])  # a ReLU checkpoint alone: a one-column report
    result = run_check(subjects, split, tmp_path, CheckConfig(points=1, latency_repeats=1))
    assert list(result["models"]) == ["relu"]
    assert result["onnx"]["status"].startswith("skipped: the onnx extra")
    assert result["quantization"]["status"].startswith("skipped: the quant extra")
    assert result["verification"]["status"].startswith("skipped: the verify extra")
    assert result["sparsity"]["status"] == "ok"
    assert "skipped: the verify extra is not installed" in render_markdown(result)


def test_subjects_from_a_gelu_checkpoint_and_a_run_folder(tiny: dict[str, Path], tmp_path: Path) -> None:
    gelu_only = load_subjects(tiny["gelu"])
    assert [s.key for s in gelu_only] == ["gelu", "relu"]
    assert not any(isinstance(m, nn.GELU) for m in gelu_only[1].model.modules())
    with pytest.raises(CheckUsageError, match="--gelu"):
        load_subjects(tiny["gelu"], tiny["gelu"])
    run = tmp_path / "run"
    for name in ("gelu", "relu"):
        model, header = load_checkpoint(tiny[name])
        save_checkpoint(run / "checkpoints" / f"{name}.safetensors", model, header["model"], header["model_kwargs"],
                        header["metadata"])
    from_folder = load_subjects(run)
    assert [(s.key, Path(s.source).name) for s in from_folder] == [("gelu", "gelu.safetensors"),
                                                                     ("relu", "relu.safetensors")]


@pytest.mark.parametrize("case", ["missing checkpoint", "existing out", "negative epsilon"])
def test_bad_input_is_one_line_and_exit_2(case: str, tiny: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["check", str(tiny["relu"]), "--out", str(out), "--no-progress"]
    if case == "missing checkpoint":
        args[1] = str(tmp_path / "nope.safetensors")
    elif case == "existing out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        args += ["--epsilon", "-0.1"]
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as stop:  # argparse refuses --epsilon -0.1 itself
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lambda-gelu check: error:") and "\n" not in err
    if case == "existing out":
        assert (out / "keep.txt").read_text() == "mine" and "--force" in err
    else:
        assert not out.exists()

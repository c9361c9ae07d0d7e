"""save_checkpoint / load_checkpoint: round trips for every gate layout, and every way a file can be bad."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lambda_gelu import LambdaGELU, convert, relufy
from lambda_gelu.checkpoint import METADATA_KEY, CheckpointError, load_checkpoint, read_header, save_checkpoint
from lambda_gelu.models import MLP

KWARGS = {"in_features": 8, "num_classes": 3, "hidden": [6, 5], "activation": "gelu"}
X = torch.randn(7, 8)


def _lambda_model(learnable=True, approximate="none"):
    torch.manual_seed(2)
    model = MLP(**{**KWARGS, "activation": "gelu_tanh" if approximate == "tanh" else "gelu"})
    convert(model, patterns="blocks.0.act", learnable=learnable)
    convert(model, patterns="blocks.1.act", num_channels=5, learnable=learnable)
    model.blocks[0].act.set_lambda_(3.5)
    model.blocks[1].act.set_lambda_([1.0, 2.0, 30.0, 400.0, 1e6])
    return model


def _save(tmp_path, model, kwargs=None, metadata=None, name="ckpt.safetensors"):
    return save_checkpoint(tmp_path / name, model, "mlp", kwargs or KWARGS, metadata)


def _edit(path, edit_tensors=None, edit_header=None):
    """Rewrite a checkpoint with changed tensors and/or header, keeping the rest."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        header = json.loads(metadata[METADATA_KEY])
        edit_header(header)
        metadata[METADATA_KEY] = json.dumps(header)
    save_file(tensors, str(path), metadata=metadata)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(("learnable", "approximate"), [(True, "none"), (False, "none"), (True, "tanh")])
def test_round_trip_lambda_gelu_layout(tmp_path, learnable, approximate):
    model = _lambda_model(learnable, approximate)
    kwargs = {**KWARGS, "activation": "gelu_tanh" if approximate == "tanh" else "gelu"}
    path = _save(tmp_path, model, kwargs, metadata={"seed": 3, "accuracy": 91.5})
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temporary file left behind

    loaded, header = load_checkpoint(path)
    assert header["model"] == "mlp" and header["model_kwargs"] == kwargs
    assert header["metadata"] == {"seed": 3, "accuracy": 91.5}
    assert not loaded.training
    for i, channels in enumerate([None, 5]):
        act = loaded.blocks[i].act
        assert isinstance(act, LambdaGELU)
        assert act.num_channels == channels and act.learnable == learnable and act.approximate == approximate
        torch.testing.assert_close(act.lam, model.blocks[i].act.lam, atol=0, rtol=0)
    assert list(loaded.state_dict()) == list(model.state_dict())
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    assert read_header(path) == header


def test_round_trip_relu_layout(tmp_path):
    model = _lambda_model()
    relufy(model)
    path = _save(tmp_path, model)
    loaded, header = load_checkpoint(path)
    assert header["layout"]["blocks.0.act"] == {"kind": "relu"}
    assert all(isinstance(b.act, nn.ReLU) for b in loaded.blocks)
    assert not any(isinstance(m, LambdaGELU) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_round_trip_plain_gelu_and_overwrite(tmp_path):
    model = MLP(**KWARGS)
    path = _save(tmp_path, model)
    other = _lambda_model()
    _save(tmp_path, other)  # overwrite in place
    loaded, header = load_checkpoint(path)
    assert header["layout"]["blocks.0.act"]["kind"] == "lambda_gelu"
    with torch.no_grad():
        assert torch.equal(loaded(X), other.eval()(X))
    assert len(list(tmp_path.iterdir())) == 1


# ---------------------------------------------------------------- errors


def _assert_error(path, *needles):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message
    return message


def test_missing_file(tmp_path):
    _assert_error(tmp_path / "nope.safetensors", "no such")
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("keep", [0, 4, 12, 100, 0.5, -1])
def test_truncated_file(tmp_path, keep):
    path = _save(tmp_path, _lambda_model())
    data = path.read_bytes()
    size = {0.5: len(data) // 2, -1: len(data) - 1}.get(keep, keep)
    path.write_bytes(data[:size])
    _assert_error(path)


@pytest.mark.parametrize(
    "content",
    [b"this is not a safetensors file at all, just text\n", b"\x00" * 64, b"PK\x03\x04" + b"\x00" * 200],
)
def test_not_safetensors(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    _assert_error(path)


def test_torch_pickle_is_rejected(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(_lambda_model().state_dict(), path)
    _assert_error(path)


def test_safetensors_without_our_header(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in _lambda_model().state_dict().items()}, str(path))
    _assert_error(path, "not a lambda-gelu checkpoint")


@pytest.mark.parametrize(
    ("key", "value", "layer"),
    [
        ("blocks.0.act.log_lam", torch.tensor([float("nan")]), "blocks.0.act"),
        ("blocks.0.act.log_lam", torch.tensor([float("inf")]), "blocks.0.act"),
        ("blocks.1.act.log_lam", torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0]), "blocks.1.act"),
    ],
)
def test_non_finite_lambda(tmp_path, key, value, layer):
    path = _save(tmp_path, _lambda_model())

    def edit(tensors):
        tensors[key] = value

    _edit(path, edit_tensors=edit)
    _assert_error(path, layer, "non-finite")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("blocks.0.fc.weight", torch.zeros(7, 8)),
        ("blocks.1.act.log_lam", torch.zeros(())),
        ("blocks.0.act.log_lam", torch.zeros(3)),
    ],
)
def test_wrong_shape(tmp_path, key, value):
    path = _save(tmp_path, _lambda_model())

    def edit(tensors):
        tensors[key] = value

    _edit(path, edit_tensors=edit)
    _assert_error(path, key, "shape")


@pytest.mark.parametrize("change", ["drop", "extra"])
def test_missing_or_unexpected_tensor(tmp_path, change):
    path = _save(tmp_path, _lambda_model())

    def edit(tensors):
        if change == "drop":
            del tensors["head.bias"]
        else:
            tensors["head.extra"] = torch.zeros(2)

    _edit(path, edit_tensors=edit)
    _assert_error(path, "head.bias" if change == "drop" else "head.extra")


@pytest.mark.parametrize(
    ("edit_header", "needle"),
    [
        (lambda h: h.update(format_version=99), "format"),
        (lambda h: h.update(model="transformer"), "transformer"),
        (lambda h: h["model_kwargs"].update(hidden=[6, 7]), "shape"),
        (lambda h: h["layout"].update({"blocks.9.act": {"kind": "relu"}}), "blocks.9.act"),
        (lambda h: h["layout"]["blocks.0.act"].update(kind="swish"), "swish"),
    ],
)
def test_bad_header(tmp_path, edit_header, needle):
    path = _save(tmp_path, _lambda_model())
    _edit(path, edit_header=edit_header)
    _assert_error(path, needle)


# ---------------------------------------------------------------- checkpoints of 0.1

V01 = Path(__file__).parent / "data" / "v0.1-mlp.safetensors"
"""Written by lambda-gelu 0.1.0 (λ stored as log(λ − 1)): a per-layer λ of 2.5 and per-channel λ
1 (0.1's floor 1 + 1e-4), 1.5, 3, 40, 1e6, with a batch and the outputs 0.1 computed for it."""


def test_a_checkpoint_of_0_1_loads_with_lambda_one_exact():
    raw = load_file(str(V01))
    assert "blocks.0.act.log_lam_minus_1" in raw and raw["blocks.0.act.log_lam_minus_1"].shape == ()
    model, header = load_checkpoint(V01)
    assert header["format_version"] == 1
    assert model.blocks[0].act.log_lam.shape == (1,)
    assert model.blocks[0].act.lam.item() == pytest.approx(2.5, rel=1e-6)
    lam = model.blocks[1].act.lam
    assert lam[0].item() == 1.0  # 0.1's floor is λ = 1 exactly now
    torch.testing.assert_close(lam[1:], torch.tensor([1.5, 3.0, 40.0, 1e6]), rtol=1e-5, atol=0)
    x, y = (torch.tensor(header["metadata"][k]) for k in ("x", "y"))
    # 0.1 computed with λ = 1 + 1e-4 where today's is 1: within 2.94e-5 per unit of the next layer's weights
    torch.testing.assert_close(model(x), y, atol=1e-4, rtol=0)


def test_a_state_dict_of_0_1_loads_into_a_module():
    old = {k: v for k, v in load_file(str(V01)).items() if k.startswith("blocks.1.act.")}
    gate = LambdaGELU(num_channels=5)
    gate.load_state_dict({k.removeprefix("blocks.1.act."): v for k, v in old.items()})
    torch.testing.assert_close(gate.lam, torch.tensor([1.0, 1.5, 3.0, 40.0, 1e6]), rtol=1e-5, atol=0)
    scalar = LambdaGELU()
    scalar.load_state_dict({"log_lam_minus_1": torch.tensor(0.0)})  # 0-d, λ = 1 + e^0 = 2
    assert scalar.lam.item() == pytest.approx(2.0, rel=1e-6) and scalar.log_lam.shape == (1,)
    with pytest.raises(RuntimeError, match="non-finite"):
        scalar.load_state_dict({"log_lam_minus_1": torch.tensor(float("nan"))})
    assert scalar.lam.item() == pytest.approx(2.0, rel=1e-6)  # unchanged


def test_a_checkpoint_written_today_is_format_2_and_round_trips(tmp_path):
    model, _ = load_checkpoint(V01)
    path = save_checkpoint(tmp_path / "m.safetensors", model, "mlp", {"in_features": 8, "num_classes": 3,
                                                                      "hidden": [6, 5], "activation": "lambda_gelu"})
    assert read_header(path)["format_version"] == 2
    assert load_file(str(path))["blocks.0.act.log_lam"].shape == (1,)
    again, _ = load_checkpoint(path)
    x = torch.randn(7, 8)
    torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)

"""The model zoo: output shapes, gate names, conversion both ways, causality, and that each model learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lambda_gelu import LambdaGELU, convert, relufy
from lambda_gelu.checkpoint import load_checkpoint, save_checkpoint
from lambda_gelu.models import MODELS, build_model, model_kwargs_for

# (name, kwargs, input, expected output shape, expected gate names)
CASES = [
    ("mlp", {"in_features": 12, "num_classes": 5, "hidden": [16, 16]}, lambda: torch.randn(6, 12), (6, 5),
     ["blocks.0.act", "blocks.1.act"]),
    ("resnet", {"num_classes": 5, "dims": 1, "widths": [4, 8]}, lambda: torch.randn(6, 40), (6, 5),
     ["stem.act", "blocks.0.act1", "blocks.0.act2", "blocks.1.act1", "blocks.1.act2"]),
    ("resnet", {"num_classes": 5, "dims": 2, "widths": [4, 8], "stem_stride": 2},
     lambda: torch.randn(6, 1, 28, 28), (6, 5),
     ["stem.act", "blocks.0.act1", "blocks.0.act2", "blocks.1.act1", "blocks.1.act2"]),
    ("vit", {"num_classes": 5, "dim": 16, "depth": 2, "heads": 2}, lambda: torch.randn(6, 1, 28, 28), (6, 5),
     ["blocks.0.mlp.act", "blocks.1.mlp.act"]),
    ("gpt", {"vocab_size": 11, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16},
     lambda: torch.randint(0, 11, (6, 16)), (6, 16, 11), ["blocks.0.mlp.act", "blocks.1.mlp.act"]),
]
IDS = ["mlp", "resnet1d", "resnet2d", "vit", "gpt"]


def _gates(model: nn.Module, kind: type[nn.Module]) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, kind)]


def test_registry_holds_the_zoo():
    assert {"mlp", "resnet", "vit", "gpt"} <= set(MODELS)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("transformer-xl")


@pytest.mark.parametrize(("name", "kwargs", "make_x", "shape", "gates"), CASES, ids=IDS)
def test_shapes_and_gate_names(name, kwargs, make_x, shape, gates):
    model = build_model(name, **kwargs).eval()
    assert tuple(model(make_x()).shape) == shape
    assert _gates(model, nn.GELU) == gates
    assert _gates(build_model(name, **kwargs, activation="lambda_gelu"), LambdaGELU) == gates
    assert _gates(build_model(name, **kwargs, activation="relu"), nn.ReLU) == gates


@pytest.mark.parametrize(("name", "kwargs", "make_x", "shape", "gates"), CASES, ids=IDS)
def test_convert_then_relufy_round_trip(name, kwargs, make_x, shape, gates):
    """λ = 1 reproduces the GELU model; at λ = 1e6 the λ-GELU model equals its ReLU copy."""
    model = build_model(name, **kwargs).eval()
    x = make_x()
    reference = model(x)
    assert convert(model) == gates
    assert torch.allclose(model(x), reference, atol=1e-3)
    for gate in model.modules():
        if isinstance(gate, LambdaGELU):
            gate.set_lambda_(1e6)
    hard = model(x)
    assert relufy(model) == gates
    assert torch.allclose(model(x), hard, atol=1e-4)


@pytest.mark.parametrize(("name", "kwargs", "make_x", "shape", "gates"), CASES, ids=IDS)
def test_each_model_learns(name, kwargs, make_x, shape, gates):
    """A few AdamW steps on one fixed batch lower the loss clearly (λ-GELU gates, λ learning too).

    Classifiers memorize random labels; the language model learns next token = token + 1.
    """
    torch.manual_seed(0)
    model = build_model(name, **kwargs, activation="lambda_gelu")
    x = make_x()
    y = (x + 1) % shape[-1] if name == "gpt" else torch.randint(0, shape[-1], shape[:-1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_gpt_is_causal():
    model = build_model("gpt", vocab_size=7, block_size=12, n_layer=2, n_head=2, n_embd=8).eval()
    x = torch.randint(0, 7, (2, 12))
    changed = x.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 7
    assert torch.equal(model(x)[:, :8], model(changed)[:, :8])
    assert not torch.allclose(model(x)[:, 8:], model(changed)[:, 8:])


def test_gpt_rejects_a_sequence_longer_than_its_context():
    model = build_model("gpt", vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="dims"):
        build_model("resnet", num_classes=3, dims=3)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_model("vit", num_classes=3, image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="divisible"):
        build_model("gpt", vocab_size=5, n_embd=10, n_head=3)


def test_resnet_batchnorm_uses_batch_statistics_in_training_only():
    model = build_model("resnet", num_classes=3, dims=1, widths=[4])
    x = torch.randn(8, 40)
    model.train()
    model(x)
    assert model.stem.bn.num_batches_tracked.item() == 1
    model.eval()
    assert torch.allclose(model(x[:1]), model(x)[:1], atol=1e-6)  # eval: no dependence on the rest of the batch
    model.train()
    assert not torch.allclose(model(x[:2])[:1], model(x)[:1], atol=1e-4)  # training: batch statistics


@pytest.mark.parametrize(("name", "kwargs", "make_x", "shape", "gates"), CASES, ids=IDS)
def test_checkpoint_round_trip(tmp_path, name, kwargs, make_x, shape, gates):
    model = build_model(name, **kwargs)
    convert(model, init=2.5)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, name, kwargs, {})
    loaded, _ = load_checkpoint(path)
    x = make_x()
    model.eval()
    assert torch.equal(loaded(x), model(x))


def test_model_kwargs_for_fits_models_to_data():
    assert model_kwargs_for("mlp", (1, 28, 28), 10)["in_features"] == 784
    assert model_kwargs_for("resnet", (40,), 10)["dims"] == 1
    assert model_kwargs_for("resnet", (1, 28, 28), 10) == {"num_classes": 10, "dims": 2, "in_channels": 1}
    assert model_kwargs_for("vit", (1, 28, 28), 10)["patch_size"] == 7
    assert model_kwargs_for("gpt", (64,), 76, sequence=True) == {"vocab_size": 76, "block_size": 64}
    with pytest.raises(ValueError, match="language model"):
        model_kwargs_for("mlp", (64,), 76, sequence=True)
    with pytest.raises(ValueError, match="language model"):
        model_kwargs_for("gpt", (64,), 10)
    with pytest.raises(ValueError, match="square"):
        model_kwargs_for("vit", (64,), 10)

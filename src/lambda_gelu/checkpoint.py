"""Checkpoints: weights in safetensors, the model's recipe and run metadata as JSON in its header.

A checkpoint is one ``.safetensors`` file. Its header metadata holds, under the
key ``lambda_gelu``, a JSON object with the model's registry name and keyword
arguments, the activation at every gate (so that a LambdaGELU or ReLU layout is
rebuilt exactly), and free-form run metadata (data set, seed, metrics). Files
are written to a temporary name, fsync'ed and renamed, so a crash never
leaves a half-written checkpoint in place of a good one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lambda_gelu.convert import gelu_approximation, replace_modules
from lambda_gelu.models import build_model
from lambda_gelu.module import LambdaGELU

FORMAT_VERSION = 1
METADATA_KEY = "lambda_gelu"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model it describes."""


def activation_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The kind and settings of every gate (LambdaGELU, GELU family, ReLU), by qualified name."""
    layout: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LambdaGELU):
            layout[name] = {
                "kind": "lambda_gelu",
                "num_channels": module.num_channels,
                "channel_dim": module.channel_dim,
                "approximate": module.approximate,
                "learnable": module.learnable,
            }
        elif isinstance(module, nn.ReLU):
            layout[name] = {"kind": "relu"}
        elif (approximate := gelu_approximation(module)) is not None:
            layout[name] = {"kind": "gelu", "approximate": approximate}
    return layout


def _make_gate(spec: dict[str, Any]) -> nn.Module:
    kind = spec.get("kind")
    if kind == "lambda_gelu":
        return LambdaGELU(
            num_channels=spec.get("num_channels"),
            channel_dim=int(spec.get("channel_dim", -1)),
            approximate=spec.get("approximate", "none"),
            learnable=bool(spec.get("learnable", True)),
        )
    if kind == "relu":
        return nn.ReLU()
    if kind == "gelu":
        return nn.GELU(approximate=spec.get("approximate", "none"))
    raise CheckpointError(f"unknown gate kind {kind!r}")


def apply_layout(model: nn.Module, layout: dict[str, dict[str, Any]]) -> None:
    """Put the gate described by ``layout`` at each named position of ``model`` (in place)."""
    present = {name for name, _ in model.named_modules()}
    missing = sorted(set(layout) - present)
    if missing:
        raise CheckpointError(f"the model has no module named {missing[:3]}")
    replace_modules(model, lambda _m, name: name in layout, lambda _m, name: _make_gate(layout[name]))


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_name: str,
    model_kwargs: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (built as ``build_model(model_name, **model_kwargs)``) to ``path`` atomically."""
    path = Path(path)
    header = {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "model_kwargs": model_kwargs,
        "layout": activation_layout(model),
        "metadata": metadata or {},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(header)})
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a checkpoint (without loading the weights)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size <= 0 or size > 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file")
            raw = json.loads(handle.read(size))
        header = json.loads(raw["__metadata__"][METADATA_KEY])
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: not a lambda-gelu checkpoint ({type(error).__name__})") from None
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {header.get('format_version')!r}")
    return header


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path``; returns ``(model, header)``.

    Everything is checked before the model is returned: the file's integrity,
    the architecture (no missing or unexpected tensor, every shape), and every
    λ (finite, >= 1); errors name the file and the layer.
    """
    path = Path(path)
    header = read_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable weights ({error})") from None
    try:
        model = build_model(header["model"], **header["model_kwargs"])
        apply_layout(model, header["layout"])
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot rebuild the model ({error})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not fit {header['model']}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensors[key].shape)}, the model needs {tuple(value.shape)}"
            )
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: {str(error).splitlines()[-1].strip()}") from None
    return model.to(device).eval(), header

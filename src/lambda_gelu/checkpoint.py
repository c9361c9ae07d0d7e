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
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lambda_gelu.convert import replace_modules
from lambda_gelu.gates import lambda_layers
from lambda_gelu.gelu_types import gelu_approximation
from lambda_gelu.models import build_model
from lambda_gelu.module import RAW_KEY, LambdaGELU, lambda_state_problem, upgrade_lambda_state
from lambda_gelu.outputs import atomic_write

FORMAT_VERSION = 2
"""2: λ stored as log λ (key ``log_lam``, one layer's λ of shape (1,)).
1 (lambda-gelu 0.1): log(λ − 1), converted on load."""
READABLE_VERSIONS = (1, 2)
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
    return write_safetensors(path, tensors, {METADATA_KEY: json.dumps(header)})


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically (:func:`lambda_gelu.outputs.atomic_write`)."""
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def check_fields(path: str | Path, record: Any, fields: dict[str, type], what: str, where: str = "") -> None:
    """CheckpointError naming ``path`` and the field unless ``record`` is a dict holding ``fields`` of their types.

    ``what`` names the kind of file ("checkpoint", "run state"), ``where`` the record inside its header.
    """
    prefix = f"{where}." if where else ""
    if not isinstance(record, dict):
        field = f"field '{where}'" if where else "header"
        raise CheckpointError(f"{path}: the {what}'s {field} is {type(record).__name__}, not an object")
    for name, kind in fields.items():
        if name not in record:
            raise CheckpointError(f"{path}: the {what} has no field '{prefix}{name}'")
        value = record[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{path}: the {what}'s field '{prefix}{name}' is {type(value).__name__}, "
                                  f"expected {kind.__name__}")


HEADER_FIELDS = {"format_version": int, "model": str, "model_kwargs": dict, "layout": dict, "metadata": dict}
"""A checkpoint header's fields and their JSON types."""


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
    check_fields(path, header, {"format_version": int}, "checkpoint")
    if header["format_version"] not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: unsupported checkpoint format {header['format_version']!r}")
    check_fields(path, header, HEADER_FIELDS, "checkpoint")
    for name, spec in header["layout"].items():
        check_fields(path, spec, {"kind": str}, "checkpoint", f"layout.{name}")
    return header


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path``; returns ``(model, header)``.

    Everything is checked before the model is returned: the file's integrity,
    the architecture (no missing or unexpected tensor, every shape), every
    λ (finite, >= 1) and every weight finite; errors name the file and the tensor.
    """
    path = Path(path)
    header = read_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable weights ({error})") from None
    tensors = upgrade_lambda_state(tensors)  # format 1's log(λ − 1) → log λ
    try:
        model = build_model(header["model"], **header["model_kwargs"])
        apply_layout(model, header["layout"])
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot rebuild the model ({error})") from None
    check_weights(path, model, tensors, finite=True)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: {str(error).splitlines()[-1].strip()}") from None
    return model.to(device).eval(), header


def check_weights(path: str | Path, model: nn.Module, tensors: dict[str, torch.Tensor], finite: bool = False) -> None:
    """Raise CheckpointError (naming ``path`` and the tensor) unless ``tensors`` fit ``model`` exactly.

    Checks: no missing or unexpected tensor, every shape, every λ finite and at
    most 1e6 (λ = exp(clamp(ρ, 0, ·)) is below 1 for no ρ), and with ``finite``
    every floating-point tensor finite. Nothing is loaded.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not fit {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensors[key].shape)}, the model needs {tuple(value.shape)}"
            )
    for name in lambda_layers(model):
        raw = tensors[f"{name}.{RAW_KEY}" if name else RAW_KEY]
        if (problem := lambda_state_problem(raw, tuple(raw.shape))) is not None:
            raise CheckpointError(f"{path}: layer {name or '<root>'}: {problem}")
    if finite:
        for key, value in tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{path}: {key} holds non-finite values")

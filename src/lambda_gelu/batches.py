"""Batches of any format: how the model runs on one, how it moves, how it is cut between processes.

A batch is whatever a user's DataLoader yields: a tensor, an ``(input,
target, ...)`` tuple or list, or a mapping of tensors (a tokenizer's or an
image processor's output). :func:`default_forward` runs a model on one;
every piece of the library that runs the model on data takes a ``forward``
argument of the same shape, so a model with another calling convention needs
one small function, not a wrapper module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

Forward = Callable[[nn.Module, Any], Any]
"""``forward(model, batch)``: runs the model on one batch and returns its output."""


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch: ``model(**batch)`` for a mapping (a tokenizer's output),
    ``model(batch[0])`` for an (input, target) tuple or list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def move_to(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor in it (mappings, tuples, lists) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(value, device) for value in batch)
    return batch


def batch_rows(batch: Any) -> int:
    """The number of examples in ``batch``: the leading size of its first tensor (0 if it holds none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        rows = batch_rows(value)
        if rows:
            return rows
    return 0


def take_rows(batch: Any, index: int, parts: int) -> Any:
    """Part ``index`` of ``parts`` of every tensor in ``batch`` along dim 0 (``tensor_split``: sizes differ by <= 1)."""
    if isinstance(batch, torch.Tensor):
        return batch.tensor_split(parts)[index] if batch.dim() else batch
    if isinstance(batch, Mapping):
        return {key: take_rows(value, index, parts) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(take_rows(value, index, parts) for value in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (or buffer) lives; the CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")

"""Activation sparsity: how often each gate outputs zero on real data."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lambda_gelu.checkpoint import activation_layout
from lambda_gelu.gates import preserved_modes

NEAR_ZERO = 1e-6
"""|output| below this counts as "near zero" (the GELU family is exactly zero only at x = 0 and on underflow)."""


@dataclass(frozen=True)
class GateSparsity:
    """One gate on a data set: fractions of exact-zero outputs, of |y| < NEAR_ZERO, of negative inputs
    (the zeros a ReLU in its place would give), and the units that were never active."""

    name: str
    kind: str
    values: int
    exact_zero: float
    near_zero: float
    negative_input: float
    units: int
    dead_units: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return asdict(self)


CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
"""Modules whose outputs are feature maps (N, C, ...): a gate after one of them has a unit per channel."""


def _unit_dims(model: nn.Module, gates: list[str]) -> dict[str, int]:
    """For each gate, the dim of its output that indexes units: 1 after a conv/BatchNorm, else the last."""
    dims, last = {}, -1
    for name, module in model.named_modules():
        if isinstance(module, CHANNEL_FIRST):
            last = 1
        elif isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding)):
            last = -1
        if name in gates:
            dims[name] = last
    return dims


def _units(output: torch.Tensor, dim: int) -> torch.Tensor:
    """(rows, units) view of a gate's output, the units along ``dim``."""
    if output.dim() <= 2:
        return output.reshape(-1, output.shape[-1])
    return output.movedim(dim, -1).reshape(-1, output.shape[dim])


@torch.no_grad()
def activation_sparsity(model: nn.Module, batches: Iterable[Any], near_zero: float = NEAR_ZERO) -> list[GateSparsity]:
    """Per-gate sparsity of ``model`` (eval mode) over the inputs of ``(input, target)`` batches.

    Gates are the modules ``activation_layout`` knows (ReLU, GELU family,
    LambdaGELU). A unit is a feature, or a channel where the gate follows a
    convolution or BatchNorm; it is dead when it is exactly zero on every
    input seen.
    """
    layout = activation_layout(model)
    unit_dims = _unit_dims(model, list(layout))
    modules = dict(model.named_modules())
    counts = {name: {"values": 0, "exact": 0, "near": 0, "negative": 0, "alive": None} for name in layout}

    def hook(name: str):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            out = output.detach().float()
            entry = counts[name]
            entry["values"] += out.numel()
            entry["exact"] += int((out == 0).sum())
            entry["near"] += int((out.abs() < near_zero).sum())
            entry["negative"] += int((inputs[0].detach() < 0).sum())
            alive = (_units(out, unit_dims[name]) != 0).any(0)
            entry["alive"] = alive if entry["alive"] is None else entry["alive"] | alive

        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in layout]
    try:
        with preserved_modes(model, training=False):
            for x, _ in batches:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for name, spec in layout.items():
        entry = counts[name]
        if entry["values"] == 0:
            continue  # a gate the forward pass never reached
        alive = entry["alive"]
        rows.append(GateSparsity(
            name=name,
            kind=spec["kind"],
            values=entry["values"],
            exact_zero=entry["exact"] / entry["values"],
            near_zero=entry["near"] / entry["values"],
            negative_input=entry["negative"] / entry["values"],
            units=int(alive.numel()),
            dead_units=int((~alive).sum()),
        ))
    return rows

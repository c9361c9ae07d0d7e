"""Swap + affine fold: GELU(x_c) ≈ a_c·ReLU(x_c) + b_c per channel, folded exactly into the Linear that reads it.

Most of what a direct GELU → ReLU swap costs is a per-channel shift and scale:
E[GELU(x) − ReLU(x)] pushed through the next layer's weights. For each gate
whose output is read by exactly one ``nn.Linear`` (and by nothing else), the
least-squares fit on calibration data

    a_c = Cov(ReLU(x_c), GELU(x_c)) / Var(ReLU(x_c)),   b_c = E[GELU(x_c)] − a_c·E[ReLU(x_c)]

is folded into that Linear: W·(a ⊙ r + b) + β = (W·diag(a))·r + (β + W·b), which
is exact for that reader. The gate then becomes ``nn.ReLU``. This is the
``swap-fold-distill`` baseline's first half; gates read by no Linear, by
several, or by one without a bias are swapped unfolded. Only Linear readers are
seen: a gate output that also feeds a residual sum gets the fold on its Linear
path only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lambda_gelu.batches import model_device, move_to
from lambda_gelu.convert import relufy
from lambda_gelu.gates import activation_layers, materialize_function_gates, preserved_modes


@dataclass
class _Moments:
    """Per-channel sums of r = ReLU(x), g = gate(x), r², r·g over the calibration rows."""

    n: int = 0
    r: torch.Tensor | None = None
    g: torch.Tensor | None = None
    rr: torch.Tensor | None = None
    rg: torch.Tensor | None = None

    def add(self, x: torch.Tensor, gate_out: torch.Tensor) -> None:
        rows_x = x.detach().double().reshape(-1, x.shape[-1])
        r, g = rows_x.clamp(min=0), gate_out.detach().double().reshape(-1, x.shape[-1])
        sums = (r.sum(0), g.sum(0), (r * r).sum(0), (r * g).sum(0))
        if self.r is None:
            self.r, self.g, self.rr, self.rg = (s.cpu() for s in sums)
        else:
            self.r, self.g, self.rr, self.rg = (old + s.cpu() for old, s in zip(
                (self.r, self.g, self.rr, self.rg), sums, strict=True))
        self.n += rows_x.shape[0]

    def fit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of the least-squares fit gate ≈ a·ReLU + b, per channel (a = 1 where ReLU never varies)."""
        n = max(self.n, 1)
        mean_r, mean_g = self.r / n, self.g / n
        var_r = self.rr / n - mean_r * mean_r
        cov = self.rg / n - mean_r * mean_g
        varies = var_r > 1e-12 * (self.rr / n).clamp(min=1e-30)
        a = torch.where(varies, cov / var_r.clamp(min=1e-30), torch.ones_like(var_r))
        return a, mean_g - a * mean_r


@dataclass
class AffineFold:
    """What :func:`swap_fold_` did: each gate's consumer and fit, and the gates swapped without a fold."""

    folded: dict[str, str]
    unfolded: list[str]
    fits: dict[str, tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def swap_fold_(model: nn.Module, calibration: Iterable[Any], run: Callable[[nn.Module, Any], Any],
               example: Any = None) -> AffineFold:
    """Swap every GELU-family gate of ``model`` for ReLU, folding each one's affine fit into its sole Linear reader.

    ``run(model, batch)`` runs the model on one calibration batch. ``example``
    (as for :func:`lambda_gelu.relufy`) proves the result ReLU.
    """
    materialize_function_gates(model)
    gates = activation_layers(model)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    moments = {name: _Moments() for name in gates}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # held for the batch, so that no id is reused
    readers: dict[str, set[str]] = {name: set() for name in gates}
    handles = []
    for name, gate in gates.items():
        def hook(_m: nn.Module, inputs: tuple, out: torch.Tensor, name: str = name) -> None:
            moments[name].add(inputs[0], out)
            outputs[id(out)] = (name, out)
        handles.append(gate.register_forward_hook(hook))
    for lname, linear in linears.items():
        def pre(_m: nn.Module, inputs: tuple, lname: str = lname) -> None:
            source = outputs.get(id(inputs[0]))
            if source is not None and source[1] is inputs[0]:
                readers[source[0]].add(lname)
        handles.append(linear.register_forward_pre_hook(pre))
    device = model_device(model)
    try:
        with preserved_modes(model, training=False):
            for batch in calibration:
                outputs.clear()
                run(model, move_to(batch, device))
    finally:
        for handle in handles:
            handle.remove()
    folded, fits = {}, {}
    for name in gates:
        a, b = moments[name].fit()
        fits[name] = (a, b)
        reader = readers[name]
        if len(reader) != 1 or not _sole_use(model, name):
            continue
        (lname,) = reader
        linear = linears[lname]
        if linear.in_features != a.numel() or linear.bias is None:
            continue  # a Linear without a bias has nowhere to keep W·b (an added one would be lost on reload)
        weight = linear.weight
        shift = weight.double() @ b.to(weight.device)
        weight.mul_(a.to(weight.device, weight.dtype))  # W·diag(a): scale input column c by a_c
        linear.bias.add_(shift.to(linear.bias.dtype))
        folded[name] = lname
    relufy(model, include_gelu=True, example=example)
    return AffineFold(folded, [n for n in gates if n not in folded], fits)


def _sole_use(model: nn.Module, name: str) -> bool:
    """True if the gate module is reachable under one name only (a shared module feeds several readers)."""
    target = dict(model.named_modules(remove_duplicate=False))
    count = sum(1 for n, m in model.named_modules(remove_duplicate=False) if m is target[name])
    return count == 1


"""Calibration: each activation layer's pre-activations, its discrepancy from ReLU, and its target λ*.

The discrepancy of a layer at hardness λ, on its own pre-activations x, is

    D(λ) = E[(f(x; λ) − ReLU(x))²] / E[ReLU(x)²],

the relative mean-square change of the layer's output if its gate were swapped
for ReLU. |f(x; λ) − ReLU(x)| = |x|·Φ(−λ|x|) (tanh form: |x|·σ(−2|u|)), which
falls with λ for every x, so D is strictly decreasing and the target

    λ* = min{λ >= 1 : D(λ) <= τ}

is found by bisection in log λ. For x ~ N(0, σ²), D ≈ 0.05/(λσ)³.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lambda_gelu import distributed
from lambda_gelu.batches import Forward, default_forward, model_device, move_to
from lambda_gelu.gates import activation_layers, layer_approximation, preserved_modes
from lambda_gelu.module import LAMBDA_MAX, LambdaGELU
from lambda_gelu.ops import _TANH_A, _TANH_C, _normal_cdf

DEFAULT_TAU = 1e-5
DEFAULT_MAX_VALUES = 1 << 18


def _rows(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Pre-activations as rows: (n,) for a per-layer λ, (n, C) for a per-channel λ."""
    channels = getattr(module, "num_channels", None)
    if channels is None:
        return x.detach().reshape(-1)
    return x.detach().movedim(module.channel_dim, -1).reshape(-1, channels)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    max_values: int = DEFAULT_MAX_VALUES,
    max_batches: int | None = None,
    seed: int = 0,
    gather: bool | None = None,
    forward: Forward | None = None,
) -> dict[str, torch.Tensor]:
    """Collect each activation layer's pre-activations over ``batches``.

    Forward hooks on every LambdaGELU and GELU-family layer record their
    inputs; a seeded reservoir keeps a uniform sample of at most
    ``max_values`` values per layer (whole rows for per-channel layers), on
    the CPU in float32. ``batches`` yields batches of any format, each run by
    ``forward(model, batch)`` (default :func:`lambda_gelu.batches.default_forward`:
    ``model(x)`` for a tensor or an ``(x, y)`` tuple, ``model(**batch)`` for a
    mapping). The model runs in eval mode; every submodule's own mode is
    restored after.

    Returns ``{layer name: samples}``, samples of shape (n,) or (n, C).

    Under torch.distributed (``gather`` None means: when a process group of
    more than one process is active) every rank passes its own batches, and
    the ranks' reservoirs are gathered and merged by the same smallest-key rule,
    so every rank returns the same samples (all ranks must call this together).
    """
    gather = distributed.is_active() if gather is None else gather
    layers = activation_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LambdaGELU or GELU layer to calibrate")
    generator = torch.Generator().manual_seed(seed + (1_000_003 * distributed.rank() if gather else 0))
    kept: dict[str, torch.Tensor] = {}
    keys: dict[str, torch.Tensor] = {}

    def hook_for(name: str, module: nn.Module):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
            rows = _rows(inputs[0], module).float().cpu()
            capacity = max(1, max_values // (rows.shape[1] if rows.ndim == 2 else 1))
            new_keys = torch.rand(rows.shape[0], generator=generator)
            rows = torch.cat([kept[name], rows]) if name in kept else rows
            all_keys = torch.cat([keys[name], new_keys]) if name in keys else new_keys
            if rows.shape[0] > capacity:  # reservoir: keep the rows with the smallest keys
                index = all_keys.topk(capacity, largest=False).indices
                rows, all_keys = rows[index], all_keys[index]
            kept[name], keys[name] = rows, all_keys

        return hook

    handles = [m.register_forward_hook(hook_for(n, m)) for n, m in layers.items()]
    try:
        with preserved_modes(model, training=False):
            device = model_device(model)
            run = forward or default_forward
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                run(model, move_to(batch, device))
    finally:
        for handle in handles:
            handle.remove()
    if gather:
        kept = _merge_reservoirs(list(layers), kept, keys, max_values)
    missing = [name for name in layers if name not in kept or kept[name].shape[0] == 0]
    if missing:
        raise ValueError(f"no data reached layer(s) {missing}: is the loader empty?")
    return kept


def _merge_reservoirs(
    names: list[str], kept: dict[str, torch.Tensor], keys: dict[str, torch.Tensor], max_values: int
) -> dict[str, torch.Tensor]:
    """Every rank's reservoir, gathered in rank order and cut to capacity by the smallest keys (same on all ranks)."""
    everything = distributed.gather_objects({name: (kept[name], keys[name]) for name in kept})
    merged: dict[str, torch.Tensor] = {}
    for name in names:
        parts = [ranks[name] for ranks in everything if name in ranks]
        if not parts:
            continue
        rows = torch.cat([rows for rows, _ in parts])
        all_keys = torch.cat([k for _, k in parts])
        capacity = max(1, max_values // (rows.shape[1] if rows.ndim == 2 else 1))
        if rows.shape[0] > capacity:
            rows = rows[all_keys.topk(capacity, largest=False).indices]
        merged[name] = rows
    return merged


def gap_to_relu(x: torch.Tensor, lam: torch.Tensor | float, approximate: str = "none") -> torch.Tensor:
    """|f(x; λ) − ReLU(x)| computed without cancellation (float64)."""
    x = x.double()
    lam = torch.as_tensor(lam, dtype=torch.float64)
    a = x.abs()
    if approximate == "none":
        return a * _normal_cdf(-lam * a)  # |x|·Φ(−λ|x|), Φ through erfc: no cancellation in the tail
    z = lam * a
    u = _TANH_C * z * (1.0 + _TANH_A * z * z)
    return a * torch.sigmoid(-2.0 * u)  # |x|·σ(−2|u|), from ½(1 + tanh u) = σ(2u)


def discrepancy(values: torch.Tensor, lam: torch.Tensor | float, approximate: str = "none") -> torch.Tensor:
    """D(λ) = E[(f(x;λ) − ReLU(x))²] / E[ReLU(x)²] over ``values`` (dim 0 is the sample dim).

    Returns a scalar for (n,) values, one value per channel for (n, C). A
    layer whose inputs are never positive (E[ReLU²] = 0) is measured against
    E[x²] instead.
    """
    values = values.double()
    gap2 = gap_to_relu(values, lam, approximate).square().mean(0)
    relu2 = values.clamp(min=0).square().mean(0)
    scale = torch.where(relu2 > 0, relu2, values.square().mean(0))
    return gap2 / scale.clamp(min=torch.finfo(torch.float64).tiny)


def target_lambda(
    values: torch.Tensor,
    tau: float = DEFAULT_TAU,
    approximate: str = "none",
    lam_max: float = LAMBDA_MAX,
    rtol: float = 1e-6,
) -> torch.Tensor:
    """Smallest λ in [1, lam_max] with D(λ) <= ``tau``, by bisection in log λ.

    ``values`` is (n,) or (n, C); the result is a scalar or one λ* per channel
    (float64). Where even ``lam_max`` misses ``tau`` (inputs of a tiny spread),
    the result is ``lam_max``.
    """
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    shape = values.shape[1:]
    lo = torch.zeros(shape, dtype=torch.float64)  # log λ; D(e^lo) > tau unless lo = 0 meets it
    hi = torch.full(shape, math.log(lam_max), dtype=torch.float64)
    meets_at_one = discrepancy(values, 1.0, approximate) <= tau
    for _ in range(200):
        if bool(((hi - lo) <= math.log1p(rtol)).all()):
            break
        mid = 0.5 * (lo + hi)
        ok = discrepancy(values, mid.exp(), approximate) <= tau
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    return torch.where(meets_at_one, torch.ones_like(hi), hi.exp().clamp(max=lam_max))


def layer_targets(
    model: nn.Module, samples: dict[str, torch.Tensor], tau: float = DEFAULT_TAU
) -> dict[str, torch.Tensor]:
    """λ* for every LambdaGELU layer in ``samples`` (per channel where the layer is per-channel).

    Raises ValueError naming the layer when its samples are empty or all non-finite (for some channel), since
    no λ* can be read from them.
    """
    layers = activation_layers(model)
    targets = {}
    for name, values in samples.items():
        if not isinstance(layers.get(name), LambdaGELU):
            continue
        usable = values.isfinite().any(dim=0) if values.ndim else values.isfinite()
        if values.numel() == 0 or not bool(usable.all()):
            what = "no samples" if values.numel() == 0 else "no finite sample" + (
                f" in {int((~usable).sum())} of {usable.numel()} channels" if usable.ndim else "")
            raise ValueError(f"layer_targets: {name} has {what}; no λ* can be read from it")
        targets[name] = target_lambda(values, tau, layer_approximation(layers[name]))
    return targets

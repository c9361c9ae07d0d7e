"""The λ-GELU op: f(x; λ) = x·Φ(λx) with a hand-derived backward.

Layers, as in Liger-Kernel's ops: plain ``_forward`` / ``_backward`` functions
that compute in fp32 (or fp64), a thin :class:`torch.autograd.Function`, and the
public :func:`lambda_gelu`. The backward saves only ``x`` and ``λ`` and
recomputes Φ(λx) and φ(λx), which cost less than storing them.

Two forms, both equal to ``GELU(λx) / λ``:

* ``approximate="none"``: f = x·Φ(λx), Φ the standard normal CDF.
* ``approximate="tanh"``: f = ½·x·(1 + tanh(c·(z + a·z³))), z = λx,
  c = √(2/π), a = 0.044715 -- PyTorch's tanh form of GELU at λx, divided by λ.

Special values: NaN gives NaN, -inf gives NaN (as ``F.gelu`` does: -inf·0) and
+inf gives +inf. ``F.gelu`` itself returns +inf for +inf in float64 and on its
scalar path but NaN on its vectorised fp32/bf16 path; we return the limit.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Approximate = Literal["none", "tanh"]
APPROXIMATIONS: tuple[str, ...] = ("none", "tanh")

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
_TANH_A = 0.044715


def _compute_dtype(x: torch.Tensor, lam: torch.Tensor) -> torch.dtype:
    """fp64 when either input is fp64, fp32 otherwise (bf16/fp16 are upcast)."""
    return torch.promote_types(torch.promote_types(x.dtype, lam.dtype), torch.float32)


def _forward(x: torch.Tensor, lam: torch.Tensor, approximate: str) -> torch.Tensor:
    """f(x; λ) in the compute dtype of (x, λ)."""
    z = lam * x
    if approximate == "none":
        # f = x·Φ(λx); ndtr is Φ, accurate in both tails.
        return x * torch.special.ndtr(z)
    # f = ½x(1 + tanh(u)), u = c(z + a z³)
    u = _TANH_C * z * (1.0 + _TANH_A * z * z)
    return 0.5 * x * (1.0 + torch.tanh(u))


def _backward(
    x: torch.Tensor, lam: torch.Tensor, approximate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise (∂f/∂x, ∂f/∂λ) in the compute dtype of (x, λ)."""
    z = lam * x
    if approximate == "none":
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI  # φ(λx)
        dfdx = torch.special.ndtr(z) + z * pdf  # ∂f/∂x = Φ(λx) + λx·φ(λx)
        dfdlam = x * x * pdf  # ∂f/∂λ = x²·φ(λx)
        return dfdx, dfdlam
    u = _TANH_C * z * (1.0 + _TANH_A * z * z)
    t = torch.tanh(u)
    sech2 = 1.0 - t * t  # tanh' (u) = sech²(u)
    du_dz = _TANH_C * (1.0 + 3.0 * _TANH_A * z * z)  # du/dz = c(1 + 3a z²)
    dfdx = 0.5 * (1.0 + t) + 0.5 * z * sech2 * du_dz  # ∂f/∂x = ½(1+t) + ½·λx·sech²(u)·du/dz
    dfdlam = 0.5 * x * x * sech2 * du_dz  # ∂f/∂λ = ½·x²·sech²(u)·du/dz
    return dfdx, dfdlam


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape`` (the shape of λ)."""
    if grad.shape == shape:
        return grad
    if len(shape) == 0:
        return grad.sum()
    return grad.sum_to_size(shape)


class LambdaGELUFunction(torch.autograd.Function):
    """Autograd Function for f(x; λ); saves only ``x`` and ``λ``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, lam: torch.Tensor, approximate: str) -> torch.Tensor:  # type: ignore[override]
        dtype = _compute_dtype(x, lam)
        return _forward(x.to(dtype), lam.to(dtype), approximate).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, lam, approximate = inputs
        ctx.save_for_backward(x, lam)
        ctx.approximate = approximate

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, lam = ctx.saved_tensors
        dtype = _compute_dtype(x, lam)
        dfdx, dfdlam = _backward(x.to(dtype), lam.to(dtype), ctx.approximate)
        grad_out = grad_out.to(dtype)
        grad_x = grad_lam = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out * dfdx).to(x.dtype)
        if ctx.needs_input_grad[1]:
            # reduced over the broadcast dims in fp32 (fp64 for fp64 inputs), then cast
            grad_lam = _reduce_to(grad_out * dfdlam, lam.shape).to(lam.dtype)
        return grad_x, grad_lam, None


def channel_view(lam: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """Reshape a 1-D per-channel λ so that it broadcasts along ``dim`` of an ``ndim``-D input."""
    if not -ndim <= dim < ndim:
        raise ValueError(f"channel dim {dim} is out of range for a {ndim}-D input")
    shape = [1] * ndim
    shape[dim % ndim] = lam.numel()
    return lam.reshape(shape)


def lambda_gelu(
    x: torch.Tensor,
    lam: torch.Tensor | float,
    approximate: Approximate = "none",
    dim: int | None = None,
) -> torch.Tensor:
    """Apply f(x; λ) = x·Φ(λx) = GELU(λx)/λ elementwise.

    Args:
        x: input of any shape and floating dtype; the output has the same dtype.
        lam: hardness λ >= 1. A scalar, a tensor that broadcasts against ``x``, or
            (with ``dim``) a 1-D tensor holding one λ per channel along ``dim``.
        approximate: ``"none"`` for the exact (erf) form, ``"tanh"`` for the tanh
            form of GELU at λx divided by λ.
        dim: channel dim of ``x`` for a 1-D per-channel ``lam``.

    λ is not validated here (the op is on the hot path); :class:`LambdaGELU`
    keeps it >= 1. Gradients flow to both ``x`` and ``lam``; ∂f/∂λ is reduced
    over the broadcast dims in fp32.
    """
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if not isinstance(lam, torch.Tensor):
        lam = torch.tensor(float(lam), dtype=torch.float32, device=x.device)
    if dim is not None:
        lam = channel_view(lam, x.ndim, dim)
    return LambdaGELUFunction.apply(x, lam, approximate)


def lambda_gelu_reference(
    x: torch.Tensor, lam: torch.Tensor | float, approximate: Approximate = "none"
) -> torch.Tensor:
    """Plain-autograd composition GELU(λx)/λ, used as the reference in tests and benchmarks."""
    return torch.nn.functional.gelu(lam * x, approximate=approximate) / lam

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

Four ways to run the same formulas, chosen per call (:func:`op_path` says which):

* **traced** (inside a tracer: the user's ``torch.compile``, ``torch.export``,
  ``torch.fx``/``make_fx``, ``torch.jit``, ``vmap``/``grad`` transforms, tensor
  subclasses): the formulas below with Φ in ``F.gelu``'s erf form
  (:func:`_normal_cdf_erf`), which the tracer's compiler fuses with the
  neighbouring ops as it fuses GELU (inductor has no vectorised erfc on CPU;
  docs/performance.md, "Inside the user's torch.compile") and which ONNX writes
  as Erf (ONNX has no Erfc).
* **compiled**: ``_kernel_forward`` / ``_kernel_backward`` (the same formulas,
  Φ in erf form) compiled by ``torch.compile`` into one fused kernel each (the
  ∂f/∂λ reduction included), when :mod:`lambda_gelu.kernels` says so (large
  tensors, a compiler present; ``LAMBDA_GELU_COMPILE`` overrides).
* **fast eager** (CPU, fp32/bf16/fp16, at least :data:`FAST_MIN_NUMEL`
  elements): f = GELU(λx)/λ through ATen's vectorised GELU and GELU-backward,
  in place on one buffer: three passes and one read-only check where
  ``F.gelu`` takes one pass.
* **exact eager** (everything else: fp64, small tensors, other devices): the
  formulas below with Φ(z) = ½·erfc(−z/√2) (:func:`_normal_cdf`), accurate in
  relative terms in the left tail too (until Φ underflows the dtype). Not
  ``torch.special.ndtr``: on torch 2.13's CPU it computes ½(1 + erf(z/√2)) for
  z < 0 and returns 0 below z ≈ −5.5 in fp32 and z ≈ −8.3 in fp64.

The erf form evaluates Φ(z) as ½(1 + erf(z/√2)), as ``F.gelu`` does: accurate to
rounding in absolute terms, but 1 + erf cancels for z < 0, so deep in the left
tail (fp32: z below about −5.5) Φ and f come out 0. The traced, compiled and fast
eager paths all have that error (``F.gelu``'s); all paths are accurate to
rounding in absolute terms (errors of a few ε·|x|) and agree to that, not bit for
bit; only the exact path is also accurate in relative terms in the left tail
(docs/performance.md, "Accuracy of each path").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from lambda_gelu import kernels

Approximate = Literal["none", "tanh"]
APPROXIMATIONS: tuple[str, ...] = ("none", "tanh")

# The formulas below write these constants as literals: under ``torch.compile(..., dynamic=True)`` dynamo turns a
# module-level float into a graph input (an f64 tensor read per call), and the kernel it built for a 0-d λ then ran
# on one thread (1.4× a compiled GELU at 8M elements). tests/test_fast_path.py checks both (values and graph inputs).
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)  # 0.3989422804014327
_TANH_C = math.sqrt(2.0 / math.pi)  # 0.7978845608028654
_TANH_A = 0.044715


def _compute_dtype(x: torch.Tensor, lam: torch.Tensor) -> torch.dtype:
    """fp64 when either input is fp64, fp32 otherwise (bf16/fp16 are upcast)."""
    return torch.promote_types(torch.promote_types(x.dtype, lam.dtype), torch.float32)


NormalCDF = Callable[[torch.Tensor], torch.Tensor]


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Φ(z) = ½·erfc(−z/√2), accurate in relative terms for z < 0 too (no 1 + erf cancellation)."""
    return 0.5 * torch.special.erfc(-0.7071067811865476 * z)  # -z/√2


def _normal_cdf_erf(z: torch.Tensor) -> torch.Tensor:
    """Φ(z) = ½(1 + erf(z/√2)), F.gelu's form (and inductor's lowering of ``torch.special.ndtr``), for the traced
    and compiled paths. Accurate in absolute terms only: 0 for z below about −5.5 (fp32)."""
    return 0.5 * (1.0 + torch.erf(0.7071067811865476 * z))  # z/√2


def _forward(x: torch.Tensor, lam: torch.Tensor, approximate: str, cdf: NormalCDF = _normal_cdf) -> torch.Tensor:
    """f(x; λ) in the compute dtype of (x, λ); ``cdf`` evaluates Φ."""
    z = lam * x
    if approximate == "none":
        # f = x·Φ(λx)
        return x * cdf(z)
    # f = ½x(1 + tanh(u)), u = c(z + a z³)
    u = 0.7978845608028654 * z * (1.0 + 0.044715 * z * z)  # c = √(2/π), a = 0.044715
    return 0.5 * x * (1.0 + torch.tanh(u))


def _backward(
    x: torch.Tensor, lam: torch.Tensor, approximate: str, cdf: NormalCDF = _normal_cdf
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise (∂f/∂x, ∂f/∂λ) in the compute dtype of (x, λ); ``cdf`` evaluates Φ."""
    z = lam * x
    if approximate == "none":
        pdf = torch.exp(-0.5 * z * z) * 0.3989422804014327  # φ(λx) = exp(−z²/2)/√(2π)
        dfdx = cdf(z) + z * pdf  # ∂f/∂x = Φ(λx) + λx·φ(λx)
        dfdlam = x * x * pdf  # ∂f/∂λ = x²·φ(λx)
        return dfdx, dfdlam
    u = 0.7978845608028654 * z * (1.0 + 0.044715 * z * z)  # c = √(2/π), a = 0.044715
    t = torch.tanh(u)
    sech2 = 1.0 - t * t  # tanh' (u) = sech²(u)
    du_dz = 0.7978845608028654 * (1.0 + 0.134145 * z * z)  # du/dz = c(1 + 3a z²)
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


FAST_MIN_NUMEL = 1 << 16
"""Calls on fewer elements use the exact eager formulas (their cost there is call overhead, not arithmetic)."""

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fused_forward(
    x: torch.Tensor, lam: torch.Tensor, approximate: str, cdf: NormalCDF = _normal_cdf
) -> torch.Tensor:
    """f(x; λ) computed in the compute dtype, returned in x's dtype (the exact path; with ``_normal_cdf_erf``,
    the traced path and the body of the compiled forward kernel)."""
    dtype = _compute_dtype(x, lam)
    return _forward(x.to(dtype), lam.to(dtype), approximate, cdf).to(x.dtype)


def _fused_backward(
    x: torch.Tensor,
    lam: torch.Tensor,
    grad_out: torch.Tensor,
    approximate: str,
    need_x: bool,
    need_lam: bool,
    cdf: NormalCDF = _normal_cdf,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(∂L/∂x, ∂L/∂λ) from the upstream gradient (the exact path; with ``_normal_cdf_erf``, the traced path and
    the body of the compiled backward kernel).

    ∂L/∂x = g·∂f/∂x in x's dtype; ∂L/∂λ = Σ g·∂f/∂λ over λ's broadcast dims,
    summed in the compute dtype (fp32, fp64 for fp64 inputs) and then cast.
    """
    dtype = _compute_dtype(x, lam)
    dfdx, dfdlam = _backward(x.to(dtype), lam.to(dtype), approximate, cdf)
    grad_out = grad_out.to(dtype)
    grad_x = (grad_out * dfdx).to(x.dtype) if need_x else None
    grad_lam = _reduce_to(grad_out * dfdlam, lam.shape).to(lam.dtype) if need_lam else None
    return grad_x, grad_lam


# ---------------------------------------------------------------- fast eager path (CPU, large fp32/bf16/fp16)


def _fast_eager_ok(x: torch.Tensor, lam: torch.Tensor) -> bool:
    return (
        not kernels.is_tracing(x, lam)
        and x.device.type == "cpu"
        and x.dtype in _FAST_DTYPES
        and lam.dtype in _FAST_DTYPES
        and x.numel() >= max(FAST_MIN_NUMEL, 1)
    )


def _forward_fast(x: torch.Tensor, lam: torch.Tensor, approximate: str) -> torch.Tensor:
    """f = GELU(λx)/λ with ATen's vectorised GELU, in place on the one buffer it allocates."""
    lam32 = lam.to(torch.float32)
    if x.dtype != torch.float32 and torch.broadcast_shapes(x.shape, lam.shape) == x.shape:
        z = x.to(torch.float32).mul_(lam32)  # z = λx, in the fp32 copy of x
    else:
        z = x.to(torch.float32) * lam32  # z = λx
    torch.ops.aten.gelu_(z, approximate=approximate)  # GELU(λx)
    z.div_(lam32)  # GELU(λx)/λ
    # The vectorised GELU returns NaN for +inf (the limit is +inf) and λx can overflow
    # where x·Φ(λx) does not: one read-only pass finds either, and the exact formulas redo the call.
    if not bool(torch.isfinite(z.max())):
        return _fused_forward(x, lam, approximate)
    return z.to(x.dtype)


def _backward_fast(
    x: torch.Tensor, lam: torch.Tensor, grad_out: torch.Tensor, approximate: str, need_x: bool, need_lam: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(∂L/∂x, ∂L/∂λ) with ATen's vectorised GELU-backward and in-place passes over one buffer."""
    x32, lam32, g32 = x.to(torch.float32), lam.to(torch.float32), grad_out.to(torch.float32)
    z = x32 * lam32  # z = λx
    grad_x = grad_lam = None
    if need_x:
        # ∂f/∂x = d/dx [GELU(λx)/λ] = GELU'(λx), so ∂L/∂x = gelu_backward(g, λx)
        grad_x = torch.ops.aten.gelu_backward(g32, z, approximate=approximate).to(x.dtype)
    if need_lam:
        if approximate == "none":
            # ∂f/∂λ = x²·φ(λx) = x²·exp(−z²/2)/√(2π), built in place in z's buffer
            w = z.square_().mul_(-0.5).exp_().mul_(x32).mul_(x32)
            if lam.numel() == 1 and w.shape == g32.shape and w.is_contiguous() and g32.is_contiguous():
                total = torch.dot(w.view(-1), g32.view(-1))  # Σ g·x²·exp(−z²/2), one fp32 pass
            else:
                total = _reduce_to(w.mul_(g32), lam.shape)
            grad_lam = (total * _INV_SQRT_2PI).reshape(lam.shape).to(lam.dtype)
        else:
            _, dfdlam = _backward(x32, lam32, approximate)
            grad_lam = _reduce_to(g32 * dfdlam, lam.shape).to(lam.dtype)
    return grad_x, grad_lam


# ---------------------------------------------------------------- compiled path


def _kernel_forward(x: torch.Tensor, lam: torch.Tensor, approximate: str) -> torch.Tensor:
    """The body of the compiled forward kernel: :func:`_fused_forward` with Φ in F.gelu's erf form."""
    return _fused_forward(x, lam, approximate, _normal_cdf_erf)


def _kernel_backward(
    x: torch.Tensor, lam: torch.Tensor, grad_out: torch.Tensor, approximate: str, need_x: bool, need_lam: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The body of the compiled backward kernel: :func:`_fused_backward` with Φ in F.gelu's erf form."""
    return _fused_backward(x, lam, grad_out, approximate, need_x, need_lam, _normal_cdf_erf)


def _compiled_layout(x: torch.Tensor, lam: torch.Tensor) -> tuple[str, tuple[int, ...], tuple[int, ...]] | None:
    """(layout name, x view shape, λ view shape) for the compiled kernels, or None if they do not take this case.

    Two layouts keep the number of compiled graphs small: ``flat`` (one λ; x as
    1-D) and ``channel`` (λ varies along one dim d of x; x as (A, C, B), λ as
    (1, C, 1)). Other broadcasts take the eager path; a non-contiguous x is
    copied to a contiguous one first. fp64 always takes the exact path.
    """
    if lam.ndim > x.ndim or x.dtype not in _FAST_DTYPES or lam.dtype not in _FAST_DTYPES:
        return None
    if lam.numel() == 1:
        return "flat", (x.numel(),), ()
    aligned = (1,) * (x.ndim - lam.ndim) + tuple(lam.shape)
    dims = [d for d, size in enumerate(aligned) if size != 1]
    if len(dims) != 1 or aligned[dims[0]] != x.shape[dims[0]]:
        return None
    d = dims[0]
    channels = x.shape[d]
    inner = math.prod(x.shape[d + 1 :])
    return "channel", (x.numel() // (channels * inner), channels, inner), (1, channels, 1)


def _forward_compiled(x: torch.Tensor, lam: torch.Tensor, approximate: str) -> torch.Tensor | None:
    layout = _compiled_layout(x, lam)
    if layout is None:
        return None
    name, x_shape, lam_shape = layout
    key = (x.device.type, approximate, name, x.dtype, lam.dtype)
    out = kernels.run_compiled(
        _kernel_forward, key, x.device.type, x.contiguous().view(x_shape), lam.reshape(lam_shape), approximate
    )
    return None if out is None else out.view(x.shape)


def _backward_compiled(
    x: torch.Tensor, lam: torch.Tensor, grad_out: torch.Tensor, approximate: str, need_x: bool, need_lam: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    layout = _compiled_layout(x, lam)
    if layout is None or grad_out.shape != x.shape:
        return None
    name, x_shape, lam_shape = layout
    key = (x.device.type, approximate, name, x.dtype, lam.dtype, grad_out.dtype, need_x, need_lam)
    grads = kernels.run_compiled(
        _kernel_backward, key, x.device.type,
        x.contiguous().view(x_shape), lam.reshape(lam_shape), grad_out.contiguous().view(x_shape),
        approximate, need_x, need_lam,
    )
    if grads is None:
        return None
    grad_x, grad_lam = grads
    return (
        None if grad_x is None else grad_x.view(x.shape),
        None if grad_lam is None else grad_lam.reshape(lam.shape),
    )


def op_path(x: torch.Tensor, lam: torch.Tensor | float = 1.0) -> str:
    """Which path a call ``lambda_gelu(x, lam)`` takes now: ``"traced"``, ``"compiled"``, ``"fast eager"`` or
    ``"exact eager"``.

    ``"compiled"`` means the call is attempted as a fused kernel; should
    compiling fail, the call (and every later one on that device type) falls
    back to eager, and :func:`lambda_gelu.kernels.compile_status` records why.
    """
    if not isinstance(lam, torch.Tensor):
        lam = torch.tensor(float(lam), dtype=torch.float32, device=x.device)
    if kernels.is_tracing(x, lam):
        return "traced"
    if kernels.use_compiled(x, lam) and _compiled_layout(x, lam) is not None:
        return "compiled"
    return "fast eager" if _fast_eager_ok(x, lam) else "exact eager"


class LambdaGELUFunction(torch.autograd.Function):
    """Autograd Function for f(x; λ); saves only ``x`` and ``λ``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, lam: torch.Tensor, approximate: str) -> torch.Tensor:  # type: ignore[override]
        if kernels.is_tracing(x, lam):  # the tracer fuses the formulas into its own graph
            return _fused_forward(x, lam, approximate, _normal_cdf_erf)
        if kernels.use_compiled(x, lam):
            out = _forward_compiled(x, lam, approximate)
            if out is not None:
                return out
        if _fast_eager_ok(x, lam):
            return _forward_fast(x, lam, approximate)
        return _fused_forward(x, lam, approximate)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, lam, approximate = inputs
        ctx.save_for_backward(x, lam)
        ctx.approximate = approximate

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, lam = ctx.saved_tensors
        need_x, need_lam = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grads = None
        # create_graph=True (double backward) needs the differentiable formulas below
        if not torch.is_grad_enabled():
            if kernels.use_compiled(x, lam, grad_out):
                grads = _backward_compiled(x, lam, grad_out, ctx.approximate, need_x, need_lam)
            if grads is None and _fast_eager_ok(x, lam) and grad_out.dtype in _FAST_DTYPES:
                grads = _backward_fast(x, lam, grad_out, ctx.approximate, need_x, need_lam)
        if grads is None:
            cdf = _normal_cdf_erf if kernels.is_tracing(x, lam, grad_out) else _normal_cdf
            grads = _fused_backward(x, lam, grad_out, ctx.approximate, need_x, need_lam, cdf)
        return grads[0], grads[1], None


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
        x: input of any shape and floating dtype (others raise TypeError); the output has the same dtype.
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
    if isinstance(x, torch.Tensor) and not x.is_floating_point():  # as F.gelu; an fx Proxy passes
        raise TypeError(f"lambda_gelu needs a floating-point input, got {x.dtype}")
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

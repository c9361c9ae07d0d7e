"""The λ-GELU op: outputs and both gradients against references, numerics, special values, memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lambda_gelu.ops import channel_view, lambda_gelu, lambda_gelu_reference

SQRT2 = math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
TANH_C = math.sqrt(2.0 / math.pi)
TANH_A = 0.044715
SUP_GAP = 0.1699712  # max_t t·Φ(−t), attained at t = 0.75179


# ---------------------------------------------------------------- independent references (float64)


def ref_f(x: torch.Tensor, lam, approximate: str = "none") -> torch.Tensor:
    """f(x; λ) from the textbook formulas, in float64."""
    x = x.double()
    lam = torch.as_tensor(lam, dtype=torch.float64)
    z = lam * x
    if approximate == "none":
        return x * 0.5 * (1.0 + torch.erf(z / SQRT2))
    return 0.5 * x * (1.0 + torch.tanh(TANH_C * (z + TANH_A * z**3)))


def ref_grads(x: torch.Tensor, lam, approximate: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise (∂f/∂x, ∂f/∂λ) in float64 (closed form for erf, autograd of the formula for tanh)."""
    x = x.double()
    lam = torch.as_tensor(lam, dtype=torch.float64)
    if approximate == "none":
        z = lam * x
        pdf = torch.exp(-0.5 * z * z) * INV_SQRT_2PI
        return 0.5 * (1.0 + torch.erf(z / SQRT2)) + z * pdf, x * x * pdf
    xr = x.clone().requires_grad_(True)
    lr = lam.expand_as(x).clone().requires_grad_(True)
    gx, gl = torch.autograd.grad(ref_f(xr, lr, "tanh").sum(), (xr, lr))
    return gx, gl


def run_op(x: torch.Tensor, lam: torch.Tensor, approximate: str = "none", dim=None, grad_out=None):
    """Output, grad_x and grad_λ of ``lambda_gelu`` (leaf copies of x and λ)."""
    x = x.detach().clone().requires_grad_(True)
    lam = lam.detach().clone().requires_grad_(True)
    out = lambda_gelu(x, lam, approximate, dim=dim)
    g = torch.ones_like(out) if grad_out is None else grad_out.to(out.dtype)
    out.backward(g)
    return out, x.grad, lam.grad


APPROX = ["none", "tanh"]

# dtype -> (output atol, output rtol, grad atol, grad rtol) against a float64 reference on the same inputs
TOLERANCES = {
    torch.float64: (1e-12, 1e-12, 1e-12, 1e-12),
    torch.float32: (2e-6, 2e-6, 5e-6, 5e-6),
    torch.bfloat16: (2e-2, 1e-2, 2e-2, 1e-2),
}

ODD_SHAPES = [(1, 1, 1023), (7, 13), (3, 5, 11, 2), (1,), (), (2, 0, 3)]


# ---------------------------------------------------------------- values and gradients vs references


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("lam_value", [1.0, 1.7, 23.0])
def test_forward_and_grads_match_formulas(approximate, dtype, shape, lam_value):
    x = (torch.randn(shape, dtype=torch.float64) * 2.5 / lam_value).to(dtype)
    lam = torch.tensor(lam_value, dtype=torch.float32 if dtype != torch.float64 else torch.float64)
    out, gx, gl = run_op(x, lam, approximate)
    atol, rtol, gatol, grtol = TOLERANCES[dtype]

    assert out.dtype == dtype and out.shape == x.shape
    want = ref_f(x, lam.double(), approximate)
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)

    want_gx, want_gl = ref_grads(x, lam.double(), approximate)
    assert gx.dtype == dtype and gl.dtype == lam.dtype and gl.shape == lam.shape
    torch.testing.assert_close(gx.double(), want_gx, atol=gatol, rtol=grtol)
    # ∂L/∂λ is a sum over all elements: scale the tolerance by the element count
    n = max(x.numel(), 1)
    torch.testing.assert_close(gl.double(), want_gl.sum(), atol=gatol * math.sqrt(n), rtol=grtol)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", [(1, 1, 1023), (13, 17), (2, 3, 5, 7)])
def test_matches_plain_autograd_reference_fp32(approximate, shape):
    x = torch.randn(shape) * 3
    lam = torch.tensor(2.9)
    g = torch.randn(shape)
    out, gx, gl = run_op(x, lam, approximate, grad_out=g)

    xr = x.clone().requires_grad_(True)
    lr = lam.clone().requires_grad_(True)
    ref = lambda_gelu_reference(xr, lr, approximate)
    ref.backward(g)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(gx, xr.grad, atol=5e-6, rtol=1e-5)
    torch.testing.assert_close(gl, lr.grad, atol=1e-4, rtol=1e-4)


def test_float_lambda_equals_tensor_lambda():
    x = torch.randn(4, 9)
    torch.testing.assert_close(lambda_gelu(x, 3.5), lambda_gelu(x, torch.tensor(3.5)), atol=0, rtol=0)


def test_invalid_arguments_raise():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="approximate"):
        lambda_gelu(x, 1.0, approximate="erf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        lambda_gelu(x, torch.ones(3), dim=2)
    with pytest.raises(ValueError, match="out of range"):
        channel_view(torch.ones(3), 2, -3)


# ---------------------------------------------------------------- gradcheck (float64)


GRADCHECK_LAMBDAS = [1.0, 1.5, 10.0, 1e3]


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("lam_value", GRADCHECK_LAMBDAS)
def test_gradcheck_scalar_lambda(approximate, lam_value):
    # x spread over the curved region |λx| <~ 3 as well as the flat tails
    x = torch.cat([torch.randn(9) * 2.0 / lam_value, torch.randn(3)]).double().reshape(3, 4).requires_grad_(True)
    lam = torch.tensor(lam_value, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lambda_gelu(a, b, approximate), (x, lam), atol=1e-6, rtol=1e-4)


LAMS_PER_CHANNEL = torch.tensor(GRADCHECK_LAMBDAS, dtype=torch.float64)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize(
    ("x_shape", "dim"),
    [((2, 4, 3), 1), ((3, 4), -1), ((4, 2), 0), ((2, 3, 4), 2)],
)
def test_gradcheck_per_channel_dim(approximate, x_shape, dim):
    lam = LAMS_PER_CHANNEL.clone().requires_grad_(True)
    scale = channel_view(2.0 / LAMS_PER_CHANNEL, len(x_shape), dim)
    x = (torch.randn(x_shape, dtype=torch.float64) * scale).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: lambda_gelu(a, b, approximate, dim=dim), (x, lam), atol=1e-6, rtol=1e-4
    )


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize(("x_shape", "lam_shape"), [((2, 4, 3), (4, 1)), ((2, 4, 3), (1, 4, 1)), ((5,), (4, 1))])
def test_gradcheck_broadcast_lambda(approximate, x_shape, lam_shape):
    lam = LAMS_PER_CHANNEL.reshape(lam_shape).clone().requires_grad_(True)
    x = (torch.randn(x_shape, dtype=torch.float64) * 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: lambda_gelu(a, b, approximate), (x, lam), atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- per-channel and the ∂f/∂λ reduction


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize(
    ("x_shape", "lam_shape"),
    [
        ((2, 3, 5), ()),
        ((2, 3, 5), (1,)),
        ((2, 3, 5), (5,)),
        ((2, 3, 5), (3, 1)),
        ((2, 3, 5), (1, 3, 1)),
        ((2, 3, 5), (2, 1, 5)),
        ((2, 3, 5), (2, 3, 5)),
        ((5,), (3, 1)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lambda_grad_reduction_matches_reference(approximate, x_shape, lam_shape, dtype):
    lam = (1.0 + torch.rand(lam_shape, dtype=dtype) * 4.0)
    x = torch.randn(x_shape, dtype=dtype)
    out_shape = torch.broadcast_shapes(x_shape, lam_shape)
    g = torch.randn(out_shape, dtype=dtype)
    out, gx, gl = run_op(x, lam, approximate, grad_out=g)

    xr = x.clone().requires_grad_(True)
    lr = lam.clone().requires_grad_(True)
    lambda_gelu_reference(xr, lr, approximate).backward(g)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert out.shape == out_shape
    assert gl.shape == lam.shape and gx.shape == x.shape
    torch.testing.assert_close(gx, xr.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(gl, lr.grad, atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize(("x_shape", "dim"), [((2, 5, 3, 3), 1), ((2, 3, 5), -1), ((5, 2), 0)])
def test_dim_equals_explicit_view(x_shape, dim):
    lam = torch.tensor([1.0, 2.0, 3.0, 50.0, 1e3])
    x = torch.randn(x_shape)
    shape = [1] * len(x_shape)
    shape[dim] = 5
    out, gx, gl = run_op(x, lam, dim=dim)
    out2, gx2, gl2 = run_op(x, lam.reshape(shape))
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    torch.testing.assert_close(gx, gx2, atol=0, rtol=0)
    torch.testing.assert_close(gl, gl2.reshape(5), atol=0, rtol=0)
    # each channel on its own
    for c in range(5):
        xc = x.select(dim, c)
        torch.testing.assert_close(out.select(dim, c), lambda_gelu(xc, lam[c].item()), atol=0, rtol=0)


# ---------------------------------------------------------------- λ = 1 is GELU; the gap to ReLU


def test_lambda_one_is_gelu_fp32():
    x = torch.linspace(-10, 10, 20001)
    assert (lambda_gelu(x, 1.0) - F.gelu(x)).abs().max().item() <= 1e-6
    assert (lambda_gelu(x, 1.0, "tanh") - F.gelu(x, approximate="tanh")).abs().max().item() <= 1e-6


@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_identity_at_any_lambda(approximate):
    # f(x; λ) = GELU(λx)/λ
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    for lam in [1.3, 7.0, 250.0]:
        want = F.gelu(lam * x, approximate=approximate) / lam
        torch.testing.assert_close(lambda_gelu(x, torch.tensor(lam, dtype=torch.float64), approximate), want)


SUP_LAMBDAS = [1.0, 1.0001, 1.5, 2.0, 3.7, 10.0, 31.6, 100.0, 1e3, 1e4, 1e5, 1e6]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lam", SUP_LAMBDAS)
def test_sup_gap_to_relu(dtype, lam):
    t = torch.linspace(0.3, 1.3, 20001, dtype=torch.float64)
    x = (torch.cat([-t, t]) / lam).to(dtype)
    lam_t = torch.tensor(lam, dtype=dtype)
    gap = (lambda_gelu(x, lam_t).double() - torch.relu(x).double()).abs()
    assert gap.max().item() <= 0.16998 / lam
    # ... and the bound is attained, at |x| = 0.7518/λ
    assert gap.max().item() >= 0.16996 / lam
    argmax = x.double().abs()[gap.argmax()].item()
    assert argmax == pytest.approx(0.7518 / lam, rel=2e-3)


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(
    x=st.floats(min_value=-1e4, max_value=1e4, allow_nan=False),
    log_lam=st.floats(min_value=0.0, max_value=math.log(1e6)),
)
def test_gap_bound_property(x, log_lam):
    lam = math.exp(log_lam)
    xt = torch.tensor([x], dtype=torch.float64)
    gap = abs(lambda_gelu(xt, torch.tensor(lam, dtype=torch.float64)).item() - max(x, 0.0))
    assert gap <= 0.16998 / lam
    # ... and |f − ReLU| = |x|·Φ(−λ|x|)
    # (f − ReLU cancels for x > 0: allow a few ulps of x)
    assert gap == pytest.approx(abs(x) * 0.5 * math.erfc(lam * abs(x) / SQRT2), rel=1e-9, abs=1e-15 * abs(x) + 1e-300)


# ---------------------------------------------------------------- numerics: no NaN/inf in range


FINITE_X = [0.0, 1e-30, 1e-6, 1e-3, 0.1, 0.5, 1.0, 3.0, 30.0, 300.0, 1e3, 5e3, 1e4]
RANGE_LAMBDAS = [1.0, 1.0001, 2.0, 1e2, 1e4, 1e5, 1e6]


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lam_dtype", ["fp32", "same"])
def test_finite_outputs_and_grads_in_range(approximate, dtype, lam_dtype):
    base = torch.tensor(FINITE_X, dtype=torch.float64)
    x = torch.cat([base, -base, (torch.rand(64, dtype=torch.float64) * 2 - 1) * 1e4]).to(dtype)
    for lam_value in RANGE_LAMBDAS:
        lam = torch.tensor(lam_value, dtype=torch.float32 if lam_dtype == "fp32" else dtype)
        out, gx, gl = run_op(x, lam, approximate, grad_out=torch.randn(x.shape))
        assert torch.isfinite(out).all(), lam_value
        assert torch.isfinite(gx).all(), lam_value
        assert torch.isfinite(gl).all(), lam_value
    # per-channel λ as well, with the extreme values side by side
    lam = torch.tensor(RANGE_LAMBDAS, dtype=torch.float32)
    xc = x[: 7 * 12].reshape(12, 7)
    out, gx, gl = run_op(xc, lam, approximate, dim=1)
    assert torch.isfinite(out).all() and torch.isfinite(gx).all() and torch.isfinite(gl).all()


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("lam", [1.0, 1e6])
def test_extreme_values_are_accurate(approximate, lam):
    # |x| = 1e4 at λ = 1e6: the gate is fully open/closed, f must be ReLU to working precision
    x = torch.tensor([-1e4, -1.0, 1.0, 1e4])
    out = lambda_gelu(x, torch.tensor(lam), approximate)
    torch.testing.assert_close(out, torch.relu(x), atol=0.17 / lam + 1e-6, rtol=0)


# ---------------------------------------------------------------- special values and dtypes


SPECIAL = [float("nan"), float("-inf"), float("inf")]


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("lam", [1.0, 3.0, 1e6])
def test_special_values(approximate, dtype, lam):
    x = torch.tensor([*SPECIAL, 0.0, 2.0], dtype=dtype)
    out = lambda_gelu(x, lam, approximate)
    assert torch.isnan(out[0]) and torch.isnan(out[1])
    assert out[2].item() == float("inf")
    assert out[3].item() == 0.0
    # F.gelu in float64 agrees (its vectorised fp32 path gives NaN for +inf)
    if lam == 1.0:
        want = F.gelu(torch.tensor(SPECIAL, dtype=torch.float64), approximate=approximate)
        torch.testing.assert_close(out[:3].double(), want, equal_nan=True)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("lam_kind", ["float", torch.float32, torch.float64, torch.bfloat16])
def test_output_and_grad_dtypes(x_dtype, lam_kind):
    x = torch.randn(3, 4).to(x_dtype).requires_grad_(True)
    if lam_kind == "float":
        out = lambda_gelu(x, 2.0)
        assert out.dtype == x_dtype
        out.sum().backward()
        assert x.grad.dtype == x_dtype
        return
    lam = torch.tensor(2.0, dtype=lam_kind, requires_grad=True)
    out = lambda_gelu(x, lam)
    assert out.dtype == x_dtype
    out.sum().backward()
    assert x.grad.dtype == x_dtype and lam.grad.dtype == lam_kind
    want = ref_grads(x.detach(), 2.0)[1].sum()
    torch.testing.assert_close(lam.grad.double(), want, atol=0.05, rtol=0.02)


# ---------------------------------------------------------------- memory: only x and λ are saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("per_channel", [False, True])
def test_backward_saves_only_x_and_lambda(dtype, approximate, per_channel):
    x = torch.randn(4, 6, dtype=dtype, requires_grad=True)
    lam = (torch.rand(6) + 1.0 if per_channel else torch.tensor(2.0)).requires_grad_(True)
    packed: list[torch.Tensor] = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lambda_gelu(x, lam, approximate, dim=-1 if per_channel else None)
    assert len(packed) == 2
    assert packed[0].dtype == dtype and packed[0].shape == x.shape
    assert packed[0].data_ptr() == x.data_ptr()
    assert packed[1].data_ptr() == lam.data_ptr() and packed[1].numel() == lam.numel()
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 2
    assert saved[0].data_ptr() == x.data_ptr() and saved[1].data_ptr() == lam.data_ptr()
    out.sum().backward()  # still differentiable after the hooks
    assert x.grad is not None and lam.grad is not None

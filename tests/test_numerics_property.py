"""Property-based tests of the op ``lambda_gelu.lambda_gelu`` against an mpmath reference (40 digits).

Domain: λ ∈ [1, 1e6] (log-uniform, plus λ = 1) and |x| <= 1e4, drawn three ways: x uniform, |x| log-uniform
in [1e-8, 1e4], and z = λx uniform in [-40, 40] (the transition, where the gate is neither 0 nor 1). Dtypes:
fp32, bf16, fp16 (fp16 where the CPU runs it). Checked: f, ∂f/∂x (returned in x's dtype) and ∂f/∂λ (one λ per
element, so no reduction; returned in λ's dtype, fp32).

Tolerances: forward-error bounds, per element, in terms of the reference's own conditioning. The op computes in
fp32 (unit roundoff u = 2⁻²⁴) and rounds the result to the dtype (unit roundoff u_d: 2⁻²⁴ fp32, 2⁻⁸ bf16,
2⁻¹¹ fp16). Rounding z = λx to fp32 perturbs z by |z|·u, which moves a function g of z by |g'(z)|·|z|·u; φ is
computed as exp(−z²/2), whose relative error grows like z²·u; special functions and products add a few ulps.
So, with C = 8 for the handful of roundings:

* f = x·Φ(z):            |Δ| <= u_d·|f| + C·u·(|f| + |x|·|z|·φ(z) + |x|)
* ∂f/∂x = Φ(z) + z·φ(z):  |Δ| <= u_d·|g| + C·u·(Φ(z) + |z|·φ(z)·(1 + z²) + 1)
* ∂f/∂λ = x²·φ(z):        |Δ| <= C·u·(1 + z²)·x²·φ(z)

The last terms of the first two (C·u·|x| and C·u) are there because Φ is NOT relatively accurate in the left
tail on every path: ``torch.special.ndtr`` (the compiled kernels) evaluates ½(1 + erf(z/√2)), which cancels for
z < 0 (fp32: 4% off at z = −5, 0 below z ≈ −5.5; fp64: 0 at z = −10), and the fast path's ATen GELU does the
same; Φ is then accurate to u in absolute terms only. The exact path computes ½·erfc(−z/√2), which is accurate in
relative terms; :func:`test_left_tail_is_accurate_in_relative_terms` checks it. Also
plus an absolute floor for underflow: the dtype's smallest subnormal, and C·2⁻¹⁴⁹·(1 + |x|)² for fp32
intermediates that are subnormal. ∂f/∂λ is tiny (<= 0.29/λ²) and, in the far tail, far below the floor of
what fp32 can hold; a relative test would be meaningless there and an absolute one too weak elsewhere, hence
the conditioning-scaled bound. The tanh form ½x(1 + tanh u), u = c(z + a·z³), cancels in 1 + tanh u for
u < 0 (as PyTorch's own tanh GELU does), so its bounds are absolute, scaled by |x| (and by x²·|du/dz| for the
gradients, where sech²u = 1 − tanh²u cancels likewise).

Both eager paths of the op are run: small calls (exact formulas) and calls of at least
``ops.FAST_MIN_NUMEL`` elements (ATen's vectorised GELU), the drawn pairs tiled to that size.

Run more examples, randomized: ``LAMBDA_GELU_HYPOTHESIS=explore pytest tests/test_numerics_property.py``.
"""

from __future__ import annotations

import math
import os

import mpmath as mp
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambda_gelu import lambda_gelu, ops

settings.register_profile("lambda-gelu-ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("lambda-gelu-explore", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(
    "lambda-gelu-explore" if os.environ.get("LAMBDA_GELU_HYPOTHESIS") == "explore" else "lambda-gelu-ci"
)

U = 2.0**-24  # fp32 unit roundoff: the op computes in fp32 for fp32, bf16 and fp16 inputs
C = 8.0
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SUBNORMAL = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}
TANH_C, TANH_A = math.sqrt(2.0 / math.pi), 0.044715


def _fp16_runs() -> bool:
    try:
        lambda_gelu(torch.ones(2, dtype=torch.float16), 2.0)
    except RuntimeError:
        return False
    return True


DTYPES = [torch.float32, torch.bfloat16,
          pytest.param(torch.float16, marks=pytest.mark.skipif(not _fp16_runs(), reason="no fp16 on this CPU"))]



pytestmark = pytest.mark.usefixtures("one_thread")


FAST_MIN_NUMEL = getattr(ops, "FAST_MIN_NUMEL", None)
PATHS = ["small", pytest.param("large", marks=pytest.mark.skipif(FAST_MIN_NUMEL is None, reason="one eager path"))]

lams = st.one_of(st.just(1.0), st.floats(0.0, 6.0).map(lambda e: 10.0**e))
pairs = st.one_of(
    st.tuples(st.floats(-1e4, 1e4), lams),
    st.tuples(st.floats(-8.0, 4.0), st.booleans(), lams).map(lambda t: ((-1) ** t[1] * 10.0 ** t[0], t[2])),
    st.tuples(st.floats(-40.0, 40.0), lams).map(lambda t: (t[0] / t[1], t[1])),
)
batches = st.lists(pairs, min_size=1, max_size=16)


def _reference(x: float, lam: float, approximate: str) -> dict[str, float]:
    """f, ∂f/∂x, ∂f/∂λ at (x, λ) and the error bounds' scale terms, from 40-digit mpmath."""
    with mp.workdps(40):
        X, L = mp.mpf(x), mp.mpf(lam)
        z = X * L
        if approximate == "none":
            Phi, phi = mp.ncdf(z), mp.npdf(z)
            out = {"f": X * Phi, "dx": Phi + z * phi, "dlam": X * X * phi}
            out["f_scale"] = abs(X * Phi) + abs(X * z) * phi + abs(X)
            out["dx_scale"] = Phi + abs(z) * phi * (1 + z * z) + 1
            out["dlam_scale"] = (1 + z * z) * X * X * phi
        else:
            u = TANH_C * (z + TANH_A * z**3)
            t = mp.tanh(u)
            sech2 = 1 - t * t
            du = TANH_C * (1 + 3 * TANH_A * z * z)
            out = {"f": X * (1 + t) / 2, "dx": (1 + t) / 2 + z * sech2 * du / 2, "dlam": X * X * sech2 * du / 2}
            out["f_scale"] = abs(X) * (1 + abs(z) * sech2 * du)
            out["dx_scale"] = 1 + abs(z) * du
            out["dlam_scale"] = X * X * du
        return {k: float(v) for k, v in out.items()}


def _check(name: str, got: torch.Tensor, want: list[float], bound: list[float], context: list[str]) -> None:
    got_list = got.double().tolist()
    for g, w, b, where in zip(got_list, want, bound, context, strict=True):
        assert abs(g - w) <= b, f"{name} at {where}: got {g!r}, want {w!r} (|Δ| = {abs(g - w):.3g} > {b:.3g})"


def _run(pairs_: list[tuple[float, float]], dtype: torch.dtype, approximate: str, size: str = "small") -> None:
    n = len(pairs_)
    x = torch.tensor([min(max(p[0], -1e4), 1e4) for p in pairs_], dtype=torch.float64).to(dtype)
    lam = torch.tensor([p[1] for p in pairs_], dtype=torch.float32)
    copies = 1 if size == "small" else -(-FAST_MIN_NUMEL // n)  # tiled up to the fast path's size
    x_in = x.repeat(copies).requires_grad_(True)
    lam_in = lam.repeat(copies).requires_grad_(True)
    if size == "large" and hasattr(ops, "op_path"):
        assert ops.op_path(x_in.detach(), lam_in.detach()) != "exact eager"
    out = lambda_gelu(x_in, lam_in, approximate)
    out.backward(torch.ones_like(out))
    y, x_grad, lam_grad = out[:n].detach(), x_in.grad[:n], lam_in.grad[:n]
    assert y.dtype == dtype and x_grad.dtype == dtype and lam_grad.dtype == torch.float32
    xs, ls = x.double().tolist(), lam.double().tolist()  # the exact values the op saw
    refs = [_reference(a, b, approximate) for a, b in zip(xs, ls, strict=True)]
    u_d, sub = UNIT_ROUNDOFF[dtype], SUBNORMAL[dtype]
    where = [f"x={a!r}, λ={b!r}" for a, b in zip(xs, ls, strict=True)]
    floor = [sub + C * 2.0**-149 * (1 + abs(a)) ** 2 for a in xs]
    if approximate == "none":
        _check("f", y, [r["f"] for r in refs],
               [u_d * abs(r["f"]) + C * U * r["f_scale"] + fl for r, fl in zip(refs, floor, strict=True)], where)
        _check("∂f/∂x", x_grad, [r["dx"] for r in refs],
               [u_d * abs(r["dx"]) + C * U * r["dx_scale"] + fl for r, fl in zip(refs, floor, strict=True)], where)
        _check("∂f/∂λ", lam_grad, [r["dlam"] for r in refs],
               [C * U * r["dlam_scale"] + C * 2.0**-149 * (1 + a * a) for r, a in zip(refs, xs, strict=True)],
               where)
    else:
        _check("f (tanh)", y, [r["f"] for r in refs],
               [u_d * abs(r["f"]) + C * U * r["f_scale"] + fl for r, fl in zip(refs, floor, strict=True)], where)
        _check("∂f/∂x (tanh)", x_grad, [r["dx"] for r in refs],
               [u_d * abs(r["dx"]) + C * U * r["dx_scale"] + fl for r, fl in zip(refs, floor, strict=True)], where)
        _check("∂f/∂λ (tanh)", lam_grad, [r["dlam"] for r in refs],
               [C * U * r["dlam_scale"] + C * 2.0**-149 * (1 + a * a) for r, a in zip(refs, xs, strict=True)],
               where)


@pytest.mark.parametrize("size", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@PROFILE
@given(batch=batches)
def test_erf_form_matches_mpmath(dtype, size, batch):
    _run(batch, dtype, "none", size)


@pytest.mark.parametrize("size", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@PROFILE
@given(batch=batches)
def test_tanh_form_matches_mpmath(dtype, size, batch):
    _run(batch, dtype, "tanh", size)


def test_the_bounds_catch_lost_precision_and_a_wrong_derivative():
    """The bounds are no blanket: a bf16 intermediate in an fp32 evaluation breaks them, and so does ∂f/∂x
    without its z·φ(z) term."""
    ref = _reference(0.7, 1.0, "none")
    z = torch.tensor([0.7]).bfloat16().float()
    bf16_inside = (z * torch.special.ndtr(z)).double().item()
    assert abs(bf16_inside - ref["f"]) > U * abs(ref["f"]) + C * U * ref["f_scale"]
    no_z_phi = torch.special.ndtr(torch.tensor([0.7])).double().item()
    assert abs(no_z_phi - ref["dx"]) > U * abs(ref["dx"]) + C * U * ref["dx_scale"]


@pytest.mark.parametrize("z", [-5.0, -7.0, -10.0])
def test_left_tail_is_accurate_in_relative_terms(z):
    x = torch.tensor([z])
    f = lambda_gelu(x, torch.tensor([1.0])).double().item()
    want = _reference(z, 1.0, "none")["f"]
    assert abs(f - want) <= 1e-5 * abs(want)


# ---------------------------------------------------------------- NaN and ±inf


SPECIAL = [float("nan"), float("-inf"), float("inf")]


@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("lam", [1.0, 3.5, 1e6])
def test_nan_and_inf_propagate_like_gelu(dtype, approximate, lam):
    """Outputs equal GELU(λx)/λ as F.gelu computes it in float64 (NaN → NaN, −inf → NaN, +inf → +inf); F.gelu's
    vectorized fp32/bf16/fp16 path returns NaN for +inf, disagreeing with its own float64 and scalar paths, and
    the op keeps the limit +inf there. Gradients: NaN at all three, as F.gelu's (∂f/∂λ = x²φ(λx) = ∞·0 too)."""
    x = torch.tensor([*SPECIAL, 0.0, -1.5, 2.0], dtype=dtype, requires_grad=True)
    lam_t = torch.full((6,), lam, dtype=torch.float32, requires_grad=True)
    y = lambda_gelu(x, lam_t, approximate)
    y.backward(torch.ones_like(y))
    x64 = torch.tensor(SPECIAL, dtype=torch.float64, requires_grad=True)
    gelu = F.gelu(x64 * lam, approximate=approximate) / lam
    gelu.backward(torch.ones_like(gelu))
    assert torch.equal(y[:3].double().isnan(), gelu.isnan())
    assert torch.equal(y[:3].double().nan_to_num(), gelu.detach().nan_to_num())
    assert x.grad[:3].isnan().all() and x64.grad.isnan().all()
    assert lam_t.grad[:3].isnan().all()
    assert torch.isfinite(y[3:]).all() and torch.isfinite(x.grad[3:]).all() and torch.isfinite(lam_t.grad[3:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_lambda_gives_nan(dtype):
    y = lambda_gelu(torch.tensor([0.5, -0.5], dtype=dtype), torch.tensor([float("nan"), 2.0]))
    assert y[0].isnan() and torch.isfinite(y[1])

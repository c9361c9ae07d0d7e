"""The op's fast paths: fast eager (ATen GELU in place), compiled kernels (torch.compile), and how one is chosen.

Compiling costs seconds per graph on 2 CPU cores, so only the tests named
``*compiled*`` build kernels (``-k "not compiled"`` skips them): the op's
forward and backward for one λ per layer and for one λ per channel, and one
whole model through dynamo + AOTAutograd.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lambda_gelu import kernels
from lambda_gelu.module import LambdaGELU
from lambda_gelu.ops import FAST_MIN_NUMEL, lambda_gelu, op_path

SQRT2 = math.sqrt(2.0)
TANH_C = math.sqrt(2.0 / math.pi)
TANH_A = 0.044715


def ref_f(x: torch.Tensor, lam: torch.Tensor, approximate: str) -> torch.Tensor:
    """f(x; λ) from the textbook formulas, in float64 (λ broadcast against x)."""
    x, lam = x.double(), lam.double()
    z = lam * x
    if approximate == "none":
        return x * 0.5 * (1.0 + torch.erf(z / SQRT2))
    return 0.5 * x * (1.0 + torch.tanh(TANH_C * (z + TANH_A * z**3)))


def ref_grads(x, lam, grad_out, approximate):
    """(∂L/∂x, ∂L/∂λ) of Σ grad_out·f by float64 autograd of the textbook formula."""
    xr = x.detach().double().requires_grad_(True)
    lr = lam.detach().double().requires_grad_(True)
    gx, gl = torch.autograd.grad(ref_f(xr, lr, approximate), (xr, lr), grad_out.double())
    return gx, gl


def run(x, lam, approximate="none", dim=None, grad_out=None):
    x = x.detach().clone().requires_grad_(True)
    lam = lam.detach().clone().requires_grad_(True)
    out = lambda_gelu(x, lam, approximate, dim=dim)
    out.backward(grad_out)
    return out, x.grad, lam.grad


@pytest.fixture
def mode():
    """Set the compile mode for one test, and restore it after."""
    old = kernels.set_compile_mode(None)
    yield kernels.set_compile_mode
    kernels.set_compile_mode(old)


# ---------------------------------------------------------------- choosing the path


def test_path_choice(mode, monkeypatch):
    small, large = torch.randn(64, 128), torch.randn(256, 256)
    assert large.numel() >= FAST_MIN_NUMEL > small.numel()
    mode("off")
    assert op_path(small) == "exact eager" and op_path(large) == "fast eager"
    assert op_path(large.double()) == "exact eager"  # fp64 keeps the tail-accurate formulas
    mode("auto")  # compiling starts at AUTO_MIN_NUMEL: small jobs (and the test suite) never compile
    assert op_path(large) == "fast eager"
    assert op_path(torch.empty(kernels.AUTO_MIN_NUMEL)) == "compiled"
    mode("on")
    assert op_path(small) == "compiled"
    assert op_path(small.double()) == "exact eager"  # fp64: never compiled
    assert op_path(small.t(), 2.0) == "compiled"  # non-contiguous: copied, then fused
    assert op_path(torch.randn(5), torch.ones(4, 1)) != "compiled"  # λ broadcasts x to a larger shape
    # never inside a tracer (torch.compile of the caller: see test_model_compiled_whole)
    seen = []
    torch.func.vmap(lambda t: seen.append(kernels.use_compiled(t)) or t)(small)
    assert seen == [False]
    # the environment variable, read once
    mode(None)
    for raw, want in [("0", "off"), ("1", "on"), ("auto", "auto"), ("", "auto")]:
        monkeypatch.setattr(kernels, "_env_mode", None)
        monkeypatch.setenv(kernels.COMPILE_ENV, raw)
        assert kernels.compile_mode() == want
    monkeypatch.setattr(kernels, "_env_mode", None)
    monkeypatch.setenv(kernels.COMPILE_ENV, "sometimes")
    with pytest.warns(RuntimeWarning, match="LAMBDA_GELU_COMPILE"):
        assert kernels.compile_mode() == "auto"
    with pytest.raises(ValueError, match="compile mode"):
        kernels.set_compile_mode("always")  # type: ignore[arg-type]


def test_no_compiler_means_eager(mode, monkeypatch):
    from torch._inductor import cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "_availability", {})
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    mode("on")
    available, reason = kernels.compiler_available("cpu")
    assert not available and "no C++ compiler" in reason
    x = torch.randn(300, 300)
    assert op_path(x) == "fast eager"
    assert kernels.compile_status()["devices"]["cpu"]["available"] is False


def test_compile_failure_falls_back_once(mode, monkeypatch):
    calls = []

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            calls.append(fn.__name__)
            raise RuntimeError("C++ compile error: simulated")

        return compiled

    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    mode("on")
    x = torch.randn(32, 8)
    with pytest.warns(RuntimeWarning, match="simulated"):
        out, _, _ = run(x, torch.tensor(2.5), grad_out=torch.ones(32, 8))
    assert len(calls) == 1  # after the failure the backward did not try again
    assert kernels.compile_status()["devices"]["cpu"]["failed"].startswith("RuntimeError")
    assert op_path(x) == "exact eager"
    torch.testing.assert_close(out.double(), ref_f(x, torch.tensor(2.5), "none"), atol=2e-6, rtol=2e-6)
    mode("on")  # setting the mode again forgets the failure
    assert op_path(x) == "compiled"


# ---------------------------------------------------------------- the fast eager path


FAST_CASES = [
    # (x shape, λ, dim)
    ((256, 257), torch.tensor(1.0), None),
    ((256, 257), torch.tensor(7.3), None),
    ((64, 16, 9, 8), torch.linspace(1.0, 40.0, 16), 1),
    ((300, 240), torch.linspace(1.0, 1e3, 240), -1),
]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize(
    ("shape", "lam", "dim", "dtype"),
    [(*case, torch.float32) for case in FAST_CASES] + [(*FAST_CASES[2], torch.bfloat16)],
)
def test_fast_eager_matches_formulas(mode, approximate, shape, lam, dim, dtype):
    mode("off")
    x = (torch.randn(shape) * 3.0).to(dtype)
    assert op_path(x, lam) == "fast eager"
    lam_b = lam if dim is None else lam.reshape([-1 if d == dim % len(shape) else 1 for d in range(len(shape))])
    g = torch.randn(shape)
    out, gx, gl = run(x, lam, approximate, dim=dim, grad_out=g.to(dtype))
    want_gx, want_gl = ref_grads(x, lam_b, g.to(dtype), approximate)
    atol, rtol = (2e-6, 2e-6) if dtype == torch.float32 else (2e-2, 1e-2)
    assert out.dtype == dtype and gx.dtype == dtype and gl.dtype == lam.dtype
    torch.testing.assert_close(out.double(), ref_f(x, lam_b, approximate), atol=atol, rtol=rtol)
    torch.testing.assert_close(gx.double(), want_gx, atol=atol * 2.5, rtol=rtol * 2.5)
    # ∂L/∂λ sums many terms: fp32 accumulation, tolerance relative to the size of the terms summed
    terms = (g.abs().double() * x.double() ** 2).sum_to_size(lam_b.shape).reshape(lam.shape)
    torch.testing.assert_close(gl.double(), want_gl.reshape(lam.shape), atol=float(terms.max()) * 1e-5, rtol=1e-4)


def test_fast_eager_lambda_one_is_gelu_and_special_values(mode):
    mode("off")
    x = torch.linspace(-10, 10, 2 * FAST_MIN_NUMEL + 1)
    assert op_path(x) == "fast eager"
    assert (lambda_gelu(x, 1.0) - F.gelu(x)).abs().max().item() <= 1e-6
    assert (lambda_gelu(x, 1.0, "tanh") - F.gelu(x, approximate="tanh")).abs().max().item() <= 1e-6
    # +inf → +inf (the vectorised GELU gives NaN), NaN and -inf → NaN, and λx overflowing fp32 → the limit x or -0
    special = torch.tensor([float("inf"), float("nan"), -float("inf"), 3e38, -3e38, 0.0])
    for approximate in ["none", "tanh"]:
        out = lambda_gelu(torch.cat([x, special]), torch.tensor(2.0), approximate)[-6:]
        assert out[0].item() == float("inf") and out[1].isnan() and out[2].isnan()
        assert out[3].item() == pytest.approx(3e38, rel=1e-6) and out[4].item() == 0.0 and out[5].item() == 0.0


@pytest.mark.parametrize("path_mode", ["off", "on"])
def test_saves_only_x_and_lambda_compiled_or_not(mode, path_mode):
    mode(path_mode)
    x = torch.randn(256, 256, requires_grad=True)
    lam = torch.tensor(2.0, requires_grad=True)
    assert op_path(x, lam) == {"off": "fast eager", "on": "compiled"}[path_mode]
    packed: list[torch.Tensor] = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lambda_gelu(x, lam)
    assert [t.data_ptr() for t in packed] == [x.data_ptr(), lam.data_ptr()]
    out.backward(torch.ones_like(out))
    assert x.grad is not None and lam.grad is not None


@pytest.mark.parametrize("z", [-6.0, -8.5, -20.0, -37.0])
def test_exact_path_is_accurate_in_relative_terms_in_the_left_tail(z):
    """fp64 takes the exact path, whose Φ(z) = ½·erfc(−z/√2) does not cancel for z < 0 (``ndtr`` returns 0 below
    z ≈ −8.3 in fp64); f and ∂f/∂x against Python's ``math.erfc``, in relative terms, at λ = 2."""
    lam = 2.0
    x = torch.tensor([z / lam], dtype=torch.float64, requires_grad=True)
    assert op_path(x.detach(), torch.tensor(lam, dtype=torch.float64)) == "exact eager"
    f = lambda_gelu(x, torch.tensor(lam, dtype=torch.float64))
    f.backward()
    cdf = 0.5 * math.erfc(-z / SQRT2)
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    want_f, want_dx = z / lam * cdf, cdf + z * pdf  # ∂f/∂x = Φ(λx) + λx·φ(λx)
    assert want_f != 0.0 and f.item() == pytest.approx(want_f, rel=1e-11)
    assert x.grad.item() == pytest.approx(want_dx, rel=1e-11)


# ---------------------------------------------------------------- compiled kernels (torch.compile)


def _check_compiled(x, lam, dim, approximate="none"):
    lam_b = lam if dim is None else lam.reshape([-1 if d == dim % x.ndim else 1 for d in range(x.ndim)])
    assert op_path(x, lam_b) == "compiled"
    g = torch.randn(x.shape, device=x.device)
    out, gx, gl = run(x, lam, approximate, dim=dim, grad_out=g)
    assert kernels.compile_status()["devices"][x.device.type]["failed"] is None
    layout = "flat" if dim is None else "channel"
    for kernel in ["_kernel_forward", "_kernel_backward"]:  # both ran as compiled functions
        assert any(key[:4] == (kernel, x.device.type, approximate, layout) for key in kernels._compiled), kernel
    want_gx, want_gl = ref_grads(x, lam_b, g, approximate)
    finite = torch.isfinite(x)
    torch.testing.assert_close(out.double()[finite], ref_f(x, lam_b, approximate)[finite], atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(gx.double()[finite], want_gx[finite], atol=5e-6, rtol=5e-6)
    return out, gl, want_gl


def test_compiled_kernels_one_lambda(mode):
    mode("on")
    x = torch.cat([torch.randn(999) * 3, torch.tensor([float("inf"), float("nan"), -float("inf")])])
    lam = torch.tensor(3.7)
    out, gl, want_gl = _check_compiled(x, lam, None)
    assert out[-3].item() == float("inf") and out[-2].isnan() and out[-1].isnan()
    assert gl.isnan()  # NaN inputs give a NaN ∂L/∂λ, as in the exact path
    x = x[:-3]
    out, gl, want_gl = _check_compiled(x, lam, None)
    torch.testing.assert_close(gl.double(), want_gl, atol=1e-4, rtol=1e-5)


def test_compiled_kernels_per_channel(mode):
    mode("on")
    lam = torch.linspace(1.0, 30.0, 6)
    x = torch.randn(4, 6, 5, 3) * 2
    _, gl, want_gl = _check_compiled(x, lam, 1)  # Conv layout (A, C, B)
    torch.testing.assert_close(gl.double(), want_gl.reshape(6), atol=1e-5, rtol=1e-5)



def test_compiled_kernels_static_shapes_then_one_dynamic_graph(mode, monkeypatch):
    """The first STATIC_SHAPES_PER_KEY shapes of a key get kernels of their own; later shapes share a dynamic one."""
    mode("on")
    monkeypatch.setattr(kernels, "STATIC_SHAPES_PER_KEY", 1)
    monkeypatch.setattr(kernels, "_compiled", {})
    lam = torch.tensor(2.2)
    for numel in (300, 517, 733):  # one static shape, then the dynamic graph twice
        _check_compiled(torch.randn(numel) * 3, lam, None)
    forward_keys = [key for key in kernels._compiled if key[0] == "_kernel_forward"]
    static = [key for key in forward_keys if isinstance(key[-1], tuple)]
    assert len(static) == 1 and static[0][-1][0] == (300,)
    assert len(forward_keys) == 2  # + the one dynamic graph for 517 and 733

class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.act1 = LambdaGELU(init=2.5)
        self.act2 = LambdaGELU(init=[1.5] * 8 + [9.0] * 8, num_channels=16, approximate="tanh")

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


def test_model_compiled_whole(mode):
    """A model with LambdaGELU compiles as one graph (fullgraph=True), forward and backward."""
    mode("on")  # even with the op's own compiled path switched on, the outer compile traces the formulas
    torch.manual_seed(0)
    model = _TinyNet()
    x = torch.randn(5, 8)
    kernels_before = len(kernels._compiled)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warnings
        out = compiled(x)
    out.square().sum().backward()
    assert len(kernels._compiled) == kernels_before  # the outer compile traced the formulas, not our kernels
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = model(x)
    want.square().sum().backward()
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def _aten_ops(graph: torch.fx.GraphModule) -> set[str]:
    return {str(node.target).split(".")[1] for node in graph.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("aten.")}


def test_model_compiled_traces_erf_form(mode):
    """Inside a user's torch.compile the gate is written with erf, F.gelu's form, which inductor fuses and vectorises
    (with erfc it ran at 1.9× a compiled GELU on CPU): no erfc in the forward or backward graph, and both graphs
    agree with float64 references (f and ∂L/∂x, ∂L/∂λ of both layers)."""
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func

    mode(None)
    graphs: list[torch.fx.GraphModule] = []

    def keep(graph, _inputs):
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    torch.manual_seed(0)
    model = _TinyNet().double()
    x = torch.randn(64, 8, dtype=torch.float64) * 2
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    out = compiled(x)
    out.square().sum().backward()
    assert len(graphs) == 2
    forward_ops, backward_ops = map(_aten_ops, graphs)
    assert "erf" in forward_ops and "erf" in backward_ops  # act1 (exact form)
    assert "tanh" in forward_ops  # act2 (tanh form)
    assert not (forward_ops | backward_ops) & {"erfc", "special_erfcx", "special_ndtr"}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    kernels.set_compile_mode("off")
    want = model(x)  # eager: the exact path (erfc), fp64
    want.square().sum().backward()
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_dynamic_compile_reads_no_constant_inputs(approximate):
    """Under torch.compile(dynamic=True) the op's graph takes x and λ only: its constants are literals, not module
    floats that dynamo would pass in as f64 tensors (the kernel it built around one ran on a single thread)."""
    from lambda_gelu import ops

    graphs: list[torch.fx.GraphModule] = []

    def keep(graph, _inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    x = torch.randn(300, requires_grad=True)
    lam = torch.tensor(2.5, requires_grad=True)
    compiled = torch.compile(lambda t, l: lambda_gelu(t, l, approximate), dynamic=True, backend=keep)
    out = compiled(x, lam)
    out.sum().backward()
    tensor_inputs = [node for node in graphs[0].graph.nodes
                     if node.op == "placeholder" and isinstance(node.meta.get("example_value"), torch.Tensor)]
    assert len(tensor_inputs) == 2, [node.name for node in tensor_inputs]
    torch.testing.assert_close(out, lambda_gelu(x.detach(), lam.detach(), approximate), atol=1e-6, rtol=1e-6)
    # the literals the formulas use are the constants they name
    assert 0.7071067811865476 == math.sqrt(0.5) and 0.3989422804014327 == ops._INV_SQRT_2PI
    assert 0.7978845608028654 == ops._TANH_C and 0.134145 == 3 * ops._TANH_A


def test_op_path_traced_inside_transforms():
    """op_path says "traced" where a tracer sees the op (here vmap's batched tensors), whatever the size or dtype."""
    seen: list[str] = []

    def probe(row: torch.Tensor) -> torch.Tensor:
        seen.append(op_path(row, 2.0))
        return lambda_gelu(row, 2.0)

    x = torch.randn(3, FAST_MIN_NUMEL, dtype=torch.float64)
    torch.testing.assert_close(torch.vmap(probe)(x), lambda_gelu(x, 2.0), atol=1e-15, rtol=1e-14)
    assert seen == ["traced"]
    assert op_path(x, 2.0) == "exact eager"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels)")
def test_compiled_kernels_cuda(mode):
    if not kernels.compiler_available("cuda")[0]:
        pytest.skip(kernels.compiler_available("cuda")[1])
    mode("on")
    x = torch.randn(64, 33, 7, device="cuda") * 3
    _, gl, want_gl = _check_compiled(x, torch.tensor(2.2, device="cuda"), None)
    torch.testing.assert_close(gl.double(), want_gl, atol=1e-4, rtol=1e-5)
    lam = torch.linspace(1.0, 20.0, 33, device="cuda")
    _, gl, want_gl = _check_compiled(x, lam, 1, approximate="tanh")
    torch.testing.assert_close(gl.double(), want_gl.reshape(33), atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels)")
def test_model_compiled_cuda(mode):
    """A user's torch.compile of a λ-GELU model on CUDA (inductor's Triton kernels): forward and every gradient
    against the same model run eagerly on the CPU in float64."""
    if not kernels.compiler_available("cuda")[0]:
        pytest.skip(kernels.compiler_available("cuda")[1])
    mode(None)
    torch.manual_seed(0)
    model = _TinyNet()
    reference = _TinyNet().double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(257, 8) * 2
    compiled = torch.compile(model.cuda())
    out = compiled(x.cuda())
    out.square().sum().backward()
    want = reference(x.double())
    want.square().sum().backward()
    torch.testing.assert_close(out.cpu().double(), want, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.cpu().double(), q.grad, atol=1e-4, rtol=1e-4, msg=name)

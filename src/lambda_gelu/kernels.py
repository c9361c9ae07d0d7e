"""When the λ-GELU op runs as fused kernels, and the torch.compile machinery that builds them.

The op's forward and backward formulas (:mod:`lambda_gelu.ops`) are plain
PyTorch functions. Run op by op they cost several passes over memory; compiled
by ``torch.compile`` (inductor: C++/OpenMP on CPU, Triton on CUDA) each becomes
one fused loop that reads ``x`` (and the upstream gradient) once and writes one
tensor: the memory traffic of ``F.gelu`` (docs/performance.md has the timings).
This module decides, per call, whether the compiled kernels run, and holds them.

**The decision.** ``mode`` comes from the environment variable
``LAMBDA_GELU_COMPILE`` (read once) or from :func:`set_compile_mode`:

* ``"off"`` (``0``): never compile.
* ``"on"`` (``1``): compile every call that can be compiled, whatever its size.
* ``"auto"`` (the default): compile calls on at least :data:`AUTO_MIN_NUMEL`
  elements. Compiling the forward and backward took 34 s the first time in a
  process on the project's 2-core machine, and 7 s with inductor's on-disk
  cache warm (docs/performance.md), and pays off only on large
  activations: below 2^20 elements (4 MB in fp32) the op costs a few
  milliseconds or less in eager mode, so a short job (a test, a demo on small data) would
  spend far longer compiling than it could save. Large activations come from
  the long training runs that make the compile cost negligible.

A call is never compiled while it is being traced (inside ``torch.compile``,
``torch.export``, ``torch.fx``/``make_fx``, ``torch.jit``, ``vmap``/``grad``
transforms, or on tensor subclasses): there the caller's own tracer sees the
plain formulas, with Φ in F.gelu's erf form (:mod:`lambda_gelu.ops`, the traced
path), and fuses them into its graph, so a model that uses LambdaGELU compiles
whole and its gates cost what GELU's cost there. Whether a compiler exists is decided once per device type (a
C++ compiler for inductor on CPU, Triton on CUDA); if compiling or running a
compiled kernel fails, a :class:`RuntimeWarning` says so once and that device
type uses the eager path from then on. :func:`compile_status` reports all of it.

**Few graphs.** Every compiled function is built for fixed sizes for its first
:data:`STATIC_SHAPES_PER_KEY` shapes (faster kernels), then once with
``dynamic=True`` (one graph serves all further sizes), and each (formula, device, dtypes, layout) key gets a
function object with its own code object, because dynamo keeps one cache (and
one recompile limit) per code object: keys never compete for the limit, and a
key only recompiles for dynamo's 0/1 size specializations.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import types
import warnings
from collections.abc import Callable, Hashable
from typing import Any, Literal

import torch

CompileMode = Literal["auto", "on", "off"]
COMPILE_MODES: tuple[str, ...] = ("auto", "on", "off")

COMPILE_ENV = "LAMBDA_GELU_COMPILE"
"""Environment variable: ``0``/``off``, ``1``/``on`` or ``auto`` (the default when unset)."""

AUTO_MIN_NUMEL = 1 << 20
"""In ``"auto"`` mode, calls on fewer elements than this (4 MB of fp32) run eagerly."""

_ENV_VALUES: dict[str, CompileMode] = {
    "0": "off", "off": "off", "false": "off", "no": "off",
    "1": "on", "on": "on", "true": "on", "yes": "on",
    "auto": "auto", "": "auto",
}

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_mode_override: CompileMode | None = None
_env_mode: CompileMode | None = None
_availability: dict[str, tuple[bool, str]] = {}
_failures: dict[str, str] = {}
_compiled: dict[Hashable, Callable[..., Any]] = {}
_exhausted: set[Hashable] = set()

STATIC_SHAPES_PER_KEY = 4
"""Each kernel key is first compiled for fixed sizes, for up to this many distinct shapes (a training run has one
or two per gate: the full and the last partial batch); any further shape shares one ``dynamic=True`` graph.
Static kernels ran 1.1-1.2× faster than dynamic ones at 2M elements on CPU (docs/performance.md)."""


def _mode_from_env() -> CompileMode:
    global _env_mode
    if _env_mode is None:
        raw = os.environ.get(COMPILE_ENV, "auto").strip().lower()
        if raw not in _ENV_VALUES:
            warnings.warn(
                f"{COMPILE_ENV}={raw!r} is not one of 0, 1, auto; using auto", RuntimeWarning, stacklevel=3
            )
        _env_mode = _ENV_VALUES.get(raw, "auto")
    return _env_mode


def compile_mode() -> CompileMode:
    """The mode in force: the :func:`set_compile_mode` override if any, else ``LAMBDA_GELU_COMPILE``."""
    return _mode_override if _mode_override is not None else _mode_from_env()


def set_compile_mode(mode: CompileMode | None) -> CompileMode | None:
    """Override the compile mode for this process (``None`` returns to the environment's); returns the old override.

    Also forgets earlier compile failures (and exhausted keys), so that compiling is tried again.
    """
    global _mode_override
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES} or None, got {mode!r}")
    with _lock:
        old, _mode_override = _mode_override, mode
        _failures.clear()
        _exhausted.clear()
    return old


def compiler_available(device_type: str) -> tuple[bool, str]:
    """Whether torch.compile can build kernels for ``device_type`` (decided once; with the reason)."""
    if device_type not in _availability:
        _availability[device_type] = _probe(device_type)
    return _availability[device_type]


def _probe(device_type: str) -> tuple[bool, str]:
    if not hasattr(torch, "compile"):
        return False, "this PyTorch has no torch.compile"
    if device_type == "cpu":
        try:
            from torch._inductor import cpp_builder

            compiler = cpp_builder.get_cpp_compiler()
        except Exception as error:  # no compiler found, or inductor cannot load
            return False, f"no C++ compiler for inductor ({type(error).__name__}: {error})"
        if shutil.which(compiler) is None and not os.path.isfile(compiler):
            return False, f"C++ compiler {compiler!r} not found"
        return True, f"inductor C++/OpenMP ({compiler})"
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return False, "torch.utils._triton is missing"
        return (True, "inductor Triton") if has_triton() else (False, "Triton is not installed")
    return False, f"no fused kernels for device type {device_type!r}"


def is_tracing(*tensors: torch.Tensor) -> bool:
    """True inside any tracer or transform that must see the plain formulas instead of a compiled call."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if torch._C._len_torch_dispatch_stack() > 0:  # FakeTensorMode, make_fx proxies, functionalization
        return True
    return any(
        type(t) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors
    )


def use_compiled(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether a call of the op on ``x`` (and ``others``) should run as a compiled kernel."""
    if is_tracing(x, *others):  # first: under torch.compile a size test would add a guard on the size
        return False
    mode = compile_mode()
    if mode == "off" or x.numel() == 0 or (mode == "auto" and x.numel() < AUTO_MIN_NUMEL):
        return False
    device_type = x.device.type
    return device_type not in _failures and compiler_available(device_type)[0]


def active_path(x: torch.Tensor) -> str:
    """``"compiled"`` or ``"eager"``: the path a call of the op on ``x`` takes now (for a layout it can fuse)."""
    return "compiled" if use_compiled(x) else "eager"


def compile_status() -> dict[str, Any]:
    """The compile mode, where it came from, the size threshold, and per device type: available, why, failures."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "mode": compile_mode(),
        "source": "set_compile_mode" if _mode_override is not None else f"{COMPILE_ENV} (or default)",
        "auto_min_numel": AUTO_MIN_NUMEL,
        "devices": {
            device: {
                "available": compiler_available(device)[0],
                "reason": compiler_available(device)[1],
                "failed": _failures.get(device),
            }
            for device in devices
        },
        "compiled_functions": len(_compiled),
        "exhausted_keys": sorted(map(str, _exhausted)),
    }


def _own_code(fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
    """A copy of ``fn`` with a code object of its own (dynamo caches graphs per code object)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}__{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def run_compiled(fn: Callable[..., Any], key: tuple[Hashable, ...], device_type: str, *args: Any) -> Any:
    """Call the compiled version of ``fn`` for ``key`` on ``args``; ``None`` if it cannot run compiled.

    ``key`` must identify everything that changes ``fn``'s graph except sizes
    (formula, dtypes, layout, ...). Tensor arguments are passed detached (the
    caller is an autograd Function), so that ``requires_grad`` never forces a
    recompile. A key that exhausts dynamo's recompile limit (many size-0/1
    specializations) runs eagerly from then on; any other failure is reported
    once per device type (a RuntimeWarning) and turns that device type's
    compiled path off.
    """
    shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
    full_key = (fn.__name__, *key)
    if full_key in _exhausted:
        return None
    compiled = _compiled.get((*full_key, shapes)) or _compiled.get(full_key)
    if compiled is None:
        with _lock:
            compiled = _compiled.get((*full_key, shapes)) or _compiled.get(full_key)
            if compiled is None:
                static_shapes = sum(len(k) == len(full_key) + 1 and k[:-1] == full_key for k in _compiled)
                static = static_shapes < STATIC_SHAPES_PER_KEY
                tag = "_".join(str(part).replace(".", "_") for part in key)
                if static:
                    tag += "__" + "_".join("x".join(map(str, shape)) or "s" for shape in shapes)
                _log.info("lambda_gelu: compiling %s for %s (the first call takes seconds)", fn.__name__, key)
                compiled = torch.compile(_own_code(fn, tag), dynamic=not static, fullgraph=True)
                _compiled[(*full_key, shapes) if static else full_key] = compiled
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    try:
        return compiled(*args)
    except Exception as error:  # compiler missing or broken, unsupported platform, recompile limit, ...
        message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        with _lock:
            if _is_recompile_limit(error):
                _exhausted.add(full_key)
                warnings.warn(
                    f"lambda_gelu: kernel {full_key} hit dynamo's recompile limit ({message}); "
                    "that case runs eagerly from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
            elif device_type not in _failures:
                _failures[device_type] = message
                warnings.warn(
                    f"lambda_gelu: compiling the fused kernel failed on {device_type} ({message}); "
                    "using the eager path from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return None


def _is_recompile_limit(error: BaseException) -> bool:
    limit_errors = tuple(
        getattr(torch._dynamo.exc, name)
        for name in ("FailOnRecompileLimitHit", "RecompileLimitExceeded", "CacheLimitExceeded")
        if hasattr(torch._dynamo.exc, name)
    )
    return isinstance(error, limit_errors)

"""What counts as GELU: the registry of GELU-family module types, the numerical test, and the look-alikes.

A module is GELU-family when

* its type (or a base) is registered (:data:`GELU_REGISTRY`: ``nn.GELU`` and
  whatever :func:`register_gelu_type` added), or
* it is a parameter-free leaf module of a class outside ``torch.nn`` whose
  ``forward``, evaluated in float64 on [-20, 20], equals ``F.gelu`` (erf form)
  or ``F.gelu(..., approximate="tanh")`` within 1e-6·max(1, |x|). This finds
  transformers' GELUActivation, NewGELUActivation, FastGELUActivation, …, and a
  model family's own class (Bloom's ``BloomGelu``) with no hand list and
  without importing transformers.

A parameter-free leaf whose class name says GELU but that computes neither
form (QuickGELU x·σ(1.702x), ClippedGELU) is a *look-alike*: :func:`lambda_gelu.convert`
refuses it rather than silently change the function the model computes.
:func:`register_gelu_type` is the explicit opt-in.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lambda_gelu.ops import Approximate

GRID_LIMIT = 20.0
"""Activations are compared with GELU on [-GRID_LIMIT, GRID_LIMIT] (wide enough to see ClippedGELU's clip at 10)."""

MATCH_TOLERANCE = 1e-6
"""A module is GELU if |f − GELU| <= MATCH_TOLERANCE·max(1, |x|) on the grid (FastGELU's rounded constant: 1e-12)."""

GELU_REGISTRY: dict[type[nn.Module], Callable[[nn.Module], Approximate]] = {
    nn.GELU: lambda module: module.approximate,  # type: ignore[return-value]
}
"""Module types registered as GELU-family, each mapped to a function giving the instance's ``approximate`` form."""

GELU_LOOKALIKES: dict[type[nn.Module], str] = {}
"""Types registered as GELU look-alikes (computing another function), each with the reason."""

FUNCTIONAL_GELU: tuple[Callable[..., Any], ...] = (F.gelu, torch._C._nn.gelu)
"""The functional GELUs: held as an attribute (``activation = F.gelu``) they are gates too."""

_judged: weakref.WeakKeyDictionary[nn.Module, tuple[Approximate | None, float]] = weakref.WeakKeyDictionary()


def register_gelu_type(
    cls: type[nn.Module], approximate: Approximate | Callable[[nn.Module], Approximate] = "none"
) -> None:
    """Let :func:`lambda_gelu.convert` treat modules of type ``cls`` as GELU with the given approximation.

    ``approximate`` is ``"none"``, ``"tanh"``, or a function of the module
    instance that returns one of them. Registering a GELU look-alike (e.g.
    transformers' QuickGELUActivation) accepts that :func:`lambda_gelu.convert`
    changes the function it computes.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_gelu_type expects an nn.Module subclass, got {cls!r}")
    GELU_LOOKALIKES.pop(cls, None)
    GELU_REGISTRY[cls] = approximate if callable(approximate) else (lambda _m, a=approximate: a)


def _grid() -> torch.Tensor:
    return torch.linspace(-GRID_LIMIT, GRID_LIMIT, 4001, dtype=torch.float64)


@torch.no_grad()
def classify_activation(module: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> tuple[Approximate | None, float]:
    """(``"none"`` | ``"tanh"`` | None, largest |f − GELU| on the grid) for an elementwise activation.

    The form is the GELU form the activation computes, or None when it matches
    neither; the number is its deviation from the nearer form. Calls
    ``module.forward`` directly (no hooks run).
    """
    x = _grid()
    run = module.forward if isinstance(module, nn.Module) else module
    y = run(x)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None, float("inf")
    y = y.double()
    scale = x.abs().clamp(min=1.0)
    deviation = {form: (y - F.gelu(x, approximate=form)).abs() for form in ("none", "tanh")}
    best = min(deviation, key=lambda form: float((deviation[form] / scale).max()))
    matches = bool((deviation[best] <= MATCH_TOLERANCE * scale).all())
    return (best if matches else None), float(deviation[best].max())  # type: ignore[return-value]


def _judgeable(module: nn.Module) -> bool:
    """A parameter-free leaf of a class outside torch.nn: an elementwise activation, if anything."""
    cls = type(module)
    if cls.__module__.startswith("torch.") or module._modules:
        return False
    return not any(True for _ in module.parameters(recurse=False)) and not any(True for _ in module.buffers(False))


def _judge(module: nn.Module) -> tuple[Approximate | None, float]:
    """The numerical verdict on ``module`` (cached per instance)."""
    if module not in _judged:
        try:
            _judged[module] = classify_activation(module)
        except Exception:  # not an elementwise function of one float tensor: not an activation we judge
            _judged[module] = (None, float("inf"))
    return _judged[module]


def gelu_approximation(module: nn.Module) -> Approximate | None:
    """The ``approximate`` form (``"none"`` or ``"tanh"``) of a GELU-family module, or None if it is not one."""
    for cls in type(module).__mro__:
        if cls in GELU_REGISTRY:
            return GELU_REGISTRY[cls](module)
        if cls in GELU_LOOKALIKES:
            return None
    if _judgeable(module):
        return _judge(module)[0]
    return None


def is_gelu(module: nn.Module) -> bool:
    """True for GELU-family modules (registered, or found equal to GELU by :func:`classify_activation`)."""
    return gelu_approximation(module) is not None


def lookalike_reason(module: nn.Module) -> str | None:
    """Why ``module`` is a GELU look-alike that :func:`lambda_gelu.convert` refuses, or None if it is not one."""
    for cls in type(module).__mro__:
        if cls in GELU_REGISTRY:
            return None
        if cls in GELU_LOOKALIKES:
            return GELU_LOOKALIKES[cls]
    cls = type(module)
    if "gelu" not in cls.__name__.lower() or not _judgeable(module):
        return None
    form, deviation = _judge(module)
    if form is not None:
        return None
    return (f"{cls.__name__} is neither x·Φ(x) nor its tanh form: it differs from GELU by up to {deviation:.3g} "
            f"on [-{GRID_LIMIT:g}, {GRID_LIMIT:g}]")


def functional_gelu_form(value: Any) -> Approximate | None:
    """The form of a functional GELU held as a value (``F.gelu``, ``partial(F.gelu, approximate=...)``), else None."""
    if any(value is f for f in FUNCTIONAL_GELU):
        return "none"
    if isinstance(value, functools.partial) and any(value.func is f for f in FUNCTIONAL_GELU) and not value.args:
        form = value.keywords.get("approximate", "none")
        return form if form in ("none", "tanh") else None
    return None

"""Swap activations in a model: GELU family → LambdaGELU (``convert``), LambdaGELU → ReLU (``relufy``).

One walker, :func:`replace_modules`, serves both. It visits every (parent,
child-name) link of the module tree, so that an activation object used in two
places is found in both; it selects by a filter that sees the module and its
qualified name; it builds every replacement before it changes anything (a
failure leaves the model untouched); and it maps each old object to one new
object, so shared modules stay shared.
"""

from __future__ import annotations

import inspect
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lambda_gelu.batches import model_device
from lambda_gelu.gates import (
    SmoothGateError,
    SmoothOp,
    example_runner,
    materialize_function_gates,
    preserved_modes,
    raise_on_gates,
    record_gates,
    refresh_fast_path_flags,
)
from lambda_gelu.gelu_types import GELU_REGISTRY, gelu_approximation, is_gelu, lookalike_reason
from lambda_gelu.module import LambdaGELU, guard_lambda_loads

ModuleFilter = Callable[[nn.Module, str], bool]

CONVERTED_ATTR = "lambda_gelu_converted"
"""Attribute set on the root model: the qualified names changed by the last convert/relufy."""


class NoMatchError(ValueError):
    """Raised when a conversion finds no module that matches its types and patterns."""


class NotGELUError(ValueError):
    """Raised by :func:`convert` for a GELU look-alike that is neither x·Φ(x) nor its tanh form."""


class FunctionalGELUWarning(UserWarning):
    """``F.gelu`` is called inside a ``forward``; module replacement cannot reach it."""


class UnconvertibleGateError(SmoothGateError):
    """A gate that no module swap reaches (a functional call, a run-time look-up, hand-written math)."""


@dataclass(frozen=True)
class _Link:
    parent: nn.Module
    attr: str
    name: str
    child: nn.Module


def _links(model: nn.Module) -> list[_Link]:
    """Every (parent, attribute, qualified name, child) link, shared children included."""
    links: list[_Link] = []
    visited: set[int] = set()

    def visit(parent: nn.Module, prefix: str) -> None:
        if id(parent) in visited:
            return
        visited.add(id(parent))
        for attr, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            links.append(_Link(parent, attr, name, child))
            visit(child, name)

    visit(model, "")
    return links


def name_matches(name: str, patterns: Sequence[str]) -> bool:
    """PEFT-style match: exact name, ``.``-suffix, or regex full match."""
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern):
            return True
        try:
            if re.fullmatch(pattern, name):
                return True
        except re.error:
            continue
    return False


def _as_patterns(patterns: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if patterns is None:
        return None
    return (patterns,) if isinstance(patterns, str) else tuple(patterns)


def replace_modules(
    model: nn.Module,
    select: ModuleFilter,
    make: Callable[[nn.Module, str], nn.Module],
) -> list[str]:
    """Replace every child for which ``select(child, name)`` holds by ``make(child, name)``.

    Replacements are all built first, then swapped in, so an exception from
    ``make`` leaves ``model`` unchanged. A module reachable under several names
    is replaced everywhere by one new object if any of its names is selected.
    Does not descend into replaced modules; a replacement takes the train/eval
    mode of the module it replaces. Returns the qualified names changed, in
    module order. The root module itself is never replaced.
    """
    links = _links(model)
    chosen: dict[int, str] = {}
    for link in links:
        if id(link.child) not in chosen and select(link.child, link.name):
            chosen[id(link.child)] = link.name
    # Skip modules nested inside a module that is itself replaced.
    inside_replaced = {
        link.name
        for link in links
        if any(link.name.startswith(chosen_name + ".") for chosen_name in chosen.values())
    }
    replacements: dict[int, nn.Module] = {}
    for link in links:
        key = id(link.child)
        if key in chosen and key not in replacements and link.name not in inside_replaced:
            replacements[key] = make(link.child, chosen[key]).train(link.child.training)  # keep the mode
    changed: list[str] = []
    for link in links:
        new = replacements.get(id(link.child))
        if new is not None and link.name not in inside_replaced:
            setattr(link.parent, link.attr, new)
            changed.append(link.name)
    return changed


def _selector(
    kind: Callable[[nn.Module], bool],
    patterns: tuple[str, ...] | None,
    filter_fn: ModuleFilter | None,
) -> ModuleFilter:
    def select(module: nn.Module, name: str) -> bool:
        return (
            kind(module)
            and (patterns is None or name_matches(name, patterns))
            and (filter_fn is None or filter_fn(module, name))
        )

    return select


def _describe(what: str, patterns: tuple[str, ...] | None, filter_fn: ModuleFilter | None) -> str:
    conditions = []
    if patterns is not None:
        conditions.append(f"names matching {list(patterns)}")
    if filter_fn is not None:
        conditions.append(f"accepted by filter_fn {getattr(filter_fn, '__name__', filter_fn)!r}")
    return what if not conditions else f"{what} with {' and '.join(conditions)}"


def _run(
    model: nn.Module,
    source: Callable[[nn.Module], bool],
    done: Callable[[nn.Module], bool],
    make: Callable[[nn.Module, str], nn.Module],
    patterns: tuple[str, ...] | None,
    filter_fn: ModuleFilter | None,
    what: str,
) -> list[str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    materialize_function_gates(model)  # `activation = F.gelu` becomes an nn.GELU submodule: same function
    changed = replace_modules(model, _selector(source, patterns, filter_fn), make)
    refresh_fast_path_flags(model)  # torch's fused encoder path must compute the gate the layer now holds
    if not changed:
        already = _selector(done, patterns, filter_fn)
        if not any(already(link.child, link.name) for link in _links(model)):
            raise NoMatchError(
                f"no module of {type(model).__name__} matched: looked for "
                f"{_describe(what, patterns, filter_fn)}"
            )
    setattr(model, CONVERTED_ATTR, tuple(changed))
    return changed


def convert(
    model: nn.Module,
    *,
    init: float = 1.0,
    learnable: bool = True,
    num_channels: int | dict[str, int] | Callable[[nn.Module, str], int | None] | None = None,
    channel_dim: int = -1,
    patterns: str | Sequence[str] | None = None,
    filter_fn: ModuleFilter | None = None,
    check_functional: bool = True,
    example: Any = None,
) -> list[str]:
    """Replace every GELU-family activation of ``model`` (in place) by :class:`LambdaGELU`.

    Args:
        model: the model to change in place.
        init, learnable, channel_dim: passed to each new LambdaGELU.
        num_channels: None for one λ per layer; for one λ per channel, an int,
            a dict from qualified name to channel count (see
            :func:`channel_counts`), or a function of (module, name).
        patterns: qualified-name patterns (exact, ``.``-suffix or regex full
            match); only matching activations are converted.
        filter_fn: ``filter_fn(module, name) -> bool``; only accepted ones are converted.
        check_functional: warn (:class:`FunctionalGELUWarning`) about ``F.gelu``
            calls inside ``forward`` methods, which module replacement cannot
            reach; :func:`convert_fx` converts those.
        example: inputs to run the model on once before converting (a tensor,
            a tuple of positional arguments, a mapping of keyword arguments,
            or a callable ``example(model)``):
            a smooth gate that would not become a LambdaGELU (a functional call,
            a run-time look-up, hand-written math) raises
            :class:`UnconvertibleGateError`, naming it, with the model unchanged.

    A functional GELU held as a module attribute (``self.activation = F.gelu``,
    as ``nn.TransformerEncoderLayer(activation="gelu")`` keeps it) becomes an
    ``nn.GELU`` submodule first, and torch's fused encoder-layer path is kept in
    step with the gate the layer holds.

    Returns the qualified names changed (also stored on ``model.lambda_gelu_converted``).
    Modules that are already LambdaGELU are skipped; if nothing matches and
    nothing was already converted, raises :class:`NoMatchError`. A selected
    GELU look-alike (:data:`GELU_LOOKALIKES`) raises :class:`NotGELUError` and
    leaves the model unchanged.
    """
    p = _as_patterns(patterns)
    _refuse_lookalikes(model, _selector(lambda m: lookalike_reason(m) is not None, p, filter_fn))
    if example is not None:
        chosen = _selector(is_gelu, p, filter_fn)
        _refuse_unreachable(model, lambda m, n: isinstance(m, LambdaGELU) or chosen(m, n), example)

    def make(module: nn.Module, name: str) -> nn.Module:
        if isinstance(num_channels, dict):
            if name not in num_channels:
                raise ValueError(f"num_channels has no entry for {name!r}")
            channels = num_channels[name]
        else:
            channels = num_channels(module, name) if callable(num_channels) else num_channels
        new = LambdaGELU(
            init=init,
            learnable=learnable,
            num_channels=channels,
            channel_dim=channel_dim,
            approximate=gelu_approximation(module) or "none",
        )
        return new.to(model_device(model))

    changed = _run(model, is_gelu, lambda m: isinstance(m, LambdaGELU), make, p, filter_fn,
                   f"GELU-family modules {[c.__name__ for c in GELU_REGISTRY]}")
    if check_functional:
        calls = functional_gelu_calls(model)
        if calls:
            warnings.warn(
                f"{len(calls)} functional GELU call(s) not converted (module replacement cannot "
                f"reach them): {', '.join(calls[:5])}; use lambda_gelu.convert_fx(model)",
                FunctionalGELUWarning,
                stacklevel=2,
            )
    guard_lambda_loads(model)  # a bad λ in a later load_state_dict is refused before any weight is copied
    return changed


def _refuse_lookalikes(model: nn.Module, select: ModuleFilter) -> None:
    if not isinstance(model, nn.Module):
        return  # _run reports the type error
    found = [link for link in _links(model) if select(link.child, link.name)]
    if found:
        names = ", ".join(link.name for link in found[:4]) + (", ..." if len(found) > 4 else "")
        raise NotGELUError(
            f"{len(found)} activation(s) look like GELU but are not ({names}): {lookalike_reason(found[0].child)}. "
            f"Converting them would change what the model computes. Leave them out with patterns=/filter_fn=, "
            f"or accept the change explicitly: "
            f"lambda_gelu.register_gelu_type({type(found[0].child).__name__}, 'none')"
        )


@torch.no_grad()
def channel_counts(model: nn.Module, example: Any, channel_dim: int = -1) -> dict[str, int]:
    """Size of ``channel_dim`` of each GELU-family layer's input, from one forward pass on ``example``.

    ``example`` as for :func:`relufy` (a tensor, a tuple, a mapping or a callable). For per-channel
    conversion: ``convert(model, num_channels=channel_counts(model, x), channel_dim=-1)``. A module that
    sees inputs of different widths (one module used in several places) has no channel count:
    :class:`ValueError`, naming it.
    """
    materialize_function_gates(model)
    seen: dict[str, set[int]] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: object) -> None:
            seen.setdefault(name, set()).add(int(inputs[0].shape[channel_dim]))

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if is_gelu(m)]
    try:
        with preserved_modes(model, training=False):
            example_runner(example)(model)
    finally:
        for handle in handles:
            handle.remove()
    mixed = {name: sorted(widths) for name, widths in seen.items() if len(widths) > 1}
    if mixed:
        name, widths = next(iter(mixed.items()))
        raise ValueError(f"{name} is one gate module used at widths {widths}: one λ per channel cannot fit it; "
                         "convert it per layer, or give each use its own module")
    return {name: widths.pop() for name, widths in seen.items()}


def relufy(
    model: nn.Module,
    *,
    patterns: str | Sequence[str] | None = None,
    filter_fn: ModuleFilter | None = None,
    include_gelu: bool = False,
    example: Any = None,
) -> list[str]:
    """Replace every :class:`LambdaGELU` of ``model`` (in place) by ``nn.ReLU``.

    With ``include_gelu=True`` GELU-family modules are swapped too (the
    "direct swap" baseline). Selection, return value and errors as for
    :func:`convert`; modules that are already ``nn.ReLU`` are skipped.

    ``example`` (a tensor: ``model(example)``; a tuple: ``model(*example)``; a
    mapping: ``model(**example)``; a callable: ``example(model)``) makes relufy prove its result: before it
    changes anything it runs the model once and refuses, naming each one
    (:class:`UnconvertibleGateError`), any smooth gate that the swap would not
    reach — a functional ``F.gelu`` in a ``forward``, an activation looked up
    from the config at run time, hand-written GELU math, a gate left out by
    ``patterns`` — and after the swap it checks with :func:`lambda_gelu.assert_relu`
    that no smooth gate runs. Without ``example`` only module gates are seen.

    Every transformers ``PreTrainedModel`` inside ``model`` that is all-ReLU
    afterwards gets ``config.hidden_act = "relu"`` (and every other activation
    field of its config that named a GELU), so ``save_pretrained`` writes a
    model that stock transformers loads as a ReLU model.
    """
    p = _as_patterns(patterns)

    def source(module: nn.Module) -> bool:
        return isinstance(module, LambdaGELU) or (include_gelu and is_gelu(module))

    selected = _selector(source, p, filter_fn)
    if example is not None:  # with no gate module selected, _run's NoMatchError says why, unless worse is found
        nothing = not any(selected(link.child, link.name) for link in _links(model))
        _refuse_unreachable(model, selected, example, only_outside=nothing)
    what = "LambdaGELU modules" + (" and GELU-family modules" if include_gelu else "")
    changed = _run(model, source, lambda m: isinstance(m, nn.ReLU), lambda m, n: nn.ReLU(), p,
                   filter_fn, what)
    if changed and "transformers.modeling_utils" in sys.modules:
        from lambda_gelu.integrations.transformers import set_relu_config

        set_relu_config(model, changed)  # config.hidden_act = "relu", so save_pretrained describes a ReLU model
    if example is not None:
        raise_on_gates(model, record_gates(model, example_runner(example)))
    return changed


def unreachable_gates(model: nn.Module, example: Any, select: ModuleFilter | None = None) -> list[SmoothOp]:
    """The smooth gates that ``model`` computes on ``example`` and that no module swap reaches.

    A gate is reachable when a gate module computes it (one accepted by
    ``select``; default: every λ-GELU and GELU-family module), directly or
    through torch's fused encoder-layer path. What is left is a functional
    call, an activation looked up at run time, or hand-written math.
    ``example`` as for :func:`relufy`.
    """
    materialize_function_gates(model)
    select = select or (lambda m, _n: isinstance(m, LambdaGELU) or is_gelu(m))
    swapped = {link.name for link in _links(model) if select(link.child, link.name)}
    gates = [op for op in record_gates(model, example_runner(example)) if op.gate]
    return [op for op in gates if op.module not in swapped and _fused_activation(op) not in swapped]


def _fused_activation(op: SmoothOp) -> str | None:
    """The activation module behind torch's fused TransformerEncoderLayer GELU (None for any other op)."""
    if op.module_type != "TransformerEncoderLayer" or not op.op.startswith("gelu (fused"):
        return None
    return f"{op.module}.activation" if op.module else "activation"


def refuse_unreachable(model: nn.Module, example: Any) -> None:
    """Raise :class:`UnconvertibleGateError` if ``model`` computes on ``example`` a smooth gate that no λ-GELU or
    GELU-family module computes (what ``relufy(include_gelu=True, example=...)`` would refuse), changing nothing:
    for a caller that must refuse before it changes the model."""
    _refuse_unreachable(model, lambda m, _n: isinstance(m, LambdaGELU) or is_gelu(m), example)


def _refuse_unreachable(model: nn.Module, select: ModuleFilter, example: Any, only_outside: bool = False) -> None:
    """Raise :class:`UnconvertibleGateError` for gates of ``model`` on ``example`` that no selected module computes
    (``only_outside``: only for those that no gate module computes at all)."""
    left = unreachable_gates(model, example, select)
    if not left:
        return
    gate_modules = {name for name, m in model.named_modules() if isinstance(m, LambdaGELU) or is_gelu(m)}
    outside = [op for op in left if op.module not in gate_modules and _fused_activation(op) not in gate_modules]
    if outside:
        raise UnconvertibleGateError(_unreachable_message(model, outside), outside)
    if only_outside:
        return
    shown = "; ".join(str(op) for op in left[:5]) + ("; ..." if len(left) > 5 else "")
    raise UnconvertibleGateError(
        f"{type(model).__name__}: {len(left)} smooth gate(s) would be left out of the swap: {shown}. "
        "Select them too (patterns=/filter_fn=), or swap GELU modules directly with include_gelu=True", left)


def _unreachable_message(model: nn.Module, left: list[SmoothOp]) -> str:
    shown = "; ".join(str(op) for op in left[:5]) + ("; ..." if len(left) > 5 else "")
    return (f"{type(model).__name__} computes {len(left)} smooth gate(s) that no module swap reaches: {shown}. "
            "A functional call, a run-time look-up or hand-written math cannot be hardened and swapped; "
            "replace it by an activation module in the model's code, or leave this model as it is")


_FUNCTIONAL_GELU = (torch.nn.functional.gelu, torch._C._nn.gelu)
_GELU_CALL = re.compile(r"\.gelu\s*\(")


class _Tracer(torch.fx.Tracer):
    """torch.fx tracer that keeps LambdaGELU and GELU-family modules as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LambdaGELU) or is_gelu(m) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    return torch.fx.GraphModule(model, _Tracer().trace(model))


def functional_gelu_calls(model: nn.Module) -> list[str]:
    """Where ``F.gelu`` is called inside a ``forward`` of ``model``.

    Uses ``torch.fx`` tracing when the model traces (exact: the graph nodes);
    otherwise scans the source of each user-defined module class's ``forward``
    for a ``.gelu(`` call (a textual check that names the class).
    """
    try:
        graph = _trace(model).graph
    except Exception:  # untraceable models: fall back to reading the source
        found = []
        for cls in _user_module_classes(model):
            try:
                source = inspect.getsource(cls.forward)
            except (OSError, TypeError):
                continue
            if _GELU_CALL.search(source):
                found.append(f"{cls.__qualname__}.forward")
        return found
    return [node.name for node in graph.nodes if _is_functional_gelu(node)]


def _user_module_classes(model: nn.Module) -> list[type]:
    """Distinct classes of ``model``'s modules, minus torch.nn's own and the GELU family."""
    seen: dict[type, None] = {}
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith("torch.") or isinstance(module, LambdaGELU) or is_gelu(module):
            continue
        seen.setdefault(cls, None)
    return list(seen)


def _is_functional_gelu(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in _FUNCTIONAL_GELU


def convert_fx(
    model: nn.Module, *, init: float = 1.0, learnable: bool = True
) -> tuple[torch.fx.GraphModule, list[str]]:
    """Trace ``model`` with torch.fx and replace functional GELU calls by LambdaGELU submodules.

    Returns a new ``GraphModule`` (the input is not changed) and the names of
    the new submodules (``lambda_gelu_0``, ...). GELU-family modules inside the
    traced model are converted too. Raises :class:`NoMatchError` if the graph
    holds no GELU, and lets torch.fx's error through if the model cannot be
    traced.
    """
    graph_module = _trace(model)
    names: list[str] = []
    for node in list(graph_module.graph.nodes):
        if not _is_functional_gelu(node):
            continue
        approximate = node.kwargs.get("approximate", "none")
        if len(node.args) > 1:
            approximate = node.args[1]
        name = f"lambda_gelu_{len(names)}"
        graph_module.add_submodule(
            name, LambdaGELU(init=init, learnable=learnable, approximate=approximate).to(model_device(model))
        )
        with graph_module.graph.inserting_after(node):
            new_node = graph_module.graph.call_module(name, args=(node.args[0],))
        node.replace_all_uses_with(new_node)
        graph_module.graph.erase_node(node)
        names.append(name)
    graph_module.recompile()
    try:
        names += convert(graph_module, init=init, learnable=learnable, check_functional=False)
    except NoMatchError:
        if not names:
            raise NoMatchError(
                f"{type(model).__name__} holds no GELU: neither a functional call nor a "
                f"GELU-family module"
            ) from None
    return graph_module, names

"""The one inventory of a model's gates: where they sit, what they compute, and proof that none is smooth.

* **Gate modules.** :func:`activation_layers` (λ-GELU and GELU-family modules
  by qualified name), :func:`lambda_layers` (λ-GELU only), :func:`layer_lambdas`.
* **Gates held as functions.** :func:`function_gates` finds a functional GELU
  kept as a module attribute (``self.activation = F.gelu``, as
  ``nn.TransformerEncoderLayer(activation="gelu")`` does), which module
  replacement alone cannot see; :func:`lambda_gelu.convert` turns each into a
  submodule. :func:`refresh_fast_path_flags` keeps torch's fused
  TransformerEncoderLayer path in step with the activation the layer now holds.
* **What actually runs.** :func:`smooth_gates` runs one forward pass and
  records, at the dispatcher, every smooth nonlinearity that ran and the module
  that ran it, and tells gates from other nonlinearities by data flow: a gate
  is an activation op (gelu, silu, softplus, mish, elu, …), a λ-GELU module, the
  fused encoder layer's GELU, or a primitive (erf, tanh, sigmoid, exp) whose
  result multiplies the tensor it was computed from — x·s(x), the shape of every
  hand-written GELU. A pooler's tanh or an attention softmax is reported as a
  nonlinearity, not a gate. :func:`assert_relu` raises :class:`SmoothGateError`
  naming each smooth gate.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from lambda_gelu.gelu_types import functional_gelu_form, gelu_approximation, is_gelu, lookalike_reason
from lambda_gelu.module import LambdaGELU
from lambda_gelu.ops import Approximate

ACTIVATION_OPS = frozenset({"gelu", "silu", "softplus", "mish", "elu", "celu", "selu", "log_sigmoid_forward",
                            "glu", "hardswish", "hardsigmoid"})
"""Aten ops that are smooth (or, for the hard ones, non-ReLU) activations by themselves: always gates."""

PRIMITIVE_OPS = frozenset({"erf", "erfc", "tanh", "sigmoid", "exp", "expm1"})
"""Aten ops that make a gate when their result multiplies their own input (x·Φ(x), x·σ(1.702x), ...)."""

OTHER_OPS = frozenset({"_softmax", "_log_softmax", "_safe_softmax"})
"""Smooth nonlinearities reported as such, never as gates."""

_PASS_THROUGH = frozenset({"_to_copy", "clone", "alias", "detach", "contiguous", "lift_fresh"})
_VIEWS = frozenset({"view", "_unsafe_view", "reshape", "expand", "slice", "select", "unsqueeze", "squeeze",
                    "transpose", "permute", "t", "split", "split_with_sizes", "chunk", "unbind", "narrow",
                    "flatten", "unflatten", "as_strided", "movedim"})


# ---------------------------------------------------------------------------------------------- modes


@contextlib.contextmanager
def preserved_modes(model: nn.Module, training: bool | None = None) -> Iterator[nn.Module]:
    """Within the block, ``model`` is in ``training`` mode (None: as it is); after it, every
    submodule's own mode is restored (a model mixing train and eval submodules keeps the mix)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        if training is not None:
            model.train(training)
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


# ---------------------------------------------------------------------------------------------- inventory


def activation_layers(model: nn.Module) -> dict[str, nn.Module]:
    """LambdaGELU and GELU-family layers of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LambdaGELU) or is_gelu(m)}


def lambda_layers(model: nn.Module) -> dict[str, LambdaGELU]:
    """The LambdaGELU layers of ``model`` by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LambdaGELU)}


def layer_lambda(module: nn.Module) -> torch.Tensor:
    """λ of an activation layer: its hardness for LambdaGELU, 1 for a GELU-family module (float64, CPU)."""
    if isinstance(module, LambdaGELU):
        return module.lam.double().cpu()
    return torch.tensor(1.0, dtype=torch.float64)


def layer_approximation(module: nn.Module) -> Approximate:
    """``"none"`` or ``"tanh"``: the form of an activation layer."""
    if isinstance(module, LambdaGELU):
        return module.approximate  # type: ignore[return-value]
    return gelu_approximation(module) or "none"


def layer_lambdas(model: nn.Module) -> dict[str, float]:
    """Mean λ of every LambdaGELU layer by qualified name (per-channel layers: the channel mean)."""
    return {name: float(m.lam.double().mean()) for name, m in lambda_layers(model).items()}


@dataclass(frozen=True)
class FunctionGate:
    """A functional GELU held as a module attribute: ``getattr(owner, attr)`` is it."""

    owner: nn.Module = field(repr=False)
    attr: str
    name: str
    approximate: Approximate


def function_gates(model: nn.Module) -> list[FunctionGate]:
    """Every functional GELU (``F.gelu``, ``partial(F.gelu, approximate=...)``) held as an attribute of a
    module that is not itself an activation."""
    found = []
    for prefix, module in model.named_modules():
        if isinstance(module, LambdaGELU) or is_gelu(module) or lookalike_reason(module) is not None:
            continue  # an activation module's own implementation (GELUActivation keeps act = F.gelu)
        for attr, value in vars(module).items():
            if attr.startswith("_"):
                continue
            form = functional_gelu_form(value)
            if form is not None:
                found.append(FunctionGate(module, attr, f"{prefix}.{attr}" if prefix else attr, form))
    return found


def materialize_function_gates(model: nn.Module) -> list[str]:
    """Turn every functional GELU held as an attribute into an ``nn.GELU`` submodule of the same form.

    The function the model computes does not change; the gate becomes a module
    that :func:`lambda_gelu.convert` and :func:`lambda_gelu.relufy` can swap.
    Returns the qualified names of the new submodules.
    """
    gates = function_gates(model)
    for gate in gates:
        setattr(gate.owner, gate.attr, nn.GELU(approximate=gate.approximate).train(gate.owner.training))
    refresh_fast_path_flags(model)
    return [gate.name for gate in gates]


def refresh_fast_path_flags(model: nn.Module) -> None:
    """Set every ``nn.TransformerEncoderLayer``'s ``activation_relu_or_gelu`` from the activation it holds now.

    torch reads that flag, set once at construction, on its fused inference
    path: left at 2 ("gelu") after the activation was swapped, the layer would
    keep computing GELU. 1 is ReLU, 2 plain ``nn.GELU``/``F.gelu``, 0 anything
    else (λ-GELU), which takes the layer's ordinary path through its modules.
    """
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            act = module.activation
            if act is torch.nn.functional.relu or isinstance(act, nn.ReLU):
                module.activation_relu_or_gelu = 1
            elif functional_gelu_form(act) == "none" or (type(act) is nn.GELU and act.approximate == "none"):
                module.activation_relu_or_gelu = 2
            else:
                module.activation_relu_or_gelu = 0


# ---------------------------------------------------------------------------------------------- what runs


@dataclass(frozen=True)
class SmoothOp:
    """A smooth nonlinearity that ran: ``op`` (aten name), in ``module`` (qualified name; "" is the root)."""

    op: str
    module: str
    module_type: str
    gate: bool
    calls: int

    def __str__(self) -> str:
        return f"{self.op} in {self.module or '<root>'} ({self.module_type})"


class SmoothGateError(AssertionError):
    """The model computes a smooth gate where a ReLU model must compute ReLU; ``gates`` lists them."""

    def __init__(self, message: str, gates: list[SmoothOp]) -> None:
        super().__init__(message)
        self.gates = gates


@dataclass
class _Flow:
    """Where a tensor came from: ``root`` names the tensor it is an elementwise function of; ``smooth`` holds
    the records of the primitives applied along the way."""

    root: int
    smooth: tuple[list[Any], ...] = ()


class _Recorder(TorchDispatchMode):
    """Records smooth ops at the dispatcher with the innermost running module, and tracks x·s(x) data flow."""

    def __init__(self, stack: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.stack = stack
        self.quiet = 0  # > 0 inside a LambdaGELU, which is reported by its module hook
        self.flows: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.tokens = itertools.count()
        self.events: dict[tuple[str, str], list[Any]] = {}  # (module, op) -> [module_type, gate, calls]

    def event(self, op: str, gate: bool) -> list[Any]:
        name, module = self.stack[-1]
        record = self.events.setdefault((name, op), [type(module).__name__, False, 0])
        record[1] = record[1] or gate
        record[2] += 1
        return record

    def flow(self, tensor: torch.Tensor) -> _Flow:
        found = self.flows.get(tensor)
        if found is None:
            found = _Flow(next(self.tokens))
            self.flows[tensor] = found
        return found

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.quiet:
            return out
        name = func.overloadpacket.__name__
        base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
        outputs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
        if base in ACTIVATION_OPS:
            self.event(base, gate=True)
        elif base == "_transformer_encoder_layer_fwd":
            if bool(args[7] if len(args) > 7 else kwargs.get("use_gelu")):
                self.event("gelu (fused TransformerEncoderLayer path)", gate=True)
        elif base in OTHER_OPS:
            self.event(base, gate=False)
        elif base in _VIEWS and args and isinstance(args[0], torch.Tensor):
            for tensor in outputs:  # a view, slice or chunk keeps its elements' origin
                self.flows[tensor] = self.flow(args[0])
            return out
        elif torch.Tag.pointwise in func.tags or base in _PASS_THROUGH:
            self._pointwise(base, args, kwargs, outputs)
            return out
        for tensor in outputs:
            self.flows[tensor] = _Flow(next(self.tokens))
        return out

    def _pointwise(self, base: str, args: tuple, kwargs: dict, outputs: list[torch.Tensor]) -> None:
        size = max((t.numel() for t in outputs), default=0)
        operands = [t for t in itertools.chain(args, kwargs.values())
                    if isinstance(t, torch.Tensor) and t.is_floating_point()]
        # the data: operands as large as the result; smaller ones broadcast (constants, scales, biases)
        flows = [self.flow(t) for t in operands if t.numel() == size and t.dim() > 0]
        roots = {f.root for f in flows}
        result = _Flow(next(self.tokens))
        if len(roots) == 1:
            smooth: tuple[list[Any], ...] = tuple({id(r): r for f in flows for r in f.smooth}.values())
            result = _Flow(flows[0].root, smooth)
            if base in ("mul", "div") and len(flows) == 2:
                first, second = ({id(r) for r in f.smooth} for f in flows)
                extra = [r for r in flows[1].smooth if id(r) not in first]  # in the second operand only
                if base == "mul":
                    extra += [r for r in flows[0].smooth if id(r) not in second]
                for record in extra:
                    record[1] = True  # x·s(x), or x / (1 + e^−x): the primitive was a gate
                if extra:
                    result = _Flow(next(self.tokens))
            elif base in PRIMITIVE_OPS:
                result = _Flow(flows[0].root, (*smooth, self.event(base, gate=False)))
        elif base in PRIMITIVE_OPS:
            self.event(base, gate=False)
        for tensor in outputs:
            self.flows[tensor] = result


def _run_recorded(model: nn.Module, run: Callable[[nn.Module], Any], training: bool) -> _Recorder:
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    stack: list[tuple[str, nn.Module]] = [("", model)]
    recorder = _Recorder(stack)

    # Global module hooks, not per-module ones: a module with hooks of its own leaves torch's fused paths
    # (TransformerEncoderLayer's among them), and the check must see the path that really runs.
    def enter(module: nn.Module, _inputs: Any) -> None:
        if id(module) not in names:
            return
        stack.append((names[id(module)], module))
        if isinstance(module, LambdaGELU):
            recorder.quiet += 1
            lam = float(module.lam.double().mean())
            recorder.quiet -= 1
            recorder.event(f"lambda_gelu (λ-GELU, λ = {lam:.4g})", gate=True)
            recorder.quiet += 1

    def leave(module: nn.Module, _inputs: Any, _output: Any) -> None:
        if id(module) not in names:
            return
        if isinstance(module, LambdaGELU):
            recorder.quiet -= 1
        stack.pop()

    handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True)]
    try:
        with preserved_modes(model, training), torch.no_grad(), recorder:
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    return recorder


def record_gates(model: nn.Module, run: Callable[[nn.Module], Any], training: bool = False) -> list[SmoothOp]:
    """:func:`smooth_gates` with the model run by ``run(model)`` (for batches that need a calling convention)."""
    recorder = _run_recorded(model, run, training)
    return [SmoothOp(op, module, module_type, gate, calls)
            for (module, op), (module_type, gate, calls) in recorder.events.items()]


def raise_on_gates(model: nn.Module, found: list[SmoothOp]) -> list[SmoothOp]:
    """Raise :class:`SmoothGateError` if ``found`` holds a gate; else return ``found`` (other nonlinearities)."""
    gates = [op for op in found if op.gate]
    if gates:
        shown = "; ".join(str(op) for op in gates[:6]) + ("; ..." if len(gates) > 6 else "")
        raise SmoothGateError(f"{type(model).__name__} still computes {len(gates)} smooth gate(s): {shown}", gates)
    return found


def smooth_gates(model: nn.Module, *args: Any, training: bool = False, **kwargs: Any) -> list[SmoothOp]:
    """Run ``model(*args, **kwargs)`` once (no gradients) and return every smooth nonlinearity that ran.

    Each entry names the aten op, the innermost module whose forward ran it,
    and whether it is a gate (see the module docstring for the rule). The
    pass runs in eval mode (``training=True``: train mode), which is where
    fused inference paths such as ``nn.TransformerEncoderLayer``'s run; every
    submodule's mode is restored afterwards. Entries come in the order they
    first ran.
    """
    return record_gates(model, lambda m: m(*args, **kwargs), training)


def assert_relu(model: nn.Module, *args: Any, training: bool = False, **kwargs: Any) -> list[SmoothOp]:
    """Raise :class:`SmoothGateError` if ``model(*args, **kwargs)`` computes any smooth gate.

    Returns the smooth nonlinearities that ran and are not gates (softmax,
    a pooler's tanh) when there is none.
    """
    return raise_on_gates(model, smooth_gates(model, *args, training=training, **kwargs))


def example_runner(example: Any) -> Callable[[nn.Module], Any]:
    """How to run a model on ``example``: a callable ``run(model)`` as it is; a tensor ``model(t)``;
    a tuple or list ``model(*example)``; a mapping ``model(**example)``."""
    if callable(example) and not isinstance(example, torch.Tensor):
        return example
    if isinstance(example, Mapping):
        return lambda m: m(**example)
    if isinstance(example, (tuple, list)):
        return lambda m: m(*example)
    return lambda m: m(example)

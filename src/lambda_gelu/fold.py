"""Fold λ into the neighbouring layers, so that a λ-GELU model runs (and exports) as a plain GELU model.

f(h; λ) = GELU(λh)/λ. When the gate's input h comes from a layer P whose
output is linear in its weights and bias (Linear, Conv, affine BatchNorm,
LayerNorm) and its output feeds only layers N that are linear in their input
(Linear, Conv), then

    N(f(P(x); λ)) = N'(GELU(P'(x)))   with   P' = λ·P (output channel c scaled by λ_c),
                                              N' = N with input channel c scaled by 1/λ_c,

and the gate becomes ``nn.GELU`` (same ``approximate``): no multiply or divide
by λ is left in the graph. This holds for one λ per layer and for one λ per
channel (the channel dim must be the layers' channel dim: -1 for Linear and
LayerNorm, 1 for Conv and BatchNorm).

:func:`fold_lambda` finds these patterns with ``torch.fx`` and folds only where
the identity is exact:

* P's output goes to the gate and nowhere else; every user of the gate's output
  is such an N, taking it as its only input (directly, or for one λ per layer
  through shape-only steps: flatten/view/reshape/permute/transpose, Dropout,
  Identity, which commute with a scalar factor);
* P, the gate and every N are each called once, and no weight of P or N is
  shared with another module (weight tying would carry the scale elsewhere).

A model whose ``forward`` does not trace as a whole (data-dependent Python
control flow, shape unpacking) is searched in its largest sub-modules that do
trace; such folds are exact unless the untraced code also calls P, the gate or
N directly, which the report flags by naming the traced sub-module. Everything
else is left as it is and reported with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from lambda_gelu.gates import lambda_layers, preserved_modes
from lambda_gelu.module import LambdaGELU

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_BEFORE = (nn.Linear, *_CONVS, *_NORMS, nn.LayerNorm)
_AFTER = (nn.Linear, *_CONVS)
_PASS_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_PASS_METHODS = frozenset({"flatten", "view", "reshape", "permute", "transpose", "contiguous"})
_PASS_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose)


@dataclass(frozen=True)
class FoldDecision:
    """What happened to one LambdaGELU: folded (into ``before`` and ``after``) or not, and why."""

    gate: str
    folded: bool
    reason: str
    before: str | None = None
    after: tuple[str, ...] = ()
    traced_in: str = "<root>"


@dataclass
class FoldReport:
    """The decisions for every LambdaGELU of the model, and the output check if an example was given."""

    decisions: list[FoldDecision] = field(default_factory=list)
    max_abs_diff: float | None = None

    @property
    def folded(self) -> list[str]:
        """Qualified names of the gates that were folded (now ``nn.GELU``)."""
        return [d.gate for d in self.decisions if d.folded]

    @property
    def skipped(self) -> dict[str, str]:
        """Gates left as LambdaGELU, with the reason."""
        return {d.gate: d.reason for d in self.decisions if not d.folded}

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} of {len(self.decisions)} LambdaGELU gate(s)"]
        for d in self.decisions:
            if d.folded:
                where = "" if d.traced_in == "<root>" else f" (traced within {d.traced_in})"
                lines.append(f"  folded  {d.gate}: λ into {d.before}, 1/λ into {', '.join(d.after)}{where}")
            else:
                lines.append(f"  kept    {d.gate}: {d.reason}")
        if self.max_abs_diff is not None:
            lines.append(f"  max |output change| on the example: {self.max_abs_diff:.3g}")
        return "\n".join(lines)


class _Tracer(fx.Tracer):
    """Keeps LambdaGELU (and torch.nn's own modules) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LambdaGELU) or super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Plan:
    gate: str
    before: str
    after: list[str]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _traced_graphs(module: nn.Module, prefix: str = "") -> list[tuple[str, fx.Graph]]:
    """Graphs of ``module`` if it traces, else of its largest sub-modules that do (each with its qualified name)."""
    containers = nn.Sequential | nn.ModuleList | nn.ModuleDict
    if isinstance(module, LambdaGELU) or (
        type(module).__module__.startswith("torch.nn") and not isinstance(module, containers)
    ):
        return []  # a leaf: nothing inside to fold
    if not isinstance(module, nn.ModuleList | nn.ModuleDict):
        try:
            return [(prefix, _Tracer().trace(module))]
        except Exception:  # untraceable forward: search the children instead
            pass
    graphs: list[tuple[str, fx.Graph]] = []
    for name, child in module.named_children():
        graphs += _traced_graphs(child, _join(prefix, name))
    return graphs


def _channel_dim_ok(layer: nn.Module, channel_dim: int) -> bool:
    """Whether a per-channel λ along ``channel_dim`` is along ``layer``'s channel dim."""
    if isinstance(layer, nn.Linear | nn.LayerNorm):
        return channel_dim == -1
    return channel_dim == 1  # Conv, BatchNorm on batched (N, C, ...) input


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, _CONVS):
        return layer.out_channels
    if isinstance(layer, _NORMS):
        return layer.num_features
    return layer.normalized_shape[-1]  # LayerNorm


def _in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


class _Analysis:
    """Finds the foldable (P, gate, N...) patterns of one traced graph."""

    def __init__(self, root: nn.Module, prefix: str, graph: fx.Graph, owners: dict[int, list[str]]) -> None:
        self.root = root
        self.prefix = prefix
        self.graph = graph
        self.owners = owners
        self.calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    def module(self, node: fx.Node) -> nn.Module:
        return self.root.get_submodule(_join(self.prefix, node.target))

    def name(self, node: fx.Node) -> str:
        return _join(self.prefix, node.target)

    def _describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{self.name(node)} ({type(self.module(node)).__name__})"
        if node.op == "placeholder":
            return f"the input of {self.prefix or 'the model'}"
        return f"{getattr(node.target, '__name__', node.target)} ({node.op.replace('_', ' ')})"

    def _shared_weight(self, node: fx.Node) -> str | None:
        for param_name, param in self.module(node).named_parameters(recurse=False):
            holders = self.owners.get(id(param), [])
            if len(holders) > 1:
                return f"{self.name(node)}.{param_name} is shared (held by {', '.join(holders)})"
        return None

    def _single_use(self, node: fx.Node) -> str | None:
        if self.calls.get(node.target, 0) != 1:
            return f"{self.name(node)} is called {self.calls.get(node.target, 0)} times"
        return None

    def _follow(self, node: fx.Node, scalar: bool) -> tuple[list[fx.Node], str | None]:
        """The layers N reached from ``node``'s output through shape-only steps, or the reason there are none."""
        found: list[fx.Node] = []
        for user in node.users:
            if user.op == "call_module" and isinstance(self.module(user), _AFTER):
                if user.args[:1] != (node,) or len(user.args) != 1 or user.kwargs:
                    return [], f"{self.name(user)} takes more than the gate's output"
                found.append(user)
                continue
            if self._passes(user, node, scalar):
                more, why = self._follow(user, scalar)
                if why:
                    return [], why
                found += more
                continue
            if user.op == "output":
                return [], f"its output leaves the traced module {self.prefix or 'model'} (consumers not visible)"
            return [], f"its output feeds {self._describe(user)}, which is not a Linear/Conv layer"
        if not found:
            return [], "its output feeds no layer"
        return found, None

    def _passes(self, user: fx.Node, node: fx.Node, scalar: bool) -> bool:
        """True for a step that commutes with the λ scaling and takes ``node`` as its only tensor."""
        if user.args[:1] != (node,) or any(isinstance(a, fx.Node) for a in (*user.args[1:], *user.kwargs.values())):
            return False
        if user.op == "call_module":
            module = self.module(user)
            if isinstance(module, nn.Identity | nn.Dropout | nn.Dropout1d | nn.Dropout2d | nn.Dropout3d):
                return True
            return scalar and isinstance(module, nn.Flatten)
        if not scalar:
            return False
        if user.op == "call_method":
            return user.target in _PASS_METHODS
        return user.op == "call_function" and user.target in _PASS_FUNCTIONS

    def plan(self, gate_node: fx.Node) -> _Plan | str:
        """The fold for ``gate_node``, or the reason there is none."""
        gate: LambdaGELU = self.module(gate_node)  # type: ignore[assignment]
        why = self._single_use(gate_node)
        if why:
            return why
        if len(gate_node.args) != 1 or gate_node.kwargs:
            return "the gate is called with extra arguments"
        source = gate_node.args[0]
        if not isinstance(source, fx.Node):
            return "its input is not a tensor computed in the graph"
        if not (source.op == "call_module" and isinstance(self.module(source), _BEFORE)):
            return f"its input comes from {self._describe(source)}, not from a Linear/Conv/BatchNorm/LayerNorm layer"
        before = self.module(source)
        if isinstance(before, _NORMS) and not before.affine:
            return f"{self.name(source)} has no affine weight to carry λ"
        if isinstance(before, nn.LayerNorm) and before.weight is None:
            return f"{self.name(source)} has no elementwise weight to carry λ"
        if len(source.users) != 1:
            return f"the output of {self.name(source)} also feeds {len(source.users) - 1} other node(s)"
        scalar = gate.num_channels is None
        afters, why = self._follow(gate_node, scalar)
        if why:
            return why
        for node in [source, *afters]:
            why = self._single_use(node) or self._shared_weight(node)
            if why:
                return why
        if not scalar:
            layers = [(before, _out_channels(before))]
            layers += [(self.module(n), _in_channels(self.module(n))) for n in afters]
            for layer, channels in layers:
                if not _channel_dim_ok(layer, gate.channel_dim):
                    kind = type(layer).__name__
                    return f"per-channel λ along dim {gate.channel_dim} is not the channel dim of {kind}"
                if channels != gate.num_channels:
                    return f"{gate.num_channels} λ values for a {type(layer).__name__} with {channels} channels"
        return _Plan(self.name(gate_node), self.name(source), [self.name(n) for n in afters])


def _parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(name)
    return owners


def _scale_output(layer: nn.Module, lam: torch.Tensor) -> None:
    """P ← λ·P: output channel c of ``layer`` times λ_c (weight rows and bias)."""
    for param in (layer.weight, layer.bias):
        if param is None:
            continue
        if lam.ndim == 0:
            factor = lam
        elif isinstance(layer, nn.LayerNorm):
            factor = lam  # LayerNorm's weight ends in the channel dim
        else:
            factor = lam.reshape(-1, *([1] * (param.ndim - 1)))  # Linear/Conv rows, BatchNorm entries
        param.copy_((param.double() * factor).to(param.dtype))


def _scale_input(layer: nn.Module, lam: torch.Tensor) -> None:
    """N ← N with input channel c divided by λ_c (weight columns; the bias is untouched)."""
    weight = layer.weight
    inv = 1.0 / lam
    if lam.ndim == 0:
        factor = inv
    elif isinstance(layer, nn.Linear):
        factor = inv.reshape(1, -1)
    else:  # Conv: weight (out, in/groups, *k); input channel of weight[o, k] is group(o)·in/groups + k
        groups, out = layer.groups, layer.out_channels
        per_group = inv.reshape(groups, -1)  # (groups, in/groups)
        factor = per_group.repeat_interleave(out // groups, dim=0)  # (out, in/groups)
        factor = factor.reshape(*factor.shape, *([1] * (weight.ndim - 2)))
    weight.copy_((weight.double() * factor).to(weight.dtype))


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


@torch.no_grad()
def fold_lambda(model: nn.Module, example: torch.Tensor | None = None) -> FoldReport:
    """Fold every foldable LambdaGELU of ``model`` (in place) into its neighbours and make it ``nn.GELU``.

    For each LambdaGELU whose input comes from a Linear/Conv/affine-BatchNorm/
    LayerNorm layer P used nowhere else, and whose output feeds only Linear/Conv
    layers N: P's output channels are multiplied by λ, N's input channels by
    1/λ, and the gate is replaced by ``nn.GELU(approximate=...)``, so that the
    model computes the same function with no λ left in its graph. Gates that
    cannot be folded exactly are left alone; the returned :class:`FoldReport`
    says which were folded and why the others were not.

    Args:
        model: the model to change in place (e.g. a copy: ``fold_lambda(copy.deepcopy(m))``).
        example: optional input; if given, the model is run on it (in eval mode)
            before and after, and the largest output change is reported.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    gates = lambda_layers(model)
    reference = None
    if example is not None:
        with preserved_modes(model, training=False):
            reference = model(example)
    owners = _parameter_owners(model)
    gate_names = {id(m): [] for m in gates.values()}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in gate_names:
            gate_names[id(module)].append(name)

    plans: dict[str, _Plan | str] = {}
    traced_in: dict[str, str] = {}
    for prefix, graph in _traced_graphs(model):
        analysis = _Analysis(model, prefix, graph, owners)
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(analysis.module(node), LambdaGELU):
                name = analysis.name(node)
                plans[name] = analysis.plan(node) if len(gate_names[id(gates[name])]) == 1 else (
                    f"the gate is reachable under {len(gate_names[id(gates[name])])} names"
                )
                traced_in[name] = prefix or "<root>"

    # A layer between two gates (Linear → gate → Linear → gate → Linear) is N of one and P of the
    # other: its input columns get 1/λ₁ and its output rows λ₂, which commute.
    report = FoldReport()
    for name, gate in gates.items():
        plan = plans.get(name, "not reached by torch.fx tracing of the model or its sub-modules")
        if isinstance(plan, str):
            report.decisions.append(FoldDecision(name, False, plan, traced_in=traced_in.get(name, "<root>")))
            continue
        lam = gate.lam.double()
        _scale_output(model.get_submodule(plan.before), lam)
        for after in plan.after:
            _scale_input(model.get_submodule(after), lam)
        _set_module(model, name, nn.GELU(approximate=gate.approximate))
        report.decisions.append(
            FoldDecision(name, True, "exact", plan.before, tuple(plan.after), traced_in.get(name, "<root>"))
        )
    if example is not None and reference is not None:
        with preserved_modes(model, training=False):
            folded_out = model(example)
        report.max_abs_diff = float((folded_out - reference).abs().max()) if reference.numel() else 0.0
    return report


__all__ = ["FoldDecision", "FoldReport", "fold_lambda"]

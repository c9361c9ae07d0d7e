"""Affine folds: each change of a gate's function, fitted per channel and folded exactly into the Linear that reads it.

When a gate's function changes from g to h (GELU → ReLU at a swap, or
f(·; λ_old) → f(·; λ_new) while λ hardens), most of what the next layer sees
change is a per-channel shift and scale: E[g(x) − h(x)] pushed through its
weights. For each gate whose output is read by exactly one ``nn.Linear`` with
a bias (and by nothing else), the least-squares fit on real inputs

    a_c = Cov(h(x_c), g(x_c)) / Var(h(x_c)),   b_c = E[g(x_c)] − a_c·E[h(x_c)]

is folded into that Linear: W·(a ⊙ h + b) + β = (W·diag(a))·h + (β + W·b),
which is exact for that reader. Two users:

* :func:`swap_fold_`, the ``swap-fold-distill`` baseline's first half (and the
  swap of :func:`lambda_gelu.reluize` with ``HardenConfig(fold=True)``):
  h = ReLU, and the gate becomes ``nn.ReLU``.
* :class:`TrackingFold` (``HardenConfig(fold=True)``): every forward pass that
  finds a gate's λ moved since the last fold folds the change of the mean,
  b = E[f(x; λ_old) − f(x; λ_new)] (a = 1), fitted on the inputs of that pass,
  before the reader runs. Only the mean: fitted scales multiply from step to
  step, and on channels that are mostly negative their product runs away
  (a review measured 1e-10 to 3e5 over 50 steps), while the mean alone never
  did worse than no fold.

Gates read by no Linear, by several, or by one without a bias, a Linear called
more than once in a pass or on anything but one gate's output, and a Linear
whose weight another module shares, are left unfolded. Only Linear readers are
seen: a gate output that also feeds a residual sum gets the fold on its Linear
path only. A Conv reader is not folded: with zero padding, W·b is not a
constant at the borders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lambda_gelu import distributed
from lambda_gelu.batches import model_device, move_to
from lambda_gelu.convert import refuse_unreachable, relufy
from lambda_gelu.gates import activation_layers, layer_approximation, materialize_function_gates, preserved_modes
from lambda_gelu.module import LambdaGELU
from lambda_gelu.ops import channel_view, lambda_gelu

Run = Callable[[nn.Module, Any], Any]


@dataclass
class _Moments:
    """Per-channel sums of h (the new function's output), g (the old one's), h², h·g over the rows seen."""

    n: int = 0
    sums: torch.Tensor | None = None  # (4, C): Σh, Σg, Σh², Σh·g

    def add(self, new: torch.Tensor, old: torch.Tensor) -> None:
        h = new.detach().double().reshape(-1, new.shape[-1])
        g = old.detach().double().reshape(-1, new.shape[-1])
        sums = torch.stack([h.sum(0), g.sum(0), (h * h).sum(0), (h * g).sum(0)]).cpu()
        self.sums = sums if self.sums is None else self.sums + sums
        self.n += h.shape[0]

    def fit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of the least-squares fit old ≈ a·new + b, per channel (a = 1 where the new output never varies)."""
        n = max(self.n, 1)
        mean_h, mean_g, mean_hh, mean_hg = self.sums / n
        var_h = mean_hh - mean_h * mean_h
        cov = mean_hg - mean_h * mean_g
        varies = var_h > 1e-12 * mean_hh.clamp(min=1e-30)
        a = torch.where(varies, cov / var_h.clamp(min=1e-30), torch.ones_like(var_h))
        return a, mean_g - a * mean_h


@torch.no_grad()
def fold_affine_(linear: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> None:
    """Make ``linear`` read a·h + b where it read h: W ← W·diag(a), β ← β + W·b (W before the scaling)."""
    weight = linear.weight
    shift = weight.double() @ b.to(weight.device)
    weight.mul_(a.to(weight.device, weight.dtype))  # scale input column c by a_c
    linear.bias.add_(shift.to(linear.bias.dtype))


@torch.no_grad()
def sole_linear_readers(
    model: nn.Module, batches: Iterable[Any], run: Run,
    observe: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, nn.Linear]:
    """Each gate of ``model`` whose output is read by exactly one ``nn.Linear`` with a bias and nothing else.

    Runs ``run(model, batch)`` on ``batches`` in eval mode, watching which
    Linear takes each gate's output tensor as its input; ``observe(name, x,
    out)`` sees each gate's input and output on the way.
    """
    gates = activation_layers(model)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # held for the batch, so that no id is reused
    readers: dict[str, set[str]] = {name: set() for name in gates}
    calls: dict[str, int] = {name: 0 for name in linears}
    misfits: set[str] = set()  # Linears called more than once a pass, or on anything but a gate's output
    handles = []
    for name, gate in gates.items():
        def hook(_m: nn.Module, inputs: tuple, out: torch.Tensor, name: str = name) -> None:
            if observe is not None:
                observe(name, inputs[0], out)
            outputs[id(out)] = (name, out)
        handles.append(gate.register_forward_hook(hook))
    for lname, linear in linears.items():
        def pre(_m: nn.Module, inputs: tuple, lname: str = lname) -> None:
            calls[lname] += 1
            source = outputs.get(id(inputs[0]))
            if source is not None and source[1] is inputs[0]:
                readers[source[0]].add(lname)
            else:
                misfits.add(lname)
        handles.append(linear.register_forward_pre_hook(pre))
    device = model_device(model)
    try:
        with preserved_modes(model, training=False):
            for batch in batches:
                outputs.clear()
                calls.update(dict.fromkeys(calls, 0))
                run(model, move_to(batch, device))
                misfits.update(lname for lname, count in calls.items() if count > 1)
    finally:
        for handle in handles:
            handle.remove()
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    found = {}
    for name, reader in readers.items():
        if len(reader) != 1 or not _sole_use(model, name):
            continue
        lname = next(iter(reader))
        linear = linears[lname]
        if lname in misfits or owners.get(id(linear.weight), 0) > 1 or sum(lname in r for r in readers.values()) > 1:
            continue
        if linear.bias is not None:  # without a bias there is nowhere to keep W·b (an added one is lost on reload)
            found[name] = linear
    return found


@dataclass
class AffineFold:
    """What :func:`swap_fold_` did: each gate's consumer and fit, the gates swapped without a fold, and every gate
    swapped (as :func:`lambda_gelu.relufy` reports it)."""

    folded: dict[str, str]
    unfolded: list[str]
    fits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    swapped: list[str]


@torch.no_grad()
def swap_fold_(model: nn.Module, calibration: Iterable[Any], run: Run, example: Any = None) -> AffineFold:
    """Swap every gate of ``model`` (GELU family or λ-GELU) for ReLU, folding each one's affine fit into its sole
    Linear reader.

    ``run(model, batch)`` runs the model on one calibration batch. ``example``
    (as for :func:`lambda_gelu.relufy`) proves the result ReLU; a gate no
    module swap reaches is refused on it before any weight is folded.
    """
    materialize_function_gates(model)
    if example is not None:
        refuse_unreachable(model, example)
    moments: dict[str, _Moments] = {name: _Moments() for name in activation_layers(model)}

    def observe(name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        moments[name].add(x.clamp(min=0), out)  # old: the gate's output, new: ReLU of its input

    readers = sole_linear_readers(model, calibration, run, observe)
    names = {id(m): n for n, m in model.named_modules()}
    folded, fits = {}, {}
    for name in moments:
        a, b = moments[name].fit()
        fits[name] = (a, b)
        linear = readers.get(name)
        if linear is not None and linear.in_features == a.numel():
            fold_affine_(linear, a, b)
            folded[name] = names[id(linear)]
    swapped = relufy(model, include_gelu=True, example=example)
    return AffineFold(folded, [n for n in moments if n not in folded], fits, swapped)


class TrackingFold:
    """Fold every change of a hardening λ into the gate's sole Linear reader, in the forward pass that sees it.

    Each tracked gate remembers the λ it was last folded at. A forward pass
    that finds λ moved fits the change of each channel's mean,
    b = E[f(x; λ_old) − f(x; λ_new)], on (at most :attr:`MAX_ROWS` rows of)
    that pass's inputs x, and folds it into the reader (β ← β + W·b) before
    the reader runs, so the layer after the gate sees, per input feature, the
    mean it saw before the change (a per-channel λ along another dim than the
    reader's, such as dim 1 of (N, C, L), is applied in place and averaged
    over). Under torch.distributed the sums are added over ranks, so every
    rank folds the same b. Layers without a sole Linear reader
    (:func:`sole_linear_readers`) are not tracked (:attr:`readers` holds the
    tracked ones, :attr:`folds` counts the folds). FSDP-sharded readers are
    refused: the fold would reach only the gathered copy.
    """

    MAX_ROWS = 8192

    def __init__(self, model: nn.Module, readers: dict[str, nn.Linear]) -> None:
        layers = {name: m for name, m in model.named_modules() if isinstance(m, LambdaGELU)}
        self.readers = {name: linear for name, linear in readers.items() if name in layers}
        sharded = [name for name, linear in self.readers.items() if distributed.is_sharded(linear.weight)]
        if sharded:
            raise ValueError(f"cannot fold into FSDP-sharded readers of {sharded}; harden without fold")
        self._layers = layers
        self.folded_at: dict[str, torch.Tensor] = {}
        self.reset()
        self.folds = 0
        self._handles = [layers[name].register_forward_pre_hook(self._pre_hook(name)) for name in self.readers]
        # a loaded state (a resumed run's) already holds its folds: start tracking from its λ
        self._handles.append(model.register_load_state_dict_post_hook(lambda _module, _keys: self.reset()))

    def reset(self) -> None:
        """Take every tracked gate's current λ as folded (nothing pending)."""
        self.folded_at = {name: self._layers[name].lam.double() for name in self.readers}

    def _pre_hook(self, name: str):
        @torch.no_grad()
        def hook(module: LambdaGELU, inputs: tuple) -> None:
            current, old = module.lam.double(), self.folded_at[name]
            if torch.equal(current, old):
                return
            new = current
            x = inputs[0].detach()
            if module.num_channels is None or module.channel_dim % x.ndim == x.ndim - 1:
                x = x.reshape(-1, x.shape[-1])[: self.MAX_ROWS].double()  # λ broadcasts along the rows as it is
            else:  # λ along another dim than the one the reader reads: whole leading slices, λ in place
                if module.channel_dim % x.ndim != 0:  # (λ along dim 0: every row is needed)
                    per_slice = max(1, x.numel() // max(1, x.shape[0] * x.shape[-1]))
                    x = x[: max(1, self.MAX_ROWS // per_slice)]
                x = x.double()
                old, new = (channel_view(v, x.ndim, module.channel_dim) for v in (old, new))
            approximate = layer_approximation(module)
            change = lambda_gelu(x, old.to(x.device), approximate) - lambda_gelu(x, new.to(x.device), approximate)
            shift = change.reshape(-1, x.shape[-1]).sum(0)  # per input feature of the reader
            rows = torch.tensor([float(change.numel() // x.shape[-1])], dtype=torch.float64, device=x.device)
            if distributed.is_active():
                shift, rows = distributed.sum_all(shift), distributed.sum_all(rows)
            fold_affine_(self.readers[name], torch.ones_like(shift), shift / rows)
            self.folded_at[name] = current
            self.folds += 1

        return hook

    def remove(self) -> None:
        """Detach from the model (a change not yet seen by a forward pass is not folded)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _sole_use(model: nn.Module, name: str) -> bool:
    """True if the gate module is reachable under one name only (a shared module feeds several readers)."""
    target = dict(model.named_modules(remove_duplicate=False))
    count = sum(1 for n, m in model.named_modules(remove_duplicate=False) if m is target[name])
    return count == 1

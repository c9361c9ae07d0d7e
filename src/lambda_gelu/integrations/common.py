"""What the framework integrations share: calibration on any batch format, λ per layer, a hardening plan.

Plain PyTorch only (no optional package), so a hand-written loop can use it too.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lambda_gelu.calibrate import DEFAULT_TAU, calibrate, layer_targets
from lambda_gelu.module import LambdaGELU
from lambda_gelu.schedule import SHAPES, Hardener

Forward = Callable[[nn.Module, Any], Any]
"""``forward(model, batch)``: runs the model on one batch (its output is ignored by calibration)."""


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch: ``model(**batch)`` for a mapping (a tokenizer's output),
    ``model(batch[0])`` for an (input, target) tuple or list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def move_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (mappings, tuples, lists) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(value, device) for value in batch)
    return batch


class _Batch:
    """One batch in the form :func:`lambda_gelu.calibrate` expects: an object with ``.to(device)``."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def to(self, device: torch.device) -> _Batch:
        return _Batch(move_to(self.batch, device))


class _Runner(nn.Module):
    """Holds ``model`` as its only child and runs it with ``forward`` on a :class:`_Batch`."""

    def __init__(self, model: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.model = model
        self.run = forward

    def forward(self, batch: _Batch) -> Any:
        return self.run(self.model, batch.batch)


def calibrate_with(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward | None = None,
    max_batches: int | None = None,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """:func:`lambda_gelu.calibrate` for batches of any format: dicts of tensors, (input, target) tuples, tensors.

    ``forward(model, batch)`` runs the model (default :func:`default_forward`).
    Returns the samples keyed by ``model``'s own qualified layer names.
    """
    runner = _Runner(model, forward or default_forward)
    samples = calibrate(runner, (_Batch(b) for b in batches), max_batches=max_batches, **kwargs)
    return {name.removeprefix("model."): values for name, values in samples.items()}


def layer_lambdas(model: nn.Module) -> dict[str, float]:
    """Mean λ of every LambdaGELU layer of ``model`` by qualified name (per-channel layers: the channel mean)."""
    return {name: float(m.lam.double().mean()) for name, m in model.named_modules() if isinstance(m, LambdaGELU)}


@dataclass
class HardeningPlan:
    """When and how a framework callback hardens: the settings of :func:`make_hardener`.

    ``start_step`` is the global training step at which calibration runs and
    the schedule begins; λ then moves to its target over ``ramp_steps`` steps
    and holds there. ``calibration_batches`` batches are taken from the
    training data (or from the batches handed to the callback); targets are
    re-derived every ``retarget_every`` steps (0: never).
    """

    start_step: int = 0
    ramp_steps: int = 500
    tau: float = DEFAULT_TAU
    shape: str = "cosine"
    calibration_batches: int = 4
    retarget_every: int = 50

    def __post_init__(self) -> None:
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")
        if self.ramp_steps < 1:
            raise ValueError(f"ramp_steps must be >= 1, got {self.ramp_steps}")
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"tau must be in (0, 1), got {self.tau}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.calibration_batches < 1 or self.retarget_every < 0:
            raise ValueError("calibration_batches must be >= 1 and retarget_every >= 0")


def make_hardener(
    model: nn.Module, batches: list[Any], plan: HardeningPlan, forward: Forward | None = None
) -> Hardener:
    """Calibrate ``model`` on ``batches``, set each LambdaGELU layer's target λ* (D(λ*) <= τ), return a Hardener.

    The Hardener re-targets from the same batches every ``plan.retarget_every`` steps.
    """

    def retarget() -> dict[str, torch.Tensor]:
        return layer_targets(model, calibrate_with(model, batches, forward), plan.tau)

    return Hardener(
        model,
        retarget(),
        total_steps=plan.ramp_steps,
        shape=plan.shape,  # type: ignore[arg-type]
        retarget=retarget if plan.retarget_every else None,
        retarget_every=plan.retarget_every,
    )


class ScheduledHardening:
    """The framework-neutral core of the callbacks: start hardening at ``plan.start_step``, then step it.

    Call :meth:`before_step` once per training step, before the forward pass,
    with the global step (0-based: the number of optimizer steps taken so far)
    and a function that returns calibration batches (used only if
    ``calibration_data`` was not given).
    """

    def __init__(
        self, plan: HardeningPlan | None, forward: Forward | None = None, calibration_data: Iterable[Any] | None = None
    ) -> None:
        self.plan = plan
        self.forward = forward
        self.calibration_data = None if calibration_data is None else list(calibration_data)
        self.hardener: Hardener | None = None
        self.batches: list[Any] = []

    def calibration_batches(self, source: Callable[[], Iterable[Any]] | None) -> list[Any]:
        """The batches calibration looks at: ``calibration_data``, else the first ones ``source()`` yields."""
        if not self.batches:
            if self.calibration_data is not None:
                self.batches = self.calibration_data
            elif source is not None:
                count = self.plan.calibration_batches if self.plan is not None else 4
                self.batches = list(itertools.islice(source(), count))
            if not self.batches:
                raise ValueError("no calibration batches: pass calibration_data= to the callback")
        return self.batches

    def before_step(self, model: nn.Module, step: int, source: Callable[[], Iterable[Any]] | None = None) -> None:
        """Make the Hardener at ``plan.start_step`` (calibrating ``model``), and advance it on every step after."""
        if self.plan is None or step < self.plan.start_step:
            return
        if self.hardener is None:
            batches = self.calibration_batches(source)
            self.hardener = make_hardener(model, batches, self.plan, self.forward)
        self.hardener.step()

    @property
    def done(self) -> bool:
        """True once hardening has run its whole ramp (λ sits at the targets)."""
        return self.hardener is not None and self.hardener.done

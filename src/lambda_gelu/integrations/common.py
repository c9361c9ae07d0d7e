"""What the framework integrations share: when to start the recipe's hardening, and stepping it.

The callbacks do not own the training loop, so they run the recipe's phases
(:func:`lambda_gelu.harden.start_hardening`, then :meth:`lambda_gelu.Hardener.step`
each step, :func:`lambda_gelu.harden.finish_hardening` at the end) inside the
framework's loop. Plain PyTorch only (no optional package).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lambda_gelu.batches import Forward
from lambda_gelu.calibrate import DEFAULT_TAU
from lambda_gelu.harden import finish_hardening, start_hardening
from lambda_gelu.schedule import SHAPES, Hardener


@dataclass
class HardeningPlan:
    """When and how a framework callback hardens: the settings of :func:`lambda_gelu.harden.start_hardening`.

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
            plan = self.plan
            self.hardener = start_hardening(model, batches, tau=plan.tau, total_steps=plan.ramp_steps,
                                            shape=plan.shape, retarget_every=plan.retarget_every,
                                            forward=self.forward)
        self.hardener.step()

    def finish(self) -> None:
        """At the end of training, once the ramp is done: the recipe's last re-target, then λ = λ* exactly."""
        if self.hardener is not None and self.hardener.done:
            finish_hardening(self.hardener)

    @property
    def done(self) -> bool:
        """True once hardening has run its whole ramp (λ sits at the targets)."""
        return self.hardener is not None and self.hardener.done

"""Deterministic hardening: move each λ along a fixed schedule to its target while the weights train."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from lambda_gelu.gates import lambda_layers

Shape = Literal["linear", "cosine"]
SHAPES: tuple[str, ...] = ("linear", "cosine")


def _progress(step: int, total: int, shape: str) -> float:
    """Fraction w ∈ [0, 1] of the way from start to target after ``step`` of ``total`` steps."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if total <= 0:
        raise ValueError(f"total must be a positive number of steps, got {total}")
    t = min(max(step, 0), total) / total
    if shape == "linear":
        return t  # w = t
    return 0.5 * (1.0 - math.cos(math.pi * t))  # w = (1 − cos πt)/2: slow start, slow finish


def lambda_at(
    step: int,
    start: float | torch.Tensor,
    target: float | torch.Tensor,
    total: int,
    shape: Shape = "cosine",
) -> float | torch.Tensor:
    """λ after ``step`` of ``total`` steps: log λ = log start + w·(log target − log start).

    Pure function of its arguments; ``step`` is clamped to [0, total], so
    ``lambda_at(0, ...) == start`` and ``lambda_at(total, ...) == target``.
    ``start`` and ``target`` may be tensors (per-channel λ) of broadcastable shapes.
    """
    w = _progress(step, total, shape)
    if isinstance(start, torch.Tensor) or isinstance(target, torch.Tensor):
        start_t = torch.as_tensor(start, dtype=torch.float64)
        target_t = torch.as_tensor(target, dtype=torch.float64)
        shape = torch.broadcast_shapes(start_t.shape, target_t.shape)
        if w == 0.0:
            return start_t.expand(shape).clone()
        if w == 1.0:
            return target_t.expand(shape).clone()
        return torch.exp(torch.log(start_t) + w * (torch.log(target_t) - torch.log(start_t)))
    if w == 0.0:
        return float(start)
    if w == 1.0:
        return float(target)
    return math.exp(math.log(start) + w * (math.log(target) - math.log(start)))


class Hardener:
    """Drive every LambdaGELU of ``model`` from its current λ to its target λ* over ``total_steps``.

    Call :meth:`step` once per training step, before the forward pass: it sets
    λ = ``lambda_at(k, start, target, total_steps, shape)`` for step k = 1, 2, ...
    so that after ``total_steps`` calls every layer sits at its target. λ's own
    gradient is switched off for the duration (the weights keep training);
    the start is each layer's λ when the Hardener is made, and a target below
    the start is raised to the start (hardening never softens a gate).

    The weights move while λ does, so each layer's pre-activation spread
    drifts and a target fixed at the start can end a little short of the
    tolerance. With ``retarget`` (a function returning fresh targets, e.g.
    from :func:`lambda_gelu.calibrate.layer_targets` on a few batches) and
    ``retarget_every`` = N, the targets are re-derived every N steps; a target
    only ever rises, so λ stays on a monotone path.

    The schedule owns λ only; distillation against the pre-hardening model is
    its own piece (:class:`lambda_gelu.distill.Teacher`).
    """

    def __init__(
        self,
        model: nn.Module,
        targets: dict[str, torch.Tensor | float],
        total_steps: int,
        shape: Shape = "cosine",
        retarget: Callable[[], dict[str, torch.Tensor]] | None = None,
        retarget_every: int = 0,
    ) -> None:
        if retarget_every < 0 or (retarget_every and retarget is None):
            raise ValueError("retarget_every needs a retarget function and must be >= 0")
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
        layers = lambda_layers(model)
        unknown = sorted(set(targets) - set(layers))
        if unknown:
            raise ValueError(f"targets name layers that are not LambdaGELU in the model: {unknown}")
        if not targets:
            raise ValueError("no targets given: nothing to harden")
        self.layers = {name: layers[name] for name in targets}
        self.start = {name: m.lam.double() for name, m in self.layers.items()}
        self.target = {
            name: torch.maximum(torch.as_tensor(targets[name], dtype=torch.float64), self.start[name])
            for name in self.layers
        }
        self.total_steps = total_steps
        self.shape = shape
        self.step_count = 0
        self.retarget = retarget
        self.retarget_every = retarget_every
        for module in self.layers.values():
            module.log_lam.requires_grad_(False)

    def lambdas(self, step: int) -> dict[str, torch.Tensor]:
        """The λ of every hardened layer at ``step`` (clamped to [0, total_steps]; changes nothing)."""
        return {
            name: lambda_at(step, self.start[name], self.target[name], self.total_steps, self.shape)
            for name in self.layers
        }

    def step(self) -> None:
        """Advance one step and set every layer's λ to the schedule's value.

        Calls past ``total_steps`` hold λ at the target (still re-targeting
        every ``retarget_every`` steps), so a loop may keep training after
        the ramp, at the final hardness.
        """
        self.step_count += 1
        if self.retarget_every and self.step_count % self.retarget_every == 0:
            self.update_targets(self.retarget())
        self.set_lambdas(self.step_count)

    def set_lambdas(self, step: int) -> None:
        """Set every layer's λ to the schedule's value at ``step``."""
        for name, lam in self.lambdas(step).items():
            self.layers[name].set_lambda_(lam)

    def update_targets(self, targets: dict[str, torch.Tensor | float]) -> None:
        """Raise each layer's target to ``targets[name]`` where that is higher."""
        for name, value in targets.items():
            if name in self.target:
                self.target[name] = torch.maximum(self.target[name], torch.as_tensor(value, dtype=torch.float64))

    @property
    def done(self) -> bool:
        """True once every layer has reached its target."""
        return self.step_count >= self.total_steps

    def state_dict(self) -> dict[str, object]:
        """What a resumed run needs besides the model: the step, starts and targets."""
        return {
            "step_count": self.step_count,
            "total_steps": self.total_steps,
            "shape": self.shape,
            "start": {k: v.tolist() for k, v in self.start.items()},
            "target": {k: v.tolist() for k, v in self.target.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`'s output (the model's λ must be restored separately)."""
        self.step_count = int(state["step_count"])  # type: ignore[arg-type]
        self.total_steps = int(state["total_steps"])  # type: ignore[arg-type]
        self.shape = str(state["shape"])  # type: ignore[assignment]
        self.start = {k: torch.tensor(v, dtype=torch.float64) for k, v in state["start"].items()}  # type: ignore[union-attr]
        self.target = {k: torch.tensor(v, dtype=torch.float64) for k, v in state["target"].items()}  # type: ignore[union-attr]

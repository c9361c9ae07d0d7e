"""Distillation and the training objective: a frozen teacher, and the loss one training step minimizes.

The teacher is its own piece, beside the λ schedule (:class:`lambda_gelu.Hardener`)
rather than inside it: any method (λ-GELU hardening, swap + distillation,
swap + fold + distillation) can take one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lambda_gelu import distributed
from lambda_gelu.gates import preserved_modes
from lambda_gelu.losses import LOSSES, NEEDS_TEACHER, OUTPUTS, LossFn, OutputFn, cross_entropy, kl, logits


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with no trainable parameter."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class Teacher:
    """A frozen copy of a model, taken now, run on a batch with the student's output function.

    With ``copy=False`` the model itself is the teacher (frozen in place): for a model that cannot be deep-copied,
    such as one sharded by FSDP2's ``fully_shard``, whose teacher the user loads and shards as the student.
    """

    def __init__(self, model: nn.Module, output: OutputFn = logits, copy: bool = True) -> None:
        if copy and any(distributed.is_sharded(p) for p in model.parameters()):
            raise ValueError("an FSDP-sharded model cannot be copied to be its own teacher; pass teacher= (the "
                             "original model, sharded the same way)")
        self.model = frozen_copy(model) if copy else model.eval().requires_grad_(False)
        self.output = output

    @torch.no_grad()
    def __call__(self, batch: Any) -> torch.Tensor:
        """The teacher's output on ``batch`` (eval mode, no gradients)."""
        with preserved_modes(self.model, training=False):
            return self.output(self.model, batch)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher's weights (a resumed run restores them instead of copying the student again)."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.model.load_state_dict(state)


@dataclass
class Objective:
    """The loss of one training step: Σ weight·loss(output(model, batch), batch, teacher(batch)).

    ``terms`` are (weight, loss) pairs over the same output; ``teacher`` is
    needed by the losses that compare with one (``kl``, ``cosine``, ``mse``).
    """

    output: OutputFn = logits
    terms: Sequence[tuple[float, LossFn]] = field(default_factory=lambda: ((1.0, cross_entropy),))
    teacher: Teacher | None = None

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("an objective needs at least one loss term")
        for weight, _loss in self.terms:
            if not weight >= 0.0:
                raise ValueError(f"loss weights must be >= 0, got {weight}")

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The weighted loss of ``model`` on ``batch`` (its output cast to fp32 first)."""
        output = self.output(model, batch).float()
        reference = None if self.teacher is None else self.teacher(batch).float()
        total = None
        for weight, loss in self.terms:
            if weight == 0.0:
                continue
            value = weight * loss(output, batch, reference)
            total = value if total is None else total + value
        return total if total is not None else output.sum() * 0.0


def distilled_cross_entropy(distill_weight: float) -> tuple[tuple[float, LossFn], ...]:
    """The loss terms (1 − w)·CE + w·KL(teacher ‖ model); CE alone for w = 0."""
    if not distill_weight:
        return ((1.0, cross_entropy),)
    return ((1.0 - distill_weight, cross_entropy), (distill_weight, kl))


def make_objective(
    model: nn.Module, loss: str = "cross-entropy", output: str | OutputFn = "logits", distill_weight: float = 0.0,
    teacher: nn.Module | None = None,
) -> Objective:
    """The objective of a built-in loss, with a frozen copy of ``model`` (taken now) as teacher where it needs one.

    ``loss`` is a name from :data:`lambda_gelu.losses.LOSSES`; with
    ``loss="cross-entropy"`` and ``distill_weight`` w > 0 the objective is
    (1 − w)·CE + w·KL(teacher ‖ model). ``teacher`` (a model of the same
    outputs, frozen in place, not copied) replaces the copy: for FSDP-sharded
    models, which cannot be copied.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)}")
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight}")
    output_fn = OUTPUTS[output] if isinstance(output, str) else output
    needs_teacher = loss in NEEDS_TEACHER or (loss == "cross-entropy" and distill_weight > 0)
    if teacher is not None and not needs_teacher:
        raise ValueError(f"teacher= given, but loss {loss!r} (distill_weight {distill_weight}) compares with none")
    frozen = (Teacher(model if teacher is None else teacher, output_fn, copy=teacher is None) if needs_teacher
              else None)
    if loss == "cross-entropy" and distill_weight > 0:
        return Objective(output_fn, distilled_cross_entropy(distill_weight), frozen)
    return Objective(output_fn, ((1.0, LOSSES[loss]),), frozen)

"""A small, deterministic training loop for classifiers, used by the CLI, the demo and the studies."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lambda_gelu.data import Split
from lambda_gelu.optim import param_groups
from lambda_gelu.profile import HardnessRecorder
from lambda_gelu.schedule import Hardener

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """Optimization settings of one training phase.

    The learning rate warms up linearly over ``warmup`` steps, then follows a
    cosine from ``lr`` down to ``lr·final_lr_fraction``; the same factor
    applies to every group, the hardness group (``hardness_lr``) included.
    """

    steps: int = 1000
    lr: float = 3e-3
    weight_decay: float = 0.01
    hardness_lr: float | None = None
    batch_size: int = 64
    optimizer: str = "adamw"
    momentum: float = 0.9
    warmup: int = 50
    final_lr_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return asdict(self)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (with momentum) over :func:`lambda_gelu.param_groups`."""
    groups = param_groups(model, config.lr, config.weight_decay, config.hardness_lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of every group's base lr at ``step`` (0-based)."""
    if config.warmup and step < config.warmup:
        return (step + 1) / config.warmup  # linear warm-up
    span = max(1, config.steps - config.warmup)
    t = min(1.0, (step - config.warmup) / span)
    floor = config.final_lr_fraction
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))  # cosine decay to the floor


def _batches(split: Split, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        yield from split.train_loader(batch_size, seed=seed * 100_003 + epoch)
        epoch += 1


def fit(
    model: nn.Module,
    split: Split,
    config: TrainConfig,
    *,
    hardener: Hardener | None = None,
    distill_weight: float = 0.0,
    recorder: HardnessRecorder | None = None,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """Train ``model`` on ``split`` for ``config.steps`` steps; return the loss of every step.

    With a ``hardener``, its :meth:`~Hardener.step` runs before each forward
    pass (λ follows the schedule while the weights train), and with
    ``distill_weight`` > 0 the loss is (1 − w)·CE + w·KL(teacher ‖ model).
    Raises FloatingPointError if the loss stops being finite.
    """
    if distill_weight and (hardener is None or hardener.teacher is None):
        raise ValueError("distill_weight > 0 needs a Hardener made with distill=True")
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    model.train()
    losses: list[float] = []
    batches = _batches(split, config.batch_size, config.seed)
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, leave=False, mininterval=0.5)
    for step in bar:
        factor = lr_factor(step, config)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=False):
            group["lr"] = base * factor
        if hardener is not None:
            hardener.step()
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))  # (B, C) or (B, T, C)
        if distill_weight:
            loss = (1.0 - distill_weight) * loss + distill_weight * hardener.distillation_loss(logits, x)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if recorder is not None:
            recorder.record(step + 1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return losses

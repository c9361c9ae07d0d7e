"""The ReLU-ization recipe as functions: calibrate → targets → harden (weights train) → relufy."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lambda_gelu import distributed
from lambda_gelu.calibrate import DEFAULT_TAU, calibrate, layer_targets
from lambda_gelu.convert import relufy
from lambda_gelu.data import Split
from lambda_gelu.module import LambdaGELU
from lambda_gelu.resume import Checkpointer
from lambda_gelu.schedule import SHAPES, Hardener
from lambda_gelu.train import FitStats, TrainConfig, fit


@dataclass
class HardenConfig:
    """Settings of the deterministic ReLU-ization.

    ``steps`` training steps in all: λ follows the schedule over the first
    ``ramp_fraction`` of them and holds at its target for the rest, while the
    weights train with ``lr`` (cosine-decayed) on
    (1 − ``distill_weight``)·CE + ``distill_weight``·KL(pre-hardening model ‖ model).
    Targets come from ``calibration_batches`` training batches and are
    re-derived every ``retarget_every`` steps.
    """

    steps: int = 600
    tau: float = DEFAULT_TAU
    shape: str = "cosine"
    ramp_fraction: float = 0.8
    distill_weight: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 0.1
    batch_size: int = 64
    retarget_every: int = 50
    calibration_batches: int = 4
    calibration_batch_size: int = 256
    seed: int = 1
    amp_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"harden steps must be >= 1, got {self.steps}")
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"tau must be in (0, 1), got {self.tau}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if not 0.0 < self.ramp_fraction <= 1.0:
            raise ValueError(f"ramp_fraction must be in (0, 1], got {self.ramp_fraction}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")

    @property
    def ramp_steps(self) -> int:
        """Steps over which λ moves from its start to its target."""
        return max(1, round(self.ramp_fraction * self.steps))

    def train_config(self) -> TrainConfig:
        """The weights' optimization settings during hardening (and the equal-budget fine-tuning)."""
        return TrainConfig(
            steps=self.steps, lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
            warmup=0, seed=self.seed, amp_dtype=self.amp_dtype,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return asdict(self)


def calibration_batches(split: Split, config: HardenConfig) -> list[torch.Tensor]:
    """The first training inputs, in fixed order, that calibration looks at."""
    inputs = split.x_train[: config.calibration_batches * config.calibration_batch_size]
    return list(inputs.split(config.calibration_batch_size))


def harden(
    model: nn.Module,
    split: Split,
    config: HardenConfig,
    progress: bool = True,
    *,
    checkpointer: Checkpointer | None = None,
    stats: FitStats | None = None,
) -> Hardener:
    """ReLU-ize ``model``'s LambdaGELU layers in place up to the swap; returns the Hardener used.

    Calibrates on training data, sets each layer's target λ* (D(λ*) <= τ),
    then trains the weights for ``config.steps`` steps while λ follows the
    schedule. Call :func:`lambda_gelu.relufy` afterwards to swap in ReLU.
    ``checkpointer`` and ``stats`` are passed to :func:`lambda_gelu.train.fit`
    (a run resumed from a state continues its schedule, targets and teacher).
    Under torch.distributed each rank calibrates its share of every
    calibration batch and the samples are gathered, so every rank derives the
    same targets.
    """
    if not any(isinstance(m, LambdaGELU) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no LambdaGELU layer to harden; convert it first")
    batches = calibration_batches(split, config)
    if distributed.is_active():
        batches = [b.tensor_split(distributed.world_size())[distributed.rank()] for b in batches]
    resumed = checkpointer.resume_state if checkpointer is not None else None

    def retarget() -> dict[str, torch.Tensor]:
        return layer_targets(model, calibrate(model, batches), config.tau)

    hardener = Hardener(
        model,
        resumed.get("hardener")["target"] if resumed is not None and resumed.get("hardener") else retarget(),
        total_steps=config.ramp_steps,
        shape=config.shape,  # type: ignore[arg-type]
        distill=config.distill_weight > 0,
        retarget=retarget,
        retarget_every=config.retarget_every,
    )
    fit(model, split, config.train_config(), hardener=hardener, distill_weight=config.distill_weight,
        desc="harden", progress=progress, checkpointer=checkpointer, stats=stats)
    hardener.update_targets(retarget())
    for name, lam in hardener.lambdas(hardener.total_steps).items():
        hardener.layers[name].set_lambda_(lam)
    hardener.teacher = None
    return hardener


def relu_copy(model: nn.Module, include_gelu: bool = False) -> nn.Module:
    """A deep copy of ``model`` with its LambdaGELU (and with ``include_gelu``, GELU) gates swapped for ReLU."""
    swapped = copy.deepcopy(model)
    relufy(swapped, include_gelu=include_gelu)
    return swapped

"""The recipe on the built-in data sets: :func:`lambda_gelu.harden.reluize` on a :class:`~lambda_gelu.data.Split`."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lambda_gelu.affine_fold import swap_fold_
from lambda_gelu.batches import default_forward
from lambda_gelu.convert import relufy
from lambda_gelu.data import Split
from lambda_gelu.harden import HardenConfig, reluize
from lambda_gelu.resume import Checkpointer
from lambda_gelu.schedule import Hardener
from lambda_gelu.train import BatchStream, FitStats

__all__ = ["calibration_batches", "harden", "relu_copy"]


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
    """:func:`~lambda_gelu.harden.reluize` up to the swap on ``split``: returns the Hardener it ran.

    The weights train on shuffled training batches of ``config.batch_size``
    with (1 − w)·CE + w·KL(pre-hardening model ‖ model); targets come from
    :func:`calibration_batches`. Call :func:`lambda_gelu.relufy` afterwards to
    swap in ReLU. The model is left in eval mode.
    """
    result = reluize(model, BatchStream.of_split(split, config.batch_size, config.seed), config=config,
                     calibration=calibration_batches(split, config), swap=False, progress=progress,
                     checkpointer=checkpointer, stats=stats)
    model.eval()
    return result.hardener


def relu_copy(model: nn.Module, include_gelu: bool = False, example: Any = None,
              fold: list[Any] | None = None) -> nn.Module:
    """A deep copy of ``model`` with its LambdaGELU (and with ``include_gelu``, GELU) gates swapped for ReLU.

    With ``example`` the copy is proven ReLU on it (see :func:`lambda_gelu.relufy`). With ``fold``
    (calibration batches) each gate's per-channel affine fit is folded into the Linear that reads it
    (:func:`lambda_gelu.affine_fold.swap_fold_`; every gate is swapped, GELU included).
    """
    swapped = copy.deepcopy(model)
    if fold is not None:
        swap_fold_(swapped, fold, default_forward, example=example)
    else:
        relufy(swapped, include_gelu=include_gelu, example=example)
    return swapped

"""TensorBoard: λ of every layer as scalars, pre-activations (and per-channel λ) as histograms.

Works with any writer that has ``add_scalar`` / ``add_histogram``: a
``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package,
``pip install lambda-gelu[train]``), or Lightning's ``TensorBoardLogger.experiment``.
From a plain loop::

    from torch.utils.tensorboard import SummaryWriter
    from lambda_gelu.integrations.tensorboard import log_lambdas, log_preactivations

    writer = SummaryWriter("runs/tb")
    for step in range(steps):
        ...                                      # one training step
        log_lambdas(writer, model, step)         # scalars  lambda/<layer>
        if step % 100 == 0:
            log_preactivations(writer, lg.calibrate(model, batches), step)   # histograms  preact/<layer>
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from lambda_gelu.gates import lambda_layers

LAMBDA_TAG = "lambda"
PREACT_TAG = "preact"


class ScalarWriter(Protocol):
    """The part of ``SummaryWriter`` used here."""

    def add_scalar(self, tag: str, scalar_value: Any, global_step: int | None = None) -> Any: ...

    def add_histogram(self, tag: str, values: Any, global_step: int | None = None) -> Any: ...


def log_lambdas(writer: ScalarWriter, model: nn.Module, step: int, prefix: str = LAMBDA_TAG) -> dict[str, float]:
    """Write λ of every LambdaGELU layer of ``model`` as scalar ``<prefix>/<layer name>``; return them.

    A per-channel layer gets its channel mean as the scalar and the λ of all
    its channels as histogram ``<prefix>_channels/<layer name>``.
    """
    written = {}
    for name, module in lambda_layers(model).items():
        lam = module.lam.double().cpu()
        written[name] = float(lam.mean())
        writer.add_scalar(f"{prefix}/{name}", written[name], step)
        if lam.numel() > 1:
            writer.add_histogram(f"{prefix}_channels/{name}", lam.numpy(), step)
    return written


def log_preactivations(
    writer: ScalarWriter, samples: dict[str, torch.Tensor], step: int, prefix: str = PREACT_TAG
) -> None:
    """Write each layer's pre-activations as histogram ``<prefix>/<layer>``.

    ``samples`` is what :func:`lambda_gelu.calibrate` returns.
    """
    for name, values in samples.items():
        writer.add_histogram(f"{prefix}/{name}", values.detach().float().flatten().cpu().numpy(), step)


def summary_writer(log_dir: str) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` for ``log_dir``, with a clear error if tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch raises this when the tensorboard package is absent
        raise ImportError("TensorBoard logging needs the tensorboard package: pip install 'lambda-gelu[train]'") \
            from error
    return SummaryWriter(log_dir)

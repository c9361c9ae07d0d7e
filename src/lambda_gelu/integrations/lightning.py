"""PyTorch Lightning: a callback that logs λ per layer and runs the hardening schedule.

::

    import lightning as L
    import lambda_gelu as lg
    from lambda_gelu.integrations.common import HardeningPlan
    from lambda_gelu.integrations.lightning import LambdaGELUCallback

    lg.convert(module.net)          # in configure_optimizers: torch.optim.AdamW(lg.param_groups(self, lr=...))
    callback = LambdaGELUCallback(HardeningPlan(start_step=2000, ramp_steps=500))
    L.Trainer(max_steps=2600, callbacks=[callback]).fit(module, loader)
    lg.relufy(module.net)           # once the ramp is done: exact ReLU

Every training step the callback logs ``lambda/<layer>`` through
``LightningModule.log`` (so to whichever logger the Trainer has, at its
``log_every_n_steps``). At global step ``plan.start_step`` it calibrates the
model on ``plan.calibration_batches`` training batches (or on
``calibration_data``), sets each layer's target λ* and from then on calls
:meth:`lambda_gelu.Hardener.step` before every training step. With
``histogram_every`` = N and a ``TensorBoardLogger``, the pre-activations of the
calibration batches are written as histograms every N steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lambda_gelu.calibrate import calibrate
from lambda_gelu.gates import layer_lambdas
from lambda_gelu.integrations.common import (
    Forward,
    HardeningPlan,
    ScheduledHardening,
)
from lambda_gelu.integrations.tensorboard import LAMBDA_TAG, log_preactivations
from lambda_gelu.schedule import Hardener


class LambdaGELUCallback(Callback):
    """Log λ per layer; run the hardening schedule from ``harden.start_step`` (None: log only).

    Args:
        harden: when and how to harden (:class:`~lambda_gelu.integrations.common.HardeningPlan`).
        calibration_data: batches to calibrate on; default: the first
            ``harden.calibration_batches`` batches of the Trainer's training loader.
        forward: ``forward(model, batch)`` for calibration; default ``model(batch[0])``
            for tuple batches, ``model(**batch)`` for dicts (see
            :func:`~lambda_gelu.integrations.common.default_forward`).
        module: qualified name of the submodule of the LightningModule that
            holds the activations and takes the inputs (default: the
            LightningModule itself, whose ``forward`` must then take the inputs).
        log_lambdas: log ``lambda/<layer>`` every step.
        histogram_every: write pre-activation histograms every N steps (0: never).
    """

    def __init__(
        self,
        harden: HardeningPlan | None = None,
        *,
        calibration_data: Iterable[Any] | None = None,
        forward: Forward | None = None,
        module: str | None = None,
        log_lambdas: bool = True,
        histogram_every: int = 0,
    ) -> None:
        super().__init__()
        if histogram_every < 0:
            raise ValueError(f"histogram_every must be >= 0, got {histogram_every}")
        self.core = ScheduledHardening(harden, forward, calibration_data)
        self.module = module
        self.log_lambdas = log_lambdas
        self.histogram_every = histogram_every

    @property
    def hardener(self) -> Hardener | None:
        """The Hardener once hardening has started, else None."""
        return self.core.hardener

    def _model(self, pl_module: LightningModule) -> nn.Module:
        return pl_module.get_submodule(self.module) if self.module else pl_module

    @staticmethod
    def _loader(trainer: Trainer) -> Any:
        loader = trainer.train_dataloader
        if loader is None or isinstance(loader, (dict, list, tuple)):
            raise ValueError("the training data is not a single loader: pass calibration_data= to LambdaGELUCallback")
        return loader

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.core.before_step(self._model(pl_module), trainer.global_step, lambda: iter(self._loader(trainer)))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        model = self._model(pl_module)
        if self.log_lambdas:
            values = layer_lambdas(model)
            if values:
                pl_module.log_dict({f"{LAMBDA_TAG}/{k}": v for k, v in values.items()}, on_step=True, on_epoch=False)
        step = trainer.global_step
        if self.histogram_every and step % self.histogram_every == 0:
            writer = _tensorboard_writer(trainer)
            if writer is not None:
                batches = self.core.calibration_batches(lambda: iter(self._loader(trainer)))
                log_preactivations(writer, calibrate(model, batches, forward=self.core.forward), step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.core.finish()


def _tensorboard_writer(trainer: Trainer) -> Any:
    """The SummaryWriter of the Trainer's first TensorBoardLogger, or None."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None

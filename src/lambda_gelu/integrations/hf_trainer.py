"""Hugging Face ``Trainer``: a ``TrainerCallback`` that logs λ per layer and runs the hardening schedule.

::

    import lambda_gelu as lg
    from lambda_gelu.integrations.common import HardeningPlan
    from lambda_gelu.integrations.hf_trainer import LambdaGELUTrainerCallback

    lg.convert(model)
    optimizer = torch.optim.AdamW(lg.param_groups(model, lr=5e-5))
    callback = LambdaGELUTrainerCallback(HardeningPlan(start_step=0, ramp_steps=400))
    Trainer(model, args, train_dataset=data, optimizers=(optimizer, None), callbacks=[callback]).train()
    lg.relufy(model)                      # config.hidden_act becomes "relu"
    model.save_pretrained("relu-model")   # loads with stock transformers, no lambda-gelu

Before every optimizer step from ``plan.start_step`` on, the callback calls
:meth:`lambda_gelu.Hardener.step` (calibrating first, on
``plan.calibration_batches`` batches of the training loader or on
``calibration_data``). On every log event it adds ``lambda/<layer>`` to the
record, so the values land in ``trainer.state.log_history`` and reach the
callbacks after it (the progress bar and printer). transformers calls its
reporting integrations (``report_to``) *before* user callbacks, so they do not
see these keys: for TensorBoard give ``tensorboard_dir``, where the callback
writes λ scalars (and, with ``histogram_every``, pre-activation histograms)
itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lambda_gelu.calibrate import calibrate
from lambda_gelu.gates import layer_lambdas
from lambda_gelu.integrations.common import (
    Forward,
    HardeningPlan,
    ScheduledHardening,
)
from lambda_gelu.integrations.tensorboard import LAMBDA_TAG, log_lambdas, log_preactivations, summary_writer
from lambda_gelu.schedule import Hardener


class LambdaGELUTrainerCallback(TrainerCallback):
    """Log λ per layer; run the hardening schedule from ``harden.start_step`` (None: log only).

    Args:
        harden: when and how to harden (:class:`~lambda_gelu.integrations.common.HardeningPlan`).
        calibration_data: batches (dicts of tensors) to calibrate on; default:
            the first ``harden.calibration_batches`` batches of the training loader.
        forward: ``forward(model, batch)`` for calibration; default ``model(**batch)``.
        tensorboard_dir: also write λ scalars (every logging step) to this TensorBoard folder.
        histogram_every: with ``tensorboard_dir``, write pre-activation histograms every N steps (0: never).
    """

    def __init__(
        self,
        harden: HardeningPlan | None = None,
        *,
        calibration_data: Iterable[Any] | None = None,
        forward: Forward | None = None,
        tensorboard_dir: str | None = None,
        histogram_every: int = 0,
    ) -> None:
        if histogram_every < 0:
            raise ValueError(f"histogram_every must be >= 0, got {histogram_every}")
        if histogram_every and tensorboard_dir is None:
            raise ValueError("histogram_every needs tensorboard_dir")
        self.core = ScheduledHardening(harden, forward, calibration_data)
        self.tensorboard_dir = tensorboard_dir
        self.histogram_every = histogram_every
        self.writer: Any = None
        self._source: Any = None

    @property
    def hardener(self) -> Hardener | None:
        """The Hardener once hardening has started, else None."""
        return self.core.hardener

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.tensorboard_dir is not None and self.writer is None and state.is_world_process_zero:
            self.writer = summary_writer(self.tensorboard_dir)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        loader = kwargs.get("train_dataloader")
        # accelerate wraps the loader; iterating its base loader leaves the training iteration's state alone
        source = None if loader is None else (lambda: iter(getattr(loader, "base_dataloader", loader)))
        self._source = source
        self.core.before_step(kwargs["model"], state.global_step, source)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.writer is None:
            return
        model = kwargs["model"]
        if args.logging_steps and state.global_step % max(1, int(args.logging_steps)) == 0:
            log_lambdas(self.writer, model, state.global_step)
        if self.histogram_every and state.global_step % self.histogram_every == 0:
            batches = self.core.calibration_batches(self._source)
            log_preactivations(self.writer, calibrate(model, batches, forward=self.core.forward), state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ):
        values = {f"{LAMBDA_TAG}/{name}": value for name, value in layer_lambdas(kwargs["model"]).items()}
        if logs is not None and values:
            logs.update(values)
            if state.log_history:
                state.log_history[-1].update(values)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.core.finish()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

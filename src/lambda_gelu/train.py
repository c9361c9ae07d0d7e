"""The one training loop: any model, any batches, any objective; deterministic, resumable, DDP-ready.

:func:`train_loop` trains ``model`` on an endless :class:`BatchStream` of
batches of any format for ``config.steps`` steps, minimizing an
:class:`~lambda_gelu.distill.Objective` (a loss on an output of the model,
optionally against a frozen teacher), with an optional λ schedule
(:class:`~lambda_gelu.Hardener`) stepped before each forward pass.
:func:`fit` is the same loop on a built-in data set's :class:`~lambda_gelu.data.Split`.

Reliability (docs/reliability.md):

* **Resume.** With a :class:`~lambda_gelu.resume.Checkpointer`, :func:`fit` saves
  its whole run state (weights, optimizer, schedule, data position, every RNG)
  every ``every`` steps and when a SIGTERM/SIGINT arrives, and a fit given a
  checkpointer that holds a state continues from it; on CPU the resumed run
  ends bitwise equal to an uninterrupted one.
* **Non-finite steps.** A step whose loss or any gradient is not finite is
  skipped (no weight update; λ's schedule and the data order move on as usual)
  and counted in :class:`FitStats`. More than ``max_bad_steps`` such steps in a
  row stop the run with :class:`NonFiniteError`, after saving the (still
  finite) state; weights that become non-finite in an update also stop it,
  naming the last good state on disk.
* **Mixed precision.** ``amp_dtype`` runs the forward pass under
  ``torch.autocast`` (bf16, or fp16 with a GradScaler); weights, λ and λ's
  gradient stay fp32.
* **Several processes.** Under ``torchrun`` the model is wrapped in
  DistributedDataParallel and each rank trains on its share of the same global
  batch (:mod:`lambda_gelu.distributed`); the result equals a one-process run
  with that batch, up to the order of floating-point sums.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lambda_gelu import distributed
from lambda_gelu.batches import model_device, move_to
from lambda_gelu.checkpoint import CheckpointError, check_weights
from lambda_gelu.data import Split
from lambda_gelu.distill import Objective, Teacher, distilled_cross_entropy
from lambda_gelu.gates import lambda_layers, preserved_modes
from lambda_gelu.losses import logits
from lambda_gelu.optim import param_groups
from lambda_gelu.profile import HardnessRecorder
from lambda_gelu.resume import (
    Checkpointer,
    GracefulStop,
    RunState,
    TrainingInterrupted,
    graceful_stop,
    rng_state,
    set_rng_state,
    stop_requested,
)
from lambda_gelu.schedule import Hardener

OPTIMIZERS = ("adamw", "sgd")
AMP_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_BAD_STEPS = 10

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Training stopped on non-finite numbers; ``last_good`` is the newest finite run state on disk (or None)."""

    def __init__(self, message: str, last_good: Any = None) -> None:
        super().__init__(message)
        self.last_good = last_good


@dataclass
class TrainConfig:
    """Optimization settings of one training phase.

    The learning rate warms up linearly over ``warmup`` steps, then follows a
    cosine from ``lr`` down to ``lr·final_lr_fraction``; the same factor
    applies to every group, the hardness group (``hardness_lr``) included.
    ``amp_dtype`` ("bfloat16" or "float16") runs forward passes under autocast;
    ``max_bad_steps`` is how many non-finite steps in a row are skipped before
    the run stops.
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
    amp_dtype: str | None = None
    max_bad_steps: int = DEFAULT_MAX_BAD_STEPS

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.amp_dtype is not None and self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"amp_dtype must be one of {sorted(AMP_DTYPES)} or None, got {self.amp_dtype!r}")
        if self.max_bad_steps < 0:
            raise ValueError(f"max_bad_steps must be >= 0, got {self.max_bad_steps}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return asdict(self)


@dataclass
class FitStats:
    """What a :func:`fit` call did besides training: resumption, steps run, skipped steps (1-based), saved states."""

    start_step: int = 0
    steps_run: int = 0
    skipped: list[int] = field(default_factory=list)
    scaler_skips: int = 0
    saved: list[str] = field(default_factory=list)

    @property
    def resumed(self) -> bool:
        """True if the call continued a saved run."""
        return self.start_step > 0


def make_optimizer(
    model: nn.Module, config: TrainConfig, groups: list[dict[str, Any]] | None = None
) -> torch.optim.Optimizer:
    """AdamW or SGD (with momentum) over :func:`lambda_gelu.param_groups` (or over ``groups`` if given)."""
    if groups is None:
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


class BatchStream:
    """The endless, seeded stream of training batches, resumable at any position.

    Epoch e is ``open_epoch(e)`` in full; :meth:`state_dict` is the position
    (epoch, batches taken from it), and a stream restored from it yields
    exactly the batches that would have come next.
    """

    def __init__(self, open_epoch: Callable[[int], Iterable[Any]], name: str = "the training batches") -> None:
        self.open_epoch, self.name = open_epoch, name
        self.epoch, self.index = 0, 0
        self._iter: Iterator[Any] | None = None

    @classmethod
    def of_split(cls, split: Split, batch_size: int, seed: int) -> BatchStream:
        """Epoch e of ``split``'s training set: ``split.train_loader(batch_size, seed=seed·100003 + e)``."""
        if len(split.x_train) == 0:
            raise ValueError(f"{split.name}: no training examples")
        return cls(lambda epoch: split.train_loader(batch_size, seed=seed * 100_003 + epoch), split.name)

    @classmethod
    def of_batches(cls, batches: Iterable[Any], seed: int) -> BatchStream:
        """Epochs of a user's batches (a DataLoader, a list): each epoch opened under torch's RNG seeded with
        ``seed·100003 + e``, so a shuffling DataLoader's order depends on the seed alone."""
        def open_epoch(epoch: int) -> Iterator[Any]:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 100_003 + epoch)
                iterator = iter(batches)
                first = next(iterator, _END)  # a sampler draws its order at its first batch: under the seed too
            if first is not _END:
                yield first
                yield from iterator

        return cls(open_epoch)

    def _open(self) -> None:
        self._iter = iter(self.open_epoch(self.epoch))
        for _ in range(self.index):  # fast-forward to the saved position
            next(self._iter)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self._iter is None:
            self._open()
        batch = next(self._iter, _END)  # type: ignore[arg-type]
        if batch is _END:
            if self.index == 0:
                raise ValueError(f"{self.name} yielded no batch" + (" in a later epoch: pass a re-iterable "
                                 "(a DataLoader or a list), not an iterator" if self.epoch else ""))
            self.epoch, self.index = self.epoch + 1, 0
            self._open()
            batch = next(self._iter, _END)  # type: ignore[arg-type]
            if batch is _END:
                raise ValueError(f"{self.name} ran out after one epoch: pass a re-iterable "
                                 "(a DataLoader or a list), not an iterator")
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position in the data order."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict` position."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._iter = None


_END = object()


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """True if every element of every tensor is finite (one reduction per tensor, one sync).

    FSDP-sharded tensors are checked on this rank's shard, and the answer is agreed over the ranks, so that
    every rank takes (or skips) the same step.
    """
    present = [t.detach() for t in tensors if t is not None]
    if any(distributed.is_sharded(t) for t in present):
        local = [t.to_local() if distributed.is_sharded(t) else t for t in present]
        return not distributed.any_rank(not _all_finite_here([t for t in local if t.numel()]))
    return _all_finite_here(present)


def _all_finite_here(present: list[torch.Tensor]) -> bool:
    if not present:
        return True
    try:
        largest = torch._foreach_norm(present, float("inf"))  # max |t|: NaN and ±inf propagate, nothing overflows
    except (RuntimeError, TypeError, AttributeError):  # a tensor kind the fused norm does not take
        return all(bool(torch.isfinite(t).all()) for t in present)
    device = largest[0].device
    return bool(torch.isfinite(torch.stack([v.float().to(device) for v in largest])).all())  # the one sync


SETTING_DEFAULTS: dict[str, Any] = {"fold": False}
"""The value of each run-state setting in a state saved before the setting existed."""


@dataclass
class _Run:
    """The objects whose state a run checkpoint holds."""

    model: nn.Module
    config: TrainConfig
    optimizer: torch.optim.Optimizer
    scaler: Any
    hardener: Hardener | None
    teacher: Teacher | None
    stream: BatchStream
    recorder: HardnessRecorder | None
    losses: list[float]
    stats: FitStats
    settings: dict[str, Any] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "config": self.config.to_dict(),
            "settings": dict(self.settings),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data": self.stream.state_dict(),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "skipped": list(self.stats.skipped),
            "rng": distributed.gather_objects(rng_state()),  # one entry per rank
        }
        if self.scaler is not None:
            body["scaler"] = self.scaler.state_dict()
        if self.hardener is not None:
            body["hardener"] = self.hardener.state_dict()
        if self.teacher is not None:
            body["teacher"] = self.teacher.state_dict()
        if self.recorder is not None:
            body["recorder"] = list(self.recorder.rows)
        return body

    def restore(self, saved: RunState) -> int:
        """Load ``saved`` into the run's objects (RNG last); returns the step to continue from."""
        body, path = saved.body, saved.path
        if (self.hardener is None) != ("hardener" not in body):
            what = "with" if "hardener" in body else "without"
            raise CheckpointError(f"{path}: saved by a run {what} a Hardener; this run differs")
        for mine, theirs in (
            (self.config.to_dict(), body.get("config", {})),
            # a setting an older state does not hold had its default then (states before fold: no fold)
            ({**SETTING_DEFAULTS, **self.settings}, {**SETTING_DEFAULTS, **body.get("settings", {})}),
        ):
            differing = [k for k in sorted(set(mine) | set(theirs)) if theirs.get(k) != mine.get(k)]
            if differing:
                k = differing[0]
                raise CheckpointError(f"{path}: saved by a run with {k}={theirs.get(k)!r}, this run has "
                                      f"{k}={mine.get(k)!r}; resume with the same settings")
        if len(body["losses"]) != saved.step:
            raise CheckpointError(f"{path}: holds {len(body['losses'])} losses for step {saved.step}")
        check_weights(path, self.model, body["model"], finite=True)
        self.model.load_state_dict(body["model"])
        try:
            self.optimizer.load_state_dict(body["optimizer"])
            if self.scaler is not None:
                self.scaler.load_state_dict(body["scaler"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"{path}: optimizer state does not fit ({error})") from None
        if self.hardener is not None:
            hardener_state = body["hardener"]
            if set(hardener_state["target"]) != set(self.hardener.layers):
                raise CheckpointError(f"{path}: hardens layers {sorted(hardener_state['target'])}, "
                                      f"this run hardens {sorted(self.hardener.layers)}")
            self.hardener.load_state_dict(hardener_state)
        if self.teacher is not None:
            if "teacher" not in body:
                raise CheckpointError(f"{path}: holds no distillation teacher")
            check_weights(path, self.teacher.model, body["teacher"], finite=True)
            self.teacher.load_state_dict(body["teacher"])
        self.stream.load_state_dict(body["data"])
        self.losses[:] = body["losses"].tolist()
        self.stats.skipped = [int(s) for s in body.get("skipped", [])]
        if self.recorder is not None:
            self.recorder.rows = list(body.get("recorder", []))
        rngs = body["rng"]
        set_rng_state(rngs[distributed.rank()] if len(rngs) == distributed.world_size() else rngs[0])
        return saved.step


FSDP_NO_STATES = ("resumable run states of an FSDP-sharded model are not supported; run without a checkpointer "
                  "(or with DDP)")


def train_loop(
    model: nn.Module,
    stream: BatchStream,
    objective: Objective,
    config: TrainConfig,
    *,
    hardener: Hardener | None = None,
    recorder: HardnessRecorder | None = None,
    desc: str = "train",
    progress: bool = True,
    checkpointer: Checkpointer | None = None,
    stats: FitStats | None = None,
    optimizer_groups: list[dict[str, Any]] | None = None,
    training: bool = True,
    settings: dict[str, Any] | None = None,
) -> list[float]:
    """Train ``model`` for ``config.steps`` steps on ``stream``, minimizing ``objective``; return every step's loss.

    Each step: the learning rate follows :func:`lr_factor`; ``hardener.step()``
    moves λ along its schedule; the next batch is moved to the model's device
    (and, under torch.distributed, cut into this rank's rows); the loss is
    ``objective(model, batch)`` (under autocast with ``config.amp_dtype``);
    then backward and the optimizer step. ``optimizer_groups`` replaces
    :func:`lambda_gelu.param_groups`. The model trains in ``training`` mode
    (False: dropout off, as for distilling a pretrained model) and is returned
    with every submodule's own mode as it was before.

    With a ``checkpointer`` the run saves its state as it declares and after its
    last step (the caller clears it once its outputs are written), and on the
    first SIGTERM/SIGINT saves it and raises
    :class:`~lambda_gelu.resume.TrainingInterrupted`; if the checkpointer holds a
    state to resume (``Checkpointer(..., resume=True)``), the run continues from
    it and returns every step's loss, the earlier ones included; ``settings``
    (plain values, such as whether changes of λ are folded into the weights)
    are saved with the state, and a resume with other settings is refused. A non-finite
    step is skipped (its loss, NaN or inf, is still returned) and recorded in
    ``stats``; :class:`NonFiniteError` (a FloatingPointError) stops the run
    after more than ``config.max_bad_steps`` of them in a row.
    """
    stats = FitStats() if stats is None else stats
    device = model_device(model)
    torch.manual_seed(config.seed)
    if distributed.reshard(model) and checkpointer is not None:  # the optimizer must hold the sharded parameters
        raise ValueError(FSDP_NO_STATES)
    optimizer = make_optimizer(model, config, optimizer_groups)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    scaler = torch.amp.GradScaler(device.type) if config.amp_dtype == "float16" else None
    run = _Run(model, config, optimizer, scaler, hardener, objective.teacher, stream, recorder, [], stats,
               dict(settings or {}))
    start = 0
    if checkpointer is not None and checkpointer.resume_state is not None:
        start = run.restore(checkpointer.resume_state)
    stats.start_step = start
    params = [p for group in optimizer.param_groups for p in group["params"]]
    amp = AMP_DTYPES.get(config.amp_dtype or "")
    engine = distributed.wrap(model)
    bad_run = 0
    bar = tqdm(range(start, config.steps), desc=desc, disable=not progress, leave=False, mininterval=0.5,
               initial=start, total=config.steps)
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserved_modes(model, training))
        if checkpointer is not None:
            stack.enter_context(graceful_stop())
        watch = GracefulStop._active is not None
        for step in bar:
            factor = lr_factor(step, config)
            for group, base in zip(optimizer.param_groups, base_lrs, strict=False):
                group["lr"] = base * factor
            if hardener is not None:
                hardener.step()
            batch, share = distributed.shard(move_to(next(run.stream), device))
            with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                loss = objective(engine, batch)
            if not distributed.is_active():
                target, value = loss, loss.item()
            elif share == 0.0:  # this rank holds no rows of a tiny last batch: zero gradients, still in step
                target, value = torch.nan_to_num(loss) * 0.0, distributed.sum_all(torch.zeros(())).item()
            else:  # DDP averages over ranks: W·(n_r/n)·L_r averages to the global batch's mean loss
                target = loss * share
                value = distributed.sum_all(loss.detach() * (share / distributed.world_size())).item()
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(target) if scaler is not None else target).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)
            loss_ok = math.isfinite(value)
            if loss_ok and all_finite(p.grad for p in params):
                if scaler is not None:
                    scaler.step(optimizer)
                else:
                    optimizer.step()
                if not all_finite(params):
                    last = checkpointer.last_saved if checkpointer is not None else None
                    raise NonFiniteError(
                        f"{desc}: the weights became non-finite in the update of step {step + 1} (learning rate "
                        f"too high?); last good state: {last or 'none saved'}", last)
                bad_run = 0
            else:
                optimizer.zero_grad(set_to_none=True)
                if loss_ok and scaler is not None:
                    stats.scaler_skips += 1  # fp16 gradient overflow: the scaler lowers its scale and retries
                else:
                    bad_run += 1
                    stats.skipped.append(step + 1)
            if scaler is not None:
                scaler.update()
            run.losses.append(value)
            done = step + 1
            stats.steps_run = done - start
            if recorder is not None:
                recorder.record(done)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{value:.3g}", skipped=len(stats.skipped))
            if bad_run > config.max_bad_steps:
                path = checkpointer.save(done, run.state()) if checkpointer is not None else None
                if path is not None:
                    stats.saved.append(str(path))
                raise NonFiniteError(
                    f"{desc}: {bad_run} steps in a row (up to step {done}) had a non-finite loss or gradient "
                    f"and were skipped; stopped. The weights are still finite; last good state: "
                    f"{path or 'none saved (no checkpointer)'}", path)
            if watch and done < config.steps:
                signum = stop_requested()
                if distributed.any_rank(signum is not None):
                    path = checkpointer.save(done, run.state()) if checkpointer is not None else None
                    if path is not None:
                        stats.saved.append(str(path))
                    raise TrainingInterrupted(done, config.steps, path, signum or signal.SIGTERM)
            if checkpointer is not None and checkpointer.due(done):
                stats.saved.append(str(checkpointer.save(done, run.state())))
        if checkpointer is not None and config.steps > start and not checkpointer.due(config.steps):
            # the trained weights outlive a stop while the caller evaluates and writes its outputs
            stats.saved.append(str(checkpointer.save(config.steps, run.state())))
        if watch and config.steps > start and distributed.any_rank(stop_requested() is not None):
            raise TrainingInterrupted(config.steps, config.steps, checkpointer.last_saved if checkpointer else None,
                                      stop_requested() or signal.SIGTERM)
    bar.close()
    distributed.check_same({name: m.lam for name, m in lambda_layers(model).items()})
    if stats.skipped:
        shown = ", ".join(map(str, stats.skipped[:5])) + (", ..." if len(stats.skipped) > 5 else "")
        log.warning("%s: skipped %d of %d steps with a non-finite loss or gradient (steps %s)",
                    desc, len(stats.skipped), config.steps, shown)
    return run.losses


def fit(
    model: nn.Module,
    split: Split,
    config: TrainConfig,
    *,
    hardener: Hardener | None = None,
    teacher: Teacher | None = None,
    distill_weight: float = 0.0,
    recorder: HardnessRecorder | None = None,
    desc: str = "train",
    progress: bool = True,
    checkpointer: Checkpointer | None = None,
    stats: FitStats | None = None,
    optimizer_groups: list[dict[str, Any]] | None = None,
) -> list[float]:
    """:func:`train_loop` on a built-in data set: shuffled ``split`` batches, cross-entropy on the labels.

    With a ``teacher`` and ``distill_weight`` w > 0 the loss is
    (1 − w)·CE + w·KL(teacher ‖ model). The model is left in eval mode.
    """
    if distill_weight and teacher is None:
        raise ValueError("distill_weight > 0 needs a teacher")
    objective = Objective(logits, distilled_cross_entropy(distill_weight), teacher if distill_weight else None)
    losses = train_loop(model, BatchStream.of_split(split, config.batch_size, config.seed), objective, config,
                        hardener=hardener, recorder=recorder, desc=desc, progress=progress, checkpointer=checkpointer,
                        stats=stats, optimizer_groups=optimizer_groups)
    model.eval()
    return losses

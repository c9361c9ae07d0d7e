"""The one ReLU-ization recipe: calibrate → targets → harden while the weights train → finish → swap → verify.

:func:`reluize` takes any model, any batches (a user's DataLoader of tensors,
tuples or dicts), the function that gets the tensor the loss reads from the
model's output, and a loss; the demo, the studies, the ``hf`` command and the
framework callbacks all go through it or through its two phase functions,
:func:`start_hardening` and :func:`finish_hardening`. The swap-first baseline,
:func:`lambda_gelu.swap_train.swap_and_train`, reads the same arguments
(:func:`prepare_inputs`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lambda_gelu import distributed
from lambda_gelu.affine_fold import TrackingFold, sole_linear_readers, swap_fold_
from lambda_gelu.batches import Forward, model_device, move_to, take_rows
from lambda_gelu.calibrate import DEFAULT_TAU, calibrate, discrepancy, layer_targets
from lambda_gelu.convert import channel_counts, convert, relufy
from lambda_gelu.distill import Objective, make_objective
from lambda_gelu.gates import (
    SmoothOp,
    activation_layers,
    function_gates,
    lambda_layers,
    layer_approximation,
    record_gates,
)
from lambda_gelu.losses import OUTPUTS, OutputFn
from lambda_gelu.profile import LayerHardness, hardness
from lambda_gelu.resume import Checkpointer
from lambda_gelu.schedule import SHAPES, Hardener
from lambda_gelu.train import FSDP_NO_STATES, BatchStream, FitStats, TrainConfig, train_loop


@dataclass
class HardenConfig:
    """Settings of the deterministic ReLU-ization.

    ``steps`` training steps in all: λ follows the schedule over the first
    ``ramp_fraction`` of them and holds at its target for the rest, while the
    weights train with ``lr`` (linear warm-up over ``warmup`` steps, then a
    cosine decay). With the cross-entropy loss and ``distill_weight`` w the
    objective is (1 − w)·CE + w·KL(pre-hardening model ‖ model). Targets come
    from ``calibration_batches`` batches (``calibration_batch_size`` rows each
    on a built-in data set) and are re-derived every ``retarget_every`` steps.
    ``train_mode`` False trains with dropout off (eval mode), as distilling a
    pretrained model wants. ``batch_size`` is the batch size on a built-in data
    set (a user's DataLoader brings its own). ``fold`` folds every change of a
    gate's function (each step of λ, and the swap) into the Linear that reads
    it, per channel (:mod:`lambda_gelu.affine_fold`).
    """

    steps: int = 600
    tau: float = DEFAULT_TAU
    shape: str = "cosine"
    ramp_fraction: float = 0.8
    distill_weight: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 0
    batch_size: int = 64
    retarget_every: int = 50
    calibration_batches: int = 4
    calibration_batch_size: int = 256
    seed: int = 1
    amp_dtype: str | None = None
    train_mode: bool = True
    fold: bool = False

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
        if self.calibration_batches < 1 or self.retarget_every < 0:
            raise ValueError("calibration_batches must be >= 1 and retarget_every >= 0")

    @property
    def ramp_steps(self) -> int:
        """Steps over which λ moves from its start to its target."""
        return max(1, round(self.ramp_fraction * self.steps))

    def train_config(self) -> TrainConfig:
        """The weights' optimization settings during hardening (and the equal-budget fine-tuning)."""
        return TrainConfig(
            steps=self.steps, lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
            warmup=self.warmup, seed=self.seed, amp_dtype=self.amp_dtype,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return asdict(self)


def start_hardening(
    model: nn.Module,
    calibration: list[Any],
    *,
    tau: float,
    total_steps: int,
    shape: str = "cosine",
    retarget_every: int = 0,
    forward: Forward | None = None,
    targets: dict[str, Any] | None = None,
) -> Hardener:
    """Calibrate ``model`` on ``calibration``, set each λ-GELU layer's target λ* (D(λ*) <= τ), return the Hardener.

    The Hardener re-targets from the same batches every ``retarget_every``
    steps (0: never). ``targets`` (a resumed run's) replaces the first
    calibration. Under torch.distributed each rank calibrates on its share of
    every batch and the samples are gathered, so all ranks derive the same targets.
    """
    if not lambda_layers(model):
        raise ValueError(f"{type(model).__name__} has no LambdaGELU layer to harden; convert it first")
    if distributed.is_active():
        calibration = [take_rows(b, distributed.rank(), distributed.world_size()) for b in calibration]

    def retarget() -> dict[str, torch.Tensor]:
        return layer_targets(model, calibrate(model, calibration, forward=forward), tau)

    return Hardener(model, targets if targets is not None else retarget(), total_steps=total_steps,
                    shape=shape,  # type: ignore[arg-type]
                    retarget=retarget if retarget_every else None, retarget_every=retarget_every)


def finish_hardening(hardener: Hardener, rounds: int = 3) -> None:
    """Set every λ to its target, re-targeting first (if the Hardener can) until no target rises.

    The weights moved while λ did, and raising one layer's λ moves the
    pre-activations of the layers after it; so the last re-target runs on
    the model at its final λ, up to ``rounds`` times, until every layer meets
    τ at its own λ (targets only rise, so the rounds converge).
    """
    for _ in range(rounds if hardener.retarget is not None else 0):
        before = {name: value.clone() for name, value in hardener.target.items()}
        hardener.update_targets(hardener.retarget())
        hardener.set_lambdas(hardener.total_steps)
        if all(torch.allclose(before[name], hardener.target[name], rtol=1e-3, atol=0.0) for name in before):
            return
    hardener.set_lambdas(hardener.total_steps)


def remaining_discrepancy(model: nn.Module, samples: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each λ-GELU layer's D(λ) from ReLU on ``samples`` (the largest over channels for a per-channel layer)."""
    layers = lambda_layers(model)
    return {name: float(discrepancy(values, layers[name].lam.double(), layer_approximation(layers[name])).max())
            for name, values in samples.items() if name in layers}


@dataclass
class Reluized:
    """What :func:`reluize` did: the schedule it ran, the losses, each layer's discrepancy and hardness just
    before the swap, the layers it converted, how many changes of λ it folded (``HardenConfig.fold``), the
    layers it swapped, and the non-gate nonlinearities left (the proof)."""

    hardener: Hardener
    first_targets: dict[str, torch.Tensor]
    losses: list[float]
    discrepancy: dict[str, float]
    converted: list[str]
    profile: list[LayerHardness]
    folds: int = 0
    swapped: list[str] = field(default_factory=list)
    other_nonlinearities: list[SmoothOp] = field(default_factory=list)

    @property
    def targets(self) -> dict[str, torch.Tensor]:
        """The final λ* of every layer (float64; per channel where the layer is per-channel)."""
        return self.hardener.target


def reluize(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    output: str | OutputFn = "logits",
    loss: str = "cross-entropy",
    objective: Objective | None = None,
    teacher: nn.Module | None = None,
    config: HardenConfig | None = None,
    calibration: Iterable[Any] | None = None,
    per_channel: bool = False,
    swap: bool = True,
    progress: bool = True,
    checkpointer: Checkpointer | None = None,
    stats: FitStats | None = None,
    desc: str = "harden",
) -> Reluized:
    """Turn ``model``'s GELU gates into exact ReLU in place, with as little damage as possible.

    1. **Convert** every GELU-family gate to :class:`~lambda_gelu.LambdaGELU` at
       λ = 1 (one λ per layer, or per channel with ``per_channel``); a model
       that already holds λ-GELU layers (a trained λ-GELU model) keeps them.
       A smooth gate no module swap reaches is refused by name before anything
       changes (:class:`~lambda_gelu.UnconvertibleGateError`).
    2. **Calibrate** on ``calibration`` (default: the first
       ``config.calibration_batches`` of ``batches``) and set each layer's
       target λ* = min{λ : D(λ) <= τ}.
    3. **Harden**: train the weights for ``config.steps`` steps on ``batches``
       (re-iterated as needed) while λ follows the schedule to λ*, re-targeting
       every ``config.retarget_every`` steps.
    4. **Finish**: re-target on the model at its final λ until no target
       rises, then λ = λ* exactly; the remaining discrepancy of every layer is
       measured.
    5. **Swap** every λ-GELU for ``nn.ReLU`` and **verify** with
       :func:`lambda_gelu.assert_relu` that no smooth gate runs (``swap=False``
       stops before the swap). With ``config.fold`` every step of λ and the
       swap itself are folded into the gate's sole Linear reader
       (:mod:`lambda_gelu.affine_fold`).

    ``output(model, batch)`` gets the tensor the loss reads (a name from
    :data:`lambda_gelu.losses.OUTPUTS` or a function; it also runs the model
    for calibration and the proof, so give it with ``objective`` too);
    ``loss`` names a built-in loss (``kl``, ``cosine`` and ``mse`` compare
    with a frozen copy of the model taken before any change; ``cross-entropy``
    reads the batch's labels, mixed with KL to that copy by
    ``config.distill_weight``, 0.5 by default); ``objective`` replaces it.
    ``teacher`` replaces the frozen copy with a model given (frozen in place).
    The model's train/eval mode is preserved: every submodule leaves in the
    mode it came in.

    **FSDP2.** Under torch.distributed, a model already converted (λ-GELU
    layers in place) and sharded by ``fully_shard`` is trained as FSDP shards
    it (no DDP wrapper), each rank on its share of every batch. A sharded
    model cannot be deep-copied: pass the original, sharded the same way, as
    ``teacher``. Resumable run states and ``config.fold`` are refused for a
    sharded model.
    """
    config = config or HardenConfig()
    if any(distributed.is_sharded(p) for p in model.parameters()):  # refused before anything changes
        if checkpointer is not None:
            raise ValueError(FSDP_NO_STATES)
        if config.fold:
            raise ValueError("fold cannot reach the weights of an FSDP-sharded model; harden without fold")
    inputs = prepare_inputs(model, batches, output=output, loss=loss, objective=objective, teacher=teacher,
                            config=config, calibration=calibration)
    output_fn, calibration, probe, objective = inputs.output, inputs.calibration, inputs.probe, inputs.objective
    channels = channel_counts(model, probe) if per_channel and _has_gelu_modules(model) else None
    converted = convert(model, example=probe, num_channels=channels, check_functional=False)
    resumed = checkpointer.resume_state if checkpointer is not None else None
    saved = resumed.get("hardener") if resumed is not None else None
    hardener = start_hardening(model, calibration, tau=config.tau, total_steps=config.ramp_steps,
                               shape=config.shape, retarget_every=config.retarget_every, forward=output_fn,
                               targets=saved["target"] if saved else None)
    tracking = TrackingFold(model, sole_linear_readers(model, calibration[:1], output_fn)) if config.fold else None
    first_targets = {name: value.clone() for name, value in hardener.target.items()}
    stream = batches if isinstance(batches, BatchStream) else BatchStream.of_batches(batches, config.seed)
    try:
        losses = train_loop(model, stream, objective, config.train_config(), hardener=hardener, desc=desc,
                            progress=progress, checkpointer=checkpointer, stats=stats, training=config.train_mode,
                            settings={"fold": config.fold})  # the saved weights hold the folds made so far
        finish_hardening(hardener)
        samples = calibrate(model, calibration, forward=output_fn)  # (with fold: folds the last change of λ)
    finally:
        if tracking is not None:
            tracking.remove()
    result = Reluized(hardener, first_targets, losses, remaining_discrepancy(model, samples), converted,
                      hardness(model, samples), folds=tracking.folds if tracking is not None else 0)
    if swap:
        # relufy refuses what it cannot reach and proves that no smooth gate runs
        result.swapped = (swap_fold_(model, calibration, output_fn, example=probe).swapped if config.fold
                          else relufy(model, example=probe))
        result.other_nonlinearities = [op for op in record_gates(model, probe) if not op.gate]
    return result


@dataclass
class RecipeInputs:
    """What both recipes (:func:`reluize`, :func:`lambda_gelu.swap_train.swap_and_train`) read from their
    arguments: the output function, the calibration batches, a probe that runs the model on the first of them
    (for the proof), and the objective."""

    output: OutputFn
    calibration: list[Any]
    probe: Callable[[nn.Module], Any]
    objective: Objective


def prepare_inputs(model: nn.Module, batches: Iterable[Any], *, output: str | OutputFn, loss: str,
                   objective: Objective | None, teacher: nn.Module | None, config: HardenConfig,
                   calibration: Iterable[Any] | None) -> RecipeInputs:
    """Check a recipe's arguments and derive its inputs, before anything changes.

    ``calibration`` defaults to the first ``config.calibration_batches`` of
    ``batches`` (taken under a fixed seed, so a shuffling DataLoader gives the
    same ones every run); the objective's frozen teacher is copied from
    ``model`` now, before the recipe changes it.
    """
    if teacher is not None and (objective is not None or teacher is model):
        raise ValueError("teacher= is the frozen model the built-in loss compares with: not with objective= "
                         "(whose own teacher it would replace), and not the model being hardened")
    output_fn = OUTPUTS[output] if isinstance(output, str) else output
    device = model_device(model)
    if not isinstance(batches, BatchStream) and iter(batches) is batches:
        raise ValueError("batches must be re-iterable (a DataLoader or a list), not an iterator: training "
                         "goes over them more than once")
    if calibration is None:
        with torch.random.fork_rng(devices=[]):  # a shuffling DataLoader's first batches, the same every run
            torch.manual_seed(config.seed)
            calibration = list(itertools.islice(batches, config.calibration_batches))
    calibration = list(calibration)
    if not calibration:
        raise ValueError("no calibration batches: the batches are empty")

    first = calibration[0]

    def probe(m: nn.Module) -> Any:
        return output_fn(m, move_to(first, device))

    if objective is None:
        objective = make_objective(model, loss, output_fn, config.distill_weight, teacher=teacher)
    return RecipeInputs(output_fn, calibration, probe, objective)


def _has_gelu_modules(model: nn.Module) -> bool:
    return len(activation_layers(model)) > len(lambda_layers(model)) or bool(function_gates(model))

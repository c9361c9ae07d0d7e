"""The swap-first recipe: swap every GELU gate for ReLU now (folding each one's affine fit), then train.

This is the strongest baseline the study knows (``swap + fold +
distillation``), offered as a recipe of its own because on some models it
wins: a user wants the best ReLU model, not a particular method. It reads the
same arguments as :func:`lambda_gelu.reluize` and trains the weights on the
same batches, in the same order, with the same optimizer and schedule, so the
two are compared at equal budget.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lambda_gelu import distributed
from lambda_gelu.affine_fold import swap_fold_
from lambda_gelu.convert import relufy
from lambda_gelu.distill import Objective
from lambda_gelu.gates import SmoothOp, record_gates
from lambda_gelu.harden import HardenConfig, prepare_inputs
from lambda_gelu.losses import OutputFn
from lambda_gelu.resume import Checkpointer
from lambda_gelu.train import BatchStream, FitStats, train_loop

__all__ = ["Swapped", "swap_and_train"]


@dataclass
class Swapped:
    """What :func:`swap_and_train` did: the layers it swapped, the gates whose affine fit went into their Linear
    reader (gate → reader) and those that had none, the training losses, and the non-gate nonlinearities left
    (the proof)."""

    swapped: list[str]
    folded: dict[str, str]
    unfolded: list[str]
    losses: list[float]
    other_nonlinearities: list[SmoothOp] = field(default_factory=list)


def swap_and_train(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    output: str | OutputFn = "logits",
    loss: str = "cross-entropy",
    objective: Objective | None = None,
    teacher: nn.Module | None = None,
    config: HardenConfig | None = None,
    calibration: Iterable[Any] | None = None,
    progress: bool = True,
    checkpointer: Checkpointer | None = None,
    stats: FitStats | None = None,
    desc: str = "swap",
) -> Swapped:
    """Swap ``model``'s GELU gates (and λ-GELU ones) for ReLU in place, then train it ``config.steps`` steps.

    1. With ``config.fold`` (the config used when none is given is
       ``HardenConfig(fold=True)``; a config given decides for itself, and
       ``HardenConfig``'s own default is no fold), fit GELU(x_c) ≈ a_c·ReLU(x_c) + b_c per channel on
       ``calibration`` and fold a, b into each gate's sole Linear reader
       (:func:`lambda_gelu.affine_fold.swap_fold_`); then swap, and prove with
       the first calibration batch that no smooth gate runs.
    2. Train every weight on ``batches`` with the objective, as
       :func:`lambda_gelu.reluize` does: a built-in ``loss`` compares with a
       frozen copy of the model taken before the swap (distillation), or
       ``teacher``; ``objective`` replaces it.

    The arguments mean what they mean for :func:`lambda_gelu.reluize` (which
    also has ``per_channel`` and ``swap``: this recipe has no λ to shape). A
    gate no module swap reaches is refused before any weight is folded.
    FSDP-sharded models are refused: swap before ``fully_shard``, then train.
    """
    config = config or HardenConfig(fold=True)
    if any(distributed.is_sharded(p) for p in model.parameters()):
        raise ValueError("swap_and_train cannot swap the gates of an FSDP-sharded model: swap and fold before "
                         "fully_shard, then train it as any ReLU model")
    inputs = prepare_inputs(model, batches, output=output, loss=loss, objective=objective, teacher=teacher,
                            config=config, calibration=calibration)
    if config.fold:
        fold = swap_fold_(model, inputs.calibration, inputs.output, example=inputs.probe)
        swapped, folded, unfolded = fold.swapped, fold.folded, fold.unfolded
    else:
        swapped, folded, unfolded = relufy(model, include_gelu=True, example=inputs.probe), {}, []
    stream = batches if isinstance(batches, BatchStream) else BatchStream.of_batches(batches, config.seed)
    losses = train_loop(model, stream, inputs.objective, config.train_config(), desc=desc, progress=progress,
                        checkpointer=checkpointer, stats=stats, training=config.train_mode,
                        settings={"fold": config.fold})
    other = [op for op in record_gates(model, inputs.probe) if not op.gate]
    return Swapped(swapped, folded, unfolded, losses, other)

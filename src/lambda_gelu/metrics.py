"""Evaluation and the disruption caused by swapping gates for ReLU."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lambda_gelu.calibrate import calibrate, discrepancy
from lambda_gelu.gates import activation_layers, layer_approximation, layer_lambda, preserved_modes


@dataclass(frozen=True)
class Evaluation:
    """Accuracy in percent and mean cross-entropy (nats) of a classifier on a data set.

    For a language model, rows are tokens: ``loss / ln 2`` is bits per character.
    """

    accuracy: float
    loss: float
    count: int


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits as (N, C) and the targets as (N,) over ``(input, target)`` batches (eval mode).

    Sequence outputs (B, T, C) with targets (B, T) are flattened to one row per token.
    """
    device = _device(model)
    logits, targets = [], []
    with preserved_modes(model, training=False):
        for x, y in batches:
            logits.append(model(x.to(device)).float().cpu())
            targets.append(y.cpu())
    if not logits:
        raise ValueError("no batches to evaluate on")
    logits_all, targets_all = torch.cat(logits), torch.cat(targets)
    return logits_all.reshape(-1, logits_all.shape[-1]), targets_all.reshape(-1)


def evaluate(model: nn.Module, batches: Iterable[Any]) -> Evaluation:
    """Accuracy and cross-entropy of ``model`` on ``(input, target)`` batches."""
    logits, targets = predict(model, batches)
    return Evaluation(
        accuracy=100.0 * float((logits.argmax(-1) == targets).float().mean()),
        loss=float(F.cross_entropy(logits, targets)),
        count=int(targets.numel()),
    )


def bits_per_token(evaluation: Evaluation) -> float:
    """Cross-entropy in bits (bits per character for a character-level model)."""
    return evaluation.loss / math.log(2.0)


@dataclass(frozen=True)
class Disruption:
    """What a swap did: accuracies in points (0-100), losses, KL(before ‖ after), per-layer D."""

    accuracy_before: float
    accuracy_after: float
    loss_before: float
    loss_after: float
    kl: float
    max_abs_logit_change: float
    layer_discrepancy: dict[str, float] = field(default_factory=dict)

    @property
    def delta_accuracy(self) -> float:
        """Accuracy after minus before, in points (negative = the swap cost accuracy)."""
        return self.accuracy_after - self.accuracy_before

    @property
    def delta_loss(self) -> float:
        """Loss after minus before."""
        return self.loss_after - self.loss_before

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (with the deltas), for JSON."""
        out = asdict(self)
        out.update(delta_accuracy=self.delta_accuracy, delta_loss=self.delta_loss)
        return out


def layer_discrepancies(model: nn.Module, samples: dict[str, torch.Tensor]) -> dict[str, float]:
    """D(λ) of every activation layer at its current λ (mean over channels)."""
    layers = activation_layers(model)
    return {
        name: float(discrepancy(values, layer_lambda(layers[name]), layer_approximation(layers[name])).mean())
        for name, values in samples.items()
        if name in layers
    }


def disruption(before: nn.Module, after: nn.Module, batches: Iterable[Any]) -> Disruption:
    """Compare a model before and after its gates were swapped, on ``(input, target)`` batches.

    ``batches`` is iterated up to three times (pass a list or a DataLoader,
    not a generator). Reports accuracies and losses of both, the mean
    KL(p_before ‖ p_after) of their output distributions, the largest change
    of a logit, and each of ``before``'s activation layers' remaining
    discrepancy D(λ) from ReLU on its own pre-activations.
    """
    logits_before, targets = predict(before, batches)
    logits_after, _ = predict(after, batches)
    log_p = F.log_softmax(logits_before, -1)
    log_q = F.log_softmax(logits_after, -1)
    layers = activation_layers(before)
    per_layer = layer_discrepancies(before, calibrate(before, batches)) if layers else {}
    return Disruption(
        accuracy_before=100.0 * float((logits_before.argmax(-1) == targets).float().mean()),
        accuracy_after=100.0 * float((logits_after.argmax(-1) == targets).float().mean()),
        loss_before=float(F.cross_entropy(logits_before, targets)),
        loss_after=float(F.cross_entropy(logits_after, targets)),
        kl=float(F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")),
        max_abs_logit_change=float((logits_after - logits_before).abs().max()),
        layer_discrepancy=per_layer,
    )

"""What the weights train on: the tensor a loss reads from the model's output, and the built-in losses.

An *output function* ``output(model, batch) -> Tensor`` runs the model on a
batch and returns the tensor the loss reads: :func:`logits`,
:func:`mean_pooled`, :func:`token_logits`, :func:`next_token_logits`, :func:`last_hidden_state`.

A *loss* ``loss(output, batch, teacher_output) -> scalar`` compares it with
the labels in the batch or with a frozen teacher's output on the same batch
(``teacher_output`` is None when the objective has no teacher):

=================  ============================================================  =========
name               loss                                                          teacher
=================  ============================================================  =========
``cross-entropy``  CE on the batch's labels (``batch[1]`` or ``batch["labels"]``)  no
``kl``             KL(teacher ‖ student) on softmaxed logits, × T²                yes
``cosine``         1 − cos between L2-normalized pooled embeddings                yes
``mse``            mean squared error to the teacher's hidden states              yes
=================  ============================================================  =========
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lambda_gelu.batches import default_forward

OutputFn = Callable[[nn.Module, Any], torch.Tensor]
LossFn = Callable[[torch.Tensor, Any, "torch.Tensor | None"], torch.Tensor]


# ---------------------------------------------------------------------------------------------- outputs


def _field(output: Any, name: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    value = output[name] if isinstance(output, Mapping) else getattr(output, name, None)
    if value is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        value = output[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the model's output ({type(output).__name__}) has no tensor {name!r}")
    return value


def logits(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's logits: its output if that is a tensor, else its ``logits`` field."""
    return _field(default_forward(model, batch), "logits")


def last_hidden_state(model: nn.Module, batch: Any) -> torch.Tensor:
    """The ``last_hidden_state`` of a transformers model's output (or the output itself if it is a tensor)."""
    return _field(default_forward(model, batch), "last_hidden_state")


def _token_mask(batch: Any, like: torch.Tensor) -> torch.Tensor:
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is None:
        return torch.ones(like.shape[:2], dtype=like.dtype, device=like.device)
    return mask.to(like.dtype)


def mean_pooled(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean of the last hidden states over the real tokens (``attention_mask``), L2-normalized: (batch, hidden).

    The sentence embedding of sentence-transformers models such as all-MiniLM-L6-v2.
    """
    hidden = last_hidden_state(model, batch)
    mask = _token_mask(batch, hidden).unsqueeze(-1)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0), dim=-1)


def token_logits(model: nn.Module, batch: Any) -> torch.Tensor:
    """A token model's logits at every real token (``attention_mask``): (tokens, vocabulary)."""
    out = logits(model, batch)
    return out[_token_mask(batch, out).bool()]


def next_token_logits(model: nn.Module, batch: Any) -> torch.Tensor:
    """A causal LM's logits at every real token that has a next token: (tokens, vocabulary)."""
    out = logits(model, batch)
    mask = _token_mask(batch, out)[:, 1:].bool()  # position t predicts token t + 1: it must be real
    return out[:, :-1][mask]


OUTPUTS: dict[str, OutputFn] = {
    "logits": logits,
    "last-hidden-state": last_hidden_state,
    "mean-pooled": mean_pooled,
    "token-logits": token_logits,
    "next-token-logits": next_token_logits,
}


# ---------------------------------------------------------------------------------------------- losses


def labels_of(batch: Any) -> torch.Tensor:
    """The labels of a batch: ``batch[1]`` of a tuple, ``batch["labels"]`` of a mapping."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    if isinstance(batch, Mapping) and "labels" in batch:
        return batch["labels"]
    raise ValueError("cross-entropy needs labels: (input, labels) batches or a 'labels' entry")


def cross_entropy(output: torch.Tensor, batch: Any, teacher_output: torch.Tensor | None = None) -> torch.Tensor:
    """CE of (B, C) or (B, T, C) logits against the batch's labels."""
    target = labels_of(batch)
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) on softened class distributions (last dim), scaled by T² (Hinton et al.).

    Averaged over every row of the leading dims (examples, or tokens of a sequence).
    """
    t = temperature
    classes = student_logits.shape[-1]
    return F.kl_div(
        F.log_softmax(student_logits.reshape(-1, classes) / t, dim=-1),
        F.log_softmax(teacher_logits.reshape(-1, classes) / t, dim=-1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)


def _teacher(teacher_output: torch.Tensor | None, what: str) -> torch.Tensor:
    if teacher_output is None:
        raise ValueError(f"the {what} loss compares with a teacher; give the objective one")
    return teacher_output


def kl(output: torch.Tensor, batch: Any, teacher_output: torch.Tensor | None) -> torch.Tensor:
    """KL(teacher ‖ student) on logits, temperature 1."""
    return kl_divergence(output, _teacher(teacher_output, "kl"))


def cosine(output: torch.Tensor, batch: Any, teacher_output: torch.Tensor | None) -> torch.Tensor:
    """Mean of 1 − cos(student, teacher) over the rows (embeddings are normalized here)."""
    reference = _teacher(teacher_output, "cosine")
    return (1.0 - F.cosine_similarity(output.float(), reference.float(), dim=-1)).mean()


def mse(output: torch.Tensor, batch: Any, teacher_output: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error to the teacher's output."""
    return F.mse_loss(output, _teacher(teacher_output, "mse"))


LOSSES: dict[str, LossFn] = {"cross-entropy": cross_entropy, "kl": kl, "cosine": cosine, "mse": mse}
NEEDS_TEACHER = frozenset({"kl", "cosine", "mse"})

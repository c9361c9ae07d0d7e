"""Optimizer groups and the optimizer-aware update for the hardness parameters.

The scheme (argued in docs/method.md):

1. The hardness parameters ρ = log λ get a group of their own: no weight
   decay, their own learning rate ``hardness_lr``.
2. Before every step of an optimizer that holds such a group, each ρ's gradient
   is divided by its own running RMS (an EMA of g², β = 0.9, bias-corrected). ∂L/∂ρ
   spans many orders of magnitude (it scales like λ⁻² and like 1/σ for inputs
   of spread σ); after this it is a unit-scale signal,
   so neither SGD (whose step is proportional to the gradient) nor Adam (whose
   ``eps`` swamps gradients below ~1e-8) lets λ's steps vanish as λ grows.
3. The host optimizer's family is detected at the step: under SGD with
   momentum μ (and dampening d) the normalized gradient is scaled by
   (1 − μ)/(1 − d), so that the steady-state step equals ``hardness_lr`` as it
   does under Adam/AdamW. Either way a consistent signal moves ρ by 0.6 to 1
   times ``hardness_lr`` per step, however large λ already is, and a noisy one
   is averaged by the optimizer's momentum instead of amplified.
4. After every step ρ is projected into [0, log 1e6]: a layer that keeps
   asking for softer gates rests at λ = 1 exactly (GELU), and leaves it at
   the full step size as soon as its gradient asks for harder gates
   (dλ/dρ = λ = 1 there, no attenuation).

Steps 2-4 run in global optimizer step hooks that act only on groups built by
:func:`param_groups` (marked ``group["lambda_gelu"] == "hardness"``); every other
group of every optimizer is left untouched. The running RMS lives in the
group itself, so ``optimizer.state_dict()`` saves it and a resumed run continues
exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from lambda_gelu.module import RAW_KEY, RAW_MAX, RAW_MIN, LambdaGELU

GROUP_KEY = "lambda_gelu"
GROUP_HARDNESS = "hardness"
DEFAULT_HARDNESS_LR = 0.02
DEFAULT_RMS_BETA = 0.9
_RMS_EPS = 1e-30

ADAPTIVE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
)
"""Optimizers that already normalize each coordinate by a second-moment estimate."""

_hooks_registered = False


def hardness_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Yield the trainable raw hardness parameters ρ of every LambdaGELU in ``model`` (each once)."""
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, LambdaGELU) and module.learnable:
            raw = getattr(module, RAW_KEY)
            if id(raw) not in seen:
                seen.add(id(raw))
                yield raw


def optimizer_family(optimizer: torch.optim.Optimizer) -> str:
    """``"adaptive"`` for Adam-like optimizers, ``"sgd"`` for SGD, ``"other"`` otherwise."""
    if isinstance(optimizer, ADAPTIVE_OPTIMIZERS):
        return "adaptive"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    return "other"


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    hardness_lr: float | None = None,
    rms_beta: float = DEFAULT_RMS_BETA,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into optimizer groups.

    Returns up to three groups: weights with ``ndim >= 2`` (``weight_decay``),
    biases and norm parameters (no decay), and the hardness parameters (no
    decay, learning rate ``hardness_lr``, default 0.02, and the normalized,
    optimizer-aware update described in this module's docstring). Pass the
    result to any ``torch.optim`` optimizer::

        opt = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.05))

    ``hardness_lr`` is the size of a step in log λ: 0.02 lets a consistent
    signal change λ by up to 2% per step, under SGD and Adam alike.

    ``rms_beta`` is the memory of the running RMS. While λ keeps hardening,
    |∂L/∂ρ| shrinks by about e^(−2·step) per step, and an RMS that remembers
    too long over-estimates it: the normalized step then settles at a fraction
    of ``hardness_lr``. Keep −ln(rms_beta) well above 4·``hardness_lr``; the
    default 0.9 keeps 0.6–0.7 of ``hardness_lr`` in sustained hardening at 0.02
    (benchmarks/lambda_steps.py).
    """
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    hardness_lr = DEFAULT_HARDNESS_LR if hardness_lr is None else hardness_lr
    if hardness_lr < 0:
        raise ValueError(f"hardness_lr must be >= 0, got {hardness_lr}")
    if not 0.0 < rms_beta < 1.0:
        raise ValueError(f"rms_beta must be in (0, 1), got {rms_beta}")
    hardness = list(hardness_parameters(model))
    hardness_ids = {id(p) for p in hardness}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in hardness_ids:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    if hardness:
        groups.append(
            {
                "params": hardness,
                "lr": hardness_lr,
                "weight_decay": 0.0,
                GROUP_KEY: GROUP_HARDNESS,
                "rms_beta": rms_beta,
                "rms_steps": 0,
                "rms_sq_avg": None,
            }
        )
        _register_hooks()
    return groups


def _hardness_groups(optimizer: torch.optim.Optimizer) -> Iterator[dict[str, Any]]:
    for group in optimizer.param_groups:
        if group.get(GROUP_KEY) == GROUP_HARDNESS:
            yield group


def _family_scale(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> float:
    """Factor that makes the host optimizer's steady-state step equal the group's lr."""
    if optimizer_family(optimizer) == "sgd":
        momentum = float(group.get("momentum", 0.0))
        dampening = float(group.get("dampening", 0.0))
        if momentum > 0.0 and dampening < 1.0 and not group.get("nesterov", False):
            return (1.0 - momentum) / (1.0 - dampening)
        if momentum > 0.0 and group.get("nesterov", False):
            return 1.0 - momentum  # nesterov: dampening is 0, step ≈ g/(1 − μ)
    return 1.0


@torch.no_grad()
def normalize_hardness_grads(optimizer: torch.optim.Optimizer) -> None:
    """Divide each hardness gradient by its running RMS and apply the family scale (scheme step 2-3)."""
    for group in _hardness_groups(optimizer):
        params = group["params"]
        if group.get("rms_sq_avg") is None or len(group["rms_sq_avg"]) != len(params):
            group["rms_sq_avg"] = [torch.zeros_like(p, dtype=torch.float32) for p in params]
            group["rms_steps"] = 0
        beta = float(group["rms_beta"])
        group["rms_steps"] += 1
        correction = 1.0 - beta ** group["rms_steps"]
        scale = _family_scale(optimizer, group)
        sq_avgs = group["rms_sq_avg"]
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            grad = torch.nan_to_num(p.grad.float(), nan=0.0, posinf=0.0, neginf=0.0)
            sq_avg = sq_avgs[i] = sq_avgs[i].to(grad.device)
            sq_avg.mul_(beta).addcmul_(grad, grad, value=1.0 - beta)
            rms = (sq_avg / correction).sqrt_()
            normalized = torch.where(rms > _RMS_EPS, grad / rms.clamp(min=_RMS_EPS), 0.0)
            p.grad.copy_(normalized * scale)


@torch.no_grad()
def project_hardness(optimizer: torch.optim.Optimizer) -> None:
    """Clamp every hardness parameter into [0, log 1e6], i.e. λ into [1, 1e6] (scheme step 4)."""
    for group in _hardness_groups(optimizer):
        for p in group["params"]:
            p.clamp_(min=RAW_MIN, max=RAW_MAX)


def _pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    normalize_hardness_grads(optimizer)


def _post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    project_hardness(optimizer)


def _register_hooks() -> None:
    global _hooks_registered
    if not _hooks_registered:
        register_optimizer_step_pre_hook(_pre_hook)
        register_optimizer_step_post_hook(_post_hook)
        _hooks_registered = True

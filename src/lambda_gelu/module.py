"""``LambdaGELU``: the λ-GELU activation with a learnable hardness λ >= 1."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lambda_gelu import distributed
from lambda_gelu.ops import APPROXIMATIONS, Approximate, channel_view, lambda_gelu

RAW_KEY = "log_lam"
"""State-dict key (under the layer's prefix) of the raw parameter ρ = log λ."""

LEGACY_RAW_KEY = "log_lam_minus_1"
"""The key of lambda-gelu 0.1, which stored ρ = log(λ − 1); converted on load (:func:`upgrade_lambda_state`)."""

LEGACY_FLOOR_EXCESS = 1e-4
"""0.1 stored λ = 1 as 1 + 1e-4; such values load as λ = 1 exactly."""

LAMBDA_MAX = 1e6
"""Largest λ the module produces; the op's numerics are guaranteed up to here."""

RAW_MIN = 0.0
RAW_MAX = 13.815509796142578
"""The largest float32 below log 1e6 (float32(log 1e6) itself reads as λ = 1e6 + 0.19): λ <= 999999.25."""


def _check_lambda_values(values: torch.Tensor, what: str) -> None:
    """Raise ValueError unless every value is finite and in [1, LAMBDA_MAX]."""
    bad = ~torch.isfinite(values) | (values < 1.0) | (values > LAMBDA_MAX)
    if bool(bad.any()):
        shown = values[bad].flatten()[:4].tolist()
        raise ValueError(
            f"{what} must be finite and in [1, {LAMBDA_MAX:g}], got {', '.join(f'{v:g}' for v in shown)}"
        )


def lambda_to_raw(lam: torch.Tensor) -> torch.Tensor:
    """ρ = log λ in float32, within [0, RAW_MAX] (λ = 1 is stored as ρ = 0 exactly)."""
    return torch.log(lam.double()).clamp(RAW_MIN, RAW_MAX).float()


def raw_to_lambda(raw: torch.Tensor) -> torch.Tensor:
    """λ = exp(clamp(ρ, 0, log 1e6)) with dλ/dρ = λ for every ρ (straight-through at the bounds).

    Inside the bounds this is λ = exp ρ, dλ/dρ = λ. Outside them (only where
    an optimizer other than :func:`lambda_gelu.param_groups`'s moved ρ) λ is
    the bound's value and the gradient is the bound's, so a gate pushed below
    λ = 1 still feels the pull back.
    """
    return torch.exp(_ClampStraightThrough.apply(raw))


class _ClampStraightThrough(torch.autograd.Function):
    """clamp(ρ, 0, log 1e6) forward; the identity backward (∂clamp/∂ρ taken as 1 everywhere)."""

    @staticmethod
    def forward(raw: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return raw.clamp(RAW_MIN, RAW_MAX)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def upgrade_lambda_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every 0.1 hardness entry converted to today's (a new dict; others unchanged).

    0.1 stored ρ₀ = log(λ − 1) under ``…log_lam_minus_1``, with one layer's λ as
    a 0-d tensor and λ = 1 as 1 + 1e-4. Today's entry is ``…log_lam`` = log λ,
    with one layer's λ of shape (1,). Values at 0.1's floor become λ = 1
    exactly; non-finite values stay non-finite, for the load's checks to name.
    """
    upgraded: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] != LEGACY_RAW_KEY or not isinstance(value, torch.Tensor):
            upgraded[key] = value
            continue
        old = value.double()
        lam = 1.0 + torch.exp(old)
        lam = torch.where(old <= math.log(LEGACY_FLOOR_EXCESS) + 1e-6, 1.0, lam)
        new = lambda_to_raw(lam).to(value.dtype if value.is_floating_point() else torch.float32)
        upgraded[key[: -len(LEGACY_RAW_KEY)] + RAW_KEY] = new.reshape(1) if new.ndim == 0 else new
    return upgraded


class LambdaGELU(nn.Module):
    """f(x; λ) = x·Φ(λx) with hardness λ >= 1: GELU at λ = 1, ReLU as λ → ∞.

    **Reparameterization.** λ = exp ρ with ρ = log λ the stored parameter
    (state-dict key ``log_lam``), kept in [0, log 1e6] by a projection after
    every optimizer step (:mod:`lambda_gelu.optim`). Why this map:

    * λ = 1 is exact: ρ = 0, and a layer at λ = 1 is GELU to the last bit.
    * No attenuation at the floor: dλ/dρ = λ >= 1, so ∂L/∂ρ = λ·∂L/∂λ is never
      smaller than ∂L/∂λ, and a step of size η in ρ changes λ by a factor
      e^η wherever λ is, 1 included. (0.1's λ = 1 + exp ρ' had dλ/dρ' = λ − 1,
      which is 1e-4 at its floor λ = 1 + 1e-4: about 460 normalized steps
      before λ could move by 1.)
    * ρ = log λ is the natural coordinate of a scale parameter
      (f(x; λ) = GELU(λx)/λ and only λ·σ matters for inputs of spread σ):
      λ travels from 2 to 1000 in a number of steps that grows only with
      log(1000/2), whereas steps taken in λ itself shrink as ∂f/∂λ ~ λ⁻³.
    * λ >= 1 for every stored value: the forward pass reads
      exp(clamp(ρ, 0, log 1e6)) with the gradient passed straight through the
      clamp (:func:`raw_to_lambda`), so a ρ that another optimizer pushed
      below 0 is λ = 1, not softer than GELU, and still feels the pull back.

    One layer's λ is stored with shape (1,), not as a 0-d scalar (FSDP2's
    ``fully_shard`` refuses 0-d parameters); :attr:`lam` returns it as 0-d.
    State dicts and checkpoints of 0.1 (key ``log_lam_minus_1``) are converted
    on load (:func:`upgrade_lambda_state`).

    Args:
        init: initial λ (>= 1), a float, or for a per-channel layer a sequence or
            tensor of ``num_channels`` values.
        learnable: if False, ρ is a buffer (saved, never trained).
        num_channels: one λ per channel along ``channel_dim`` if given; one λ for
            the whole layer if None.
        channel_dim: the input dim that holds channels (-1 for ``(..., C)``
            activations of Linear layers and Transformers, 1 for ``(N, C, H, W)``).
        approximate: ``"none"`` (erf form) or ``"tanh"``.
    """

    def __init__(
        self,
        init: float | Sequence[float] | torch.Tensor = 1.0,
        learnable: bool = True,
        num_channels: int | None = None,
        channel_dim: int = -1,
        approximate: Approximate = "none",
    ) -> None:
        super().__init__()
        if approximate not in APPROXIMATIONS:
            raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
        if num_channels is not None and (
            isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1
        ):
            raise ValueError(f"num_channels must be a positive int or None, got {num_channels!r}")
        # validated on the CPU, so that a model can be built under ``torch.device("meta")`` (a size estimate, FSDP)
        init_values = torch.as_tensor(init, dtype=torch.float64, device="cpu").flatten()
        shape = (1,) if num_channels is None else (num_channels,)
        if init_values.numel() not in (1, shape[0]):
            raise ValueError(f"init must hold 1 or {shape[0]} values, got {init_values.numel()}")
        _check_lambda_values(init_values, "LambdaGELU init")
        raw = lambda_to_raw(init_values).expand(shape).clone().to(torch.get_default_device())
        if learnable:
            self.log_lam = nn.Parameter(raw)
        else:
            self.register_buffer(RAW_KEY, raw)
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        self.approximate = approximate

    @property
    def learnable(self) -> bool:
        """Whether λ is a trainable parameter (as opposed to a fixed buffer)."""
        return isinstance(self.log_lam, nn.Parameter)

    def _lam(self, raw: torch.Tensor | None = None) -> torch.Tensor:
        # λ = exp ρ;  dλ/dρ = λ
        lam = raw_to_lambda(self.log_lam if raw is None else raw)
        return lam.reshape(()) if self.num_channels is None else lam

    @property
    def lam(self) -> torch.Tensor:
        """The current hardness λ (a detached plain copy; shape ``()`` or ``(num_channels,)``).

        Under FSDP2 (λ sharded across ranks) this gathers it: every rank must read it.
        """
        with torch.no_grad():
            return self._lam(distributed.full_value(self.log_lam.detach())).clone()

    @torch.no_grad()
    def set_lambda_(self, value: float | Sequence[float] | torch.Tensor) -> LambdaGELU:
        """Set λ in place (a scalar, or one value per channel)."""
        values = torch.as_tensor(value, dtype=torch.float64, device="cpu").flatten()
        raw = self.log_lam
        if values.numel() not in (1, raw.numel()):
            raise ValueError(f"set_lambda_ expects 1 or {raw.numel()} values, got {values.numel()}")
        _check_lambda_values(values, "λ")
        distributed.write_full_(raw, lambda_to_raw(values).expand(raw.shape))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self._lam()
        if self.num_channels is not None:
            lam = channel_view(lam, x.ndim, self.channel_dim)
        return lambda_gelu(x, lam, self.approximate)

    def extra_repr(self) -> str:
        if distributed.is_sharded(self.log_lam):  # reading it would be a collective: print on one rank must not hang
            return f"num_channels={self.num_channels}, lam=<sharded>"
        lam = self.lam
        if lam.ndim == 0:
            text = f"lam={lam.item():.4g}"
        else:
            text = (
                f"num_channels={self.num_channels}, channel_dim={self.channel_dim}, "
                f"lam=[{lam.min().item():.4g}, {lam.max().item():.4g}]"
            )
        if self.approximate != "none":
            text += f", approximate={self.approximate!r}"
        if not self.learnable:
            text += ", learnable=False"
        return text

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        legacy = prefix + LEGACY_RAW_KEY
        if legacy in state_dict:
            state_dict[prefix + RAW_KEY] = upgrade_lambda_state({legacy: state_dict.pop(legacy)})[prefix + RAW_KEY]
        key = prefix + RAW_KEY
        raw = state_dict.get(key)
        if isinstance(raw, torch.Tensor):
            if raw.ndim == 0 and self.num_channels is None:
                state_dict[key] = raw = raw.reshape(1)
            problem = lambda_state_problem(raw, tuple(self.log_lam.shape))
            if problem is not None:
                error_msgs.append(f"layer {prefix.rstrip('.') or '<root>'}: {problem}; not loaded")
                state_dict = {k: v for k, v in state_dict.items() if k != key}
                missing_before = len(missing_keys)
                super()._load_from_state_dict(
                    state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
                )
                del missing_keys[missing_before:]  # reported above, not as "missing"
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def lambda_state_problem(raw: torch.Tensor, shape: tuple[int, ...]) -> str | None:
    """Why ``raw`` cannot be a layer's stored ρ = log λ of ``shape``, or None if it can.

    A ρ below 0 is accepted: it reads as λ = 1 (:func:`raw_to_lambda`), and an
    optimizer outside :func:`lambda_gelu.param_groups` may leave one there.
    """
    if tuple(raw.shape) != shape:
        return f"λ has shape {tuple(raw.shape)} in the checkpoint, {shape} in the model"
    if not raw.is_floating_point() or not bool(torch.isfinite(raw).all()) or bool((raw > RAW_MAX).any()):
        return "λ would be non-finite (or above 1e6)"
    return None


def _refuse_bad_lambdas(root: nn.Module, state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
    """Pre-hook of ``root.load_state_dict``: every λ entry is checked before any weight is copied."""
    problems = []
    for name, module in root.named_modules(prefix=prefix.rstrip(".")):
        if not isinstance(module, LambdaGELU):
            continue
        key = f"{name}.{RAW_KEY}" if name else RAW_KEY
        legacy = f"{name}.{LEGACY_RAW_KEY}" if name else LEGACY_RAW_KEY
        raw = state_dict.get(key)
        if raw is None and legacy in state_dict:
            raw = upgrade_lambda_state({legacy: state_dict[legacy]})[key]
        if isinstance(raw, torch.Tensor):
            shape = tuple(module.log_lam.shape)
            if raw.ndim == 0 and module.num_channels is None:
                raw = raw.reshape(1)
            if (problem := lambda_state_problem(raw, shape)) is not None:
                problems.append(f"layer {name or '<root>'}: {problem}")
    if problems:
        raise RuntimeError(f"Error(s) in loading state_dict for {type(root).__name__}: {'; '.join(problems)}; "
                           "nothing was loaded")


def guard_lambda_loads(model: nn.Module) -> nn.Module:
    """Make ``model.load_state_dict`` check every λ before it copies any weight (returns ``model``; idempotent).

    Without it torch copies the weights of the modules it visits first and only then meets a layer's bad λ.
    :func:`lambda_gelu.convert` and :func:`lambda_gelu.models.build_model` call it on the model they return;
    call it on a model you assemble from :class:`LambdaGELU` layers yourself.
    """
    if not getattr(model, "_lambda_gelu_guarded", False):
        model.register_load_state_dict_pre_hook(_refuse_bad_lambdas)
        model._lambda_gelu_guarded = True
    return model

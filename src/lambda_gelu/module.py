"""``LambdaGELU``: the λ-GELU activation with a learnable hardness λ >= 1."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lambda_gelu.ops import APPROXIMATIONS, Approximate, channel_view, lambda_gelu

RAW_KEY = "log_lam_minus_1"
"""State-dict key (under the layer's prefix) of the raw parameter ρ = log(λ − 1)."""

LAMBDA_FLOOR_EXCESS = 1e-4
"""λ = 1 is stored as λ = 1 + 1e-4: |f(x; 1 + 1e-4) − GELU(x)| <= 2.94e-5 for all x."""

LAMBDA_MAX = 1e6
"""Largest λ the module produces; the op's numerics are guaranteed up to here."""

RAW_MIN = math.log(LAMBDA_FLOOR_EXCESS)
RAW_MAX = math.log(LAMBDA_MAX - 1.0)


def _check_lambda_values(values: torch.Tensor, what: str) -> None:
    """Raise ValueError unless every value is finite and in [1, LAMBDA_MAX]."""
    bad = ~torch.isfinite(values) | (values < 1.0) | (values > LAMBDA_MAX)
    if bool(bad.any()):
        shown = values[bad].flatten()[:4].tolist()
        raise ValueError(
            f"{what} must be finite and in [1, {LAMBDA_MAX:g}], got {', '.join(f'{v:g}' for v in shown)}"
        )


def lambda_to_raw(lam: torch.Tensor) -> torch.Tensor:
    """ρ = log(max(λ − 1, LAMBDA_FLOOR_EXCESS)), the inverse of λ = 1 + exp(ρ) above the floor."""
    return torch.log((lam.double() - 1.0).clamp(min=LAMBDA_FLOOR_EXCESS)).float()


class LambdaGELU(nn.Module):
    """f(x; λ) = x·Φ(λx) with hardness λ >= 1: GELU at λ = 1, ReLU as λ → ∞.

    **Reparameterization.** λ = 1 + exp(ρ) with ρ an unconstrained raw parameter
    (state-dict key ``log_lam_minus_1``). Why this map:

    * λ >= 1 holds for every ρ, with no clamp that would zero the gradient.
    * For large λ, ρ ≈ log λ: the natural coordinate of a scale parameter
      (f(x; λ) = GELU(λx)/λ and only λ·σ matters for inputs of spread σ). A
      step of size η in ρ changes λ by a factor of about e^η whatever λ is, so
      λ can travel from 2 to 1000 in a number of steps that grows only with
      log(1000/2), whereas steps taken in λ itself would shrink as ∂f/∂λ ~ λ⁻³.
    * Near λ = 1, dλ/dρ = λ − 1 → 0: the boundary is a smooth barrier, so a
      layer that prefers soft gates settles at λ ≈ 1 instead of bouncing off a
      clamp (a softplus on λ − 1 would do the same near 1 but is linear, not
      logarithmic, for large λ).
    * λ = 1 is stored as 1 + 1e-4 (ρ = log 1e-4): that layer differs from GELU
      by at most 2.94e-5 (max over x of x²φ(x) = 2φ(√2) = 0.2935, times 1e-4),
      a sixteenth of the 4.7e-4 gap between GELU and its tanh approximation,
      while leaving λ's gradient alive
      (dλ/dρ = 1e-4, which :func:`lambda_gelu.param_groups` normalizes away).

    The raw ρ is clamped to at most log(1e6 − 1) in the forward pass so that λ
    never overflows.

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
        if num_channels is not None and (not isinstance(num_channels, int) or num_channels < 1):
            raise ValueError(f"num_channels must be a positive int or None, got {num_channels!r}")
        init_values = torch.as_tensor(init, dtype=torch.float64).flatten()
        shape = () if num_channels is None else (num_channels,)
        if init_values.numel() not in (1, math.prod(shape)):
            raise ValueError(
                f"init must hold 1 or {math.prod(shape)} values, got {init_values.numel()}"
            )
        _check_lambda_values(init_values, "LambdaGELU init")
        raw = lambda_to_raw(init_values).reshape(-1)[0].expand(shape).clone() if init_values.numel() == 1 \
            else lambda_to_raw(init_values).reshape(shape)
        if learnable:
            self.log_lam_minus_1 = nn.Parameter(raw)
        else:
            self.register_buffer(RAW_KEY, raw)
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        self.approximate = approximate

    @property
    def learnable(self) -> bool:
        """Whether λ is a trainable parameter (as opposed to a fixed buffer)."""
        return isinstance(self.log_lam_minus_1, nn.Parameter)

    def _lam(self) -> torch.Tensor:
        # λ = 1 + exp(ρ);  dλ/dρ = exp(ρ) = λ − 1
        return 1.0 + torch.exp(self.log_lam_minus_1.clamp(max=RAW_MAX))

    @property
    def lam(self) -> torch.Tensor:
        """The current hardness λ (a detached copy; shape ``()`` or ``(num_channels,)``)."""
        with torch.no_grad():
            return self._lam().detach().clone()

    @torch.no_grad()
    def set_lambda_(self, value: float | Sequence[float] | torch.Tensor) -> LambdaGELU:
        """Set λ in place (a scalar, or one value per channel); values in [1, 1+1e-4) are stored as 1+1e-4."""
        values = torch.as_tensor(value, dtype=torch.float64, device="cpu").flatten()
        raw = self.log_lam_minus_1
        if values.numel() not in (1, raw.numel()):
            raise ValueError(f"set_lambda_ expects 1 or {raw.numel()} values, got {values.numel()}")
        _check_lambda_values(values, "λ")
        raw.copy_(lambda_to_raw(values).to(raw.device).reshape(-1 if values.numel() > 1 else []).expand(raw.shape))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self._lam()
        if self.num_channels is not None:
            lam = channel_view(lam, x.ndim, self.channel_dim)
        return lambda_gelu(x, lam, self.approximate)

    def extra_repr(self) -> str:
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
        key = prefix + RAW_KEY
        raw = state_dict.get(key)
        if isinstance(raw, torch.Tensor):
            layer = prefix.rstrip(".") or "<root>"
            problem = None
            if raw.shape != self.log_lam_minus_1.shape:
                problem = (
                    f"λ has shape {tuple(raw.shape)} in the checkpoint, "
                    f"{tuple(self.log_lam_minus_1.shape)} in the model"
                )
            elif not raw.is_floating_point() or not bool(torch.isfinite(raw).all()) or bool(
                (raw > RAW_MAX).any()
            ):
                problem = "λ would be non-finite (or above 1e6)"
            if problem is not None:
                error_msgs.append(f"layer {layer}: {problem}; not loaded")
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

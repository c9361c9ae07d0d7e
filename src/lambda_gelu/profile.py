"""Hardness profiles: per-layer λ, effective hardness λ·σ, and a recorder of λ during training."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lambda_gelu.gates import activation_layers, layer_lambda


@dataclass(frozen=True)
class LayerHardness:
    """Hardness of one activation layer.

    ``lam`` is the layer's λ (the mean over channels for a per-channel layer,
    with min/max/std beside it); ``sigma`` is the standard deviation of its
    pre-activations on calibration data and ``effective`` the mean of λ·σ
    (per channel where λ is), both None until calibrated. ``effective`` is
    what decides how ReLU-like the gate is on the data it actually sees.
    """

    name: str
    lam: float
    lam_min: float
    lam_max: float
    lam_std: float
    num_channels: int | None
    sigma: float | None = None
    effective: float | None = None

    def to_dict(self) -> dict[str, float | int | str | None]:
        """Plain-dict form, for JSON."""
        return asdict(self)


def hardness(model: nn.Module, samples: dict[str, torch.Tensor] | None = None) -> list[LayerHardness]:
    """Per-layer hardness of every LambdaGELU (and GELU-family, λ = 1) layer, in module order.

    ``samples`` are the pre-activations from :func:`lambda_gelu.calibrate`;
    with them each entry gets σ and the effective hardness λ·σ.
    """
    rows = []
    for name, module in activation_layers(model).items():
        lam = layer_lambda(module).flatten()
        sigma = effective = None
        if samples is not None and name in samples:
            values = samples[name].double()
            sigma_c = values.std(0) if values.ndim == 2 else values.std()
            sigma = float(sigma_c.mean()) if values.ndim == 2 else float(sigma_c)
            effective = float((lam * sigma_c).mean())
        rows.append(
            LayerHardness(
                name=name,
                lam=float(lam.mean()),
                lam_min=float(lam.min()),
                lam_max=float(lam.max()),
                lam_std=float(lam.std()) if lam.numel() > 1 else 0.0,
                num_channels=getattr(module, "num_channels", None),
                sigma=sigma,
                effective=effective,
            )
        )
    return rows


def profile_table(profile: list[LayerHardness]) -> str:
    """A Markdown table of a hardness profile."""
    lines = [
        "| layer | λ (mean) | λ min | λ max | σ | λ·σ |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in profile:
        sigma = "–" if row.sigma is None else f"{row.sigma:.3g}"
        effective = "–" if row.effective is None else f"{row.effective:.3g}"
        lines.append(
            f"| {row.name} | {row.lam:.4g} | {row.lam_min:.4g} | {row.lam_max:.4g} | {sigma} | {effective} |"
        )
    return "\n".join(lines)


class HardnessRecorder:
    """Log every activation layer's λ (mean, min, max) every ``every`` steps.

    Call :meth:`record` with the step number each training step (it logs on
    multiples of ``every``); write with :meth:`to_csv` / :meth:`to_json`.
    ``rows`` holds dicts with keys step, layer, lam, lam_min, lam_max.
    """

    def __init__(self, model: nn.Module, every: int = 10) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model = model
        self.every = every
        self.rows: list[dict[str, float | int | str]] = []

    def record(self, step: int, force: bool = False) -> None:
        """Log λ at ``step`` if it is a multiple of ``every`` (or ``force``)."""
        if not force and step % self.every:
            return
        for row in hardness(self.model):
            self.rows.append(
                {"step": step, "layer": row.name, "lam": row.lam, "lam_min": row.lam_min, "lam_max": row.lam_max}
            )

    def trajectories(self) -> dict[str, tuple[list[int], list[float]]]:
        """``{layer: (steps, mean λ)}`` from the recorded rows."""
        out: dict[str, tuple[list[int], list[float]]] = {}
        for row in self.rows:
            steps, lams = out.setdefault(str(row["layer"]), ([], []))
            steps.append(int(row["step"]))
            lams.append(float(row["lam"]))
        return out

    def to_csv(self, path: str | Path) -> None:
        """Write the rows as CSV (header: step, layer, lam, lam_min, lam_max), atomically."""
        from lambda_gelu.outputs import write_text_atomic

        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=["step", "layer", "lam", "lam_min", "lam_max"])
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(path, text.getvalue())

    def to_json(self, path: str | Path) -> None:
        """Write the rows as a JSON list."""
        Path(path).write_text(json.dumps(self.rows, indent=1))

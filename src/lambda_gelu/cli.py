"""The ``lambda-gelu`` command: demo, train, harden, relufy, profile."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from lambda_gelu import distributed
from lambda_gelu.calibrate import calibrate
from lambda_gelu.checkpoint import load_checkpoint, save_checkpoint
from lambda_gelu.convert import channel_counts, convert
from lambda_gelu.data import DATASETS, Split, load_dataset
from lambda_gelu.harden import HardenConfig
from lambda_gelu.metrics import disruption, evaluate
from lambda_gelu.models import ACTIVATIONS, MODELS, build_model, model_kwargs_for
from lambda_gelu.output_plan import Output, landing, planned_outputs
from lambda_gelu.outputs import staged_dir
from lambda_gelu.pipeline import calibration_batches, harden, relu_copy
from lambda_gelu.profile import HardnessRecorder, hardness, profile_table
from lambda_gelu.resume import (
    Checkpointer,
    TrainingInterrupted,
    graceful_stop,
    open_run_state,
    saved_states,
    sigterm_as_interrupt,
    state_folder,
)
from lambda_gelu.runs.hf import BEST as HF_BEST
from lambda_gelu.runs.hf import METHODS as HF_METHODS
from lambda_gelu.runs.hf import TASKS as HF_TASKS
from lambda_gelu.runs.hf import HFConfig
from lambda_gelu.schedule import SHAPES
from lambda_gelu.train import OPTIMIZERS, FitStats, NonFiniteError, TrainConfig, fit
from lambda_gelu.version import __version__

EXIT_USAGE = 2


USER_ERRNOS = frozenset({errno.ENOENT, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
                         errno.EROFS, errno.EBUSY, errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL, errno.ENOTEMPTY,
                         errno.EXDEV})
"""OS errors that the paths given caused (exit 2); any other (a full disk, an I/O error) exits with 1."""


def os_error_line(error: OSError) -> str:
    """One line for an OSError: the path(s) and what failed (``str(error)`` when it carries its own message)."""
    if error.strerror and error.filename is not None:
        paths = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else str(error.filename)
        return f"{paths}: {error.strerror}"
    return " ".join(str(error).split())


class UsageError(Exception):
    """Bad input from the command line: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exits with 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


SEED_RANGE = 2**32  # NumPy's seeds; torch's wider range would fold 2**32 onto 0 there


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < SEED_RANGE:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, {SEED_RANGE - 1}], got {value}")
    return value


def _unit_interval(text: str) -> float:
    value = _positive_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths like 128,128, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def _add_data_args(parser: argparse.ArgumentParser, from_checkpoint: bool) -> None:
    """--dataset/--data-dir; commands that read a checkpoint default to the data set recorded in it."""
    parser.add_argument("--dataset", choices=sorted(DATASETS), default=None if from_checkpoint else "digits",
                        help="data set (default: %s)" % ("the checkpoint's" if from_checkpoint else "digits"))
    parser.add_argument("--data-dir", help="where the data set's files are (for data sets that read files)")


def _add_output_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", required=True, help=f"{what} to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def _add_resume_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue the run saved in <out>.state (same options); starts afresh if none is saved")
    parser.add_argument("--checkpoint-every", type=_positive_int, default=0, metavar="N",
                        help="also save the run state every N steps (default: when stopped by a signal, and when "
                        "training ends)")


def _run_state(args: argparse.Namespace, out: Any) -> Checkpointer:
    """The command's resumable run state beside ``out``; ``args`` minus the bookkeeping flags describe the run."""
    skip = {"resume", "force", "no_progress", "checkpoint_every", "checkpoint"}  # the input: by its sha256
    run = {k: v for k, v in vars(args).items() if k not in skip}
    checkpointer = open_run_state(out, run, resume=args.resume, force=args.force, every=args.checkpoint_every)
    if args.resume and distributed.is_main():
        saved = checkpointer.resume_state
        print(f"resuming from step {saved.step} ({saved.path})" if saved else
              f"no saved run state in {checkpointer.folder}; starting from step 0", file=sys.stderr)
    return checkpointer


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lambda-gelu`` command."""
    parser = _Parser(prog="lambda-gelu", description="Learn GELU gate hardness, then turn the network into ReLU.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    hf = sub.add_parser("hf", help="ReLU-ize your Hugging Face model folder on your data into a stock ReLU folder")
    hf.add_argument("model_dir", metavar="MODEL_DIR", help="a folder saved by save_pretrained (safetensors weights)")
    hf.add_argument("--data", required=True, help="a .txt (one example a line), .jsonl, .csv or .tsv file, a folder "
                    "saved by datasets, or a folder of images; a tenth is held out for the report")
    _add_output_args(hf, "output folder (a save_pretrained folder with the report as its README.md)")
    hf.add_argument("--task", choices=sorted(HF_TASKS), help="default: from the config's architectures")
    hf.add_argument("--method", choices=(*HF_METHODS, HF_BEST), default=HFConfig.method,
                    help="lambda-gelu (default), lambda-gelu-fold, a baseline (direct-swap, swap-distill, "
                    "swap-fold-distill), or best: run them all and keep the one closest to the original on a "
                    "validation split")
    hf.add_argument("--baselines", action="store_true",
                    help="also run every other method at the same budget; their folders go to OUT_DIR/baselines")
    hf.add_argument("--steps", type=_positive_int, default=HFConfig.steps, help="training steps of each trained method")
    hf.add_argument("--batch-size", type=_positive_int, default=HFConfig.batch_size)
    hf.add_argument("--lr", type=_positive_float, default=HFConfig.lr)
    hf.add_argument("--tau", type=_unit_interval, default=HFConfig.tau, help="per-gate tolerance τ")
    hf.add_argument("--per-layer", action="store_true", help="one λ per gate instead of one per channel")
    hf.add_argument("--max-length", type=_positive_int, default=HFConfig.max_length, help="tokens per text example")
    hf.add_argument("--text-field", help="the field of a .jsonl/.csv/datasets record that holds the text")
    hf.add_argument("--seed", type=_seed, default=0)
    hf.add_argument("--onnx", action="store_true", help="also export model.onnx and check it with onnxruntime")
    hf.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")
    hf.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights, which can run code")
    hf.add_argument("--no-progress", action="store_true")
    hf.add_argument("--resume", action="store_true",
                    help="continue a run stopped by a signal (same options) from OUT_DIR.<method>.state")
    hf.add_argument("--checkpoint-every", type=_positive_int, default=0, metavar="N",
                    help="also save each method's run state every N steps (default: when stopped by a signal, "
                    "and when its training ends)")

    demo = sub.add_parser("demo", help="the whole pipeline on an embedded data set, with a report")
    demo.add_argument("--out", default="runs/demo", help="run folder to write (default: runs/demo)")
    demo.add_argument("--force", action="store_true", help="replace the run folder if it exists")
    _add_data_args(demo, from_checkpoint=False)
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--steps", type=_positive_int, default=3000, help="training steps per model")
    demo.add_argument("--harden-steps", type=_positive_int, default=600, help="ReLU-ization (and fine-tuning) steps")
    demo.add_argument("--tau", type=_unit_interval, default=HardenConfig.tau, help="per-layer tolerance τ")
    demo.add_argument("--hidden", type=_widths, default=(128, 128, 128), help="MLP widths (default 128,128,128)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    train = sub.add_parser("train", help="train a model from scratch and save a checkpoint")
    _add_output_args(train, "checkpoint file (.safetensors)")
    _add_data_args(train, from_checkpoint=False)
    train.add_argument("--model", choices=sorted(MODELS), default="mlp")
    train.add_argument("--hidden", type=_widths, default=(128, 128, 128))
    train.add_argument("--activation", choices=sorted(ACTIVATIONS), default="lambda_gelu")
    train.add_argument("--per-channel", action="store_true", help="one λ per channel instead of per layer")
    train.add_argument("--steps", type=_positive_int, default=3000)
    train.add_argument("--lr", type=_positive_float, default=3e-3)
    train.add_argument("--weight-decay", type=_nonnegative_float, default=0.1)
    train.add_argument("--hardness-lr", type=_positive_float, default=None, help="step size in log λ (default 0.02)")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    train.add_argument("--batch-size", type=_positive_int, default=64)
    train.add_argument("--seed", type=_seed, default=0)
    train.add_argument("--record", help="also write λ every --record-every steps to this CSV file")
    train.add_argument("--record-every", type=_positive_int, default=10)
    train.add_argument("--no-progress", action="store_true")
    _add_resume_args(train)

    hard = sub.add_parser("harden", help="move each λ to its target while the weights train (before the swap)")
    hard.add_argument("checkpoint", help="a λ-GELU checkpoint")
    _add_output_args(hard, "hardened checkpoint file")
    _add_data_args(hard, from_checkpoint=True)
    hard.add_argument("--steps", type=_positive_int, default=HardenConfig.steps)
    hard.add_argument("--tau", type=_unit_interval, default=HardenConfig.tau)
    hard.add_argument("--shape", choices=SHAPES, default=HardenConfig.shape)
    hard.add_argument("--distill-weight", type=_fraction, default=HardenConfig.distill_weight)
    hard.add_argument("--lr", type=_positive_float, default=HardenConfig.lr)
    hard.add_argument("--seed", type=_seed, default=HardenConfig.seed)
    hard.add_argument("--fold", action="store_true",
                      help="fold every change of a gate's mean into the Linear that reads it (bias correction)")
    hard.add_argument("--no-progress", action="store_true")
    _add_resume_args(hard)

    relu = sub.add_parser("relufy", help="swap every λ-GELU (or, with --include-gelu, GELU) gate for ReLU")
    relu.add_argument("checkpoint")
    _add_output_args(relu, "ReLU checkpoint file")
    _add_data_args(relu, from_checkpoint=True)
    relu.add_argument("--include-gelu", action="store_true", help="also swap plain GELU (the direct-swap baseline)")
    relu.add_argument("--fold", action="store_true",
                      help="fold each gate's per-channel fit GELU ≈ a·ReLU + b, on calibration batches of the "
                      "training data, into the Linear that reads it (swaps GELU too)")
    relu.add_argument("--onnx", help="also export the ReLU model to this ONNX file")

    prof = sub.add_parser("profile", help="print (and plot) the hardness profile of a checkpoint")
    prof.add_argument("checkpoint")
    _add_data_args(prof, from_checkpoint=True)
    prof.add_argument("--out", help="folder for profile.md, profile.json and plots")
    prof.add_argument("--force", action="store_true")

    chk = sub.add_parser("check", help="report: ONNX, int8 quantization, Marabou verification, activation sparsity")
    chk.add_argument("checkpoint", help="the ReLU-ized checkpoint (or a GELU-family one, or a demo run folder)")
    chk.add_argument("--gelu", help="the GELU original to compare with")
    _add_data_args(chk, from_checkpoint=True)
    chk.add_argument("--epsilon", type=_positive_float, default=0.01,
                     help="L∞ radius of the robustness queries (default 0.01)")
    chk.add_argument("--points", type=_positive_int, default=10, help="test points to verify (default 10)")
    chk.add_argument("--timeout", type=_positive_float, default=10.0, help="seconds per Marabou query (default 10)")
    chk.add_argument("--repeats", type=_positive_int, default=30, help="latency measurements per model (default 30)")
    chk.add_argument("--batch", type=_positive_int, default=256, help="rows per latency measurement (default 256)")
    _add_output_args(chk, "report folder")
    chk.add_argument("--no-progress", action="store_true")

    from lambda_gelu.studies.common import PAIRS

    study = sub.add_parser("study", help="run a study (dynamics, profiles, relufy, or all) into a results folder")
    study.add_argument("study", choices=["dynamics", "profiles", "relufy", "all"])
    budget = study.add_mutually_exclusive_group()
    budget.add_argument("--quick", action="store_true", help="the quick profile (minutes instead of hours)")
    budget.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # test-only budget
    study.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), help="model × data pairs (default: the study's)")
    study.add_argument("--seeds", nargs="+", type=_seed, help="seeds (default: 0 1 2; --quick: 0, or 0 1 where "
                       "the study compares seeds)")
    study.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    study.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    study.add_argument("--data-dir", help="root of the data files (MNIST: <dir>/MNIST/raw; Shakespeare: *.md plays)")
    study.add_argument("--download", action="store_true", help="download missing MNIST files (needs torchvision)")
    study.add_argument("--cache", help="folder that keeps trained models, shared between studies and reruns")
    _add_output_args(study, "results folder")
    study.add_argument("--no-progress", action="store_true")

    return parser


def _split_for(args: argparse.Namespace, header: dict[str, Any], model: torch.nn.Module) -> Split:
    """The data set of ``args.checkpoint`` (``--dataset`` overrides), checked against its model."""
    meta = header.get("metadata", {})
    name = args.dataset or meta.get("dataset")
    if name is None:
        raise UsageError("the checkpoint does not say which data set it was trained on; pass --dataset")
    split = load_dataset(name, args.data_dir, seed=int(meta.get("data_seed", 0)))
    split.check_fits(model, f"the model of {args.checkpoint}")
    return split


def _cmd_hf(args: argparse.Namespace, command: str) -> int:
    from lambda_gelu.runs.hf import run_hf

    config = HFConfig(task=args.task, method=args.method, baselines=args.baselines, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, tau=args.tau, per_channel=not args.per_layer,
                      seed=args.seed, max_length=args.max_length, text_field=args.text_field,
                      trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, onnx=args.onnx)
    run = {k: v for k, v in vars(args).items()
           if k not in {"resume", "force", "no_progress", "command", "checkpoint_every"}}
    metrics = run_hf(args.model_dir, args.data, args.out, config, force=args.force, progress=not args.no_progress,
                     resume=args.resume, command=command, run_args=run, checkpoint_every=args.checkpoint_every)
    for row in metrics["methods"].values():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith(("cosine_mean", "agreement", "kl")))
        print(f"{row['label']}: {shown} ({row['seconds']:.0f} s)")
    if "selection" in metrics:
        selection = metrics["selection"]
        chosen = metrics["methods"][selection["chosen"]]["label"]
        print(f"best on {selection['examples']} validation examples: {chosen}")
    print(f"-> {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace, command: str) -> int:
    from lambda_gelu.demo import DemoConfig, run_demo

    if args.dataset == "shakespeare":
        raise UsageError("the demo trains an MLP classifier; for the language model see `lambda-gelu study`")
    config = DemoConfig(dataset=args.dataset, data_dir=args.data_dir, seed=args.seed, hidden=tuple(args.hidden))
    config.train.steps = args.steps
    config.harden = HardenConfig(steps=args.harden_steps, tau=args.tau)
    run_demo(args.out, config, force=args.force, progress=not args.no_progress, command=command)
    return 0


def _cmd_train(args: argparse.Namespace, command: str) -> int:
    distributed.init_from_env()
    out = Path(args.out)
    checkpointer = _run_state(args, out)
    split = load_dataset(args.dataset, args.data_dir, seed=args.seed)
    kwargs = model_kwargs_for(args.model, split.input_shape, split.num_classes, sequence=split.vocab is not None,
                              hidden=args.hidden)
    torch.manual_seed(args.seed)
    learned = args.activation == "lambda_gelu"
    model = build_model(args.model, **kwargs, activation="gelu" if learned else args.activation)
    if args.per_channel and not learned:
        raise UsageError("--per-channel needs --activation lambda_gelu")
    if learned:  # the same initial weights as the GELU model of this seed
        channels = channel_counts(model, split.x_train[:2]) if args.per_channel else None
        convert(model, num_channels=channels)
    config = TrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, hardness_lr=args.hardness_lr,
                         optimizer=args.optimizer, batch_size=args.batch_size, seed=args.seed)
    recorder = HardnessRecorder(model, every=args.record_every) if args.record else None
    stats = FitStats()
    with graceful_stop():
        fit(model, split, config, recorder=recorder, progress=not args.no_progress and distributed.is_main(),
            checkpointer=checkpointer, stats=stats)
        result = evaluate(model, split.test_batches())
        meta = {"dataset": args.dataset, "data_seed": args.seed, "train": config.to_dict(), "command": command,
                "test_accuracy": result.accuracy, "test_loss": result.loss}
        if distributed.is_main():
            save_checkpoint(out, model, args.model, kwargs, meta)
            if recorder is not None:
                recorder.to_csv(args.record)
            checkpointer.clear()
            _say_skipped(stats)
            print(f"test accuracy {result.accuracy:.2f}%  loss {result.loss:.4f}  -> {out}")
    return 0


def _cmd_harden(args: argparse.Namespace, command: str) -> int:
    distributed.init_from_env()
    out = Path(args.out)
    model, header = load_checkpoint(args.checkpoint)
    args.checkpoint_sha256 = hashlib.sha256(Path(args.checkpoint).read_bytes()).hexdigest()  # resume the same input
    checkpointer = _run_state(args, out)
    split = _split_for(args, header, model)
    config = HardenConfig(steps=args.steps, tau=args.tau, shape=args.shape, distill_weight=args.distill_weight,
                          lr=args.lr, seed=args.seed, fold=args.fold)
    before = evaluate(model, split.test_batches())
    stats = FitStats()
    with graceful_stop():
        hardener = harden(model, split, config, progress=not args.no_progress and distributed.is_main(),
                          checkpointer=checkpointer, stats=stats)
        after = evaluate(model, split.test_batches())
        meta = dict(header.get("metadata", {}), harden=config.to_dict(), command=command,
                    targets={k: v.tolist() for k, v in hardener.target.items()},
                    test_accuracy=after.accuracy, test_loss=after.loss)
        if distributed.is_main():
            save_checkpoint(out, model, header["model"], header["model_kwargs"], meta)
            checkpointer.clear()
            _say_skipped(stats)
            print(profile_table(hardness(model)))
            print(f"test accuracy {before.accuracy:.2f}% -> {after.accuracy:.2f}% (before the swap)  -> {out}")
    return 0


def _say_skipped(stats: FitStats) -> None:
    if stats.skipped:
        print(f"note: skipped {len(stats.skipped)} step(s) with a non-finite loss or gradient", file=sys.stderr)


def _cmd_relufy(args: argparse.Namespace, command: str) -> int:
    out = Path(args.out)
    model, header = load_checkpoint(args.checkpoint)
    split = _split_for(args, header, model)
    hardened_with = header.get("metadata", {}).get("harden") or {}
    if hardened_with.get("fold") and not args.fold:
        print("note: the checkpoint was hardened with --fold; without --fold here the swap itself is not folded",
              file=sys.stderr)
    calibration = {k: hardened_with[k] for k in ("calibration_batches", "calibration_batch_size", "seed")
                   if k in hardened_with}  # the batches the hardening calibrated on
    fold = calibration_batches(split, HardenConfig(**calibration)) if args.fold else None
    relu_model = relu_copy(model, include_gelu=args.include_gelu, example=split.x_test[:2], fold=fold)
    report = disruption(model, relu_model, split.test_batches())
    meta = dict(header.get("metadata", {}), relufy=report.to_dict(), command=command,
                test_accuracy=report.accuracy_after)
    onnx = None
    if args.onnx:  # first: the export is the step more likely to fail, and then nothing is written
        from lambda_gelu.export import check_onnx, export_onnx

        export_onnx(relu_model, split.x_test[:2], args.onnx)
        onnx = check_onnx(relu_model, split.x_test, args.onnx)
    try:
        save_checkpoint(out, relu_model, header["model"], header["model_kwargs"], meta)
    except BaseException:
        if args.onnx:
            Path(args.onnx).unlink(missing_ok=True)  # both outputs or neither
        raise
    print(f"accuracy {report.accuracy_before:.2f}% -> {report.accuracy_after:.2f}% "
          f"(drop {report.accuracy_before - report.accuracy_after:+.2f}), loss {report.loss_before:.4f} -> "
          f"{report.loss_after:.4f}, KL {report.kl:.2e}")
    for name, value in report.layer_discrepancy.items():
        print(f"  {name}: D(λ) = {value:.2e}")
    if onnx is not None:
        print(f"ONNX: {onnx.op_counts}; smooth-gate ops: {onnx.smooth_gate_ops or 'none'}; "
              f"max |onnxruntime − torch| = {onnx.max_abs_diff:.2e}")
    print(f"-> {out}")
    return 0


def _cmd_profile(args: argparse.Namespace, command: str) -> int:
    model, header = load_checkpoint(args.checkpoint)
    samples = None
    if args.dataset or header.get("metadata", {}).get("dataset"):
        samples = calibrate(model, _split_for(args, header, model).train_batches())
    profile = hardness(model, samples)
    table = profile_table(profile)
    print(table)
    if args.out is not None:
        from lambda_gelu.plots import plot_gates, plot_profile

        with staged_dir(args.out, force=args.force) as stage:
            (stage / "profile.md").write_text(f"# Hardness profile of {args.checkpoint}\n\n{table}\n")
            (stage / "profile.json").write_text(json.dumps([row.to_dict() for row in profile], indent=1))
            plot_profile(profile, stage / "profile.png")
            if samples is not None:
                plot_gates(model, samples, stage / "gates.png")
        print(f"-> {args.out}")
    return 0


def _cmd_check(args: argparse.Namespace, command: str) -> int:
    from lambda_gelu.check import CheckConfig, check

    config = CheckConfig(epsilon=args.epsilon, points=args.points, timeout_s=args.timeout,
                         latency_repeats=args.repeats, quant_batch=args.batch)
    check(args.checkpoint, args.out, gelu=args.gelu, dataset=args.dataset, data_dir=args.data_dir, config=config,
          force=args.force, progress=not args.no_progress, command=command)
    return 0


def _cmd_study(args: argparse.Namespace, command: str) -> int:
    from lambda_gelu.studies import StudyContext, run_study

    if args.threads:
        torch.set_num_threads(args.threads)
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    seeds = tuple(args.seeds) if args.seeds else None  # None: each study's default for the profile
    ctx = StudyContext(profile=profile, seeds=seeds, device=args.device, data_dir=args.data_dir,
                       download=args.download, progress=not args.no_progress, command=command, cache_dir=args.cache)
    run_study(args.study, args.out, ctx, args.pairs, force=args.force)
    print(f"-> {args.out}")
    return 0


COMMANDS = {"hf": _cmd_hf, "demo": _cmd_demo, "train": _cmd_train, "harden": _cmd_harden, "relufy": _cmd_relufy,
            "profile": _cmd_profile, "check": _cmd_check, "study": _cmd_study}


WRITES = {"hf": (("out", "folder"),), "demo": (("out", "folder"),), "train": (("out", "file"), ("record", "file")),
          "harden": (("out", "file"),), "relufy": (("out", "file"), ("onnx", "file")),
          "profile": (("out", "folder"),), "check": (("out", "folder"),), "study": (("out", "folder"),)}
"""What each command writes: (argument, file or folder)."""
READS = ("model_dir", "data", "checkpoint", "gelu", "data_dir", "cache")
"""The arguments that name what a command reads (the study's cache is read and written; no output may hold it)."""


def _planned(args: argparse.Namespace) -> tuple[list[Output], list[tuple[str, str]]]:
    """The outputs and inputs of ``args``' command, for :func:`~lambda_gelu.output_plan.planned_outputs`."""
    given = [(dest, kind) for dest, kind in WRITES[args.command] if getattr(args, dest, None) is not None]
    for dest, _kind in given:
        if not str(getattr(args, dest)).strip():
            raise UsageError(f"--{dest} is empty; name a path")
        where = landing(getattr(args, dest))
        if where != Path(os.path.abspath(getattr(args, dest))):  # link/..: write where the check looked
            setattr(args, dest, str(where))
    outputs = [Output(Path(getattr(args, dest)), kind, "--" + dest) for dest, kind in given]
    if hasattr(args, "checkpoint_every") and args.command != "hf":  # train, harden: the run state beside --out
        outputs.append(Output(state_folder(args.out), "folder", "the run state of --out", may_exist=True))
    inputs = [("--" + dest.replace("_", "-") if dest not in ("model_dir", "checkpoint") else dest.upper(),
               getattr(args, dest)) for dest in READS if getattr(args, dest, None)]
    return outputs, inputs


def _kept_states(args: argparse.Namespace, again: str) -> str:
    """"; the run state is kept in ...; continue with: ..." when a stopped command left a run state to resume."""
    kept = saved_states(args.out) if hasattr(args, "resume") and getattr(args, "out", None) else []
    return f"; the run state is kept in {', '.join(map(str, kept))}; continue with: {again}" if kept else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lambda-gelu`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = "lambda-gelu " + shlex.join(argv)
    again = command if "--resume" in argv else f"{command} --resume"
    try:
        outputs, inputs = _planned(args)
        # every output checked and locked before any work; under torchrun rank 0 holds the locks
        with sigterm_as_interrupt(), planned_outputs(outputs, inputs, force=getattr(args, "force", False),
                                                     lock=os.environ.get("RANK", "0") == "0"):
            return COMMANDS[args.command](args, command)
    except TrainingInterrupted as stop:
        if distributed.is_main():
            print(f"lambda-gelu {args.command}: {stop}; continue with: {again}", file=sys.stderr)
        return 128 + stop.signum
    except NonFiniteError as error:
        print(f"lambda-gelu {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (resume.Terminated), outside a training loop
        signum = getattr(stop, "signum", signal.SIGINT)
        if distributed.is_main():
            print(f"lambda-gelu {args.command}: interrupted by {signal.Signals(signum).name}"
                  f"{_kept_states(args, again)}", file=sys.stderr)
        return 128 + signum
    except (UsageError, ValueError) as error:
        print(f"lambda-gelu {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # one boundary for every file the command read or wrote
        print(f"lambda-gelu {args.command}: error: {os_error_line(error)}{_kept_states(args, again)}",
              file=sys.stderr)
        return EXIT_USAGE if error.errno in USER_ERRNOS or error.errno is None else 1
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())

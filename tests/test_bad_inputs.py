"""Bad input, everywhere: one table of bad inputs for every CLI command and the public functions.

Each case must give one clear line (exit code 2 and one line on stderr for the CLI; a ValueError or OSError
subclass, or a TypeError for a wrong dtype, with a one-line message for a function) and leave every byte of the
workspace as it was. A full disk exits with 1 instead, and leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import gzip
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import lambda_gelu as lg
from lambda_gelu.checkpoint import load_checkpoint, save_checkpoint
from lambda_gelu.cli import build_parser, main
from lambda_gelu.data import DATASETS, load_dataset
from lambda_gelu.harden import HardenConfig
from lambda_gelu.metrics import evaluate
from lambda_gelu.models import build_model, make_activation
from lambda_gelu.outputs import check_writable, staged_dir
from lambda_gelu.pipeline import harden
from lambda_gelu.resume import Checkpointer
from lambda_gelu.train import TrainConfig, fit

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
SPLIT = load_dataset("digits")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the workspace every case runs in


def _idx(shape: list[int], payload: bytes, magic: bytes | None = None) -> bytes:
    magic = magic if magic is not None else bytes([0, 0, 8, len(shape)])
    return magic + b"".join(s.to_bytes(4, "big") for s in shape) + payload


MNIST_BREAKAGE = {
    "truncated": ("train-images-idx3-ubyte", lambda good: good[:6]),
    "bad-magic": ("train-labels-idx1-ubyte", lambda good: b"\x00\x00\x09\x01" + good[4:]),
    "wrong-size": ("t10k-images-idx3-ubyte", lambda good: good[:-100]),
    "labels-above-9": ("t10k-labels-idx1-ubyte", lambda good: good[:-1] + bytes([12])),
}


def _mnist_dir(root: Path, broken: str) -> Path:
    """An MNIST folder (torchvision layout) of tiny IDX files, one of them broken as ``broken`` says."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    files = {
        "train-images-idx3-ubyte": _idx([3, 28, 28], bytes(3 * 784)),
        "train-labels-idx1-ubyte": _idx([3], bytes([1, 2, 3])),
        "t10k-images-idx3-ubyte": _idx([2, 28, 28], bytes(2 * 784)),
        "t10k-labels-idx1-ubyte": _idx([2], bytes([4, 5])),
    }
    if broken == "not-gzip":
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip data")
        files.pop("train-images-idx3-ubyte")
    else:
        name, breaker = MNIST_BREAKAGE[broken]
        files[name] = breaker(files[name])
    for name, data in files.items():
        (raw / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
    return root


@dataclass
class Workspace:
    root: Path
    lam: Path  # a trained λ-GELU checkpoint
    gelu: Path  # a GELU checkpoint
    relu: Path  # a model without any GELU
    garbage: Path
    truncated: Path
    nan_lambda: Path
    wrong_shape: Path
    other_arch: Path
    existing: Path  # a file that must not be overwritten
    run_dir: Path  # a run folder that exists
    interrupted: Path  # the --out of a train run stopped by SIGINT (its state is saved)
    mnist: dict[str, Path]
    dangling: Path  # a symlink to a missing path
    nan_weight: Path
    inf_weight: Path
    state_is_a_file: Path  # an --out whose <out>.state is a file
    bad_headers: dict[str, Path]  # checkpoints whose header has a field of the wrong type, or none

    @property
    def missing(self) -> Path:
        return self.root / "no" / "such.safetensors"

    def new(self, name: str) -> str:
        """A path that does not exist (and must still not exist afterwards)."""
        return str(self.root / "fresh" / name)


def _edit_header(source: Path, target: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    """A copy of the checkpoint ``source`` whose JSON header is ``change(header)`` (written as JSON)."""
    import json

    from safetensors import safe_open

    from lambda_gelu.checkpoint import METADATA_KEY

    with safe_open(str(source), "pt") as handle:
        header = json.loads(handle.metadata()[METADATA_KEY])
    save_file(load_file(str(source)), str(target), metadata={METADATA_KEY: json.dumps(change(header))})
    return target


def _edit(source: Path, target: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    from safetensors import safe_open

    tensors = load_file(str(source))
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
    change(tensors)
    save_file(tensors, str(target), metadata=metadata)
    return target


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("workspace")
    lam, gelu, relu = root / "lam.safetensors", root / "gelu.safetensors", root / "relu.safetensors"
    for path, activation in [(lam, "lambda_gelu"), (gelu, "gelu"), (relu, "relu")]:
        assert main(["train", "--out", str(path), "--activation", activation, "--steps", "5", "--hidden", "8",
                     "--no-progress"]) == 0
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(lam.read_bytes()[:-7])
    nan_lambda = _edit(lam, root / "nan_lambda.safetensors",
                       lambda t: t.__setitem__("blocks.0.act.log_lam", torch.tensor([float("nan")])))
    wrong_shape = _edit(lam, root / "wrong_shape.safetensors",
                        lambda t: t.__setitem__("blocks.0.act.log_lam", torch.zeros(4)))
    other_arch = root / "other_arch.safetensors"
    torch.manual_seed(0)
    other = build_model("mlp", in_features=64, num_classes=10, hidden=[8])
    lg.convert(other)
    save_checkpoint(other_arch, other, "mlp", {"in_features": 64, "num_classes": 10, "hidden": [8]})
    _edit(other_arch, other_arch, lambda t:  # weights of a model with 32 inputs under a 64-input header
          t.__setitem__("blocks.0.fc.weight", torch.zeros(8, 32)))
    existing = root / "existing.safetensors"
    existing.write_bytes(b"keep me")
    run_dir = root / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "report.md").write_text("an earlier run\n")
    interrupted = root / "interrupted.safetensors"
    calls = {"n": 0}

    def stop_at_third_step(module, _inputs):
        if module.training and type(module).__name__ == "MLP":
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGINT)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(stop_at_third_step)
    try:
        assert main(["train", "--out", str(interrupted), "--steps", "50", "--hidden", "8", "--no-progress"]) == 130
    finally:
        handle.remove()
    mnist = {}
    if "mnist" in DATASETS:
        for broken in [*MNIST_BREAKAGE, "not-gzip"]:
            mnist[broken] = _mnist_dir(root / f"mnist-{broken}", broken)
    nan_weight = _edit(lam, root / "nan_weight.safetensors", lambda t: t["blocks.0.fc.weight"].view(-1)[3:5].fill_(
        float("nan")))
    inf_weight = _edit(lam, root / "inf_weight.safetensors", lambda t: t["head.bias"].view(-1)[0:1].fill_(
        float("-inf")))
    headers = {
        "layout-entry-a-string": lambda h: {**h, "layout": {name: "lambda_gelu" for name in h["layout"]}},
        "metadata-a-list": lambda h: {**h, "metadata": [1, 2]},
        "header-null": lambda h: None,
        "model-kwargs-a-string": lambda h: {**h, "model_kwargs": "in_features=64"},
        "no-model": lambda h: {k: v for k, v in h.items() if k != "model"},
        "huge-model": lambda h: {**h, "model_kwargs": {**h["model_kwargs"], "hidden": [10**9]}},
    }
    bad_headers = {name: _edit_header(lam, root / f"header-{name}.safetensors", change)
                   for name, change in headers.items()}
    dangling = root / "dangling.safetensors"
    dangling.symlink_to(root / "no-such-target")
    state_is_a_file = root / "s.safetensors"
    (root / "s.safetensors.state").write_text("not a folder\n")
    return Workspace(root, lam, gelu, relu, garbage, truncated, nan_lambda, wrong_shape, other_arch, existing,
                     run_dir, interrupted, mnist, dangling, nan_weight, inf_weight, state_is_a_file, bad_headers)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``root`` with its bytes (folders: None)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------- the table: command line


def _train(*extra: str) -> Callable[[Workspace], list[str]]:
    return lambda w: ["train", "--out", w.new("m.safetensors"), "--steps", "2", "--hidden", "8", "--no-progress",
                      *extra]


CLI_CASES: list[tuple[str, Callable[[Workspace], list[str]], str]] = [
    # demo
    ("demo-steps-zero", lambda w: ["demo", "--out", w.new("d"), "--steps", "0"], "--steps"),
    ("demo-steps-negative", lambda w: ["demo", "--out", w.new("d"), "--steps", "-3"], "--steps"),
    ("demo-harden-steps-zero", lambda w: ["demo", "--out", w.new("d"), "--harden-steps", "0"], "--harden-steps"),
    ("demo-tau-zero", lambda w: ["demo", "--out", w.new("d"), "--tau", "0"], "--tau"),
    ("demo-tau-one", lambda w: ["demo", "--out", w.new("d"), "--tau", "1"], "--tau"),
    ("demo-tau-nan", lambda w: ["demo", "--out", w.new("d"), "--tau", "nan"], "--tau"),
    ("demo-unknown-dataset", lambda w: ["demo", "--out", w.new("d"), "--dataset", "imagenet"], "--dataset"),
    ("demo-run-folder-exists", lambda w: ["demo", "--out", str(w.run_dir), "--steps", "1"], "already exists"),
    ("demo-missing-data-dir", lambda w: ["demo", "--out", w.new("d"), "--data-dir", str(w.missing.parent)],
     "does not exist"),
    # train
    ("train-out-exists", lambda w: ["train", "--out", str(w.existing), "--steps", "1"], "already exists"),
    ("train-record-exists", _train("--record", "EXISTING"), "already exists"),
    ("train-steps-zero", _train("--steps", "0"), "--steps"),
    ("train-steps-negative", _train("--steps", "-5"), "--steps"),
    ("train-lr-zero", _train("--lr", "0"), "--lr"),
    ("train-lr-inf", _train("--lr", "inf"), "--lr"),
    ("train-batch-size-zero", _train("--batch-size", "0"), "--batch-size"),
    ("train-weight-decay-negative", _train("--weight-decay", "-1"), "--weight-decay"),
    ("train-weight-decay-nan", _train("--weight-decay", "nan"), "--weight-decay"),
    ("train-weight-decay-inf", _train("--weight-decay", "inf"), "--weight-decay"),
    ("train-hardness-lr-negative", _train("--hardness-lr", "-0.5"), "--hardness-lr"),
    ("train-hardness-lr-inf", _train("--hardness-lr", "inf"), "--hardness-lr"),
    ("train-hardness-lr-nan", _train("--hardness-lr", "nan"), "--hardness-lr"),
    ("train-seed-2-to-the-32", _train("--seed", "4294967296"), "--seed"),
    ("train-seed-negative", _train("--seed", "-1"), "--seed"),
    ("train-seed-not-an-integer", _train("--seed", "1.5"), "--seed"),
    ("train-unknown-dataset", _train("--dataset", "imagenet"), "--dataset"),
    ("train-unknown-model", _train("--model", "no-such-model"), "--model"),
    ("train-unknown-activation", _train("--activation", "swish"), "--activation"),
    ("train-hidden-zero", _train("--hidden", "0"), "--hidden"),
    ("train-hidden-empty", _train("--hidden", ""), "--hidden"),
    ("train-per-channel-without-lambda", _train("--per-channel", "--activation", "gelu"), "--per-channel"),
    ("train-missing-data-dir", _train("--data-dir", "MISSING_DIR"), "does not exist"),
    ("train-checkpoint-every-zero", _train("--checkpoint-every", "0"), "--checkpoint-every"),
    ("train-record-every-zero", _train("--record", "NEW_CSV", "--record-every", "0"), "--record-every"),
    ("train-saved-state-without-resume",
     lambda w: ["train", "--out", str(w.interrupted), "--steps", "50", "--hidden", "8", "--no-progress"],
     "--resume"),
    ("train-resume-with-other-options",
     lambda w: ["train", "--out", str(w.interrupted), "--steps", "60", "--hidden", "8", "--no-progress", "--resume"],
     "steps=50"),
    # harden
    ("harden-missing-checkpoint", lambda w: ["harden", str(w.missing), "--out", w.new("h")], "no such checkpoint"),
    ("harden-checkpoint-is-a-folder", lambda w: ["harden", str(w.run_dir), "--out", w.new("h")], "run"),
    ("harden-garbage", lambda w: ["harden", str(w.garbage), "--out", w.new("h")], "not a safetensors file"),
    ("harden-truncated", lambda w: ["harden", str(w.truncated), "--out", w.new("h")], "truncated.safetensors"),
    ("harden-nan-lambda", lambda w: ["harden", str(w.nan_lambda), "--out", w.new("h")], "blocks.0.act"),
    ("harden-lambda-wrong-shape", lambda w: ["harden", str(w.wrong_shape), "--out", w.new("h")], "blocks.0.act"),
    ("harden-other-architecture", lambda w: ["harden", str(w.other_arch), "--out", w.new("h")], "blocks.0.fc"),
    ("harden-model-without-gelu", lambda w: ["harden", str(w.relu), "--out", w.new("h"), "--steps", "2"],
     "no module of MLP matched"),
    ("harden-tau-zero", lambda w: ["harden", str(w.lam), "--out", w.new("h"), "--tau", "0"], "--tau"),
    ("harden-tau-above-one", lambda w: ["harden", str(w.lam), "--out", w.new("h"), "--tau", "1.5"], "--tau"),
    ("harden-tau-negative", lambda w: ["harden", str(w.lam), "--out", w.new("h"), "--tau", "-1e-5"], "--tau"),
    ("harden-steps-zero", lambda w: ["harden", str(w.lam), "--out", w.new("h"), "--steps", "0"], "--steps"),
    ("harden-out-exists", lambda w: ["harden", str(w.lam), "--out", str(w.existing)], "already exists"),
    ("harden-unknown-dataset", lambda w: ["harden", str(w.lam), "--out", w.new("h"), "--dataset", "x"], "--dataset"),
    ("harden-distill-weight", lambda w: ["harden", str(w.lam), "--out", w.new("h"), "--distill-weight", "2"],
     "--distill-weight"),
    # relufy
    ("relufy-missing-checkpoint", lambda w: ["relufy", str(w.missing), "--out", w.new("r")], "no such checkpoint"),
    ("relufy-garbage", lambda w: ["relufy", str(w.garbage), "--out", w.new("r")], "not a safetensors file"),
    ("relufy-nan-lambda", lambda w: ["relufy", str(w.nan_lambda), "--out", w.new("r")], "blocks.0.act"),
    ("relufy-nan-weight", lambda w: ["relufy", str(w.nan_weight), "--out", w.new("r")],
     "blocks.0.fc.weight holds non-finite"),
    ("harden-inf-weight", lambda w: ["harden", str(w.inf_weight), "--out", w.new("h")], "head.bias"),
    ("relufy-out-exists", lambda w: ["relufy", str(w.lam), "--out", str(w.existing)], "already exists"),
    ("relufy-onnx-exists", lambda w: ["relufy", str(w.lam), "--out", w.new("r"), "--onnx", str(w.existing)],
     "already exists"),
    ("relufy-gelu-without-include-gelu", lambda w: ["relufy", str(w.gelu), "--out", w.new("r")], "matched"),
    ("harden-seed-too-large", lambda w: ["harden", str(w.lam), "--out", w.new("h"), "--seed", str(2**40)], "--seed"),
    ("demo-seed-too-large", lambda w: ["demo", "--out", w.new("d"), "--seed", str(2**32)], "--seed"),
    ("check-epsilon-nan", lambda w: ["check", str(w.lam), "--out", w.new("c"), "--epsilon", "nan"], "--epsilon"),
    ("check-epsilon-negative", lambda w: ["check", str(w.lam), "--out", w.new("c"), "--epsilon", "-0.1"], "--epsilon"),
    ("study-seed-too-large", lambda w: ["study", "relufy", "--out", w.new("s"), "--seeds", "0", str(2**32)],
     "--seeds"),
    # outputs, planned before any work (every command goes through the same step)
    ("train-record-is-out", lambda w: ["train", "--out", w.new("m.safetensors"), "--record", w.new("m.safetensors"),
                                       "--steps", "2"], "same path"),
    ("relufy-onnx-is-out", lambda w: ["relufy", str(w.lam), "--out", w.new("r"), "--onnx", w.new("r")], "same path"),
    ("relufy-out-is-the-input", lambda w: ["relufy", str(w.lam), "--out", str(w.lam), "--force"], "is the input"),
    ("harden-out-is-the-input", lambda w: ["harden", str(w.lam), "--out", str(w.lam), "--force"], "is the input"),
    ("check-out-holds-the-input", lambda w: ["check", str(w.lam), "--out", str(w.root), "--force"], "holds the input"),
    ("train-out-is-a-folder", lambda w: ["train", "--out", str(w.run_dir), "--force", "--steps", "2"], "is a folder"),
    ("relufy-onnx-is-a-folder", lambda w: ["relufy", str(w.lam), "--out", w.new("r"), "--onnx", str(w.run_dir),
                                           "--force"], "is a folder"),
    ("profile-out-is-a-file", lambda w: ["profile", str(w.lam), "--out", str(w.existing), "--force"], "is a file"),
    ("train-out-dangling-symlink", lambda w: ["train", "--out", str(w.dangling), "--steps", "2"], "symlink"),
    ("demo-out-is-the-working-folder", lambda w: ["demo", "--out", ".", "--force"], "working folder"),
    ("demo-out-is-above-the-working-folder", lambda w: ["demo", "--out", "..", "--force"], "working folder"),
    ("demo-out-empty", lambda w: ["demo", "--out", "", "--force"], "--out is empty"),
    ("train-out-empty", lambda w: ["train", "--out", "", "--steps", "2"], "--out is empty"),
    ("train-out-under-a-file", lambda w: ["train", "--out", str(w.existing / "m.safetensors"), "--steps", "2"],
     "is not a folder"),
    ("study-out-is-the-cache", lambda w: ["study", "relufy", "--out", str(w.run_dir), "--cache", str(w.run_dir),
                                          "--force"], "is the input --cache"),
    ("train-state-folder-is-a-file", lambda w: ["train", "--out", str(w.state_is_a_file), "--steps", "2"],
     "the run state"),
    ("check-gelu-is-a-relu-model", lambda w: ["check", str(w.relu), "--gelu", str(w.relu), "--out", w.new("c")],
     "not the GELU original"),
    ("relufy-other-data-set", lambda w: ["relufy", str(w.lam), "--out", w.new("r"), "--dataset", "mnist1d"],
     "does not fit the model of"),
    ("harden-other-data-set", lambda w: ["harden", str(w.lam), "--out", w.new("h"), "--dataset", "mnist1d"],
     "does not fit the model of"),
    ("profile-other-data-set", lambda w: ["profile", str(w.lam), "--dataset", "mnist1d"], "does not fit"),
    ("check-other-data-set", lambda w: ["check", str(w.relu), "--out", w.new("c"), "--dataset", "mnist1d"],
     "does not fit"),
    ("relufy-header-layout-entry-a-string",
     lambda w: ["relufy", str(w.bad_headers["layout-entry-a-string"]), "--out", w.new("r")], "'layout.blocks.0.act'"),
    ("harden-header-metadata-a-list", lambda w: ["harden", str(w.bad_headers["metadata-a-list"]), "--out", w.new("h")],
     "field 'metadata' is list, expected dict"),
    ("profile-header-null", lambda w: ["profile", str(w.bad_headers["header-null"])], "header is NoneType"),
    ("check-header-model-kwargs", lambda w: ["check", str(w.bad_headers["model-kwargs-a-string"]), "--out",
                                             w.new("c")], "'model_kwargs' is str"),
    ("relufy-header-no-model", lambda w: ["relufy", str(w.bad_headers["no-model"]), "--out", w.new("r")],
     "has no field 'model'"),
    ("train-hidden-beyond-memory", _train("--hidden", "1000000000"), "more than this machine's memory"),
    ("relufy-header-claims-a-huge-model", lambda w: ["relufy", str(w.bad_headers["huge-model"]), "--out", w.new("r")],
     "more than this machine's memory"),
    # profile
    ("profile-missing-checkpoint", lambda w: ["profile", str(w.missing)], "no such checkpoint"),
    ("profile-truncated", lambda w: ["profile", str(w.truncated)], "truncated.safetensors"),
    ("profile-out-exists", lambda w: ["profile", str(w.lam), "--out", str(w.run_dir)], "already exists"),
    ("profile-unknown-dataset", lambda w: ["profile", str(w.lam), "--dataset", "nope"], "--dataset"),
]


def _generic_cases() -> list[tuple[str, Callable[[Workspace], list[str]], str]]:
    """For every subcommand, whoever added it: an unknown option, and (if it reads a checkpoint) a missing one."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, command in sub.choices.items():
        cases.append((f"{name}-unknown-option", lambda w, n=name: [n, "--no-such-option"], "error"))
        positionals = [a.dest for a in command._actions if not a.option_strings and a.dest != "help"]
        required = [a for a in command._actions if a.option_strings and a.required]
        if positionals == ["checkpoint"] and all(a.dest == "out" for a in required):
            cases.append((f"{name}-missing-checkpoint-generic",
                          lambda w, n=name, r=bool(required): [n, str(w.missing), *(["--out", w.new(n)] if r else [])],
                          "such.safetensors"))
    return cases


MNIST_CLI = [(f"train-mnist-{broken}", broken) for broken in [*MNIST_BREAKAGE, "not-gzip"]]


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse
        code = int(stop.code or 0)
    return code, capsys.readouterr().err.strip()


def _resolve(argv: list[str], w: Workspace) -> list[str]:
    table = {"EXISTING": str(w.existing), "MISSING_DIR": str(w.missing.parent), "NEW_CSV": w.new("lam.csv")}
    return [table.get(a, a) for a in argv]


@pytest.mark.parametrize(("argv", "mentions"), [pytest.param(a, m, id=i) for i, a, m in CLI_CASES + _generic_cases()])
def test_cli_bad_input_one_line_exit_2_nothing_touched(ws, argv, mentions, capsys, record_property):
    before = snapshot(ws.root)
    code, err = _run_cli(_resolve(argv(ws), ws), capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "error" in err and mentions in err, err
    assert "Traceback" not in err
    assert snapshot(ws.root) == before
    record_property("bad_inputs", 1)


@pytest.mark.parametrize("broken", [b for _, b in MNIST_CLI], ids=[i for i, _ in MNIST_CLI])
def test_cli_malformed_idx_files(ws, broken, capsys, record_property):
    before = snapshot(ws.root)
    argv = ["train", "--dataset", "mnist", "--data-dir", str(ws.mnist[broken]), "--out", ws.new("m"), "--steps", "1"]
    code, err = _run_cli(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(ws.mnist[broken]) in err, err  # the file (under this folder) is named
    assert snapshot(ws.root) == before
    record_property("bad_inputs", 1)


@pytest.mark.skipif(ROOT, reason="running as root: permissions do not stop reads")
@pytest.mark.parametrize("what", ["checkpoint", "data-dir"])
def test_cli_unreadable_paths(ws, what, capsys, tmp_path, record_property):
    target = tmp_path / ("locked.safetensors" if what == "checkpoint" else "locked")
    if what == "checkpoint":
        target.write_bytes(ws.lam.read_bytes())
        argv = ["harden", str(target), "--out", str(tmp_path / "h")]
    else:
        target.mkdir()
        argv = ["train", "--out", str(tmp_path / "m"), "--data-dir", str(target), "--steps", "1"]
    target.chmod(0)
    try:
        code, err = _run_cli(argv, capsys)
    finally:
        target.chmod(0o700)
    assert code == 2 and len(err.splitlines()) == 1, err
    record_property("bad_inputs", 1)


# ---------------------------------------------------------------- the table: public functions


def _lam_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, num_classes=10, hidden=[8])
    lg.convert(model)
    return model


def _relu_model() -> torch.nn.Module:
    return build_model("mlp", in_features=64, num_classes=10, hidden=[8], activation="relu")


def _not_a_dir(w: Workspace) -> Path:
    return w.existing / "model.safetensors"  # its "parent" is a file


API_CASES: list[tuple[str, Callable[[Workspace], Any], str]] = [
    ("op-approximate", lambda w: lg.lambda_gelu(torch.ones(2), 2.0, approximate="erf"), "approximate"),
    ("module-lambda-below-one", lambda w: lg.LambdaGELU(init=0.5), "LambdaGELU init"),
    ("module-lambda-nan", lambda w: lg.LambdaGELU(init=float("nan")), "finite"),
    ("module-lambda-too-large", lambda w: lg.LambdaGELU(init=1e7), "1e+06"),
    ("module-channels-zero", lambda w: lg.LambdaGELU(num_channels=0), "num_channels"),
    ("module-channels-bool", lambda w: lg.LambdaGELU(num_channels=True), "num_channels"),
    ("op-integer-input", lambda w: lg.lambda_gelu(torch.arange(4), 2.0), "floating-point"),
    ("op-bool-input", lambda w: lg.lambda_gelu(torch.ones(2, dtype=torch.bool), 2.0), "floating-point"),
    ("module-integer-input", lambda w: lg.LambdaGELU(init=2.0)(torch.arange(4)), "floating-point"),
    ("layer-targets-empty", lambda w: lg.layer_targets(_lam_model(), {"blocks.0.act": torch.empty(0)}),
     "blocks.0.act has no samples"),
    ("layer-targets-all-nan", lambda w: lg.layer_targets(_lam_model(), {"blocks.0.act": torch.full((9,), torch.nan)}),
     "blocks.0.act has no finite sample"),
    ("layer-targets-a-nan-channel",
     lambda w: lg.layer_targets(_lam_model(), {"blocks.0.act": torch.randn(9, 3).index_fill_(1, torch.tensor([1]),
                                                                                            float("nan"))}),
     "in 1 of 3 channels"),
    ("module-init-count", lambda w: lg.LambdaGELU(init=[1.0, 2.0], num_channels=3), "init"),
    ("set-lambda-below-one", lambda w: lg.LambdaGELU().set_lambda_(0.99), "λ"),
    ("set-lambda-inf", lambda w: lg.LambdaGELU().set_lambda_(float("inf")), "λ"),
    ("set-lambda-count", lambda w: lg.LambdaGELU(num_channels=3).set_lambda_([2.0, 3.0]), "3 values"),
    ("convert-model-without-gelu", lambda w: lg.convert(_relu_model()), "no module of MLP matched"),
    ("relufy-model-without-gelu", lambda w: lg.relufy(build_model("mlp", in_features=4, num_classes=2, hidden=[3])),
     "matched"),
    ("calibrate-model-without-gelu", lambda w: lg.calibrate(_relu_model(), [torch.zeros(2, 64)]), "no LambdaGELU"),
    ("calibrate-no-batches", lambda w: lg.calibrate(_lam_model(), []), "no data reached"),
    ("target-tau-zero", lambda w: lg.target_lambda(torch.randn(100), tau=0.0), "tau"),
    ("target-tau-one", lambda w: lg.target_lambda(torch.randn(100), tau=1.0), "tau"),
    ("target-tau-negative", lambda w: lg.target_lambda(torch.randn(100), tau=-0.1), "tau"),
    ("layer-targets-tau", lambda w: lg.layer_targets(_lam_model(), {"blocks.0.act": torch.randn(9)}, tau=2.0), "tau"),
    ("hardener-no-targets", lambda w: lg.Hardener(_lam_model(), {}, total_steps=5), "no targets"),
    ("hardener-steps-zero", lambda w: lg.Hardener(_lam_model(), {"blocks.0.act": 5.0}, total_steps=0), "total_steps"),
    ("hardener-steps-negative", lambda w: lg.Hardener(_lam_model(), {"blocks.0.act": 5.0}, total_steps=-4),
     "total_steps"),
    ("hardener-unknown-layer", lambda w: lg.Hardener(_lam_model(), {"head": 5.0}, total_steps=5), "head"),
    ("hardener-shape", lambda w: lg.Hardener(_lam_model(), {"blocks.0.act": 5.0}, 5, shape="square"), "shape"),
    ("lambda-at-shape", lambda w: lg.lambda_at(1, 1.0, 5.0, 10, shape="square"), "shape"),
    ("lambda-at-total-zero", lambda w: lg.lambda_at(1, 1.0, 5.0, 0), "total"),
    ("param-groups-lr-zero", lambda w: lg.param_groups(_lam_model(), lr=0.0), "lr"),
    ("param-groups-lr-negative", lambda w: lg.param_groups(_lam_model(), lr=-1.0), "lr"),
    ("param-groups-decay-negative", lambda w: lg.param_groups(_lam_model(), lr=1e-3, weight_decay=-1), "weight_decay"),
    ("param-groups-hardness-lr", lambda w: lg.param_groups(_lam_model(), lr=1e-3, hardness_lr=-1), "hardness_lr"),
    ("param-groups-rms-beta", lambda w: lg.param_groups(_lam_model(), lr=1e-3, rms_beta=1.0), "rms_beta"),
    ("train-config-steps-zero", lambda w: TrainConfig(steps=0), "steps"),
    ("train-config-steps-negative", lambda w: TrainConfig(steps=-10), "steps"),
    ("train-config-lr-zero", lambda w: TrainConfig(lr=0.0), "lr"),
    ("train-config-batch-zero", lambda w: TrainConfig(batch_size=0), "batch_size"),
    ("train-config-optimizer", lambda w: TrainConfig(optimizer="lbfgs"), "optimizer"),
    ("train-config-warmup", lambda w: TrainConfig(warmup=-1), "warmup"),
    ("train-config-amp", lambda w: TrainConfig(amp_dtype="float8"), "amp_dtype"),
    ("harden-config-steps-zero", lambda w: HardenConfig(steps=0), "steps"),
    ("harden-config-tau-zero", lambda w: HardenConfig(tau=0.0), "tau"),
    ("harden-config-tau-one", lambda w: HardenConfig(tau=1.0), "tau"),
    ("harden-config-shape", lambda w: HardenConfig(shape="square"), "shape"),
    ("harden-config-ramp", lambda w: HardenConfig(ramp_fraction=0.0), "ramp_fraction"),
    ("harden-config-distill", lambda w: HardenConfig(distill_weight=1.5), "distill_weight"),
    ("harden-model-without-gelu", lambda w: harden(_relu_model(), SPLIT, HardenConfig(steps=2), progress=False),
     "no module of MLP matched"),
    ("fit-distill-without-teacher",
     lambda w: fit(_lam_model(), SPLIT, TrainConfig(steps=2), distill_weight=0.5, progress=False), "needs a teacher"),
    ("dataset-unknown", lambda w: load_dataset("imagenet"), "unknown dataset"),
    ("dataset-missing-dir", lambda w: load_dataset("digits", data_dir=w.missing.parent), "does not exist"),
    ("build-model-unknown", lambda w: build_model("no-such-model"), "unknown model"),
    ("activation-unknown", lambda w: make_activation("swish"), "unknown activation"),
    ("load-missing", lambda w: load_checkpoint(w.missing), "no such checkpoint"),
    ("load-folder", lambda w: load_checkpoint(w.run_dir), "run"),
    ("load-garbage", lambda w: load_checkpoint(w.garbage), "garbage.safetensors"),
    ("load-truncated", lambda w: load_checkpoint(w.truncated), "truncated.safetensors"),
    ("load-nan-lambda", lambda w: load_checkpoint(w.nan_lambda), "blocks.0.act"),
    ("load-wrong-shape", lambda w: load_checkpoint(w.wrong_shape), "blocks.0.act"),
    ("load-other-architecture", lambda w: load_checkpoint(w.other_arch), "blocks.0.fc.weight"),
    ("save-under-a-file", lambda w: save_checkpoint(_not_a_dir(w), _lam_model(), "mlp", {}), "existing.safetensors"),
    ("check-writable-exists", lambda w: check_writable(w.existing, force=False), "already exists"),
    ("staged-dir-exists", lambda w: staged_dir(w.run_dir).__enter__(), "already exists"),
    ("checkpointer-every-negative", lambda w: Checkpointer(w.new("s"), every=-1), "every"),
    ("recorder-every-zero", lambda w: lg.HardnessRecorder(_lam_model(), every=0), "every"),
    ("evaluate-no-batches", lambda w: evaluate(_lam_model(), []), "no batches"),
]

MNIST_API = [(f"load-mnist-{broken}", broken) for broken in [*MNIST_BREAKAGE, "not-gzip"]]


@pytest.mark.parametrize(("call", "mentions"), [pytest.param(c, m, id=i) for i, c, m in API_CASES])
def test_api_bad_input_one_clear_error_nothing_touched(ws, call, mentions, record_property):
    before = snapshot(ws.root)
    with pytest.raises((ValueError, OSError, TypeError)) as info:
        call(ws)
    message = str(info.value)
    assert message and len(message.splitlines()) == 1, message
    assert mentions in message, message
    assert snapshot(ws.root) == before
    record_property("bad_inputs", 1)


@pytest.mark.parametrize("broken", [b for _, b in MNIST_API], ids=[i for i, _ in MNIST_API])
def test_api_malformed_idx_files(ws, broken, record_property):
    before = snapshot(ws.root)
    with pytest.raises(ValueError) as info:
        load_dataset("mnist", data_dir=ws.mnist[broken])
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(ws.mnist[broken]) in message, message
    assert snapshot(ws.root) == before
    record_property("bad_inputs", 1)


# ---------------------------------------------------------------- OS errors: one line, nothing half-written


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every safetensors write (checkpoints, run states) fails as on a full disk, after creating its file."""
    import errno

    import lambda_gelu.checkpoint as checkpoint

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(checkpoint, "save_file", full)


OS_CASES: list[tuple[str, Callable[[Workspace], list[str]]]] = [
    ("train-disk-full", _train()),
    ("train-disk-full-with-states", _train("--checkpoint-every", "1")),
    ("harden-disk-full", lambda w: ["harden", str(w.lam), "--out", w.new("h.safetensors"), "--steps", "2",
                                    "--no-progress"]),
    ("relufy-disk-full", lambda w: ["relufy", str(w.lam), "--out", w.new("r.safetensors")]),
    ("relufy-onnx-disk-full", lambda w: ["relufy", str(w.lam), "--out", w.new("r.safetensors"), "--onnx",
                                         w.new("r.onnx")]),  # the export succeeds, the checkpoint fails: neither
    ("demo-disk-full", lambda w: ["demo", "--out", w.new("d"), "--steps", "2", "--harden-steps", "2",
                                  "--no-progress"]),
]


@pytest.mark.parametrize("argv", [pytest.param(a, id=i) for i, a in OS_CASES])
def test_cli_full_disk_one_line_exit_1_nothing_half_written(ws, argv, monkeypatch, capsys, record_property):
    _disk_full(monkeypatch)
    before = snapshot(ws.root)
    code, err = _run_cli(argv(ws), capsys)
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "Traceback" not in err, err
    assert snapshot(ws.root) == before  # no output, no state folder, no temporary file, no staging folder
    record_property("bad_inputs", 1)


@pytest.mark.parametrize(("errno_name", "text"), [("EACCES", "Permission denied"),
                                                  ("EROFS", "Read-only file system"), ("EISDIR", "Is a directory")])
def test_cli_os_error_of_the_users_path_one_line_exit_2(ws, monkeypatch, capsys, record_property, errno_name, text):
    """A folder whose permissions change, or whose file system turns read-only, while the command runs (found
    only at the write): one line naming the path, exit 2, nothing half-written."""
    import errno

    import lambda_gelu.checkpoint as checkpoint

    def refused(tensors, filename, metadata=None):
        raise OSError(getattr(errno, errno_name), text, str(filename))

    monkeypatch.setattr(checkpoint, "save_file", refused)
    before = snapshot(ws.root)
    code, err = _run_cli(["relufy", str(ws.lam), "--out", ws.new("r.safetensors")], capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and text in err and "r.safetensors" in err, err
    assert snapshot(ws.root) == before
    record_property("bad_inputs", 1)


@pytest.mark.skipif(ROOT, reason="running as root: permissions do not stop writes")
def test_cli_read_only_folder_is_refused_before_any_work(ws, tmp_path, capsys, record_property):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, err = _run_cli(["train", "--out", str(folder / "m.safetensors"), "--steps", "2", "--hidden", "8",
                              "--no-progress"], capsys)
    finally:
        folder.chmod(0o755)
    assert code == 2 and "cannot write in" in err and len(err.splitlines()) == 1, err
    assert not any(folder.iterdir())
    record_property("bad_inputs", 1)

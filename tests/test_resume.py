"""Resume: runs stopped by real signals (in process and in killed subprocesses) end bitwise equal to uninterrupted
runs; run-state files that are truncated, corrupted or from another run are refused with the file and tensor named."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lambda_gelu import convert
from lambda_gelu.checkpoint import CheckpointError
from lambda_gelu.cli import main
from lambda_gelu.data import load_dataset
from lambda_gelu.harden import HardenConfig
from lambda_gelu.models import build_model
from lambda_gelu.outputs import OutputExistsError
from lambda_gelu.pipeline import harden
from lambda_gelu.profile import HardnessRecorder
from lambda_gelu.resume import (
    Checkpointer,
    TrainingInterrupted,
    load_state,
    open_run_state,
    save_state,
    state_folder,
    state_paths,
)
from lambda_gelu.train import FitStats, TrainConfig, fit

SPLIT = load_dataset("digits")  # 1257 training rows: 20 batches of 64 per epoch
TRAIN = TrainConfig(steps=45, warmup=5, lr=3e-3)
HARDEN = HardenConfig(steps=40, retarget_every=10, distill_weight=0.5)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the killed run and its reference use the same arithmetic


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(hidden=(16, 16)) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, num_classes=10, hidden=list(hidden))
    convert(model)
    return model


def _signal_at(model: torch.nn.Module, step: int, signum: int):
    """Fault injection: send this process a real ``signum`` during the ``step``-th training forward pass."""
    calls = {"n": 0}

    def hook(module, _inputs):
        if module.training:  # calibration and the teacher run in eval mode
            calls["n"] += 1
            if calls["n"] == step:
                os.kill(os.getpid(), signum)

    return model.register_forward_pre_hook(hook)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    model = _model()
    fit(model, SPLIT, TrainConfig(steps=60, warmup=5), progress=False)
    return model


@pytest.fixture(scope="module")
def train_reference() -> tuple[dict[str, torch.Tensor], list[float], list[dict]]:
    model = _model()
    recorder = HardnessRecorder(model, every=5)
    losses = fit(model, SPLIT, TRAIN, recorder=recorder, progress=False)
    return model.state_dict(), losses, recorder.rows


# ---------------------------------------------------------------- in-process faults at chosen steps


@pytest.mark.parametrize(("stop_at", "signum"), [(1, signal.SIGINT), (19, signal.SIGTERM), (20, signal.SIGINT),
                                                 (21, signal.SIGTERM), (44, signal.SIGINT),
                                                 (45, signal.SIGTERM)])
def test_training_stopped_by_a_signal_resumes_bitwise(tmp_path, train_reference, stop_at, signum, record_property):
    ref_state, ref_losses, ref_rows = train_reference
    model = _model()
    handle = _signal_at(model, stop_at, signum)
    with pytest.raises(TrainingInterrupted) as info:
        fit(model, SPLIT, TRAIN, recorder=HardnessRecorder(model, every=5), progress=False,
            checkpointer=Checkpointer(tmp_path))
    handle.remove()
    assert info.value.step == stop_at and info.value.signum == signum
    assert info.value.path == tmp_path / f"state-{stop_at:08d}.safetensors" and info.value.path.is_file()

    resumed = _model()  # a fresh process would rebuild the model from scratch
    recorder = HardnessRecorder(resumed, every=5)
    stats = FitStats()
    losses = fit(resumed, SPLIT, TRAIN, recorder=recorder, progress=False,
                 checkpointer=Checkpointer(tmp_path, resume=True), stats=stats)
    assert stats.start_step == stop_at and stats.steps_run == TRAIN.steps - stop_at
    assert losses == ref_losses
    assert recorder.rows == ref_rows
    assert _same(resumed.state_dict(), ref_state)
    record_property("faults_injected", 1)
    record_property("runs_resumed", 1)


@pytest.fixture(scope="module")
def harden_reference(trained) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = copy.deepcopy(trained)
    hardener = harden(model, SPLIT, HARDEN, progress=False)
    return model.state_dict(), hardener.target


@pytest.mark.parametrize("stop_at", [1, 10, 23, 39, 40])
def test_hardening_stopped_by_a_signal_resumes_bitwise(tmp_path, trained, harden_reference, stop_at, record_property):
    """Mid-ramp, at a re-targeting step, one step before the end and in the last step (the resume trains no more,
    then swaps): schedule, targets, teacher, RMS all resume."""
    ref_state, ref_targets = harden_reference
    model = copy.deepcopy(trained)
    handle = _signal_at(model, stop_at, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        harden(model, SPLIT, HARDEN, progress=False, checkpointer=Checkpointer(tmp_path))
    handle.remove()
    saved = load_state(state_paths(tmp_path)[-1])
    assert saved.step == stop_at and saved.get("hardener")["step_count"] == stop_at and "teacher" in saved.body

    resumed = copy.deepcopy(trained)  # the pre-hardening model, as the CLI would load it again
    hardener = harden(resumed, SPLIT, HARDEN, progress=False, checkpointer=Checkpointer(tmp_path, resume=True))
    assert _same(resumed.state_dict(), ref_state)
    assert _same(hardener.target, ref_targets)
    record_property("faults_injected", 1)
    record_property("runs_resumed", 1)


def test_periodic_states_are_pruned_and_a_finished_run_resumes_to_the_end(tmp_path, train_reference):
    """Every 10 steps and after the last (45) one; a resume from a middle state trains to the end."""
    model = _model()
    checkpointer = Checkpointer(tmp_path, every=10, keep=2)
    stats = FitStats()
    fit(model, SPLIT, TRAIN, progress=False, checkpointer=checkpointer, stats=stats)
    assert [p.name for p in state_paths(tmp_path)] == ["state-00000040.safetensors", "state-00000045.safetensors"]
    assert [Path(p).name for p in stats.saved] == [f"state-{n:08d}.safetensors" for n in (10, 20, 30, 40, 45)]
    state_paths(tmp_path)[-1].unlink()  # resume from step 40
    again, stats = _model(), FitStats()
    losses = fit(again, SPLIT, TRAIN, progress=False, checkpointer=Checkpointer(tmp_path, resume=True), stats=stats)
    assert stats.start_step == 40 and stats.steps_run == 5
    assert losses == train_reference[1] and _same(again.state_dict(), train_reference[0])
    checkpointer.clear()
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# ---------------------------------------------------------------- killed subprocesses


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lambda_gelu.cli", *args]


@pytest.fixture(scope="module")
def input_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("input") / "lam.safetensors"
    assert main(["train", "--out", str(path), "--steps", "60", "--hidden", "16", "--no-progress"]) == 0
    return path


def _wait_for_state(folder: Path, process: subprocess.Popen, after: int = 0) -> int:
    """Poll until ``folder`` holds a state beyond step ``after``; returns that step."""
    deadline = time.time() + 150
    while time.time() < deadline and process.poll() is None:
        paths = state_paths(folder)
        if paths and (step := int(paths[-1].name[6:14])) > after:
            return step
        time.sleep(0.01)
    raise AssertionError(f"no new state in {folder} (process exit code {process.poll()})")


def test_killed_hardening_subprocess_resumes_bitwise(tmp_path, input_checkpoint, record_property):
    """A real ``lambda-gelu harden`` process is killed twice and resumed twice; the output equals an uninterrupted
    run's, bitwise.

    1. SIGKILL (a crash: nothing can be saved) while it writes its state every step: the kill usually lands inside
       a write, which must leave the previous state whole.
    2. The resumed process gets SIGTERM: it saves its state at the next step boundary and exits 128 + 15.
    3. ``--resume`` again finishes the run.
    """
    out, ref_out = tmp_path / "run.safetensors", tmp_path / "ref.safetensors"
    args = ["harden", str(input_checkpoint), "--out", str(out), "--steps", "400", "--no-progress"]
    folder = state_folder(out)

    crashed = subprocess.Popen(_cli(*args, "--checkpoint-every", "1"), env=ENV, stderr=subprocess.PIPE, text=True)
    _wait_for_state(folder, crashed)
    time.sleep(0.1)  # well into the stream of writes
    crashed.kill()
    assert crashed.wait(timeout=60) == -signal.SIGKILL
    crash_step = load_state(state_paths(folder)[-1]).step  # the newest complete state loads
    assert 0 < crash_step < 400 and not out.exists()

    stopped = subprocess.Popen(_cli(*args, "--checkpoint-every", "5", "--resume"), env=ENV, stderr=subprocess.PIPE,
                               text=True)
    _wait_for_state(folder, stopped, after=crash_step)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 128 + signal.SIGTERM, err
    assert f"resuming from step {crash_step}" in err
    last = err.strip().splitlines()[-1]
    assert "interrupted by SIGTERM" in last and last.endswith("--resume"), last
    stop_step = load_state(state_paths(folder)[-1]).step
    assert crash_step < stop_step < 400 and not out.exists()

    finish = subprocess.Popen(_cli(*args, "--resume"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    assert main([*args[:3], str(ref_out), *args[4:]]) == 0  # the uninterrupted reference, meanwhile
    _, err = finish.communicate(timeout=180)
    assert finish.returncode == 0, err
    assert f"resuming from step {stop_step}" in err
    assert _same(load_file(str(out)), load_file(str(ref_out)))
    assert not folder.exists(), "the run state is removed once the output is written"
    record_property("faults_injected", 2)
    record_property("runs_resumed", 2)


def test_sigterm_stops_a_command_as_ctrl_c_does_and_leaves_nothing(tmp_path):
    """SIGTERM to a ``lambda-gelu demo`` (it keeps no run state) while it trains: exit 128 + 15, one line, and
    neither the run folder nor its staging folder is left."""
    out = tmp_path / "demo"
    process = subprocess.Popen(_cli("demo", "--out", str(out), "--steps", "100000", "--no-progress"), env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 150
    while time.time() < deadline and process.poll() is None and not list((out / "..").resolve().glob(
            ".demo.partial-*/checkpoints")):
        time.sleep(0.01)
    time.sleep(0.5)  # into training
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "lambda-gelu demo: interrupted by SIGTERM", err
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_cli_train_interrupted_and_resumed(tmp_path, capsys, record_property):
    """``lambda-gelu train`` stopped by a real SIGINT (sent during the 37th training forward pass) exits 130 with
    a one-line hint; the same command with ``--resume`` writes what an uninterrupted run writes."""
    def args(out: Path) -> list[str]:
        return ["train", "--out", str(out), "--steps", "90", "--hidden", "16", "--no-progress",
                "--record", str(out.with_suffix(".csv")), "--record-every", "5"]

    out, ref_out = tmp_path / "run.safetensors", tmp_path / "ref.safetensors"
    calls = {"n": 0}

    def hook(module, _inputs):
        if module.training and type(module).__name__ == "MLP":
            calls["n"] += 1
            if calls["n"] == 37:
                os.kill(os.getpid(), signal.SIGINT)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        assert main(args(out)) == 128 + signal.SIGINT
    finally:
        handle.remove()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "after step 37 of 90" in err and err.endswith("--resume"), err
    assert not out.exists() and not out.with_suffix(".csv").exists()
    assert main([*args(out), "--resume"]) == 0
    assert main(args(ref_out)) == 0
    assert _same(load_file(str(out)), load_file(str(ref_out)))
    assert out.with_suffix(".csv").read_text() == ref_out.with_suffix(".csv").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.csv", "ref.safetensors", "run.csv", "run.safetensors"]
    record_property("faults_injected", 1)
    record_property("runs_resumed", 1)


# ---------------------------------------------------------------- writes that fail, files that are bad


def test_a_failed_write_leaves_the_previous_state_intact(tmp_path, monkeypatch, record_property):
    model = _model()
    checkpointer = Checkpointer(tmp_path, every=5)
    fit(model, SPLIT, TrainConfig(steps=5, warmup=0), progress=False, checkpointer=checkpointer)
    (first,) = state_paths(tmp_path)
    before = first.read_bytes()

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)  # the write dies just before its rename
    with pytest.raises(OSError, match="No space left"):
        checkpointer.save(10, {"model": model.state_dict()})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [first.name], "no temporary file left behind"
    assert first.read_bytes() == before and load_state(first).step == 5
    record_property("faults_injected", 1)


@pytest.fixture()
def a_state(tmp_path) -> Path:
    model = _model()
    fit(model, SPLIT, TrainConfig(steps=5, warmup=0), progress=False, checkpointer=Checkpointer(tmp_path, every=5))
    return state_paths(tmp_path)[-1]


def _tensor_offset(path: Path, key: str) -> int:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    return 8 + size + header[key]["data_offsets"][0]


@pytest.mark.parametrize("keep", [0, 8, 100, 0.5, -1])
def test_truncated_state_is_refused_with_the_file_named(a_state, keep, record_property):
    data = a_state.read_bytes()
    a_state.write_bytes(data[: {0.5: len(data) // 2, -1: len(data) - 1}.get(keep, keep)])
    with pytest.raises(CheckpointError, match=r"unreadable run state|not a lambda-gelu") as info:
        load_state(a_state)
    assert str(a_state) in str(info.value)
    record_property("faults_injected", 1)


def test_flipped_byte_is_refused_naming_the_layer(a_state, record_property):
    data = bytearray(a_state.read_bytes())
    data[_tensor_offset(a_state, "s/model/blocks.1.act.log_lam")] ^= 0x40
    a_state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted") as info:
        Checkpointer(a_state.parent, resume=True)
    assert str(a_state) in str(info.value) and "blocks.1.act" in str(info.value)
    record_property("faults_injected", 1)


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (lambda b: b["model"].__setitem__("blocks.0.act.log_lam", torch.tensor([float("nan")])),
         ["blocks.0.act", "non-finite"]),
        (lambda b: b["model"].__setitem__("blocks.0.act.log_lam", torch.zeros(3)),
         ["blocks.0.act.log_lam", "shape"]),
        (lambda b: b["model"].__setitem__("blocks.0.fc.weight", torch.full((16, 64), float("inf"))),
         ["blocks.0.fc.weight", "non-finite"]),
        (lambda b: b["model"].pop("head.bias"), ["head.bias", "missing"]),
        (lambda b: b["config"].__setitem__("steps", 999), ["steps=999", "same settings"]),
        (lambda b: b.__setitem__("losses", torch.zeros(3)), ["3 losses for step 5"]),
    ],
    ids=["nan-lambda", "lambda-shape", "inf-weight", "missing-tensor", "other-config", "losses"],
)
def test_state_that_does_not_fit_the_run_is_refused(a_state, edit, needles, record_property):
    saved = load_state(a_state)
    edit(saved.body)
    save_state(a_state, saved.step, saved.body, saved.meta)  # a well-formed file with bad content
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError) as info:
        fit(model, SPLIT, TrainConfig(steps=5, warmup=0), progress=False,
            checkpointer=Checkpointer(a_state.parent, resume=True))
    message = str(info.value)
    assert str(a_state) in message and all(n in message for n in needles), message
    assert _same(model.state_dict(), before), "nothing was partially loaded"
    record_property("bad_inputs", 1)


def _rewrite_header(path: Path, change, rehash: bool = True) -> None:
    """Apply ``change`` to the JSON header of the run state at ``path`` (its tensors, and so their digests, kept;
    with ``rehash`` the header's own checksum is recomputed, as a deliberate edit would)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lambda_gelu.resume import STATE_KEY, _header_digest

    with safe_open(str(path), "pt") as handle:
        header = json.loads(handle.metadata()[STATE_KEY])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    header = change(header)
    if rehash and isinstance(header, dict):
        header["header_sha256"] = _header_digest(header)
    save_file(tensors, str(path), metadata={STATE_KEY: json.dumps(header)})


def _without(key):
    return lambda h: {k: v for k, v in h.items() if k != key}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (_without("step"), "no field 'step'"),
        (lambda h: {**h, "step": "5"}, "field 'step' is str, expected int"),
        (lambda h: {**h, "step": -5}, "'step' is -5"),
        (lambda h: {**h, "digests": list(h["digests"])}, "field 'digests' is list, expected dict"),
        (lambda h: {**h, "meta": [1, 2]}, "field 'meta' is list"),
        (lambda h: None, "header is NoneType, not an object"),
        (lambda h: {**h, "format": "2"}, "field 'format' is str"),
    ],
    ids=["no-step", "step-str", "step-negative", "digests-list", "meta-list", "header-null", "format-str"],
)
def test_run_state_header_is_checked_field_by_field(a_state, change, needle, record_property):
    _rewrite_header(a_state, change)
    with pytest.raises(CheckpointError) as info:
        load_state(a_state)
    message = str(info.value)
    assert message.startswith(str(a_state)) and needle in message and len(message.splitlines()) == 1, message
    record_property("bad_inputs", 1)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda b: b["rng"][0].__setitem__("torch", torch.zeros(3, dtype=torch.uint8)), "'body.rng[0]'"),
        (lambda b: b["rng"][0].__setitem__("numpy", ["PCG64", 1]), "'body.rng[0]'"),
        (lambda b: b["rng"][0].pop("python"), "'body.rng[0]'"),
        (lambda b: b.__setitem__("rng", []), "'body.rng' is empty"),
        (lambda b: b.pop("optimizer"), "no field 'body.optimizer'"),
    ],
    ids=["torch-rng", "numpy-rng", "no-python-rng", "no-rng", "no-optimizer"],
)
def test_run_state_body_is_checked_before_anything_is_loaded(a_state, edit, needle, record_property):
    saved = load_state(a_state)
    edit(saved.body)
    save_state(a_state, saved.step, saved.body, saved.meta)
    before_rng = torch.get_rng_state()
    with pytest.raises(CheckpointError) as info:
        Checkpointer(a_state.parent, resume=True)
    assert needle in str(info.value) and str(a_state) in str(info.value), str(info.value)
    assert torch.equal(torch.get_rng_state(), before_rng), "a refused RNG state leaves this process's as it was"
    record_property("bad_inputs", 1)


def test_a_damaged_header_is_caught_by_its_checksum_and_the_older_state_resumes(tmp_path, caplog, record_property):
    """A tensor marker in the newest state's header changed (as a flipped byte would): its checksum catches it,
    and the resume goes on from the older state instead of failing inside the optimizer."""
    fit(_model(), SPLIT, TrainConfig(steps=10, warmup=0), progress=False, checkpointer=Checkpointer(tmp_path, every=5))
    older, newest = state_paths(tmp_path)

    def break_a_marker(header):
        text = json.dumps(header["body"])
        first = text.index('"__tensor__": "') + len('"__tensor__": "')
        header["body"] = json.loads(text[:first] + "s/nowhere/" + text[first:])
        return header

    _rewrite_header(newest, break_a_marker, rehash=False)
    with pytest.raises(CheckpointError, match="header is corrupted"):
        load_state(newest)
    with caplog.at_level("WARNING", logger="lambda_gelu.resume"):
        assert Checkpointer(tmp_path, resume=True).resume_state.path == older
    record_property("faults_injected", 1)


def test_a_damaged_newest_state_resumes_from_the_older_one_and_says_so(tmp_path, caplog, record_property):
    fit(_model(), SPLIT, TrainConfig(steps=10, warmup=0), progress=False, checkpointer=Checkpointer(tmp_path, every=5))
    older, newest = state_paths(tmp_path)
    data = bytearray(newest.read_bytes())
    data[_tensor_offset(newest, "s/model/blocks.1.act.log_lam")] ^= 0x40
    newest.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="lambda_gelu.resume"):
        checkpointer = Checkpointer(tmp_path, resume=True)
    assert checkpointer.resume_state.path == older and checkpointer.resume_state.step == 5
    assert any(str(newest) in r.message and "corrupted" in r.message and f"resuming from the older state {older}"
               in r.message for r in caplog.records), caplog.text
    record_property("faults_injected", 1)
    record_property("runs_resumed", 1)


def test_state_from_another_architecture_is_refused(a_state):
    with pytest.raises(CheckpointError, match="shape") as info:
        fit(_model(hidden=(8, 16)), SPLIT, TrainConfig(steps=5, warmup=0), progress=False,
            checkpointer=Checkpointer(a_state.parent, resume=True))
    assert str(a_state) in str(info.value) and "blocks.0.fc.weight" in str(info.value)


def test_a_training_state_does_not_resume_hardening(a_state, trained):
    with pytest.raises(CheckpointError, match="without a Hardener"):
        harden(copy.deepcopy(trained), SPLIT, HardenConfig(steps=5), progress=False,
               checkpointer=Checkpointer(a_state.parent, resume=True))


def test_open_run_state_refuses_discards_and_compares(tmp_path):
    out = tmp_path / "model.safetensors"
    run = {"steps": 45, "hidden": (16, 16)}
    checkpointer = open_run_state(out, run, resume=False, force=False)
    fit(_model(), SPLIT, TrainConfig(steps=5, warmup=0), progress=False,
        checkpointer=Checkpointer(checkpointer.folder, every=5, meta=checkpointer.meta))
    before = {p.name: p.read_bytes() for p in checkpointer.folder.iterdir()}
    with pytest.raises(OutputExistsError, match="--resume"):
        open_run_state(out, run, resume=False, force=False)
    with pytest.raises(ValueError, match="steps=45") as info:
        open_run_state(out, {**run, "steps": 46}, resume=True, force=False)
    assert "steps=46" in str(info.value)
    assert {p.name: p.read_bytes() for p in checkpointer.folder.iterdir()} == before
    assert open_run_state(out, run, resume=True, force=False).resume_state.step == 5  # tuple == list after JSON
    from lambda_gelu.kernels import compile_mode, set_compile_mode

    other = "off" if compile_mode() != "off" else "on"
    previous = set_compile_mode(other)  # another arithmetic: the resume would not be bitwise
    try:
        with pytest.raises(ValueError, match=r"compile_mode=.*LAMBDA_GELU_COMPILE"):
            open_run_state(out, run, resume=True, force=False)
    finally:
        set_compile_mode(previous)
    assert open_run_state(out, run, resume=False, force=True).resume_state is None
    assert not state_paths(checkpointer.folder), "--force without --resume discards the old state"

"""Outputs are checked before any work and held by one writer: ``lambda_gelu.output_plan``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from lambda_gelu.cli import main
from lambda_gelu.output_plan import Output, OutputBusyError, OutputPlanError, output_lock, planned_outputs
from lambda_gelu.resume import state_paths

fcntl = pytest.importorskip("fcntl", reason="output locks need fcntl (POSIX)")


def test_a_second_lock_on_the_same_output_is_refused_naming_the_holder(tmp_path, record_property):
    where = tmp_path / "new" / "deeper" / "model.safetensors"
    lock = where.parent / ".model.safetensors.lock"
    with output_lock(where, "--out"):
        assert lock.read_text() == f"pid {os.getpid()}\n"
        held = rf"--out {where} is being written by another run \(pid {os.getpid()}\)"
        with pytest.raises(OutputBusyError, match=held):
            with output_lock(where, "--out"):
                pass
        assert lock.exists(), "the refused attempt leaves the holder's lock alone"
    assert not (tmp_path / "new").exists(), "the lock file and the folders made for it are gone"
    record_property("bad_inputs", 1)


def test_a_stale_lock_file_of_a_killed_run_does_not_block(tmp_path, record_property):
    where = tmp_path / "out"
    (tmp_path / ".out.lock").write_text("pid 999999\n")  # left by a SIGKILLed run: the file, but no lock held
    with planned_outputs([Output(where, "folder", "--out")]) as paths:
        assert paths == [where]
    assert not (tmp_path / ".out.lock").exists()
    record_property("faults_injected", 1)


def test_outputs_are_checked_against_each_other_and_the_inputs(tmp_path):
    data = tmp_path / "data"
    (data / "inner").mkdir(parents=True)
    with pytest.raises(OutputPlanError, match="same path"):
        planned_outputs([Output(tmp_path / "a", "file", "--out"), Output(tmp_path / "x/../a", "file", "--record")]
                        ).__enter__()
    with pytest.raises(OutputPlanError, match="holds the input --data-dir"):
        planned_outputs([Output(tmp_path, "folder", "--out")], [("--data-dir", data / "inner")], force=True
                        ).__enter__()
    link = tmp_path / "link"
    link.symlink_to(data)  # a write lands where the link is (it replaces the link), not in its target
    with planned_outputs([Output(link / ".." / "fresh", "folder", "--out")], [("--data-dir", data)]) as paths:
        assert paths == [tmp_path / "fresh"]


def test_two_runs_on_one_output_the_second_refuses_while_the_first_writes(tmp_path, capsys, record_property):
    out = tmp_path / "m.safetensors"
    args = ["train", "--out", str(out), "--hidden", "8", "--no-progress"]
    first = subprocess.Popen([sys.executable, "-m", "lambda_gelu.cli", *args, "--steps", "100000",
                              "--checkpoint-every", "5"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".m.safetensors.lock"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not state_paths(tmp_path / "m.safetensors.state"):
        time.sleep(0.05)
    assert lock.exists(), first.poll()
    capsys.readouterr()
    assert main([*args, "--steps", "3", "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"lambda-gelu train: error: --out {out} is being written by another run (pid {first.pid}); "
                   "wait for it or name another path"), err
    assert state_paths(tmp_path / "m.safetensors.state"), "the second run touched nothing of the first's"
    first.send_signal(signal.SIGTERM)
    _, first_err = first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM, first_err
    assert not lock.exists() and not out.exists()
    record_property("bad_inputs", 1)
    record_property("faults_injected", 1)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoints_and_run_folders_follow_the_umask(tmp_path, umask):
    import torch

    from lambda_gelu.checkpoint import write_safetensors
    from lambda_gelu.outputs import staged_dir

    old = os.umask(umask)
    try:
        path = write_safetensors(tmp_path / "a.safetensors", {"w": torch.zeros(2)}, {})
        with staged_dir(tmp_path / "run") as stage:
            (stage / "report.md").write_text("x\n")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "run" / "report.md").stat().st_mode & 0o777 == 0o666 & ~umask


def test_outputs_in_folders_that_do_not_exist_yet_are_made_and_written(tmp_path, capsys):
    out, record = tmp_path / "a" / "m.safetensors", tmp_path / "b" / "c" / "lam.csv"
    assert main(["train", "--out", str(out), "--record", str(record), "--steps", "3", "--hidden", "8",
                 "--no-progress"]) == 0
    assert out.is_file() and record.read_text().startswith("step,layer,lam")
    assert sorted(p.name for p in tmp_path.rglob(".*")) == [], "no lock or temporary file left"


def test_a_path_through_a_link_and_dotdot_is_checked_where_the_os_writes_it(tmp_path, monkeypatch, capsys):
    """``link/..`` is the folder above the link's target (the OS's view), not the folder holding the link."""
    (tmp_path / "c3").mkdir()
    (tmp_path / "c4" / "sub").mkdir(parents=True)
    (tmp_path / "c3" / "l").symlink_to(tmp_path / "c4" / "sub")
    victim = tmp_path / "c4" / "victim.safetensors"
    victim.write_text("precious\n")
    monkeypatch.chdir(tmp_path / "c3")
    assert main(["train", "--out", "l/../m.safetensors", "--steps", "2", "--hidden", "8", "--no-progress"]) == 0
    assert (tmp_path / "c4" / "m.safetensors").is_file() and not (tmp_path / "c3" / "m.safetensors").exists()
    capsys.readouterr()
    code = main(["relufy", str(tmp_path / "c4" / "m.safetensors"), "--out", "l/../victim.safetensors"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert victim.read_text() == "precious\n"


def test_the_run_state_folder_is_locked_with_its_output(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    state = tmp_path / "m.safetensors.state"
    held = [Output(out, "file", "--out"), Output(state, "folder", "the run state of --out", may_exist=True)]
    with planned_outputs(held):  # as a running `train --out m.safetensors` holds them
        capsys.readouterr()
        assert main(["train", "--out", str(state), "--steps", "2", "--hidden", "8", "--no-progress"]) == 2
        assert "being written by another run" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())

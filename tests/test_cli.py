"""The ``lambda-gelu`` command: smoke runs with tiny budgets, and its error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from lambda_gelu import LambdaGELU
from lambda_gelu.checkpoint import load_checkpoint
from lambda_gelu.cli import main
from lambda_gelu.version import __version__

TINY_DEMO = ["--steps", "40", "--harden-steps", "20", "--hidden", "16,16", "--no-progress"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed entry point in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "lambda_gelu.cli", *args], capture_output=True, text=True, timeout=300
    )


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to prove that nothing was touched)."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    result = run_cli("demo", "--out", str(out), *TINY_DEMO)
    assert result.returncode == 0, result.stderr
    return out


def test_demo_writes_the_run_folder(demo_run: Path) -> None:
    for name in ["report.md", "metrics.json", "model.onnx", "hardness_trajectory.csv",
                 "plots/profile.png", "plots/trajectories.png", "plots/gates_learned.png",
                 "plots/gates_hardened.png", "checkpoints/gelu.safetensors",
                 "checkpoints/lambda_gelu.safetensors", "checkpoints/hardened.safetensors",
                 "checkpoints/relu.safetensors"]:
        assert (demo_run / name).is_file(), name
    assert not [p for p in demo_run.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"
    metrics = json.loads((demo_run / "metrics.json").read_text())
    methods = [row["method"] for row in metrics["rows"]]
    assert methods == ["GELU baseline (no swap)", "direct swap GELU → ReLU", "swap + fine-tuning",
                       "lambda-gelu ReLU-ization"]
    assert metrics["onnx"]["smooth_gate_ops"] == []
    assert metrics["onnx"]["parity_ok"] is True
    assert metrics["command"].startswith("lambda-gelu demo --out")
    report = (demo_run / "report.md").read_text()
    assert "| lambda-gelu ReLU-ization |" in report and "plots/profile.png" in report


def test_demo_onnx_graph_is_relu_only(demo_run: Path) -> None:
    graph = onnx.load(str(demo_run / "model.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert "Relu" in ops
    assert not ops & {"Gelu", "Erf", "Tanh"}


def test_demo_checkpoints_reload(demo_run: Path) -> None:
    relu_model, header = load_checkpoint(demo_run / "checkpoints/relu.safetensors")
    assert not any(isinstance(m, LambdaGELU) for m in relu_model.modules())
    assert sum(isinstance(m, torch.nn.ReLU) for m in relu_model.modules()) == 2
    hardened, _ = load_checkpoint(demo_run / "checkpoints/hardened.safetensors")
    metrics = json.loads((demo_run / "metrics.json").read_text())
    for name, module in hardened.named_modules():
        if isinstance(module, LambdaGELU):
            assert module.lam.item() == pytest.approx(metrics["targets"][name], rel=1e-4)
    assert header["metadata"]["dataset"] == "digits"


def test_demo_refuses_to_overwrite(demo_run: Path) -> None:
    before = snapshot(demo_run)
    result = run_cli("demo", "--out", str(demo_run), *TINY_DEMO)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert snapshot(demo_run) == before


def test_train_harden_relufy_profile_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lam_ckpt, hard_ckpt, relu_ckpt = tmp_path / "lam.safetensors", tmp_path / "hard.safetensors", tmp_path / "relu.st"
    trajectory = tmp_path / "lam.csv"
    assert main(["train", "--out", str(lam_ckpt), "--steps", "30", "--hidden", "16", "--no-progress",
                 "--record", str(trajectory), "--record-every", "10"]) == 0
    assert trajectory.read_text().splitlines()[0] == "step,layer,lam,lam_min,lam_max"
    assert len(trajectory.read_text().splitlines()) == 1 + 3  # steps 10, 20, 30, one layer
    assert main(["harden", str(lam_ckpt), "--out", str(hard_ckpt), "--steps", "10", "--no-progress"]) == 0
    hardened, header = load_checkpoint(hard_ckpt)
    (gate,) = [m for m in hardened.modules() if isinstance(m, LambdaGELU)]
    assert gate.lam.item() == pytest.approx(header["metadata"]["targets"]["blocks.0.act"], rel=1e-4)
    assert gate.lam.item() > 5  # τ = 1e-5 needs λσ ≈ 17
    onnx_path = tmp_path / "relu.onnx"
    assert main(["relufy", str(hard_ckpt), "--out", str(relu_ckpt), "--onnx", str(onnx_path)]) == 0
    relu_model, _ = load_checkpoint(relu_ckpt)
    assert [type(m).__name__ for m in relu_model.modules()].count("ReLU") == 1
    x = torch.rand(5, 64)
    with torch.no_grad():
        # the hardened gate is within τ of ReLU on its data: the outputs barely move
        assert (relu_model(x) - hardened(x)).abs().max() < 0.2
    assert onnx_path.is_file()
    assert main(["profile", str(lam_ckpt), "--out", str(tmp_path / "prof")]) == 0
    printed = capsys.readouterr().out
    assert "| blocks.0.act |" in printed and "D(λ) =" in printed
    profile = json.loads((tmp_path / "prof/profile.json").read_text())
    assert profile[0]["name"] == "blocks.0.act" and profile[0]["effective"] > 0
    assert (tmp_path / "prof/profile.png").is_file() and (tmp_path / "prof/gates.png").is_file()


def test_harden_and_relufy_with_fold_match_the_library(tmp_path: Path) -> None:
    """`harden --fold` records the fold and `relufy --fold` writes the model that relu_copy(fold=...) makes."""
    from lambda_gelu.data import load_dataset
    from lambda_gelu.harden import HardenConfig
    from lambda_gelu.pipeline import calibration_batches, relu_copy

    lam_ckpt, hard_ckpt, relu_ckpt = tmp_path / "lam.st", tmp_path / "hard.st", tmp_path / "relu.st"
    assert main(["train", "--out", str(lam_ckpt), "--steps", "30", "--hidden", "16", "--no-progress"]) == 0
    assert main(["harden", str(lam_ckpt), "--out", str(hard_ckpt), "--steps", "10", "--fold", "--no-progress"]) == 0
    hardened, header = load_checkpoint(hard_ckpt)
    assert header["metadata"]["harden"]["fold"] is True
    unfolded = tmp_path / "hard-unfolded.st"
    assert main(["harden", str(lam_ckpt), "--out", str(unfolded), "--steps", "10", "--no-progress"]) == 0
    # every change of λ moved the head's bias; the same run without --fold leaves it to the training alone
    assert not torch.allclose(load_checkpoint(unfolded)[0].head.bias, hardened.head.bias, atol=1e-4)
    assert main(["relufy", str(hard_ckpt), "--out", str(relu_ckpt), "--fold"]) == 0
    written, _ = load_checkpoint(relu_ckpt)
    split = load_dataset(header["metadata"]["dataset"], seed=int(header["metadata"].get("data_seed", 0)))
    expected = relu_copy(hardened, fold=calibration_batches(split, HardenConfig()))
    plain = relu_copy(hardened)
    want, got = expected.state_dict(), written.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not torch.equal(plain.head.bias, written.head.bias)  # the gate's fit went into the head's bias


@pytest.fixture(scope="module")
def gelu_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "gelu.safetensors"
    assert main(["train", "--out", str(path), "--activation", "gelu", "--steps", "5", "--hidden", "8",
                 "--no-progress"]) == 0
    return path


BAD_ARGS = [
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--steps", "ten"], "--steps"),
    (["demo", "--tau", "1.5"], "--tau"),
    (["demo", "--tau", "0"], "--tau"),
    (["demo", "--dataset", "imagenet"], "--dataset"),
    (["demo", "--hidden", "16,x"], "--hidden"),
    (["train", "--out", "x.safetensors", "--lr", "-1"], "--lr"),
    (["train", "--out", "x.safetensors", "--activation", "swish"], "--activation"),
    (["harden", "ckpt", "--out", "o", "--distill-weight", "2"], "--distill-weight"),
    (["harden", "ckpt", "--out", "o", "--shape", "square"], "--shape"),
    (["frobnicate"], "invalid choice"),
    (["train"], "--out"),
]


@pytest.mark.parametrize(("argv", "mentions"), BAD_ARGS)
def test_bad_arguments_exit_2_with_one_line(argv: list[str], mentions: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert mentions in err and "error" in err


def test_errors_from_the_work_exit_2_with_one_line(tmp_path: Path, gelu_ckpt: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    cases = [
        (["harden", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")], "no such checkpoint"),
        (["relufy", str(garbage), "--out", str(tmp_path / "o")], "not a safetensors file"),
        (["relufy", str(gelu_ckpt), "--out", str(tmp_path / "o")], "no module of MLP matched"),
        (["train", "--out", str(existing), "--steps", "1"], "already exists"),
        (["relufy", str(gelu_ckpt), "--out", str(existing), "--include-gelu"], "already exists"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert message in err, (argv, err)
    assert existing.read_bytes() == b"keep me"
    assert not (tmp_path / "o").exists()


def test_force_replaces_only_after_success(tmp_path: Path, gelu_ckpt: Path) -> None:
    out = tmp_path / "relu.safetensors"
    out.write_bytes(b"old")
    assert main(["relufy", str(gelu_ckpt), "--out", str(out), "--include-gelu", "--force"]) == 0
    model, _ = load_checkpoint(out)
    assert any(isinstance(m, torch.nn.ReLU) for m in model.modules())


def test_entry_point_is_installed() -> None:
    bindir = Path(sys.executable).parent
    exe = bindir / ("lambda-gelu.exe" if os.name == "nt" else "lambda-gelu")
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(f"lambda-gelu {__version__}")

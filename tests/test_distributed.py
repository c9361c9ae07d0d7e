"""Training and hardening in 2 processes (gloo, CPU, DistributedDataParallel) equal a 1-process run with the same
global batch; λ is bitwise identical on both ranks, and only rank 0 writes files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lambda_gelu import LambdaGELU, convert, distributed
from lambda_gelu.data import load_dataset
from lambda_gelu.harden import HardenConfig
from lambda_gelu.models import build_model
from lambda_gelu.pipeline import harden
from lambda_gelu.resume import Checkpointer, state_paths
from lambda_gelu.train import TrainConfig, fit

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

# 1257 training rows: the last batch of each epoch (41 rows) splits 21/20 over two ranks
TRAIN = TrainConfig(steps=30, warmup=5, batch_size=64)
HARDEN = HardenConfig(steps=20, retarget_every=5, calibration_batches=2, calibration_batch_size=101)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, num_classes=10, hidden=[16, 16])
    convert(model)
    return model


def _run(folder: Path | None) -> dict[str, object]:
    split = load_dataset("digits")
    model = _model()
    checkpointer = Checkpointer(folder, every=10) if folder is not None else None
    losses = fit(model, split, TRAIN, progress=False, checkpointer=checkpointer)
    trained_lam = {n: m.lam for n, m in model.named_modules() if isinstance(m, LambdaGELU)}
    hardener = harden(model, split, HARDEN, progress=False)
    return {"state": model.state_dict(), "losses": torch.tensor(losses, dtype=torch.float64),
            "trained_lam": trained_lam, "targets": hardener.target}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = _run(Path(out) / f"states-rank{rank}")  # rank 1's folder must never appear
        model = _model()  # divergence is caught: perturb λ on rank 1 only
        if rank == 1:
            model.blocks[0].act.set_lambda_(1.5)
        try:
            distributed.check_same({n: m.lam for n, m in model.named_modules() if isinstance(m, LambdaGELU)})
            result["divergence_caught"] = False
        except RuntimeError as error:
            result["divergence_caught"] = "differs across ranks" in str(error)
        torch.save(result, Path(out) / f"result-rank{rank}.pt")  # test plumbing: each rank reports back
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path, free_port, record_property):
    context = mp.start_processes(_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run(None)  # the same global batches in one process, meanwhile
    finally:
        torch.set_num_threads(before)
    while not context.join(timeout=300):
        pass
    ranks = [torch.load(tmp_path / f"result-rank{r}.pt", weights_only=True) for r in range(2)]

    # λ (and every weight) identical on both ranks, bitwise
    for key in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    for name in ranks[0]["trained_lam"]:
        assert torch.equal(ranks[0]["trained_lam"][name], ranks[1]["trained_lam"][name])
        assert torch.equal(ranks[0]["targets"][name], ranks[1]["targets"][name])
    assert torch.equal(ranks[0]["losses"], ranks[1]["losses"])
    assert all(r["divergence_caught"] for r in ranks)

    # equal to the one-process run up to the order of floating-point sums
    torch.testing.assert_close(ranks[0]["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    for name, lam in single["trained_lam"].items():
        torch.testing.assert_close(ranks[0]["trained_lam"][name], lam, rtol=1e-5, atol=0)
    for name, target in single["targets"].items():
        torch.testing.assert_close(ranks[0]["targets"][name], target, rtol=1e-5, atol=0)
    for key, value in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)

    # only rank 0 wrote its run states
    assert [p.name for p in state_paths(tmp_path / "states-rank0")] == ["state-00000020.safetensors",
                                                                         "state-00000030.safetensors"]
    assert not (tmp_path / "states-rank1").exists()
    record_property("distributed_runs", 1)

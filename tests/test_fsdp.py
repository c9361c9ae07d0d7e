"""λ under FSDP2: a model sharded by ``fully_shard`` (2 gloo processes, CPU) learns and hardens λ as one process does.

A per-layer λ is stored with shape (1,) (``fully_shard`` refuses 0-d parameters) and on 2 ranks is sharded
unevenly (rank 1 holds none of it); a per-channel λ is split across the ranks. The user's own loop: AdamW on
:func:`lambda_gelu.param_groups` (normalized, projected λ update), then the :class:`~lambda_gelu.schedule.Hardener`
setting λ on the sharded parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lambda_gelu import LambdaGELU, convert, param_groups, reluize
from lambda_gelu.data import load_dataset
from lambda_gelu.harden import HardenConfig
from lambda_gelu.models import build_model
from lambda_gelu.resume import Checkpointer
from lambda_gelu.schedule import Hardener

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

LEARN_STEPS, HARDEN_STEPS, BATCH = 12, 6, 64
TARGETS = {"blocks.0.act": 6.0, "blocks.1.act": torch.tensor([2.0 + c for c in range(16)], dtype=torch.float64)}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, num_classes=10, hidden=[16, 16])
    convert(model)
    model.blocks[0].act.set_lambda_(1.0)  # per layer: λ = 1 exactly, stored as shape (1,)
    model.blocks[1].act = LambdaGELU(init=1.5, num_channels=16)  # per channel
    return model


def _run(rank: int, world: int, _folder: str | None = None) -> dict[str, object]:
    """Train λ and the weights, then harden; returns the full (gathered) state and λ on this rank."""
    split = load_dataset("digits")
    model = _model()
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-2, hardness_lr=0.05), eps=1e-3)
    generator = torch.Generator().manual_seed(1)
    lams = []

    def step() -> None:
        rows = torch.randint(0, len(split.x_train), (BATCH,), generator=generator)
        x, y = split.x_train[rows].tensor_split(world)[rank], split.y_train[rows].tensor_split(world)[rank]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()  # equal shards: FSDP's mean over ranks is the global mean
        optimizer.step()

    for _ in range(LEARN_STEPS):
        step()
        lams.append(model.blocks[0].act.lam.item())
    learned = {"blocks.0.act": model.blocks[0].act.lam, "blocks.1.act": model.blocks[1].act.lam}
    hardener = Hardener(model, TARGETS, total_steps=HARDEN_STEPS, shape="linear")
    for _ in range(HARDEN_STEPS):
        hardener.step()
        step()
    state = (get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
             if world > 1 else model.state_dict())
    return {"state": state, "learned": learned, "lams": torch.tensor(lams, dtype=torch.float64),
            "hardened": {"blocks.0.act": model.blocks[0].act.lam, "blocks.1.act": model.blocks[1].act.lam},
            "local_numel": int(model.blocks[0].act.log_lam.to_local().numel()) if world > 1 else 1}


Job = Callable[[int, int, str | None], dict[str, object]]


def _worker(rank: int, job: Job, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(job(rank, world, out), Path(out) / f"result-rank{rank}.pt")  # test plumbing: each rank reports
    finally:
        dist.destroy_process_group()


def _two_ranks_and_one(job: Job, folder: Path, port: int) -> tuple[dict[str, object], list[dict[str, object]]]:
    """``job`` on 2 gloo ranks and, meanwhile, in this process alone: (the one-process result, the ranks')."""
    context = mp.start_processes(_worker, args=(job, 2, port, str(folder)), nprocs=2, join=False,
                                 start_method="spawn")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = job(0, 1, None)
    finally:
        torch.set_num_threads(before)
    while not context.join(timeout=300):
        pass
    return single, [torch.load(folder / f"result-rank{r}.pt", weights_only=True) for r in range(2)]


def test_fully_shard_two_gloo_processes_equal_one_process(tmp_path, free_port):
    single, ranks = _two_ranks_and_one(_run, tmp_path, free_port)

    assert [r["local_numel"] for r in ranks] == [1, 0]  # the per-layer λ lives on rank 0 only
    lams = single["lams"]
    assert (lams >= 1.0).all() and lams[-1] > 1.2  # λ left its exact start at 1 within a few steps
    for name in TARGETS:
        assert torch.equal(ranks[0]["learned"][name], ranks[1]["learned"][name])  # every rank reads the same λ
        torch.testing.assert_close(ranks[0]["learned"][name], single["learned"][name], rtol=1e-5, atol=0)
        # the Hardener reached its targets on the sharded λ, as in one process
        want = torch.maximum(torch.as_tensor(TARGETS[name], dtype=torch.float64), single["learned"][name].double())
        torch.testing.assert_close(single["hardened"][name].double(), want, rtol=1e-6, atol=0)
        torch.testing.assert_close(ranks[0]["hardened"][name], single["hardened"][name], rtol=1e-5, atol=0)
    torch.testing.assert_close(ranks[0]["lams"], lams, rtol=1e-5, atol=0)
    for key, value in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)


# ---------------------------------------------------------------- reluize on a sharded model

RELUIZE = HardenConfig(steps=12, retarget_every=4, calibration_batches=2, calibration_batch_size=64, lr=3e-3)


def _reluize(rank: int, world: int, folder: str | None = None) -> dict[str, object]:
    """lg.reluize on the MLP, sharded by fully_shard on ``world`` > 1 ranks with a sharded teacher beside it."""
    split = load_dataset("digits")
    model, teacher = _model(), _model()
    teacher = None if world == 1 else teacher
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for module in (model, teacher):
            for block in module.blocks:
                fully_shard(block)
            fully_shard(module)
    batches = [(split.x_train[i:i + 64], split.y_train[i:i + 64]) for i in range(0, 640, 64)]
    if folder is not None:  # a resumable run state cannot hold a sharded model: refused before any work
        with pytest.raises(ValueError, match="FSDP"):
            reluize(model, batches, loss="kl", teacher=teacher, config=RELUIZE, progress=False,
                    checkpointer=Checkpointer(Path(folder) / f"states-{rank}"))
        with pytest.raises(ValueError, match="FSDP-sharded"):
            reluize(model, batches, loss="kl", teacher=teacher, config=dataclasses.replace(RELUIZE, fold=True),
                    progress=False)
        assert all(p.requires_grad for p in model.parameters())  # refused before anything changed
        with pytest.raises(ValueError, match="cannot be copied"):  # a sharded model is not its own teacher
            reluize(model, batches, loss="kl", config=RELUIZE, progress=False)
        from torch.distributed.fsdp import fully_shard

        part = _model()
        for block in part.blocks:  # the root (the head) left out: its gradient would not be averaged
            fully_shard(block)
        with pytest.raises(ValueError, match="only in part"):
            reluize(part, batches, loss="cross-entropy", config=dataclasses.replace(RELUIZE, distill_weight=0.0),
                    progress=False)
    result = reluize(model, batches, loss="kl", teacher=teacher, config=RELUIZE, progress=False)
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    return {"state": state, "losses": torch.tensor(result.losses, dtype=torch.float64),
            "targets": {k: v.double() for k, v in result.targets.items()}, "swapped": result.swapped,
            "relu": [type(m).__name__ for m in model.modules()].count("ReLU")}


def test_reluize_on_a_fully_sharded_model_equals_one_process(tmp_path, free_port):
    single, ranks = _two_ranks_and_one(_reluize, tmp_path, free_port)
    assert single["swapped"] == ranks[0]["swapped"] == ["blocks.0.act", "blocks.1.act"]
    assert single["relu"] == ranks[0]["relu"] == ranks[1]["relu"] == 2
    assert torch.equal(ranks[0]["losses"], ranks[1]["losses"])
    torch.testing.assert_close(ranks[0]["losses"], single["losses"], rtol=1e-4, atol=1e-7)
    for name, target in single["targets"].items():  # calibrated on each rank's rows, gathered: the same λ*
        torch.testing.assert_close(ranks[0]["targets"][name], target, rtol=1e-4, atol=0)
    for key, value in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert not list(tmp_path.glob("states-*"))

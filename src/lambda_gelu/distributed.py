"""torch.distributed plumbing for training, hardening and calibration under ``torchrun``.

Nothing here is a home-made parallel engine: gradients are averaged by
:class:`torch.nn.parallel.DistributedDataParallel`, and everything else is a
handful of collectives from :mod:`torch.distributed`.

The scheme (used by :func:`lambda_gelu.train.fit`):

* every rank loads the whole data set and draws the same global batch (the
  batch order depends only on the seed); rank r trains on rows
  ``batch.tensor_split(world)[r]``. Its loss is scaled by
  ``world · n_r / n`` (n_r its rows, n the global batch), so that DDP's mean
  over ranks of the gradients is exactly the gradient of the global batch's
  mean loss: (1/W)·Σ_r ∇(W·n_r/n·L_r) = ∇ Σ_r (n_r/n)·L_r.
* λ is a parameter like any other (DDP all-reduces its gradient, so every rank
  takes the same step) or, while hardening, is set by the schedule from targets
  that every rank computes from the same gathered calibration samples.
* only rank 0 writes files; :func:`check_same` verifies at the end of a run
  that λ is bitwise identical on every rank.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lambda_gelu.batches import batch_rows, take_rows


def is_active() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files and prints."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment; True if distributed.

    Uses NCCL when CUDA is available and gloo otherwise; ``WORLD_SIZE`` <= 1
    (or unset) means a single process and changes nothing.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return is_active()


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (a parameter sharded by FSDP2's ``fully_shard``).

    Looks the class up only if ``torch.distributed.tensor`` was imported (by
    whoever sharded the model), so that this check costs no import.
    """
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of ``tensor`` as a plain tensor: itself, or a sharded one gathered from every rank.

    For a sharded tensor this is a collective: every rank must call it.
    """
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def write_full_(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Write the whole ``value`` (a plain tensor of ``tensor``'s full shape) into ``tensor``, in place.

    A sharded ``tensor`` takes this rank's shard of ``value`` without any
    communication (``src_data_rank=None``): every rank must pass the same
    value, as they do when it comes from a deterministic schedule.
    """
    if is_sharded(tensor):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(tensor.device, tensor.dtype), tensor.device_mesh, tensor.placements,
                                  src_data_rank=None)
    tensor.copy_(value)


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def reshard(model: nn.Module) -> bool:
    """Put every FSDP2 module of ``model`` back to its sharded parameters; True if the model is FSDP-sharded.

    A forward pass outside training (calibration) can leave the root module's parameters unsharded, and an
    optimizer built then would hold tensors that FSDP frees after the next backward.
    """
    module = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(module, "FSDPModule", None)
    if fsdp_module is None:
        return False
    found = False
    for submodule in model.modules():
        if isinstance(submodule, fsdp_module):
            submodule.reshard()
            found = True
    return found


def wrap(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when distributed, else ``model`` itself.

    A model sharded by FSDP2's ``fully_shard`` is returned as it is: FSDP already averages its gradients over
    the ranks, as DDP would.
    """
    if not is_active():
        return model
    sharded = [is_sharded(p) for p in model.parameters()]
    if all(sharded):
        return model
    if any(sharded):
        raise ValueError("the model is sharded by fully_shard only in part: its other parameters would not be "
                         "averaged over the ranks; call fully_shard on the root module too")
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shard(batch: Any) -> tuple[Any, float]:
    """This rank's rows of a global batch (every tensor cut along dim 0) and its loss scale ``world · n_r / n``.

    In one process: the batch itself and 1.0.
    """
    if not is_active():
        return batch, 1.0
    world, here = world_size(), rank()
    local = take_rows(batch, here, world)
    return local, world * batch_rows(local) / max(1, batch_rows(batch))


def sum_all(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over ranks (a copy; ``value`` itself in one process)."""
    if not is_active():
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on any rank (so that every rank takes the same decision)."""
    if not is_active():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1.0 if flag else 0.0], device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if is_active():
        dist.barrier()


def check_same(tensors: dict[str, torch.Tensor], what: str = "λ") -> None:
    """Raise RuntimeError unless every tensor is bitwise identical on every rank (no-op in one process)."""
    if not is_active():
        return
    for name, value in tensors.items():
        flat = value.detach().double().reshape(-1).cpu()
        low, high = flat.clone(), flat.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            spread = (high - low).abs().max().item()
            raise RuntimeError(f"{what} of {name} differs across ranks (by up to {spread:.3g}); the ranks diverged")

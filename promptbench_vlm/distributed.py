"""Data parallelism under ``torchrun``: process group from the environment, sharding, gathering.

``torchrun --nproc-per-node N -m promptbench_vlm evaluate ...`` starts N copies of the command;
each finds ``WORLD_SIZE`` > 1 in its environment and joins one process group (gloo on CPU, NCCL
on CUDA, one GPU per local rank). Work is split in contiguous shards, results are gathered back
in their original order, so every rank ends with the arrays a single process would have computed;
only rank 0 writes files and prints. Outside torchrun every function here is the identity.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import UserError

T = TypeVar("T")


def launched() -> bool:
    """True in a process started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> str:
    """Join the process group when started by torchrun; return the device this rank should use.

    ``auto`` and ``cuda`` become ``cuda:LOCAL_RANK`` under torchrun, so ranks never share a GPU.
    The group is left at interpreter exit, however the command ends.
    """
    if not launched() or dist.is_initialized():
        return device
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda and device in ("auto", "cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if use_cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    atexit.register(_teardown)
    return device


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on the rank that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def shard_range(n: int) -> range:
    """This rank's contiguous share of ``range(n)``: sizes differ by at most one."""
    world, r = world_size(), rank()
    return range(n * r // world, n * (r + 1) // world)


def shard(items: Sequence[T]) -> list[T]:
    """This rank's every world-th item, starting at its rank (round robin)."""
    return list(items[rank() :: world_size()])


def gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank; ``[obj]`` outside torchrun.

    Tensors should be on the CPU: objects travel pickled between this package's own processes.
    """
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def main_only(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 alone and give every rank its result, or raise its `UserError` on every
    rank (so no rank is left waiting for one that stopped)."""
    outcome: tuple[Any, UserError | None] = (None, None)
    if is_main():
        try:
            outcome = (fn(), None)
        except UserError as err:
            outcome = (None, err)
    result, error = broadcast(outcome)
    if error is not None:
        raise error
    return result


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (so all ranks act on one decision)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_gradients(params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Each parameter's gradient averaged over ranks, on every rank; the gradients as they are
    outside torchrun.

    Data-parallel training steps with these, so every rank takes the same optimiser step. A
    gradient that is None on a rank counts as zeros there; None on every rank, it stays None (the
    optimiser then skips that parameter, as one process would). One flat all-reduce in float32:
    the trainable tensors are prompt-sized.
    """
    grads = [p.grad for p in params]
    if world_size() == 1:
        return grads
    device = params[0].device
    present = torch.tensor([g is not None for g in grads], dtype=torch.float32, device=device)
    flat = torch.cat([*((g if g is not None else torch.zeros_like(p)).float().flatten()
                        for p, g in zip(params, grads)), present])
    dist.all_reduce(flat)
    values = flat[: -len(params)].div_(world_size()).split([p.numel() for p in params])
    return [v.view_as(p).to(p.dtype) if any_rank else None
            for p, v, any_rank in zip(params, values, flat[-len(params):].tolist())]

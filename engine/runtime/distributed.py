"""Several processes under torchrun: the process group, the rank's device, and what the ranks
exchange. A plain `python -m ...` is one process and none of this sets anything up.

    torchrun --nproc-per-node N -m engine.model.infer ...
    torchrun --nproc-per-node N -m engine.training.train ...
"""

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")
N = TypeVar("N", int, float)


def rank() -> int:
    """This process's rank: 0 when not under torchrun. Known before the group is joined."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_processes(device: torch.device) -> int:
    """How many processes a job on this machine runs: one per GPU, else one."""
    return torch.cuda.device_count() if device.type == "cuda" else 1


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) for the block, if torchrun
    started this process; yields the device this rank computes on (its own GPU)."""
    if "WORLD_SIZE" not in os.environ:
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
    )
    try:
        yield device
    finally:
        dist.destroy_process_group()


def from_rank_0(make: Callable[[], T]) -> T:
    """`make()`, run by rank 0 alone; every rank gets its result, or raises its error (so that
    a mistake rank 0 finds stops every rank in the same words)."""
    if not dist.is_initialized():
        return make()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [(make(), None)]
        except (Exception, SystemExit) as exc:
            box = [(None, exc)]
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def sum_over_ranks(values: list[N], device: torch.device, poll: Callable[[], None] | None = None) -> list[N]:
    """The values summed over every rank, once all have got here (a barrier). `poll`, if
    given, runs every half second meanwhile, so that a rank done early still reports and can
    be cancelled while the others work."""
    if not dist.is_initialized():
        return values
    dtype = torch.float64 if any(isinstance(v, float) for v in values) else torch.int64
    total = torch.tensor(values, dtype=dtype, device=device)  # nccl reduces on the GPU
    work = dist.all_reduce(total, async_op=True)
    while poll is not None and not work.is_completed():
        poll()
        time.sleep(0.5)
    work.wait()
    return total.tolist()


def gather(value: T) -> list[T]:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def shard(items: Sequence[T]) -> list[tuple[int, T]]:
    """This rank's share of `items`, every world_size()-th from its rank, with each one's
    index in `items`."""
    return [(i, items[i]) for i in range(rank(), len(items), world_size())]


def parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` wrapped in DistributedDataParallel when several ranks train it (gradients
    averaged over them at every step), else `model` itself."""
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def same_as_rank_0(model: nn.Module) -> None:
    """Every rank's `model` takes rank 0's weights and buffers (BatchNorm statistics, which
    each rank updates from its own images)."""
    if dist.is_initialized():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)

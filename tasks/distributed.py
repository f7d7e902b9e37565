"""Distributed-training helpers in one place: process group set-up, rank checks, gathers.

A stage started by `torchrun` finds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in its environment and joins a process group: NCCL when it trains on CUDA,
Gloo on CPU. Started without them, it runs as a single process and every helper here
returns the single-process result. Torch is imported inside functions only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from tasks.errors import StageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """The rank of this process in the job, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _read_env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as error:
        raise StageError(f"environment variable {name}={value!r} is not an integer; "
                         "start distributed runs with torchrun") from error


def init_distributed(device_request: str = "auto") -> DistributedContext:
    """Join the torchrun process group, if any, and pick this process's device.

    `device_request` is "auto" (CUDA when available), "cuda" or "cpu".
    """
    import torch
    import torch.distributed as dist

    rank = _read_env_int("RANK", 0)
    world_size = _read_env_int("WORLD_SIZE", 1)
    local_rank = _read_env_int("LOCAL_RANK", 0)

    use_cuda = device_request == "cuda" or (device_request == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise StageError("--device cuda was requested but no CUDA device is visible; "
                         "use --device cpu or check CUDA_VISIBLE_DEVICES")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"

    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        logger.info("joined process group: rank %d of %d, backend %s, device %s",
                    rank, world_size, backend, device)
    return DistributedContext(rank, world_size, local_rank, device)


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def current_rank() -> int:
    """This process's rank in the process group; 0 without one."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def gather_concat(tensor):
    """All-gather `tensor` from every rank and concatenate along dim 0, without gradient.

    Every rank must pass a tensor of the same shape. Returns the tensor itself in a
    single process.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def broadcast_from_main(tensor):
    """Overwrite `tensor` in place on every rank with rank 0's value."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def all_reduce_mean(value: float, device: str) -> float:
    """Average a Python number over ranks, for logging."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper, or the model itself."""
    return getattr(model, "module", model)

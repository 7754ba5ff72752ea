"""torchrun / DistributedDataParallel plumbing: the same training command on 1 CPU, 1 GPU or many.

Under ``torchrun`` the environment holds ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; every rank
draws its own pairs (per-rank seeded generators: on-the-fly data needs no sampler), gradients are
averaged by DDP, and only rank 0 writes checkpoints, logs and the model.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch


@dataclass
class DistributedContext:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's value of ``flag`` on every rank (so all ranks take the same branch)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1 if flag else 0])
        torch.distributed.broadcast(value, 0)
        return bool(value.item())


def setup_distributed(device: torch.device) -> DistributedContext:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    import torch.distributed as dist  # lazy: only under torchrun

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown_distributed(context: DistributedContext) -> None:
    if context.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def hardware_description(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{world_size} x {name}" if world_size > 1 else name

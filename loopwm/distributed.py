"""Data-parallel training on torch.distributed: joining the process group that `torchrun` sets up, and the
few collectives the Trainer needs.

Under `torchrun --nproc_per_node=N` every process trains the same model on its own share of each batch
(sampled from its own RNG stream), gradients are averaged across processes after every backward pass, and
only rank 0 writes. Outside torchrun (`WORLD_SIZE` unset or 1) everything here is a no-op, so one code path
serves both. The backend is NCCL when the run uses CUDA, gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn


def launched_processes() -> int:
    """How many processes the launcher started (`WORLD_SIZE`, set by torchrun); 1 without a launcher."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}: expected an integer") from None


@dataclass(frozen=True)
class World:
    """This process's place in the run: its rank among `size` processes, and where collectives' tensors live
    (NCCL reduces CUDA tensors, gloo CPU ones)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes run folders, logs and checkpoints."""
        return self.rank == 0

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Average `.grad` over all processes with one all-reduce of a flat buffer.

        A parameter without a gradient on some process counts as zero there; one without a gradient on
        every process keeps `grad=None`, so optimisers skip it exactly as they would in a single process.
        """
        if self.size == 1:
            return
        params = [p for p in params if p.requires_grad]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        present = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=self.device)
        flat = torch.cat([g.reshape(-1).to(self.device) for g in grads] + [present])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for p, g, seen in zip(params, grads, flat[-len(params) :].tolist()):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.device, g.dtype) if seen > 0 else None
            offset += n

    def mean(self, values: Tensor) -> Tensor:
        """The element-wise mean of `values` over all processes (the same tensor on every rank)."""
        if self.size == 1:
            return values
        out = values.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(out)
        return (out / self.size).to(values.device, values.dtype)

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is true on at least one (for decisions all ranks must share)."""
        if self.size == 1:
            return flag
        out = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return bool(out.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order, on every process."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Give every process rank 0's parameters and buffers, so all start from the same model."""
        if self.size == 1:
            return
        for tensor in [*module.parameters(), *module.buffers()]:
            data = tensor.data.to(self.device)
            dist.broadcast(data, src=0)
            tensor.data.copy_(data)


def current() -> World:
    """The process group this process belongs to, or a single-process World when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), device)


def rank_seed(seed: int, rank: int) -> np.random.SeedSequence:
    """Rank r's seed for its own sampling stream. Rank 0's is `seed` itself, so a single process samples
    exactly as it always has; every other rank gets an independent child stream of the same seed."""
    return np.random.SeedSequence(seed, spawn_key=(rank,) if rank else ())


def rank_torch_seed(seed: int, rank: int) -> int:
    """The torch.Generator seed matching `rank_seed` (rank 0: `seed` itself)."""
    return seed if rank == 0 else int(rank_seed(seed, rank).generate_state(1, np.uint64)[0])


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[torch.device]:
    """Inside the block this process belongs to the launcher's process group; yields the device it trains on.

    Without a launcher nothing happens and `device` comes back. Under torchrun the group is joined (NCCL for
    CUDA, each process on GPU `LOCAL_RANK`; gloo on the CPU) and left at the end: after a barrier when the
    block finishes normally, at once when it raises, so a failing process never waits for the others. A group
    the caller already joined is used as it is and left to the caller.
    """
    if launched_processes() == 1 or dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield device
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()

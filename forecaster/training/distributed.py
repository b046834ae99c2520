"""Data-parallel training of one global model over several processes (torchrun, Ray Train, ...).

The trainer is launcher-agnostic: it asks `current()` for the process group it runs in, which is
whatever `torch.distributed` was initialised with: by `init_from_env()` under `torchrun` (the CLI
calls it), by Ray Train's `TorchTrainer` or Spark's `TorchDistributor` before they call the
training function, or none (one process, the default). With several processes the semantics are
those of `DistributedDataParallel`:

- the parameters are broadcast from rank 0 once, before the first step;
- `train.batch_size` is the global batch: each epoch's window order (the same on every rank, drawn
  from the shared seed) is split by `torch.utils.data.DistributedSampler` (padded to a multiple of
  the world size, as DDP does), so step i of rank r takes its share of global batch i;
- each rank computes the gradient of its share, and the gradients are averaged over the ranks
  (one coalesced all-reduce) before clipping and the optimiser step: every rank holds the same
  weights after every step, and the step's gradient equals the single-process gradient of the
  global batch (the loss is a mean over equally sized shares).

Why not the `DistributedDataParallel` wrapper itself: its reducer averages gradients from autograd
hooks, marking each parameter ready once per iteration during the one `backward()` that follows a
forward through the wrapper. Fixed-feedback and truncated-BPTT gradients are assembled from several
backward calls per step (the head, then blocks of re-evaluated cells or segments; ALGORITHMS.md
§5.2), in which a parameter receives gradient more than once, so the trainer averages the finished
gradients instead: the same arithmetic, without overlapping communication with the backward pass.

Only rank 0 writes checkpoints and runs the trainer's callbacks (the MLflow tracker); a resumed run
reads the checkpoint on rank 0 and broadcasts it, so other nodes need no shared file system.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from torch import Tensor

from forecaster.errors import ConfigError
from forecaster.training import launched_by_torchrun

__all__ = [
    "Distributed",
    "average_gradients",
    "broadcast_object",
    "broadcast_parameters",
    "broadcast_tensor",
    "current",
    "end_process",
    "init_from_env",
    "launched_by_torchrun",
    "shard",
    "shutdown",
    "sum_over_ranks",
]

T = TypeVar("T")

# How long a rank waits for the others in a collective before failing (a crashed peer).
_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in the process group (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether gradients are averaged over more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, checkpoints and writes artifacts."""
        return self.rank == 0


def current() -> Distributed:
    """The process group this process belongs to, whoever initialised it; one process if none."""
    if not (dist.is_available() and dist.is_initialized()):
        return Distributed()
    return Distributed(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_from_env(device: str = "auto") -> Distributed:
    """Join the process group `torchrun` describes in the environment (`env://`).

    The backend is NCCL when the processes train on CUDA and gloo on CPU; on CUDA each process
    takes the GPU of its `LOCAL_RANK`. Without a torchrun environment, or when a launcher has
    already initialised the group, nothing is done.

    Args:
        device: the training device setting (`auto`, `cpu`, `cuda`).

    Raises:
        ConfigError: `cuda` was asked for and no GPU is available, or a process has no GPU of
            its own (`LOCAL_RANK` beyond the visible devices).
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return current()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "config.train.device: 'cuda' but CUDA is not available (use 'auto' or 'cpu')",
            field="device",
        )
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun LOCAL_RANK {local_rank} has no GPU of its own "
                f"({torch.cuda.device_count()} visible): use --nproc-per-node <= the GPU count",
                field="device",
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=_TIMEOUT)
    return current()


_left_group = False  # this process was in a data-parallel group and has left it (`shutdown`)


def shutdown() -> None:
    """Leave the process group once every rank is done with it (no-op when there is none).

    The barrier keeps a rank that finished early (the others while rank 0 exports) from tearing
    down its connections under a peer that still uses them, which can abort the process.
    """
    global _left_group
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _left_group = True


def end_process(code: int = 0) -> None:
    """After a data-parallel run that succeeded and left its group (`shutdown`), end the process
    now, skipping the interpreter's finalization; a no-op in any other process.

    Why: with gloo, a rank whose work and files were all done was seen to abort during
    finalization ("terminate called without an active exception", SIGABRT, no Python frame) in
    about one in forty `torchrun` launches on this project's 2-core CI machine, turning a
    successful run into exit code 134. Logging and the standard streams are flushed first;
    everything the run writes is already written atomically.
    """
    if not _left_group:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def shard(order: npt.NDArray[np.int64], group: Distributed) -> npt.NDArray[np.int64]:
    """This rank's share of an epoch's window order (`DistributedSampler` without shuffling).

    Positions `rank, rank + N, ...` of the order padded by wrapping to a multiple of the world
    size `N`, so every rank takes the same number of steps; contiguous per-rank batches of `b`
    windows then together form the global batches of `b·N` windows of the unpadded order.
    """
    if not group.enabled:
        return order
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(
        range(len(order)),  # only its length is read
        num_replicas=group.world_size,
        rank=group.rank,
        shuffle=False,
        drop_last=False,
    )
    return order[np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))]


def broadcast_parameters(module: torch.nn.Module, group: Distributed) -> None:
    """Make every rank's parameters and buffers rank 0's (what DDP does at construction)."""
    if not group.enabled:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def broadcast_tensor(value: Tensor, group: Distributed) -> Tensor:
    """Rank 0's `value` on every rank, in place (same shape and dtype everywhere)."""
    if group.enabled:
        dist.broadcast(value, src=0)
    return value


def average_gradients(module: torch.nn.Module, group: Distributed) -> None:
    """Replace each parameter's `.grad` by its mean over the ranks (one coalesced all-reduce).

    A parameter without a gradient on this rank counts as a zero gradient, so the ranks always
    exchange buffers of the same layout.
    """
    if not group.enabled:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # [P]
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(group.world_size)
    offset = 0
    for param in params:
        mean = flat[offset : offset + param.numel()].view_as(param)
        if param.grad is None:
            param.grad = mean.clone()
        else:
            param.grad.copy_(mean)
        offset += param.numel()


def sum_over_ranks(value: Tensor, group: Distributed) -> Tensor:
    """`value` summed over the ranks (returned on every rank; the input when alone)."""
    if not group.enabled:
        return value
    total = value.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def broadcast_object(value: T, group: Distributed) -> T:
    """Rank 0's `value` on every rank (pickled; for small objects: reports, checkpoints)."""
    if not group.enabled:
        return value
    box: list[Any] = [value if group.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[no-any-return]

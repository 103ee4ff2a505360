"""Training on several processes or machines with PyTorch's own machinery: ``torchrun`` starts the processes and
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` joins the process
group (``nccl`` on GPUs, ``gloo`` on CPUs) and :class:`Rank` is all :mod:`lab.train` needs to know about it.

DistributedDataParallel keeps the replicas identical: every process starts from rank 0's parameters (broadcast
when the model is wrapped) and every step applies the same gradient, the mean over the processes
``g = (1/W) Σ_r g_r``, so the effective batch is ``W × batch_size``. Each process draws its own examples: the data
stream and the dictionary sampler are seeded with :meth:`Rank.data_seed` (distinct per rank), the model's
initialisation with the configured seed. Only rank 0 validates, logs and writes checkpoints and exports; the
decision to stop (step count or time limit) is taken jointly (:meth:`Rank.agree`) so that no process waits forever
in a collective that the others left.

A resumed run (``--resume``) loads rank 0's checkpoint in every process; the other ranks then reseed their
dictionary sampler from their own seed and the step, and the multi-coil data stream (seeded by (seed, batch number))
stays their own. The single-coil ``lowres`` stream restores rank 0's generator on every process: after a resume its
ranks draw the same slices (with their own noise).

Outside ``torchrun`` (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) nothing changes: rank 0 of 1, the model unwrapped.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.distributed as dist
import torch.nn as nn

log = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003  # a prime: rank r draws from data seed + r · SEED_STRIDE


@dataclasses.dataclass(frozen=True)
class Rank:
    """This process's place in the group: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def data_seed(self, seed: int) -> int:
        """The seed of this process's examples (and dictionaries): ``seed`` on rank 0, distinct on the others."""
        return seed + SEED_STRIDE * self.rank

    def device(self, chosen: torch.device) -> torch.device:
        """``chosen``, or on CUDA this process's own GPU (``cuda:LOCAL_RANK``)."""
        if self.distributed and chosen.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return chosen

    def wrap(self, model: nn.Module, skips_parameters: bool = False) -> nn.Module:
        """The module the training step calls: ``model`` itself, or DistributedDataParallel around it (which
        broadcasts rank 0's parameters now and averages the gradients in every backward pass).
        ``skips_parameters``: some steps leave parameters unused (DDP then looks for them in every backward)."""
        if not self.distributed:
            return model
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=skips_parameters)

    def agree(self, flag: bool) -> bool:
        """True on every process when it is True on any (the time limit is measured per process)."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes (the training loss every process saw)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def from_environment() -> Rank:
    """The :class:`Rank` that ``torchrun``'s environment describes (rank 0 of 1 without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as error:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {error}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return Rank(rank, world, local)


def setup(backend: str | None = None) -> Rank:
    """Join the process group that ``torchrun`` describes (once; nothing to join outside ``torchrun``).
    ``backend``: ``nccl`` when CUDA is available, else ``gloo``."""
    rank = from_environment()
    if rank.distributed and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(rank.local_rank)
        dist.init_process_group(backend=backend)
        log.info("process %d of %d (local %d) joined the %s group", rank.rank, rank.world_size, rank.local_rank,
                 backend)
    return rank


def current() -> Rank:
    """This process's :class:`Rank` once :func:`setup` ran (rank 0 of 1 when no group was joined)."""
    if dist.is_available() and dist.is_initialized():
        return Rank(dist.get_rank(), dist.get_world_size(), from_environment().local_rank)
    return Rank()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

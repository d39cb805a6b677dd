"""Many processes: torchrun / torch.distributed ranks and SLURM-array shards.

* ``torchrun --nproc_per_node=N -m iia_cli ...``: seeds are split across ranks, and the float64 sums that
  results are made of (calibration's G and g, FID feature sums, squared errors) are all-reduced, so results
  equal the single-process ones. Rank 0 writes files and logs.
* ``--shard i/n`` (e.g. ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``): independent processes that each take
  every n-th seed and write their partial sums to a shard file; ``iia merge`` combines them into result rows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from .errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    shard: tuple[int, int] | None = None  # (index, count)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


_CONTEXT = Context()


def context() -> Context:
    return _CONTEXT


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    if spec is None or spec == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ConfigError(f"--shard {spec!r} is not valid; write i/n with 0 <= i < n, "
                          "e.g. --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
    return int(m.group(1)), int(m.group(2))


def setup(shard: str | None = None) -> Context:
    """Initialise from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and an optional shard."""
    global _CONTEXT
    from .envvars import integer

    world, rank, local_rank = integer("WORLD_SIZE"), integer("RANK"), integer("LOCAL_RANK")  # ConfigError if bad
    if world > 1 and not tdist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    _CONTEXT = Context(rank, world, local_rank, parse_shard(shard))
    return _CONTEXT


def split(seeds: Sequence[T], by_shard: bool = True, by_rank: bool = True) -> list[T]:
    """This process's part of ``seeds``: every n-th of the shard, then every world-th of the rank."""
    ctx = _CONTEXT
    part = list(seeds)
    if by_shard and ctx.shard is not None:
        part = part[ctx.shard[0] :: ctx.shard[1]]
    if by_rank and ctx.distributed:
        part = part[ctx.rank :: ctx.world]
    return part


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place on a copy on the backend's device); identity without torchrun."""
    if not _CONTEXT.distributed:
        return t
    buf = t.detach().to(_device()).clone()
    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
    return buf.to(t.device)


def all_reduce_floats(*values: float) -> list[float]:
    return [float(v) for v in all_reduce_sum(torch.tensor(values, dtype=torch.float64))]


def gather_objects(obj: Any) -> list[Any]:
    """All ranks' objects, in rank order (on every rank); [obj] without torchrun."""
    if not _CONTEXT.distributed:
        return [obj]
    out: list[Any] = [None] * _CONTEXT.world
    tdist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _CONTEXT.distributed:
        tdist.barrier()


def teardown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()

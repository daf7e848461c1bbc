"""Processes and devices: torchrun's ranks, the process group, each rank's device, and small all-reduces.

Launch with `torchrun`; RANK, LOCAL_RANK and WORLD_SIZE say who a process is. Rank 0 alone writes files.
A process started by torchrun joins a process group even when it is the only rank, so that one GPU runs the
same code as many: the group, its barriers and broadcasts, and DDP.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from models.nn.encoder import ConformerCTC


class DeviceError(ValueError):
    """The device asked for is not there (e.g. --device cuda without a GPU)."""


# How long a collective (a barrier, an all-reduce) waits for the other ranks before the run fails. Every rank
# waits in a barrier while rank 0 writes a checkpoint or averages the best ones; 30 minutes leaves room for a
# slow shared filesystem, where NCCL's default of 10 minutes might not.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


@dataclass
class DistInfo:
    """Who this process is under torchrun (rank 0 of 1 without it), whether it is in a process group
    (`distributed`: started by torchrun, even as the only rank) and whether it created that group."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    owns_group: bool = False
    distributed: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def launch_info() -> DistInfo:
    """Who this process is, from its environment; joins no group. A process is `distributed` when torchrun
    started it (TORCHELASTIC_RUN_ID is set, whatever the number of ranks) or when another launcher set
    WORLD_SIZE > 1 with RANK (and LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_torchelastic_launched():
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return DistInfo(rank, local, world, distributed=True)


def init_distributed(
    dd: DistInfo, device: torch.device, timeout: timedelta = PROCESS_GROUP_TIMEOUT
) -> DistInfo:
    """Join the process group of a `distributed` process (gloo on CPU, nccl on CUDA) once its device is
    chosen (`pick_device`, which also makes it the current CUDA device): the group is bound to that GPU
    (`device_id`), so no collective has to guess it, and collectives fail after `timeout`. Returns `dd`
    with `owns_group` set when this call created the group; a process that is not distributed, or whose
    group exists already, is returned as it is."""
    if not dd.distributed or dist.is_initialized():
        return dd
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        rank=dd.rank,
        world_size=dd.world,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,  # gloo takes no device_id
    )
    return dataclasses.replace(dd, owns_group=True)


def pick_device(requested: str | None, ddp: DistInfo) -> torch.device:
    """ "auto"/None: CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU. A CUDA device becomes the
    process's current device (before `init_distributed` binds the group to it)."""
    req = (requested or "auto").lower()
    if req == "auto":
        req = "cuda" if torch.cuda.is_available() else "cpu"
    if req.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {requested} asked for CUDA but no CUDA device is available")
        if req == "cuda":
            req = f"cuda:{ddp.local_rank}"
        elif ddp.world > 1 and req != f"cuda:{ddp.local_rank}":
            # under torchrun each rank takes the GPU of its LOCAL_RANK; one index for all would stack every
            # rank on one GPU (choose GPUs with CUDA_VISIBLE_DEVICES instead)
            if ddp.main:
                warnings.warn(
                    f"--device {requested} under torchrun: each rank uses cuda:LOCAL_RANK instead; choose "
                    "the GPUs with CUDA_VISIBLE_DEVICES",
                    stacklevel=2,
                )
            req = f"cuda:{ddp.local_rank}"
        torch.cuda.set_device(torch.device(req))
    return torch.device(req)


def unwrap(model: nn.Module) -> ConformerCTC:
    """The model itself: `model`, or the module a DistributedDataParallel wraps."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # type: ignore[return-value]


def all_reduce(values: list[float], dd: DistInfo, device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or max) `values` over the ranks of the group; `values` themselves when there is no group."""
    if not dd.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def cpu_times(path: str = "/proc/stat") -> tuple[int, int]:
    """(total, idle) CPU time in clock ticks summed over the machine's CPUs, from the aggregate `cpu` line
    of /proc/stat (idle includes iowait). OSError / ValueError where it cannot be read."""
    with open(path, encoding="ascii") as f:
        fields = f.readline().split()
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        raise ValueError(f"{path}: no aggregate cpu line")
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[3] + ticks[4]


def busy_cores_now(window_s: float = 0.25) -> float | None:
    """Cores' worth of CPU time the machine spent busy over the next `window_s` seconds (this process sleeps
    meanwhile), from two reads of /proc/stat; None where /proc/stat is missing. Unlike the load average,
    which lags by about a minute, it sees a process that just stopped or started."""
    try:
        total0, idle0 = cpu_times()
        time.sleep(window_s)
        total1, idle1 = cpu_times()
    except (OSError, ValueError):
        return None
    total = total1 - total0
    if total <= 0:
        return None
    return (total - (idle1 - idle0)) / total * (os.cpu_count() or 1)


def free_cores(siblings: int = 0) -> int:
    """Cores this process may use that are not busy now: the CPU affinity set minus the busy cores measured
    over a quarter of a second (the 1-minute load average where /proc/stat is missing), at least 1.
    `siblings` busy cores are taken to be this job's own other ranks starting up, and not counted."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    busy = busy_cores_now()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    return max(1, cores - round(max(0.0, busy - siblings)))


def cpu_threads(requested: int, local_world: int = 1) -> int | None:
    """Torch intra-op threads for CPU training: `requested` when > 0; for 0 (auto) None when OMP_NUM_THREADS
    is set (the user's choice stands), else the free cores shared by this node's ranks. Threads on busy cores
    make every OpenMP barrier wait for a descheduled thread: a demo step went from 0.6 s to 12 s here with 2
    threads and another process on one of the 2 cores."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    local_world = max(local_world, 1)
    return max(1, free_cores(siblings=local_world - 1) // local_world)

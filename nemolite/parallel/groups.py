"""Process groups from the launcher's environment (torchrun or Slurm's srun), Megatron's rank layout.

Global rank ``r`` is tensor-parallel rank ``r % TP`` of pipeline stage ``r // TP``: the ranks of
one TP group are neighbours, so they share a node whenever TP ≤ GPUs per node (their all-reduces
stay on NVLink), and global rank 0 is TP rank 0 of the first stage, the driver that runs the
scheduler and the HTTP server.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
from collections.abc import Mapping

import torch
import torch.distributed as dist

from nemolite.errors import NemoliteError

DEFAULT_MASTER_PORT = 29500
# A collective waits at most this long: long enough for ranks that finish loading a 340B checkpoint
# minutes apart (a dead peer's closed connection fails a collective at once); the idle driver sends a
# heartbeat every 30 s so a server idle for hours never reaches it.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("NEMOLITE_DIST_TIMEOUT", 1800)))


@dataclasses.dataclass(frozen=True, slots=True)
class Launch:
    """Where this process sits, as the launcher told it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


@dataclasses.dataclass(slots=True)
class ParallelState:
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0
    local_rank: int = 0
    tp_group: object = None  # torch.distributed ProcessGroup; None when TP is 1
    pp_group: object = None

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def global_rank(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank


SINGLE = ParallelState()


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ("gpu[01-03,07],login2") as host names."""
    hosts = []
    for name, ranges in re.findall(r"([^,\[]+)(?:\[([^\]]*)\])?,?", nodelist):
        if not ranges:
            hosts.append(name)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{name}{number:0{len(first)}d}")
    return hosts


def launch_from_environment(environ: Mapping[str, str] = os.environ) -> Launch | None:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, else srun's SLURM_PROCID/
    SLURM_NTASKS/SLURM_LOCALID with the first node of the job as the master; None when not launched."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return Launch(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)),
                      environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)))
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or \
            environ.get("SLURM_NODELIST")
        master = environ.get("MASTER_ADDR") or (expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1")
        return Launch(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
                      int(environ.get("SLURM_LOCALID", 0)), master,
                      int(environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)))
    return None


def init_parallel(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, device_type: str = "cpu",
                  environ: Mapping[str, str] = os.environ) -> ParallelState:
    """Join the job's process group (NCCL on CUDA, gloo on CPU) and build the TP and PP groups."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if not (isinstance(tp, int) and isinstance(pp, int) and tp >= 1 and pp >= 1):
        raise NemoliteError("--tensor-parallel-size and --pipeline-parallel-size must be integers >= 1")
    launch = launch_from_environment(environ)
    world = launch.world_size if launch else 1
    if tp * pp != world:
        how = (f"this job has {world} processes" if launch else
               f"launch {tp * pp} processes, e.g. torchrun --nproc-per-node {tp * pp} -m nemolite ... or srun "
               f"--ntasks {tp * pp} nemolite ...")
        raise NemoliteError(f"--tensor-parallel-size {tp} × --pipeline-parallel-size {pp} = {tp * pp} must equal "
                            f"the number of processes; {how}")
    if world == 1:
        return SINGLE
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                rank=launch.rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    state = ParallelState(tp, pp, launch.rank, launch.local_rank)
    # Every rank creates every group, in the same order (torch.distributed's rule).
    for stage in range(pp):
        group = dist.new_group([state.global_rank(stage, t) for t in range(tp)])
        if stage == state.pp_rank:
            state.tp_group = group
    for tp_rank in range(tp):
        group = dist.new_group([state.global_rank(p, tp_rank) for p in range(pp)])
        if tp_rank == state.tp_rank:
            state.pp_group = group
    return state

"""torch.distributed plumbing for sharded work: ranks from ``torchrun``'s environment, gloo on CPU and nccl on
GPU, and relaunching a job on N local processes.

Each rank computes the shards whose index ≡ rank (mod world size) and writes them to the shared output folder;
rank 0 merges after a barrier. On many nodes, run ``torchrun --nnodes M --nproc-per-node N ...`` with the
output (and any feature store) on a file system every node mounts; nothing else is exchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from dynamics.errors import DynamicsError
from dynamics.store import make_folder


def init(device: str = "cpu") -> tuple[int, int]:
    """(rank, world size); initialises the process group when started by torchrun with more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def relaunch(job: object, nproc: int) -> None:
    """Run an influence job (a :class:`dynamics.influence.InfluenceRun`) under ``torchrun`` on ``nproc``
    local processes; its description travels as OUT/job.json."""
    out = Path(job.out)
    make_folder(out)
    spec = out / "job.json"
    spec.write_text(json.dumps(asdict(job), indent=2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "dynamics.distributed", str(spec)]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if res.returncode:
        raise DynamicsError(f"torchrun exited with status {res.returncode}", file=spec)


def main(spec: str) -> None:
    """Entry of each torchrun rank: load the job description and run it."""
    from dynamics.influence import InfluenceConfig, InfluenceRun, run_job

    raw = json.loads(Path(spec).read_text())
    raw["config"] = InfluenceConfig(**raw["config"])
    run_job(InfluenceRun(**raw))


@contextlib.contextmanager
def progress(enabled: bool = True) -> Iterator[Callable[[str, int], Callable[[int], None]] | None]:
    """A factory of rich progress bars: ``factory(description, total)`` returns an ``advance(n)`` callback."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=False) as bars:
        def factory(description: str, total: int) -> Callable[[int], None]:
            task = bars.add_task(description, total=total)
            return lambda n: bars.advance(task, n)

        yield factory


if __name__ == "__main__":
    main(sys.argv[1])

"""Two (or more) ranks as spawned processes on gloo, as torchrun or Ray Train would start them, with no
Ray: a rank left waiting for another fails the test after a limit instead of hanging it."""
import os
import socket
import time
from datetime import timedelta

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int, timeout_s: float = 120) -> None:
    """In a spawned rank: the environment and the process group a launcher gives a worker."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def run_ranks(fn, args: tuple, nprocs: int = 2, limit_s: float = 300) -> None:
    """`fn(rank, port, *args)` on `nprocs` spawned ranks, all to their end within `limit_s`."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(free_port(), *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {nprocs} ranks did not end within {limit_s} s (a rank waits for another)")

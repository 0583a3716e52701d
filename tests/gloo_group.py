"""A gloo process group for the multi-process tests (test_ddp.py, test_fsdp.py): each spawned rank
runs its body inside ``gloo_group(rank, world, port)``; the parent picks the port."""
import contextlib
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
        # every rank leaves together: a rank tearing gloo down while another still talks to it can
        # abort the other ("terminate called without an active exception", seen in CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()

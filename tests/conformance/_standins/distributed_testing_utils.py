"""hf_moe_routers stand-in for transformers' ``tests/distributed_testing_utils.py``.

The transformers source distribution ships the distributed test mixins but not this helper module, so
the conformance harness installs this file under that name next to them. It is written for this repo:
CPU ranks only, the ``gloo`` backend, processes started with ``torch.multiprocessing`` (spawn).

What the mixins call:
    run_distributed(world_size)(func)(*args)   -> func(rank, *args) on every rank, inside a process group
    _start_rank_processes(func, args, nprocs)  -> func(rank, *args) on every rank (the FSDP mixin makes
                                                  its own process group from a TCPStore)
    _get_distributed_backend / _get_distributed_device_type / _get_rank_device / _set_rank_device

Every rank process sets its own torch thread count (``HF_MOE_ROUTERS_RANK_THREADS``, default 1) so two
ranks on a 2-core machine do not oversubscribe it.
"""

from __future__ import annotations

import functools
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _get_distributed_device_type() -> str:
    return "cpu"


def _get_distributed_backend() -> str:
    return "gloo"


def _get_rank_device(rank: int) -> torch.device:
    return torch.device("cpu")


def _set_rank_device(rank: int) -> None:
    """Nothing to pin on CPU ranks."""


def _rank_threads() -> int:
    return int(os.environ.get("HF_MOE_ROUTERS_RANK_THREADS", "1"))


def _rank_entry(rank: int, func, args: tuple, kwargs: dict) -> None:
    torch.set_num_threads(_rank_threads())
    func(rank, *args, **kwargs)


def _start_rank_processes(func, args: tuple = (), nprocs: int = 2) -> None:
    """Run ``func(rank, *args)`` in ``nprocs`` spawned processes; re-raise the first rank failure."""
    os.environ["OMP_NUM_THREADS"] = str(_rank_threads())  # inherited by the spawned ranks
    mp.start_processes(
        _rank_entry, args=(func, tuple(args), {}), nprocs=nprocs, join=True, start_method="spawn"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _in_process_group(rank: int, world_size: int, port: int, func, args: tuple, kwargs: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    dist.init_process_group(backend=_get_distributed_backend(), rank=rank, world_size=world_size)
    try:
        func(rank, *args, **kwargs)
    finally:
        dist.destroy_process_group()


def run_distributed(world_size: int = 2):
    """Decorator factory: ``run_distributed(n)(func)(*args)`` runs ``func(rank, *args)`` on ``n`` ranks."""

    def decorator(func):
        @functools.wraps(func)
        def runner(*args, **kwargs):
            _start_rank_processes(
                _in_process_group, args=(world_size, _free_port(), func, args, kwargs), nprocs=world_size
            )

        return runner

    return decorator

"""Process-group teardown for the training scripts.

A script run by ``accelerate launch``/``torchrun`` that ends without ``destroy_process_group`` can
abort at interpreter exit (``terminate called without an active exception``, SIGABRT): gloo's worker
threads still hold tensors while Python is being torn down. The Trainer leaves the group alive (a
caller may keep evaluating), so every script entry point ends it here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch.distributed as dist

P = ParamSpec("P")
R = TypeVar("R")


def end_distributed(*, synchronize: bool = True) -> None:
    """Destroy the default process group if one is up; wait for every rank first when ``synchronize``."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()


def ends_distributed(main: Callable[P, R]) -> Callable[P, R]:
    """Decorate a script's ``main`` so that the process group is destroyed when it returns or raises.

    On an exception the other ranks may never reach a barrier, so the group is destroyed without one.
    """

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            result = main(*args, **kwargs)
        except BaseException:
            end_distributed(synchronize=False)
            raise
        end_distributed()
        return result

    return wrapper

"""Which implementation of the dispatch ops runs: Triton kernels or the pure-torch path.

Triton is optional. This module never imports it at package import time, for two reasons:
the package must work where Triton is not installed, and the Triton interpreter
(``TRITON_INTERPRET=1``, used by the CPU tests) is chosen when a kernel is *decorated*, so the
kernels module must be imported only after that variable has been set.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from types import ModuleType
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Backend = Literal["auto", "triton", "torch"]
_BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
BACKEND_ENV_VAR = "HF_MOE_ROUTERS_KERNEL_BACKEND"

_backend_override: str | None = None
_said_once: set[str] = set()


def _log_once(key: str, level: int, message: str) -> None:
    # Skipped while torch.compile traces: a logging call would break the graph.
    if key not in _said_once and not torch.compiler.is_compiling():
        _said_once.add(key)
        logger.log(level, message)


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package is installed (it is not imported by this check).

    Cached: the routers ask on every forward, and an installation does not change in a process.
    """
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton kernels run in the numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def set_kernel_backend(backend: Backend | None) -> None:
    """Force the dispatch backend process-wide (``None`` restores ``auto`` / the env variable).

    ``"auto"`` uses Triton for CUDA tensors when Triton is installed and the torch path otherwise.
    ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` (tests only: the interpreter is slow).
    """
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {_BACKENDS}")
    global _backend_override
    _backend_override = backend


def get_kernel_backend() -> str:
    """The requested backend: the override, else ``$HF_MOE_ROUTERS_KERNEL_BACKEND``, else ``auto``."""
    if _backend_override is not None:
        return _backend_override
    requested = os.environ.get(BACKEND_ENV_VAR, "auto").lower()
    if requested not in _BACKENDS:
        raise ValueError(f"${BACKEND_ENV_VAR}={requested!r}; expected one of {_BACKENDS}")
    return requested


def resolve_backend(device: torch.device, backend: Backend | None = None) -> str:
    """Turn a requested backend into ``"triton"`` or ``"torch"`` for tensors on ``device``.

    Falling back from Triton is logged once per reason, so that a user who expected the kernel
    learns that the torch path is running instead.
    """
    requested = backend if backend is not None else get_kernel_backend()
    if requested not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {requested!r}; expected one of {_BACKENDS}")
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if not triton_available():
            raise RuntimeError(
                "kernel backend 'triton' requested but Triton is not installed (pip install triton)"
            )
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"kernel backend 'triton' requested for {device.type} tensors: Triton needs CUDA tensors, "
                "or TRITON_INTERPRET=1 set before the first kernel use (slow; meant for tests)"
            )
        return "triton"
    # auto
    if device.type == "cuda":
        if triton_available():
            return "triton"
        _log_once(
            "no-triton",
            logging.WARNING,
            "hf_moe_routers: Triton is not installed, so the MoE dispatch falls back to the pure-torch path "
            "on CUDA (slower). Install it with `pip install triton`.",
        )
        return "torch"
    _log_once(
        f"torch-on-{device.type}",
        logging.INFO,
        f"hf_moe_routers: {device.type} tensors use the pure-torch MoE dispatch path (the Triton kernels are CUDA-only).",
    )
    return "torch"


def load_triton_ops() -> ModuleType:
    """Import the Triton kernels module on first use (see the module docstring for why late).

    A plain import statement, not ``importlib``: torch.compile can trace an import statement
    (it refuses ``importlib.import_module``), so a compiled model may make the first call.
    """
    from hf_moe_routers.kernels import triton_ops

    return triton_ops

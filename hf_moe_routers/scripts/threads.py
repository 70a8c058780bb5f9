"""How many CPU threads torch gets in a training script: the CPUs this process may really use.

``os.cpu_count()`` counts the machine's CPUs, not this process's: a CPU affinity mask (``taskset``,
a batch scheduler) or a cgroup v2 CPU quota (a container's ``--cpus``) can give the process fewer.
torch's default uses every CPU it sees, and oversubscribed OpenMP threads waste their time slices
spinning at barriers (on a 2-core machine shared with another job, 30 training steps took 185 s at
the default instead of 26 s). :func:`configure_torch_threads` picks the count from what is really
available (an explicit ``OMP_NUM_THREADS`` or a ``--threads``-style request wins), applies it and
says so in one line.

Waiting OpenMP threads also spin when no other thread of ours is oversubscribed; that is set by
``OMP_WAIT_POLICY``, which GNU libgomp reads only when torch is first imported. The package root
sets it to ``PASSIVE`` before importing torch (see ``hf_moe_routers/__init__.py``), not this module:
by the time a script runs, torch is loaded and a new value would be ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

__all__ = ["ThreadChoice", "available_cpus", "choose_threads", "configure_torch_threads"]

#: Where cgroup v2 is mounted, and the file naming this process's cgroup in it.
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


@dataclasses.dataclass(frozen=True)
class ThreadChoice:
    """The thread count chosen for torch, the CPUs available to the process and why."""

    threads: int
    available: int
    #: what decided ``threads``: ``"requested"``, ``"OMP_NUM_THREADS"`` or ``"available CPUs"``
    source: str
    #: what bounded ``available``: ``"affinity"``, ``"cgroup cpu.max"`` or ``"os.cpu_count"``
    limited_by: str

    def describe(self) -> str:
        """The one log line, e.g. ``torch threads: 2 (2 CPUs available to this process)``."""
        cpus = f"{self.available} CPU{'s' if self.available != 1 else ''} available to this process"
        if self.limited_by == "cgroup cpu.max":
            cpus += " by its cgroup CPU quota"
        if self.source == "available CPUs":
            return f"torch threads: {self.threads} ({cpus})"
        how = "OMP_NUM_THREADS" if self.source == "OMP_NUM_THREADS" else "as requested"
        return f"torch threads: {self.threads} ({how}; {cpus})"


def _cgroup_quota_cpus(cgroup_root: Path, proc_self_cgroup: Path) -> int | None:
    """CPUs allowed by the tightest cgroup v2 ``cpu.max`` quota on this process's cgroup path.

    ``cpu.max`` holds ``"<quota> <period>"`` (or ``"max <period>"`` for no limit); a quota of 1.5
    periods lets the process run 1.5 CPUs' worth, which keeps 2 threads busy part of the time, so
    round up. Every ancestor cgroup limits too, hence the walk to the root. ``None``: no quota, or
    no cgroup v2 (v1 and other systems have nothing to read here).
    """
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    # The v2 entry is "0::/path"; inside a container's cgroup namespace it is usually "0::/".
    relative = next((line[3:] for line in lines if line.startswith("0::")), "/").strip().lstrip("/")
    directory = cgroup_root / relative if relative else cgroup_root
    best: int | None = None
    while True:
        try:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            if quota != "max" and int(period) > 0:
                cpus = max(1, math.ceil(int(quota) / int(period)))
                best = cpus if best is None else min(best, cpus)
        except (OSError, ValueError):
            pass  # no cpu.max at this level (the root has none) or an unreadable one: no limit here
        if directory == cgroup_root or cgroup_root not in directory.parents:
            return best
        directory = directory.parent


def available_cpus(
    *,
    affinity: Callable[[], set[int]] | None = None,
    cpu_count: Callable[[], int | None] = os.cpu_count,
    cgroup_root: Path = CGROUP_ROOT,
    proc_self_cgroup: Path = PROC_SELF_CGROUP,
) -> tuple[int, str]:
    """``(number of CPUs this process may use, what limited it)``.

    The CPUs in the affinity mask (``os.sched_getaffinity`` where the platform has it, else
    ``cpu_count``), lowered to the cgroup v2 ``cpu.max`` quota when one is set. The keyword
    arguments exist for tests (a faked mask, cgroup folder or count).
    """
    if affinity is None and hasattr(os, "sched_getaffinity"):
        affinity = lambda: os.sched_getaffinity(0)  # noqa: E731
    cpus, limited_by = 0, "os.cpu_count"
    if affinity is not None:
        try:
            cpus, limited_by = len(affinity()), "affinity"
        except OSError:
            cpus = 0
    if cpus <= 0:
        cpus, limited_by = cpu_count() or 1, "os.cpu_count"
    quota = _cgroup_quota_cpus(cgroup_root, proc_self_cgroup)
    if quota is not None and quota < cpus:
        cpus, limited_by = quota, "cgroup cpu.max"
    return cpus, limited_by


def _omp_num_threads(environ: Mapping[str, str]) -> int | None:
    """``OMP_NUM_THREADS`` as a positive count: its first entry (it may list one count per nesting
    level, ``"2,1"``); ``None`` when unset or not a positive integer (then libgomp ignores it too)."""
    value = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        threads = int(value)
    except ValueError:
        return None
    return threads if threads > 0 else None


def choose_threads(
    requested: int | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    **available_kwargs: object,
) -> ThreadChoice:
    """The thread count torch should use: ``requested`` (a ``--threads``-style option, positive)
    if given, else an explicit ``OMP_NUM_THREADS``, else every CPU available to the process
    (:func:`available_cpus`, which takes ``available_kwargs``). Explicit counts are honoured even
    above the available CPUs: whoever set them asked for it."""
    available, limited_by = available_cpus(**available_kwargs)  # type: ignore[arg-type]
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be a positive number; got {requested}.")
        return ThreadChoice(requested, available, "requested", limited_by)
    from_env = _omp_num_threads(environ)
    if from_env is not None:
        return ThreadChoice(from_env, available, "OMP_NUM_THREADS", limited_by)
    return ThreadChoice(available, available, "available CPUs", limited_by)


def configure_torch_threads(
    requested: int | None = None,
    *,
    log: Callable[[str], object] | None = print,
    environ: Mapping[str, str] = os.environ,
    **available_kwargs: object,
) -> ThreadChoice:
    """Choose torch's thread count (:func:`choose_threads`), apply it, and log it in one line.

    ``torch.set_num_threads`` sets the intra-op (OpenMP and MKL) pool, the one that runs the
    kernels. ``torch.set_num_interop_threads`` can be called once per process, before any
    inter-op parallel work; later calls raise, so it is only tried. Only the process of rank 0
    logs (``RANK`` unset or ``"0"``), so a distributed run prints the line once.
    """
    choice = choose_threads(requested, environ=environ, **available_kwargs)
    torch.set_num_threads(choice.threads)
    try:
        torch.set_num_interop_threads(choice.threads)
    except RuntimeError:
        pass  # already set, or parallel work already started: the inter-op pool stays as it is
    if log is not None and environ.get("RANK", "0") == "0":
        log(choice.describe())
    return choice

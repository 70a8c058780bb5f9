"""The routing metrics in the Trainer's logs: one window's report, summed over the processes.

A window (``reporting.RoutingWindow``) is packed into one flat tensor and summed over the processes
in one collective, each batch counted once (the ranks of a tensor-parallel group share a batch).
The ``router`` metrics (every ``router_costly_metrics_interval`` logs) are measured on each rank's
last capture with the whole router parameters gathered (``gathered_router_parameters``, FSDP2),
then averaged over the ranks that measured them. Logs are ``router/<metric>`` (mean over layers)
and ``router/<metric>/<layer>``; the window is also kept as a ``RoutingRecord``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..metrics.catalog import ROUTER_METRICS
from ..records import RoutingRecord
from ..reporting.collector import RouterInfo
from ..reporting.report import RoutingWindow, WindowTotals, mean_over_layers, router_metrics
from ..sharding import gathered_router_parameters

__all__ = ["ProcessSums", "WindowReport", "costly_metrics", "report_window"]


class ProcessSums:
    """Sums tensors over the processes, each batch counted once.

    The ranks of one tensor-parallel group (TP, and EP with ``ep_size == tp_size``) all run the
    same batch and hold identical sums: the total over all processes counts it ``tp_size`` times,
    so it is divided by ``ranks_per_batch()``.
    """

    def __init__(self, accelerator: Any, ranks_per_batch: Callable[[], int]):
        self.accelerator = accelerator
        self.ranks_per_batch = ranks_per_batch

    @property
    def distributed(self) -> bool:
        return self.accelerator.num_processes > 1

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the processes, on the CPU (``tensor`` itself in one process)."""
        if not self.distributed:
            return tensor
        total = self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum").cpu()
        replicas = self.ranks_per_batch()
        return total / replicas if replicas > 1 else total

    @property
    def data_parallel_replicas(self) -> int:
        """How many processes run different batches (processes / ranks sharing a batch): those
        whose gradients the data-parallel engine averages."""
        return max(1, self.accelerator.num_processes // self.ranks_per_batch())

    def exact_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of integer ``tensor`` over the processes, each batch counted once, kept on the
        accelerator's device and exact (``tensor`` itself in one process)."""
        if not self.distributed:
            return tensor
        total = self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum")
        replicas = self.ranks_per_batch()
        return torch.div(total, replicas, rounding_mode="floor") if replicas > 1 else total

    def any_data(self, window: RoutingWindow) -> bool:
        """Whether any process saw router outputs in this window (a collective on every rank, so
        that all ranks take the same branch)."""
        if not self.distributed:
            return not window.empty()
        return bool(self(window.batches_L.sum().reshape(1)).item() > 0)

    def mean_of_measured(self, values: torch.Tensor) -> torch.Tensor:
        """Per entry, the mean over the processes that measured it; NaN = not measured, inf is a value."""
        if not self.distributed:
            return values
        present = ~torch.isnan(values)
        total = self(torch.where(present, values, torch.zeros_like(values)))
        count = self(present.to(torch.float64))
        return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


@torch.no_grad()
def costly_metrics(
    model: nn.Module,
    routers: Sequence[RouterInfo],
    window: RoutingWindow,
    sums: ProcessSums,
    *,
    max_tokens: int,
    flip_epsilon: float,
    seed: int,
    drift_reference: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, list[float]]:
    """The ``router`` metrics of each router from its last captured inputs, averaged over processes.

    Under FSDP2 the routers' parameters are shards outside forward: they are gathered for the
    duration (every rank logs at the same step), so σ_max, stable rank and the Lipschitz bounds are
    those of the whole matrices, never of one rank's rows.
    """
    with gathered_router_parameters(model, [info.module for info in routers]):
        values = router_metrics(
            routers,
            window.last,
            window.last_masks,
            max_tokens=max_tokens,
            flip_epsilon=flip_epsilon,
            seed=seed,
            drift_reference=drift_reference,
        )
        values = sums.mean_of_measured(values)
    return {name: values[j].tolist() for j, name in enumerate(ROUTER_METRICS)}


@dataclasses.dataclass
class WindowReport:
    """One logged window: the log entries, its record, and its sums (this process's and all)."""

    logs: dict[str, float]
    record: RoutingRecord
    local: dict[str, Any]  # {"counts": micro-batches per layer [L], "loads": per layer [E]}
    reduced: dict[str, Any]  # the same, summed over the processes


def report_window(
    window: RoutingWindow,
    sums: ProcessSums,
    costly: Callable[[RoutingWindow], dict[str, list[float]]] | None,
    *,
    layers: list[str],
    log_per_layer: bool,
    mode: str,
    step: int,
    extra: dict[str, list[float]] | None = None,
) -> WindowReport:
    """Reduce ``window`` over the processes and turn it into log entries (``costly``: the router
    metrics, measured after the reduction, when this log includes them; ``extra``: more per-layer
    values, already reduced, such as the specialisation metrics)."""
    packed = window.pack()
    local = WindowTotals.unpack(packed, window.widths)
    local_sums = {"counts": local.batches_L.clone(), "loads": [v.clone() for v in local.loads]}
    totals = WindowTotals.unpack(sums(packed), window.widths)
    reduced_sums = {"counts": totals.batches_L.clone(), "loads": [v.clone() for v in totals.loads]}

    per_layer = totals.per_layer()
    if costly is not None:
        per_layer.update(costly(window))
    per_layer.update(extra or {})
    logs: dict[str, float] = {}
    for name, values in per_layer.items():
        logs[f"router/{name}"] = mean_over_layers(values)
        if log_per_layer:
            for layer, value in zip(layers, values):
                logs[f"router/{name}/{layer}"] = value
    if mode == "train":
        logs["router/reg_loss"] = totals.reg_loss()
    fractions = [fraction.tolist() for fraction in totals.load_fractions()]
    record = RoutingRecord(step=step, split=mode, layers=list(layers), load=fractions, metrics=per_layer)
    return WindowReport(logs, record, local_sums, reduced_sums)

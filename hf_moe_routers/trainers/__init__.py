"""Training: ``MoERouterTrainer``, its arguments and its plots.

The names load on first use (PEP 562): importing ``trainers.arguments`` (what a script's
``--help`` needs) must not pull in the Trainer, which imports ``datasets``, pandas and pyarrow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..reporting.plots import plot_load_heatmap, plot_router_curves, save_routing_plots
    from ..sharding import gathered_router_parameters
    from .arguments import MoERouterTrainingArguments
    from .plots import RoutingPlotCallback
    from .trainer import MoERouterTrainer

#: Each public name and the module (relative to this package) that defines it.
_SOURCES = {
    "MoERouterTrainer": ".trainer",
    "MoERouterTrainingArguments": ".arguments",
    "RoutingPlotCallback": ".plots",
    "gathered_router_parameters": "..sharding",
    "plot_load_heatmap": "..reporting.plots",
    "plot_router_curves": "..reporting.plots",
    "save_routing_plots": "..reporting.plots",
}

__all__ = [
    "MoERouterTrainer",
    "MoERouterTrainingArguments",
    "RoutingPlotCallback",
    "gathered_router_parameters",
    "plot_load_heatmap",
    "plot_router_curves",
    "save_routing_plots",
]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})

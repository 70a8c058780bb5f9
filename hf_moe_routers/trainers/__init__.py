"""Training: ``MoERouterTrainer``, its arguments and its plots."""

from ..reporting.plots import plot_load_heatmap, plot_router_curves, save_routing_plots
from ..sharding import gathered_router_parameters
from .arguments import MoERouterTrainingArguments
from .plots import RoutingPlotCallback
from .trainer import MoERouterTrainer

__all__ = [
    "MoERouterTrainer",
    "MoERouterTrainingArguments",
    "RoutingPlotCallback",
    "gathered_router_parameters",
    "plot_load_heatmap",
    "plot_router_curves",
    "save_routing_plots",
]

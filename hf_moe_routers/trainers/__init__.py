"""Training: ``MoERouterTrainer``, its arguments, the routing history and plots."""

from ..sharding import gathered_router_parameters
from .arguments import MoERouterTrainingArguments
from .collector import RouterCollector, RouterInfo, find_routers
from .history import RoutingHistory, RoutingRecord
from .plots import RoutingPlotCallback, plot_load_heatmap, plot_router_curves, save_routing_plots
from .trainer import MoERouterTrainer

__all__ = [
    "MoERouterTrainer",
    "MoERouterTrainingArguments",
    "RouterCollector",
    "RouterInfo",
    "RoutingHistory",
    "RoutingPlotCallback",
    "RoutingRecord",
    "find_routers",
    "gathered_router_parameters",
    "plot_load_heatmap",
    "plot_router_curves",
    "save_routing_plots",
]

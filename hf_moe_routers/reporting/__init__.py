"""Routing reports: what a model's routers did on some tokens, measured one way everywhere.

``RouterCollector`` captures each router's logits and choices during a forward; ``report`` turns
captures into the per-layer values of the canonical metric list (``hf_moe_routers.metrics.catalog``).
The Trainer, the ``inspect`` command, the model cards and the experiments all read routing through it.
"""

from ..metrics.catalog import METRIC_DESCRIPTIONS, ROUTING_METRICS, MetricSpec
from .collector import RouterCapture, RouterCollector, RouterInfo, find_routers, routing_scoring
from .report import (
    ReportedRouter,
    RoutingWindow,
    WindowTotals,
    add_specialisation,
    balance_probs,
    batch_metrics,
    coactivation_pairs,
    domain_report,
    mean_over_layers,
    report_captures,
    router_metrics,
    specialisation_report,
    specialisation_window,
)

__all__ = [
    "METRIC_DESCRIPTIONS",
    "ROUTING_METRICS",
    "MetricSpec",
    "ReportedRouter",
    "RouterCapture",
    "RouterCollector",
    "RouterInfo",
    "RoutingWindow",
    "WindowTotals",
    "add_specialisation",
    "balance_probs",
    "batch_metrics",
    "coactivation_pairs",
    "domain_report",
    "find_routers",
    "mean_over_layers",
    "report_captures",
    "router_metrics",
    "routing_scoring",
    "specialisation_report",
    "specialisation_window",
]

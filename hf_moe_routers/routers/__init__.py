"""Routing methods: one file per method, each a config dataclass plus a scorer module."""

from __future__ import annotations

from .base import RouterConfig, RouterScorer, float32_routing, spectral_norm_exact, stable_rank
from .cosine import CosineRouterConfig, CosineScorer
from .l2r import L2RConfig, L2RScorer
from .linear import LinearRouterConfig, LinearScorer
from .sr_moe import SRMoEConfig, SRMoEScorer

SCORERS: dict[str, type[RouterScorer]] = {
    LinearRouterConfig.router_type: LinearScorer,
    SRMoEConfig.router_type: SRMoEScorer,
    L2RConfig.router_type: L2RScorer,
    CosineRouterConfig.router_type: CosineScorer,
}


def build_scorer(
    config: RouterConfig | dict, hidden_size: int, num_experts: int, *, bias: bool = False
) -> RouterScorer:
    """Build the scorer module for ``config`` (a router config or its dict form)."""
    config = RouterConfig.from_dict(config)
    return SCORERS[config.router_type](config, hidden_size, num_experts, bias=bias)


__all__ = [
    "SCORERS",
    "CosineRouterConfig",
    "CosineScorer",
    "L2RConfig",
    "L2RScorer",
    "LinearRouterConfig",
    "LinearScorer",
    "RouterConfig",
    "RouterScorer",
    "SRMoEConfig",
    "SRMoEScorer",
    "build_scorer",
    "float32_routing",
    "spectral_norm_exact",
    "stable_rank",
]

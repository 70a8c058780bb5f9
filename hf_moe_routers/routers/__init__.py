"""Routing methods: one file per method, each a config dataclass plus a scorer module.

Importing a method's file registers it: its scorer class names its config class
(``config_class``), and ``RouterScorer.__init_subclass__`` files the pair under the config's
``router_type`` in the one registry, ``SCORERS`` (``routers/base.py``). Adding a method is adding a
file here and importing it below; nothing else lists the types.
"""

from __future__ import annotations

from .base import SCORERS, RouterConfig, RouterScorer
from .cosine import CosineRouterConfig, CosineScorer
from .l2r import L2RConfig, L2RScorer
from .linear import LinearRouterConfig, LinearScorer
from .sr_moe import SRMoEConfig, SRMoEScorer


def build_scorer(
    config: RouterConfig | dict, hidden_size: int, num_experts: int, *, bias: bool = False
) -> RouterScorer:
    """Build the scorer module for ``config`` (a router config or its dict form).

    The scorer maps router inputs ``x_TH [T, hidden_size]`` to logits ``[T, num_experts]``.
    """
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
]

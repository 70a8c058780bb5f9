"""Experiments that test the SR-MoE and L2R papers' claims on data available offline.

One command per table (each ≤ 30 min on a 2-core CPU with the defaults; ``--quick`` runs one tiny
cell for CI), writing JSON, Markdown and PNG files to ``benchmarks/results/``:

    python -m hf_moe_routers.experiments sensitivity   # protocol sweep at depth 8 (validation split)
    python -m hf_moe_routers.experiments interference  # experiment A: interference vs depth
    python -m hf_moe_routers.experiments lm            # experiment B: LM + vision routing quality

Needs ``scikit-learn`` (digits) and ``mnist1d`` besides the package's own dependencies.
"""

from __future__ import annotations

from .interference import DEFAULT_BUDGET, DEFAULT_SETTINGS, STRONG_BUDGET, InterferenceSpec, run_interference
from .lm import LMSpec, run_lm
from .sensitivity import SensitivitySpec, run_sensitivity
from .vision import ROUTERS, VisionSettings

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_SETTINGS",
    "ROUTERS",
    "STRONG_BUDGET",
    "InterferenceSpec",
    "LMSpec",
    "SensitivitySpec",
    "VisionSettings",
    "run_interference",
    "run_lm",
    "run_sensitivity",
]

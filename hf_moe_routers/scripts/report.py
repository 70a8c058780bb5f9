"""What a training script reports at the end of a run: the summary table and ``routing_metrics.json``.

Pure Python on purpose (no torch, transformers or Trainer import at module level): the CLI takes
its metric-name lists from here without paying for the training stack it may never use.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..metrics.catalog import HEADLINE_METRICS

if TYPE_CHECKING:
    from ..trainers.trainer import MoERouterTrainer

__all__ = [
    "SUMMARY_METRICS",
    "finite_for_json",
    "summary_table",
    "write_run_report",
]

#: The ``eval_router/<name>`` rows of the summary table, in order; a metric not logged is left out.
SUMMARY_METRICS: tuple[str, ...] = (
    *HEADLINE_METRICS,
    "flip_rate",
    "spectral_norm",
    "stable_rank",
    "lipschitz_bound",
    "query_concentration",
    "expert_concentration",
    "drift",
    "aux_loss",
    "z_loss",
)


def summary_table(metrics: dict[str, float], router: str) -> str:
    """The final report: validation perplexity and the mean routing metrics."""
    rows = [
        ("router", router),
        ("validation loss", f"{metrics['eval_loss']:.4f}"),
        ("validation perplexity", f"{metrics['eval_perplexity']:.2f}"),
    ]
    for key in SUMMARY_METRICS:
        value = metrics.get(f"eval_router/{key}")
        if value is not None:
            rows.append((f"router/{key}", f"{value:.4g}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", "-" * (width + 12)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def finite_for_json(metrics: dict[str, float]) -> dict[str, Any]:
    """JSON has no inf/NaN: write them as strings."""
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}


def write_run_report(trainer: MoERouterTrainer, metrics: dict[str, float], router_type: str) -> bool:
    """On the main process: write ``routing_metrics.json`` and ``routing_history.json`` to
    ``output_dir`` and print the summary table.

    Returns whether this process is the main one (the one that wrote and printed), so the caller
    prints its closing line once.
    """
    if not trainer.is_world_process_zero():
        return False
    output = Path(trainer.args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "routing_metrics.json").write_text(
        json.dumps(finite_for_json(metrics), indent=2, sort_keys=True)
    )
    trainer.routing_history.save(output / "routing_history.json")
    print(summary_table(metrics, router_type))
    return True

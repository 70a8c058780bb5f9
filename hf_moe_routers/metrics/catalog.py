"""The canonical list of routing metrics: names, meanings, how each is measured, in report order.

Everything that reports routing (the Trainer's logs, ``hf-moe-routers inspect``, the model card's
table, the experiments) names its metrics from this list, so one name means one quantity
everywhere. This module is pure data (no torch): ``hf_moe_routers.reporting.report`` computes the
values, the cards read the descriptions and the order.

Each metric belongs to one *group*, which says how a value over several micro-batches is formed:

- ``batch``: computed on each micro-batch's real tokens, then averaged over the micro-batches;
- ``load``: computed once from the expert counts summed over all micro-batches (a window statistic:
  an expert idle in one small batch is not dead);
- ``router``: computed once per report from the router's parameters and, where the metric says so,
  from a sample of the router inputs of the last micro-batch;
- ``penalty``: the routers' weighted parameter penalties, averaged over the training micro-batches;
- ``specialisation``: computed once from token-level counts summed over all micro-batches (a
  :class:`~hf_moe_routers.metrics.SpecialisationAccumulator`: co-activations, (token id, expert)
  and (domain, expert) slot counts, top-k overlaps with a reference checkpoint's routing on the same
  tokens); each needs its own inputs (token ids, domains, a reference) and is absent without them.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "BATCH_METRICS",
    "HEADLINE_METRICS",
    "LOAD_METRICS",
    "METRIC_DESCRIPTIONS",
    "METRIC_GROUPS",
    "ROUTER_METRICS",
    "ROUTING_METRICS",
    "SPECIALISATION_METRICS",
    "MetricSpec",
    "metric_names",
]


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One routing metric: its log name, what it means, and how a report forms its value."""

    name: str
    description: str
    group: str  # "batch", "load", "router", "penalty" or "specialisation" (see the module docstring)
    needs_inputs: bool = False  # a router metric measured on router inputs (NaN when none were seen)


#: Every routing metric, in the order tables show them.
ROUTING_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("load_entropy", "entropy of the expert load over log E (1 = balanced)", "load"),
    MetricSpec("load_cv", "coefficient of variation of the expert load (0 = balanced)", "load"),
    MetricSpec("max_load_ratio", "E × the busiest expert's load share (1 = balanced)", "load"),
    MetricSpec("dead_experts", "experts that received no token", "load"),
    MetricSpec("token_entropy", "mean entropy of a token's routing distribution over log E", "batch"),
    MetricSpec("top1_prob", "mean probability of a token's first expert", "batch"),
    MetricSpec("kth_margin", "mean logit gap between the k-th and (k+1)-th expert", "batch"),
    MetricSpec("spectral_norm", "largest singular value of the routing matrix", "router"),
    MetricSpec("stable_rank", "‖W‖_F² / ‖W‖₂² of the routing matrix", "router"),
    MetricSpec("lipschitz_bound", "largest per-token bound of the logits' Jacobian norm", "router"),
    MetricSpec(
        "lipschitz_bound_global", "global Lipschitz constant of the logits (∞ where none exists)", "router"
    ),
    MetricSpec(
        "flip_rate",
        "share of tokens whose top-k changes under a small input perturbation",
        "router",
        needs_inputs=True,
    ),
    MetricSpec("query_concentration", "mean pairwise cosine of router queries", "router", needs_inputs=True),
    MetricSpec("expert_concentration", "mean pairwise cosine of expert rows or anchors", "router"),
    MetricSpec("drift", "top-k agreement with the first logged routing", "router", needs_inputs=True),
    MetricSpec(
        "router_saturation",
        "mean share of a token's top-k experts that a reference checkpoint also picks (1 = same routing)",
        "specialisation",
    ),
    MetricSpec(
        "coactivation_top_partner",
        "mean over experts of the largest P(b | a), the share of a's tokens also routed to its "
        "most frequent partner ((K−1)/(E−1) when uniform)",
        "specialisation",
    ),
    MetricSpec(
        "vocab_specialisation",
        "occurrence-weighted share of a token id's occurrences routed to its most frequent expert "
        "(top-k slots, ids seen ≥ min_count times)",
        "specialisation",
    ),
    MetricSpec(
        "token_expert_mi",
        "mutual information I(token id; expert) of the top-k slots in bits (Miller–Madow corrected)",
        "specialisation",
    ),
    MetricSpec(
        "domain_tv",
        "token-weighted mean total-variation distance of each domain's expert load to the overall load",
        "specialisation",
    ),
    MetricSpec(
        "domain_kl",
        "token-weighted mean KL(domain load ‖ overall load) in nats, = I(domain; expert)",
        "specialisation",
    ),
    MetricSpec("aux_loss", "load-balancing loss E · Σ f_e P_e", "batch"),
    MetricSpec("z_loss", "router z-loss (mean squared logsumexp)", "batch"),
    MetricSpec("reg_loss", "router parameter penalties (SR-MoE terms)", "penalty"),
)


#: The groups, as the module docstring describes them.
METRIC_GROUPS: tuple[str, ...] = ("batch", "load", "router", "penalty", "specialisation")


def metric_names(group: str) -> tuple[str, ...]:
    """The names of one group's metrics, in canonical order."""
    if group not in METRIC_GROUPS:
        raise ValueError(f"group must be one of {', '.join(map(repr, METRIC_GROUPS))}; got {group!r}.")
    return tuple(spec.name for spec in ROUTING_METRICS if spec.group == group)


#: ``name -> description``, in canonical order (the model card's table and legend).
METRIC_DESCRIPTIONS: dict[str, str] = {spec.name: spec.description for spec in ROUTING_METRICS}
#: Per-micro-batch metrics, averaged over a window.
BATCH_METRICS: tuple[str, ...] = metric_names("batch")
#: Window statistics of the summed expert counts.
LOAD_METRICS: tuple[str, ...] = metric_names("load")
#: Parameter and input-sample metrics (the Trainer's "costly" metrics).
ROUTER_METRICS: tuple[str, ...] = metric_names("router")
#: Token-level specialisation metrics (``SpecialisationAccumulator.metrics``), each measured only
#: with its inputs (a reference routing, token ids, domains).
SPECIALISATION_METRICS: tuple[str, ...] = metric_names("specialisation")
#: What every routing summary leads with (the training summary, ``inspect``): the window's load,
#: then how sure the routers are of each token.
HEADLINE_METRICS: tuple[str, ...] = (*LOAD_METRICS, "token_entropy", "top1_prob")

"""Routing metrics and batch-dependent router losses: pure functions of router outputs and parameters.

The Trainer, the benchmarks and the experiments all use these, so a number means the same thing
everywhere. Nothing here holds global state; :class:`ExpertLoadAccumulator` is an explicit object
the caller owns.

Shape legend (suffixes on argument names):
    T tokens (batch × sequence, flattened), E experts, K top-k, H router input size,
    L MoE layers, N rows of a matrix, D row size, B batch, S sequence length.

Conventions shared by every function:
- logits may be any float dtype; the math is float32 with autocast off;
- ``[B, S, E]`` logits / ``[B, S, K]`` indices are flattened to ``[T, ·]``;
- ``mask`` is ``[T]`` bool (True = real token) or an HF ``attention_mask [B, S]`` with
  ``B · S = T`` (nonzero = real token); padding tokens never count;
- bad input raises ``ValueError`` naming the argument (shape mismatch, K > E, nothing left after
  masking, NaN logits).

Definitions (see ``docs/ROUTERS.md``, "Metrics every run reports"):
- load fraction ``f_e``: share of the real tokens' top-k slots given to expert e;
- load entropy ``H(f) / log E``; load CV ``std(f) / mean(f)`` (population std); max-load ratio
  ``E · max f``; dead experts ``#{e : f_e = 0}`` (meaningful over a window: ExpertLoadAccumulator);
- token entropy ``mean_t H(softmax(l_t)) / log E``; top-1 probability; k-th margin ``l_(k) − l_(k+1)``;
- spectral norm ``σ_max(W)``; stable rank ``‖W‖_F² / ‖W‖₂²``; angular concentration (mean pairwise
  cosine of rows); flip rate under ``x + ε‖x‖·n``; drift as top-k agreement with a reference;
- losses: balance ``E · Σ f_e P_e`` (per layer or pooled) and z-loss ``mean logsumexp(l)²``;
- specialisation (``specialisation.py``): router saturation ``mean_t |S_t ∩ R_t| / K`` against a
  reference checkpoint; co-activation ``P(b | a)``; vocabulary specialisation (share of a token id's
  occurrences at its most frequent expert); domain specialisation (TV / KL of a domain's load to the
  overall load); ``I(token id; expert)`` with an optional Miller–Madow correction. Streaming:
  :class:`SpecialisationAccumulator`; an ``evaluate``-style front end: :class:`RoutingMetrics`.

The Lipschitz bound of the logits depends on the scorer's form and is a method of each router
(``RouterScorer.lipschitz_bound``), built from :func:`spectral_norm`.

The canonical list of metric names, their meanings and how a report aggregates each is
:mod:`hf_moe_routers.metrics.catalog`; ``hf_moe_routers.reporting`` computes reports from it.
"""

from __future__ import annotations

import torch

from ..numerics import no_autocast
from ._checks import flat_indices, flat_logits
from .catalog import METRIC_DESCRIPTIONS, ROUTING_METRICS, MetricSpec
from .geometry import angular_concentration, spectral_norm, stable_rank
from .load import (
    ExpertLoadAccumulator,
    dead_experts,
    expert_counts,
    load_cv,
    load_entropy,
    load_fractions,
    load_statistics,
    max_load_ratio,
)
from .losses import (
    layerwise_load_balance_loss,
    load_balance_loss,
    pooled_load_balance_loss,
    routing_probs,
    z_loss,
)
from .specialisation import (
    DEFAULT_MIN_COUNT,
    DomainSpecialisation,
    RoutingMetrics,
    SpecialisationAccumulator,
    TokenExpertCounts,
    coactivation,
    coactivation_counts,
    coactivation_top_partner,
    domain_expert_counts,
    domain_specialisation,
    mutual_information,
    router_saturation,
    token_expert_counts,
    token_specialisation,
    vocabulary_specialisation,
)
from .stability import FlipRate, flip_rate, topk_agreement, topk_overlap
from .token import kth_margin, token_entropy, top1_prob

__all__ = [
    "DEFAULT_MIN_COUNT",
    "METRIC_DESCRIPTIONS",
    "ROUTING_METRICS",
    "DomainSpecialisation",
    "ExpertLoadAccumulator",
    "FlipRate",
    "MetricSpec",
    "RoutingMetrics",
    "SpecialisationAccumulator",
    "TokenExpertCounts",
    "angular_concentration",
    "coactivation",
    "coactivation_counts",
    "coactivation_top_partner",
    "dead_experts",
    "domain_expert_counts",
    "domain_specialisation",
    "expert_counts",
    "flip_rate",
    "kth_margin",
    "layerwise_load_balance_loss",
    "load_balance_loss",
    "load_cv",
    "load_entropy",
    "load_fractions",
    "load_statistics",
    "max_load_ratio",
    "mutual_information",
    "no_autocast",
    "pooled_load_balance_loss",
    "routing_metrics",
    "router_saturation",
    "routing_probs",
    "spectral_norm",
    "stable_rank",
    "token_entropy",
    "token_expert_counts",
    "token_specialisation",
    "top1_prob",
    "topk_agreement",
    "topk_overlap",
    "vocabulary_specialisation",
    "z_loss",
]


@torch.no_grad()
def routing_metrics(
    logits_TE: torch.Tensor,
    indices_TK: torch.Tensor,
    mask: torch.Tensor | None = None,
    top_k: int | None = None,
    *,
    probs: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The per-batch metrics of one MoE layer, as detached scalar float32 tensors.

    Args:
        logits_TE: router logits ``[T, E]`` (or ``[B, S, E]``).
        indices_TK: the experts the router selected ``[T, K]``.
        mask: ``[T]`` bool or HF ``attention_mask [B, S]``.
        top_k: K for the k-th margin; default ``indices_TK.shape[-1]``.
        probs: routing probabilities for ``aux_loss`` (see ``routing_probs``); default softmax.

    Returns:
        ``{"load_entropy", "load_cv", "max_load_ratio", "dead_experts", "token_entropy",
        "top1_prob", "kth_margin", "aux_loss", "z_loss"}``. ``kth_margin`` is ``+inf`` when K = E.
        ``dead_experts`` here is per batch; use :class:`ExpertLoadAccumulator` for a window.
    """
    flat_TE = flat_logits(logits_TE)
    idx_TK = flat_indices(indices_TK, flat_TE.shape[0])
    num_experts = flat_TE.shape[-1]
    k = idx_TK.shape[-1] if top_k is None else top_k
    if idx_TK.shape[-1] > num_experts:
        raise ValueError(f"indices_TK selects K = {idx_TK.shape[-1]} > E = {num_experts} experts.")
    load_E = load_fractions(idx_TK, num_experts, mask)
    return {
        **load_statistics(load_E),
        "token_entropy": token_entropy(flat_TE, mask),
        "top1_prob": top1_prob(flat_TE, mask),
        "kth_margin": kth_margin(flat_TE, k, mask),
        "aux_loss": load_balance_loss(flat_TE, idx_TK, mask, probs=probs),
        "z_loss": z_loss(flat_TE, mask),
    }

"""Expert specialisation: what the experts of a layer are *for*, measured from routing counts.

Five measures (after the OLMoE paper's analysis, Muennighoff et al. 2024, section 5, and standard
information theory), each a pure function of router outputs or of counts summed from them, plus a
streaming accumulator that sums those counts batch by batch and an ``evaluate``-style front end:

- **router saturation** :func:`router_saturation`: ``mean_t |S_t ∩ R_t| / K`` over real tokens,
  ``S_t`` the top-k set of a checkpoint and ``R_t`` a reference checkpoint's top-k set on the same
  token (OLMoE's definition, with the reference the final checkpoint; 1 = the same routing);
- **expert co-activation** :func:`coactivation`: per layer the ``[E, E]`` matrix
  ``P(b | a) = #{t : a ∈ S_t and b ∈ S_t} / #{t : a ∈ S_t}``, the share of the tokens routed to
  ``a`` that are also routed to ``b``. Diagonal: ``P(a | a) = 1`` for every expert that received a
  token; the row of an expert that received none is NaN. Rows do not sum to 1: an off-diagonal row
  sums to ``K − 1``. Summary :func:`coactivation_top_partner`: the mean over experts of
  ``max_{b ≠ a} P(b | a)``, ``(K − 1)/(E − 1)`` when every pair is equally likely, 1 when each expert
  always runs with the same partner, 0 for K = 1;
- **vocabulary specialisation** :func:`vocabulary_specialisation`: for each token id ``v`` the share
  of its occurrences routed to its most frequent expert, ``max_e c[v, e] / n_v``, counting top-k
  slots (an occurrence is "routed to e" when e is in its top-k, OLMoE's convention; pass
  ``top1=True`` to :func:`token_expert_counts` to count first choices only), averaged over the token
  ids seen at least ``min_count`` times, weighted by occurrences. In ``[K/E, 1]`` (top-k) or
  ``[1/E, 1]`` (top-1); an id seen once always scores 1, hence the threshold;
- **domain specialisation** :func:`domain_specialisation`: per domain ``d`` the expert load ``f_d``
  (slot shares of the domain's real tokens) against the load ``f`` of all domains together: total
  variation ``½ Σ_e |f_d,e − f_e|`` and ``KL(f_d ‖ f)`` in nats, and their means over domains
  weighted by the domains' token counts; the weighted mean KL is exactly ``I(domain; expert)``;
- **token–expert mutual information** :func:`mutual_information` of the ``[V, E]`` table of
  (token id, expert) slot counts: ``I(token; expert) = H(token) + H(expert) − H(token, expert)`` of
  the empirical joint distribution, in nats or bits, each top-k slot one sample.

Finite-sample bias of the mutual information. The plug-in estimate (empirical probabilities put into
the formula) is biased upward: each plug-in entropy is too low by about ``(m − 1) / (2N)`` nats
(``m`` occupied bins, ``N`` samples), so ``Î`` is too high by about
``(m_VE − m_V − m_E + 1) / (2N)``, ``≈ (V − 1)(E − 1) / (2N)`` when every cell is occupied. With a
large vocabulary and few tokens this dominates: a text in which every id occurs once has
``Î = H(expert)``, the largest possible value, whatever the router does. ``miller_madow=True`` adds
the Miller–Madow correction ``(m − 1) / (2N)`` to each of the three entropies (it can come out
slightly negative; it is not clipped). The slots of one token are not independent samples, so for
K > 1 the effective ``N`` is smaller than the slot count and some bias remains.

:class:`SpecialisationAccumulator` sums everything these need (co-activation counts ``[L, E, E]``,
(token id, expert) slot counts kept sparse, per-domain loads ``[L, D, E]``, top-k overlaps with a
reference routing) from per-batch ``token_ids [T]``, ``indices [T, K]``, ``mask [T]`` and optional
domain ids, so a whole evaluation is measured without holding its tokens. :class:`RoutingMetrics`
wraps it (and the expert load) in the ``add_batch`` / ``compute`` API of the ``evaluate`` library's
``EvaluationModule``, offline, without the Hub or the ``evaluate`` package.

Shapes: T tokens, K top-k, E experts, L layers, V distinct token ids, D domains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ._checks import check_index_range, check_num_experts, flat_indices, flat_logits, flat_mask
from .catalog import SPECIALISATION_METRICS
from .load import ExpertLoadAccumulator
from .stability import topk_agreement, topk_overlap
from .token import token_entropy, top1_prob

__all__ = [
    "DEFAULT_MIN_COUNT",
    "SPECIALISATION_METRIC_NAMES",
    "DomainSpecialisation",
    "RoutingMetrics",
    "SpecialisationAccumulator",
    "TokenExpertCounts",
    "coactivation",
    "coactivation_counts",
    "coactivation_top_partner",
    "domain_expert_counts",
    "domain_specialisation",
    "mutual_information",
    "router_saturation",
    "token_expert_counts",
    "token_specialisation",
    "vocabulary_specialisation",
]

#: Token ids seen fewer times than this are left out of vocabulary specialisation (an id seen once
#: always scores 1).
DEFAULT_MIN_COUNT = 5
#: What :meth:`SpecialisationAccumulator.metrics` returns: the catalog's ``specialisation`` group.
SPECIALISATION_METRIC_NAMES: tuple[str, ...] = SPECIALISATION_METRICS
_UNITS = {"nats": 1.0, "bits": 1.0 / math.log(2.0)}


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _flat_ids(ids: torch.Tensor, num_tokens: int, name: str) -> torch.Tensor:
    """``[T]`` or ``[B, S]`` integer ids -> ``[T]`` int64, checked against the token count."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(ids).__name__}.")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor; got dtype {ids.dtype}.")
    if ids.numel() != num_tokens:
        raise ValueError(
            f"{name} has {ids.numel()} elements (shape {tuple(ids.shape)}) but indices_TK has "
            f"{num_tokens} tokens; pass one id per token ([T] or [B, S] with B * S == T)."
        )
    return ids.reshape(-1).long()


def _real_weight(mask: torch.Tensor | None, num_tokens: int, device: torch.device) -> torch.Tensor:
    """``[T]`` int64: 1 for a real token, 0 for padding (a weight, so no data-dependent shapes)."""
    mask_T = flat_mask(mask, num_tokens, device)
    if mask_T is None:
        return torch.ones(num_tokens, dtype=torch.int64, device=device)
    return mask_T.to(torch.int64)


def _check_counts(counts: torch.Tensor, name: str, ndim: int) -> torch.Tensor:
    """A count table as CPU float64, refusing a wrong rank, negative or NaN entries and an empty total."""
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(counts).__name__}.")
    if counts.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got shape {tuple(counts.shape)}.")
    table = counts.detach().to("cpu", torch.float64)
    if bool((table < 0).any()) or bool(torch.isnan(table).any()):
        raise ValueError(f"{name} must hold non-negative counts; got negative or NaN entries.")
    if float(table.sum()) == 0:
        raise ValueError(f"{name} counts nothing (all zeros); the metric is undefined.")
    return table


# --------------------------------------------------------------------------------------------
# Router saturation
# --------------------------------------------------------------------------------------------


def router_saturation(
    indices_TK: torch.Tensor, reference_TK: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """OLMoE's router saturation: ``mean_t |S_t ∩ R_t| / K`` over real tokens -> scalar float32 in [0, 1].

    ``S_t`` is the top-k set this checkpoint picks for token t and ``R_t`` the set a reference
    checkpoint (OLMoE: the final one) picks for the same token in the same layer. Sets, not ordered
    lists. The same number as :func:`~hf_moe_routers.metrics.topk_agreement`.

    Args:
        indices_TK: this checkpoint's top-k ``[T, K]`` (or ``[B, S, K]``).
        reference_TK: the reference's top-k of the same tokens, same shape.
        mask: ``[T]`` bool or HF ``attention_mask [B, S]``; padding is not counted.
    """
    return topk_agreement(indices_TK, reference_TK, mask)


# --------------------------------------------------------------------------------------------
# Co-activation
# --------------------------------------------------------------------------------------------


def coactivation_counts(
    indices_TK: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None, *, validate: bool = True
) -> torch.Tensor:
    """``[E, E]`` int64: entry ``[a, b]`` counts the real tokens whose top-k holds both a and b.

    The diagonal ``[a, a]`` counts the real tokens routed to a (its load in tokens). Each row of
    ``indices_TK`` must hold K distinct experts (true of any top-k).

    Args:
        indices_TK: chosen experts ``[T, K]`` (or ``[B, S, K]``).
        num_experts: E.
        mask: ``[T]`` bool or HF ``attention_mask [B, S]``.
        validate: check that every id lies in ``[0, E)`` (the only host sync).
    """
    check_num_experts(num_experts)
    idx_TK = flat_indices(indices_TK, None)
    if validate:
        check_index_range(idx_TK, num_experts)
    num_tokens, k = idx_TK.shape
    weight_T = _real_weight(mask, num_tokens, idx_TK.device)
    # Every ordered pair of slots (i, j) of a token, i == j included: K² keys a·E + b per token.
    keys_TKK = idx_TK.unsqueeze(-1) * num_experts + idx_TK.unsqueeze(-2)
    weight_TKK = weight_T.view(-1, 1, 1).expand(num_tokens, k, k)
    counts = torch.zeros(num_experts * num_experts, dtype=torch.int64, device=idx_TK.device)
    counts.scatter_add_(0, keys_TKK.reshape(-1), weight_TKK.reshape(-1))
    return counts.view(num_experts, num_experts)


def coactivation(counts_EE: torch.Tensor) -> torch.Tensor:
    """``P(b | a)`` from co-activation counts ``[..., E, E]`` -> float32 ``[..., E, E]``.

    Row a is ``counts[a, :] / counts[a, a]``: of the tokens routed to a, the share also routed to b.
    The diagonal is 1 for an expert that received a token; the whole row of an expert that received
    none is NaN. Off the diagonal a row sums to ``K − 1``.
    """
    if not isinstance(counts_EE, torch.Tensor):
        raise TypeError(f"counts_EE must be a torch.Tensor; got {type(counts_EE).__name__}.")
    if counts_EE.ndim < 2 or counts_EE.shape[-1] != counts_EE.shape[-2]:
        raise ValueError(f"counts_EE must have shape [..., E, E]; got {tuple(counts_EE.shape)}.")
    table = counts_EE.detach().to("cpu", torch.float64)
    if bool((table < 0).any()):
        raise ValueError("counts_EE must hold non-negative counts.")
    diagonal = table.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    probs = table / diagonal  # 0/0 = NaN for an expert that received no token
    return probs.to(counts_EE.device, torch.float32)


def coactivation_top_partner(probs_EE: torch.Tensor) -> torch.Tensor:
    """Mean over experts a (that received a token) of ``max_{b ≠ a} P(b | a)``: ``[..., E, E]`` -> ``[...]``.

    ``(K − 1)/(E − 1)`` when every pair of experts is equally likely, 1 when each expert always runs
    with one fixed partner, 0 for top-1 routing. NaN when no expert received a token.
    """
    if probs_EE.ndim < 2 or probs_EE.shape[-1] != probs_EE.shape[-2] or probs_EE.shape[-1] < 2:
        raise ValueError(f"probs_EE must have shape [..., E, E] with E >= 2; got {tuple(probs_EE.shape)}.")
    probs = probs_EE.detach().to("cpu", torch.float64)
    num_experts = probs.shape[-1]
    eye = torch.eye(num_experts, dtype=torch.bool)
    partner = probs.masked_fill(eye, -math.inf).amax(-1)  # [..., E]; NaN rows stay NaN
    live = ~torch.isnan(partner)
    mean = torch.where(live, partner, 0.0).sum(-1) / live.sum(-1)
    return mean.to(probs_EE.device, torch.float32)


# --------------------------------------------------------------------------------------------
# Token ids and experts
# --------------------------------------------------------------------------------------------


class TokenExpertCounts(NamedTuple):
    """(token id, expert) slot counts of the ids that occurred: row ``i`` is ``token_ids_V[i]``."""

    token_ids_V: torch.Tensor  # [V] int64, sorted distinct ids that occurred (as real tokens)
    counts_VE: torch.Tensor  # [V, E] int64, slots of id v given to expert e


def _pair_keys(
    token_ids: torch.Tensor,
    indices_TK: torch.Tensor,
    num_experts: int,
    mask: torch.Tensor | None,
    top1: bool,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct keys ``v·E + e`` of the real tokens' slots and their counts, both ``[P]`` int64."""
    idx_TK = flat_indices(indices_TK, None)
    if validate:
        check_index_range(idx_TK, num_experts)
    ids_T = _flat_ids(token_ids, idx_TK.shape[0], "token_ids").to(idx_TK.device)
    if validate and ids_T.numel() and int(ids_T.min()) < 0:
        raise ValueError(f"token_ids must be non-negative ids; got {int(ids_T.min())}.")
    if top1:
        idx_TK = idx_TK[:, :1]
    weight_TK = _real_weight(mask, idx_TK.shape[0], idx_TK.device).unsqueeze(-1).expand(idx_TK.shape)
    keys = (ids_T.unsqueeze(-1) * num_experts + idx_TK).reshape(-1)
    return _consolidate(keys, weight_TK.reshape(-1))


def _consolidate(keys: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the counts of equal keys; drop keys whose count is 0 (padding). Sorted keys out."""
    if keys.numel() == 0:
        return keys, counts
    unique, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(unique.shape[0], dtype=torch.int64, device=keys.device).scatter_add_(
        0, inverse, counts.to(torch.int64)
    )
    kept = summed > 0
    return unique[kept], summed[kept]


def _table_of(keys: torch.Tensor, counts: torch.Tensor, num_experts: int) -> TokenExpertCounts:
    """Sparse ``v·E + e`` keys and counts -> the dense table of the ids that occur."""
    tokens = keys // num_experts
    token_ids_V, row = torch.unique(tokens, return_inverse=True)
    table = torch.zeros(token_ids_V.shape[0], num_experts, dtype=torch.int64, device=keys.device)
    table.index_put_((row, keys % num_experts), counts, accumulate=True)
    return TokenExpertCounts(token_ids_V, table)


def token_expert_counts(
    token_ids: torch.Tensor,
    indices_TK: torch.Tensor,
    num_experts: int,
    mask: torch.Tensor | None = None,
    *,
    top1: bool = False,
) -> TokenExpertCounts:
    """How often each token id's slots go to each expert, over the real tokens.

    Args:
        token_ids: the tokens' ids ``[T]`` (or ``[B, S]``, e.g. ``input_ids``), non-negative.
        indices_TK: chosen experts ``[T, K]`` (or ``[B, S, K]``), K distinct per token.
        num_experts: E.
        mask: ``[T]`` bool or HF ``attention_mask [B, S]``; padding is not counted.
        top1: count only the first column of ``indices_TK``, the router's first choice
            (transformers' routers return their top-k sorted by weight). Then each occurrence is
            one slot; otherwise K slots.

    Returns:
        :class:`TokenExpertCounts` ``(token_ids_V, counts_VE)`` over the ids that occur (rows sorted
        by id; no row for an id that never occurs, however large the vocabulary).
    """
    check_num_experts(num_experts)
    keys, counts = _pair_keys(token_ids, indices_TK, num_experts, mask, top1)
    return _table_of(keys, counts, num_experts)


def _occurrences(counts_VE: torch.Tensor, top_k: int) -> torch.Tensor:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1 (the slots each occurrence fills); got {top_k!r}.")
    return counts_VE.sum(-1) / top_k


def token_specialisation(counts_VE: torch.Tensor, top_k: int = 1) -> torch.Tensor:
    """Per token id, the share of its occurrences routed to its most frequent expert -> ``[V]`` float32.

    ``max_e c[v, e] / n_v`` with ``n_v = Σ_e c[v, e] / top_k`` occurrences; NaN for an id with no
    occurrence.

    Args:
        counts_VE: (token id, expert) slot counts ``[V, E]`` (:func:`token_expert_counts`).
        top_k: the slots each occurrence filled: K for a top-k table, 1 for a ``top1`` table.
    """
    table = _check_counts(counts_VE, "counts_VE", 2)
    occurrences_V = _occurrences(table, top_k)
    return (table.amax(-1) / occurrences_V).float()


def vocabulary_specialisation(
    counts_VE: torch.Tensor, top_k: int = 1, min_count: int = DEFAULT_MIN_COUNT
) -> torch.Tensor:
    """Occurrence-weighted mean of :func:`token_specialisation` over ids seen ``>= min_count`` times.

    ``Σ_v max_e c[v, e] / Σ_v n_v`` over the kept ids -> scalar float32, in ``[top_k/E, 1]``.

    Args:
        counts_VE: (token id, expert) slot counts ``[V, E]``.
        top_k: the slots each occurrence filled (K, or 1 for a ``top1`` table).
        min_count: the fewest occurrences an id needs to count (an id seen once always scores 1).

    Raises:
        ValueError: no id occurs ``min_count`` times (named ``min_count``), or a bad table.
    """
    if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
        raise ValueError(f"min_count must be an int >= 1; got {min_count!r}.")
    table = _check_counts(counts_VE, "counts_VE", 2)
    occurrences_V = _occurrences(table, top_k)
    kept = occurrences_V >= min_count
    if not bool(kept.any()):
        raise ValueError(
            f"min_count: no token id occurs at least {min_count} times "
            f"(the most frequent occurs {float(occurrences_V.max()):g} times); lower min_count or route more text."
        )
    return (table.amax(-1)[kept].sum() / occurrences_V[kept].sum()).float()


def mutual_information(
    counts_AB: torch.Tensor, *, unit: str = "nats", miller_madow: bool = False
) -> torch.Tensor:
    """``I(A; B)`` of the empirical joint distribution of a count table ``[A, B]`` -> scalar float32.

    For ``I(token id; expert)`` pass the ``[V, E]`` slot counts of :func:`token_expert_counts`:
    every slot is one sample ``(v, e)``. ``I = H(A) + H(B) − H(A, B)`` with ``0 · log 0 = 0``.

    The plug-in value is biased upward by about ``(m_AB − m_A − m_B + 1) / (2N)`` nats (``m`` the
    occupied cells/rows/columns, N the total count); ``miller_madow=True`` removes that first-order
    term by adding ``(m − 1) / (2N)`` to each entropy. See the module docstring.

    Args:
        counts_AB: non-negative counts ``[A, B]`` (any numeric dtype).
        unit: ``"nats"`` or ``"bits"``.
        miller_madow: apply the Miller–Madow correction (the result may then be slightly negative).
    """
    if unit not in _UNITS:
        raise ValueError(f"unit must be 'nats' or 'bits'; got {unit!r}.")
    table = _check_counts(counts_AB, "counts_AB", 2)
    total = table.sum()
    p_AB = table / total
    p_A, p_B = p_AB.sum(1), p_AB.sum(0)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        h = -torch.special.xlogy(p, p).sum()
        if miller_madow:
            h = h + (int((p > 0).sum()) - 1) / (2 * total)
        return h

    information = entropy(p_A) + entropy(p_B) - entropy(p_AB)
    return (information * _UNITS[unit]).float()


# --------------------------------------------------------------------------------------------
# Domains
# --------------------------------------------------------------------------------------------


def domain_expert_counts(
    indices_TK: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    num_experts: int,
    mask: torch.Tensor | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """``[D, E]`` int64: top-k slots each domain's real tokens give each expert.

    Args:
        indices_TK: chosen experts ``[T, K]`` (or ``[B, S, K]``).
        domain_ids: the domain of each token ``[T]`` (or ``[B, S]``), in ``[0, D)``; ``-1`` = none
            (not counted, like padding).
        num_domains: D.
        num_experts: E.
        mask: ``[T]`` bool or HF ``attention_mask [B, S]``.
        validate: check the ids (a host sync).
    """
    check_num_experts(num_experts)
    check_num_experts(num_domains, name="num_domains")
    idx_TK = flat_indices(indices_TK, None)
    domains_T = _flat_ids(domain_ids, idx_TK.shape[0], "domain_ids").to(idx_TK.device)
    if validate:
        check_index_range(idx_TK, num_experts)
        if domains_T.numel() and (int(domains_T.min()) < -1 or int(domains_T.max()) >= num_domains):
            raise ValueError(
                f"domain_ids must lie in [0, {num_domains}) (or be -1 for no domain); "
                f"got values in [{int(domains_T.min())}, {int(domains_T.max())}]."
            )
    weight_T = _real_weight(mask, idx_TK.shape[0], idx_TK.device) * (domains_T >= 0)
    keys_TK = domains_T.clamp_min(0).unsqueeze(-1) * num_experts + idx_TK
    counts = torch.zeros(num_domains * num_experts, dtype=torch.int64, device=idx_TK.device)
    counts.scatter_add_(0, keys_TK.reshape(-1), weight_T.unsqueeze(-1).expand(idx_TK.shape).reshape(-1))
    return counts.view(num_domains, num_experts)


class DomainSpecialisation(NamedTuple):
    """Result of :func:`domain_specialisation`; per-domain values are NaN for a domain with no token."""

    tv_D: torch.Tensor  # [D] float32, ½ Σ_e |f_d,e − f_e|
    kl_D: torch.Tensor  # [D] float32, KL(f_d ‖ f) in nats
    share_D: torch.Tensor  # [D] float32, the domain's share of the (domain-labelled) tokens
    tv: torch.Tensor  # scalar float32, Σ_d share_d · tv_d
    kl: torch.Tensor  # scalar float32, Σ_d share_d · kl_d = I(domain; expert) in nats


def domain_specialisation(counts_DE: torch.Tensor) -> DomainSpecialisation:
    """Each domain's expert load against the load of all domains together.

    ``f_d`` is domain d's slot shares, ``f`` the shares of all domains' slots pooled (so ``f_e = 0``
    implies ``f_d,e = 0`` and the KL is finite). Total variation ``½ Σ_e |f_d,e − f_e|`` in [0, 1]
    and ``KL(f_d ‖ f)`` in nats, then their means weighted by each domain's share of the tokens;
    the weighted mean KL equals the mutual information ``I(domain; expert)`` of the slot counts.

    Args:
        counts_DE: top-k slots per domain and expert ``[D, E]`` (:func:`domain_expert_counts`).
    """
    table = _check_counts(counts_DE, "counts_DE", 2)
    slots_D = table.sum(-1)
    overall_E = table.sum(0) / slots_D.sum()
    f_DE = table / slots_D.unsqueeze(-1)  # NaN rows for empty domains
    tv_D = 0.5 * (f_DE - overall_E).abs().sum(-1)
    kl_D = (torch.special.xlogy(f_DE, f_DE) - torch.special.xlogy(f_DE, overall_E)).sum(-1)
    share_D = slots_D / slots_D.sum()
    live = slots_D > 0
    return DomainSpecialisation(
        tv_D=tv_D.float(),
        kl_D=kl_D.float(),
        share_D=share_D.float(),
        tv=(share_D[live] * tv_D[live]).sum().float(),
        kl=(share_D[live] * kl_D[live]).sum().float(),
    )


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


def _widths(num_experts: int | Sequence[int], num_layers: int | None) -> tuple[int, ...]:
    """One E per layer, validated as :class:`ExpertLoadAccumulator` does."""
    if isinstance(num_experts, int):
        check_num_experts(num_experts, minimum=2)
        layers = 1 if num_layers is None else num_layers
        check_num_experts(layers, name="num_layers")
        return (num_experts,) * layers
    widths = tuple(num_experts)
    for width in widths:
        check_num_experts(width, minimum=2)
    check_num_experts(len(widths), name="num_layers")
    if num_layers is not None and num_layers != len(widths):
        raise ValueError(f"num_layers is {num_layers} but num_experts lists {len(widths)} layers.")
    return widths


class SpecialisationAccumulator:
    """Sums what the specialisation metrics need over many batches, without keeping the tokens.

    Per layer: co-activation counts (``coactivation_LEE``), top-k slots per domain and expert
    (``domain_LDE``), (token id, expert) slot counts (kept sparse: one entry per pair that occurred,
    so the memory follows the text, not ``V × E``), and the summed top-k overlap with a reference
    routing. Call :meth:`update` once per batch and layer, optionally :meth:`all_reduce` (or
    :meth:`merge` another accumulator), read :meth:`metrics` (and :meth:`coactivation`,
    :meth:`domain_specialisation`, :meth:`token_expert_counts`), then :meth:`reset`.

    Attributes:
        coactivation_LEE: ``[L, E, E]`` int64 co-activation counts (:func:`coactivation_counts`).
        domain_LDE: ``[L, D, E]`` int64 slots per domain (``D = num_domains``, 0 without domains).
        tokens_L: ``[L]`` int64 real tokens seen.
        id_tokens_L: ``[L]`` int64 real tokens seen with their token ids.
        overlap_L / reference_tokens_L: ``[L]`` int64, ``Σ_t |S_t ∩ R_t|`` and the real tokens
            seen with a reference routing.
    """

    #: Buffered sparse entries per layer before they are merged into the running table.
    _MERGE_EVERY = 1 << 20

    def __init__(
        self,
        num_experts: int | Sequence[int],
        num_layers: int | None = None,
        *,
        num_domains: int = 0,
        vocab_top1: bool = False,
        device: torch.device | str | None = None,
    ):
        """``num_experts``: E shared by ``num_layers`` layers (default 1), or one E per layer.
        ``num_domains``: D, for :meth:`update`'s ``domain_ids`` (0: no domains). ``vocab_top1``:
        count only first choices in the (token id, expert) table (see :func:`token_expert_counts`)."""
        self.num_experts_L = _widths(num_experts, num_layers)
        self.num_layers = len(self.num_experts_L)
        self.num_experts = max(self.num_experts_L)
        if not isinstance(num_domains, int) or isinstance(num_domains, bool) or num_domains < 0:
            raise ValueError(f"num_domains must be an int >= 0; got {num_domains!r}.")
        self.num_domains = num_domains
        self.vocab_top1 = bool(vocab_top1)
        self.top_k_L: list[int | None] = [None] * self.num_layers
        width, layers = self.num_experts, self.num_layers
        self.coactivation_LEE = torch.zeros(layers, width, width, dtype=torch.int64, device=device)
        self.domain_LDE = torch.zeros(layers, num_domains, width, dtype=torch.int64, device=device)
        self.tokens_L = torch.zeros(layers, dtype=torch.int64, device=device)
        self.id_tokens_L = torch.zeros(layers, dtype=torch.int64, device=device)
        self.overlap_L = torch.zeros(layers, dtype=torch.int64, device=device)
        self.reference_tokens_L = torch.zeros(layers, dtype=torch.int64, device=device)
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = [self._no_pairs() for _ in range(layers)]
        self._pending: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(layers)]

    @property
    def device(self) -> torch.device:
        return self.tokens_L.device

    def _no_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        empty = torch.zeros(0, dtype=torch.int64, device=self.tokens_L.device)
        return empty, empty.clone()

    @torch.no_grad()
    def update(
        self,
        token_ids: torch.Tensor | None,
        indices_TK: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        layer: int = 0,
        domain_ids: torch.Tensor | None = None,
        reference_indices_TK: torch.Tensor | None = None,
        validate: bool = True,
    ) -> None:
        """Add one batch of layer ``layer``.

        Args:
            token_ids: the tokens' ids ``[T]`` (or ``[B, S]``), or None (then the vocabulary
                metrics skip this batch).
            indices_TK: the experts chosen ``[T, K]`` (or ``[B, S, K]``); K fixed per layer.
            mask: ``[T]`` bool or HF ``attention_mask [B, S]``; padding is not counted.
            domain_ids: each token's domain ``[T]`` in ``[0, num_domains)``, ``-1`` = none.
            reference_indices_TK: a reference checkpoint's top-k of the same tokens (router saturation).
            validate: check the ids (host syncs).
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}); got {layer}.")
        width = self.num_experts_L[layer]
        idx_TK = flat_indices(indices_TK, None).to(self.device)
        num_tokens, k = idx_TK.shape
        if self.top_k_L[layer] is None:
            self.top_k_L[layer] = k
        elif self.top_k_L[layer] != k:
            raise ValueError(
                f"indices_TK has K = {k} but layer {layer} was updated with K = {self.top_k_L[layer]} before."
            )
        if validate:
            check_index_range(idx_TK, width)
        # Every check that can refuse the batch comes before the first count changes.
        if domain_ids is not None and self.num_domains == 0:
            raise ValueError("domain_ids given but the accumulator was built with num_domains = 0.")
        ref_TK = None
        if reference_indices_TK is not None:
            ref_TK = flat_indices(reference_indices_TK, num_tokens, name="reference_indices_TK")
            if ref_TK.shape != idx_TK.shape:
                raise ValueError(
                    f"reference_indices_TK {tuple(ref_TK.shape)} must have the shape of indices_TK "
                    f"{tuple(idx_TK.shape)}: the same tokens, the same K."
                )
            ref_TK = ref_TK.to(self.device)
        weight_T = _real_weight(mask, num_tokens, self.device)
        real = weight_T.sum()
        self.tokens_L[layer] += real
        self.coactivation_LEE[layer, :width, :width] += coactivation_counts(
            idx_TK, width, weight_T.bool(), validate=False
        )
        if token_ids is not None:
            keys, counts = _pair_keys(
                token_ids.to(self.device), idx_TK, width, weight_T.bool(), self.vocab_top1, validate
            )
            self._pending[layer].append((keys, counts))
            self.id_tokens_L[layer] += real
            if sum(p[0].numel() for p in self._pending[layer]) >= self._MERGE_EVERY:
                self._flush(layer)
        if domain_ids is not None:
            self.domain_LDE[layer, :, :width] += domain_expert_counts(
                idx_TK,
                domain_ids.to(self.device),
                self.num_domains,
                width,
                weight_T.bool(),
                validate=validate,
            )
        if ref_TK is not None:
            self.overlap_L[layer] += (topk_overlap(idx_TK, ref_TK) * weight_T).sum()
            self.reference_tokens_L[layer] += real

    def _flush(self, layer: int) -> None:
        """Merge the buffered sparse entries of ``layer`` into its running table."""
        if not self._pending[layer]:
            return
        parts = [self._pairs[layer], *self._pending[layer]]
        self._pairs[layer] = _consolidate(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        self._pending[layer] = []

    def merge(self, other: SpecialisationAccumulator) -> None:
        """Add another accumulator's counts (same layers, widths and domains) into this one."""
        if (other.num_experts_L, other.num_domains, other.vocab_top1) != (
            self.num_experts_L,
            self.num_domains,
            self.vocab_top1,
        ):
            raise ValueError("other: a different layout (experts per layer, num_domains or vocab_top1).")
        for layer in range(self.num_layers):
            mine, theirs = self.top_k_L[layer], other.top_k_L[layer]
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(f"other: layer {layer} has K = {theirs}, this accumulator K = {mine}.")
            self.top_k_L[layer] = mine if mine is not None else theirs
            other._flush(layer)
            keys, counts = other._pairs[layer]
            self._pending[layer].append((keys.to(self.device), counts.to(self.device)))
            self._flush(layer)
        for name in (
            "coactivation_LEE",
            "domain_LDE",
            "tokens_L",
            "id_tokens_L",
            "overlap_L",
            "reference_tokens_L",
        ):
            getattr(self, name).add_(getattr(other, name).to(self.device))

    def all_reduce(self, group: object | None = None, replicas: int = 1) -> None:
        """Sum the counts over all processes (no-op when torch.distributed is not initialised).

        The dense counts go through one ``all_reduce``; the sparse (token id, expert) table, whose
        size differs per process, through ``all_gather_object``. ``replicas``: how many processes
        saw each batch (the ranks of a tensor- or expert-parallel group share one); the sums are
        divided by it, exactly, so each batch counts once (the mutual information's finite-sample
        correction depends on the count).
        """
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1; got {replicas!r}.")
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        dense = [self.coactivation_LEE, self.domain_LDE, self.tokens_L, self.id_tokens_L, self.overlap_L]
        dense.append(self.reference_tokens_L)
        flat = torch.cat([t.reshape(-1) for t in dense])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for tensor in dense:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
        for layer in range(self.num_layers):
            self._flush(layer)
        local = [(k.cpu(), c.cpu()) for k, c in self._pairs]
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (local, self.top_k_L), group=group)
        for layer in range(self.num_layers):
            keys = torch.cat([rank[0][layer][0] for rank in gathered]).to(self.device)
            counts = torch.cat([rank[0][layer][1] for rank in gathered]).to(self.device)
            self._pairs[layer] = _consolidate(keys, counts)
            if self.top_k_L[layer] is None:
                self.top_k_L[layer] = next((rank[1][layer] for rank in gathered if rank[1][layer]), None)
        if replicas > 1:  # every count is a sum of `replicas` equal copies: the division is exact
            for tensor in dense:
                tensor.copy_(torch.div(tensor, replicas, rounding_mode="floor"))
            self._pairs = [(k, torch.div(c, replicas, rounding_mode="floor")) for k, c in self._pairs]

    def reset(self) -> None:
        """Zero everything (start a new window)."""
        for tensor in (
            self.coactivation_LEE,
            self.domain_LDE,
            self.tokens_L,
            self.id_tokens_L,
            self.overlap_L,
            self.reference_tokens_L,
        ):
            tensor.zero_()
        self._pairs = [self._no_pairs() for _ in range(self.num_layers)]
        self._pending = [[] for _ in range(self.num_layers)]
        self.top_k_L = [None] * self.num_layers

    # ---- reading ----------------------------------------------------------------------------

    def token_expert_counts(self, layer: int = 0) -> TokenExpertCounts:
        """Layer ``layer``'s (token id, expert) slot counts (:func:`token_expert_counts` of all batches)."""
        self._flush(layer)
        keys, counts = self._pairs[layer]
        return _table_of(keys, counts, self.num_experts_L[layer])

    def coactivation(self) -> torch.Tensor:
        """``P(b | a)`` per layer, ``[L, E, E]`` float32 (:func:`coactivation`); NaN past a layer's width."""
        probs = torch.full(self.coactivation_LEE.shape, math.nan, dtype=torch.float32)
        for layer, width in enumerate(self.num_experts_L):
            probs[layer, :width, :width] = coactivation(self.coactivation_LEE[layer, :width, :width]).cpu()
        return probs

    def domain_specialisation(self, layer: int = 0) -> DomainSpecialisation:
        """Layer ``layer``'s :func:`domain_specialisation` (raises when it saw no domain-labelled token)."""
        return domain_specialisation(self.domain_LDE[layer, :, : self.num_experts_L[layer]])

    def metrics(
        self,
        *,
        min_count: int = DEFAULT_MIN_COUNT,
        miller_madow: bool = True,
        unit: str = "bits",
    ) -> dict[str, torch.Tensor]:
        """Per-layer values, each ``[L]`` float32, NaN where a layer has nothing to measure it on.

        ``{"router_saturation", "coactivation_top_partner", "vocab_specialisation",
        "token_expert_mi", "domain_tv", "domain_kl"}``: saturation needs reference routings, the
        vocabulary and MI token ids (vocabulary: an id seen ``min_count`` times), the domain
        metrics domain ids. ``token_expert_mi`` is in ``unit`` (bits by default), Miller–Madow
        corrected unless ``miller_madow=False``; ``domain_kl`` is in nats.

        Raises:
            ValueError: a layer that received no real token.
        """
        empty = (self.tokens_L == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"SpecialisationAccumulator: layer(s) {empty} received no real tokens.")
        values = {name: torch.full((self.num_layers,), math.nan) for name in SPECIALISATION_METRIC_NAMES}
        saturation = self.overlap_L.cpu().double()
        for layer, width in enumerate(self.num_experts_L):
            k = self.top_k_L[layer]
            if int(self.reference_tokens_L[layer]) > 0:
                values["router_saturation"][layer] = float(
                    saturation[layer] / (int(self.reference_tokens_L[layer]) * k)
                )
            probs = coactivation(self.coactivation_LEE[layer, :width, :width])
            values["coactivation_top_partner"][layer] = float(coactivation_top_partner(probs))
            if int(self.id_tokens_L[layer]) > 0:
                table = self.token_expert_counts(layer).counts_VE
                slots = 1 if self.vocab_top1 else k
                try:
                    values["vocab_specialisation"][layer] = float(
                        vocabulary_specialisation(table, slots, min_count)
                    )
                except ValueError as error:
                    if not str(error).startswith("min_count"):
                        raise
                values["token_expert_mi"][layer] = float(
                    mutual_information(table, unit=unit, miller_madow=miller_madow)
                )
            if self.num_domains and int(self.domain_LDE[layer].sum()) > 0:
                domains = self.domain_specialisation(layer)
                values["domain_tv"][layer] = float(domains.tv)
                values["domain_kl"][layer] = float(domains.kl)
        return {name: value.float() for name, value in values.items()}


# --------------------------------------------------------------------------------------------
# An evaluate-style front end
# --------------------------------------------------------------------------------------------


def _per_layer(value: Any, num_layers: int | None, name: str) -> list[Any] | None:
    """A tensor (one layer) or a sequence of tensors (one per layer) -> a list, or None."""
    if value is None:
        return None
    layers = [value] if isinstance(value, torch.Tensor) else list(value)
    if num_layers is not None and len(layers) != num_layers:
        raise ValueError(f"{name} has {len(layers)} layers; expected {num_layers}.")
    return layers


def _mean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


class RoutingMetrics:
    """Routing metrics with the ``add_batch`` / ``compute`` API of ``evaluate``'s ``EvaluationModule``.

    Offline and self-contained (neither the Hub nor the ``evaluate`` package is needed)::

        metric = RoutingMetrics(num_experts=64, num_layers=16, domains=["code", "news"])
        for batch in loader:
            out = model(**batch, output_router_logits=True)
            indices = [logits.topk(8, dim=-1).indices for logits in out.router_logits]
            metric.add_batch(predictions=indices, token_ids=batch["input_ids"],
                             mask=batch["attention_mask"], domain_ids=batch["domain"])
        metric.compute()  # {"load_entropy": ..., "vocab_specialisation": ..., ...}

    Inputs of :meth:`add_batch` (every per-layer argument is a tensor for one layer or a sequence
    with one tensor per layer, as ``output_router_logits`` gives them):

    - ``predictions`` (alias ``indices``): the experts chosen ``[T, K]`` (or ``[B, S, K]``);
    - ``references`` (alias ``reference_indices``): a reference checkpoint's choices on the same
      tokens, for ``router_saturation``;
    - ``token_ids``: ``[T]`` or ``[B, S]`` (shared by the layers), for the vocabulary metrics;
    - ``mask``: ``[T]`` or an ``attention_mask [B, S]``; ``domain_ids``: ``[T]`` or ``[B, S]``;
    - ``logits``: router logits ``[T, E]``, for ``token_entropy`` and ``top1_prob``.

    :meth:`compute` returns the mean over layers of each metric measured (``{name: float}``; with
    ``per_layer=True`` also ``"<name>/layer_<i>"``), plus ``"tokens"``, ``"domains"`` (per domain
    name, the mean over layers of ``tv`` and ``kl``) when domains were given, and, like evaluate,
    empties the module for the next evaluation. The names and meanings are the metric catalog's
    (``hf_moe_routers.metrics.catalog``).
    """

    name = "routing_metrics"
    description = (
        "Expert load, routing confidence and expert specialisation (router saturation, co-activation, "
        "vocabulary and domain specialisation, token-expert mutual information) of an MoE model's routers."
    )
    citation = """@misc{muennighoff2024olmoe,
  title         = {OLMoE: Open Mixture-of-Experts Language Models},
  author        = {Muennighoff, Niklas and others},
  year          = {2024},
  eprint        = {2409.02060},
  archivePrefix = {arXiv},
}"""
    inputs_description = (
        "predictions (alias indices): chosen experts [T, K] per layer; references (alias "
        "reference_indices): a reference checkpoint's choices on the same tokens; token_ids [T]; "
        "mask [T] or attention_mask [B, S]; domain_ids [T]; logits [T, E] per layer."
    )

    def __init__(
        self,
        num_experts: int | Sequence[int],
        num_layers: int | None = None,
        *,
        domains: Sequence[str] | None = None,
        min_count: int = DEFAULT_MIN_COUNT,
        miller_madow: bool = True,
        vocab_top1: bool = False,
        per_layer: bool = False,
        device: torch.device | str | None = None,
    ):
        """``num_experts``: E (or one per layer); ``num_layers``: default the number of layers of
        the first batch. ``domains``: the names of domain ids ``0 .. D-1``. ``min_count``,
        ``miller_madow``, ``vocab_top1``: see :meth:`SpecialisationAccumulator.metrics`."""
        self.num_experts = num_experts
        self.num_layers = num_layers
        self.domains = list(domains) if domains is not None else []
        self.min_count = min_count
        self.miller_madow = miller_madow
        self.vocab_top1 = vocab_top1
        self.per_layer = per_layer
        self.device = device
        if num_layers is not None or not isinstance(num_experts, int):
            _widths(num_experts, num_layers)  # fail at construction, not at the first batch
        self.reset()

    def reset(self) -> None:
        """Forget every batch added so far."""
        self._special: SpecialisationAccumulator | None = None
        self._loads: ExpertLoadAccumulator | None = None
        self._confidence: dict[str, list[float]] = {}
        self._confidence_tokens: list[int] = []

    def _start(self, num_layers: int) -> None:
        layers: int | None = self.num_layers
        if layers is None and isinstance(self.num_experts, int):
            layers = num_layers  # else one E per layer says how many layers there are
        self._special = SpecialisationAccumulator(
            self.num_experts,
            layers,
            num_domains=len(self.domains),
            vocab_top1=self.vocab_top1,
            device=self.device,
        )
        self._loads = ExpertLoadAccumulator(self._special.num_experts_L, device=self.device)
        width = self._special.num_layers
        self._confidence = {"token_entropy": [0.0] * width, "top1_prob": [0.0] * width}
        self._confidence_tokens = [0] * width

    @torch.no_grad()
    def add_batch(
        self,
        *,
        predictions: Any = None,
        references: Any = None,
        indices: Any = None,
        reference_indices: Any = None,
        token_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        domain_ids: torch.Tensor | None = None,
        logits: Any = None,
    ) -> None:
        """Add one batch (see the class docstring for the arguments)."""
        if predictions is not None and indices is not None:
            raise ValueError("pass predictions or indices (the same argument), not both.")
        if references is not None and reference_indices is not None:
            raise ValueError("pass references or reference_indices (the same argument), not both.")
        chosen = _per_layer(
            predictions if predictions is not None else indices, self.num_layers, "predictions"
        )
        if chosen is None:
            raise ValueError("predictions: the experts chosen [T, K] (or one tensor per layer) are required.")
        if self._special is None:
            self._start(len(chosen))
        assert self._special is not None and self._loads is not None
        layers = self._special.num_layers
        if len(chosen) != layers:
            raise ValueError(f"predictions has {len(chosen)} layers; expected {layers}.")
        refs = _per_layer(references if references is not None else reference_indices, layers, "references")
        scores = _per_layer(logits, layers, "logits")
        if domain_ids is not None and not self.domains:
            raise ValueError("domain_ids given but RoutingMetrics was built without domains (their names).")
        for layer, idx in enumerate(chosen):
            self._special.update(
                token_ids,
                idx,
                mask,
                layer=layer,
                domain_ids=domain_ids,
                reference_indices_TK=None if refs is None else refs[layer],
            )
            self._loads.update(idx.to(self._loads.counts_LE.device), mask, layer=layer)
            if scores is not None:
                flat = flat_logits(scores[layer], name="logits")
                mask_T = flat_mask(mask, flat.shape[0], flat.device)
                real = flat.shape[0] if mask_T is None else int(mask_T.sum())
                if real:
                    self._confidence["token_entropy"][layer] += float(token_entropy(flat, mask_T)) * real
                    self._confidence["top1_prob"][layer] += float(top1_prob(flat, mask_T)) * real
                    self._confidence_tokens[layer] += real

    def add(self, **example: Any) -> None:
        """Add one example (a sequence): the same arguments as :meth:`add_batch`."""
        self.add_batch(**example)

    def compute(self, **batch: Any) -> dict[str, Any]:
        """Add ``batch`` if given (as :meth:`add_batch`), compute every metric, then empty the module.

        Raises:
            ValueError: nothing was added, or a layer saw no real token.
        """
        if batch:
            self.add_batch(**batch)
        if self._special is None or self._loads is None:
            raise ValueError("compute: no batch was added (add_batch first, or pass a batch).")
        try:
            per_layer: dict[str, torch.Tensor] = dict(self._loads.metrics())
            if any(self._confidence_tokens):
                for name, sums in self._confidence.items():
                    per_layer[name] = torch.tensor(
                        [s / n if n else math.nan for s, n in zip(sums, self._confidence_tokens)]
                    )
            per_layer.update(self._special.metrics(min_count=self.min_count, miller_madow=self.miller_madow))
            result: dict[str, Any] = {"tokens": int(self._special.tokens_L.max())}
            for name, values in per_layer.items():
                values = values.double().cpu()
                if bool(torch.isnan(values).all()):
                    continue  # not measured (no reference, no token ids, no domains)
                result[name] = _mean(values)
                if self.per_layer:
                    result.update({f"{name}/layer_{i}": float(v) for i, v in enumerate(values)})
            if self.domains and int(self._special.domain_LDE.sum()) > 0:
                result["domains"] = self._domain_summary()
            return result
        finally:
            self.reset()

    def _domain_summary(self) -> dict[str, dict[str, float]]:
        assert self._special is not None
        rows = [
            self._special.domain_specialisation(layer)
            for layer in range(self._special.num_layers)
            if int(self._special.domain_LDE[layer].sum()) > 0
        ]
        return {
            name: {
                "tv": _mean(torch.stack([r.tv_D[d] for r in rows]).double()),
                "kl": _mean(torch.stack([r.kl_D[d] for r in rows]).double()),
                "share": _mean(torch.stack([r.share_D[d] for r in rows]).double()),
            }
            for d, name in enumerate(self.domains)
        }

    def __repr__(self) -> str:
        return (
            f"RoutingMetrics(name={self.name!r}, num_experts={self.num_experts!r}, "
            f"num_layers={self.num_layers!r}, domains={self.domains!r})"
        )

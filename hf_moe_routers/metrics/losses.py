"""Router losses that depend on the batch: load balance (per layer and pooled) and z-loss.

Load balance follows Switch Transformers and transformers' ``load_balancing_loss_func``:
``E · Σ_e f_e · P_e`` with ``f_e`` the fraction of real tokens that select expert e (so ``Σ_e f_e = K``)
and ``P_e`` the mean routing probability of expert e over real tokens. With the same convention a
one-layer model gives the same value in both forms, and a host's ``router_aux_loss_coef`` keeps its
meaning. At perfect balance the loss is K (1 for Switch top-1).

- :func:`load_balance_loss`: one layer. Our default, averaged over layers by
  :func:`layerwise_load_balance_loss`, so every layer is pushed to balance.
- :func:`pooled_load_balance_loss`: transformers' form. It sums counts and probabilities over all
  layers *before* the product, so a layer that overloads expert 0 and another that starves it
  average out and neither is corrected.

Padding is masked with ``torch.where`` rather than boolean indexing, so with ``validate=False``
these run without a device-to-host sync inside a training step, and NaN padding rows cannot leak.
``validate=True`` (default) checks values (NaN/+inf logits, expert ids, an all-padding batch) at
the cost of a sync; a trainer under fp16 may prefer ``validate=False`` so that a NaN reaches the
grad scaler (which skips the step) instead of raising.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .. import numerics
from ..numerics import no_autocast
from ._checks import check_index_range, check_logits_values, flat_indices, flat_logits, flat_mask

__all__ = [
    "layerwise_load_balance_loss",
    "load_balance_loss",
    "pooled_load_balance_loss",
    "routing_probs",
    "z_loss",
]


def routing_probs(
    logits_TE: torch.Tensor,
    scoring: Literal["softmax", "sigmoid", "topk_softmax"] = "softmax",
    indices_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """The family's routing probabilities ``[T, E]`` float32, for the ``probs`` argument of the losses.

    - ``softmax`` (Mixtral, Qwen-MoE, OLMoE, Switch): ``softmax(logits)``;
    - ``sigmoid`` (DeepSeek-V3): ``sigmoid(logits)`` normalised to sum 1 per token, as in DeepSeek's
      sequence-wise balance loss;
    - ``topk_softmax`` (gpt-oss): softmax over the K selected logits, zero elsewhere
      (needs ``indices_TK``).
    """
    flat_TE = flat_logits(logits_TE)
    if scoring == "topk_softmax" and indices_TK is not None:
        indices_TK = flat_indices(indices_TK, flat_TE.shape[0])
    return numerics.routing_probabilities(flat_TE, scoring, indices_TK)


def _balance_sums(
    logits_TE: torch.Tensor,
    indices_TK: torch.Tensor,
    mask: torch.Tensor | None,
    probs: torch.Tensor | None,
    validate: bool,
    where: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked sums for one layer: ``(slot counts [E], probability sums [E], real tokens [])``."""
    flat_TE = flat_logits(logits_TE, name=f"logits_TE{where}")
    num_tokens, num_experts = flat_TE.shape
    idx_TK = flat_indices(indices_TK, num_tokens, name=f"indices_TK{where}").to(flat_TE.device)
    if idx_TK.shape[1] > num_experts:
        raise ValueError(f"indices_TK{where} selects K = {idx_TK.shape[1]} > E = {num_experts} experts.")
    mask_T = flat_mask(mask, num_tokens, flat_TE.device)
    if mask_T is None:
        mask_T = torch.ones(num_tokens, dtype=torch.bool, device=flat_TE.device)
    if probs is None:
        real_TE = torch.where(mask_T.unsqueeze(-1), flat_TE, torch.zeros_like(flat_TE))
        with no_autocast(flat_TE.device):
            probs_TE = torch.softmax(real_TE, dim=-1)
    else:
        probs_TE = flat_logits(probs, name=f"probs{where}")
        if probs_TE.shape != flat_TE.shape:
            raise ValueError(
                f"probs{where} has shape {tuple(probs.shape)}; it must match logits_TE {tuple(logits_TE.shape)}."
            )
    if validate:
        check_index_range(idx_TK, num_experts, name=f"indices_TK{where}")
        check_logits_values(flat_TE[mask_T], name=f"logits_TE{where}")
        if not bool(mask_T.any()):
            raise ValueError(f"mask: no real tokens (every entry is padding) for logits_TE{where}.")
    weight_T = mask_T.float()
    counts_E = torch.zeros(num_experts, dtype=torch.float32, device=flat_TE.device).scatter_add_(
        0, idx_TK.reshape(-1), weight_T.repeat_interleave(idx_TK.shape[1])
    )
    # where, not multiply: 0 · NaN = NaN would let a garbage padding row poison P_e.
    prob_sum_E = torch.where(mask_T.unsqueeze(-1), probs_TE, torch.zeros_like(probs_TE)).sum(0)
    return counts_E, prob_sum_E, weight_T.sum()


def load_balance_loss(
    logits_TE: torch.Tensor,
    indices_TK: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    probs: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Switch-style balance loss of one layer, ``E · Σ_e f_e · P_e`` over real tokens -> scalar float32.

    Args:
        logits_TE: router logits ``[T, E]`` (or ``[B, S, E]``).
        indices_TK: the experts the router selected ``[T, K]``; ``f_e`` counts these.
        mask: ``[T]`` bool or HF ``attention_mask [B, S]``; padding counts in neither f nor P.
        probs: routing probabilities ``[T, E]`` whose mean is ``P_e`` (gradients flow through them);
            default ``softmax(logits_TE)``. See :func:`routing_probs` for sigmoid / top-k-then-softmax.
        validate: check values (one sync); see the module docstring.
    """
    counts_E, prob_sum_E, tokens = _balance_sums(logits_TE, indices_TK, mask, probs, validate)
    tokens = tokens.clamp_min(1.0)  # an all-padding batch (validate=False) gives 0, not NaN
    return counts_E.shape[0] * ((counts_E / tokens) * (prob_sum_E / tokens)).sum()


def layerwise_load_balance_loss(
    logits_LTE: Sequence[torch.Tensor],
    indices_LTK: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
    *,
    probs: Sequence[torch.Tensor] | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Mean over layers of :func:`load_balance_loss` -> scalar float32 (on the first layer's device).

    Args:
        logits_LTE: one ``[T, E]`` logits tensor per MoE layer (``outputs.router_logits``).
        indices_LTK: one ``[T, K]`` index tensor per layer.
        mask: shared by all layers, ``[T]`` or ``attention_mask [B, S]``.
        probs: optional per-layer probabilities, as in :func:`load_balance_loss`.
    """
    _check_layers(logits_LTE, indices_LTK, probs)
    device = logits_LTE[0].device
    losses = [
        load_balance_loss(
            logits, indices, mask, probs=None if probs is None else probs[i], validate=validate
        ).to(device)
        for i, (logits, indices) in enumerate(zip(logits_LTE, indices_LTK))
    ]
    return torch.stack(losses).mean()


def pooled_load_balance_loss(
    logits_LTE: Sequence[torch.Tensor],
    indices_LTK: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
    *,
    probs: Sequence[torch.Tensor] | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """transformers' pooled balance loss: counts and probabilities summed over layers, then the product.

    ``E · Σ_e (Σ_l c_le / Σ_l n_l) · (Σ_l p_le / Σ_l n_l)`` with ``c_le`` slot counts, ``p_le``
    probability sums and ``n_l`` real tokens of layer l. Equal to
    ``transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func`` when ``indices_LTK`` is
    the top-k of the softmax and ``mask`` is the attention mask. Same arguments as
    :func:`layerwise_load_balance_loss`.
    """
    _check_layers(logits_LTE, indices_LTK, probs)
    device = logits_LTE[0].device
    counts_E = prob_sum_E = tokens = None
    for i, (logits, indices) in enumerate(zip(logits_LTE, indices_LTK)):
        sums = _balance_sums(logits, indices, mask, None if probs is None else probs[i], validate, f"[{i}]")
        c_E, p_E, n = (s.to(device) for s in sums)
        if counts_E is not None and c_E.shape != counts_E.shape:
            raise ValueError(
                f"logits_LTE[{i}] has E = {c_E.shape[0]} experts; layer 0 has {counts_E.shape[0]}."
            )
        counts_E = c_E if counts_E is None else counts_E + c_E
        prob_sum_E = p_E if prob_sum_E is None else prob_sum_E + p_E
        tokens = n if tokens is None else tokens + n
    tokens = tokens.clamp_min(1.0)
    return counts_E.shape[0] * ((counts_E / tokens) * (prob_sum_E / tokens)).sum()


def _check_layers(
    logits_LTE: Sequence[torch.Tensor],
    indices_LTK: Sequence[torch.Tensor],
    probs: Sequence[torch.Tensor] | None,
) -> None:
    if isinstance(logits_LTE, torch.Tensor) or isinstance(indices_LTK, torch.Tensor):
        raise ValueError(
            "logits_LTE and indices_LTK must be sequences with one tensor per layer "
            "(e.g. outputs.router_logits); for one layer use load_balance_loss."
        )
    if len(logits_LTE) == 0:
        raise ValueError("logits_LTE is empty: no MoE layer recorded router logits.")
    if len(indices_LTK) != len(logits_LTE):
        raise ValueError(f"indices_LTK has {len(indices_LTK)} layers but logits_LTE has {len(logits_LTE)}.")
    if probs is not None and len(probs) != len(logits_LTE):
        raise ValueError(f"probs has {len(probs)} layers but logits_LTE has {len(logits_LTE)}.")


def z_loss(
    logits_TE: torch.Tensor, mask: torch.Tensor | None = None, *, validate: bool = True
) -> torch.Tensor:
    """Router z-loss ``mean_t logsumexp(logits_t)²`` over real tokens -> scalar float32 (ST-MoE).

    Keeps logits small so the softmax stays out of its saturated, round-off-prone range.
    """
    flat_TE = flat_logits(logits_TE)
    mask_T = flat_mask(mask, flat_TE.shape[0], flat_TE.device)
    if mask_T is None:
        mask_T = torch.ones(flat_TE.shape[0], dtype=torch.bool, device=flat_TE.device)
    if validate:
        check_logits_values(flat_TE[mask_T])
        if not bool(mask_T.any()):
            raise ValueError("mask: no real tokens (every entry is padding); z-loss is undefined.")
    real_TE = torch.where(mask_T.unsqueeze(-1), flat_TE, torch.zeros_like(flat_TE))
    with no_autocast(flat_TE.device):
        lse_T = torch.logsumexp(real_TE, dim=-1)
    sq_T = torch.where(mask_T, lse_T.pow(2), torch.zeros_like(lse_T))
    return sq_T.sum() / mask_T.float().sum().clamp_min(1.0)

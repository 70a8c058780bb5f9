"""Per-token routing confidence: how peaked each token's routing distribution is.

All three are means over the real tokens of a per-token quantity of ``softmax(logits)`` (or of the
sorted logits): normalised routing entropy ``H(p_t) / log E``, top-1 probability ``max_e p_te``, and
the margin between the k-th and (k+1)-th largest logit, i.e. how far a token is from swapping its
last selected expert for the first unselected one.
"""

from __future__ import annotations

import math

import torch

from ..numerics import no_autocast
from ._checks import check_logits_values, flat_logits, flat_mask, select_tokens

__all__ = ["kth_margin", "token_entropy", "top1_prob"]


def _real_logits(logits_TE: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten, upcast to float32, drop padding rows, and reject NaN/+inf in what is left."""
    flat_TE = flat_logits(logits_TE)
    real_TE = select_tokens(flat_TE, flat_mask(mask, flat_TE.shape[0], flat_TE.device))
    check_logits_values(real_TE)
    return real_TE


def token_entropy(logits_TE: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens of ``H(softmax(logits_t)) / log E`` -> scalar float32 in [0, 1].

    Args:
        logits_TE: router logits ``[T, E]`` (or ``[B, S, E]``); upcast to float32. ``-inf`` allowed.
        mask: ``[T]`` bool or HF ``attention_mask [B, S]``.
    """
    real_TE = _real_logits(logits_TE, mask)
    num_experts = real_TE.shape[-1]
    if num_experts < 2:
        raise ValueError("logits_TE has E = 1 expert; the normalised entropy H(p)/log E needs E >= 2.")
    with no_autocast(real_TE.device):
        p_TE = torch.softmax(real_TE, dim=-1)
        # xlogy gives 0·log 0 = 0, so experts masked to -inf contribute nothing instead of NaN.
        entropy_T = -torch.special.xlogy(p_TE, p_TE).sum(-1)
    return entropy_T.mean() / math.log(num_experts)


def top1_prob(logits_TE: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens of the largest routing probability ``max_e softmax(logits_t)_e`` -> scalar."""
    real_TE = _real_logits(logits_TE, mask)
    with no_autocast(real_TE.device):
        return torch.softmax(real_TE, dim=-1).amax(-1).mean()


def kth_margin(logits_TE: torch.Tensor, top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens of ``l_(k) − l_(k+1)``, the gap between the k-th and (k+1)-th largest logit.

    A small margin means a small perturbation of the input can swap the last selected expert for
    the first unselected one. It is measured on the sorted logits, not on the indices a router
    chose (a bias-corrected selection such as DeepSeek-V3's may pick differently).

    ``top_k == E``: every expert is selected and no perturbation can change the top-k set, so the
    (k+1)-th logit is taken as ``-inf`` and the result is ``+inf``. Skip it when averaging logs.
    Ties (including two ``-inf`` logits) give a margin of 0.

    Args:
        logits_TE: router logits ``[T, E]`` (or ``[B, S, E]``).
        top_k: K, with ``1 <= K <= E``.
        mask: ``[T]`` bool or HF ``attention_mask [B, S]``.

    Returns:
        scalar float32, ``>= 0``.
    """
    real_TE = _real_logits(logits_TE, mask)
    num_experts = real_TE.shape[-1]
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1; got {top_k!r}.")
    if top_k > num_experts:
        raise ValueError(f"top_k = {top_k} exceeds the number of experts E = {num_experts} in logits_TE.")
    if top_k == num_experts:
        return torch.tensor(math.inf, device=real_TE.device)
    top_TK1 = torch.topk(real_TE, top_k + 1, dim=-1).values
    kth_T, next_T = top_TK1[:, top_k - 1], top_TK1[:, top_k]
    margin_T = torch.where(kth_T == next_T, torch.zeros_like(kth_T), kth_T - next_T)
    return margin_T.mean()

"""Routing stability: does the top-k *set* survive a small input perturbation, or training?

- ``flip_rate``: share of real tokens whose top-k set changes under ``x + ε‖x‖·n`` with ``n`` a random
  unit direction per token (a relative perturbation, so it means the same at every activation scale);
  also the mean top-k overlap ``|S ∩ S'| / K``;
- ``topk_agreement``: ``|S ∩ S_ref| / K`` averaged over real tokens, for drift against a reference
  snapshot (e.g. the routing at the start of fine-tuning) or agreement after router conversion.

Sets, not ordered lists: reordering the selected experts changes the gate weights but not which
experts run, and the set is what interference and load depend on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ._checks import flat_indices, flat_mask, select_tokens

__all__ = ["FlipRate", "flip_rate", "topk_agreement", "topk_overlap"]


class FlipRate(NamedTuple):
    """Result of :func:`flip_rate`: both scalars float32, over real tokens."""

    flip_rate: torch.Tensor  # share of tokens whose top-k set changed, in [0, 1]
    overlap: torch.Tensor  # mean |S ∩ S'| / K, in [0, 1]


def topk_overlap(indices_TK: torch.Tensor, other_TK: torch.Tensor) -> torch.Tensor:
    """Per-token size of the intersection of two top-k sets ``[T, K]`` -> ``[T]`` int64.

    Assumes each row holds K distinct experts (true of any top-k).
    """
    a_TK = flat_indices(indices_TK, None)
    b_TK = flat_indices(other_TK, None, name="other_TK")
    if a_TK.shape != b_TK.shape:
        raise ValueError(
            f"indices_TK {tuple(indices_TK.shape)} and other_TK {tuple(other_TK.shape)} "
            "must have the same shape [T, K]."
        )
    b_TK = b_TK.to(a_TK.device)
    # [T, K, 1] == [T, 1, K]: K² comparisons per token, tiny for K <= 8 and free of sorting.
    return (a_TK.unsqueeze(-1) == b_TK.unsqueeze(-2)).any(-1).sum(-1)


def topk_agreement(
    indices_TK: torch.Tensor, reference_TK: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over real tokens of ``|S_t ∩ S_ref,t| / K`` -> scalar float32 in [0, 1] (1 = no drift).

    Args:
        indices_TK: current top-k ``[T, K]`` (or ``[B, S, K]``).
        reference_TK: reference top-k of the same tokens, same shape.
        mask: ``[T]`` bool or HF ``attention_mask [B, S]``.
    """
    if isinstance(reference_TK, torch.Tensor) and isinstance(indices_TK, torch.Tensor):
        if reference_TK.shape != indices_TK.shape:
            raise ValueError(
                f"reference_TK {tuple(reference_TK.shape)} must have the shape of indices_TK "
                f"{tuple(indices_TK.shape)}: the same tokens, the same K."
            )
    overlap_T = topk_overlap(indices_TK, reference_TK)
    real_T = select_tokens(overlap_T, flat_mask(mask, overlap_T.shape[0], overlap_T.device))
    return real_T.float().mean() / indices_TK.shape[-1]


@torch.no_grad()
def flip_rate(
    route_fn: Callable[[torch.Tensor], torch.Tensor],
    x_TH: torch.Tensor,
    *,
    epsilon: float = 0.01,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> FlipRate:
    """Top-k instability of ``route_fn`` under ``x + ε‖x‖·n``, ``n`` a uniform random unit direction per token.

    Args:
        route_fn: maps router inputs ``[T, H]`` to top-k indices ``[T, K]`` (e.g.
            ``lambda x: router(x)[2]`` for a transformers 5.x top-k router). Called twice, under
            ``torch.no_grad``; put the model in eval mode so jitter/dropout do not count as flips.
        x_TH: router inputs ``[T, H]`` (or ``[B, S, H]``, flattened before the call).
        epsilon: relative perturbation size ε >= 0; the perturbation of token t has norm ``ε‖x_t‖``.
        mask: ``[T]`` bool or HF ``attention_mask [B, S]``; padding tokens are not counted.
        generator: random source for the directions (on ``x_TH``'s device or the CPU).
        seed: convenience: build a generator seeded with this (not together with ``generator``).

    Returns:
        :class:`FlipRate` ``(flip_rate, overlap)``.
    """
    if not isinstance(x_TH, torch.Tensor) or x_TH.ndim < 2 or not x_TH.is_floating_point():
        shape = tuple(x_TH.shape) if isinstance(x_TH, torch.Tensor) else type(x_TH).__name__
        raise ValueError(f"x_TH must be a floating-point tensor [T, H] (or [B, S, H]); got {shape}.")
    if not epsilon >= 0:  # also rejects NaN
        raise ValueError(f"epsilon must be >= 0; got {epsilon!r}.")
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both.")
    if seed is not None:
        generator = torch.Generator(device=x_TH.device).manual_seed(seed)
    x_TH = x_TH.reshape(-1, x_TH.shape[-1])
    mask_T = flat_mask(mask, x_TH.shape[0], x_TH.device)

    # The perturbation is built in float32 and cast back to the router's input dtype: ε = 0 returns
    # exactly x, and a bf16 model sees the perturbation it would really see (rounding included).
    x32_TH = x_TH.float()
    noise_device = generator.device if generator is not None else x_TH.device
    dir_TH = torch.randn(x_TH.shape, generator=generator, device=noise_device, dtype=torch.float32)
    dir_TH = torch.nn.functional.normalize(dir_TH.to(x_TH.device), dim=-1)
    x_noisy_TH = (x32_TH + epsilon * x32_TH.norm(dim=-1, keepdim=True) * dir_TH).to(x_TH.dtype)

    base_TK = flat_indices(route_fn(x_TH), x_TH.shape[0], name="route_fn(x_TH)")
    noisy_TK = flat_indices(route_fn(x_noisy_TH), x_TH.shape[0], name="route_fn(x_TH + noise)")
    overlap_T = select_tokens(topk_overlap(base_TK, noisy_TK), mask_T)
    k = base_TK.shape[-1]
    return FlipRate(
        flip_rate=(overlap_T < k).float().mean(),
        overlap=overlap_T.float().mean() / k,
    )

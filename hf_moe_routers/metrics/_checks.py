"""Input checks and flattening shared by the metric functions.

Every public metric accepts router outputs in the shapes transformers hands out: logits
``[T, E]`` (or ``[B, S, E]``, flattened here), top-k indices ``[T, K]`` (or ``[B, S, K]``), and a
token mask that is either ``[T]`` bool or an HF ``attention_mask [B, S]`` (any dtype, nonzero =
real token) with ``B * S == T``. The errors name the argument so a caller sees which input is
wrong without reading this file.
"""

from __future__ import annotations

import torch


def flat_logits(logits: torch.Tensor, name: str = "logits_TE") -> torch.Tensor:
    """``[..., E] -> [T, E]`` float32 (upcast: routing statistics of bf16 logits are float32 math)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(logits).__name__}.")
    if logits.ndim < 2:
        raise ValueError(f"{name} must have shape [T, E] (or [B, S, E]); got shape {tuple(logits.shape)}.")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {logits.dtype}.")
    return logits.reshape(-1, logits.shape[-1]).float()


def flat_indices(indices: torch.Tensor, num_tokens: int | None, name: str = "indices_TK") -> torch.Tensor:
    """``[..., K] -> [T, K]`` int64, checking the token count against the logits when given."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(indices).__name__}.")
    if indices.ndim < 2:
        raise ValueError(
            f"{name} must have shape [T, K] (or [B, S, K]); got shape {tuple(indices.shape)}. "
            "Top-1 indices of shape [T] need an explicit trailing dimension: indices.unsqueeze(-1)."
        )
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (int64); got dtype {indices.dtype}.")
    flat = indices.reshape(-1, indices.shape[-1]).long()
    if flat.shape[1] == 0:
        raise ValueError(f"{name} has K = 0 columns; top-k routing needs K >= 1.")
    if num_tokens is not None and flat.shape[0] != num_tokens:
        raise ValueError(
            f"{name} has {flat.shape[0]} tokens (shape {tuple(indices.shape)}) but logits_TE has {num_tokens}."
        )
    return flat


def flat_mask(mask: torch.Tensor | None, num_tokens: int, device: torch.device) -> torch.Tensor | None:
    """``[T]`` or ``[B, S]`` (bool / int / float; nonzero = real token) -> ``[T]`` bool, or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None; got {type(mask).__name__}.")
    if mask.numel() != num_tokens:
        raise ValueError(
            f"mask has {mask.numel()} elements (shape {tuple(mask.shape)}) but there are {num_tokens} tokens; "
            "pass a [T] token mask or an attention_mask [B, S] with B * S == T."
        )
    flat = mask.reshape(-1).to(device)
    return flat if flat.dtype == torch.bool else flat != 0


def check_index_range(indices_TK: torch.Tensor, num_experts: int, name: str = "indices_TK") -> None:
    """Expert ids must lie in ``[0, E)``; a stray id would silently grow a histogram."""
    if indices_TK.numel() and (int(indices_TK.min()) < 0 or int(indices_TK.max()) >= num_experts):
        raise ValueError(
            f"{name} must hold expert ids in [0, {num_experts}); "
            f"got values in [{int(indices_TK.min())}, {int(indices_TK.max())}]."
        )


def check_logits_values(logits_TE: torch.Tensor, name: str = "logits_TE") -> None:
    """NaN or +inf logits make every softmax statistic NaN; fail loudly instead (-inf is allowed)."""
    if bool(torch.isnan(logits_TE).any()) or bool(torch.isposinf(logits_TE).any()):
        raise ValueError(f"{name} contains NaN or +inf values (over the real, unmasked tokens).")


def select_tokens(x_T: torch.Tensor, mask_T: torch.Tensor | None, name: str = "mask") -> torch.Tensor:
    """Keep the real tokens' rows; raise if none is left (every statistic would be 0/0)."""
    kept = x_T if mask_T is None else x_T[mask_T]
    if kept.shape[0] == 0:
        what = "no tokens" if mask_T is None else "no real tokens: every entry of mask is padding"
        raise ValueError(f"{name}: {what}; metrics are undefined on an empty batch.")
    return kept


def check_num_experts(num_experts: int, name: str = "num_experts", minimum: int = 1) -> None:
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {num_experts!r}.")

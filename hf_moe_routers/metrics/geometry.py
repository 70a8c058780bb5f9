"""Geometry of router parameters and router queries.

- ``spectral_norm``: ``σ_max(W)``, the Lipschitz constant of ``x -> W x`` (SR-MoE penalises it);
- ``stable_rank``: ``‖W‖_F² / ‖W‖₂²``, between 1 and ``rank(W)``: how many directions the routing
  really uses (SR-MoE keeps it high);
- ``angular_concentration``: mean pairwise cosine of the rows of a matrix. On router queries of a
  batch it measures the "angular concentration" L2R describes (all tokens pointing the same way, so
  routing is decided by norms); on gate rows / expert anchors it measures how similar the experts'
  keys are.

Matrix math runs in float32 with autocast off: an SVD in bf16 is neither supported nor meaningful.
"""

from __future__ import annotations

import torch

from .. import numerics
from ..numerics import no_autocast
from ._checks import flat_mask

__all__ = ["angular_concentration", "spectral_norm", "stable_rank"]


def _matrix(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(weight).__name__}.")
    if weight.ndim != 2 or weight.numel() == 0:
        raise ValueError(f"{name} must be a non-empty matrix [N, H]; got shape {tuple(weight.shape)}.")
    if not weight.is_floating_point():
        raise ValueError(f"{name} must be floating point; got dtype {weight.dtype}.")
    return weight.float()


def spectral_norm(weight: torch.Tensor) -> torch.Tensor:
    """Largest singular value ``σ_max`` of ``weight [N, H]`` -> scalar float32 (differentiable).

    Exact (``torch.linalg.matrix_norm(ord=2)``); router matrices are small (E × H) so an SVD is cheap
    next to a forward pass. Detach the weight first when only logging.
    """
    return numerics.spectral_norm(_matrix(weight))


def stable_rank(weight: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Stable rank ``‖W‖_F² / ‖W‖₂²`` of ``weight [N, H]`` -> scalar float32 in ``[1, min(N, H)]``.

    The zero matrix has stable rank 0 by convention (instead of 0/0), so logs stay finite.
    ``sigma`` is ``σ_max(W)`` when the caller already has it (a penalty computing both saves an SVD).
    """
    return numerics.stable_rank(_matrix(weight), sigma)


def angular_concentration(
    rows: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    max_rows: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean cosine similarity over all ordered pairs ``i != j`` of the rows -> scalar float32 in [-1, 1].

    Computed as ``(‖Σ_i u_i‖² − Σ_i ‖u_i‖²) / (N (N − 1))`` with ``u_i = r_i / ‖r_i‖``: O(N·D) time
    and memory, never an N × N matrix. A zero row has no direction; it counts as cosine 0 with
    every other row.

    Args:
        rows: ``[N, D]``, or ``[..., D]`` flattened to rows (e.g. L2R anchors ``[E, M, r]``): router
            queries of a batch ``q_TR``, gate rows ``W_EH``, or expert anchors.
        mask: for queries, ``[N]`` bool or HF ``attention_mask [B, S]``; padding rows are dropped.
        max_rows: if set and more rows remain, use a random subset of this many (for huge T).
        generator: random source for the subset (reproducible logging).

    Raises:
        ValueError: fewer than 2 rows (after masking), or a bad shape.
    """
    if not isinstance(rows, torch.Tensor) or rows.ndim < 2 or not rows.is_floating_point():
        shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(f"rows must be a floating-point tensor [N, D] (or [..., D]); got {shape}.")
    with no_autocast(rows.device):
        rows_ND = rows.reshape(-1, rows.shape[-1]).float()
        mask_N = flat_mask(mask, rows_ND.shape[0], rows_ND.device)
        if mask_N is not None:
            rows_ND = rows_ND[mask_N]
        if max_rows is not None:
            if max_rows < 2:
                raise ValueError(f"max_rows must be >= 2 (pairs need two rows); got {max_rows}.")
            if rows_ND.shape[0] > max_rows:
                gen_device = generator.device if generator is not None else rows_ND.device
                keep = torch.randperm(rows_ND.shape[0], generator=generator, device=gen_device)[:max_rows]
                rows_ND = rows_ND[keep.to(rows_ND.device)]
        n = rows_ND.shape[0]
        if n < 2:
            raise ValueError(f"rows: need at least 2 rows (after masking) for pairwise cosines; got {n}.")
        if bool(torch.isnan(rows_ND).any()):
            raise ValueError("rows contains NaN values.")
        # float64 for the sums: ‖Σu‖² grows like N² and the subtraction below cancels most of it.
        u_ND = torch.nn.functional.normalize(rows_ND.double(), dim=-1)
        sum_D = u_ND.sum(0)
        return ((sum_D.dot(sum_D) - u_ND.pow(2).sum()) / (n * (n - 1))).float()

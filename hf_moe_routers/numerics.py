"""Float32 matrix math shared by the routers (their penalties and constraints) and the metrics.

A leaf module with torch as its only import: the routers ship as standalone remote code, and this
file is all of the metrics' math they need. Router matrices are small (E × H), so σ_max is exact
(an SVD) rather than estimated; autocast is off because an SVD in bf16 is neither supported nor
meaningful.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["no_autocast", "spectral_norm", "stable_rank"]


@contextlib.contextmanager
def no_autocast(device: torch.device | str) -> Iterator[None]:
    """Disable autocast on ``device`` so the math inside runs in float32 whatever the model's precision."""
    device_type = torch.device(device).type
    if device_type not in ("cuda", "cpu", "xpu", "mps", "hpu"):
        yield
        return
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def spectral_norm(weight: torch.Tensor) -> torch.Tensor:
    """Largest singular value ``σ_max`` of ``weight [N, H]`` -> scalar float32 (differentiable)."""
    with no_autocast(weight.device):
        return torch.linalg.matrix_norm(weight.float(), ord=2)


def stable_rank(weight: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Stable rank ``‖W‖_F² / ‖W‖₂²`` of ``weight [N, H]`` -> scalar float32 in ``[1, min(N, H)]``.

    ``sigma`` is ``σ_max(W)`` when the caller already has it (a penalty computing both saves an
    SVD). The zero matrix has stable rank 0 instead of 0/0: the denominator is clamped, not the
    result, so logs stay finite and gradients too.
    """
    with no_autocast(weight.device):
        w = weight.float()
        sigma = spectral_norm(w) if sigma is None else sigma.float()
        return w.pow(2).sum() / sigma.pow(2).clamp_min(torch.finfo(torch.float32).tiny)

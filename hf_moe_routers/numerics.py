"""Float32 math shared by the routers and family adapters (which ship as standalone remote code)
and the metrics: matrix statistics and the families' routing-probability rules.

A leaf module with torch as its only import: this file is all of the metrics' math the remote code
needs. Router matrices are small (E × H), so σ_max is exact
(an SVD) rather than estimated; autocast is off because an SVD in bf16 is neither supported nor
meaningful.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["ROUTING_SCORINGS", "no_autocast", "routing_probabilities", "spectral_norm", "stable_rank"]

#: How a family turns router logits into the probabilities its balance loss averages.
ROUTING_SCORINGS: tuple[str, ...] = ("softmax", "sigmoid", "topk_softmax")


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


def routing_probabilities(
    logits_TE: torch.Tensor, scoring: str = "softmax", indices_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """The family's routing probabilities ``[T, E]`` float32 (autocast off) from logits ``[T, E]``.

    - ``softmax`` (Mixtral, Qwen-MoE, OLMoE, Switch): ``softmax(logits)``;
    - ``sigmoid`` (DeepSeek-V3): ``sigmoid(logits)`` normalised to sum 1 per token, as in DeepSeek's
      sequence-wise balance loss;
    - ``topk_softmax`` (gpt-oss): softmax over the K selected logits ``indices_TK [T, K]``, zero
      elsewhere.
    """
    flat_TE = logits_TE.float()
    with no_autocast(flat_TE.device):
        if scoring == "softmax":
            return torch.softmax(flat_TE, dim=-1)
        if scoring == "sigmoid":
            scores_TE = torch.sigmoid(flat_TE)
            # clamp: a token whose every score underflows gives zeros, not 0/0.
            return scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        if scoring == "topk_softmax":
            if indices_TK is None:
                raise ValueError("scoring='topk_softmax' needs indices_TK (the selected experts).")
            idx_TK = indices_TK.reshape(flat_TE.shape[0], -1).to(device=flat_TE.device, dtype=torch.int64)
            top_TK = torch.softmax(flat_TE.gather(-1, idx_TK), dim=-1)
            return torch.zeros_like(flat_TE).scatter(-1, idx_TK, top_TK)
    raise ValueError(f"scoring must be one of {ROUTING_SCORINGS}; got {scoring!r}.")

"""The host family's own linear gate, as a scorer: the baseline every other router is compared to."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .base import RouterConfig, RouterScorer, full_tensor, spectral_norm

__all__ = ["LinearRouterConfig", "LinearScorer"]


@dataclasses.dataclass
class LinearRouterConfig(RouterConfig):
    """The family's own router (``logits = x Wᵀ [+ b]``), bit-identical to it.

    Unlike the other methods it computes logits in the host's dtype, exactly as the family does,
    so that it is a faithful baseline; the top-k math that follows is the family's (float32).
    """

    router_type = "linear"


class LinearScorer(RouterScorer):
    """``logits_TE = x_TH @ weight_EH.T (+ bias_E)``, in the input dtype like the host gate."""

    config_class = LinearRouterConfig

    def __init__(self, config: LinearRouterConfig, hidden_size: int, num_experts: int, *, bias: bool = False):
        super().__init__(config, hidden_size, num_experts, bias=bias)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight.dtype == x_TH.dtype else self.weight.to(x_TH.dtype)
        bias = self.bias
        if bias is not None and bias.dtype != x_TH.dtype:
            bias = bias.to(x_TH.dtype)
        return F.linear(x_TH, weight, bias)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        init.normal_(self.weight, mean=0.0, std=std)
        if self.bias is not None:
            init.zeros_(self.bias)

    @torch.no_grad()
    def init_from_dense(self, weight_EH: torch.Tensor, bias_E: torch.Tensor | None = None) -> None:
        self.weight.copy_(weight_EH)
        if self.bias is not None:
            self.bias.copy_(bias_E if bias_E is not None else torch.zeros_like(self.bias))

    def routing_matrix(self) -> torch.Tensor:
        return full_tensor(self.weight)

    def lipschitz_bound(self) -> torch.Tensor:
        # The logits are affine in x, so their Lipschitz constant is exactly σ_max(W).
        return spectral_norm(self.routing_matrix().detach())

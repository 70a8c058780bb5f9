"""Cosine router (X-MoE, Chi et al. 2022): the nearest published relative of L2R, as a baseline.

Tokens are projected to a small dimension D, tokens and expert embeddings are L2-normalised, and
the cosine is divided by a (learnable) temperature: ``z_i = cos(P x, e_i)/τ``. Logits are bounded
by ``1/τ``; a normalised query jumps at ``P x = 0``, so there is no global Lipschitz constant.
Defaults [ours]: D = 16, τ initialised to 0.3 and learned, clamped at ``min_temperature``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .base import RouterConfig, RouterScorer, check_bool, check_number, full_tensor, no_autocast

__all__ = ["CosineRouterConfig", "CosineScorer"]

_EPS = 1e-6


@dataclasses.dataclass
class CosineRouterConfig(RouterConfig):
    """Configuration of the X-MoE cosine router.

    Args:
        dim: D ≥ 1, projection size (≤ the model's hidden size).
        temperature: initial τ > 0.
        learn_temperature: learn τ (as log τ) or keep it fixed.
        min_temperature: lower clamp of τ (> 0), so scores stay bounded by ``1/min_temperature``.
    """

    router_type = "cosine"
    dim: int = 16
    temperature: float = 0.3
    learn_temperature: bool = True
    min_temperature: float = 0.01

    def validate(self) -> None:
        name = type(self).__name__
        check_number(name, "dim", self.dim, integer=True, minimum=1)
        check_number(name, "temperature", self.temperature, minimum=0.0, exclusive_minimum=True)
        check_bool(name, "learn_temperature", self.learn_temperature)
        check_number(name, "min_temperature", self.min_temperature, minimum=0.0, exclusive_minimum=True)
        if self.min_temperature > self.temperature:
            raise ValueError(
                f"CosineRouterConfig.min_temperature must be <= temperature ({self.temperature}); "
                f"got {self.min_temperature}."
            )


class CosineScorer(RouterScorer):
    """``logits_TE = cos(proj x, e) / τ`` in float32. Parameters ``proj [D, H]``,
    ``expert_embeddings_ED [E, D]``, ``log_temperature [1]`` (a buffer when τ is fixed; one element,
    not 0-dim, because FSDP2's ``fully_shard`` refuses scalar parameters)."""

    config_class = CosineRouterConfig
    one_element_parameters = ("log_temperature",)

    def __init__(self, config: CosineRouterConfig, hidden_size: int, num_experts: int, *, bias: bool = False):
        super().__init__(config, hidden_size, num_experts, bias=False)
        if config.dim > hidden_size:
            raise ValueError(
                f"CosineRouterConfig.dim must be between 1 and the model's hidden size {hidden_size}; "
                f"got {config.dim}."
            )
        self.proj = nn.Parameter(torch.empty(config.dim, hidden_size))
        self.embeddings = nn.Parameter(torch.empty(num_experts, config.dim))
        if config.learn_temperature:
            self.log_temperature = nn.Parameter(torch.empty(1))
        else:
            self.register_buffer("log_temperature", torch.empty(1))

    def temperature(self) -> torch.Tensor:
        """τ as a float32 0-dim tensor, clamped below at ``min_temperature``."""
        return (
            full_tensor(self.log_temperature).float().reshape(()).exp().clamp_min(self.config.min_temperature)
        )

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        with no_autocast(x_TH.device):
            q_TD = F.normalize(F.linear(x_TH.float(), self.proj.float()), dim=-1, eps=_EPS)
            e_ED = F.normalize(self.embeddings.float(), dim=-1, eps=_EPS)
            return (q_TD @ e_ED.t()) / self.temperature()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        init.normal_(self.proj, mean=0.0, std=std)
        init.normal_(self.embeddings, mean=0.0, std=std)
        init.constant_(self.log_temperature, math.log(self.config.temperature))

    @torch.no_grad()
    def init_from_dense(self, weight_EH: torch.Tensor, bias_E: torch.Tensor | None = None) -> None:
        """Truncated SVD of the gate: ``proj = V_Dᵀ``, ``e_i = (U S)_i[:D]`` (norms are dropped)."""
        weight = weight_EH.detach().float()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        dim = self.config.dim
        kept = min(dim, s.numel())
        proj = torch.zeros(dim, weight.shape[1], device=weight.device)
        proj[:kept] = vh[:kept]
        if dim > kept:
            extra = torch.randn(weight.shape[1], dim - kept, device=weight.device)
            extra = extra - vh[:kept].t() @ (vh[:kept] @ extra)
            proj[kept:] = torch.linalg.qr(extra).Q.t()
        emb = torch.zeros(weight.shape[0], dim, device=weight.device)
        emb[:, :kept] = u[:, :kept] * s[:kept]
        self.proj.copy_(proj)
        self.embeddings.copy_(emb)
        self.log_temperature.fill_(math.log(self.config.temperature))

    @torch.no_grad()
    def scale_logits_(self, factor: float) -> bool:
        if not self.config.learn_temperature:
            return False
        new_log_tau = self.log_temperature - math.log(factor)
        if new_log_tau.exp() < self.config.min_temperature:
            return False  # the clamp would make the scaling inexact
        self.log_temperature.copy_(new_log_tau)
        return True

    def queries(self, x_TH: torch.Tensor) -> torch.Tensor:
        with no_autocast(x_TH.device):
            return F.linear(x_TH.float(), self.routing_matrix().float())

    def routing_matrix(self) -> torch.Tensor:
        return full_tensor(self.proj)

    def expert_embeddings(self) -> torch.Tensor:
        return full_tensor(self.embeddings)

    def logit_bound(self) -> torch.Tensor:
        return 1.0 / self.temperature().detach()

    @torch.no_grad()
    def local_lipschitz_bound(self, x_TH: torch.Tensor) -> torch.Tensor:
        """``‖J(x)‖ ≤ σ(P) / ‖P x‖ · σ(Ê) / τ`` per token (the unit-normalisation's slope is 1/‖q‖)."""
        with no_autocast(x_TH.device):
            q_norm = self.queries(x_TH).norm(dim=-1).clamp_min(_EPS)
            unit = F.normalize(self.expert_embeddings().float(), dim=-1, eps=_EPS)
            sigma_p = torch.linalg.matrix_norm(self.routing_matrix().float(), ord=2)
            sigma_e = torch.linalg.matrix_norm(unit, ord=2)
            return sigma_p / q_norm * sigma_e / self.temperature()

    def lipschitz_bound(self) -> torch.Tensor:
        # cos(Px, e) is discontinuous where Px = 0: no global Lipschitz constant.
        return torch.tensor(float("inf"), device=self._device())

"""L2R: low-rank, Lipschitz-controlled routing (arXiv 2601.21349).

[paper] route in a shared low-rank latent space ``q = W_q x`` (``W_q ∈ R^{R×H}``), score with
Saturated Inner-Product Scoring ``z_i = φ(‖q‖)·ψ(‖k_i‖)·cos θ_i``, several anchors per expert.

[repro] (a public third-party reproduction; each a config field here): ``φ(s) = γ(1 + β tanh s)``
with learnable scalars γ, β initialised to 1; ``ψ(n) = 1 + (n − 1)/p`` with ``p = 4``; RMSNorm
without affine weights on the router input; anchors L2-normalised at init; expert logit =
logsumexp over its M anchors.

[ours] ``phi="tanh"``: ``φ(s) = γ·tanh(s/γ)``, which makes the map ``q ↦ φ(‖q‖) q/‖q‖``
1-Lipschitz, so the logits have a finite global Lipschitz constant; ``anchor_reduce="max"``;
``input_norm="none"``; temperature τ. All norms are taken in float32 with clamps, so zero and
huge inputs give finite, bounded logits: ``|z| ≤ max|φ| · max ψ / τ``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .base import (
    RouterConfig,
    RouterScorer,
    check_choice,
    check_number,
    full_tensor,
    no_autocast,
    spectral_norm,
)

__all__ = ["L2RConfig", "L2RScorer"]

PHIS = ("affine_tanh", "tanh")
ANCHOR_REDUCES = ("logsumexp", "max")
INPUT_NORMS = ("rms", "none")
_NORM_EPS = 1e-6


@dataclasses.dataclass
class L2RConfig(RouterConfig):
    """Configuration of the L2R router.

    Args:
        rank: R ≥ 1, size of the shared latent space (≤ the model's hidden size).
        num_anchors: M ≥ 1 anchors per expert.
        phi: ``"affine_tanh"`` (default, [repro]) or ``"tanh"`` (strictly Lipschitz, [ours]).
        anchor_norm_p: p > 0 in ``ψ(n) = 1 + (n − 1)/p``.
        anchor_reduce: ``"logsumexp"`` (default) or ``"max"`` over an expert's anchors.
        temperature: τ > 0 dividing the scores.
        input_norm: ``"rms"`` (default, RMSNorm without affine weights, [repro]) or ``"none"``.
        anchor_init_noise: relative size of the perturbation that makes anchors 2..M differ from
            the first when converting a dense gate (≥ 0).
    """

    router_type = "l2r"
    rank: int = 128
    num_anchors: int = 16
    phi: str = "affine_tanh"
    anchor_norm_p: float = 4.0
    anchor_reduce: str = "logsumexp"
    temperature: float = 1.0
    input_norm: str = "rms"
    anchor_init_noise: float = 1e-2

    def validate(self) -> None:
        name = type(self).__name__
        check_number(name, "rank", self.rank, integer=True, minimum=1)
        check_number(name, "num_anchors", self.num_anchors, integer=True, minimum=1)
        check_choice(name, "phi", self.phi, PHIS)
        check_number(name, "anchor_norm_p", self.anchor_norm_p, minimum=0.0, exclusive_minimum=True)
        check_choice(name, "anchor_reduce", self.anchor_reduce, ANCHOR_REDUCES)
        check_number(name, "temperature", self.temperature, minimum=0.0, exclusive_minimum=True)
        check_choice(name, "input_norm", self.input_norm, INPUT_NORMS)
        check_number(name, "anchor_init_noise", self.anchor_init_noise, minimum=0.0)


class L2RScorer(RouterScorer):
    """SIPS scores ``[T, E]`` from ``x_TH`` in a shared rank-R latent space, float32, autocast off.

    Parameters: ``query_proj [R, H]`` (W_q), ``anchors [E, M, R]``, ``phi_gamma [1]`` and (for
    ``affine_tanh``) ``phi_beta [1]``: one-element vectors, not 0-dim, because FSDP2's
    ``fully_shard`` refuses scalar parameters.
    """

    config_class = L2RConfig
    one_element_parameters = ("phi_gamma", "phi_beta")

    def __init__(self, config: L2RConfig, hidden_size: int, num_experts: int, *, bias: bool = False):
        super().__init__(config, hidden_size, num_experts, bias=False)
        if config.rank > hidden_size:
            raise ValueError(
                f"L2RConfig.rank must be between 1 and the model's hidden size {hidden_size}; got {config.rank}."
            )
        self.query_proj = nn.Parameter(torch.empty(config.rank, hidden_size))
        self.anchors = nn.Parameter(torch.empty(num_experts, config.num_anchors, config.rank))
        self.phi_gamma = nn.Parameter(torch.empty(1))
        self.phi_beta = nn.Parameter(torch.empty(1)) if config.phi == "affine_tanh" else None

    # -- pieces ---------------------------------------------------------------------------------
    def _normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.input_norm == "rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _NORM_EPS)
        return x

    def phi(self, norm_T: torch.Tensor) -> torch.Tensor:
        """The bounded query-magnitude transform φ(‖q‖) ``[T]``."""
        gamma = self._gamma()
        if self.config.phi == "affine_tanh":
            return gamma * (1.0 + self._beta() * torch.tanh(norm_T))
        # γ·tanh(s/γ) is odd in γ: slope 1 at 0, saturates at |γ|; tiny γ is clamped for the division.
        safe_gamma = torch.where(gamma.abs() < 1e-6, torch.full_like(gamma, 1e-6), gamma)
        return safe_gamma * torch.tanh(norm_T / safe_gamma)

    def _gamma(self) -> torch.Tensor:
        """γ as a float32 0-dim tensor (the parameter itself is ``[1]``)."""
        return full_tensor(self.phi_gamma).float().reshape(())

    def _beta(self) -> torch.Tensor:
        """β as a float32 0-dim tensor (``affine_tanh`` only)."""
        return full_tensor(self.phi_beta).float().reshape(())

    def psi(self, anchor_norm_EM: torch.Tensor) -> torch.Tensor:
        """The anchor-magnitude transform ψ(‖k‖) = 1 + (‖k‖ − 1)/p ``[E, M]``."""
        return 1.0 + (anchor_norm_EM - 1.0) / self.config.anchor_norm_p

    def queries(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Latent queries ``q_TR = W_q · norm(x)`` in float32."""
        with no_autocast(x_TH.device):
            return F.linear(self._normalise_input(x_TH.float()), self.routing_matrix().float())

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        with no_autocast(x_TH.device):
            q_TR = self.queries(x_TH)
            q_norm_T = q_TR.norm(dim=-1)
            q_unit_TR = q_TR / q_norm_T.clamp_min(_NORM_EPS).unsqueeze(-1)
            anchors_EMR = self.anchors.float()
            k_norm_EM = anchors_EMR.norm(dim=-1)
            k_unit_EMR = anchors_EMR / k_norm_EM.clamp_min(_NORM_EPS).unsqueeze(-1)
            cos_TEM = torch.einsum("tr,emr->tem", q_unit_TR, k_unit_EMR)
            scores_TEM = self.phi(q_norm_T)[:, None, None] * self.psi(k_norm_EM)[None] * cos_TEM
            if self.config.temperature != 1.0:
                scores_TEM = scores_TEM / self.config.temperature
            if self.config.anchor_reduce == "logsumexp":
                return torch.logsumexp(scores_TEM, dim=-1)
            return scores_TEM.amax(dim=-1)

    # -- init -----------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        init.normal_(self.query_proj, mean=0.0, std=std)
        if not getattr(self.anchors, "_is_hf_initialized", False) and not self.anchors.is_meta:
            # [repro] anchors start on the unit sphere: ψ = 1, so competition starts purely angular.
            init.copy_(self.anchors, F.normalize(torch.randn_like(self.anchors), dim=-1))
        init.ones_(self.phi_gamma)
        if self.phi_beta is not None:
            init.ones_(self.phi_beta)

    @torch.no_grad()
    def init_from_dense(self, weight_EH: torch.Tensor, bias_E: torch.Tensor | None = None) -> None:
        """Truncated SVD ``W ≈ U S Vᵀ``: ``W_q = V_rᵀ``, first anchor of expert i = ``(U S)_i[:r]``.

        Then ``cos θ_i`` orders experts like ``W x`` does up to the anchor-norm transform ψ, which
        L2R deliberately flattens; a gate bias cannot be represented (the patch reports the
        resulting top-k agreement, and ``distill_router`` recovers it).
        """
        weight = weight_EH.detach().float()
        num_experts, hidden = weight.shape
        rank = self.config.rank
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # u [E,N], s [N], vh [N,H]
        kept = min(rank, s.numel())
        query = torch.empty(rank, hidden, dtype=torch.float32, device=weight.device)
        query[:kept] = vh[:kept]
        if rank > kept:
            # Extra latent directions orthogonal to the gate's row space: the anchors have no
            # component there, so they only rescale every cos θ_i by the same positive factor.
            extra = torch.randn(hidden, rank - kept, device=weight.device)
            extra = extra - vh[:kept].t() @ (vh[:kept] @ extra)
            query[kept:] = torch.linalg.qr(extra).Q.t()
        first = torch.zeros(num_experts, rank, device=weight.device)
        first[:, :kept] = u[:, :kept] * s[:kept]
        anchors = first[:, None, :].repeat(1, self.config.num_anchors, 1)
        if self.config.num_anchors > 1 and self.config.anchor_init_noise > 0:
            noise = torch.randn_like(anchors[:, 1:])
            scale = self.config.anchor_init_noise * first.norm(dim=-1).clamp_min(_NORM_EPS) / math.sqrt(rank)
            anchors[:, 1:] += noise * scale[:, None, None]
        self.query_proj.copy_(query)
        self.anchors.copy_(anchors)
        self.phi_gamma.fill_(1.0)
        if self.phi_beta is not None:
            self.phi_beta.fill_(1.0)

    @torch.no_grad()
    def scale_logits_(self, factor: float) -> bool:
        # affine_tanh scores are linear in γ (the logsumexp over anchors only approximately so,
        # which is enough for a starting scale); γ·tanh(s/γ) is not.
        if self.config.phi != "affine_tanh":
            return False
        self.phi_gamma.mul_(factor)
        return True

    # -- statistics ------------------------------------------------------------------------------
    def routing_matrix(self) -> torch.Tensor:
        return full_tensor(self.query_proj)

    def expert_embeddings(self) -> torch.Tensor:
        anchors = full_tensor(self.anchors)
        return anchors.reshape(-1, anchors.shape[-1])

    def logit_bound(self) -> torch.Tensor:
        """``max |z|`` over all inputs: ``max|φ| · max ψ / τ`` (+ log M for logsumexp)."""
        with torch.no_grad():
            gamma = self._gamma().abs()
            phi_max = gamma * (1.0 + self._beta().abs()) if self.phi_beta is not None else gamma
            psi_max = self.psi(full_tensor(self.anchors).float().norm(dim=-1)).abs().max()
            bound = phi_max * psi_max / self.config.temperature
            if self.config.anchor_reduce == "logsumexp":
                bound = bound + math.log(self.config.num_anchors)
            return bound

    def _anchor_matrix_sigma(self) -> torch.Tensor:
        """σ_max of the stacked ψ-scaled unit anchors ``A [E*M, R]``."""
        anchors = full_tensor(self.anchors).float()
        norms = anchors.norm(dim=-1, keepdim=True)
        stacked = self.psi(norms.squeeze(-1)).unsqueeze(-1) * anchors / norms.clamp_min(_NORM_EPS)
        return spectral_norm(stacked.reshape(-1, stacked.shape[-1]))

    @torch.no_grad()
    def local_lipschitz_bound(self, x_TH: torch.Tensor) -> torch.Tensor:
        """``‖J(x)‖ ≤ ‖J_norm(x)‖ · σ(W_q) · max(|φ'(‖q‖)|, |φ(‖q‖)|/‖q‖) · σ(A) / τ`` per token."""
        with no_autocast(x_TH.device):
            x = x_TH.float()
            if self.config.input_norm == "rms":
                scale = torch.rsqrt(x.pow(2).mean(-1) + _NORM_EPS)  # the RMSNorm Jacobian's norm
            else:
                scale = torch.ones(x.shape[0], device=x.device)
            q_norm = self.queries(x_TH).norm(dim=-1)
            gamma = self._gamma()
            if self.config.phi == "affine_tanh":
                slope = (gamma * self._beta()).abs() / torch.cosh(q_norm).pow(2)
            else:
                slope = 1.0 / torch.cosh(q_norm / gamma).pow(2)
            radial = self.phi(q_norm).abs() / q_norm.clamp_min(_NORM_EPS)
            g = torch.maximum(slope, radial)
            sigma_q = spectral_norm(self.routing_matrix())
            return scale * sigma_q * g * self._anchor_matrix_sigma() / self.config.temperature

    def lipschitz_bound(self) -> torch.Tensor:
        """Global bound of the logits w.r.t. the router input ``x``.

        With ``phi="tanh"``, ``g(q) = φ(‖q‖) q/‖q‖`` is 1-Lipschitz; the scores are
        ``A g(q)/τ`` with A the stacked ψ-scaled unit anchors, and both reductions over anchors
        are 1-Lipschitz per expert, so ``L = σ(A)·σ(W_q)·L_norm/τ`` where ``L_norm`` is 1 without
        input norm and ``1/sqrt(eps)`` for the RMSNorm (its slope at 0). ``affine_tanh`` has
        ``φ(0) = γ ≠ 0``: the logits jump at ``q = 0`` and no global bound exists (``inf``).
        """
        with torch.no_grad(), no_autocast(self._device()):
            if self.config.phi == "affine_tanh":
                return torch.tensor(float("inf"), device=self._device())
            sigma_a = self._anchor_matrix_sigma()
            sigma_q = spectral_norm(self.routing_matrix())
            norm_factor = 1.0 / math.sqrt(_NORM_EPS) if self.config.input_norm == "rms" else 1.0
            return sigma_a * sigma_q * norm_factor / self.config.temperature

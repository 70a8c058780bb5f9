"""SR-MoE: spectral-norm and stable-rank control of the routing weights (arXiv 2601.03889).

[paper] a dual penalty on each layer's routing matrix W: its spectral norm (which bounds the
Lipschitz constant of routing) and its stable rank ``‖W‖_F²/‖W‖₂²`` (kept high so selection uses
many feature directions); prototype routing ``w_i = softmax_i(−‖z − μ_i‖²/τ)``.

[ours] (each a config field):
- ``scoring``: ``linear`` (``W x / τ``, for patching a pretrained gate without changing its form)
  or ``prototype``. Prototype logits are returned as ``(2 x·μ_i − ‖μ_i‖²)/τ``, which differs from
  ``−‖x − μ_i‖²/τ`` only by ``‖x‖²/τ``, the same for every expert: softmax, top-k and routing
  weights are identical, and the logits become Lipschitz with constant ``2σ_max(P)/τ``.
- ``spectral_mode``: ``penalty`` ``relu(σ − c)²``, ``constrain`` (``W_eff = W·min(1, c/σ)``, the
  bound holds at every step) or ``none``; ``c`` = ``spectral_bound`` or, when None, σ_max at
  patch time, or for a model built from scratch at its first forward (the matrix training starts
  from). It is stored as a buffer, so a patched model routes identically at step 0 and a reloaded
  one identically to the saved one.
- stable-rank penalty ``1 − srank(W)/min(E, H)``.
- ``sigma_method``: ``exact`` (``torch.linalg.matrix_norm(ord=2)``) or ``power`` (power iteration
  with a persistent vector, ``power_iterations`` steps per training forward; Miyato et al.).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .base import (
    RouterConfig,
    RouterScorer,
    apply_keeping_float32,
    check_choice,
    check_number,
    full_tensor,
    no_autocast,
    spectral_norm,
    stable_rank,
)

__all__ = ["SRMoEConfig", "SRMoEScorer"]

SCORINGS = ("linear", "prototype")
SPECTRAL_MODES = ("penalty", "constrain", "none")
SIGMA_METHODS = ("exact", "power")
_BOUND_SLACK = 1e-6


@dataclasses.dataclass
class SRMoEConfig(RouterConfig):
    """Configuration of the SR-MoE router.

    Args:
        scoring: ``"linear"`` (default; keeps a pretrained gate's form) or ``"prototype"``.
        spectral_mode: ``"penalty"`` (default, as the paper describes), ``"constrain"`` or ``"none"``.
        spectral_bound: the bound ``c`` (> 0), or None for σ_max at init / patch time.
        spectral_weight: λ_σ ≥ 0 of the spectral penalty.
        stable_rank_weight: λ_sr ≥ 0 of the stable-rank penalty.
        sigma_method: ``"exact"`` or ``"power"``.
        power_iterations: power-iteration steps per training forward (≥ 1), for ``sigma_method="power"``.
        temperature: τ > 0 dividing the scores.
    """

    router_type = "sr_moe"
    scoring: str = "linear"
    spectral_mode: str = "penalty"
    spectral_bound: float | None = None
    spectral_weight: float = 1e-2
    stable_rank_weight: float = 1e-2
    sigma_method: str = "exact"
    power_iterations: int = 1
    temperature: float = 1.0

    def validate(self) -> None:
        name = type(self).__name__
        check_choice(name, "scoring", self.scoring, SCORINGS)
        check_choice(name, "spectral_mode", self.spectral_mode, SPECTRAL_MODES)
        check_number(
            name, "spectral_bound", self.spectral_bound, minimum=0.0, exclusive_minimum=True, allow_none=True
        )
        check_number(name, "spectral_weight", self.spectral_weight, minimum=0.0)
        check_number(name, "stable_rank_weight", self.stable_rank_weight, minimum=0.0)
        check_choice(name, "sigma_method", self.sigma_method, SIGMA_METHODS)
        check_number(name, "power_iterations", self.power_iterations, integer=True, minimum=1)
        check_number(name, "temperature", self.temperature, minimum=0.0, exclusive_minimum=True)


class SRMoEScorer(RouterScorer):
    """SR-MoE scores ``[T, E]`` from ``x_TH``, in float32 with autocast off.

    Parameters: ``weight [E, H]`` (linear scoring; the host gate's name, so PEFT targets keep
    working) or ``prototypes [E, H]``; ``bias [E]`` when the host gate has one (linear only).
    Buffers: ``spectral_bound`` (scalar c) and ``power_u [E]`` (power-iteration state).
    """

    config_class = SRMoEConfig

    def __init__(self, config: SRMoEConfig, hidden_size: int, num_experts: int, *, bias: bool = False):
        super().__init__(config, hidden_size, num_experts, bias=bias)
        if config.scoring == "prototype" and bias:
            raise ValueError(
                "SRMoEConfig.scoring='prototype' cannot represent a gate bias; use scoring='linear' "
                "for a host router with a bias (e.g. Switch with router_bias=True)."
            )
        matrix = nn.Parameter(torch.empty(num_experts, hidden_size))
        if config.scoring == "linear":
            self.weight = matrix
        else:
            self.prototypes = matrix
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None
        # Both buffers start at values fixed by the config alone, so transformers' init path (meta
        # device, then ``_init_weights``) gives the same buffers as ``__init__``: 0 means "c not
        # set yet" (a configured c is > 0) and a zero vector "power iteration not started". They
        # are filled from the routing matrix by ``init_from_dense`` or, for a from-scratch model,
        # the first time the router runs (``_ensure_calibrated``): σ of the matrix training starts from.
        # float32 whatever the model's dtype (see ``_apply``); an explicit dtype also wins over the
        # default dtype transformers sets while it builds a model for ``from_pretrained(dtype=...)``,
        # and the loader then keeps the checkpoint's float32 values.
        self.register_buffer("spectral_bound", torch.full((), self._configured_bound(), dtype=torch.float32))
        self.register_buffer("power_u", torch.zeros(num_experts, dtype=torch.float32))
        self._calibrated = False

    #: Buffers kept in float32: c = σ_max rounded to bf16 falls below σ about every other time, so
    #: ``constrain`` would rescale the patched gate (and ``penalty`` be non-zero) at step 0.
    _FLOAT32_BUFFERS = ("spectral_bound", "power_u")

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - torch's signature
        return apply_keeping_float32(
            self, self._FLOAT32_BUFFERS, lambda: super(SRMoEScorer, self)._apply(fn, recurse)
        )

    # -- calibration of the buffers -------------------------------------------------------------
    def _configured_bound(self) -> float:
        """The bound from the config, or 0.0 ("to be measured") when it is None."""
        return 0.0 if self.config.spectral_bound is None else float(self.config.spectral_bound)

    @torch.no_grad()
    def _ensure_calibrated(self) -> None:
        """Fill whichever buffer is still at its "not set" value from the current routing matrix.

        Checked once per module instance (one host sync), then skipped; loading a state dict checks
        again. Under FSDP2 this runs inside forward, where the matrix is whole.
        """
        if self._calibrated:
            return
        matrix = self.routing_matrix()
        if matrix.is_meta:
            return
        need_bound = bool(self.spectral_bound <= 0)
        need_power = not bool(self.power_u.any())
        if need_bound or need_power:
            self._calibrate(matrix.detach().float(), bound=need_bound, power=need_power)
        self._calibrated = True

    @torch.no_grad()
    def _calibrate(self, matrix: torch.Tensor, *, bound: bool, power: bool) -> None:
        if bound:
            configured = self.config.spectral_bound
            value = spectral_norm(matrix) if configured is None else torch.tensor(float(configured))
            self.spectral_bound.copy_(value.to(self.spectral_bound))
        if power:
            # Start the power iteration at the exact top left-singular vector: σ̂ = σ at step 0.
            u = torch.linalg.svd(matrix, full_matrices=False).U[:, 0]
            self.power_u.copy_(u.to(self.power_u))

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003 - torch's signature
        super()._load_from_state_dict(*args, **kwargs)
        self._calibrated = False

    # -- the effective matrix -------------------------------------------------------------------
    def _matrix_parameter(self) -> nn.Parameter:
        return self.weight if self.config.scoring == "linear" else self.prototypes

    def routing_matrix(self) -> torch.Tensor:
        return full_tensor(self._matrix_parameter())

    def effective_routing_matrix(self) -> torch.Tensor:
        with torch.no_grad(), no_autocast(self._device()):
            return self.effective_matrix(update=False)

    def _sigma(self, matrix: torch.Tensor, update: bool) -> torch.Tensor:
        """σ_max(matrix) in float32: exact, or power iteration (σ ≤ the true value)."""
        if self.config.sigma_method == "exact":
            return torch.linalg.matrix_norm(matrix, ord=2)
        u = self.power_u.float()
        with torch.no_grad():
            w = matrix.detach()
            if update:
                for _ in range(self.config.power_iterations):
                    v = F.normalize(w.t() @ u, dim=0)
                    u = F.normalize(w @ v, dim=0)
                # Idempotent enough for gradient checkpointing: a recompute only adds one more
                # iteration, which moves u towards the same fixed point.
                self.power_u.copy_(u.to(self.power_u.dtype))
            v = F.normalize(w.t() @ u, dim=0)
        # u, v are constants; σ̂ = uᵀ W v carries the gradient dσ/dW ≈ u vᵀ.
        return torch.dot(u, matrix @ v)

    def effective_matrix(self, update: bool = False) -> torch.Tensor:
        """``[E, H]`` float32 matrix used for scoring; rescaled to σ ≤ c under ``constrain``."""
        self._ensure_calibrated()
        matrix = self.routing_matrix().float()
        if self.config.spectral_mode != "constrain":
            return matrix
        sigma = self._sigma(matrix, update)
        bound = self.spectral_bound.float()
        # min(1, c/σ): a no-op while the bound holds, so a freshly patched gate is unchanged. The
        # SVD behind σ can differ by an ulp between calls, hence the relative slack of 1e-6.
        ratio = bound / sigma.clamp_min(torch.finfo(torch.float32).tiny)
        scale = torch.where(ratio >= 1.0 - _BOUND_SLACK, torch.ones_like(ratio), ratio)
        return matrix * scale

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        with no_autocast(x_TH.device):
            x = x_TH.float()
            self._ensure_calibrated()
            update = self.training and torch.is_grad_enabled() and self.config.sigma_method == "power"
            if update and self.config.spectral_mode != "constrain":
                # The penalty reads σ̂ from the persistent vector: advance it once per training step.
                self._sigma(self.routing_matrix().float(), update=True)
            matrix = self.effective_matrix(update=update)
            tau = self.config.temperature
            if self.config.scoring == "linear":
                logits = F.linear(x, matrix, None if self.bias is None else self.bias.float())
            else:
                # −‖x − μ‖²/τ up to the per-token constant ‖x‖²/τ (softmax-invariant).
                logits = 2.0 * F.linear(x, matrix) - matrix.pow(2).sum(-1)
            return logits / tau if tau != 1.0 else logits

    # -- init -----------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        init.normal_(self._matrix_parameter(), mean=0.0, std=std)
        if self.bias is not None:
            init.zeros_(self.bias)
        # The "not set" values of __init__ (``init`` keeps buffers loaded from a checkpoint).
        init.constant_(self.spectral_bound, self._configured_bound())
        init.zeros_(self.power_u)
        self._calibrated = False

    @torch.no_grad()
    def init_from_dense(self, weight_EH: torch.Tensor, bias_E: torch.Tensor | None = None) -> None:
        if self.config.scoring == "linear":
            self.weight.copy_(weight_EH)
            if self.bias is not None:
                self.bias.copy_(bias_E if bias_E is not None else torch.zeros_like(self.bias))
        else:
            # 2μ·x/τ = W x when μ = τW/2; the remaining per-expert offset −‖μ‖²/τ is what the
            # conversion cannot keep, so top-k agreement is reported by the patch.
            self.prototypes.copy_(weight_EH.float() * (self.config.temperature / 2.0))
        # c = σ of the converted gate (or the configured c), so routing is unchanged at step 0.
        self._calibrate(self.routing_matrix().detach().float(), bound=True, power=True)
        self._calibrated = True

    # -- regularisation and bounds --------------------------------------------------------------
    def regularization_terms(self) -> dict[str, torch.Tensor]:
        self._ensure_calibrated()
        matrix = self.routing_matrix()
        with no_autocast(matrix.device):
            matrix = matrix.float()
            terms: dict[str, torch.Tensor] = {}
            sigma = self._sigma(matrix, update=False)
            if self.config.spectral_mode == "penalty":
                bound = self.spectral_bound.float() * (1.0 + _BOUND_SLACK)
                terms["spectral"] = torch.relu(sigma - bound).pow(2)
            full_rank = min(self.num_experts, self.hidden_size)
            # The exact σ keeps the stable rank a true ratio (≤ min(E, H)) also under power iteration.
            exact = sigma if self.config.sigma_method == "exact" else None
            terms["stable_rank"] = 1.0 - stable_rank(matrix, exact) / full_rank
            return terms

    def regularization_weights(self) -> dict[str, float]:
        return {"spectral": self.config.spectral_weight, "stable_rank": self.config.stable_rank_weight}

    def lipschitz_bound(self) -> torch.Tensor:
        with torch.no_grad(), no_autocast(self._device()):
            sigma = spectral_norm(self.effective_matrix(update=False))
            factor = 1.0 if self.config.scoring == "linear" else 2.0
            return factor * sigma / self.config.temperature

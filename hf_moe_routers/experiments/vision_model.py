"""The paper-style MoE image classifier of SR-MoE (arXiv 2601.03889), with any of our routers.

Shape legend: B batch, C input channels, L 1-D input length, S image side, H hidden size,
E experts, F expert intermediate size, K top-k, N classes (``num_labels``).

    pixel_values ─ stem ─► h_BH ─► [stage 1] ─► ... ─► [stage N] ─► LayerNorm ─► Linear ─► logits_BN

    stage:  z_BH = LayerNorm(ReLU(Linear(h_BH)))        local processor
            logits_BE = router(z_BH) / routing_temperature
            w_BE = softmax(logits_BE)                     dense soft routing (top_k=None), or
                   top-k of it, renormalised, zeros elsewhere   (sparse, top_k=K)
            y_BH = Σ_e w_BE[:, e] · expert_e(z_BH)        expert_e = Linear(H,F) → ReLU → Linear(F,H)
            h_BH = h_BH + y_BH   if residual  else  y_BH

Stems: ``conv2d`` (two 3×3 convolutions over an S×S image, for scikit-learn's 8×8 digits),
``conv1d`` (the same in 1-D) and ``mlp`` (two linear layers over the flattened input, for the
40-sample MNIST-1D signals).

Why a residual (default on, [ours]): without it, a depth-8 stack of softly routed stages has no
identity path and the linear router's training collapses at our tiny sizes for reasons unrelated to
routing; with it, every stage refines the representation, as in the transformer MoE layers the rest
of this package patches. ``residual=False`` is the paper's literal stacking and an ablation.

Experts are stored as stacked tensors whose first dimension indexes the expert (``up [E, F, H]``,
``down [E, H, F]``, like transformers' fused ``gate_up_proj [E, 2F, H]``), so per-expert adaptation
(``hf_moe_routers.experiments.adaptation``) treats this model and the routed causal LMs alike. Every expert is
computed for every example (they are tiny); under sparse routing the unselected experts get weight
exactly 0, so they neither contribute nor receive gradient.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.utils import ModelOutput

from .. import metrics as M
from ..numerics import spectral_norm, stable_rank
from ..routers import L2RConfig, RouterConfig, RouterScorer, build_scorer

__all__ = [
    "DEFAULT_VISION_ROUTER",
    "ExpertBank",
    "MoEImageClassifier",
    "MoEImageClassifierConfig",
    "MoEImageClassifierOutput",
    "MoEStage",
    "register_vision_auto_classes",
]

STEM_TYPES = ("conv2d", "conv1d", "mlp")
#: The paper's router: prototype scoring with the spectral and stable-rank penalties.
#: The router used when ``moe_router`` is None: L2R with rank min(16, H) and 4 anchors per expert.
#: Chosen by evidence, not by the paper: in our validation sweep (depth 8, digits;
#: ``benchmarks/results/sensitivity.md``) it had the lowest one-shot interference at matched
#: new-class accuracy of the five routers, and SR-MoE's prototype routing the highest. Pass
#: ``SRMoEConfig(scoring="prototype").to_dict()`` for the paper's model.
DEFAULT_VISION_ROUTER: dict = L2RConfig(rank=16, num_anchors=4).to_dict()


def _check_int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MoEImageClassifierConfig.{field} must be an integer >= {minimum}; got {value!r}.")


def _check_float(field: str, value: object, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(
            f"MoEImageClassifierConfig.{field} must be a finite number {'> 0' if positive else '>= 0'}; "
            f"got {value!r}."
        )


@strict
class MoEImageClassifierConfig(PreTrainedConfig):
    """Configuration of :class:`MoEImageClassifier`.

    Args:
        stem_type: ``"conv2d"`` (images ``[B, C, S, S]``), ``"conv1d"`` or ``"mlp"`` (signals
            ``[B, C, L]`` or ``[B, L]``).
        input_channels: C.
        input_size: S (image side) for ``conv2d``, L (signal length) otherwise.
        stem_channels: channels of the convolutional stem / width of the MLP stem.
        hidden_size: H, the width of every MoE stage.
        num_stages: number of stacked MoE stages (the "depth").
        num_experts: E per stage.
        expert_intermediate_size: F of each expert MLP.
        top_k: None for dense soft routing over all experts, or K for sparse top-K (renormalised).
        routing_temperature: τ > 0 dividing every router's logits before the softmax (for any router
            type, so a sweep over τ means the same thing for all of them).
        residual: add each stage's output to its input (see the module docstring).
        moe_router: the router config as a dict (``RouterConfig.to_dict()``); None means
            :data:`DEFAULT_VISION_ROUTER` (L2R, rank capped at ``hidden_size``).
        router_init_std: std of from-scratch router parameters; None = ``1/sqrt(hidden_size)``
            (fan-in scale: the router input is a LayerNorm output, so initial logits are O(1) —
            routing neither uniform nor collapsed at step 0 — and SR-MoE's default spectral bound,
            σ_max at initialisation, is an O(1) scale rather than the ~0.2 a 0.02 init would give).
        router_aux_loss_coef: weight of the load-balancing loss added to the classification loss
            (dense routing counts each example's top-1 expert as its load). Default 0.01: without
            it, one-shot interference and exposure rose for four of five routers in our sweep.
        processor_spectral_weight, processor_stable_rank_weight: SR-MoE's two penalties applied to
            every local processor's ``Linear`` weight too (0 = off); the spectral bound is σ_max at
            initialisation, as for the routers.
        initializer_range: std of the other linear and convolution weights.
        num_labels: number of classes N (default 10).
    """

    model_type = "moe_image_classifier"

    stem_type: str = "conv2d"
    input_channels: int = 1
    input_size: int = 8
    stem_channels: int = 16
    hidden_size: int = 64
    num_stages: int = 2
    num_experts: int = 8
    expert_intermediate_size: int = 64
    top_k: int | None = None
    routing_temperature: float = 1.0
    residual: bool = True
    moe_router: dict | None = None
    router_init_std: float | None = None
    router_aux_loss_coef: float = 0.01
    processor_spectral_weight: float = 0.0
    processor_stable_rank_weight: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.id2label is None and kwargs.get("num_labels") is None:
            kwargs["num_labels"] = 10
        super().__post_init__(**kwargs)
        self.validate_fields()

    def validate_fields(self) -> None:
        """Raise ``ValueError`` naming the field for any bad value."""
        if self.stem_type not in STEM_TYPES:
            raise ValueError(
                f"MoEImageClassifierConfig.stem_type must be one of {', '.join(map(repr, STEM_TYPES))}; "
                f"got {self.stem_type!r}."
            )
        for field in ("input_channels", "input_size", "stem_channels", "hidden_size", "num_stages"):
            _check_int(field, getattr(self, field), 1)
        _check_int("num_experts", self.num_experts, 2)
        _check_int("expert_intermediate_size", self.expert_intermediate_size, 1)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1)
            if self.top_k > self.num_experts:
                raise ValueError(
                    f"MoEImageClassifierConfig.top_k must be None (dense) or between 1 and num_experts "
                    f"({self.num_experts}); got {self.top_k}."
                )
        if self.stem_type == "conv2d" and self.input_size < 2:
            raise ValueError(
                f"MoEImageClassifierConfig.input_size must be >= 2 for conv2d; got {self.input_size}."
            )
        _check_float("routing_temperature", self.routing_temperature, positive=True)
        _check_float("initializer_range", self.initializer_range, positive=True)
        if self.router_init_std is not None:
            _check_float("router_init_std", self.router_init_std, positive=True)
        for field in ("router_aux_loss_coef", "processor_spectral_weight", "processor_stable_rank_weight"):
            _check_float(field, getattr(self, field), positive=False)
        if not isinstance(self.residual, bool):
            raise ValueError(
                f"MoEImageClassifierConfig.residual must be True or False; got {self.residual!r}."
            )
        if self.num_labels is None or self.num_labels < 2:
            raise ValueError(f"MoEImageClassifierConfig.num_labels must be >= 2; got {self.num_labels!r}.")
        if isinstance(self.moe_router, RouterConfig):
            self.moe_router = self.moe_router.to_dict()
        if self.moe_router is not None and not isinstance(self.moe_router, dict):
            raise ValueError(
                f"MoEImageClassifierConfig.moe_router must be a router config dict or None; got {self.moe_router!r}."
            )
        self.router_config  # noqa: B018 - parses and validates the router fields

    @property
    def router_config(self) -> RouterConfig:
        """The parsed router config (:data:`DEFAULT_VISION_ROUTER` when ``moe_router`` is None)."""
        if self.moe_router is None:
            return RouterConfig.from_dict({**DEFAULT_VISION_ROUTER, "rank": min(16, self.hidden_size)})
        return RouterConfig.from_dict(dict(self.moe_router))


@dataclasses.dataclass
class MoEImageClassifierOutput(ModelOutput):
    """Output of :class:`MoEImageClassifier`.

    Attributes:
        loss: cross-entropy (+ ``router_aux_loss_coef`` · balance loss) when ``labels`` are given.
        logits: class scores ``[B, N]``.
        router_logits: per stage, the router logits ``[B, E]`` (after the routing temperature).
        routing_weights: per stage, the weight each example gives each expert ``[B, E]``; zero for
            experts outside the top-k under sparse routing.
        router_inputs: per stage, the router input ``z_BH`` (the local processor's output).
        aux_loss: the mean over stages of the balance loss (always computed; cheap).
        hidden_states: the stem output and every stage's output ``[B, H]`` when requested.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    routing_weights: tuple[torch.Tensor, ...] | None = None
    router_inputs: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class ExpertBank(nn.Module):
    """E two-layer MLP experts stored as stacked tensors; expert ``e`` is row ``e`` of each.

    Parameters: ``up [E, F, H]``, ``up_bias [E, F]``, ``down [E, H, F]``, ``down_bias [E, H]``.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.up = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_bias = nn.Parameter(torch.empty(num_experts, intermediate_size))
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.down_bias = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, z_BH: torch.Tensor, weights_BE: torch.Tensor) -> torch.Tensor:
        """``Σ_e weights_BE[:, e] · expert_e(z_BH)`` -> ``[B, H]``."""
        act_BEF = F.relu(torch.einsum("bh,efh->bef", z_BH, self.up) + self.up_bias)
        out_BEH = torch.einsum("bef,ehf->beh", act_BEF, self.down) + self.down_bias
        return torch.einsum("be,beh->bh", weights_BE.to(out_BEH.dtype), out_BEH)

    def expert_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the bank; dimension 0 of each indexes the experts."""
        return [self.up, self.up_bias, self.down, self.down_bias]


class MoEStage(nn.Module):
    """One MoE stage: local processor, router (``scorer``), experts, weighted combine, residual."""

    def __init__(self, config: MoEImageClassifierConfig):
        super().__init__()
        hidden = config.hidden_size
        self.processor = nn.Linear(hidden, hidden)
        self.processor_norm = nn.LayerNorm(hidden)
        self.scorer: RouterScorer = build_scorer(config.router_config, hidden, config.num_experts)
        self.experts = ExpertBank(config.num_experts, hidden, config.expert_intermediate_size)
        self.top_k = config.top_k
        self.temperature = float(config.routing_temperature)
        self.residual = config.residual
        # σ_max of the processor weight at initialisation: the bound of its optional spectral penalty.
        self.register_buffer("processor_spectral_bound", torch.ones(()))

    def route(self, z_BH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits ``[B, E]`` (temperature applied) and routing weights ``[B, E]``."""
        logits_BE = self.scorer(z_BH).float()
        if self.temperature != 1.0:
            logits_BE = logits_BE / self.temperature
        probs_BE = torch.softmax(logits_BE, dim=-1)
        if self.top_k is None:
            return logits_BE, probs_BE
        top_BK, idx_BK = torch.topk(probs_BE, self.top_k, dim=-1)
        top_BK = top_BK / top_BK.sum(-1, keepdim=True)
        return logits_BE, torch.zeros_like(probs_BE).scatter(-1, idx_BK, top_BK)

    def forward(self, h_BH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the new ``h_BH``, router logits ``[B, E]``, weights ``[B, E]`` and router input ``z_BH``."""
        z_BH = self.processor_norm(F.relu(self.processor(h_BH)))
        logits_BE, weights_BE = self.route(z_BH)
        y_BH = self.experts(z_BH, weights_BE)
        return (h_BH + y_BH if self.residual else y_BH), logits_BE, weights_BE, z_BH

    def processor_regularization_terms(self) -> dict[str, torch.Tensor]:
        """SR-MoE's raw spectral and stable-rank terms on the processor weight ``[H, H]``."""
        weight = self.processor.weight.float()
        sigma = spectral_norm(weight)
        return {
            "spectral": torch.relu(sigma - self.processor_spectral_bound.float()).pow(2),
            "stable_rank": 1.0 - stable_rank(weight, sigma) / min(weight.shape),
        }


def _conv_stem(conv: type[nn.Conv1d | nn.Conv2d], c_in: int, width: int, kernel: int) -> nn.Sequential:
    """Two "same"-padded convolutions, the second with stride 2, each with a ReLU, then flatten.

    ``[B, C, S(, S)]`` -> ``[B, width · ceil(S/2)(²)]``: the stride halves every spatial side.
    """
    pad = kernel // 2
    return nn.Sequential(
        conv(c_in, width, kernel, padding=pad),
        nn.ReLU(),
        conv(width, width, kernel, padding=pad, stride=2),
        nn.ReLU(),
        nn.Flatten(),
    )


def _build_stem(config: MoEImageClassifierConfig) -> tuple[nn.Module, int]:
    """The stem module and the size of its flattened output."""
    c_in, width, size = config.input_channels, config.stem_channels, config.input_size
    side = (size + 1) // 2  # after the stride-2 convolution
    if config.stem_type == "conv2d":
        # 3×3 then a stride-2 3×3: 8×8 digits -> 4×4 maps; small enough for a 2-core CPU.
        return _conv_stem(nn.Conv2d, c_in, width, 3), width * side * side
    if config.stem_type == "conv1d":
        return _conv_stem(nn.Conv1d, c_in, width, 5), width * side
    stem = nn.Sequential(nn.Flatten(), nn.Linear(c_in * size, width), nn.ReLU())
    return stem, width


class MoEImageClassifier(PreTrainedModel):
    """SR-MoE's paper-style classifier: stem, ``num_stages`` MoE stages, LayerNorm + linear head.

    ``model(pixel_values, labels=...)`` returns :class:`MoEImageClassifierOutput`. Load and save
    with ``from_pretrained`` / ``save_pretrained`` (also through ``AutoModel`` and
    ``AutoModelForImageClassification`` once :func:`register_vision_auto_classes` has run).
    """

    config_class = MoEImageClassifierConfig
    config: MoEImageClassifierConfig
    base_model_prefix = "moe_image_classifier"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: MoEImageClassifierConfig):
        super().__init__(config)
        self.stem, stem_out = _build_stem(config)
        self.stem_proj = nn.Linear(stem_out, config.hidden_size)
        self.stages = nn.ModuleList(MoEStage(config) for _ in range(config.num_stages))
        self.head_norm = nn.LayerNorm(config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, RouterScorer):
            std = self.config.router_init_std or 1.0 / math.sqrt(self.config.hidden_size)
            module.reset_parameters(std=std)
        elif isinstance(module, ExpertBank):
            # Per-expert fan-in init (the rows of a stacked tensor are separate Linear layers).
            for weight in (module.up, module.down):
                init.normal_(weight, mean=0.0, std=1.0 / math.sqrt(weight.shape[-1]))
            init.zeros_(module.up_bias)
            init.zeros_(module.down_bias)
        elif isinstance(module, MoEStage):
            if not getattr(module.processor_spectral_bound, "_is_hf_initialized", False):
                # Runs after the processor Linear was initialised (children are visited first).
                if not module.processor.weight.is_meta:
                    init.copy_(module.processor_spectral_bound, spectral_norm(module.processor.weight))
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            # Fan-in scaling keeps the tiny stem and processors trainable from step 0.
            fan_in = module.weight[0].numel()
            init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(fan_in))
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def _reshape_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        x = pixel_values.float() if not pixel_values.is_floating_point() else pixel_values
        if cfg.stem_type == "conv2d":
            if x.ndim == 3:
                x = x.unsqueeze(1)
            expected = (cfg.input_channels, cfg.input_size, cfg.input_size)
        else:
            if x.ndim == 2:
                x = x.unsqueeze(1)
            expected = (cfg.input_channels, cfg.input_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [B, {', '.join(map(str, expected))}] for stem_type="
                f"{cfg.stem_type!r}; got {tuple(pixel_values.shape)}."
            )
        return x.to(self.stem_proj.weight.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **kwargs: object,
    ) -> MoEImageClassifierOutput:
        """Classify ``pixel_values`` (``[B, C, S, S]`` / ``[B, S, S]`` or ``[B, C, L]`` / ``[B, L]``).

        Args:
            labels: class ids ``[B]``; adds the loss.
            output_hidden_states: also return the stem output and each stage's output.
        """
        h_BH = self.stem_proj(self.stem(self._reshape_input(pixel_values)))
        hidden = [h_BH]
        logits_all, weights_all, inputs_all = [], [], []
        for stage in self.stages:
            h_BH, logits_BE, weights_BE, z_BH = stage(h_BH)
            logits_all.append(logits_BE)
            weights_all.append(weights_BE)
            inputs_all.append(z_BH)
            hidden.append(h_BH)
        logits_BN = self.classifier(self.head_norm(h_BH))
        aux = self.balance_loss(logits_all, weights_all)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits_BN.float(), labels.long())
            if self.config.router_aux_loss_coef > 0:
                loss = loss + self.config.router_aux_loss_coef * aux
        return MoEImageClassifierOutput(
            loss=loss,
            logits=logits_BN,
            router_logits=tuple(logits_all),
            routing_weights=tuple(weights_all),
            router_inputs=tuple(inputs_all),
            aux_loss=aux,
            hidden_states=tuple(hidden) if output_hidden_states else None,
        )

    def balance_loss(self, logits_LBE: list[torch.Tensor], weights_LBE: list[torch.Tensor]) -> torch.Tensor:
        """Mean over stages of ``E · Σ_e f_e P_e``; f counts the top-k (dense: top-1) choices."""
        k = self.config.top_k or 1
        indices = [torch.topk(w, k, dim=-1).indices for w in weights_LBE]
        return M.layerwise_load_balance_loss(logits_LBE, indices, validate=False)

    # -- routers ---------------------------------------------------------------------------------
    def routed_routers(self) -> list[tuple[str, RouterScorer]]:
        """``(name, scorer)`` of every stage's router, in order."""
        return [(f"stages.{i}.scorer", stage.scorer) for i, stage in enumerate(self.stages)]

    def router_regularization_loss(self) -> torch.Tensor:
        """Σ over stages of each router's weighted penalty, plus the processor penalties if enabled."""
        total = torch.zeros((), device=self.classifier.weight.device)
        for stage in self.stages:
            total = total + stage.scorer.regularization_loss()
        ws, wr = self.config.processor_spectral_weight, self.config.processor_stable_rank_weight
        if ws or wr:
            for stage in self.stages:
                terms = stage.processor_regularization_terms()
                total = total + ws * terms["spectral"] + wr * terms["stable_rank"]
        return total


def register_vision_auto_classes() -> None:
    """Register the config with ``AutoConfig`` and the model with ``AutoModel`` and
    ``AutoModelForImageClassification`` (idempotent)."""
    AutoConfig.register(MoEImageClassifierConfig.model_type, MoEImageClassifierConfig, exist_ok=True)
    AutoModel.register(MoEImageClassifierConfig, MoEImageClassifier, exist_ok=True)
    AutoModelForImageClassification.register(MoEImageClassifierConfig, MoEImageClassifier, exist_ok=True)


register_vision_auto_classes()

"""Routed DeepSeek-V3: sigmoid scores, group-limited top-k with a selection-only bias, any router.

``model_type="routed_deepseek_v3"``. The router keeps DeepSeek's selection: sigmoid of the logits,
``+ e_score_correction_bias`` (a buffer, used to choose experts only; the weights come from the
uncorrected scores), the best ``topk_group`` of ``n_group`` expert groups, top-k inside them,
renormalisation when ``norm_topk_prob`` and ``× routed_scaling_factor``. Router inputs are cast to
float32 first, as the host does. Dense layers (``first_k_dense_replace``) have no router.
"""

import torch
from huggingface_hub.dataclasses import strict
from transformers import DeepseekV3Config
from transformers import initialization as init
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3ForCausalLM,
    DeepseekV3Model,
    DeepseekV3PreTrainedModel,
    DeepseekV3TopkRouter,
)

from ..families import FamilyAdapter, register_family
from .base import (
    RoutedConfigMixin,
    RoutedPreTrainedMixin,
    RoutedRouterMixin,
    convert_to_routed,
)

__all__ = [
    "RoutedDeepseekV3Config",
    "RoutedDeepseekV3ForCausalLM",
    "RoutedDeepseekV3Model",
    "RoutedDeepseekV3PreTrainedModel",
    "RoutedDeepseekV3TopkRouter",
]


class RoutedDeepseekV3TopkRouter(RoutedRouterMixin, DeepseekV3TopkRouter):
    """DeepSeek-V3's router with a pluggable scorer (the correction bias stays on the router).

    The aux-loss-free expert bias *is* ``e_score_correction_bias``: ``update_expert_bias`` moves it
    when the router config's ``expert_bias_update_rate > 0``; with 0 it is the checkpoint's, fixed.
    """

    expert_bias_attribute = "e_score_correction_bias"

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_TH = hidden_states.view(-1, self.hidden_dim).type(torch.float32)
        logits_TE = self.router_logits(x_TH)
        scores_TE = logits_TE.sigmoid()
        indices_TK = self.replayed_experts(x_TH.shape[0], logits_TE.device)
        if indices_TK is None:
            indices_TK = self._group_limited_choice(scores_TE)
        # The weights use the uncorrected scores (also of a replayed routing).
        weights_TK = scores_TE.gather(1, indices_TK)
        if self.norm_topk_prob:
            weights_TK /= weights_TK.sum(dim=-1, keepdim=True) + 1e-20
        weights_TK = weights_TK * self.routed_scaling_factor
        self.record_experts(indices_TK)
        return logits_TE, weights_TK, indices_TK

    def _group_limited_choice(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's choice ``[T, K]``: scores + correction bias, the best ``topk_group``
        groups (each scored by its two best experts), top-k inside them."""
        # The correction bias steers selection only.
        choice_TE = scores_TE + self.e_score_correction_bias
        per_group = self.num_experts // self.num_group
        group_scores = choice_TE.view(-1, self.num_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1).expand(-1, self.num_group, per_group).reshape(-1, self.num_experts)
        )
        choice_TE = choice_TE.masked_fill(~score_mask.bool(), float("-inf"))
        return torch.topk(choice_TE, k=self.top_k, dim=-1, sorted=False)[1]


@strict
class RoutedDeepseekV3Config(RoutedConfigMixin, DeepseekV3Config):
    """``DeepseekV3Config`` plus ``moe_router`` (None: DeepSeek-V3's own linear router)."""

    model_type = "routed_deepseek_v3"
    moe_router: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_moe_router()


class RoutedDeepseekV3PreTrainedModel(RoutedPreTrainedMixin, DeepseekV3PreTrainedModel):
    config: RoutedDeepseekV3Config
    # The host keeps its gate's weight in float32; ours are the scorer's parameters.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.scorer"]

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, RoutedDeepseekV3TopkRouter):
            init.zeros_(module.e_score_correction_bias)  # the host branch would also touch `weight`
            return
        super()._init_weights(module)


class RoutedDeepseekV3Model(RoutedDeepseekV3PreTrainedModel, DeepseekV3Model):
    def __init__(self, config: RoutedDeepseekV3Config):
        super().__init__(config)
        convert_to_routed(self, ADAPTER, config.router_config, from_dense=False)
        self.post_init()


class RoutedDeepseekV3ForCausalLM(RoutedDeepseekV3PreTrainedModel, DeepseekV3ForCausalLM):
    def __init__(self, config: RoutedDeepseekV3Config):
        super().__init__(config)
        convert_to_routed(self, ADAPTER, config.router_config, from_dense=False)
        self.post_init()


def _dense_gate(router: torch.nn.Module) -> tuple[torch.Tensor, None]:
    return router.weight, None


ADAPTER = register_family(
    FamilyAdapter(
        name="DeepSeek-V3",
        host_model_type="deepseek_v3",
        routed_model_type=RoutedDeepseekV3Config.model_type,
        host_router_class=DeepseekV3TopkRouter,
        routed_router_class=RoutedDeepseekV3TopkRouter,
        routed_config_class=RoutedDeepseekV3Config,
        model_classes={
            DeepseekV3Model: RoutedDeepseekV3Model,
            DeepseekV3ForCausalLM: RoutedDeepseekV3ForCausalLM,
        },
        hidden_size=lambda c: c.hidden_size,
        num_experts=lambda c: c.n_routed_experts,
        top_k=lambda c: c.num_experts_per_tok,
        dense_gate=_dense_gate,
        gate_attributes=("weight",),
        logits_index=0,
        indices_index=2,  # the router's own choice: corrected by the bias, group-limited
        selection="group_limited_topk",
        # Sigmoid scores, normalised per token as in DeepSeek-V3's sequence-wise balance loss.
        balance_scoring="sigmoid",
    )
)

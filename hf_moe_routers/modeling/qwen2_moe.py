"""Routed Qwen2-MoE: Qwen2-MoE with any hf_moe_routers router (``model_type="routed_qwen2_moe"``)."""

import torch
from huggingface_hub.dataclasses import strict
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import (
    Qwen2MoeForCausalLM,
    Qwen2MoeModel,
    Qwen2MoePreTrainedModel,
    Qwen2MoeTopKRouter,
)

from ..families import FamilyAdapter, register_family
from .base import (
    RoutedConfigMixin,
    RoutedPreTrainedMixin,
    SoftmaxTopKRoutedRouter,
    convert_to_routed,
)

__all__ = [
    "RoutedQwen2MoeConfig",
    "RoutedQwen2MoeForCausalLM",
    "RoutedQwen2MoeModel",
    "RoutedQwen2MoePreTrainedModel",
    "RoutedQwen2MoeTopKRouter",
]


class RoutedQwen2MoeTopKRouter(SoftmaxTopKRoutedRouter, Qwen2MoeTopKRouter):
    """Qwen2Moe's router with a pluggable scorer: softmax, top-k, renormalised only with
    ``norm_topk_prob``, weights cast to the logits' dtype."""

    always_renormalize = False
    cast_weights_to_logits_dtype = True


@strict
class RoutedQwen2MoeConfig(RoutedConfigMixin, Qwen2MoeConfig):
    """``Qwen2MoeConfig`` plus ``moe_router``, the router config as a dict (None: Qwen2Moe's own)."""

    model_type = "routed_qwen2_moe"
    moe_router: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_moe_router()


class RoutedQwen2MoePreTrainedModel(RoutedPreTrainedMixin, Qwen2MoePreTrainedModel):
    config: RoutedQwen2MoeConfig


class RoutedQwen2MoeModel(RoutedQwen2MoePreTrainedModel, Qwen2MoeModel):
    def __init__(self, config: RoutedQwen2MoeConfig):
        super().__init__(config)
        convert_to_routed(self, ADAPTER, config.router_config, from_dense=False)
        self.post_init()


class RoutedQwen2MoeForCausalLM(RoutedQwen2MoePreTrainedModel, Qwen2MoeForCausalLM):
    def __init__(self, config: RoutedQwen2MoeConfig):
        super().__init__(config)
        convert_to_routed(self, ADAPTER, config.router_config, from_dense=False)
        self.post_init()


def _dense_gate(router: torch.nn.Module) -> tuple[torch.Tensor, None]:
    return router.weight, None


ADAPTER = register_family(
    FamilyAdapter(
        name="Qwen2Moe",
        host_model_type="qwen2_moe",
        routed_model_type=RoutedQwen2MoeConfig.model_type,
        host_router_class=Qwen2MoeTopKRouter,
        routed_router_class=RoutedQwen2MoeTopKRouter,
        routed_config_class=RoutedQwen2MoeConfig,
        model_classes={Qwen2MoeModel: RoutedQwen2MoeModel, Qwen2MoeForCausalLM: RoutedQwen2MoeForCausalLM},
        hidden_size=lambda c: c.hidden_size,
        num_experts=lambda c: c.num_experts,
        top_k=lambda c: c.num_experts_per_tok,
        dense_gate=_dense_gate,
        gate_attributes=("weight",),
        logits_index=0,
        indices_index=2,
        selection="topk",
        balance_scoring="softmax",
    )
)

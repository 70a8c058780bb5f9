"""Routed Qwen3-MoE: Qwen3-MoE with any hf_moe_routers router (``model_type="routed_qwen3_moe"``)."""

import torch
from huggingface_hub.dataclasses import strict
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeForCausalLM,
    Qwen3MoeModel,
    Qwen3MoePreTrainedModel,
    Qwen3MoeTopKRouter,
)

from ..families import FamilyAdapter, register_family
from .base import (
    RoutedConfigMixin,
    RoutedPreTrainedMixin,
    SoftmaxTopKRoutedRouter,
    convert_to_routed,
)

__all__ = [
    "RoutedQwen3MoeConfig",
    "RoutedQwen3MoeForCausalLM",
    "RoutedQwen3MoeModel",
    "RoutedQwen3MoePreTrainedModel",
    "RoutedQwen3MoeTopKRouter",
]


class RoutedQwen3MoeTopKRouter(SoftmaxTopKRoutedRouter, Qwen3MoeTopKRouter):
    """Qwen3Moe's router with a pluggable scorer: softmax, top-k, renormalised only with
    ``norm_topk_prob``, weights cast to the logits' dtype."""

    always_renormalize = False
    cast_weights_to_logits_dtype = True


@strict
class RoutedQwen3MoeConfig(RoutedConfigMixin, Qwen3MoeConfig):
    """``Qwen3MoeConfig`` plus ``moe_router``, the router config as a dict (None: Qwen3Moe's own)."""

    model_type = "routed_qwen3_moe"
    moe_router: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_moe_router()


class RoutedQwen3MoePreTrainedModel(RoutedPreTrainedMixin, Qwen3MoePreTrainedModel):
    config: RoutedQwen3MoeConfig


class RoutedQwen3MoeModel(RoutedQwen3MoePreTrainedModel, Qwen3MoeModel):
    def __init__(self, config: RoutedQwen3MoeConfig):
        super().__init__(config)
        convert_to_routed(self, ADAPTER, config.router_config, from_dense=False)
        self.post_init()


class RoutedQwen3MoeForCausalLM(RoutedQwen3MoePreTrainedModel, Qwen3MoeForCausalLM):
    def __init__(self, config: RoutedQwen3MoeConfig):
        super().__init__(config)
        convert_to_routed(self, ADAPTER, config.router_config, from_dense=False)
        self.post_init()


def _dense_gate(router: torch.nn.Module) -> tuple[torch.Tensor, None]:
    return router.weight, None


ADAPTER = register_family(
    FamilyAdapter(
        name="Qwen3Moe",
        host_model_type="qwen3_moe",
        routed_model_type=RoutedQwen3MoeConfig.model_type,
        host_router_class=Qwen3MoeTopKRouter,
        routed_router_class=RoutedQwen3MoeTopKRouter,
        routed_config_class=RoutedQwen3MoeConfig,
        model_classes={Qwen3MoeModel: RoutedQwen3MoeModel, Qwen3MoeForCausalLM: RoutedQwen3MoeForCausalLM},
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

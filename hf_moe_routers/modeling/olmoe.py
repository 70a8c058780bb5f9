"""Routed OLMoE: OLMoE with any hf_moe_routers router (``model_type="routed_olmoe"``)."""

import torch
from huggingface_hub.dataclasses import strict
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import (
    OlmoeForCausalLM,
    OlmoeModel,
    OlmoePreTrainedModel,
    OlmoeTopKRouter,
)

from ..families import FamilyAdapter, register_family
from .base import (
    RoutedConfigMixin,
    RoutedPreTrainedMixin,
    SoftmaxTopKRoutedRouter,
    convert_to_routed,
)

__all__ = [
    "RoutedOlmoeConfig",
    "RoutedOlmoeForCausalLM",
    "RoutedOlmoeModel",
    "RoutedOlmoePreTrainedModel",
    "RoutedOlmoeTopKRouter",
]


class RoutedOlmoeTopKRouter(SoftmaxTopKRoutedRouter, OlmoeTopKRouter):
    """Olmoe's router with a pluggable scorer: softmax, top-k, renormalised only with
    ``norm_topk_prob``, weights cast to the logits' dtype."""

    always_renormalize = False
    cast_weights_to_logits_dtype = True


@strict
class RoutedOlmoeConfig(RoutedConfigMixin, OlmoeConfig):
    """``OlmoeConfig`` plus ``moe_router``, the router config as a dict (None: Olmoe's own)."""

    model_type = "routed_olmoe"
    moe_router: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_moe_router()


class RoutedOlmoePreTrainedModel(RoutedPreTrainedMixin, OlmoePreTrainedModel):
    config: RoutedOlmoeConfig


class RoutedOlmoeModel(RoutedOlmoePreTrainedModel, OlmoeModel):
    def __init__(self, config: RoutedOlmoeConfig):
        super().__init__(config)
        convert_to_routed(self, ADAPTER, config.router_config, from_dense=False)
        self.post_init()


class RoutedOlmoeForCausalLM(RoutedOlmoePreTrainedModel, OlmoeForCausalLM):
    def __init__(self, config: RoutedOlmoeConfig):
        super().__init__(config)
        convert_to_routed(self, ADAPTER, config.router_config, from_dense=False)
        self.post_init()


def _dense_gate(router: torch.nn.Module) -> tuple[torch.Tensor, None]:
    return router.weight, None


ADAPTER = register_family(
    FamilyAdapter(
        name="Olmoe",
        host_model_type="olmoe",
        routed_model_type=RoutedOlmoeConfig.model_type,
        host_router_class=OlmoeTopKRouter,
        routed_router_class=RoutedOlmoeTopKRouter,
        routed_config_class=RoutedOlmoeConfig,
        model_classes={OlmoeModel: RoutedOlmoeModel, OlmoeForCausalLM: RoutedOlmoeForCausalLM},
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

"""Routed Mixtral: Mixtral with any hf_moe_routers router (``model_type="routed_mixtral"``)."""

import torch
from huggingface_hub.dataclasses import strict
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import (
    MixtralForCausalLM,
    MixtralModel,
    MixtralPreTrainedModel,
    MixtralTopKRouter,
)

from ..families import FamilyAdapter, register_family
from .base import (
    RoutedConfigMixin,
    RoutedPreTrainedMixin,
    SoftmaxTopKRoutedRouter,
    convert_to_routed,
)

__all__ = [
    "RoutedMixtralConfig",
    "RoutedMixtralForCausalLM",
    "RoutedMixtralModel",
    "RoutedMixtralPreTrainedModel",
    "RoutedMixtralTopKRouter",
]


class RoutedMixtralTopKRouter(SoftmaxTopKRoutedRouter, MixtralTopKRouter):
    """Mixtral's router with a pluggable scorer: softmax, top-k, always renormalised, fp32 weights."""

    always_renormalize = True
    cast_weights_to_logits_dtype = False


@strict
class RoutedMixtralConfig(RoutedConfigMixin, MixtralConfig):
    """``MixtralConfig`` plus ``moe_router``, the router config as a dict (None: Mixtral's own)."""

    model_type = "routed_mixtral"
    moe_router: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_moe_router()


class RoutedMixtralPreTrainedModel(RoutedPreTrainedMixin, MixtralPreTrainedModel):
    config: RoutedMixtralConfig


class RoutedMixtralModel(RoutedMixtralPreTrainedModel, MixtralModel):
    def __init__(self, config: RoutedMixtralConfig):
        super().__init__(config)
        convert_to_routed(self, ADAPTER, config.router_config, from_dense=False)
        self.post_init()


class RoutedMixtralForCausalLM(RoutedMixtralPreTrainedModel, MixtralForCausalLM):
    def __init__(self, config: RoutedMixtralConfig):
        super().__init__(config)
        convert_to_routed(self, ADAPTER, config.router_config, from_dense=False)
        self.post_init()


def _dense_gate(router: torch.nn.Module) -> tuple[torch.Tensor, None]:
    return router.weight, None


ADAPTER = register_family(
    FamilyAdapter(
        name="Mixtral",
        host_model_type="mixtral",
        routed_model_type=RoutedMixtralConfig.model_type,
        host_router_class=MixtralTopKRouter,
        routed_router_class=RoutedMixtralTopKRouter,
        routed_config_class=RoutedMixtralConfig,
        model_classes={MixtralModel: RoutedMixtralModel, MixtralForCausalLM: RoutedMixtralForCausalLM},
        hidden_size=lambda c: c.hidden_size,
        num_experts=lambda c: c.num_local_experts,
        top_k=lambda c: c.num_experts_per_tok,
        dense_gate=_dense_gate,
        gate_attributes=("weight",),
        logits_index=0,
        indices_index=2,
        selection="topk",
        balance_scoring="softmax",
    )
)

"""Routed gpt-oss: top-k on the logits, then softmax over the k chosen, any router.

``model_type="routed_gpt_oss"``. The router lives at ``mlp.router`` and has a bias; the block
flattens the tokens before calling it. The top-k weights are cast to the hidden states' dtype (the
host computes them in the logits' dtype, which is the same for its own linear gate). Hub kernels
(``use_kernels=True``) replace the whole MLP and bypass any router: ``patch_moe_routers`` refuses
such a model.
"""

import torch
from huggingface_hub.dataclasses import strict
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import (
    GptOssForCausalLM,
    GptOssModel,
    GptOssPreTrainedModel,
    GptOssTopKRouter,
)

from ..families import FamilyAdapter, register_family
from .base import (
    RoutedConfigMixin,
    RoutedPreTrainedMixin,
    RoutedRouterMixin,
    convert_to_routed,
)

__all__ = [
    "RoutedGptOssConfig",
    "RoutedGptOssForCausalLM",
    "RoutedGptOssModel",
    "RoutedGptOssPreTrainedModel",
    "RoutedGptOssTopKRouter",
]


#: gpt-oss's gate is a weight and a bias held directly on the router.
_GATE_ATTRIBUTES = ("weight", "bias")


class RoutedGptOssTopKRouter(RoutedRouterMixin, GptOssTopKRouter):
    """gpt-oss's router with a pluggable scorer: top-k logits, softmax over those k."""

    host_gate_attributes = _GATE_ATTRIBUTES

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_TE = self.router_logits(hidden_states)
        bias_E = self.selection_bias()
        indices_TK = self.replayed_experts(logits_TE.shape[0], logits_TE.device)
        if indices_TK is None and bias_E is None:
            top_values_TK, indices_TK = torch.topk(logits_TE, self.top_k, dim=-1)
        else:
            # A replayed routing, or aux-loss-free balancing (select on logits + bias): the weights
            # stay a softmax over the k chosen, unbiased logits.
            if indices_TK is None:
                indices_TK = torch.topk(logits_TE.float() + bias_E, self.top_k, dim=-1).indices
            top_values_TK = logits_TE.gather(1, indices_TK)
        weights_TK = torch.nn.functional.softmax(top_values_TK, dim=1, dtype=top_values_TK.dtype)
        self.record_experts(indices_TK)
        return logits_TE, weights_TK.to(hidden_states.dtype), indices_TK


@strict
class RoutedGptOssConfig(RoutedConfigMixin, GptOssConfig):
    """``GptOssConfig`` plus ``moe_router`` (None: gpt-oss's own linear router with bias)."""

    model_type = "routed_gpt_oss"
    moe_router: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_moe_router()


class RoutedGptOssPreTrainedModel(RoutedPreTrainedMixin, GptOssPreTrainedModel):
    config: RoutedGptOssConfig


class RoutedGptOssModel(RoutedGptOssPreTrainedModel, GptOssModel):
    def __init__(self, config: RoutedGptOssConfig):
        super().__init__(config)
        convert_to_routed(self, ADAPTER, config.router_config, from_dense=False)
        self.post_init()


class RoutedGptOssForCausalLM(RoutedGptOssPreTrainedModel, GptOssForCausalLM):
    def __init__(self, config: RoutedGptOssConfig):
        super().__init__(config)
        convert_to_routed(self, ADAPTER, config.router_config, from_dense=False)
        self.post_init()


def _dense_gate(router: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return router.weight, router.bias


ADAPTER = register_family(
    FamilyAdapter(
        name="gpt-oss",
        host_model_type="gpt_oss",
        routed_model_type=RoutedGptOssConfig.model_type,
        host_router_class=GptOssTopKRouter,
        routed_router_class=RoutedGptOssTopKRouter,
        routed_config_class=RoutedGptOssConfig,
        model_classes={GptOssModel: RoutedGptOssModel, GptOssForCausalLM: RoutedGptOssForCausalLM},
        hidden_size=lambda c: c.hidden_size,
        num_experts=lambda c: c.num_local_experts,
        top_k=lambda c: c.num_experts_per_tok,
        dense_gate=_dense_gate,
        has_bias=lambda c: True,
        gate_attributes=_GATE_ATTRIBUTES,
        logits_index=0,
        indices_index=2,
        selection="topk",
        # The router weights are a softmax over the K selected logits only, so the balance loss
        # uses those (zero elsewhere), not transformers' copied full-softmax loss (docs/TRANSFORMERS.md §1).
        balance_scoring="topk_softmax",
    )
)

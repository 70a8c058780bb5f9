"""Routed Switch Transformers: encoder-decoder, top-1 with expert capacity, any router.

``model_type="routed_switch_transformers"``. The Switch router takes ``[B, S, H]`` and returns
``(one-hot expert index with capacity mask [B, S, E], top-1 probability [B, S, 1], logits [B, S, E])``;
ours keeps that contract, its jitter (multiplicative, training only, applied in place as the host
does) and its capacity rule (tokens of a sequence claim slots in order).
"""

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import SwitchTransformersConfig
from transformers import initialization as init
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersEncoderModel,
    SwitchTransformersForConditionalGeneration,
    SwitchTransformersModel,
    SwitchTransformersPreTrainedModel,
    SwitchTransformersSparseMLP,
    SwitchTransformersStack,
    SwitchTransformersTop1Router,
)

from ..families import FamilyAdapter, register_family
from .base import (
    RoutedConfigMixin,
    RoutedPreTrainedMixin,
    RoutedRouterMixin,
    convert_to_routed,
)

__all__ = [
    "RoutedSwitchTransformersConfig",
    "RoutedSwitchTransformersEncoderModel",
    "RoutedSwitchTransformersForConditionalGeneration",
    "RoutedSwitchTransformersModel",
    "RoutedSwitchTransformersPreTrainedModel",
    "RoutedSwitchTransformersStack",
    "RoutedSwitchTransformersTop1Router",
]


#: The router attribute holding Switch's gate: a ``classifier`` Linear, not a ``weight``.
_GATE_ATTRIBUTES = ("classifier",)


class RoutedSwitchTransformersTop1Router(RoutedRouterMixin, SwitchTransformersTop1Router):
    """Switch's top-1 router with a pluggable scorer."""

    host_gate_attributes = _GATE_ATTRIBUTES

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(self.dtype)
        if self.training and self.jitter_noise > 0:
            # In place, like the host: in the router dtype the experts see the jittered input too.
            hidden_states *= torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        batch, seq, hidden = hidden_states.shape
        logits_BSE = self.router_logits(hidden_states.reshape(-1, hidden)).reshape(
            batch, seq, self.num_experts
        )
        chosen_BS, top1_prob_BS1 = self.top1_choice(logits_BSE)
        self.record_experts(chosen_BS.reshape(-1, 1))
        expert_index = nn.functional.one_hot(chosen_BS, num_classes=self.num_experts)
        # Capacity: the n-th token of a sequence sent to an expert is dropped once n > capacity.
        token_priority = torch.cumsum(expert_index, dim=-2)
        expert_index = expert_index * (token_priority <= self.expert_capacity)
        return expert_index, top1_prob_BS1, logits_BSE

    def top1_choice(self, logits_BSE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert each token chooses (before capacity dropping) and its probability ``[..., 1]``,
        from the logits ``[..., E]`` of the last forward (its input dtype).

        The host's argmax of the softmax; with an expert bias, the argmax of logits + bias
        (aux-loss-free balancing); in a ``replay_routing`` context, the replayed expert. Always
        weighed with the unbiased probability. The adapter asks this for the experts the router
        chose, which its one-hot output loses for dropped tokens.
        """
        probs = nn.functional.softmax(logits_BSE, dim=-1, dtype=self.dtype).to(self.input_dtype)
        bias_E = self.selection_bias()
        replayed = self.replayed_experts(probs[..., 0].numel(), probs.device)
        if replayed is not None:
            chosen = replayed.reshape(probs.shape[:-1])
        elif bias_E is None:
            chosen = torch.argmax(probs, dim=-1)
            return chosen, torch.max(probs, dim=-1).values.unsqueeze(-1)
        else:
            chosen = torch.argmax(logits_BSE.float() + bias_E, dim=-1)
        return chosen, probs.gather(-1, chosen.unsqueeze(-1))


@strict
class RoutedSwitchTransformersConfig(RoutedConfigMixin, SwitchTransformersConfig):
    """``SwitchTransformersConfig`` plus ``moe_router`` (None: Switch's own linear router)."""

    model_type = "routed_switch_transformers"
    moe_router: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_moe_router()
        if getattr(self, "decoder_start_token_id", None) is None:
            # Without it, a forward with labels fails in _shift_right (docs/TRANSFORMERS.md pitfall 12).
            self.decoder_start_token_id = self.pad_token_id if self.pad_token_id is not None else 0


class RoutedSwitchTransformersPreTrainedModel(RoutedPreTrainedMixin, SwitchTransformersPreTrainedModel):
    config: RoutedSwitchTransformersConfig
    _host_uses_experts_interface = False  # a ModuleDict of experts: nothing to set

    def _router_init_std(self) -> float:
        return float(self.config.initializer_factor)  # the host's std for its classifier

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, SwitchTransformersSparseMLP) and isinstance(module.router, RoutedRouterMixin):
            # The host branch initialises router.classifier, which our routers do not have.
            factor, d_model = self.config.initializer_factor, self.config.d_model
            for expert in module.experts.values():
                init.normal_(expert.wi.weight, mean=0.0, std=factor * d_model**-0.5)
                init.normal_(expert.wo.weight, mean=0.0, std=factor * d_model**-0.5)
            return
        super()._init_weights(module)


class RoutedSwitchTransformersStack(RoutedSwitchTransformersPreTrainedModel, SwitchTransformersStack):
    pass


def _routed_init(self: nn.Module, config: RoutedSwitchTransformersConfig) -> None:
    convert_to_routed(self, ADAPTER, config.router_config, from_dense=False)
    self.post_init()  # type: ignore[attr-defined]


class RoutedSwitchTransformersModel(RoutedSwitchTransformersPreTrainedModel, SwitchTransformersModel):
    def __init__(self, config: RoutedSwitchTransformersConfig):
        super().__init__(config)
        _routed_init(self, config)


class RoutedSwitchTransformersForConditionalGeneration(
    RoutedSwitchTransformersPreTrainedModel, SwitchTransformersForConditionalGeneration
):
    def __init__(self, config: RoutedSwitchTransformersConfig):
        super().__init__(config)
        _routed_init(self, config)


class RoutedSwitchTransformersEncoderModel(
    RoutedSwitchTransformersPreTrainedModel, SwitchTransformersEncoderModel
):
    def __init__(self, config: RoutedSwitchTransformersConfig):
        super().__init__(config)
        _routed_init(self, config)


def _dense_gate(router: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return router.classifier.weight, router.classifier.bias


ADAPTER = register_family(
    FamilyAdapter(
        name="Switch Transformers",
        host_model_type="switch_transformers",
        routed_model_type=RoutedSwitchTransformersConfig.model_type,
        host_router_class=SwitchTransformersTop1Router,
        routed_router_class=RoutedSwitchTransformersTop1Router,
        routed_config_class=RoutedSwitchTransformersConfig,
        model_classes={
            SwitchTransformersStack: RoutedSwitchTransformersStack,
            SwitchTransformersModel: RoutedSwitchTransformersModel,
            SwitchTransformersForConditionalGeneration: RoutedSwitchTransformersForConditionalGeneration,
            SwitchTransformersEncoderModel: RoutedSwitchTransformersEncoderModel,
        },
        hidden_size=lambda c: c.d_model,
        num_experts=lambda c: c.num_experts,
        top_k=lambda c: 1,
        dense_gate=_dense_gate,
        has_bias=lambda c: bool(c.router_bias),
        gate_attributes=_GATE_ATTRIBUTES,
        # The router takes [B, S, H] and returns (one-hot dispatch mask [B, S, E], top-1 probability
        # [B, S, 1], logits [B, S, E]): the logits come last and no expert indices come back.
        router_input="sequences",
        logits_index=2,
        indices_index=None,
        selection="top1_capacity",
        router_top_k=lambda router: 1,  # the host router has no top_k attribute
        balance_scoring="softmax",
    )
)

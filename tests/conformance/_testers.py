"""Model testers for the conformance run: tiny configs and inputs of every host family.

transformers' mixins read a ``model_tester`` (upstream ``CausalLMModelTester`` and the per-model
testers of ``tests/models/``, none of which ship in the sdist). ``FamilyTester`` provides what the
mixins read: ``get_config()``, ``prepare_config_and_inputs_for_common()``, the sizes
(``batch_size``, ``seq_length``, ``num_hidden_layers``, ...), ``is_training`` and
``causal_lm_class`` / ``base_model_class``.

The configs follow ``tests/conftest.py``'s tiny models with the sizes of transformers' own testers:
hidden 32, 2 layers, 4 heads, 4 experts, top-2 (Switch: top-1), vocab 99, batch 13, sequence 7.
Feed-forward sizes are multiples of 8: the default experts implementation (``grouped_mm``) needs
16-byte strides, also in half precision. Every family sets ``head_dim`` (rope tests read it).
The routed tester builds the *same* config with the family's routed config class and ``moe_router``.
"""

from __future__ import annotations

import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DeepseekV3Model,
    GptOssConfig,
    GptOssForCausalLM,
    GptOssModel,
    MixtralConfig,
    MixtralForCausalLM,
    MixtralModel,
    OlmoeConfig,
    OlmoeForCausalLM,
    OlmoeModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen2MoeModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3MoeModel,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
    SwitchTransformersModel,
)

from hf_moe_routers.modeling import FAMILIES

# router_type -> the ``moe_router`` dict of the routed tester (sizes that fit hidden 32)
ROUTERS = {
    "linear": {"router_type": "linear"},
    "sr_moe": {"router_type": "sr_moe"},
    "l2r": {"router_type": "l2r", "rank": 8, "num_anchors": 2},
    "cosine": {"router_type": "cosine", "dim": 8},
}
ROUTER_TYPES = tuple(ROUTERS)

VOCAB = 99
HIDDEN = 32
LAYERS = 2
HEADS = 4
EXPERTS = 4

_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# family -> (config class, (base model class, head model class), tiny config kwargs)
HOSTS: dict[str, tuple[type, tuple[type, type], dict]] = {
    "mixtral": (
        MixtralConfig,
        (MixtralModel, MixtralForCausalLM),
        dict(_DECODER, intermediate_size=32, head_dim=8, num_local_experts=EXPERTS, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        Qwen2MoeConfig,
        (Qwen2MoeModel, Qwen2MoeForCausalLM),
        dict(
            _DECODER,
            intermediate_size=32,
            head_dim=8,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        Qwen3MoeConfig,
        (Qwen3MoeModel, Qwen3MoeForCausalLM),
        dict(
            _DECODER,
            intermediate_size=32,
            moe_intermediate_size=16,
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=8,
        ),
    ),
    "olmoe": (
        OlmoeConfig,
        (OlmoeModel, OlmoeForCausalLM),
        dict(_DECODER, intermediate_size=16, head_dim=8, num_experts=EXPERTS, num_experts_per_tok=2),
    ),
    "deepseek_v3": (
        DeepseekV3Config,
        (DeepseekV3Model, DeepseekV3ForCausalLM),
        dict(
            _DECODER,
            num_key_value_heads=HEADS,
            intermediate_size=32,
            moe_intermediate_size=16,
            n_routed_experts=EXPERTS,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            v_head_dim=8,
            qk_nope_head_dim=8,
        ),
    ),
    "gpt_oss": (
        GptOssConfig,
        (GptOssModel, GptOssForCausalLM),
        dict(
            _DECODER,
            intermediate_size=32,
            head_dim=8,
            num_local_experts=EXPERTS,
            num_experts_per_tok=2,
            sliding_window=8,
        ),
    ),
    "switch_transformers": (
        SwitchTransformersConfig,
        (SwitchTransformersModel, SwitchTransformersForConditionalGeneration),
        dict(
            vocab_size=VOCAB,
            d_model=HIDDEN,
            d_kv=8,
            d_ff=32,
            num_layers=LAYERS,
            num_decoder_layers=LAYERS,
            num_heads=HEADS,
            num_experts=EXPERTS,
            num_sparse_encoder_layers=LAYERS,
            num_sparse_decoder_layers=LAYERS,
            expert_capacity=16,
            router_jitter_noise=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
    ),
}
FAMILY_NAMES = tuple(HOSTS)
ENCODER_DECODER = {"switch_transformers"}


def model_classes(family: str, router_type: str | None) -> tuple[type, type]:
    """``(base model class, head model class)``: the host's (control) or our routed ones."""
    base, head = HOSTS[family][1]
    if router_type is None:
        return base, head
    routed = FAMILIES[family].model_classes
    return routed[base], routed[head]


def config_class(family: str, router_type: str | None) -> type:
    return HOSTS[family][0] if router_type is None else FAMILIES[family].routed_config_class


def config_kwargs(family: str, router_type: str | None) -> dict:
    kwargs = dict(HOSTS[family][2])
    if router_type is not None:
        kwargs["moe_router"] = dict(ROUTERS[router_type])
    return kwargs


def config_tester_kwargs(family: str, router_type: str | None) -> dict:
    """``ConfigTester``'s kwargs, as upstream's testers give them: a non-default hidden size (its
    JSON round trip is checked key by key, so only fields that serialise under their own name), and
    for a routed config its ``moe_router``."""
    kwargs = {"d_model" if family in ENCODER_DECODER else "hidden_size": 37}
    if router_type is not None:
        kwargs["moe_router"] = dict(ROUTERS[router_type])
    return kwargs


class FamilyTester:
    """What transformers' mixins read from ``self.model_tester``, for one family and one router
    (``router_type=None``: the unpatched host family, the control)."""

    batch_size = 13
    seq_length = 7
    is_training = True
    vocab_size = VOCAB
    hidden_size = HIDDEN
    num_hidden_layers = LAYERS
    num_attention_heads = HEADS

    def __init__(self, parent, family: str, router_type: str | None):
        self.parent = parent
        self.family = family
        self.router_type = router_type
        self.config_class = config_class(family, router_type)
        self.base_model_class, head = model_classes(family, router_type)
        self.is_encoder_decoder = family in ENCODER_DECODER
        # The training / tensor-parallel mixins train and shard this class.
        self.causal_lm_class = None if self.is_encoder_decoder else head
        if self.is_encoder_decoder:
            self.encoder_seq_length = self.decoder_seq_length = self.seq_length

    def get_config(self):
        return self.config_class(**config_kwargs(self.family, self.router_type))

    def _ids(self) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, (self.batch_size, self.seq_length))

    def _mask(self) -> torch.Tensor:
        mask = torch.randint(0, 2, (self.batch_size, self.seq_length))
        mask[:, 0] = 1  # every row attends to its first token, as upstream's random_attention_mask
        return mask

    def prepare_config_and_inputs_for_common(self):
        inputs = {"input_ids": self._ids(), "attention_mask": self._mask()}
        if self.is_encoder_decoder:
            inputs["decoder_input_ids"] = self._ids()
            inputs["decoder_attention_mask"] = self._mask()
        return self.get_config(), inputs

"""Tiny models of every supported family, built from configs (no hub access)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Remote-code tests write dynamic modules; a private cache keeps concurrent test runs (and the
# user's own ~/.cache) from seeing each other's half-written files. Set before transformers loads.
if "HF_MODULES_CACHE" not in os.environ:
    import tempfile

    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="hf_moe_routers_modules_")
# The CLI's help-text cache (cli/help_cache.py) likewise: tests must not write into ~/.cache.
if "HF_MOE_ROUTERS_CACHE" not in os.environ:
    import tempfile

    os.environ["HF_MOE_ROUTERS_CACHE"] = tempfile.mkdtemp(prefix="hf_moe_routers_cache_")

import pytest
import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)

VOCAB = 64
HIDDEN = 32
EXPERTS = 6

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_config(family: str, **overrides):
    """A small config of ``family`` with E=6 experts and top-2 routing (Switch: top-1)."""
    if family == "mixtral":
        kwargs = dict(_COMMON, intermediate_size=48, num_local_experts=EXPERTS, num_experts_per_tok=2)
        return MixtralConfig(**{**kwargs, **overrides})
    if family == "qwen2_moe":
        kwargs = dict(
            _COMMON,
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=48,
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
        return Qwen2MoeConfig(**{**kwargs, **overrides})
    if family == "qwen3_moe":
        kwargs = dict(
            _COMMON,
            intermediate_size=48,
            moe_intermediate_size=24,
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=8,
        )
        return Qwen3MoeConfig(**{**kwargs, **overrides})
    if family == "olmoe":
        kwargs = dict(
            _COMMON,
            intermediate_size=24,
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
        )
        return OlmoeConfig(**{**kwargs, **overrides})
    if family == "deepseek_v3":
        kwargs = dict(
            _COMMON,
            num_key_value_heads=4,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            kv_lora_rank=8,
            q_lora_rank=16,
            qk_rope_head_dim=4,
            v_head_dim=8,
            qk_nope_head_dim=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        return DeepseekV3Config(**{**kwargs, **overrides})
    if family == "gpt_oss":
        kwargs = dict(
            _COMMON,
            intermediate_size=32,
            head_dim=8,
            num_local_experts=EXPERTS,
            num_experts_per_tok=2,
            sliding_window=8,
        )
        return GptOssConfig(**{**kwargs, **overrides})
    if family == "switch_transformers":
        kwargs = dict(
            vocab_size=VOCAB,
            d_model=HIDDEN,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            num_experts=EXPERTS,
            num_sparse_encoder_layers=2,
            num_sparse_decoder_layers=2,
            expert_capacity=16,
            decoder_start_token_id=0,
            router_jitter_noise=0.0,
        )
        return SwitchTransformersConfig(**{**kwargs, **overrides})
    raise KeyError(family)


MODEL_CLASSES = {
    "mixtral": MixtralForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "olmoe": OlmoeForCausalLM,
    "switch_transformers": SwitchTransformersForConditionalGeneration,
    "deepseek_v3": DeepseekV3ForCausalLM,
    "gpt_oss": GptOssForCausalLM,
}
# Every supported family runs through every family-parametrised test (the `family` fixture); a test
# that cannot apply to one skips it with the reason. tests/test_modeling.py checks this list against
# hf_moe_routers.families.supported_families(), so a newly registered family cannot be left out.
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "switch_transformers")
CAUSAL_FAMILIES = tuple(f for f in FAMILIES if f != "switch_transformers")


def tiny_model(family: str, seed: int = 0, gate_std: float | None = 0.3, **overrides):
    """A tiny randomly initialised host model in eval mode; gates get a larger std so routing is
    decisive (random gates at the family's init std make every expert nearly tied)."""
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](tiny_config(family, **overrides)).eval()
    if gate_std is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("gate.weight", "router.classifier.weight", "mlp.router.weight")):
                    param.normal_(0.0, gate_std)
    return model


def with_selection_bias(model: torch.nn.Module) -> torch.nn.Module:
    """A non-zero DeepSeek-V3 selection bias (``e_score_correction_bias``), so a test sees it steer
    the choice; a no-op for the families without one."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.linspace(-0.3, 0.3, buffer.numel()))
    return model


def model_inputs(family: str, batch: int = 2, seq: int = 7, seed: int = 1, padded: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        mask[0, :3] = 0  # left padding on the first row
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family == "switch_transformers":
        inputs["decoder_input_ids"] = torch.randint(1, VOCAB, (batch, seq - 2), generator=generator)
    return inputs


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


class RandomTokens(torch.utils.data.Dataset):
    """Random token sequences with labels, optionally right-padded (label -100 on padding)."""

    def __init__(
        self, n: int, seq: int = 16, seed: int = 0, pad_every: int = 0, encoder_decoder: bool = False
    ):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, VOCAB, (n, seq), generator=generator)
        self.mask = torch.ones(n, seq, dtype=torch.long)
        if pad_every:
            for i in range(0, n, pad_every):
                self.mask[i, seq // 2 :] = 0
        self.encoder_decoder = encoder_decoder

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        item = {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}
        if self.encoder_decoder:
            item["labels"] = self.ids[i][: self.ids.shape[1] // 2]
        return item

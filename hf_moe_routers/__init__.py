"""hf-moe-routers: better routers for Hugging Face Mixture-of-Experts models.

>>> from transformers import AutoModelForCausalLM
>>> from hf_moe_routers import L2RConfig, patch_moe_routers
>>> model = patch_moe_routers(AutoModelForCausalLM.from_pretrained(path), L2RConfig(rank=16))

Importing the package registers the routed model type of every supported family
(``supported_families()``: ``routed_mixtral``, ``routed_qwen2_moe``, ``routed_qwen3_moe``,
``routed_olmoe``, ``routed_deepseek_v3``, ``routed_gpt_oss``, ``routed_switch_transformers``) with the
Auto classes.
"""

import os

# Before anything imports torch: GNU libgomp (torch's OpenMP on Linux) reads OMP_WAIT_POLICY only
# when it loads, and by default a thread that finishes its share of a kernel spins for a while
# waiting for the next one. On a machine shared with another busy process that spinning takes the
# other process's CPU and stalls ours: 30 steps of the main job next to one busy process trained in
# 93 s instead of 17 s (README, "A note on CPU threads"). PASSIVE makes waiting threads sleep,
# which makes training about 30% slower on an idle machine. setdefault: an explicit
# setting wins; once torch is imported (someone imported it first) this line changes nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .distillation import distill_router
from .export import export_to_family
from .kernels import register_experts_implementation
from .modeling import (
    RoutedDeepseekV3Config,
    RoutedDeepseekV3ForCausalLM,
    RoutedDeepseekV3Model,
    RoutedGptOssConfig,
    RoutedGptOssForCausalLM,
    RoutedGptOssModel,
    RoutedMixtralConfig,
    RoutedMixtralForCausalLM,
    RoutedMixtralModel,
    RoutedOlmoeConfig,
    RoutedOlmoeForCausalLM,
    RoutedOlmoeModel,
    RoutedQwen2MoeConfig,
    RoutedQwen2MoeForCausalLM,
    RoutedQwen2MoeModel,
    RoutedQwen3MoeConfig,
    RoutedQwen3MoeForCausalLM,
    RoutedQwen3MoeModel,
    RoutedSwitchTransformersConfig,
    RoutedSwitchTransformersEncoderModel,
    RoutedSwitchTransformersForConditionalGeneration,
    RoutedSwitchTransformersModel,
    supported_families,
)
from .modeling.publishing import push_folder_to_hub, push_routed_to_hub, save_routed_pretrained
from .patching import PatchReport, drop_reference_gates, patch_moe_routers, routing_agreement
from .routers import (
    CosineRouterConfig,
    L2RConfig,
    LinearRouterConfig,
    RouterConfig,
    SRMoEConfig,
)
from .version import __version__

# Makes `experts_implementation="hf_moe_routers"` available to every transformers MoE model.
register_experts_implementation()

__all__ = [
    "CosineRouterConfig",
    "L2RConfig",
    "LinearRouterConfig",
    "PatchReport",
    "RoutedDeepseekV3Config",
    "RoutedDeepseekV3ForCausalLM",
    "RoutedDeepseekV3Model",
    "RoutedGptOssConfig",
    "RoutedGptOssForCausalLM",
    "RoutedGptOssModel",
    "RoutedMixtralConfig",
    "RoutedMixtralForCausalLM",
    "RoutedMixtralModel",
    "RoutedOlmoeConfig",
    "RoutedOlmoeForCausalLM",
    "RoutedOlmoeModel",
    "RoutedQwen2MoeConfig",
    "RoutedQwen2MoeForCausalLM",
    "RoutedQwen2MoeModel",
    "RoutedQwen3MoeConfig",
    "RoutedQwen3MoeForCausalLM",
    "RoutedQwen3MoeModel",
    "RoutedSwitchTransformersConfig",
    "RoutedSwitchTransformersEncoderModel",
    "RoutedSwitchTransformersForConditionalGeneration",
    "RoutedSwitchTransformersModel",
    "RouterConfig",
    "SRMoEConfig",
    "distill_router",
    "drop_reference_gates",
    "export_to_family",
    "patch_moe_routers",
    "push_folder_to_hub",
    "push_routed_to_hub",
    "register_experts_implementation",
    "__version__",
    "routing_agreement",
    "save_routed_pretrained",
    "supported_families",
]

"""Routed model classes for every supported host family, registered with the Auto classes.

Importing ``hf_moe_routers`` registers ``routed_<family>`` configs with ``AutoConfig``, the model
classes with ``AutoModel`` / ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM``, and the host
family's checkpoint conversion rules under our class names (classes defined outside transformers
get no built-in rules; docs/TRANSFORMERS.md pitfall 14). Registration is idempotent.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from ..families import (
    FAMILIES,
    ONE_ELEMENT_PARAMETERS,
    FamilyAdapter,
    OneElementVector,
    family_for_model,
    supported_families,
)
from .base import (
    RoutedConfigMixin,
    RoutedPreTrainedMixin,
    RoutedRouterMixin,
)
from .deepseek_v3 import (
    RoutedDeepseekV3Config,
    RoutedDeepseekV3ForCausalLM,
    RoutedDeepseekV3Model,
    RoutedDeepseekV3PreTrainedModel,
    RoutedDeepseekV3TopkRouter,
)
from .gpt_oss import (
    RoutedGptOssConfig,
    RoutedGptOssForCausalLM,
    RoutedGptOssModel,
    RoutedGptOssPreTrainedModel,
    RoutedGptOssTopKRouter,
)
from .mixtral import (
    RoutedMixtralConfig,
    RoutedMixtralForCausalLM,
    RoutedMixtralModel,
    RoutedMixtralPreTrainedModel,
    RoutedMixtralTopKRouter,
)
from .olmoe import (
    RoutedOlmoeConfig,
    RoutedOlmoeForCausalLM,
    RoutedOlmoeModel,
    RoutedOlmoePreTrainedModel,
    RoutedOlmoeTopKRouter,
)
from .publishing import push_folder_to_hub, push_routed_to_hub, save_routed_pretrained, write_hub_files
from .qwen2_moe import (
    RoutedQwen2MoeConfig,
    RoutedQwen2MoeForCausalLM,
    RoutedQwen2MoeModel,
    RoutedQwen2MoePreTrainedModel,
    RoutedQwen2MoeTopKRouter,
)
from .qwen3_moe import (
    RoutedQwen3MoeConfig,
    RoutedQwen3MoeForCausalLM,
    RoutedQwen3MoeModel,
    RoutedQwen3MoePreTrainedModel,
    RoutedQwen3MoeTopKRouter,
)
from .remote_code import (
    ENTRY_MODULE,
    RemoteCodeFile,
    auto_map_for,
    check_remote_code,
    prepare_remote_code,
    remote_code_files,
)
from .switch_transformers import (
    RoutedSwitchTransformersConfig,
    RoutedSwitchTransformersEncoderModel,
    RoutedSwitchTransformersForConditionalGeneration,
    RoutedSwitchTransformersModel,
    RoutedSwitchTransformersPreTrainedModel,
    RoutedSwitchTransformersStack,
    RoutedSwitchTransformersTop1Router,
)

_CAUSAL_LM = (
    (RoutedMixtralConfig, RoutedMixtralModel, RoutedMixtralForCausalLM),
    (RoutedQwen2MoeConfig, RoutedQwen2MoeModel, RoutedQwen2MoeForCausalLM),
    (RoutedQwen3MoeConfig, RoutedQwen3MoeModel, RoutedQwen3MoeForCausalLM),
    (RoutedOlmoeConfig, RoutedOlmoeModel, RoutedOlmoeForCausalLM),
    (RoutedDeepseekV3Config, RoutedDeepseekV3Model, RoutedDeepseekV3ForCausalLM),
    (RoutedGptOssConfig, RoutedGptOssModel, RoutedGptOssForCausalLM),
)


def register_auto_classes() -> None:
    """Register every routed config and model with the transformers Auto classes (idempotent)."""
    for config_cls, base_cls, lm_cls in _CAUSAL_LM:
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, base_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)
    switch = RoutedSwitchTransformersConfig
    AutoConfig.register(switch.model_type, switch, exist_ok=True)
    AutoModel.register(switch, RoutedSwitchTransformersModel, exist_ok=True)
    AutoModelForSeq2SeqLM.register(switch, RoutedSwitchTransformersForConditionalGeneration, exist_ok=True)

    for adapter in {id(a): a for a in FAMILIES.values()}.values():
        adapter.register_conversion_mapping()


register_auto_classes()

__all__ = [
    "ENTRY_MODULE",
    "RemoteCodeFile",
    "auto_map_for",
    "check_remote_code",
    "prepare_remote_code",
    "push_folder_to_hub",
    "push_routed_to_hub",
    "remote_code_files",
    "save_routed_pretrained",
    "write_hub_files",
    "ONE_ELEMENT_PARAMETERS",
    "OneElementVector",
    "FAMILIES",
    "RoutedDeepseekV3Config",
    "RoutedDeepseekV3ForCausalLM",
    "RoutedDeepseekV3Model",
    "RoutedDeepseekV3PreTrainedModel",
    "RoutedDeepseekV3TopkRouter",
    "RoutedGptOssConfig",
    "RoutedGptOssForCausalLM",
    "RoutedGptOssModel",
    "RoutedGptOssPreTrainedModel",
    "RoutedGptOssTopKRouter",
    "FamilyAdapter",
    "RoutedConfigMixin",
    "RoutedMixtralConfig",
    "RoutedMixtralForCausalLM",
    "RoutedMixtralModel",
    "RoutedMixtralPreTrainedModel",
    "RoutedMixtralTopKRouter",
    "RoutedOlmoeConfig",
    "RoutedOlmoeForCausalLM",
    "RoutedOlmoeModel",
    "RoutedOlmoePreTrainedModel",
    "RoutedOlmoeTopKRouter",
    "RoutedPreTrainedMixin",
    "RoutedQwen2MoeConfig",
    "RoutedQwen2MoeForCausalLM",
    "RoutedQwen2MoeModel",
    "RoutedQwen2MoePreTrainedModel",
    "RoutedQwen2MoeTopKRouter",
    "RoutedQwen3MoeConfig",
    "RoutedQwen3MoeForCausalLM",
    "RoutedQwen3MoeModel",
    "RoutedQwen3MoePreTrainedModel",
    "RoutedQwen3MoeTopKRouter",
    "RoutedRouterMixin",
    "RoutedSwitchTransformersConfig",
    "RoutedSwitchTransformersEncoderModel",
    "RoutedSwitchTransformersForConditionalGeneration",
    "RoutedSwitchTransformersModel",
    "RoutedSwitchTransformersPreTrainedModel",
    "RoutedSwitchTransformersStack",
    "RoutedSwitchTransformersTop1Router",
    "family_for_model",
    "register_auto_classes",
    "supported_families",
]

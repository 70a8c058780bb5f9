"""Routed model classes for every supported host family, registered with the Auto classes.

Importing ``hf_moe_routers`` registers, for every family in ``FAMILIES`` (each modeling file
registers its ``FamilyAdapter``), the ``routed_<family>`` config with ``AutoConfig``, each routed
model class with the Auto class that maps the host class it replaces (``AutoModel`` /
``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM``), and the host family's checkpoint conversion
rules under our class names (classes defined outside transformers get no built-in rules;
docs/TRANSFORMERS.md pitfall 14). Registration is idempotent.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..families import (
    FAMILIES,
    ONE_ELEMENT_PARAMETERS,
    FamilyAdapter,
    OneElementVector,
    family_adapters,
    family_for_model,
    family_for_router,
    supported_families,
)
from .base import (
    CapturedRouting,
    RoutedConfigMixin,
    RoutedPreTrainedMixin,
    RoutedRouterMixin,
    capture_routing,
    replay_routing,
    update_expert_biases,
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

#: The Auto classes a routed model class can be registered with: the one whose transformers mapping
#: gives the host class it replaces (Switch's stack and encoder-only classes map to none).
_AUTO_MODEL_CLASSES = (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM)


def register_auto_classes() -> None:
    """Register every routed config and model with the transformers Auto classes (idempotent)."""
    for adapter in family_adapters():
        routed_config = adapter.routed_config_class
        AutoConfig.register(adapter.routed_model_type, routed_config, exist_ok=True)
        host_config = CONFIG_MAPPING[adapter.host_model_type]
        for auto_class in _AUTO_MODEL_CLASSES:
            if host_config not in auto_class._model_mapping:
                continue
            routed_model = adapter.model_classes.get(auto_class._model_mapping[host_config])
            if routed_model is not None:
                auto_class.register(routed_config, routed_model, exist_ok=True)
        adapter.register_conversion_mapping()


register_auto_classes()

__all__ = [
    "CapturedRouting",
    "capture_routing",
    "replay_routing",
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
    "family_adapters",
    "family_for_model",
    "family_for_router",
    "register_auto_classes",
    "supported_families",
    "update_expert_biases",
]

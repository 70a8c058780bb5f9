"""hf-moe-routers: better routers for Hugging Face Mixture-of-Experts models.

>>> from transformers import AutoModelForCausalLM
>>> from hf_moe_routers import L2RConfig, patch_moe_routers
>>> model = patch_moe_routers(AutoModelForCausalLM.from_pretrained(path), L2RConfig(rank=16))

Importing the package registers the routed model type of every supported family
(``supported_families()``: ``routed_mixtral``, ``routed_qwen2_moe``, ``routed_qwen3_moe``,
``routed_olmoe``, ``routed_deepseek_v3``, ``routed_gpt_oss``, ``routed_switch_transformers``) with the
Auto classes, as soon as transformers is imported (at once if it already is). The import itself is
cheap: the public names load on first use.
"""

import importlib
import os

# Before anything imports torch: GNU libgomp (torch's OpenMP on Linux) reads OMP_WAIT_POLICY only
# when it loads, and by default a thread that finishes its share of a kernel spins for a while
# waiting for the next one. On a machine shared with another busy process that spinning takes the
# other process's CPU and stalls ours: 30 steps of the main job next to one busy process trained in
# 93 s instead of 17 s (README, "A note on CPU threads"). PASSIVE makes waiting threads sleep,
# which makes training about 30% slower on an idle machine. setdefault: an explicit
# setting wins; once torch is imported (someone imported it first) this line changes nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from typing import TYPE_CHECKING

from ._import_hooks import call_after_import
from .version import __version__

#: Public name -> the submodule that defines it. ``import hf_moe_routers`` imports none of them
#: (nor torch, nor transformers): each is imported on first attribute access (PEP 562), so the
#: command line answers ``--help`` at once and a script pays only for what it uses.
_EXPORTS: dict[str, str] = {
    "distill_router": "distillation",
    "export_to_family": "export",
    "register_experts_implementation": "kernels",
    "push_folder_to_hub": "modeling.publishing",
    "push_routed_to_hub": "modeling.publishing",
    "save_routed_pretrained": "modeling.publishing",
    "PatchReport": "patching",
    "drop_reference_gates": "patching",
    "patch_moe_routers": "patching",
    "routing_agreement": "patching",
    "CosineRouterConfig": "routers",
    "L2RConfig": "routers",
    "LinearRouterConfig": "routers",
    "RouterConfig": "routers",
    "SRMoEConfig": "routers",
    "supported_families": "modeling",
    "CapturedRouting": "modeling",
    "capture_routing": "modeling",
    "replay_routing": "modeling",
    "update_expert_biases": "modeling",
    "RoutingMetrics": "metrics",
    **{
        f"Routed{family}{suffix}": "modeling"
        for family in ("DeepseekV3", "GptOss", "Mixtral", "Olmoe", "Qwen2Moe", "Qwen3Moe")
        for suffix in ("Config", "ForCausalLM", "Model")
    },
    **{
        f"RoutedSwitchTransformers{suffix}": "modeling"
        for suffix in ("Config", "EncoderModel", "ForConditionalGeneration", "Model")
    },
}


def __getattr__(name: str) -> object:
    """Import the submodule that defines ``name`` on first use (PEP 562) and cache the value."""
    module_name = _EXPORTS.get(name)
    if module_name is None:
        # A submodule accessed as an attribute (``hf_moe_routers.routers``) before it was imported.
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def _register_with_transformers() -> None:
    """Register every routed family with the Auto classes (importing ``modeling`` does it) and
    make ``experts_implementation="hf_moe_routers"`` available to every transformers MoE model."""
    from . import modeling  # noqa: F401  (importing it registers)
    from .kernels import register_experts_implementation

    register_experts_implementation()


# The registration imports torch, transformers and the seven family modeling files (seconds), so
# it waits until transformers is imported: by the user, by one of our modules, or already now.
call_after_import("transformers", __name__, _register_with_transformers)

if TYPE_CHECKING:  # what static tools and IDEs see; at run time the names resolve lazily
    from .distillation import distill_router
    from .export import export_to_family
    from .kernels import register_experts_implementation
    from .metrics import RoutingMetrics
    from .modeling import (
        CapturedRouting,
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
        capture_routing,
        replay_routing,
        supported_families,
        update_expert_biases,
    )
    from .modeling.publishing import push_folder_to_hub, push_routed_to_hub, save_routed_pretrained
    from .patching import PatchReport, drop_reference_gates, patch_moe_routers, routing_agreement
    from .routers import CosineRouterConfig, L2RConfig, LinearRouterConfig, RouterConfig, SRMoEConfig

__all__ = [
    "CapturedRouting",
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
    "RoutingMetrics",
    "SRMoEConfig",
    "__version__",
    "capture_routing",
    "distill_router",
    "drop_reference_gates",
    "export_to_family",
    "patch_moe_routers",
    "push_folder_to_hub",
    "push_routed_to_hub",
    "register_experts_implementation",
    "replay_routing",
    "routing_agreement",
    "save_routed_pretrained",
    "supported_families",
    "update_expert_biases",
]

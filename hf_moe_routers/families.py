"""The family adapter: everything hf-moe-routers knows about one host MoE family, and the registry
of them.

A family is described once, by the ``FamilyAdapter`` its modeling file registers
(``hf_moe_routers/modeling/<family>.py``): config fields, host and routed classes, the dense gate,
how its router turns logits into balance probabilities and top-k choices. Everything else (patching,
the routing collector, metrics, cards, export) asks the adapter and never names a family itself.

This module sits below ``modeling`` and ``cards`` (docs/ARCHITECTURE.md): it imports only the
routers and transformers, so the model cards can describe a family without importing the modeling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps

from .routers import SCORERS

__all__ = [
    "FAMILIES",
    "ONE_ELEMENT_PARAMETERS",
    "FamilyAdapter",
    "OneElementVector",
    "family_for_model",
    "model_type_of",
    "register_family",
    "supported_families",
]


#: Every router parameter that holds one number, over all router types (see
#: ``RouterScorer.one_element_parameters``).
ONE_ELEMENT_PARAMETERS: frozenset[str] = frozenset(
    name for cls in SCORERS.values() for name in cls.one_element_parameters
)


class OneElementVector(ConversionOps):
    """A transformers conversion op: one tensor in, the same numbers as a ``[1]`` vector out.

    Loading: hf-moe-routers 0.1.0 saved one-number router parameters 0-dim; they are ``[1]`` now
    (FSDP2 refuses 0-dim parameters). Saving applies the same op, so checkpoints are written ``[1]``.
    """

    def convert(
        self,
        input_dict: dict[str, Any],
        source_patterns: list[str],
        target_patterns: list[str],
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        if len(input_dict) != 1:
            raise ValueError(
                f"OneElementVector converts one tensor at a time; got keys {sorted(input_dict)}."
            )
        (value,) = input_dict.values()
        tensor = value[0] if isinstance(value, list) else value
        # Only a 0-dim tensor is rewritten: under FSDP2 transformers hands each rank its shard of the
        # [1] vector before conversion ([1] on one rank, [0] on the other), which pass unchanged.
        if tensor.dim() == 0:
            tensor = tensor.reshape(1)
        return {target_patterns[0]: tensor}

    @property
    def reverse_op(self) -> OneElementVector:
        return OneElementVector()


@dataclasses.dataclass(frozen=True)
class FamilyAdapter:
    """Everything the patcher and the model classes need to know about one host family."""

    name: str
    host_model_type: str
    routed_model_type: str
    host_router_class: type[nn.Module]
    routed_router_class: type[nn.Module]
    routed_config_class: type
    model_classes: dict[type, type]
    hidden_size: Callable[[Any], int]
    num_experts: Callable[[Any], int]
    top_k: Callable[[Any], int]
    dense_gate: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]]
    has_bias: Callable[[Any], bool] = lambda config: False

    def conversion_mapping(self, *, zero_dim_one_element: bool = False) -> list[Any]:
        """transformers' checkpoint conversion rules for this family's routed classes.

        The host family's own rules (legacy per-expert layouts; classes defined outside
        transformers get none by default). With ``zero_dim_one_element``, also a rule per
        one-element router parameter that reads the 0-dim tensors of hf-moe-routers 0.1.0
        checkpoints as ``[1]``; ``RoutedPreTrainedMixin.from_pretrained`` adds those only while it
        loads such a checkpoint (transformers expects every registered rule to match the keys of
        every checkpoint the class saves, and most routers have no such parameter).
        """
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        mapping = list(get_checkpoint_conversion_mapping(self.host_model_type) or [])
        if zero_dim_one_element:
            for name in sorted(ONE_ELEMENT_PARAMETERS):
                pattern = f"scorer.{name}"
                mapping.append(WeightConverter(pattern, pattern, operations=[OneElementVector()]))
        return mapping

    def register_conversion_mapping(
        self, *, zero_dim_one_element: bool = False, restore: bool = False
    ) -> None:
        """Register ``conversion_mapping`` under the routed model type and every routed class name.

        Nothing is registered when there is no rule, unless ``restore`` (undoing a temporary one).
        """
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping

        mapping = self.conversion_mapping(zero_dim_one_element=zero_dim_one_element)
        if not mapping and not restore:
            return
        for name in [self.routed_model_type] + [cls.__name__ for cls in self.model_classes.values()]:
            register_checkpoint_conversion_mapping(name, mapping, overwrite=True)

    def validate_host_config(self, config: Any) -> None:
        num_experts, top_k = self.num_experts(config), self.top_k(config)
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(
                f"{type(config).__name__}: the number of experts per token (top_k) must be between 1 and "
                f"the number of experts {num_experts}; got {top_k!r}."
            )


FAMILIES: dict[str, FamilyAdapter] = {}


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    FAMILIES[adapter.host_model_type] = adapter
    FAMILIES[adapter.routed_model_type] = adapter
    return adapter


def supported_families() -> list[str]:
    return sorted({adapter.host_model_type for adapter in FAMILIES.values()})


def family_for_model(model: nn.Module) -> FamilyAdapter:
    """The adapter for a transformers model; a clear error for anything we do not support."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"hf_moe_routers does not support model_type={model_type!r} ({type(model).__name__}); "
            f"supported families: {', '.join(supported_families())}."
        )
    return FAMILIES[model_type]


def model_type_of(model_or_config: Any) -> str | None:
    """The model type of a model, a config or a ``model_type`` string.

    The config *class* decides, as in ``PreTrainedConfig.to_dict``: a config loaded from
    config.json also carries ``model_type`` as an instance attribute, which keeps the host's value
    after ``patch_moe_routers`` swaps the config's class.
    """
    if isinstance(model_or_config, str):
        return model_or_config
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(type(config), "model_type", None) or getattr(config, "model_type", None)

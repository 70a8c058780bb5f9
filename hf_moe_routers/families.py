"""The family adapter: everything hf-moe-routers knows about one host MoE family, and the registry
of them.

A family is described once, by the ``FamilyAdapter`` its modeling file registers
(``hf_moe_routers/modeling/<family>.py``): config fields, host and routed classes, the dense gate and
the router attributes that hold it, how its router is called and what its output tuple holds, how
it selects experts and how its logits become balance probabilities. Everything else (patching, the
routing collector, metrics, cards, export) asks the adapter and never names a family itself.

This module sits below ``modeling`` and ``cards`` (docs/ARCHITECTURE.md): it imports only the
routers and transformers, so the model cards can describe a family without importing the modeling.
It is also part of every routed checkpoint's remote code (``modeling/remote_code.py``), which is why
the balance-probability rules are written out here with torch alone rather than imported from
``metrics`` (that would add files to the remote code); ``tests/test_modeling.py`` checks that both
agree and that each family's rule matches transformers' own code for that family.

Shape legend: T tokens, B batch, S sequence, H router input size, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps

from .numerics import ROUTING_SCORINGS, routing_probabilities
from .routers import SCORERS

__all__ = [
    "BALANCE_SCORINGS",
    "FAMILIES",
    "ONE_ELEMENT_PARAMETERS",
    "SELECTION_RULES",
    "BalanceScoring",
    "FamilyAdapter",
    "OneElementVector",
    "RouterInput",
    "SelectionRule",
    "family_adapters",
    "family_for_model",
    "family_for_router",
    "model_type_of",
    "register_family",
    "supported_families",
]

#: How a family's router turns logits into the routing probabilities ``P_e`` of the balance loss;
#: the same names as ``hf_moe_routers.metrics.routing_probs(scoring=...)``.
BalanceScoring = Literal["softmax", "sigmoid", "topk_softmax"]
#: How a family's router picks experts from its logits (docs/TRANSFORMERS.md §1):
#: ``topk``: the K largest logits; ``group_limited_topk``: DeepSeek-V3's sigmoid scores plus a
#: selection-only correction bias, top-k inside the best expert groups; ``top1_capacity``: Switch's
#: argmax with an expert capacity (tokens over capacity are dropped).
SelectionRule = Literal["topk", "group_limited_topk", "top1_capacity"]
#: The router input a family's router takes: ``tokens`` ``[T, H]`` or ``sequences`` ``[B, S, H]``.
RouterInput = Literal["tokens", "sequences"]


BALANCE_SCORINGS: tuple[str, ...] = ROUTING_SCORINGS
SELECTION_RULES: tuple[str, ...] = ("topk", "group_limited_topk", "top1_capacity")
_ROUTER_INPUTS: tuple[str, ...] = ("tokens", "sequences")


def _router_top_k_attribute(router: nn.Module) -> int:
    return int(router.top_k)  # type: ignore[arg-type]


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
    """Everything hf-moe-routers knows about one host family; each modeling file registers one.

    Config and classes: ``hidden_size``, ``num_experts``, ``top_k`` and ``has_bias`` read the host
    config; ``model_classes`` maps each host model class to its routed class.

    The router (host or routed; the routed one keeps the host's contract):

    - ``dense_gate(router)``: the host gate ``(weight [E, H], bias [E] or None)``, held in the
      router attributes ``gate_attributes`` (the routed router class removes those same attributes
      when it attaches its scorer: ``host_gate_attributes``, checked to be equal);
    - ``router_input``: ``"tokens"`` (``[T, H]``) or ``"sequences"`` (``[B, S, H]``, Switch);
    - ``logits_index``: position of the logits in the router's output tuple (the index transformers
      records ``router_logits`` from); ``indices_index``: position of the selected experts
      ``[T, K]``, or None when the router returns none (Switch returns a one-hot dispatch mask);
    - ``selection``: the family's selection rule (``SELECTION_RULES``); ``router_top_k(router)``
      the number of experts it selects per token;
    - ``balance_scoring``: the rule turning logits into balance-loss probabilities
      (``BALANCE_SCORINGS``), applied by ``balance_probabilities``.
    """

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
    gate_attributes: tuple[str, ...] = ("weight",)
    router_input: RouterInput = "tokens"
    logits_index: int = 0
    indices_index: int | None = 2
    selection: SelectionRule = "topk"
    router_top_k: Callable[[nn.Module], int] = _router_top_k_attribute
    balance_scoring: BalanceScoring = "softmax"

    def __post_init__(self) -> None:
        # A wrong registration would silently mis-read router outputs: refuse it at import time.
        if self.balance_scoring not in BALANCE_SCORINGS:
            raise ValueError(
                f"{self.name}: balance_scoring must be one of {BALANCE_SCORINGS}; got {self.balance_scoring!r}."
            )
        if self.selection not in SELECTION_RULES:
            raise ValueError(
                f"{self.name}: selection must be one of {SELECTION_RULES}; got {self.selection!r}."
            )
        if self.router_input not in _ROUTER_INPUTS:
            raise ValueError(
                f"{self.name}: router_input must be one of {_ROUTER_INPUTS}; got {self.router_input!r}."
            )
        if self.indices_index == self.logits_index:
            raise ValueError(f"{self.name}: logits_index and indices_index must differ.")
        routed_attributes = getattr(self.routed_router_class, "host_gate_attributes", self.gate_attributes)
        if tuple(routed_attributes) != tuple(self.gate_attributes):
            raise ValueError(
                f"{self.name}: gate_attributes {self.gate_attributes} differ from "
                f"{self.routed_router_class.__name__}.host_gate_attributes {tuple(routed_attributes)}."
            )

    # ---- router calls and outputs ---------------------------------------------------------------

    def call_router(self, router: nn.Module, x_TH: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run ``router`` on router inputs ``x_TH [T, H]`` in the layout it takes; its output tuple."""
        x = x_TH.unsqueeze(0) if self.router_input == "sequences" else x_TH  # [1, T, H] for Switch
        return router(x)

    def output_logits(self, output: tuple[torch.Tensor, ...], num_experts: int) -> torch.Tensor:
        """The logits ``[T, E]`` in a router's output tuple (``[B, S, E]`` flattened)."""
        return output[self.logits_index].reshape(-1, num_experts)

    def output_indices(
        self,
        output: tuple[torch.Tensor, ...],
        logits_TE: torch.Tensor,
        top_k: int,
        router: nn.Module | None = None,
    ) -> torch.Tensor:
        """The experts ``[T, K]`` a router selected: its own choice when it returns one (which
        follows the family's selection rule, e.g. DeepSeek-V3's corrected, group-limited top-k).

        Switch returns none: its one-hot dispatch mask (``output[0]``) gives the expert of every
        token it kept, and the top-k of the logits that of a token dropped over capacity. A routed
        Switch router knows every token's choice (also with an expert bias, or a replayed routing):
        pass it as ``router`` (the forward hook's module, right after its call) and its own rule
        (``top1_choice``) gives it.
        """
        num_tokens = logits_TE.shape[0]
        if self.indices_index is not None:
            return output[self.indices_index].reshape(num_tokens, -1)
        top1_choice = getattr(router, "top1_choice", None)
        if top1_choice is not None:
            with torch.no_grad():
                return top1_choice(logits_TE.detach())[0].reshape(num_tokens, 1)
        chosen_TK = logits_TE.detach().topk(top_k, dim=-1).indices
        mask = output[0]
        if top_k == 1 and mask.numel() == logits_TE.numel():
            mask_TE = mask.detach().reshape(num_tokens, -1)
            kept_T1 = mask_TE.amax(dim=-1, keepdim=True) > 0
            chosen_TK = torch.where(kept_T1, mask_TE.argmax(dim=-1, keepdim=True), chosen_TK)
        return chosen_TK

    def router_logits(self, router: nn.Module, x_TH: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, E]`` of ``router`` (host or routed) for router inputs ``x_TH [T, H]``."""
        return self.output_logits(self.call_router(router, x_TH), int(router.num_experts))  # type: ignore[arg-type]

    def gate_matrix(self, router: nn.Module) -> torch.Tensor:
        """The host gate's weight ``[E, H]`` of an unpatched router (``dense_gate``)."""
        return self.dense_gate(router)[0]

    # ---- balance ------------------------------------------------------------------------------

    def balance_probabilities(
        self, logits_TE: torch.Tensor, indices_TK: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The family's routing probabilities ``[T, E]`` float32 for the balance loss.

        ``logits_TE`` may be ``[..., E]``; ``indices_TK`` (the selected experts) is needed by
        ``topk_softmax``. Float32 with autocast off (``numerics.routing_probabilities``, which the metrics use too).
        """
        flat_TE = logits_TE.reshape(-1, logits_TE.shape[-1])
        return routing_probabilities(flat_TE, self.balance_scoring, indices_TK)

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


def family_adapters() -> list[FamilyAdapter]:
    """Every registered adapter once (``FAMILIES`` holds each under two model types), by host type."""
    unique = {adapter.host_model_type: adapter for adapter in FAMILIES.values()}
    return [unique[name] for name in sorted(unique)]


def supported_families() -> list[str]:
    return sorted({adapter.host_model_type for adapter in FAMILIES.values()})


def family_for_router(router: nn.Module) -> FamilyAdapter | None:
    """The adapter whose host router class ``router`` is an instance of (routed routers subclass it)."""
    for adapter in family_adapters():
        if isinstance(router, adapter.host_router_class):
            return adapter
    return None


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

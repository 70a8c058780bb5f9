"""Swap the routers of a loaded transformers MoE model: ``patch_moe_routers(model, L2RConfig(rank=16))``.

Works on every family of ``hf_moe_routers.families.supported_families()`` (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss, Switch Transformers); the family's adapter says how.
Like ``peft.get_peft_model``, patching works on the model object you already have: every router of
the host family becomes a routed router (same object, subclass of its own class) whose scorer is
initialised from the pretrained gate; the model and config objects get the family's routed
classes, so ``save_pretrained`` writes a ``routed_<family>`` checkpoint that
``AutoModelForCausalLM.from_pretrained`` restores. No other model or class in the process changes.

The patch report measures top-k agreement with the original gates (kept as ``reference_weight``);
``hf_moe_routers.distillation.distill_router`` then raises it by fitting the new routers to them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .families import family_for_model, family_for_router
from .modeling.base import RoutedRouterMixin, convert_to_routed
from .routers import RouterConfig
from .sharding import is_sharded_or_distributed

__all__ = [
    "PatchReport",
    "as_batches",
    "capture_router_inputs",
    "drop_reference_gates",
    "patch_moe_routers",
    "reference_logits",
    "routing_agreement",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PatchReport:
    """Top-k agreement of the new routers with the original ones, per router and on average.

    ``topk_agreement``: mean ``|topk_new ∩ topk_ref| / K`` over tokens; ``top1_agreement``: share of
    tokens whose first choice is unchanged. ``source`` says which inputs were used.
    """

    router_type: str
    family: str
    source: str
    layers: dict[str, dict[str, float]]

    @property
    def mean_topk_agreement(self) -> float:
        values = [v["topk_agreement"] for v in self.layers.values()]
        return sum(values) / max(len(values), 1)

    @property
    def mean_top1_agreement(self) -> float:
        values = [v["top1_agreement"] for v in self.layers.values()]
        return sum(values) / max(len(values), 1)

    def __str__(self) -> str:
        return (
            f"{self.family} routers -> {self.router_type}: {len(self.layers)} routers, mean top-k agreement "
            f"{self.mean_topk_agreement:.4f}, mean top-1 agreement {self.mean_top1_agreement:.4f} ({self.source})"
        )


# --------------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------------


def reference_logits(router: nn.Module, x_TH: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[T, E]`` of the pretrained gate a patched router keeps (``reference_weight``)."""
    weight = router.reference_weight  # type: ignore[attr-defined]
    bias = getattr(router, "reference_bias", None)
    return F.linear(x_TH.float(), weight.float(), None if bias is None else bias.float())


def _top_k(router: nn.Module) -> int:
    """How many experts ``router`` selects per token, as its family's adapter reads it."""
    adapter = family_for_router(router)
    if adapter is None:
        raise ValueError(f"{type(router).__name__} is not the router of a supported family.")
    return adapter.router_top_k(router)


@torch.no_grad()
def routing_agreement(router: nn.Module, x_TH: torch.Tensor) -> dict[str, float]:
    """Agreement of a patched router's top-k with its reference gate on router inputs ``x_TH [T, H]``."""
    if getattr(router, "reference_weight", None) is None:
        raise ValueError(
            "This router keeps no reference gate: patch with keep_reference=True to measure agreement."
        )
    k = _top_k(router)
    new_TK = router.scorer(x_TH).float().topk(k, dim=-1).indices  # type: ignore[attr-defined]
    ref_TK = reference_logits(router, x_TH).topk(k, dim=-1).indices
    overlap = (new_TK.unsqueeze(-1) == ref_TK.unsqueeze(-2)).any(-1).float().sum(-1) / k
    return {
        "topk_agreement": float(overlap.mean()),
        "top1_agreement": float((new_TK[:, 0] == ref_TK[:, 0]).float().mean()),
    }


def capture_router_inputs(
    model: nn.Module, routers: list[tuple[str, nn.Module]], batch: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Run ``model(**batch)`` without gradients and return each router's input ``[T, H]``.

    Padding tokens (``attention_mask == 0``) are dropped when the mask matches the router input.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, router in routers:

        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            captured[name] = args[0].detach()

        handles.append(router.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    # An encoder-decoder's attention_mask covers only the encoder tokens: keep every token there.
    mask = None if getattr(model.config, "is_encoder_decoder", False) else batch.get("attention_mask")
    out = {}
    for name, x in captured.items():
        x_TH = x.reshape(-1, x.shape[-1])
        if mask is not None and mask.numel() == x_TH.shape[0]:
            x_TH = x_TH[mask.reshape(-1).to(torch.bool).to(x_TH.device)]
        out[name] = x_TH
    return out


def as_batches(batches: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One batch dict or an iterable of them, as a list."""
    if isinstance(batches, Mapping):
        return [batches]
    return list(batches)


# --------------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------------


def patch_moe_routers(
    model: nn.Module,
    router_config: RouterConfig | dict,
    *,
    calibration_batches: Mapping[str, Any] | Iterable[Mapping[str, Any]] | None = None,
    hidden_states: torch.Tensor | None = None,
    num_random_tokens: int = 512,
    keep_reference: bool = True,
    return_report: bool = False,
    seed: int = 0,
) -> nn.Module | tuple[nn.Module, PatchReport]:
    """Replace every router of a loaded transformers MoE model with ``router_config``'s router.

    Args:
        model: a model of a supported family (``supported_families()``: Mixtral, Qwen2-MoE,
            Qwen3-MoE, OLMoE, DeepSeek-V3, gpt-oss or Switch Transformers; base model or with a
            head), loaded or built from a config. Patched in place and returned.
        router_config: ``LinearRouterConfig``, ``SRMoEConfig``, ``L2RConfig``,
            ``CosineRouterConfig`` or the dict form of one.
        calibration_batches: model inputs (a dict such as ``{"input_ids": ..., "attention_mask": ...}``
            or an iterable of them); the agreement report uses each router's real inputs on them.
        hidden_states: router inputs ``[T, H]`` used for every router's report instead.
        num_random_tokens: without either, the report uses this many standard-normal inputs.
        keep_reference: keep each pretrained gate as non-persistent buffers (``reference_weight``,
            ``reference_bias``) for reports and ``distill_router``; not saved in checkpoints.
        return_report: also return the ``PatchReport`` (it is always logged at INFO and stored
            as ``model.router_patch_report``).
        seed: seed of the random report inputs and of the scorers' random parts (extra anchors).

    Returns:
        The patched model, or ``(model, report)`` with ``return_report=True``.

    Raises:
        ValueError: unsupported family, an already-patched model, a bad router config, a
            hyper-parameter that does not fit the model (e.g. an L2R rank above the hidden size),
            a model that runs hub kernels which bypass routers, or a model that is already sharded or
            distributed (FSDP, tensor/expert parallel, ``from_pretrained(distributed_config=...)``):
            patch first, then distribute.
    """
    router_config = RouterConfig.from_dict(router_config)
    adapter = family_for_model(model)
    config = model.config  # type: ignore[attr-defined]
    if config.model_type == adapter.routed_model_type or any(
        isinstance(m, RoutedRouterMixin) for m in model.modules()
    ):
        raise ValueError(
            f"This {adapter.name} model is already patched (router_type="
            f"{getattr(config, 'router_config', None) and config.router_config.router_type!r}); "
            "load the original checkpoint to patch it again."
        )
    if getattr(model, "_use_kernels", False):
        raise ValueError(
            "This model was loaded with use_kernels=True: hub kernels replace the whole MoE block and "
            "bypass the router. Load it without use_kernels to patch its routers."
        )
    distributed = is_sharded_or_distributed(model)
    if distributed is not None:
        raise ValueError(
            f"patch_moe_routers needs the whole, undistributed model, but this one is already sharded or "
            f"distributed ({distributed}). Patch first, then distribute: load the model without "
            "distributed_config (and before accelerate/FSDP wraps it), call patch_moe_routers, save_pretrained "
            "the patched model, and load that checkpoint with from_pretrained(..., distributed_config=...) "
            "or hand it to accelerate/the Trainer."
        )
    adapter.validate_host_config(config)
    if hidden_states is not None and calibration_batches is not None:
        raise ValueError("Pass either calibration_batches or hidden_states, not both.")

    meta = _first_meta_tensor(model)
    if meta is not None:
        raise ValueError(
            f"patch_moe_routers needs every weight in memory, but {meta!r} is on the meta device "
            "(a model built under torch.device('meta'), or loaded with a device_map that offloads to "
            "disk). Materialise the model first, or patch it in memory, save_pretrained the patched "
            "model, and load that checkpoint with from_pretrained(..., device_map=...)."
        )

    # Patching changes classes, parameters and the config in place; a failure half-way (a
    # calibration batch the model cannot run, a hyper-parameter that does not fit) must not leave
    # a half-patched model that a retry would refuse as "already patched".
    snapshot = _ModuleSnapshot(model)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            converted = convert_to_routed(model, adapter, router_config, from_dense=True, keep_reference=True)
        if not converted:
            raise ValueError(f"No {adapter.host_router_class.__name__} found in this {adapter.name} model.")

        # A routed copy of the config replaces every reference to the old one inside this model (the
        # experts read `_experts_implementation` from theirs); the caller's config object, which other
        # models may share, is left as it was.
        routed_config = copy.deepcopy(config)
        routed_config.__class__ = adapter.routed_config_class
        # A config read from config.json carries `model_type` as an instance attribute that would
        # shadow the routed class's (docs/TRANSFORMERS.md pitfall 13).
        routed_config.__dict__.pop("model_type", None)
        routed_config.moe_router = router_config.to_dict()
        routed_config._validate_moe_router()
        _replace_config(model, config, routed_config)

        report = _report(
            model,
            converted,
            router_config,
            adapter.name,
            calibration_batches,
            hidden_states,
            num_random_tokens,
            seed,
        )
    except BaseException:
        snapshot.restore()
        raise
    if not keep_reference:
        drop_reference_gates(model)
    model.router_patch_report = report  # type: ignore[attr-defined]
    logger.info("%s", report)
    return (model, report) if return_report else model


def _first_meta_tensor(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer of ``model`` on the meta device, or None."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_meta:
            return name
    return None


class _ModuleSnapshot:
    """Every module's class and attribute tables, to undo a patch that failed half-way.

    Patching only rebinds: it swaps ``__class__``, adds and removes entries of ``_parameters``,
    ``_buffers`` and ``_modules`` and replaces the config object; it never writes into a tensor of
    the host model. Copies of those tables (not of the tensors) are therefore enough to restore it.
    """

    _TABLES = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")

    def __init__(self, model: nn.Module) -> None:
        self._states = []
        for module in model.modules():
            attributes = dict(vars(module))
            tables = {name: copy.copy(attributes[name]) for name in self._TABLES if name in attributes}
            self._states.append((module, type(module), attributes, tables))

    def restore(self) -> None:
        for module, cls, attributes, tables in self._states:
            module.__class__ = cls
            vars(module).clear()
            vars(module).update(attributes)
            for name, table in tables.items():
                vars(module)[name] = copy.copy(table)


def _replace_config(model: nn.Module, old: Any, new: Any) -> None:
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if value is old:
                setattr(module, name, new)


def drop_reference_gates(model: nn.Module) -> None:
    """Free the pretrained gates that ``patch_moe_routers(keep_reference=True)`` kept."""
    for module in model.modules():
        if isinstance(module, RoutedRouterMixin):
            for name in ("reference_weight", "reference_bias"):
                module._buffers.pop(name, None)  # type: ignore[attr-defined]


def _report(
    model: nn.Module,
    routers: list[tuple[str, nn.Module]],
    router_config: RouterConfig,
    family: str,
    calibration_batches: Any,
    hidden_states: torch.Tensor | None,
    num_random_tokens: int,
    seed: int,
) -> PatchReport:
    layers: dict[str, dict[str, float]] = {}
    if calibration_batches is not None:
        inputs: dict[str, list[torch.Tensor]] = {name: [] for name, _ in routers}
        for batch in as_batches(calibration_batches):
            for name, x in capture_router_inputs(model, routers, batch).items():
                inputs[name].append(x)
        for name, router in routers:
            layers[name] = routing_agreement(router, torch.cat(inputs[name]))
        source = "calibration batches"
    else:
        if hidden_states is None:
            generator = torch.Generator().manual_seed(seed)
            hidden = routers[0][1].scorer.hidden_size  # type: ignore[attr-defined]
            hidden_states = torch.randn(num_random_tokens, hidden, generator=generator)
            source = f"{num_random_tokens} random standard-normal inputs"
        else:
            source = "given hidden states"
        for name, router in routers:
            ref = router.reference_weight  # type: ignore[attr-defined]
            layers[name] = routing_agreement(router, hidden_states.to(ref.device))
    return PatchReport(router_type=router_config.router_type, family=family, source=source, layers=layers)

"""Whole router parameters outside forward, whatever shards them; and whether a model is distributed.

Used by the Trainer (statistics outside forward) and by ``patch_moe_routers`` (patch first, then
distribute), so it sits below both.

FSDP2 (``fully_shard``, applied by ``from_pretrained(distributed_config=DistributedConfig(fsdp_size=...))``
or by ``accelerate launch`` with ``fsdp_version: 2``) keeps every parameter of a sharded unit as a
``DTensor`` shard between forwards, and gathers the whole tensors only inside the unit's forward.
Statistics of a routing matrix read outside forward (σ_max, stable rank, Lipschitz bounds, a
router's own ``route``) must not be computed on one rank's rows: σ of a shard is silently wrong, and a
scorer's forward on ``DTensor`` parameters fails. ``gathered_router_parameters`` unshards the FSDP2
units that own the routers for the duration of a ``with`` block (a collective: every rank enters it
together), and reshards them afterwards.

Tensor and expert parallelism leave routers replicated (plain tensors on every rank): nothing to
gather. DeepSpeed ZeRO-3 is not handled here (untried).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .modeling.base import RoutedRouterMixin
from .routers.base import _DTensor

__all__ = ["fsdp2_units_owning", "gathered_router_parameters", "is_sharded_or_distributed"]


def _fsdp_module_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return None
    return FSDPModule


def fsdp2_units_owning(model: nn.Module, modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The FSDP2 units (``fully_shard``-ed modules) that manage the parameters of ``modules``: for
    each, the nearest ``FSDPModule`` among itself and its ancestors, in ``model``'s module order."""
    fsdp_cls = _fsdp_module_class()
    if fsdp_cls is None:
        return []
    wanted = {id(m) for m in modules}
    units: dict[int, nn.Module] = {}
    stack: list[tuple[str, nn.Module]] = []  # FSDP units on the current path, with their prefixes
    for name, module in model.named_modules():
        while stack and not (
            name == stack[-1][0] or name.startswith(stack[-1][0] + ".") or stack[-1][0] == ""
        ):
            stack.pop()
        if isinstance(module, fsdp_cls):
            stack.append((name, module))
        if id(module) in wanted and stack:
            owner = stack[-1][1]
            units[id(owner)] = owner
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(units.values(), key=lambda m: order[id(m)])


@contextlib.contextmanager
def gathered_router_parameters(
    model: nn.Module, routers: Iterable[nn.Module] | None = None
) -> Iterator[None]:
    """Inside the block, the parameters of ``routers`` (default: every module with a ``scorer`` or a
    router class recorded by the model) are whole tensors on every rank.

    A no-op without FSDP2. With FSDP2 it all-gathers the owning units' parameters (each unit once,
    in module order) and frees them again on exit; every rank must enter the block.
    """
    if routers is None:
        routers = [m for m in model.modules() if isinstance(m, RoutedRouterMixin)]
    units = fsdp2_units_owning(model, list(routers))
    unsharded = []
    try:
        for unit in units:
            unit.unshard()
            unsharded.append(unit)
        yield
    finally:
        for unit in reversed(unsharded):
            unit.reshard()


def is_sharded_or_distributed(model: nn.Module) -> str | None:
    """Why ``model`` counts as already distributed (a short reason), or None.

    Looks for FSDP2 units, FSDP1 wrappers, ``DTensor`` parameters (FSDP2, tensor or expert parallel),
    the ``DistributedConfig`` that ``from_pretrained`` records, and a tensor-parallel size above 1.
    """
    fsdp_cls = _fsdp_module_class()
    for name, module in model.named_modules():
        if fsdp_cls is not None and isinstance(module, fsdp_cls):
            return f"module {name or '<root>'!r} is managed by FSDP2 (fully_shard)"
        if type(module).__name__ == "FullyShardedDataParallel" or getattr(
            module, "_is_fsdp_managed_module", False
        ):
            return f"module {name or '<root>'!r} is managed by FSDP"
    if _DTensor is not None:
        for name, param in model.named_parameters():
            if isinstance(param, _DTensor):
                return f"parameter {name!r} is a DTensor sharded as {tuple(param.placements)}"
    config = getattr(model, "config", None)
    if getattr(config, "distributed_config", None) is not None:
        return "it was loaded with from_pretrained(distributed_config=...)"
    tp_size = getattr(model, "_tp_size", None)
    if isinstance(tp_size, int) and tp_size > 1:
        return f"it is tensor parallel (tp_size={tp_size})"
    if getattr(model, "_is_distributed_loading_by_transformers", False):
        return "it was distributed by transformers at load time"
    return None

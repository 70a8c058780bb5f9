"""Find a model's routers and capture what they return during the Trainer's forward passes.

Works on patched and unpatched models of every supported family alike (``supported_families()``:
the host and the routed model type of a family map to the same ``FamilyAdapter``). Routers are the
modules of the family's host router class, so our routed routers (which subclass the host's) and the
host's own are both found. Everything family-specific (how a router is called, where its output
tuple holds the logits and the selected experts, its top-k, its gate, its balance probabilities)
comes from the family adapter. Captures are returned to the caller, never kept in a global: the
Trainer starts a capture around its forward and takes the result.

Shape legend: T tokens, H router input size, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch
from torch import nn

from ..families import FAMILIES, FamilyAdapter, family_for_router, model_type_of, supported_families
from ..modeling.base import RoutedRouterMixin

__all__ = ["RouterCapture", "RouterCollector", "RouterInfo", "find_routers"]


@dataclasses.dataclass
class RouterInfo:
    """One router of a model."""

    name: str  # module path
    layer: str  # short label, e.g. "layer_3" or "encoder_1"
    module: nn.Module
    num_experts: int
    top_k: int
    logits_index: int  # position of the logits in the router's output tuple
    stack: str  # "decoder" (causal LMs and Switch decoders) or "encoder"
    # The router's family; found from the router's class when not given.
    adapter: FamilyAdapter | None = None

    def __post_init__(self) -> None:
        if self.adapter is None:
            self.adapter = family_for_router(self.module)
        if self.adapter is None:
            raise ValueError(
                f"Router {self.name} ({type(self.module).__name__}) belongs to no supported family "
                f"({', '.join(supported_families())})."
            )

    @property
    def routed(self) -> bool:
        return isinstance(self.module, RoutedRouterMixin)

    @property
    def scorer(self):  # noqa: ANN201 - RouterScorer
        """The router's scorer, unwrapped from any PEFT layer."""
        return self.module.base_scorer  # type: ignore[attr-defined]

    def gate_matrix(self) -> torch.Tensor:
        """The matrix reading the router input ``[N, H]`` (effective under SR-MoE constrain)."""
        if self.routed:
            return self.scorer.effective_routing_matrix().detach()
        return self._family.gate_matrix(self.module).detach()

    @property
    def _family(self) -> FamilyAdapter:
        assert self.adapter is not None  # set in __post_init__
        return self.adapter

    def expert_rows(self) -> torch.Tensor:
        """Expert anchors / gate rows ``[E*M, *]`` for angular concentration."""
        if self.routed:
            return self.scorer.expert_embeddings().detach()
        return self.gate_matrix()

    def queries(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Router queries ``[T, *]``: what the scores compare with experts (L2R: ``W_q x``)."""
        if self.routed:
            return self.scorer.queries(x_TH).detach()
        return x_TH.float()

    def local_lipschitz_bound(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Max over tokens of the per-token Jacobian-norm bound (finite for every router)."""
        if self.routed:
            return self.scorer.local_lipschitz_bound(x_TH).max().detach()
        return self.lipschitz_bound()

    def lipschitz_bound(self) -> torch.Tensor:
        if self.routed:
            return self.module.lipschitz_bound().detach()  # type: ignore[attr-defined]
        return torch.linalg.matrix_norm(self.gate_matrix().float(), ord=2)

    @torch.no_grad()
    def logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, E]`` for router inputs ``x_TH``, with the router in eval mode (no jitter)."""
        was_training = self.module.training
        self.module.eval()
        try:
            if self.routed:
                return self.module.scorer(x_TH).float()  # type: ignore[attr-defined]
            family = self._family
            return family.output_logits(family.call_router(self.module, x_TH), self.num_experts).float()
        finally:
            self.module.train(was_training)

    def route(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Top-k expert indices ``[T, K]`` for router inputs (the selection, not the weights)."""
        return self.logits(x_TH).topk(self.top_k, dim=-1).indices


@dataclasses.dataclass
class RouterCapture:
    """What one router returned in one forward: logits ``[T, E]``, indices ``[T, K]`` and its
    input ``[T, H]`` (detached). For routed routers, also what its scorer saw *inside* forward,
    where PEFT's parametrisations are active: the effective routing matrix, the expert rows and,
    in training, the raw penalty terms (with gradients)."""

    logits_TE: torch.Tensor
    indices_TK: torch.Tensor
    inputs_TH: torch.Tensor
    routing_matrix: torch.Tensor | None = None
    expert_rows: torch.Tensor | None = None
    penalty_terms: dict[str, torch.Tensor] | None = None


def _layer_label(name: str, position: int) -> tuple[str, str]:
    stack = "encoder" if ".encoder." in f".{name}" else "decoder"
    match = re.search(r"\.(?:layers|block|h|layer)\.(\d+)\.", f".{name}.")
    index = match.group(1) if match else str(position)
    prefix = "encoder" if stack == "encoder" else ("decoder" if ".decoder." in f".{name}" else "layer")
    return f"{prefix}_{index}", stack


def _supported() -> str:
    return ", ".join(supported_families())


def _family_of(model: nn.Module) -> FamilyAdapter:
    """The family adapter of ``model`` (host or routed, PEFT-wrapped or not), from its config's
    model type; an error naming the supported families for any other model."""
    records_routers = any(
        "router_logits" in (getattr(type(module), "_can_record_outputs", None) or {})
        for module in model.modules()
    )
    if not records_routers:
        raise ValueError(
            f"{type(model).__name__} records no router_logits: it is not a transformers MoE model "
            f"(supported families: {_supported()}, and their routed forms)."
        )
    model_type = model_type_of(model)
    adapter = FAMILIES.get(model_type)  # type: ignore[arg-type]
    if adapter is None:
        raise ValueError(
            f"{type(model).__name__} (model_type={model_type!r}) is a MoE model of a family hf_moe_routers "
            f"does not support (supported families: {_supported()}, and their routed forms)."
        )
    return adapter


def find_routers(model: nn.Module) -> list[RouterInfo]:
    """Every router of ``model`` in module order; an error for a model of no supported family."""
    adapter = _family_of(model)
    target = adapter.host_router_class  # routed routers subclass it
    infos = []
    for name, module in model.named_modules():
        if not isinstance(module, target):
            continue
        if ".original_module" in f".{name}":
            continue  # PEFT modules_to_save keeps a frozen copy that never runs
        num_experts = int(module.num_experts)
        top_k = adapter.router_top_k(module)
        layer, stack = _layer_label(name, len(infos))
        infos.append(
            RouterInfo(name, layer, module, num_experts, top_k, adapter.logits_index, stack, adapter)
        )
    if not infos:
        raise ValueError(f"{type(model).__name__} has no {target.__name__} module.")
    return infos


def routing_scoring(model: nn.Module) -> str:
    """``"softmax"``, ``"sigmoid"`` or ``"topk_softmax"``: how the model's family turns logits into
    balance probabilities (its adapter's ``balance_scoring``, the ``scoring`` of
    ``metrics.routing_probs``; ``FamilyAdapter.balance_probabilities`` applies it)."""
    return _family_of(model).balance_scoring


class RouterCollector:
    """Forward hooks on every router; ``start()`` / ``stop()`` bracket one model forward.

    Under gradient checkpointing a router runs again during backward; captures are only taken
    between ``start`` and ``stop``, and a second call in the same window overwrites the first (the
    values are identical), so each router contributes once per forward.
    """

    def __init__(self, model: nn.Module):
        self.routers = find_routers(model)
        self._active = False
        self._captures: dict[int, RouterCapture] = {}
        self._scorer_data: dict[int, dict] = {}
        self._handles = [
            info.module.register_forward_hook(self._make_hook(i, info), with_kwargs=True)
            for i, info in enumerate(self.routers)
        ]
        for i, info in enumerate(self.routers):
            if info.routed:
                self._handles.append(info.scorer.register_forward_hook(self._make_scorer_hook(i)))

    def _make_scorer_hook(self, position: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not self._active:
                return
            # Copies, not views: FSDP2 frees the whole (unsharded) parameters this forward reads
            # as soon as the unit's forward ends, and the Trainer reads these at logging time.
            data = {
                "routing_matrix": module.effective_routing_matrix().detach().clone(),
                "expert_rows": module.expert_embeddings().detach().clone(),
            }
            if module.training and torch.is_grad_enabled():
                data["penalty_terms"] = module.regularization_terms()
            self._scorer_data[position] = data

        return hook

    def _make_hook(self, position: int, info: RouterInfo) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
            if not self._active:
                return
            x = args[0] if args else next(iter(kwargs.values()))
            family = info._family
            logits_TE = family.output_logits(output, info.num_experts)
            indices_TK = family.output_indices(output, logits_TE, info.top_k, router=module)
            self._captures[position] = RouterCapture(
                logits_TE, indices_TK, x.detach().reshape(-1, x.shape[-1])
            )

        return hook

    def start(self) -> None:
        self._captures = {}
        self._scorer_data = {}
        self._active = True

    def stop(self) -> list[RouterCapture | None]:
        self._active = False
        captures = [self._captures.get(i) for i in range(len(self.routers))]
        for i, capture in enumerate(captures):
            if capture is not None and i in self._scorer_data:
                for key, value in self._scorer_data[i].items():
                    setattr(capture, key, value)
        self._captures = {}
        self._scorer_data = {}
        return captures

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

"""What every host family shares: the routed-router mixin, the family adapter, the routed config
and pre-trained-model mixins, and the in-place conversion of a host model into a routed one.

Design rule (docs/TRANSFORMERS.md §1, §3): replace routers only, keep their class identity
(``isinstance`` of the host router class, so transformers records their logits and initialises
them), their forward signature, return tuple and dtypes; never touch experts. A router is turned
into ours by giving the *same object* a subclass of its own class and attaching a scorer module,
so parameters, hooks, device and every other model in the process are left alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import initialization as init

from ..families import FAMILIES, ONE_ELEMENT_PARAMETERS, FamilyAdapter
from ..routers import RouterConfig, RouterScorer, build_scorer
from ..routers.base import apply_keeping_float32, expert_bias_delta

__all__ = [
    "CapturedRouting",
    "RoutedConfigMixin",
    "RoutedPreTrainedMixin",
    "RoutedRouterMixin",
    "SoftmaxTopKRoutedRouter",
    "capture_routing",
    "convert_to_routed",
    "replay_routing",
    "update_expert_biases",
]

DEFAULT_ROUTER = {"router_type": "linear"}


# --------------------------------------------------------------------------------------------
# Routers
# --------------------------------------------------------------------------------------------


class RoutedRouterMixin:
    """Placed in front of a host router class in the MRO. Owns ``scorer`` (a ``RouterScorer``).

    The host class's gate parameters (``weight`` or ``classifier``) are removed when the scorer is
    attached: the scorer owns every routing parameter.
    """

    host_gate_attributes: ClassVar[tuple[str, ...]] = ("weight",)
    #: The buffer holding the aux-loss-free expert bias ``[E]`` float32: ``expert_bias``, created by
    #: ``attach_scorer`` when the router config enables it; DeepSeek-V3 names its own
    #: ``e_score_correction_bias``, which its host router always has and adds.
    expert_bias_attribute: ClassVar[str] = "expert_bias"
    scorer: RouterScorer

    def attach_scorer(
        self, router_config: RouterConfig, hidden_size: int, num_experts: int, *, bias: bool = False
    ) -> None:
        device = dtype = None
        for name in self.host_gate_attributes:
            value = getattr(self, name, None)
            if value is not None:
                tensor = value if isinstance(value, torch.Tensor) else next(value.parameters())
                device, dtype = tensor.device, tensor.dtype
            if name in self._parameters:  # type: ignore[attr-defined]
                del self._parameters[name]  # type: ignore[attr-defined]
            elif name in self._modules:  # type: ignore[attr-defined]
                del self._modules[name]  # type: ignore[attr-defined]
        scorer = build_scorer(router_config, hidden_size, num_experts, bias=bias)
        if device is not None:
            scorer = scorer.to(device=device, dtype=dtype if dtype.is_floating_point else None)
        # A fresh module is in training mode; the router's mode (a model patched in eval()) rules.
        scorer.train(self.training)  # type: ignore[attr-defined]
        self.scorer = scorer
        if router_config.expert_bias_enabled and self.expert_bias_attribute not in self._buffers:  # type: ignore[attr-defined]
            # Persistent (saved and loaded with the checkpoint), float32 whatever the model's dtype
            # (``_apply`` keeps it so), zero until the first update; a buffer, so never trained.
            self.register_buffer(  # type: ignore[attr-defined]
                self.expert_bias_attribute, torch.zeros(num_experts, dtype=torch.float32, device=device)
            )

    @property
    def base_scorer(self) -> RouterScorer:
        """The scorer itself, also when PEFT wrapped it (LoRA on a router parameter).

        Read parameters through it outside forward only knowingly: PEFT's ``ParamWrapper`` adds
        its delta inside forward alone, so the Trainer takes penalties from a hook on this module.
        """
        scorer = self.scorer
        while not isinstance(scorer, RouterScorer) and hasattr(scorer, "get_base_layer"):
            scorer = scorer.get_base_layer()
        return scorer

    @property
    def router_config(self) -> RouterConfig:
        return self.base_scorer.config

    # ---- aux-loss-free expert bias (DeepSeek-V3; docs/ROUTERS.md) -------------------------------

    @property
    def expert_bias_enabled(self) -> bool:
        """Whether this router's expert bias is updated (``expert_bias_update_rate > 0``)."""
        return self.router_config.expert_bias_enabled

    def selection_bias(self) -> torch.Tensor | None:
        """The expert bias ``[E]`` added to the scores to *select* experts, or None when there is
        none (the gate weights never include it)."""
        return self._buffers.get(self.expert_bias_attribute)  # type: ignore[attr-defined]

    @torch.no_grad()
    def update_expert_bias(self, counts_E: torch.Tensor) -> None:
        """One aux-loss-free balancing step: move the expert bias against this step's loads.

        Args:
            counts_E: ``[E]`` token -> expert assignments of this router in the optimizer step
                (summed over micro-batches and ranks, padding excluded, by the caller; every rank
                must pass the same counts so the biases stay equal).

        ``b += expert_bias_delta(counts_E, u, rule)`` (``"sign"``: ``u * sign(mean - counts_i)``;
        ``"proportional"``: ``u * (mean - counts_i) / mean``), then ``b`` is clamped to
        ``[-clamp, clamp]`` when ``expert_bias_clamp`` is set. Does nothing when
        ``expert_bias_enabled`` is False.
        """
        if not self.expert_bias_enabled:
            return
        bias = self.selection_bias()
        num_experts = int(self.num_experts)  # type: ignore[attr-defined]
        if bias is None:  # pragma: no cover - attach_scorer creates it whenever the config enables it
            raise RuntimeError(f"{type(self).__name__} has no {self.expert_bias_attribute} buffer to update.")
        counts = torch.as_tensor(counts_E)
        if counts.shape != (num_experts,) or counts.is_complex() or counts.dtype == torch.bool:
            raise ValueError(
                f"update_expert_bias expects counts_E of shape [{num_experts}] (one count per expert, "
                f"real numbers); got shape {tuple(counts.shape)} and dtype {counts.dtype}."
            )
        counts = counts.to(device=bias.device, dtype=torch.float32)
        if not bool(torch.isfinite(counts).all() and (counts >= 0).all()):
            raise ValueError(
                f"update_expert_bias expects finite, non-negative counts_E; got {counts.tolist()}."
            )
        config = self.router_config
        updated = bias.float() + expert_bias_delta(
            counts, config.expert_bias_update_rate, config.expert_bias_rule
        )
        if config.expert_bias_clamp is not None:
            updated = updated.clamp(-config.expert_bias_clamp, config.expert_bias_clamp)
        bias.copy_(updated)

    # ---- routing capture and replay (capture_routing / replay_routing below) --------------------

    #: The experts ``[T, K]`` this router must choose while a ``replay_routing`` context holds it.
    _replay_indices: torch.Tensor | None = None
    #: The list every chosen ``[T, K]`` is appended to while a ``capture_routing`` context holds it.
    _capture_list: list[torch.Tensor] | None = None

    def replayed_experts(self, num_tokens: int, device: torch.device | None = None) -> torch.Tensor | None:
        """The experts ``[T, K]`` int64 a ``replay_routing`` context forces on this call, else None.

        The family's forward then skips its own choice (and the expert bias) and computes the gate
        weights from the current scores at these experts.
        """
        indices = self._replay_indices
        if indices is None:
            return None
        if indices.shape[0] != num_tokens:
            raise ValueError(
                f"replay_routing: {type(self).__name__} routes {num_tokens} tokens, but the replayed "
                f"routing has {indices.shape[0]} (shape {tuple(indices.shape)}): replay it on the same inputs."
            )
        return indices if device is None else indices.to(device)

    def record_experts(self, indices_TK: torch.Tensor) -> None:
        """Hand the experts chosen by this call to an active ``capture_routing`` (no-op otherwise)."""
        if self._capture_list is not None:
            self._capture_list.append(indices_TK.detach().reshape(indices_TK.shape[0], -1))

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - torch's signature
        # Updates of u ~ 1e-3 vanish in bf16 next to a bias of order 1: an updated expert bias
        # stays float32 (DeepSeek-V3's host buffer keeps its own rule when the bias is off).
        updated = "scorer" in self._modules and self.expert_bias_enabled  # type: ignore[attr-defined]
        names = (self.expert_bias_attribute,) if updated else ()
        return apply_keeping_float32(self, names, lambda: super(RoutedRouterMixin, self)._apply(fn, recurse))  # type: ignore[arg-type,misc]

    def router_logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Scorer logits ``[T, E]`` for router inputs ``x_TH``; refuses NaN/Inf inputs."""
        if self.router_config.check_finite and not torch.compiler.is_compiling() and x_TH.numel():
            # min and max are finite exactly when every value is (NaN propagates through both): two
            # reductions, where isfinite(x).all() writes a [T, H] mask first, which cost the router
            # forward several times its own matmul (benchmarks/bench_router.py).
            if not bool(torch.isfinite(torch.stack(torch.aminmax(x_TH))).all()):
                raise ValueError(
                    f"{type(self).__name__} received hidden states with NaN or Inf values "
                    f"(shape {tuple(x_TH.shape)}, dtype {x_TH.dtype}). Set check_finite=False in the "
                    "router config to skip this check."
                )
        return self.scorer(x_TH)

    def regularization_terms(self) -> dict[str, torch.Tensor]:
        return self.base_scorer.regularization_terms()

    def regularization_loss(self) -> torch.Tensor:
        return self.base_scorer.regularization_loss()

    def lipschitz_bound(self) -> torch.Tensor:
        return self.base_scorer.lipschitz_bound()


class SoftmaxTopKRoutedRouter(RoutedRouterMixin):
    """Forward of the softmax-then-top-k families (Mixtral, Qwen2/3-MoE, OLMoE).

    Mixtral always renormalises the top-k weights and returns them in float32; the Qwen family
    and OLMoE renormalise only when ``norm_topk_prob`` and cast them to the logits' dtype.

    Softmax, top-k and renormalisation are one op, ``hf_moe_routers.kernels.topk_softmax``: a fused
    Triton kernel with its own backward for CUDA tensors when Triton is installed (and the kernel
    backend allows it), else its torch reference, which is the host's ``softmax(dtype=float32)`` ->
    ``topk`` -> divide, bit for bit (``tests/test_kernels.py`` checks both). With an expert bias
    (selection on logits + bias) or a replayed routing, the same torch formula runs with the chosen
    experts given: softmax in float32, gathered at them, renormalised.
    """

    always_renormalize: ClassVar[bool] = False
    cast_weights_to_logits_dtype: ClassVar[bool] = True

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route ``hidden_states [..., H]``.

        Returns:
            ``(logits [T, E], weights [T, K], indices [T, K] int64)``, T = all leading dims flattened;
            weights float32, or the logits' dtype where the family casts them.
        """
        # Late, and left out of the remote code, where the name is bound to the same torch formula
        # (EXCLUDED_MODULES in modeling/remote_code.py): the kernels import Triton when present.
        from ..kernels import topk_softmax

        x_TH = hidden_states.reshape(-1, self.hidden_dim)  # type: ignore[attr-defined]
        logits_TE = self.router_logits(x_TH)
        # The host's softmax runs in float32 whatever the logits' dtype; the op would keep float64
        # in float64, so only float64 is cast here (bf16 goes in as is: the kernel upcasts on load).
        op_logits_TE = logits_TE.float() if logits_TE.dtype == torch.float64 else logits_TE
        renormalize = bool(self.always_renormalize or getattr(self, "norm_topk_prob", False))
        bias_E = self.selection_bias()
        indices_TK = self.replayed_experts(x_TH.shape[0], logits_TE.device)
        if indices_TK is None and bias_E is None:
            weights_TK, indices_TK = topk_softmax(op_logits_TE, self.top_k, renormalize=renormalize)  # type: ignore[attr-defined]
        else:
            # A replayed routing, or aux-loss-free balancing: select on logits + bias (the top-k of
            # softmax(logits + bias), i.e. the probabilities reweighted by exp(bias)). The weights are
            # the unbiased probabilities at the chosen experts: the op's torch formula, so a zero
            # bias, or a replay of the router's own choice, gives its weights bit for bit.
            scores_TE = op_logits_TE.float()
            probs_TE = scores_TE.softmax(dim=-1)
            if indices_TK is None:
                indices_TK = torch.topk(scores_TE + bias_E, self.top_k, dim=-1).indices  # type: ignore[attr-defined]
            weights_TK = probs_TE.gather(1, indices_TK)
            if renormalize:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if self.cast_weights_to_logits_dtype:
            weights_TK = weights_TK.to(logits_TE.dtype)
        self.record_experts(indices_TK)
        return logits_TE, weights_TK, indices_TK


# --------------------------------------------------------------------------------------------
# Routing capture and replay
# --------------------------------------------------------------------------------------------


def _routed_routers(model: nn.Module) -> list[tuple[str, RoutedRouterMixin]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedRouterMixin)]


@dataclasses.dataclass
class CapturedRouting:
    """What ``capture_routing`` saw: the experts every routed router chose, call by call.

    Attributes:
        names: the routers' names in ``model.named_modules()``, in module order.
        calls: for each name, the ``[T, K]`` int64 experts of each of its calls, in call order.
    """

    names: tuple[str, ...]
    calls: dict[str, list[torch.Tensor]]

    @property
    def router_indices(self) -> tuple[torch.Tensor, ...]:
        """One ``[T, K]`` tensor per router, in module order (what ``replay_routing`` takes): its
        calls concatenated along the tokens (one model forward is one call of each router).
        Routers that were not called are left out, like ``router_logits`` leaves them out."""
        return tuple(torch.cat(self.calls[name]) for name in self.names if self.calls[name])


@contextlib.contextmanager
def capture_routing(model: nn.Module) -> Iterator[CapturedRouting]:
    """Record the experts every routed router of ``model`` chooses inside the ``with`` block.

    Each router call appends its choice ``[T, K]`` (T = the tokens it routed, padding included;
    Switch: K = 1, its choice before capacity dropping), so a router run again by gradient
    checkpointing inside the block appears twice. The model output's ``router_indices``
    (``output_router_indices=True``) is this for one forward.
    """
    routers = _routed_routers(model)
    captured = CapturedRouting(tuple(name for name, _ in routers), {name: [] for name, _ in routers})
    previous = [router._capture_list for _, router in routers]
    for name, router in routers:
        router._capture_list = captured.calls[name]
    try:
        yield captured
    finally:
        for (_, router), before in zip(routers, previous):
            router._capture_list = before


RouterIndices = Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | CapturedRouting


@contextlib.contextmanager
def replay_routing(model: nn.Module, router_indices: RouterIndices) -> Iterator[None]:
    """Force the experts of every routed router of ``model`` inside the ``with`` block.

    Args:
        model: the model (or any module holding the routers) to run.
        router_indices: what a capture of the same inputs gave: the model output's
            ``router_indices`` (one ``[T, K]`` tensor per routed router, in module order), a
            ``CapturedRouting``, or ``{router name: [T, K]}`` for every routed router.

    Each router then routes every token to the given experts instead of choosing (its expert bias
    and DeepSeek-V3's group limit are not applied) and computes their gate weights from its
    *current* scores at those experts, with the family's own rule (softmax probabilities,
    renormalised where the family renormalises; DeepSeek-V3's sigmoid scores; gpt-oss's softmax
    over the chosen logits; Switch's probability, then its capacity rule). Replaying a model's own
    routing gives its outputs bit for bit on CPU (the Triton path agrees to float32 rounding); the
    router keeps training through those weights. Every call of a router in the block gets the same
    experts, so gradient checkpointing recomputes the same routing.

    Raises:
        ValueError: the routing does not fit the routers (count, names, shape, K, expert ids), or,
            at the forward, a router sees a different number of tokens than was captured.
    """
    routers = _routed_routers(model)
    if isinstance(router_indices, CapturedRouting):
        router_indices = router_indices.router_indices
    if isinstance(router_indices, Mapping):
        names = [name for name, _ in routers]
        unknown, missing = (
            sorted(set(router_indices) - set(names)),
            [n for n in names if n not in router_indices],
        )
        if unknown or missing:
            raise ValueError(
                f"replay_routing: the routing must name every routed router of {type(model).__name__} "
                f"and nothing else; no routed router: {unknown[:5]}, missing: {missing[:5]}."
            )
        ordered = [router_indices[name] for name in names]
    else:
        ordered = list(router_indices)
        if len(ordered) != len(routers):
            raise ValueError(
                f"replay_routing: {type(model).__name__} has {len(routers)} routed routers but the routing "
                f"has {len(ordered)} entries (one [T, K] tensor per router, in module order)."
            )
    forced = []
    for (name, router), indices in zip(routers, ordered):
        top_k = _router_top_k(router)
        num_experts = int(router.num_experts)  # type: ignore[attr-defined]
        if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.is_floating_point():
            raise ValueError(
                f"replay_routing: the routing of {name} must be an integer tensor [T, {top_k}]; got "
                f"{type(indices).__name__} {tuple(getattr(indices, 'shape', ()))}."
            )
        if indices.shape[1] != top_k:
            raise ValueError(
                f"replay_routing: {name} chooses {top_k} experts per token; the routing has "
                f"{indices.shape[1]} (shape {tuple(indices.shape)})."
            )
        if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < num_experts):
            raise ValueError(
                f"replay_routing: the routing of {name} names experts outside [0, {num_experts}) "
                f"(min {int(indices.min())}, max {int(indices.max())})."
            )
        forced.append(indices.to(dtype=torch.int64))
    previous = [router._replay_indices for _, router in routers]
    for (_, router), indices in zip(routers, forced):
        router._replay_indices = indices
    try:
        yield
    finally:
        for (_, router), before in zip(routers, previous):
            router._replay_indices = before


def _router_top_k(router: nn.Module) -> int:
    adapter = next((a for a in FAMILIES.values() if isinstance(router, a.routed_router_class)), None)
    return adapter.router_top_k(router) if adapter is not None else int(router.top_k)  # type: ignore[arg-type]


def _with_routing_arguments(forward):  # noqa: ANN001, ANN202 - wraps any model forward
    """A routed model's forward that also takes ``output_router_indices`` and ``router_indices``.

    Both are popped before the host forward runs (its signature, which ``inspect.signature``
    reports through ``functools.wraps``, is unchanged): ``router_indices=...`` runs it inside
    ``replay_routing``, ``output_router_indices=True`` inside ``capture_routing`` and adds
    ``router_indices`` (one ``[T, K]`` tensor per routed router, module order) to the output, as
    the last element of a tuple output.
    """

    @functools.wraps(forward)
    def routed_forward(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        router_indices = kwargs.pop("router_indices", None)
        output_router_indices = bool(kwargs.pop("output_router_indices", False))
        if router_indices is None and not output_router_indices:
            return forward(self, *args, **kwargs)
        with contextlib.ExitStack() as stack:
            if router_indices is not None:
                stack.enter_context(replay_routing(self, router_indices))
            captured = stack.enter_context(capture_routing(self)) if output_router_indices else None
            outputs = forward(self, *args, **kwargs)
        if captured is not None:
            if isinstance(outputs, tuple):
                outputs = (*outputs, captured.router_indices)
            else:
                outputs["router_indices"] = captured.router_indices
        return outputs

    routed_forward._routes_router_indices = True  # type: ignore[attr-defined]
    return routed_forward


# --------------------------------------------------------------------------------------------
# Configs and pre-trained models
# --------------------------------------------------------------------------------------------


class RoutedConfigMixin:
    """Methods shared by every routed config; the subclass declares ``moe_router: dict | None``.

    ``moe_router`` is the router config as a plain dict (JSON in ``config.json``); None means the
    family's own linear router.
    """

    moe_router: dict | None

    def _validate_moe_router(self) -> None:
        if isinstance(self.moe_router, RouterConfig):
            self.moe_router = self.moe_router.to_dict()
        RouterConfig.from_dict(self.moe_router if self.moe_router is not None else DEFAULT_ROUTER)
        adapter = FAMILIES.get(getattr(self, "model_type", ""))
        if adapter is not None:
            adapter.validate_host_config(self)

    @property
    def router_config(self) -> RouterConfig:
        """The parsed router config (``LinearRouterConfig`` when ``moe_router`` is None)."""
        return RouterConfig.from_dict(self.moe_router if self.moe_router is not None else DEFAULT_ROUTER)


class RoutedPreTrainedMixin:
    """Placed in front of the host ``*PreTrainedModel``; inherited by base *and* head models so
    every sub-``PreTrainedModel`` initialises our routers (pitfall 4).

    Every routed model class's ``forward`` also takes ``output_router_indices=True`` (the experts
    each router chose, as ``outputs.router_indices``) and ``router_indices=...`` (replay them):
    ``__init_subclass__`` wraps the host forward it inherits (``_with_routing_arguments``).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        forward = getattr(cls, "forward", None)
        if (
            forward is None
            or forward is nn.Module.forward
            or getattr(forward, "_routes_router_indices", False)
        ):
            return
        cls.forward = _with_routing_arguments(forward)  # type: ignore[method-assign]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN206
        # A local checkpoint of hf-moe-routers 0.1.0 stores one-number router parameters 0-dim;
        # they are [1] now. Read them through a temporary conversion rule (see
        # FamilyAdapter.conversion_mapping for why the rule is not always registered).
        adapter = next((a for a in FAMILIES.values() if cls in a.model_classes.values()), None)
        legacy = adapter is not None and _has_zero_dim_one_element_tensors(pretrained_model_name_or_path)
        if not legacy:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)  # type: ignore[misc]
        adapter.register_conversion_mapping(zero_dim_one_element=True)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)  # type: ignore[misc]
        finally:
            adapter.register_conversion_mapping(restore=True)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, RouterScorer):
            module.reset_parameters(std=self._router_init_std())
            return
        if isinstance(module, RoutedRouterMixin):
            # Its parameters live in its scorer; the host branch would look for `weight`. The expert
            # bias starts at zero (a checkpoint's own is kept: `init` skips loaded tensors).
            bias = module.selection_bias()
            if bias is not None:
                init.zeros_(bias)
            return
        super()._init_weights(module)  # type: ignore[misc]

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers treats classes defined outside it as "custom code" and then skips every module
        # whose own (non-recursive) parameters are all loaded, a guard for code that initialises in
        # place without ``transformers.initialization``. A module with no direct parameters passes
        # that guard vacuously, so Switch's attention, dense and sparse-MLP inits (which reach into
        # child Linears) never ran for a routed model loaded with missing weights. Every
        # ``_init_weights`` here goes through ``transformers.initialization``, which skips loaded
        # tensors itself: the guard is not needed, so run the library's own path.
        super()._initialize_weights(module, is_custom_code=False)  # type: ignore[misc]

    def _router_init_std(self) -> float:
        """Standard deviation for from-scratch router parameters: the family's own."""
        std = getattr(self.config, "initializer_range", None)  # type: ignore[attr-defined]
        return 0.02 if std is None else float(std)

    #: Whether the host family's experts use transformers' experts interface (Switch: no).
    _host_uses_experts_interface: ClassVar[bool] = True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers greps the model's source file for its decorator (pitfall 5); our classes
        # inherit the host's experts modules unchanged, so every implementation applies.
        if cls._host_uses_experts_interface:
            return True
        return super()._can_set_experts_implementation()  # type: ignore[misc]

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Default to our dispatch kernel (``"hf_moe_routers"``) where it runs on CUDA with Triton;
        elsewhere transformers' own default (``grouped_mm``). An explicit request always wins, and a
        CUDA machine without Triton logs the fallback once."""
        if requested_experts is None and self._host_uses_experts_interface and torch.cuda.is_available():
            from ..kernels import preferred_experts_implementation

            preferred = preferred_experts_implementation("cuda")
            if preferred is not None:
                return preferred
        return super().get_correct_experts_implementation(requested_experts)  # type: ignore[misc]

    def save_pretrained(self, save_directory, *args, **kwargs):  # noqa: ANN001, ANN201 - transformers' signature
        """``PreTrainedModel.save_pretrained``, plus the files that make the folder publishable:
        self-contained remote code (``auto_map``) and a model card (``modeling/publishing.py``)."""
        super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
        if kwargs.get("is_main_process", True):
            # Late and left out of the remote code: publishing generates that code from this file.
            from .publishing import write_hub_files

            write_hub_files(self, save_directory)

    def push_to_hub(self, repo_id, **kwargs):  # noqa: ANN001, ANN201 - transformers' signature
        """Upload weights, config with ``auto_map``, remote code, card and plots."""
        from .publishing import push_routed_to_hub

        if push_routed_to_hub is None:  # remote code: transformers' own upload
            return super().push_to_hub(repo_id, **kwargs)  # type: ignore[misc]
        return push_routed_to_hub(self, repo_id, **kwargs)

    def update_expert_biases(self, counts_by_router_name: Mapping[str, torch.Tensor]) -> None:
        """``update_expert_biases(self, counts_by_router_name)``: one aux-loss-free balancing step."""
        update_expert_biases(self, counts_by_router_name)  # type: ignore[arg-type]

    def routed_routers(self) -> list[tuple[str, nn.Module]]:
        """``(name, router)`` for every routed router of the model, in module order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, RoutedRouterMixin)]  # type: ignore[attr-defined]

    def router_regularization_loss(self) -> torch.Tensor:
        """Sum over layers of every router's weighted parameter-only penalty (float32 scalar)."""
        losses = [router.regularization_loss() for _, router in self.routed_routers()]
        if not losses:
            return torch.zeros(())
        return torch.stack([loss.float() for loss in losses]).sum()


def update_expert_biases(model: nn.Module, counts_by_router_name: Mapping[str, torch.Tensor]) -> None:
    """``update_expert_bias`` of every routed router of ``model`` whose expert bias is enabled.

    Args:
        model: any module holding routed routers (a routed model, a patched one, a PEFT wrapper).
        counts_by_router_name: ``[E]`` counts per router, keyed by the router's name in
            ``model.named_modules()`` (e.g. ``"model.layers.0.mlp.gate"``).

    Raises:
        ValueError: a name that is no routed router of ``model``, or a router with an enabled bias
            that has no counts (it would silently stay unbalanced).
    """
    routers = {
        name: module for name, module in model.named_modules() if isinstance(module, RoutedRouterMixin)
    }
    unknown = sorted(set(counts_by_router_name) - set(routers))
    if unknown:
        raise ValueError(
            f"update_expert_biases: {unknown[:5]} name no routed router of {type(model).__name__}; "
            f"routers: {sorted(routers)[:5]}{' ...' if len(routers) > 5 else ''}."
        )
    enabled = [name for name, router in routers.items() if router.expert_bias_enabled]
    missing = [name for name in enabled if name not in counts_by_router_name]
    if missing:
        raise ValueError(
            f"update_expert_biases: no counts for the routers {missing[:5]} (expert bias enabled)."
        )
    for name in enabled:
        routers[name].update_expert_bias(counts_by_router_name[name])


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _has_zero_dim_one_element_tensors(path: Any) -> bool:
    """Whether a local checkpoint folder holds a 0-dim ``scorer.<one-element parameter>`` tensor.

    Reads only the safetensors headers (8-byte length, then JSON with each tensor's shape).
    """
    folder = Path(str(path)) if isinstance(path, (str, os.PathLike)) else None
    if folder is None or not folder.is_dir():
        return False
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for key, info in header.items():
            parts = key.rsplit(".", 2)
            if len(parts) == 3 and parts[1] == "scorer" and parts[2] in ONE_ELEMENT_PARAMETERS:
                if isinstance(info, dict) and info.get("shape") == []:
                    return True
    return False


def _register_recordable_outputs(module: nn.Module) -> None:
    """transformers keys what a model records (``_can_record_outputs``) by the *class name* seen in
    ``PreTrainedModel.__init__``; a model whose class we swap afterwards must be registered again,
    or ``output_router_logits=True`` silently returns None."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # pragma: no cover - older/newer layouts keep reading the class attribute
        return
    _CAN_RECORD_REGISTRY[module] = getattr(type(module), "_can_record_outputs", None)


def convert_to_routed(
    model: nn.Module,
    adapter: FamilyAdapter,
    router_config: RouterConfig,
    *,
    from_dense: bool,
    keep_reference: bool = False,
) -> list[tuple[str, nn.Module]]:
    """Turn every host router of ``model`` into a routed router of ``adapter``, in place.

    Sub-models whose class appears in ``adapter.model_classes`` get the routed class too. With
    ``from_dense`` the scorer is initialised from the router's pretrained gate; with
    ``keep_reference`` that gate is kept as non-persistent buffers (``reference_weight``,
    ``reference_bias``) for agreement reports and ``distill_router``.

    Returns:
        ``(name, router)`` for each converted router.
    """
    for module in model.modules():
        routed_cls = adapter.model_classes.get(type(module))
        if routed_cls is not None:
            module.__class__ = routed_cls
            _register_recordable_outputs(module)
    for module in model.modules():
        # post_init copied the host classes' float32 lists onto each instance, merged upwards
        # (DeepSeek-V3 keeps `gate.weight`, which a routed gate does not have): take the routed
        # class's own lists; a following post_init merges them again.
        if isinstance(module, RoutedPreTrainedMixin):
            for name in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
                if name in vars(module):
                    setattr(module, name, set(getattr(type(module), name, None) or []))
    config = model.config  # type: ignore[attr-defined]
    hidden, experts, bias = adapter.hidden_size(config), adapter.num_experts(config), adapter.has_bias(config)
    converted = []
    for name, module in model.named_modules():
        if type(module) is not adapter.host_router_class:
            continue
        weight = bias_t = None
        if from_dense:
            weight, bias_t = adapter.dense_gate(module)
            weight = weight.detach().clone()
            bias_t = None if bias_t is None else bias_t.detach().clone()
        module.__class__ = adapter.routed_router_class
        module.attach_scorer(router_config, hidden, experts, bias=bias)  # type: ignore[attr-defined]
        if weight is not None:
            module.scorer.init_from_dense(weight, bias_t)  # type: ignore[attr-defined]
            if keep_reference:
                module.register_buffer("reference_weight", weight, persistent=False)
                module.register_buffer("reference_bias", bias_t, persistent=False)
        converted.append((name, module))
    if not from_dense:
        _forget_host_init(model, [name for name, _ in converted])
    return converted


def _forget_host_init(model: nn.Module, router_names: list[str]) -> None:
    """Let the next ``post_init`` initialise each router's parent module again, with our rules.

    A routed class is built by the host ``__init__`` (whose ``post_init`` already initialised the
    host's modules, including a parent-level init that draws the host gate, e.g. Switch's sparse
    MLP) and then converted. Loading a checkpoint instead builds the routed modules on the meta
    device and initialises each once with our ``_init_weights``; clearing the flag makes both
    paths run the same code for these modules (transformers' ``test_can_init_all_missing_weights``).
    """
    for name in router_names:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if getattr(parent, "_is_hf_initialized", False):
            del parent._is_hf_initialized

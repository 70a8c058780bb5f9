"""What every host family shares: the routed-router mixin, the family adapter, the routed config
and pre-trained-model mixins, and the in-place conversion of a host model into a routed one.

Design rule (docs/TRANSFORMERS.md §1, §3): replace routers only, keep their class identity
(``isinstance`` of the host router class, so transformers records their logits and initialises
them), their forward signature, return tuple and dtypes; never touch experts. A router is turned
into ours by giving the *same object* a subclass of its own class and attaching a scorer module,
so parameters, hooks, device and every other model in the process are left alone.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..families import FAMILIES, ONE_ELEMENT_PARAMETERS, FamilyAdapter
from ..routers import RouterConfig, RouterScorer, build_scorer

__all__ = [
    "RoutedConfigMixin",
    "RoutedPreTrainedMixin",
    "RoutedRouterMixin",
    "SoftmaxTopKRoutedRouter",
    "convert_to_routed",
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
        self.scorer = scorer

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
    ``topk`` -> divide, bit for bit (``tests/test_kernels.py`` checks both).
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
        weights_TK, indices_TK = topk_softmax(op_logits_TE, self.top_k, renormalize=renormalize)  # type: ignore[attr-defined]
        if self.cast_weights_to_logits_dtype:
            weights_TK = weights_TK.to(logits_TE.dtype)
        return logits_TE, weights_TK, indices_TK


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
    every sub-``PreTrainedModel`` initialises our routers (pitfall 4)."""

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
            return  # its parameters live in its scorer; the host branch would look for `weight`
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

    def routed_routers(self) -> list[tuple[str, nn.Module]]:
        """``(name, router)`` for every routed router of the model, in module order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, RoutedRouterMixin)]  # type: ignore[attr-defined]

    def router_regularization_loss(self) -> torch.Tensor:
        """Sum over layers of every router's weighted parameter-only penalty (float32 scalar)."""
        losses = [router.regularization_loss() for _, router in self.routed_routers()]
        if not losses:
            return torch.zeros(())
        return torch.stack([loss.float() for loss in losses]).sum()


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

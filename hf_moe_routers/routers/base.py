"""The router contract shared by every routing method.

Shape legend used across ``hf_moe_routers.routers``:
    T tokens (batch * sequence, flattened), H hidden size, E experts, K top-k,
    R latent rank, M anchors per expert, D cosine-router projection size.

A *router config* is a small dataclass that names a method and its hyper-parameters; it is
validated on construction and round-trips through JSON (it is stored as a plain dict inside the
model config). A *scorer* is the ``nn.Module`` built from it: it maps router inputs ``x_TH`` to
float32 logits ``[T, E]`` and owns every parameter of the method. The host family's router class
(Mixtral, Qwen, OLMoE, Switch, ...) keeps its forward signature and return tuple and turns those
logits into its own top-k convention; see ``hf_moe_routers.modeling``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

from ..numerics import no_autocast, spectral_norm, stable_rank

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - a torch build without distributed support
    _DTensor = None

__all__ = [
    "EXPERT_BIAS_RULES",
    "SCORERS",
    "RouterConfig",
    "RouterScorer",
    "expert_bias_delta",
    "no_autocast",
    "full_tensor",
    "spectral_norm",
    "stable_rank",
]


# --------------------------------------------------------------------------------------------
# Validation helpers: every error names the field and what it accepts.
# --------------------------------------------------------------------------------------------


def check_choice(owner: str, field: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(
            f"{owner}.{field} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}."
        )


def check_number(
    owner: str,
    field: str,
    value: Any,
    *,
    integer: bool = False,
    minimum: float | None = None,
    exclusive_minimum: bool = False,
    allow_none: bool = False,
) -> None:
    if value is None and allow_none:
        return
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{owner}.{field} must be {kind}{extra}; got {value!r} ({type(value).__name__}).")
    if not integer and not math.isfinite(float(value)):
        raise ValueError(f"{owner}.{field} must be finite; got {value!r}.")
    if minimum is not None:
        bad = value <= minimum if exclusive_minimum else value < minimum
        if bad:
            op = ">" if exclusive_minimum else ">="
            raise ValueError(f"{owner}.{field} must be {op} {minimum}; got {value!r}.")


def check_bool(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{field} must be True or False; got {value!r}.")


# --------------------------------------------------------------------------------------------
# Router configs
# --------------------------------------------------------------------------------------------

#: The one router registry: ``router_type`` -> scorer class. A scorer class registers itself when
#: it is defined (``RouterScorer.__init_subclass__``), under its ``config_class.router_type``; the
#: config class of a type is found through it (``_config_class``), so a router type is one
#: (config, scorer) pair named in one place, the scorer's ``config_class``.
_ROUTER_TYPES: dict[str, type[RouterScorer]] = {}
#: Read-only view of the registry, for callers that list the router types or their scorers.
SCORERS: Mapping[str, type[RouterScorer]] = MappingProxyType(_ROUTER_TYPES)


def _config_class(router_type: Any) -> type[RouterConfig]:
    """The config class registered for ``router_type``; a ``ValueError`` listing the types if none."""
    if router_type not in _ROUTER_TYPES:
        raise ValueError(
            f"router_type must be one of {', '.join(repr(t) for t in sorted(_ROUTER_TYPES))}; "
            f"got {router_type!r}."
        )
    return _ROUTER_TYPES[router_type].config_class


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


#: How ``update_expert_bias`` turns a step's expert loads into a bias change (``expert_bias_delta``).
EXPERT_BIAS_RULES: tuple[str, ...] = ("sign", "proportional")


def apply_keeping_float32(
    module: nn.Module, names: Iterable[str], apply: Callable[[], nn.Module]
) -> nn.Module:
    """Run ``apply`` (the module's ``super()._apply(fn)``) and keep the buffers ``names`` float32.

    ``model.to(torch.bfloat16)`` / ``.half()`` cast every floating buffer; a buffer whose value
    must not be rounded (an expert bias updated by steps of ~1e-3, SR-MoE's bound c) gets its
    float32 value back, re-taken from before the cast when it was float32 then (casting back would
    keep the rounding), on the device ``fn`` moved it to.
    """
    before = {name: module._buffers.get(name) for name in names}
    result = apply()
    for name, old in before.items():
        new = module._buffers.get(name)
        if old is None or new is None or new.dtype == torch.float32:
            continue
        source = old if old.dtype == torch.float32 else new
        module._buffers[name] = source.to(device=new.device, dtype=torch.float32)
    return result


def expert_bias_delta(counts_E: torch.Tensor, rate: float, rule: str) -> torch.Tensor:
    """The change ``[E]`` float32 of the aux-loss-free expert bias for one step's loads ``counts_E``.

    With ``mean = counts_E.mean()``:

    - ``"sign"`` (DeepSeek-V3, Megatron-LM, torchtitan): ``rate * sign(mean - counts_i)``; every
      under-loaded expert gains ``rate``, every over-loaded one loses ``rate``, a balanced one keeps
      its bias.
    - ``"proportional"`` [ours]: ``rate * (mean - counts_i) / mean``, the relative load error, so a
      nearly balanced expert moves little; zero when no token was routed (``mean == 0``).

    The change is not centred (the paper and Megatron-LM do not; torchtitan subtracts its mean).
    """
    check_choice("RouterConfig", "expert_bias_rule", rule, EXPERT_BIAS_RULES)
    counts = counts_E.detach().float()
    mean = counts.mean()
    offset = mean - counts
    if rule == "sign":
        return rate * offset.sign()
    return rate * torch.where(mean > 0, offset / mean.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


@dataclasses.dataclass
class RouterConfig:
    """Base class of every router config.

    Subclasses are dataclasses with a class-level ``router_type`` and override ``validate``; the
    type is registered by the scorer that names the config as its ``config_class``.
    ``check_finite`` (shared by all methods) makes the router raise a clear error when the hidden
    states it receives contain NaN or Inf; it costs one device sync per router call, so switch it
    off for ``torch.compile`` or maximal speed.

    Aux-loss-free balancing (DeepSeek-V3's expert bias; shared by all methods, keyword-only, off by
    default; docs/ROUTERS.md):

    - ``expert_bias_update_rate``: u >= 0; 0 switches the bias off (no buffer is created, except
      DeepSeek-V3's own ``e_score_correction_bias``, which its router always adds). With u > 0
      each router holds a float32 buffer ``b [E]`` (saved with the checkpoint, never trained by
      gradients): experts are *selected* on ``logits + b`` (the softmax-family routers, Switch and
      gpt-oss) or ``sigmoid(logits) + b`` (DeepSeek-V3), their gate weights come from the unbiased
      scores, and ``update_expert_bias(counts_E)`` moves ``b`` once per optimizer step.
    - ``expert_bias_rule``: ``"sign"`` or ``"proportional"`` (``expert_bias_delta``).
    - ``expert_bias_clamp``: None, or c > 0 to keep every ``b_i`` in ``[-c, c]`` after each update.
    """

    router_type: ClassVar[str] = ""
    check_finite: bool = True
    expert_bias_update_rate: float = dataclasses.field(default=0.0, kw_only=True)
    expert_bias_rule: str = dataclasses.field(default="sign", kw_only=True)
    expert_bias_clamp: float | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_bool(name, "check_finite", self.check_finite)
        check_number(name, "expert_bias_update_rate", self.expert_bias_update_rate, minimum=0.0)
        check_choice(name, "expert_bias_rule", self.expert_bias_rule, EXPERT_BIAS_RULES)
        check_number(
            name,
            "expert_bias_clamp",
            self.expert_bias_clamp,
            minimum=0.0,
            exclusive_minimum=True,
            allow_none=True,
        )
        self.validate()

    @property
    def expert_bias_enabled(self) -> bool:
        """Whether the routers keep and update an aux-loss-free expert bias (``update rate > 0``)."""
        return self.expert_bias_update_rate > 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and its allowed values for any bad field."""

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that ``RouterConfig.from_dict`` turns back into this config."""
        return {"router_type": self.router_type, **dataclasses.asdict(self)}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any] | RouterConfig) -> RouterConfig:
        """Build the config named by ``data["router_type"]``; unknown keys are an error."""
        if isinstance(data, RouterConfig):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"A router config must be a RouterConfig or a dict; got {type(data).__name__}.")
        data = dict(data)
        cls = _config_class(data.pop("router_type", None))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"Unknown field(s) {unknown} for {cls.__name__}; allowed fields: {sorted(names)}."
            )
        return cls(**data)

    @staticmethod
    def from_json_kwargs(
        router_type: str, router_kwargs: str, defaults: dict[str, Any] | None = None
    ) -> RouterConfig:
        """The config of ``router_type`` from a JSON object of its fields (command-line flags);
        ``defaults`` fill fields the JSON leaves out."""
        _config_class(router_type)  # an unknown type is named before the JSON is looked at
        try:
            kwargs = json.loads(router_kwargs)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"router_kwargs must be a JSON object; got {router_kwargs!r} ({error})."
            ) from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"router_kwargs must be a JSON object; got {router_kwargs!r}.")
        if "router_type" in kwargs:  # it would silently replace the type asked for
            raise ValueError("router_kwargs must not contain router_type; use --router_type.")
        return RouterConfig.from_dict({"router_type": router_type, **(defaults or {}), **kwargs})

    @staticmethod
    def registered_types() -> tuple[str, ...]:
        """Every registered ``router_type``, sorted (the keys of ``SCORERS``)."""
        return tuple(sorted(_ROUTER_TYPES))


# --------------------------------------------------------------------------------------------
# Float32 math and matrix statistics
# --------------------------------------------------------------------------------------------
# These mirror hf_moe_routers.metrics (no_autocast, spectral_norm, stable_rank), which cannot be
# imported here: this module ships as standalone remote code (modeling/remote_code.py) that may
# import only its own sibling files, and importing the metrics would add the whole metrics package
# to every saved model. tests/test_report.py checks the two copies give identical numbers.


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a ``DTensor`` (a parameter FSDP2 or tensor parallel sharded), else
    ``tensor`` itself.

    Statistics of a routing matrix (σ_max, stable rank, norms) computed on one rank's shard are
    silently wrong. For a ``DTensor`` this is a collective: every rank must call it.
    """
    if _DTensor is not None and isinstance(tensor, _DTensor):
        return tensor.full_tensor()
    return tensor


# --------------------------------------------------------------------------------------------
# Scorer base module
# --------------------------------------------------------------------------------------------


class RouterScorer(nn.Module):
    """Maps router inputs ``x_TH`` to logits ``[T, E]``; owns every parameter of the method.

    Subclasses implement ``forward``, ``reset_parameters`` (from-scratch init),
    ``init_from_dense`` (conversion of a pretrained dense gate) and ``routing_matrix``.
    The parameter-only regularisers of the method come from ``regularization_terms`` (raw,
    unweighted) and ``regularization_loss`` (weighted by the config).
    """

    config_class: ClassVar[type[RouterConfig]]
    #: Parameters/buffers that hold one number. They are ``[1]``, never 0-dim (FSDP2's
    #: ``fully_shard`` refuses scalar parameters); checkpoints written by hf-moe-routers 0.1.0 stored
    #: them 0-dim, and both ``load_state_dict`` and ``from_pretrained`` still read those.
    one_element_parameters: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register the class as the scorer of its ``config_class.router_type`` (see ``SCORERS``).

        Only a class that declares ``config_class`` itself registers: a subclass that inherits it
        is a variant of the same router type, not a new one, and must not take its place.
        """
        super().__init_subclass__(**kwargs)
        config_class = cls.__dict__.get("config_class")
        if config_class is None:
            return
        router_type = config_class.router_type
        if not router_type:
            raise TypeError(f"{config_class.__name__} (config_class of {cls.__name__}) sets no router_type.")
        registered = _ROUTER_TYPES.get(router_type)
        # The same class defined again (a reloaded module) replaces itself; another class may not.
        if registered is not None and _qualified_name(registered) != _qualified_name(cls):
            raise TypeError(
                f"router_type {router_type!r} is already registered by {_qualified_name(registered)}; "
                f"{_qualified_name(cls)} needs a config class with another router_type."
            )
        _ROUTER_TYPES[router_type] = cls

    def __init__(self, config: RouterConfig, hidden_size: int, num_experts: int, *, bias: bool = False):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ValueError(f"{type(self).__name__} needs a {self.config_class.__name__}; got {config!r}.")
        check_number(type(self).__name__, "hidden_size", hidden_size, integer=True, minimum=1)
        check_number(type(self).__name__, "num_experts", num_experts, integer=True, minimum=1)
        self.config = config
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.has_bias = bias

    # -- the contract ----------------------------------------------------------------------------
    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Return logits ``[T, E]`` (float32 unless the method is the host's own linear gate)."""
        raise NotImplementedError

    def reset_parameters(self, std: float = 0.02) -> None:  # pragma: no cover - abstract
        """Initialise every parameter and buffer for training from scratch.

        Uses ``transformers.initialization`` so tensors already loaded from a checkpoint are kept.
        """
        raise NotImplementedError

    def init_from_dense(self, weight_EH: torch.Tensor, bias_E: torch.Tensor | None = None) -> None:
        """Initialise from a pretrained dense gate ``logits = x @ weight_EH.T + bias_E``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def routing_matrix(self) -> torch.Tensor:
        """The matrix ``[N, H]`` that reads the router input (gate rows, prototypes or ``W_q``)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def effective_routing_matrix(self) -> torch.Tensor:
        """The matrix that actually scores inputs (``routing_matrix`` after any constraint)."""
        return self.routing_matrix()

    def queries(self, x_TH: torch.Tensor) -> torch.Tensor:
        """What the scores compare with the experts, ``[T, *]`` float32 (default: the input)."""
        return x_TH.float()

    def expert_embeddings(self) -> torch.Tensor:
        """One row per expert (or per anchor) in the space where scores are computed ``[E*M, *]``."""
        return self.routing_matrix()

    def scale_logits_(self, factor: float) -> bool:
        """Multiply every logit by ``factor > 0`` by changing a scale parameter, in place.

        Returns False when the method has no such parameter (then nothing changes). Used by
        ``distill_router`` to match the teacher's logit scale before fitting.
        """
        return False

    def regularization_terms(self) -> dict[str, torch.Tensor]:
        """Raw (unweighted) parameter-only penalty terms of the method; empty if it has none."""
        return {}

    def regularization_weights(self) -> dict[str, float]:
        """The config's weight for each key of ``regularization_terms``."""
        return {}

    def regularization_loss(self) -> torch.Tensor:
        """``Σ weight · term`` over ``regularization_terms``, a float32 scalar (0 when none)."""
        terms = self.regularization_terms()
        weights = self.regularization_weights()
        total = torch.zeros((), device=self._device(), dtype=torch.float32)
        for name, value in terms.items():
            weight = weights.get(name, 0.0)
            if weight:
                total = total + weight * value.float()
        return total

    def lipschitz_bound(self) -> torch.Tensor:
        """An upper bound ``L`` with ``‖logits(x) − logits(y)‖₂ ≤ L ‖x − y‖₂`` for all inputs.

        ``inf`` when the scoring function has no global Lipschitz constant (for example a
        normalised query, which jumps at ``x = 0``).
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def local_lipschitz_bound(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Per token, an upper bound ``[T]`` on the spectral norm of the logits' Jacobian at ``x``.

        Finite for every method (unlike ``lipschitz_bound`` for normalised queries); equal to the
        global bound for affine scorers. The Trainer logs its maximum over observed tokens.
        """
        return self.lipschitz_bound().to(x_TH.device).expand(x_TH.shape[0]).clone()

    def spectral_norm(self) -> torch.Tensor:
        """σ_max of ``routing_matrix()`` in float32."""
        return spectral_norm(self.routing_matrix().detach())

    def stable_rank(self) -> torch.Tensor:
        """Stable rank of ``routing_matrix()`` in float32."""
        return stable_rank(self.routing_matrix().detach())

    # -- loading ---------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch's
        # A 0-dim tensor from an old checkpoint becomes the [1] vector the parameter now is.
        for name in self.one_element_parameters:
            key = prefix + name
            value = state_dict.get(key)
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                state_dict[key] = value.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- helpers ---------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, config={self.config}"

"""Export a routed model back to a plain family checkpoint that stock transformers serves.

A router that is still *linear in form* (``logits = W x + b``) can be written back into the host
family's own gate: the ``linear`` router as it is, and SR-MoE with ``scoring="linear"``, whose
spectral control only shapes ``W`` during training (``penalty``) or rescales it
(``constrain``: ``W_eff = W · min(1, c/σ)``, folded into the exported weight) and whose temperature
divides the logits (``W/τ``, ``b/τ``, folded too). Every other router scores inputs with something
no family gate can express (prototype distances, normalised latent queries, cosines), so export
refuses them with the reason.

The exported model is an instance of the host class (``MixtralForCausalLM``, ...), so
``save_pretrained`` writes a checkpoint that any engine serving the family loads without this
package and without remote code. With τ = 1 (the default) its logits are bit-identical to the
routed model's in float32; a folded τ ≠ 1 moves them by rounding only. In bf16/fp16 the host gate
computes in the model's dtype, as the family always does, while SR-MoE scored in float32.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from .modeling import FAMILIES, RoutedRouterMixin
from .routers import LinearScorer, RouterScorer, SRMoEScorer

__all__ = ["dense_gate_of", "export_to_family"]

#: Config keys that name the routed model rather than describe it.
_ROUTED_ONLY_KEYS = ("model_type", "architectures", "transformers_version", "auto_map", "moe_router")


def dense_gate_of(scorer: RouterScorer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gate ``(W [E, H], b [E] | None)`` with ``scorer(x) == x @ W.T + b`` for every input.

    Raises ``ValueError`` naming the router type when the scorer is not linear in form.
    """
    if isinstance(scorer, LinearScorer):
        bias = None if scorer.bias is None else scorer.bias.detach()
        return scorer.routing_matrix().detach(), bias
    if isinstance(scorer, SRMoEScorer) and scorer.config.scoring == "linear":
        with torch.no_grad():
            weight = scorer.effective_routing_matrix().float()  # the constrain rescale included
            bias = None if scorer.bias is None else scorer.bias.detach().float()
            tau = scorer.config.temperature
            if tau != 1.0:
                weight = weight / tau
                bias = None if bias is None else bias / tau
        dtype = scorer.routing_matrix().dtype
        return weight.to(dtype), None if bias is None else bias.to(dtype)
    router_type = scorer.config.router_type
    detail = f"scoring={scorer.config.scoring!r}" if isinstance(scorer, SRMoEScorer) else router_type
    raise ValueError(
        f"export_to_family: a {router_type!r} router ({detail}) is not linear in its input, so no family "
        "gate `W x + b` reproduces its routing. Exportable routers: 'linear', and 'sr_moe' with "
        "scoring='linear' (penalty, constrain or none; the constraint and temperature are folded in)."
    )


def _gate_tensors(
    router: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """State-dict entries (relative to the router) of the host gate holding ``weight`` and ``bias``."""
    entries: dict[str, torch.Tensor] = {}
    for name in type(router).host_gate_attributes:
        if name == "weight":
            entries["weight"] = weight
        elif name == "bias":
            if bias is None:
                raise ValueError("export_to_family: the host gate has a bias but the router has none.")
            entries["bias"] = bias
        else:  # a gate module (Switch's `classifier`)
            entries[f"{name}.weight"] = weight
            if bias is not None:
                entries[f"{name}.bias"] = bias
    return entries


def _drop_expert_bias(router: nn.Module, prefix: str, state: dict[str, torch.Tensor], family: str) -> None:
    """Remove a router's aux-loss-free expert bias from ``state``, or refuse when it is in use.

    DeepSeek-V3's own ``e_score_correction_bias`` is the host's buffer and stays. Any other family's
    gate selects by ``W x + b`` alone: a zero bias (never updated) changes no routing and is dropped,
    a non-zero one shifts which experts are selected, which the host gate cannot express.
    """
    name = type(router).expert_bias_attribute
    if name == "e_score_correction_bias" or prefix + name not in state:
        return
    bias = state.pop(prefix + name)
    if bool(bias.any()):
        raise ValueError(
            f"export_to_family: router {prefix[:-1]!r} selects experts with a trained expert bias "
            f"(expert_bias_update_rate > 0; max |b| = {bias.abs().max().item():.3g}), which the {family} "
            "gate cannot express: its selection uses W x + b alone. Export is possible only while the "
            "expert bias is zero, or for DeepSeek-V3, whose e_score_correction_bias carries it."
        )


def _host_config(model: PreTrainedModel, host_model_type: str) -> Any:
    data = {k: v for k, v in model.config.to_dict().items() if k not in _ROUTED_ONLY_KEYS}
    config = AutoConfig.for_model(host_model_type, **data)
    implementation = getattr(model.config, "_experts_implementation", None)
    if implementation is not None:
        config._experts_implementation = implementation
    return config


def export_to_family(model: PreTrainedModel) -> PreTrainedModel:
    """A plain host-family model (e.g. ``MixtralForCausalLM``) with the routed model's weights.

    Args:
        model: a routed model (built from a ``routed_*`` config or by ``patch_moe_routers``) whose
            routers are all linear in form (see the module docstring).

    Returns:
        A new model of the host class, in ``model``'s training mode, on its device and dtypes;
        ``model`` is left unchanged. ``save_pretrained`` of it is a stock family checkpoint.

    Raises:
        ValueError: ``model`` is not a routed model, or one of its routers cannot be exported.
    """
    adapter = FAMILIES.get(getattr(model.config, "model_type", None))
    if adapter is None or model.config.model_type != adapter.routed_model_type:
        raise ValueError(
            f"export_to_family needs a routed model (model_type routed_*); got "
            f"model_type={getattr(model.config, 'model_type', None)!r} ({type(model).__name__})."
        )
    host_classes = {routed: host for host, routed in adapter.model_classes.items()}
    host_cls = host_classes.get(type(model))
    if host_cls is None:
        raise ValueError(
            f"export_to_family: no {adapter.host_model_type} class for {type(model).__name__}; "
            f"exportable classes: {sorted(c.__name__ for c in host_classes)}."
        )
    routers = {
        name: module for name, module in model.named_modules() if isinstance(module, RoutedRouterMixin)
    }
    state = dict(model.state_dict())
    for name, router in routers.items():
        weight, bias = dense_gate_of(router.base_scorer)  # raises for routers not linear in form
        prefix = f"{name}."
        for key in [k for k in state if k.startswith(prefix + "scorer.")]:
            del state[key]
        for key, tensor in _gate_tensors(router, weight, bias).items():
            state[prefix + key] = tensor
        _drop_expert_bias(router, prefix, state, adapter.name)
    # Built without random init (transformers' no_init_weights), then every tensor is the routed
    # model's own (assign keeps its dtype); buffers outside the state dict (rotary tables) come
    # from __init__ as in any freshly built host model.
    config = _host_config(model, adapter.host_model_type)
    with no_init_weights(), torch.device(model.device):
        host = host_cls(copy.deepcopy(config))
    missing, unexpected = host.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(host, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"export_to_family: the {host_cls.__name__} state does not match the routed model's "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})."
        )
    host.tie_weights()
    host.train(model.training)
    return host

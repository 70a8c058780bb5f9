"""The router losses the Trainer adds to the model's loss, per micro-batch.

- the load-balancing loss, per layer (mean over layers of ``E·Σ f_e·P_e``, padding-masked) or
  transformers' pooled form, with the family's routing probabilities (``balance_probs``);
- the router z-loss (mean over layers, padding-masked);
- each routed router's weighted parameter-only penalties (SR-MoE's spectral and stable-rank terms),
  summed over layers.

Shape legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import metrics as M
from ..reporting.collector import RouterCapture, RouterInfo
from ..reporting.report import balance_probs

__all__ = ["ROUTER_OUTPUT_KEYS", "balance_loss", "parameter_penalty", "router_masks", "z_loss_term"]

# Keys transformers puts router outputs under; stripped before compute_metrics (pitfall 10).
ROUTER_OUTPUT_KEYS = (
    "router_logits",
    "aux_loss",
    "encoder_router_logits",
    "decoder_router_logits",
    "encoder_z_loss",
    "encoder_aux_loss",
    "decoder_z_loss",
    "decoder_aux_loss",
    "z_loss",
)


def router_masks(
    routers: Sequence[RouterInfo],
    inputs: Mapping[str, Any],
    captures: Sequence[RouterCapture | None],
    is_encoder_decoder: bool,
) -> list[torch.Tensor | None]:
    """Per router, a ``[T]`` bool mask of real tokens when the inputs say which are padding."""
    masks: list[torch.Tensor | None] = []
    for info, capture in zip(routers, captures):
        if capture is None:
            masks.append(None)
            continue
        key = (
            "attention_mask"
            if info.stack == "encoder" or not is_encoder_decoder
            else "decoder_attention_mask"
        )
        mask = inputs.get(key)
        if mask is not None and mask.numel() == capture.logits_TE.shape[0]:
            masks.append(mask.reshape(-1).to(device=capture.logits_TE.device, dtype=torch.bool))
        else:
            masks.append(None)
    return masks


def balance_loss(
    kind: str,
    stacks: Sequence[str],
    captures: Sequence[RouterCapture],
    masks: Sequence[torch.Tensor | None],
    scoring: str,
) -> torch.Tensor:
    """The balance loss of one micro-batch (scalar, with gradients) over the routers that ran.

    ``kind``: ``"per_layer"`` (mean over layers of each layer's loss) or ``"pooled"`` (transformers'
    form, pooled within each group of layers that see the same tokens: same token count and stack).
    ``stacks`` are the routers' ``RouterInfo.stack``, aligned with ``captures``.
    """
    if kind == "per_layer":
        losses = [
            M.load_balance_loss(
                c.logits_TE,
                c.indices_TK,
                m,
                probs=balance_probs(c.logits_TE, c.indices_TK, scoring),
                validate=False,
            )
            for c, m in zip(captures, masks)
        ]
        return torch.stack(losses).mean()
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, (stack, c) in enumerate(zip(stacks, captures)):
        groups[(c.logits_TE.shape[0], stack)].append(i)
    values = []
    for members in groups.values():
        logits = [captures[i].logits_TE for i in members]
        indices = [captures[i].indices_TK for i in members]
        probs = None
        if scoring != "softmax":
            probs = [balance_probs(captures[i].logits_TE, captures[i].indices_TK, scoring) for i in members]
        values.append(
            M.pooled_load_balance_loss(logits, indices, masks[members[0]], probs=probs, validate=False)
        )
    return torch.stack(values).mean()


def z_loss_term(captures: Sequence[RouterCapture], masks: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Mean over the routers that ran of the padding-masked router z-loss (scalar, with gradients)."""
    return torch.stack([M.z_loss(c.logits_TE, m, validate=False) for c, m in zip(captures, masks)]).mean()


def parameter_penalty(
    routers: Sequence[RouterInfo],
    captures: Sequence[RouterCapture | None],
    overrides: Mapping[str, float | None],
) -> torch.Tensor | None:
    """Σ over routed routers of their weighted parameter-only penalties (None if none has one).

    The raw terms come from the scorers' forward (see ``RouterCollector``), so LoRA deltas on router
    parameters, which PEFT applies only inside forward, are part of them. A weight in ``overrides``
    (the Trainer's arguments) replaces the router config's own unless it is None.
    """
    total = None
    for info, capture in zip(routers, captures):
        if not info.routed or capture is None or not capture.penalty_terms:
            continue
        weights = info.scorer.regularization_weights()
        for name, value in capture.penalty_terms.items():
            weight = overrides.get(name) if overrides.get(name) is not None else weights.get(name, 0.0)
            if weight:
                term = weight * value.float()
                total = term if total is None else total + term
    return total

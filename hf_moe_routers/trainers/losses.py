"""The router losses the Trainer adds to the model's loss, per micro-batch.

- the load-balancing loss ``E·Σ f_e·P_e`` with the family's routing probabilities
  (``numerics.routing_probabilities``), padding excluded, at two granularities:
  - over layers (``router_balance_loss``): per layer (mean over layers of each layer's loss) or
    transformers' pooled form (counts and probabilities summed over the layers that see the same
    tokens before the product);
  - over tokens (``router_balance_granularity``): the micro-batch (f and P of each process's
    micro-batch), the sequence (DeepSeek-V3's sequence-wise loss: f and P of each sequence's real
    tokens, the loss's mean over sequences), or the global batch (f from the expert counts of all
    processes and of the optimizer step's micro-batches so far, times this micro-batch's own P;
    :func:`global_batch_balance_loss` states exactly what is and is not exact);
- the router z-loss (mean over layers, padding-masked);
- each routed router's weighted parameter-only penalties (SR-MoE's spectral and stable-rank terms),
  summed over layers.

Shape legend: T tokens, E experts, K top-k, B sequences (rows of the batch), L routers.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import metrics as M
from ..reporting.collector import RouterCapture, RouterInfo
from ..reporting.report import balance_probs

__all__ = [
    "ROUTER_OUTPUT_KEYS",
    "GlobalLoad",
    "balance_loss",
    "global_batch_balance_loss",
    "parameter_penalty",
    "router_masks",
    "sequence_balance_loss",
    "sequence_rows",
    "stack_input",
    "z_loss_term",
]

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

#: Input fields whose first dimension is the batch's number of sequences, in the order asked.
_ROW_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "decoder_input_ids", "labels", "pixel_values")


def stack_input(info: RouterInfo, inputs: Mapping[str, Any], name: str, is_encoder_decoder: bool) -> Any:
    """The batch entry ``name`` (``input_ids``, ``attention_mask``) of the tokens ``info`` routes:
    its ``decoder_`` twin for the decoder routers of an encoder-decoder model."""
    decoder = is_encoder_decoder and info.stack != "encoder"
    return inputs.get(f"decoder_{name}" if decoder else name)


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
        mask = stack_input(info, inputs, "attention_mask", is_encoder_decoder)
        if mask is not None and mask.numel() == capture.logits_TE.shape[0]:
            masks.append(mask.reshape(-1).to(device=capture.logits_TE.device, dtype=torch.bool))
        else:
            masks.append(None)
    return masks


def sequence_rows(inputs: Mapping[str, Any]) -> int:
    """The number of sequences B of a batch (the first dimension of its ``input_ids``, or of the
    first other batched field); the routers route its ``B·S`` tokens row by row."""
    for key in _ROW_KEYS:
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.ndim >= 2:
            return int(value.shape[0])
    raise ValueError(
        "router_balance_granularity='sequence' needs the batch's sequences: the inputs have none of "
        f"{', '.join(_ROW_KEYS)} as a [B, S, ...] tensor."
    )


@dataclasses.dataclass(frozen=True)
class GlobalLoad:
    """What one router's global-batch balance loss takes from outside its own micro-batch.

    Attributes:
        counts_E: expert slot counts of the real tokens, summed over every process and over the
            optimizer step's micro-batches so far, this one included (no gradient).
        tokens: the real tokens of those micro-batches on every process; ``f = counts_E / tokens``.
        batch_tokens: the real tokens of this micro-batch summed over the processes (``N_m``).
        replicas: the data-parallel replicas whose gradients are averaged (``D``: processes /
            ranks sharing a batch).
    """

    counts_E: torch.Tensor
    tokens: torch.Tensor
    batch_tokens: torch.Tensor
    replicas: int


def _balance_groups(
    capture: RouterCapture, mask: torch.Tensor | None, scoring: str, groups: int, where: str = ""
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One router's masked sums per group of consecutive tokens (a sequence, or the whole micro-batch):
    ``(slot counts [G, E] float32 without gradient, probability sums [G, E] float32 with gradient,
    real tokens [G] float32)``. Sync-free: padding is masked with ``where``, never indexed out.
    """
    logits_TE = capture.logits_TE.reshape(-1, capture.logits_TE.shape[-1])
    num_tokens, num_experts = logits_TE.shape
    if num_tokens % groups:
        raise ValueError(
            f"router_balance_granularity='sequence': router{where} routed {num_tokens} tokens, not a "
            f"multiple of the batch's {groups} sequences; the sequence-wise loss needs the "
            "[B, S] batch layout."
        )
    idx_TK = capture.indices_TK.reshape(num_tokens, -1).to(device=logits_TE.device, dtype=torch.int64)
    if mask is None:
        mask_T = torch.ones(num_tokens, dtype=torch.bool, device=logits_TE.device)
    else:
        mask_T = mask.reshape(-1).to(device=logits_TE.device, dtype=torch.bool)
    # Padding rows never reach the probability rule: a NaN there would poison its backward.
    real_TE = torch.where(mask_T.unsqueeze(-1), logits_TE, torch.zeros_like(logits_TE))
    probs_TE = M.routing_probs(real_TE, scoring, idx_TK)  # type: ignore[arg-type]
    probs_TE = torch.where(mask_T.unsqueeze(-1), probs_TE, torch.zeros_like(probs_TE))
    seq, top_k = num_tokens // groups, idx_TK.shape[1]
    weight_GSK = mask_T.float().reshape(groups, seq, 1).expand(groups, seq, top_k)
    counts_GE = torch.zeros(groups, num_experts, dtype=torch.float32, device=logits_TE.device)
    counts_GE.scatter_add_(1, idx_TK.reshape(groups, seq * top_k), weight_GSK.reshape(groups, seq * top_k))
    prob_sums_GE = probs_TE.reshape(groups, seq, num_experts).sum(1)
    return counts_GE, prob_sums_GE, mask_T.float().reshape(groups, seq).sum(1)


def _layer_groups(stacks: Sequence[str], captures: Sequence[RouterCapture]) -> list[list[int]]:
    """The routers that see the same tokens (same token count and stack), pooled together."""
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, (stack, c) in enumerate(zip(stacks, captures)):
        groups[(c.logits_TE.reshape(-1, c.logits_TE.shape[-1]).shape[0], stack)].append(i)
    return list(groups.values())


def _mean_over_sequences(
    counts_BE: torch.Tensor, prob_sums_BE: torch.Tensor, tokens_B: torch.Tensor
) -> torch.Tensor:
    """Mean over the sequences with a real token of ``E·Σ_e f_be·P_be``."""
    per_token = tokens_B.clamp_min(1.0).unsqueeze(-1)
    loss_B = counts_BE.shape[-1] * ((counts_BE / per_token) * (prob_sums_BE / per_token)).sum(-1)
    real_B = tokens_B > 0
    return torch.where(real_B, loss_B, torch.zeros_like(loss_B)).sum() / real_B.float().sum().clamp_min(1.0)


def sequence_balance_loss(
    kind: str,
    stacks: Sequence[str],
    captures: Sequence[RouterCapture],
    masks: Sequence[torch.Tensor | None],
    scoring: str,
    rows: int,
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss of one micro-batch (scalar, with gradients).

    For each sequence b of the ``rows`` sequences (the routers' ``T = B·S`` tokens, row by row) with
    ``n_b`` real tokens: ``f_be`` = slots of its real tokens that go to expert e / ``n_b`` and
    ``P_be`` = its real tokens' mean probability of e (the family's rule), ``L_b = E·Σ_e f_be·P_be``;
    the loss is the mean of ``L_b`` over the sequences with a real token. ``kind="per_layer"``: the
    mean over layers of each layer's loss; ``"pooled"``: per sequence, counts, probability sums
    and tokens summed over the layers that see the same tokens before the product, then the mean
    over those groups. Same scale as the other granularities (K at perfect balance); DeepSeek-V3
    writes ``f`` with a factor ``E/K`` and no ``E`` in front, so its value is ours / K.
    """
    values = []
    if kind == "per_layer":
        for i, (c, m) in enumerate(zip(captures, masks)):
            values.append(_mean_over_sequences(*_balance_groups(c, m, scoring, rows, f" {i}")))
        return torch.stack(values).mean()
    for members in _layer_groups(stacks, captures):
        sums = [_balance_groups(captures[i], masks[i], scoring, rows, f" {i}") for i in members]
        values.append(_mean_over_sequences(*(torch.stack(part).sum(0) for part in zip(*sums))))
    return torch.stack(values).mean()


def global_batch_balance_loss(
    kind: str,
    stacks: Sequence[str],
    captures: Sequence[RouterCapture],
    masks: Sequence[torch.Tensor | None],
    scoring: str,
    loads: Sequence[GlobalLoad],
) -> torch.Tensor:
    """The global-batch balance loss (arXiv 2501.11873) of one micro-batch on one process.

    With ``C_e`` / ``N`` the expert slot counts / real tokens of all processes and of the optimizer
    step's micro-batches 1..m so far (``loads``: this one included, no gradient), ``S_e`` this
    process's sum over its real tokens of the family's probability of e (with gradient), ``N_m``
    the real tokens of micro-batch m on all processes and ``D`` the data-parallel replicas::

        L = E · Σ_e (C_e / N) · (D · S_e / N_m)

    ``D·S_e/N_m`` is this process's share of the probabilities of the processes' joint micro-batch:
    after the data-parallel gradient average (the mean over the D replicas) the loss and its gradient
    are *exactly* those of one process running the concatenated micro-batch, whatever the padding
    (one process: ``D = 1``, ``N_m = n``, plain ``P_e``).

    **Exact across processes; under gradient accumulation, the running sum.** ``f`` of the whole
    optimizer step needs the routing of its later micro-batches, unknown at the backward pass of an
    earlier one; as f has no gradient, the exact step gradient ``E·Σ_e f_e·∇P_e`` would need either
    each micro-batch's gradient kept per expert (E copies) or its graph kept to the step's end
    (the memory accumulation saves), or an extra no-gradient forward of the step's micro-batches first
    (one more forward per step, exact only if that forward routes exactly as the training one:
    no dropout or router noise). So micro-batch m uses the counts accumulated so far in the
    step, micro-batches 1..m (Megatron-LM's ``global_tokens_per_expert`` does the same); the last
    micro-batch uses the step's exact f, and with one micro-batch per step the loss is exact. The
    Trainer weighs the micro-batches equally (``1/GA``, like every router term), which equals the
    token-weighted mean when they have as many real tokens.

    ``kind="per_layer"``: the mean over layers of each layer's loss; ``"pooled"``: ``C``, ``N``,
    ``S``, ``N_m`` summed over the layers that see the same tokens before the product.
    """
    sums = []
    for c, m, load in zip(captures, masks, loads):
        prob_sums_E = _balance_groups(c, m, scoring, 1)[1][0]
        device = prob_sums_E.device
        sums.append(
            (
                load.counts_E.to(device=device, dtype=torch.float32),
                load.tokens.to(device=device, dtype=torch.float32),
                prob_sums_E,
                load.batch_tokens.to(device=device, dtype=torch.float32),
            )
        )
    replicas = float(loads[0].replicas) if loads else 1.0

    def product(counts_E, tokens, prob_sums_E, batch_tokens):  # noqa: ANN001, ANN202
        fractions_E = counts_E / tokens.clamp_min(1.0)
        return (
            counts_E.shape[0] * (fractions_E * (replicas * prob_sums_E / batch_tokens.clamp_min(1.0))).sum()
        )

    if kind == "per_layer":
        return torch.stack([product(*s) for s in sums]).mean()
    values = [
        product(*(torch.stack(part).sum(0) for part in zip(*(sums[i] for i in members))))
        for members in _layer_groups(stacks, captures)
    ]
    return torch.stack(values).mean()


def balance_loss(
    kind: str,
    stacks: Sequence[str],
    captures: Sequence[RouterCapture],
    masks: Sequence[torch.Tensor | None],
    scoring: str,
    *,
    granularity: str = "micro_batch",
    rows: int | None = None,
    loads: Sequence[GlobalLoad] | None = None,
) -> torch.Tensor:
    """The balance loss of one micro-batch (scalar, with gradients) over the routers that ran.

    ``kind``: ``"per_layer"`` (mean over layers of each layer's loss) or ``"pooled"`` (transformers'
    form, pooled within each group of layers that see the same tokens: same token count and stack).
    ``stacks`` are the routers' ``RouterInfo.stack``, aligned with ``captures``. ``granularity``:
    ``"micro_batch"``, ``"sequence"`` (needs ``rows``, :func:`sequence_balance_loss`) or
    ``"global_batch"`` (needs ``loads``, aligned with ``captures``, :func:`global_batch_balance_loss`).
    """
    if granularity == "sequence":
        if rows is None:
            raise ValueError("granularity='sequence' needs rows, the batch's number of sequences.")
        return sequence_balance_loss(kind, stacks, captures, masks, scoring, rows)
    if granularity == "global_batch":
        if loads is None or len(loads) != len(captures):
            raise ValueError("granularity='global_batch' needs one GlobalLoad per capture (loads).")
        return global_batch_balance_loss(kind, stacks, captures, masks, scoring, loads)
    if granularity != "micro_batch":
        raise ValueError(
            f"granularity must be one of 'micro_batch', 'sequence', 'global_batch'; got {granularity!r}."
        )
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
    values = []
    for members in _layer_groups(stacks, captures):
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

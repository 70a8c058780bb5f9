"""One routing report: from router captures to per-layer metric values, computed one way everywhere.

The Trainer's logged metrics, ``hf-moe-routers inspect``, the model card's table and the experiments'
``routing_quality`` all come through here, under the names and in the order of the canonical list
(:mod:`hf_moe_routers.metrics.catalog`). The pieces, from captures to values:

- :class:`RoutingWindow` takes the captures of one micro-batch after another (:meth:`~RoutingWindow.add`):
  per layer it sums the ``batch`` metrics (:func:`batch_metrics`) and the expert counts (an
  :class:`~hf_moe_routers.metrics.ExpertLoadAccumulator`), and keeps the last capture;
- :meth:`RoutingWindow.pack` lays those sums out as one flat tensor, so that one collective sums a
  window over processes; :meth:`WindowTotals.unpack` reads it back;
- :meth:`WindowTotals.per_layer` turns sums into values: ``batch`` metrics are means over the
  micro-batches, ``load`` metrics are statistics of the summed counts;
- :func:`router_metrics` measures the ``router`` metrics from the routers' parameters and a sample
  of the last micro-batch's router inputs;
- :func:`report_captures` does all of it for one set of captures (``inspect``, the experiments);
- the ``specialisation`` metrics need token-level inputs that captures do not carry (token ids,
  domains, a reference checkpoint's routing): :func:`specialisation_window` makes the
  :class:`~hf_moe_routers.metrics.SpecialisationAccumulator` of a model's routers,
  :func:`add_specialisation` feeds it one micro-batch of captures, and
  :func:`specialisation_report`, :func:`domain_report` and :func:`coactivation_pairs` read it.

The balance loss uses the family's own routing probabilities (:func:`balance_probs`): softmax for most
families, normalised sigmoid for DeepSeek-V3, top-k-then-softmax for gpt-oss.

Shape legend: T tokens, H router input size, E experts, K top-k, L routers (MoE layers),
M metrics of one group.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .. import metrics as M
from ..metrics.catalog import BATCH_METRICS, LOAD_METRICS, ROUTER_METRICS, SPECIALISATION_METRICS
from .collector import RouterCapture

__all__ = [
    "ReportedRouter",
    "RoutingWindow",
    "WindowTotals",
    "add_specialisation",
    "balance_probs",
    "batch_metrics",
    "coactivation_pairs",
    "domain_report",
    "mean_over_layers",
    "report_captures",
    "router_metrics",
    "specialisation_report",
    "specialisation_window",
]


class ReportedRouter(Protocol):
    """What a report needs of a router: ``RouterInfo`` has it; the experiments adapt their stages."""

    layer: str
    num_experts: int
    top_k: int

    def gate_matrix(self) -> torch.Tensor: ...  # the matrix reading the router input [N, H]
    def expert_rows(self) -> torch.Tensor: ...  # expert rows / anchors [E*M, D]
    def queries(self, x_TH: torch.Tensor) -> torch.Tensor: ...  # router queries [T, D]
    def route(self, x_TH: torch.Tensor) -> torch.Tensor: ...  # top-k expert indices [T, K]
    def lipschitz_bound(self) -> torch.Tensor: ...  # global bound of the logits (may be inf)
    def local_lipschitz_bound(self, x_TH: torch.Tensor) -> torch.Tensor: ...  # max per-token bound


# --------------------------------------------------------------------------------------------
# One micro-batch
# --------------------------------------------------------------------------------------------


def balance_probs(logits_TE: torch.Tensor, indices_TK: torch.Tensor, scoring: str) -> torch.Tensor | None:
    """The routing probabilities ``[T, E]`` the balance loss averages into ``P_e``, or None for softmax.

    None lets ``load_balance_loss`` take the softmax itself, on logits whose padding rows it has
    zeroed first; the other scorings (``routing_scoring``) need the selected experts ``indices_TK``.
    """
    if scoring == "softmax":
        return None
    return M.routing_probs(logits_TE, scoring, indices_TK)  # type: ignore[arg-type]


@torch.no_grad()
def batch_metrics(
    logits_TE: torch.Tensor,
    indices_TK: torch.Tensor,
    mask_T: torch.Tensor | None,
    *,
    top_k: int,
    scoring: str = "softmax",
) -> torch.Tensor:
    """The ``batch`` metrics of one layer on one micro-batch, ``[len(BATCH_METRICS)]`` in that order.

    Stays on the logits' device (no host sync beyond the metrics' own checks); float64, or float32
    on MPS, which has no float64.
    """
    logits = logits_TE.detach()
    computed = {
        "token_entropy": M.token_entropy(logits, mask_T),
        "top1_prob": M.top1_prob(logits, mask_T),
        "kth_margin": M.kth_margin(logits, top_k, mask_T),
        "aux_loss": M.load_balance_loss(
            logits, indices_TK, mask_T, probs=balance_probs(logits, indices_TK, scoring), validate=False
        ),
        "z_loss": M.z_loss(logits, mask_T, validate=False),
    }
    dtype = torch.float32 if logits.device.type == "mps" else torch.float64
    return torch.stack([computed[name].to(device=logits.device, dtype=dtype) for name in BATCH_METRICS])


# --------------------------------------------------------------------------------------------
# A window of micro-batches
# --------------------------------------------------------------------------------------------


class RoutingWindow:
    """Sums of the per-layer routing metrics over the micro-batches of one window (or evaluation)."""

    def __init__(self, routers: Sequence[ReportedRouter], scoring: str = "softmax"):
        self.routers = list(routers)
        self.scoring = scoring
        self.num_layers = len(self.routers)
        self.widths = [int(r.num_experts) for r in self.routers]
        # Sums stay on the device of the router outputs until the window is packed: reading them back
        # per micro-batch would add a host sync per metric and layer to every step.
        self.sums_ML: torch.Tensor | None = None
        self.batches_L = torch.zeros(self.num_layers, dtype=torch.float64)  # host-side: plain increments
        self.loads: M.ExpertLoadAccumulator | None = None  # made on the first capture's device
        self.reg_loss_sum: torch.Tensor | float = 0.0
        self.reg_count = 0
        self.last: list[RouterCapture | None] = [None] * self.num_layers
        self.last_masks: list[torch.Tensor | None] = [None] * self.num_layers

    def empty(self) -> bool:
        """Whether no layer has seen a micro-batch yet."""
        return bool(self.batches_L.sum() == 0)

    @torch.no_grad()
    def add(self, captures: Sequence[RouterCapture | None], masks: Sequence[torch.Tensor | None]) -> None:
        """Add one micro-batch: per router its capture (None = did not run) and ``[T]`` token mask."""
        for i, (capture, mask) in enumerate(zip(captures, masks)):
            if capture is None:
                continue
            self.add_layer(i, capture.logits_TE, capture.indices_TK, mask)
            self.last[i] = capture
            self.last_masks[i] = mask

    @torch.no_grad()
    def add_layer(
        self,
        layer: int,
        logits_TE: torch.Tensor,
        indices_TK: torch.Tensor,
        mask_T: torch.Tensor | None = None,
    ) -> None:
        """Add one micro-batch of router ``layer``: logits ``[T, E]``, selected experts ``[T, K]``."""
        values_M = batch_metrics(
            logits_TE, indices_TK, mask_T, top_k=self.routers[layer].top_k, scoring=self.scoring
        )
        if self.sums_ML is None:
            self.sums_ML = values_M.new_zeros(len(BATCH_METRICS), self.num_layers)
        self.sums_ML[:, layer] += values_M
        self.batches_L[layer] += 1
        if self.loads is None:
            self.loads = M.ExpertLoadAccumulator(self.widths, device=indices_TK.device)
        self.loads.update(indices_TK, mask_T, layer=layer)

    def add_penalty(self, penalty: torch.Tensor) -> None:
        """Add one training micro-batch's weighted router parameter penalty (a scalar)."""
        self.reg_loss_sum = self.reg_loss_sum + penalty.detach().double()
        self.reg_count += 1

    def pack(self) -> torch.Tensor:
        """The window as one flat float64 CPU tensor ``[M·L + L + ΣE + 2]``, to sum over processes.

        Layout: metric sums ``[M, L]``, micro-batches per layer ``[L]``, expert counts of each layer,
        then the penalty sum and count; :meth:`WindowTotals.unpack` reads it back.
        """
        if self.sums_ML is None:
            sums_ML = torch.zeros(len(BATCH_METRICS), self.num_layers, dtype=torch.float64)
        else:
            sums_ML = self.sums_ML.cpu().double()
        loads = [
            self.loads.layer_counts(i).cpu().double()
            if self.loads is not None
            else torch.zeros(width, dtype=torch.float64)
            for i, width in enumerate(self.widths)
        ]
        penalty = torch.tensor([float(self.reg_loss_sum), float(self.reg_count)], dtype=torch.float64)
        return torch.cat([sums_ML.reshape(-1), self.batches_L, torch.cat(loads), penalty])


@dataclasses.dataclass
class WindowTotals:
    """A window's sums, of one process or summed over all, read back from :meth:`RoutingWindow.pack`."""

    sums_ML: torch.Tensor  # [M, L] float64 sums of the batch metrics
    batches_L: torch.Tensor  # [L] float64 micro-batches seen per layer
    loads: list[torch.Tensor]  # per layer, [E] float64 expert counts
    reg_loss_sum: float
    reg_count: float

    @classmethod
    def unpack(cls, packed: torch.Tensor, widths: Sequence[int]) -> WindowTotals:
        """Read a packed window; ``widths`` are the routers' expert counts E, in layer order."""
        num_layers, num_metrics = len(widths), len(BATCH_METRICS)
        head = num_metrics * num_layers
        sums_ML = packed[:head].reshape(num_metrics, num_layers)
        batches_L = packed[head : head + num_layers]
        loads = list(torch.split(packed[head + num_layers : -2], list(widths)))
        return cls(sums_ML, batches_L, loads, float(packed[-2]), float(packed[-1]))

    def load_fractions(self) -> list[torch.Tensor]:
        """Per layer, the expert load shares ``[E]`` float64 (all zeros for a layer that saw nothing)."""
        return [load / load.sum() if load.sum() > 0 else load for load in self.loads]

    def per_layer(self) -> dict[str, list[float]]:
        """``{metric: [value per layer]}``: ``batch`` metrics (means over micro-batches), then ``load``.

        Raises:
            ValueError: a layer whose window counted no token (its load is undefined).
        """
        means_ML = self.sums_ML / self.batches_L.clamp_min(1)
        values = {name: means_ML[j].tolist() for j, name in enumerate(BATCH_METRICS)}
        stats = [M.load_statistics(fraction) for fraction in self.load_fractions()]
        values.update({name: [float(layer[name]) for layer in stats] for name in LOAD_METRICS})
        return values

    def reg_loss(self) -> float:
        """Mean weighted parameter penalty over the training micro-batches (0 when none had one)."""
        return self.reg_loss_sum / self.reg_count if self.reg_count > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Parameter and input-sample metrics
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def router_metrics(
    routers: Sequence[ReportedRouter],
    captures: Sequence[RouterCapture | None],
    masks: Sequence[torch.Tensor | None] | None = None,
    *,
    max_tokens: int | None = None,
    flip_epsilon: float = 0.05,
    seed: int = 0,
    drift_reference: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The ``router`` metrics ``[len(ROUTER_METRICS), L]`` float64, NaN where not measured.

    Parameter metrics come from what the scorer saw inside forward when the capture has it (PEFT
    deltas included), else from the router's current parameters. Input metrics (flip rate, query
    concentration, the per-token Lipschitz bound, drift) use the real tokens of each capture's
    router inputs, at most ``max_tokens`` of them (a seeded random subset); a router without a
    capture, or with fewer than 2 real tokens, gets NaN there and its global Lipschitz constant as
    ``lipschitz_bound``. Drift is measured only with a ``drift_reference``, which keeps each layer's
    first sampled inputs and their routing (filled in here on first use).
    """
    row = {name: j for j, name in enumerate(ROUTER_METRICS)}
    values = torch.full((len(ROUTER_METRICS), len(routers)), float("nan"), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    for i, info in enumerate(routers):
        capture = captures[i]
        mask_T = None if masks is None else masks[i]
        matrix = (
            capture.routing_matrix if capture is not None and capture.routing_matrix is not None else None
        )
        rows = capture.expert_rows if capture is not None and capture.expert_rows is not None else None
        matrix = info.gate_matrix() if matrix is None else matrix
        rows = info.expert_rows() if rows is None else rows
        values[row["spectral_norm"], i] = float(M.spectral_norm(matrix.float()))
        values[row["stable_rank"], i] = float(M.stable_rank(matrix.float()))
        values[row["lipschitz_bound_global"], i] = float(info.lipschitz_bound())
        # Replaced by the bound on observed inputs when there are some.
        values[row["lipschitz_bound"], i] = values[row["lipschitz_bound_global"], i]
        values[row["expert_concentration"], i] = float(M.angular_concentration(rows.float()))
        if capture is None:
            continue
        x_TH = capture.inputs_TH
        if mask_T is not None:
            x_TH = x_TH[mask_T.to(x_TH.device)]
        if max_tokens is not None and x_TH.shape[0] > max_tokens:
            pick = torch.randperm(x_TH.shape[0], generator=generator)[:max_tokens]
            x_TH = x_TH[pick.to(x_TH.device)]
        if x_TH.shape[0] < 2:
            continue
        flips = M.flip_rate(info.route, x_TH, epsilon=flip_epsilon, seed=seed)
        values[row["flip_rate"], i] = float(flips.flip_rate)
        values[row["lipschitz_bound"], i] = float(info.local_lipschitz_bound(x_TH))
        values[row["query_concentration"], i] = float(M.angular_concentration(info.queries(x_TH)))
        if drift_reference is not None:
            if i not in drift_reference:
                drift_reference[i] = (x_TH.clone(), info.route(x_TH))
            ref_x_TH, ref_idx_TK = drift_reference[i]
            values[row["drift"], i] = float(M.topk_agreement(info.route(ref_x_TH), ref_idx_TK))
    return values


# --------------------------------------------------------------------------------------------
# Whole reports
# --------------------------------------------------------------------------------------------


def mean_over_layers(values: Sequence[float]) -> float:
    """Mean of the measured (non-NaN) per-layer values; NaN when none was measured. ``inf`` counts."""
    measured = [v for v in values if not math.isnan(v)]
    return sum(measured) / len(measured) if measured else float("nan")


@torch.no_grad()
def report_captures(
    routers: Sequence[ReportedRouter],
    captures: Sequence[RouterCapture],
    masks: Sequence[torch.Tensor | None] | None = None,
    *,
    scoring: str = "softmax",
    measure_inputs: bool = True,
    max_tokens: int | None = None,
    flip_epsilon: float = 0.05,
    seed: int = 0,
) -> tuple[dict[str, list[float]], list[list[float]]]:
    """Every metric of one capture per router, as one window of one micro-batch.

    Returns ``({metric: [value per layer]}, load shares [L][E])``. With ``measure_inputs=False``
    only parameters are measured besides the batch and load metrics (the ``needs_inputs`` metrics
    are NaN and ``lipschitz_bound`` is the global constant).
    """
    masks = [None] * len(routers) if masks is None else masks
    window = RoutingWindow(routers, scoring)
    window.add(captures, masks)
    totals = WindowTotals.unpack(window.pack(), window.widths)
    per_layer = totals.per_layer()
    measured = router_metrics(
        routers,
        captures if measure_inputs else [None] * len(routers),
        masks,
        max_tokens=max_tokens,
        flip_epsilon=flip_epsilon,
        seed=seed,
    )
    per_layer.update({name: measured[j].tolist() for j, name in enumerate(ROUTER_METRICS)})
    return per_layer, [fraction.tolist() for fraction in totals.load_fractions()]


# --------------------------------------------------------------------------------------------
# Specialisation (token-level counts)
# --------------------------------------------------------------------------------------------


def specialisation_window(
    routers: Sequence[ReportedRouter],
    *,
    num_domains: int = 0,
    vocab_top1: bool = False,
    device: torch.device | str | None = None,
) -> M.SpecialisationAccumulator:
    """An empty :class:`~hf_moe_routers.metrics.SpecialisationAccumulator` for these routers, in order."""
    return M.SpecialisationAccumulator(
        [int(r.num_experts) for r in routers], num_domains=num_domains, vocab_top1=vocab_top1, device=device
    )


def _per_router(value: torch.Tensor | Sequence[torch.Tensor | None] | None, count: int) -> list:
    if value is None or isinstance(value, torch.Tensor):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"expected one entry per router ({count}); got {len(values)}.")
    return values


@torch.no_grad()
def add_specialisation(
    window: M.SpecialisationAccumulator,
    captures: Sequence[RouterCapture | None],
    token_ids: torch.Tensor | Sequence[torch.Tensor | None] | None,
    masks: Sequence[torch.Tensor | None] | None = None,
    *,
    domain_ids: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    reference_indices: Sequence[torch.Tensor | None] | None = None,
) -> None:
    """Add one micro-batch: per router its capture (None = did not run).

    ``token_ids`` and ``domain_ids`` are ``[T]`` (or ``[B, S]``) tensors shared by every router, or
    one per router (an encoder-decoder's decoder routes other tokens); ``reference_indices`` holds
    per router a reference checkpoint's top-k ``[T, K]`` of the same tokens (router saturation).
    """
    count = len(captures)
    masks_L = _per_router(None, count) if masks is None else list(masks)
    ids_L = _per_router(token_ids, count)
    domains_L = _per_router(domain_ids, count)
    refs_L = _per_router(None, count) if reference_indices is None else list(reference_indices)
    for layer, capture in enumerate(captures):
        if capture is None:
            continue
        window.update(
            ids_L[layer],
            capture.indices_TK,
            masks_L[layer],
            layer=layer,
            domain_ids=domains_L[layer],
            reference_indices_TK=refs_L[layer],
        )


def specialisation_report(
    window: M.SpecialisationAccumulator,
    *,
    min_count: int = M.DEFAULT_MIN_COUNT,
    miller_madow: bool = True,
) -> dict[str, list[float]]:
    """``{metric: [value per layer]}`` of the ``specialisation`` metrics measured, in catalog order.

    A metric with no value in any layer (no reference, no token ids, no domains) is left out; a
    layer without one has NaN (vocabulary specialisation when no id occurs ``min_count`` times).
    """
    values = window.metrics(min_count=min_count, miller_madow=miller_madow)
    return {
        name: values[name].double().tolist()
        for name in SPECIALISATION_METRICS
        if not bool(torch.isnan(values[name]).all())
    }


def domain_report(window: M.SpecialisationAccumulator, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per domain name: ``{"tokens", "domain_tv", "domain_kl"}`` with one value per layer (NaN where
    the domain had no token), ``tokens`` the domain's real tokens in the first layer that saw one."""
    if len(names) != window.num_domains:
        raise ValueError(f"names lists {len(names)} domains; the window has {window.num_domains}.")
    layers = [
        window.domain_specialisation(layer) if int(window.domain_LDE[layer].sum()) > 0 else None
        for layer in range(window.num_layers)
    ]
    nan = float("nan")
    first = next((i for i, r in enumerate(layers) if r is not None), None)
    report: dict[str, dict[str, Any]] = {}
    for d, name in enumerate(names):
        slots = 0 if first is None else int(window.domain_LDE[first, d].sum())
        k = (window.top_k_L[first] or 1) if first is not None else 1
        report[name] = {
            "tokens": slots // k,
            "domain_tv": [nan if r is None else float(r.tv_D[d]) for r in layers],
            "domain_kl": [nan if r is None else float(r.kl_D[d]) for r in layers],
        }
    return report


def coactivation_pairs(window: M.SpecialisationAccumulator, top: int = 3) -> list[list[dict[str, Any]]]:
    """Per layer, the ``top`` expert pairs ``a ≠ b`` with the largest ``P(b | a)``, largest first:
    ``{"a", "b", "p"}`` (ties: lower a, then lower b)."""
    probs_LEE = window.coactivation().double()
    pairs = []
    for layer, width in enumerate(window.num_experts_L):
        probs = probs_LEE[layer, :width, :width].clone()
        probs.fill_diagonal_(float("nan"))
        flat = torch.nan_to_num(probs, nan=-1.0).reshape(-1)
        # Stable sort on -p keeps row-major order (lower a, then lower b) among equal values.
        order = torch.sort(-flat, stable=True).indices[:top]
        pairs.append(
            [
                {"a": int(i) // width, "b": int(i) % width, "p": float(flat[i])}
                for i in order
                if float(flat[i]) >= 0
            ]
        )
    return pairs

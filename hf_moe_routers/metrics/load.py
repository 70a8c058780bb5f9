"""Expert load: how the top-k slots of the real tokens spread over the experts.

``f_e`` is the share of top-k *slots* that go to expert ``e`` (so ``Σ_e f_e = 1``). The statistics of
a load vector are scale-invariant, so they accept fractions or raw counts alike:

- normalised load entropy ``H(f) / log E`` (1 = perfectly balanced, 0 = one expert takes everything);
- coefficient of variation ``std(f) / mean(f)`` with the population std (0 = balanced);
- max-load ratio ``E · max f`` = ``max f / mean f`` (1 = balanced, E = collapsed);
- dead experts: how many ``f_e == 0``. A single micro-batch is too small to call an expert dead, so
  :class:`ExpertLoadAccumulator` sums counts over a logging window (and across processes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._checks import check_index_range, check_num_experts, flat_indices, flat_mask

__all__ = [
    "ExpertLoadAccumulator",
    "dead_experts",
    "expert_counts",
    "load_cv",
    "load_entropy",
    "load_fractions",
    "load_statistics",
    "max_load_ratio",
]


def expert_counts(
    indices_TK: torch.Tensor,
    num_experts: int,
    mask: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    validate: bool = True,
) -> torch.Tensor:
    """Number of top-k slots each expert receives from the real tokens.

    Args:
        indices_TK: chosen experts ``[T, K]`` (or ``[B, S, K]``), integer.
        num_experts: E.
        mask: ``[T]`` bool or HF ``attention_mask [B, S]``; padding tokens are not counted.
        dtype: dtype of the result (int64 for exact counts over long windows).
        validate: check that every id lies in ``[0, E)`` (one device-to-host sync).

    Returns:
        ``counts_E`` of ``dtype``; sums to ``K ·`` (number of real tokens).
    """
    check_num_experts(num_experts)
    idx_TK = flat_indices(indices_TK, None)
    if validate:
        check_index_range(idx_TK, num_experts)
    mask_T = flat_mask(mask, idx_TK.shape[0], idx_TK.device)
    # scatter_add with a 0/1 weight per slot instead of boolean indexing: no data-dependent shape,
    # so no device-to-host sync when this runs inside a training step.
    if mask_T is None:
        weight_TK = torch.ones(idx_TK.shape, dtype=dtype, device=idx_TK.device)
    else:
        weight_TK = mask_T.to(dtype).unsqueeze(-1).expand(idx_TK.shape)
    counts_E = torch.zeros(num_experts, dtype=dtype, device=idx_TK.device)
    return counts_E.scatter_add_(0, idx_TK.reshape(-1), weight_TK.reshape(-1))


def load_fractions(
    indices_TK: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``f_E``: share of the real tokens' top-k slots that go to each expert (float32, sums to 1).

    Raises:
        ValueError: no real token (mask all padding or T = 0), or an id outside ``[0, E)``.
    """
    counts_E = expert_counts(indices_TK, num_experts, mask, dtype=torch.int64)
    if int(counts_E.sum()) == 0:
        raise ValueError("mask: no real tokens: every entry of mask is padding (or T = 0); f_e is undefined.")
    return _normalised(counts_E)


def _normalised(load_E: torch.Tensor, name: str = "load_E") -> torch.Tensor:
    """``[..., E]`` loads (fractions or counts) -> float32 fractions along the last dim."""
    if load_E.ndim < 1 or load_E.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., E] with E >= 1; got {tuple(load_E.shape)}.")
    # float64 on the CPU: integer counts up to 2^53 stay exact, and MPS has no float64. These are
    # [L, E]-sized tensors read at logging time, so the copy costs nothing that matters.
    load = load_E.detach().to("cpu", torch.float64)
    if bool((load < 0).any()) or bool(torch.isnan(load).any()):
        raise ValueError(f"{name} must be non-negative loads (fractions or counts); got negative or NaN.")
    total = load.sum(-1, keepdim=True)
    if bool((total == 0).any()):
        raise ValueError(f"{name} has a row that sums to 0 (no tokens counted); its load is undefined.")
    return (load / total).to(load_E.device, torch.float32)


def load_entropy(load_E: torch.Tensor) -> torch.Tensor:
    """Normalised load entropy ``H(f) / log E`` of loads ``[..., E]`` -> ``[...]``, in [0, 1].

    ``0 · log 0 = 0``, so a dead expert adds nothing. Needs E >= 2 (``log 1 = 0``).
    """
    f = _normalised(load_E)
    num_experts = f.shape[-1]
    if num_experts < 2:
        raise ValueError("load_E has E = 1 expert; the normalised entropy H(f)/log E needs E >= 2.")
    return -torch.special.xlogy(f, f).sum(-1) / math.log(num_experts)


def load_cv(load_E: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation ``std(f) / mean(f)`` (population std) of loads ``[..., E]`` -> ``[...]``."""
    f = _normalised(load_E)
    return f.std(dim=-1, correction=0) / f.mean(-1)


def max_load_ratio(load_E: torch.Tensor) -> torch.Tensor:
    """``E · max_e f_e`` (= max / mean) of loads ``[..., E]`` -> ``[...]``; 1 when balanced, E when collapsed."""
    f = _normalised(load_E)
    return f.amax(-1) * f.shape[-1]


def dead_experts(load_E: torch.Tensor) -> torch.Tensor:
    """Number of experts with zero load, ``[..., E]`` -> ``[...]`` float32 (a float so it averages/logs)."""
    if load_E.ndim < 1:
        raise ValueError(f"load_E must have shape [..., E]; got {tuple(load_E.shape)}.")
    return (load_E == 0).sum(-1).float()


def load_statistics(load_E: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four window statistics of loads ``[..., E]`` (counts or fractions) -> each ``[...]`` float32.

    ``{"load_entropy", "load_cv", "max_load_ratio", "dead_experts"}``, in the canonical order
    (``hf_moe_routers.metrics.catalog``). Pass counts summed over a window: a single micro-batch is
    too small to call an expert dead.

    Raises:
        ValueError: a row that sums to 0 (no token counted), or E < 2.
    """
    return {
        "load_entropy": load_entropy(load_E),
        "load_cv": load_cv(load_E),
        "max_load_ratio": max_load_ratio(load_E),
        "dead_experts": dead_experts(load_E),
    }


class ExpertLoadAccumulator:
    """Sums per-layer expert counts over a logging window of micro-batches (and processes).

    Dead experts and load balance are window statistics: an expert idle in one micro-batch of 4
    sequences is not dead. Call :meth:`update` once per micro-batch and layer, optionally
    :meth:`all_reduce` (or ``torch.distributed.all_reduce`` on :attr:`counts_LE` and
    :attr:`tokens_L` yourself), read :meth:`metrics`, then :meth:`reset` for the next window.

    Counts are int64: exact, and summed identically by gloo and NCCL.

    Attributes:
        counts_LE: ``[L, E]`` int64, top-k slots per layer and expert from real tokens.
        tokens_L: ``[L]`` int64, real tokens seen per layer.
    """

    def __init__(
        self,
        num_experts: int | Sequence[int],
        num_layers: int | None = None,
        device: torch.device | str | None = None,
    ):
        """``num_experts``: E shared by ``num_layers`` layers (default 1), or one E per layer (then
        ``num_layers`` may be left out). With different E per layer, ``counts_LE`` is as wide as
        the largest and each layer's row is zero past its own E."""
        if isinstance(num_experts, int):
            check_num_experts(num_experts, minimum=2)
            layers = 1 if num_layers is None else num_layers
            check_num_experts(layers, name="num_layers")
            widths = (num_experts,) * layers
        else:
            widths = tuple(num_experts)
            for width in widths:
                check_num_experts(width, minimum=2)
            check_num_experts(len(widths), name="num_layers")
            if num_layers is not None and num_layers != len(widths):
                raise ValueError(f"num_layers is {num_layers} but num_experts lists {len(widths)} layers.")
        self.num_experts_L = widths
        self.num_experts = max(widths)
        self.num_layers = len(widths)
        self.counts_LE = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64, device=device)
        self.tokens_L = torch.zeros(self.num_layers, dtype=torch.int64, device=device)

    def update(
        self,
        indices_TK: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        layer: int = 0,
        validate: bool = True,
    ) -> None:
        """Add one micro-batch's top-k choices ``[T, K]`` of MoE layer ``layer`` (padding skipped).

        ``validate`` checks the expert ids (one device-to-host sync, see :func:`expert_counts`).
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}); got {layer}.")
        idx_TK = indices_TK.to(self.counts_LE.device)
        width = self.num_experts_L[layer]
        counts_E = expert_counts(idx_TK, width, mask, dtype=torch.int64, validate=validate)
        self.counts_LE[layer, :width] += counts_E
        # Every real token fills exactly K slots, so the token count follows from the slot count.
        self.tokens_L[layer] += counts_E.sum() // idx_TK.shape[-1]

    def layer_counts(self, layer: int) -> torch.Tensor:
        """``counts_E`` of one layer, ``[E_layer]`` int64 (a view of ``counts_LE``)."""
        return self.counts_LE[layer, : self.num_experts_L[layer]]

    def all_reduce(self, group: object | None = None) -> None:
        """Sum the window's counts over all processes (no-op when torch.distributed is not initialised)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        # One collective for both tensors: fewer round trips at every logging step.
        flat = torch.cat([self.counts_LE.reshape(-1), self.tokens_L])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        self.counts_LE.copy_(flat[: self.counts_LE.numel()].view_as(self.counts_LE))
        self.tokens_L.copy_(flat[self.counts_LE.numel() :])

    def reset(self) -> None:
        """Zero the counts (start a new logging window)."""
        self.counts_LE.zero_()
        self.tokens_L.zero_()

    def load_fractions(self) -> torch.Tensor:
        """``[L, E]`` float32 slot shares of the window; raises if a layer saw no real token."""
        self._check_not_empty()
        return _normalised(self.counts_LE)

    def metrics(self) -> dict[str, torch.Tensor]:
        """Per-layer window statistics, each ``[L]`` float32: load_entropy, load_cv, max_load_ratio,
        dead_experts (see :func:`load_statistics`)."""
        self._check_not_empty()
        if len(set(self.num_experts_L)) == 1:
            return load_statistics(self.counts_LE)
        # Different E per layer: each row on its own width (padding columns are not experts).
        rows = [load_statistics(self.layer_counts(i)) for i in range(self.num_layers)]
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}

    def _check_not_empty(self) -> None:
        empty = (self.counts_LE.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"ExpertLoadAccumulator: layer(s) {empty} received no real tokens in this window."
            )

"""Pure-torch references for every dispatch op: the correctness oracle on any device.

Each function here is written for clarity, not speed, and does its arithmetic in float32. The Triton
kernels in ``triton_ops.py`` and the fast torch path in ``dispatch.py`` are tested against them.

Shape legend (used in names as suffixes):
    T tokens, H hidden size, I expert intermediate size, E experts, K top-k,
    N = T * K (token, slot) pairs, E1 = E + 1.

A *pair* ``p = t * K + s`` is slot ``s`` of token ``t``. Expert ids outside ``[0, E)`` are
expert-parallel sentinels (transformers marks experts owned by another rank with ids ``>= E``):
they are sorted after every real pair, counted nowhere, and contribute nothing to any output.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RoutingMetadata(NamedTuple):
    """Expert-grouped layout of the (token, slot) pairs, produced by ``routing_metadata``.

    Attributes:
        offsets_E1: int32 ``[E + 1]``, exclusive prefix sum of the per-expert pair counts (``counts_E``,
            sentinels excluded); expert ``e`` owns rows
            ``offsets_E1[e]:offsets_E1[e + 1]`` of the expert-ordered buffer and ``offsets_E1[E]`` is the
            number of non-sentinel pairs. Rows from there to ``N`` hold the sentinel pairs.
        sorted_pair_N: int32 ``[N]``, the pair id at each expert-ordered row (stable: pairs of one
            expert keep their token order, which makes weight-gradient sums reproducible).
        pos_of_pair_N: int32 ``[N]``, the inverse permutation: the expert-ordered row of each pair.
        top_k: K, so that ``pair // top_k`` is the pair's token.
    """

    offsets_E1: torch.Tensor
    sorted_pair_N: torch.Tensor
    pos_of_pair_N: torch.Tensor
    top_k: int

    @property
    def num_experts(self) -> int:
        return self.offsets_E1.shape[0] - 1

    @property
    def counts_E(self) -> torch.Tensor:
        """int32 ``[E]``: pairs routed to each expert, the load metric (derived on access: the
        dispatch itself needs only the offsets)."""
        return self.offsets_E1.diff()


def reference_topk_softmax(
    logits_TE: torch.Tensor, top_k: int, renormalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, then top-k (the Mixtral / Qwen-MoE / OLMoE family), in float32.

    ``renormalize=True`` divides the k kept probabilities by their sum (Mixtral always, Qwen / OLMoE
    when ``norm_topk_prob``). That equals a softmax over the k selected logits in exact arithmetic,
    not bit for bit, so gpt-oss's top-k-then-softmax router does not use it.

    This is the op's torch path and what the routed softmax routers compute on CPU: written as the
    host routers write it, so the results are bit-identical to theirs. The remote code binds
    ``topk_softmax`` to the same formula (``modeling/remote_code.py``); keep the two equal.

    Args:
        logits_TE: ``[T, E]`` router logits, any float dtype.
        top_k: K, ``1 <= K <= E``.
        renormalize: whether the K weights of a token sum to one.

    Returns:
        ``(weights_TK float32 (float64 for float64 logits), index_TK int64)``, by decreasing weight.
    """
    probs_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32)).softmax(dim=-1)
    weights_TK, index_TK = torch.topk(probs_TE, top_k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, index_TK


def reference_routing_metadata(index_TK: torch.Tensor, num_experts: int) -> RoutingMetadata:
    """Counts, offsets and the stable expert-grouped permutation of the (token, slot) pairs.

    Uses a stable sort, which is the simplest correct statement of the counting sort that the
    Triton kernels implement (histogram, prefix sum, ranked scatter).

    Args:
        index_TK: ``[T, K]`` integer expert ids; ids outside ``[0, E)`` are sentinels.
        num_experts: E.

    Returns:
        RoutingMetadata (see its docstring), int32 tensors on ``index_TK``'s device.
    """
    top_k = index_TK.shape[-1]
    ids_N = index_TK.reshape(-1).long()
    is_real_N = (ids_N >= 0) & (ids_N < num_experts)
    # Bucket E collects every sentinel so that they sort after all real pairs.
    bucket_N = torch.where(is_real_N, ids_N, num_experts)
    sorted_pair_N = torch.sort(bucket_N, stable=True).indices
    num_pairs = ids_N.shape[0]
    pos_of_pair_N = torch.empty_like(sorted_pair_N)
    pos_of_pair_N[sorted_pair_N] = torch.arange(num_pairs, device=ids_N.device)
    # scatter_add_ into a fixed-size buffer, not bincount: its output size is static (no host sync
    # on CUDA, no dynamic shape under torch.compile) and integer adds are order-independent.
    counts_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids_N.device)
    counts_E1.scatter_add_(0, bucket_N, torch.ones_like(bucket_N))
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids_N.device)
    offsets_E1[1:] = torch.cumsum(counts_E1[:num_experts], dim=0)
    return RoutingMetadata(
        offsets_E1=offsets_E1,
        sorted_pair_N=sorted_pair_N.to(torch.int32),
        pos_of_pair_N=pos_of_pair_N.to(torch.int32),
        top_k=top_k,
    )


def _real_rows_N(metadata: RoutingMetadata) -> torch.Tensor:
    """Bool ``[N]``: expert-ordered rows that hold a real (non-sentinel) pair."""
    num_pairs = metadata.sorted_pair_N.shape[0]
    rows_N = torch.arange(num_pairs, device=metadata.offsets_E1.device)
    return rows_N < metadata.offsets_E1[-1]


def reference_permute(x_TH: torch.Tensor, metadata: RoutingMetadata) -> torch.Tensor:
    """Gather token rows into expert-contiguous order: row ``j`` is ``x[sorted_pair[j] // K]``.

    Args:
        x_TH: ``[T, H]`` hidden states.
        metadata: from ``reference_routing_metadata``.

    Returns:
        ``[N, H]`` in ``x_TH``'s dtype; rows of sentinel pairs are zero.
    """
    token_of_row_N = metadata.sorted_pair_N.long() // metadata.top_k
    x_NH = x_TH[token_of_row_N]
    return torch.where(_real_rows_N(metadata)[:, None], x_NH, torch.zeros_like(x_NH))


def reference_combine(
    y_NH: torch.Tensor, weights_TK: torch.Tensor, metadata: RoutingMetadata
) -> torch.Tensor:
    """Weighted gather-sum back to token order: ``out[t] = sum_s w[t, s] * y[pos_of_pair[t * K + s]]``.

    Sentinel pairs contribute nothing, whatever their rows of ``y_NH`` hold (they may be
    uninitialised memory left by a grouped GEMM). The sum is done in float32 (float64 if an input is).

    Args:
        y_NH: ``[N, H]`` expert outputs in expert order.
        weights_TK: ``[T, K]`` routing weights.
        metadata: from ``reference_routing_metadata``.

    Returns:
        ``[T, H]`` in ``y_NH``'s dtype.
    """
    num_tokens, top_k = weights_TK.shape
    pos_TK = metadata.pos_of_pair_N.long().view(num_tokens, top_k)
    is_real_TK = pos_TK < metadata.offsets_E1[-1]
    acc_dtype = torch.promote_types(torch.promote_types(y_NH.dtype, weights_TK.dtype), torch.float32)
    y_TKH = y_NH.to(acc_dtype)[pos_TK]
    y_TKH = torch.where(is_real_TK[..., None], y_TKH, torch.zeros_like(y_TKH))
    out_TH = (y_TKH * weights_TK.to(acc_dtype)[..., None]).sum(dim=1)
    return out_TH.to(y_NH.dtype)


def reference_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """A transformers experts forward written as a plain loop over experts, in float32.

    ``self`` is a transformers experts module decorated with ``@use_experts_implementation``; its
    layout flags (``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``) and its
    ``_apply_gate`` / ``act_fn`` are honoured. Ids ``>= num_experts`` are skipped.

    Args:
        hidden_states: ``[T, H]``.
        top_k_index: ``[T, K]`` expert ids.
        top_k_weights: ``[T, K]`` routing weights.

    Returns:
        ``[T, H]`` in ``hidden_states``' dtype.
    """
    out_TH = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)
    is_transposed = getattr(self, "is_transposed", False)
    first_weight = self.gate_up_proj if has_gate else self.up_proj
    first_bias = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    for expert in range(self.num_experts):
        token_M, slot_M = torch.where(top_k_index == expert)
        if token_M.numel() == 0:
            continue
        x_MH = hidden_states[token_M].float()
        w1 = first_weight[expert].float()
        h_M = x_MH @ w1 if is_transposed else x_MH @ w1.T
        if first_bias is not None:
            h_M = h_M + first_bias[expert].float()
        h_M = self._apply_gate(h_M) if has_gate else self.act_fn(h_M)
        w2 = self.down_proj[expert].float()
        y_MH = h_M @ w2 if is_transposed else h_M @ w2.T
        if has_bias:
            y_MH = y_MH + self.down_proj_bias[expert].float()
        if getattr(self, "has_post_expert_norm", False):
            y_MH = self.post_expert_norm(y_MH)
        out_TH = out_TH.index_add(0, token_M, y_MH * top_k_weights[token_M, slot_M, None].float())
    return out_TH.to(hidden_states.dtype)

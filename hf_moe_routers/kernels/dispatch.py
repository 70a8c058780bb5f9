"""The dispatch ops: top-k routing, routing metadata, permute and combine, with autograd.

``topk_softmax`` is the routing step of the softmax-top-k routers (``SoftmaxTopKRoutedRouter`` in
``modeling/base.py``: Mixtral, Qwen2/3-MoE, OLMoE); the other three are the dispatch of the
``"hf_moe_routers"`` experts implementation (``experts.py``).

Every op takes ``backend=None`` (process default, see ``_backend.set_kernel_backend``), ``"auto"``,
``"triton"`` or ``"torch"``. ``auto`` runs the Triton kernels on CUDA tensors when Triton is
installed and the torch path otherwise (that fallback is logged once). Both paths compute the same
thing as ``reference.py`` and are differentiable.

Shape legend: T tokens, H hidden, E experts, K top-k, N = T * K (token, slot) pairs, E1 = E + 1.
"""

from __future__ import annotations

import torch

from hf_moe_routers.kernels._backend import Backend, load_triton_ops, resolve_backend
from hf_moe_routers.kernels.reference import RoutingMetadata, reference_topk_softmax


def topk_softmax(
    logits_TE: torch.Tensor, top_k: int, *, renormalize: bool = False, backend: Backend | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts then top-k, in float32 (float64 for float64 logits); differentiable.

    Args:
        logits_TE: ``[T, E]`` router logits (any float dtype, any strides).
        top_k: K, ``1 <= K <= E``.
        renormalize: divide the K weights by their sum (Mixtral; Qwen / OLMoE ``norm_topk_prob``).
            Mathematically, not bitwise, gpt-oss's softmax over the top-k logits, which is why
            gpt-oss's router keeps its own formula.
        backend: see the module docstring.

    Returns:
        ``(weights_TK, index_TK int64)``, by decreasing weight; ties pick the lower expert id
        on the Triton path. The torch path is ``reference_topk_softmax`` itself, so on CPU it is
        bit-identical to ``softmax(logits, dtype=float32)`` -> ``topk`` -> divide.
    """
    if logits_TE.dim() != 2:
        raise ValueError(f"logits_TE must be [T, E], got shape {tuple(logits_TE.shape)}")
    num_experts = logits_TE.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if resolve_backend(logits_TE.device, backend) == "triton":
        return load_triton_ops().topk_softmax_op(logits_TE, top_k, renormalize)
    return reference_topk_softmax(logits_TE, top_k, renormalize)


def routing_metadata(
    index_TK: torch.Tensor, num_experts: int, *, backend: Backend | None = None
) -> RoutingMetadata:
    """Per-expert counts, offsets and the stable expert-grouped permutation of the pairs.

    The Triton path is a counting sort (chunk histograms, in-order scans, ranked scatter) with no
    host sync and no global sort; the torch path is a stable sort. Both equal the reference.

    Args:
        index_TK: ``[T, K]`` integer expert ids; ids outside ``[0, E)`` are sentinels (expert
            parallelism) and are placed after every real pair.
        num_experts: E.

    Returns:
        ``RoutingMetadata`` with int32 tensors (see ``reference.RoutingMetadata``).
    """
    if index_TK.dim() != 2:
        raise ValueError(f"index_TK must be [T, K], got shape {tuple(index_TK.shape)}")
    if resolve_backend(index_TK.device, backend) == "triton":
        offsets, sorted_pair, pos_of_pair = load_triton_ops().routing_metadata_op(index_TK, num_experts)
        return RoutingMetadata(offsets, sorted_pair, pos_of_pair, index_TK.shape[1])
    return _torch_routing_metadata(index_TK, num_experts)


def _torch_routing_metadata(index_TK: torch.Tensor, num_experts: int) -> RoutingMetadata:
    """The torch path: one stable sort, offsets by binary search, no histogram pass.

    Fewer, cheaper ops than the reference (it matters at small T, where op overhead dominates),
    identical results; sync-free on CUDA.
    """
    ids_N = index_TK.reshape(-1)
    bucket_N = ids_N.clamp(max=num_experts)  # sentinels (ids >= E) share bucket E, after every expert
    bucket_N = bucket_N.masked_fill(bucket_N < 0, num_experts)
    sorted_bucket_N, sorted_pair_N = torch.sort(bucket_N, stable=True)
    bucket_ids_E1 = torch.arange(num_experts + 1, device=ids_N.device, dtype=sorted_bucket_N.dtype)
    # The first sorted position of bucket e is the number of pairs in buckets < e: the offsets.
    offsets_E1 = torch.searchsorted(sorted_bucket_N, bucket_ids_E1, out_int32=True)
    num_pairs = ids_N.shape[0]
    rows_N = torch.arange(num_pairs, dtype=torch.int32, device=ids_N.device)
    pos_of_pair_N = torch.empty_like(rows_N).scatter_(0, sorted_pair_N, rows_N)
    return RoutingMetadata(offsets_E1, sorted_pair_N.to(torch.int32), pos_of_pair_N, index_TK.shape[1])


def _may_hold_sentinels(metadata: RoutingMetadata) -> bool:
    """Whether some pair is a sentinel. Free to check on CPU; elsewhere (or when tracing) it
    would cost a host sync, so answer yes and pay for the masking instead."""
    if torch.compiler.is_compiling() or metadata.offsets_E1.device.type != "cpu":
        return True
    return int(metadata.offsets_E1[-1]) < metadata.sorted_pair_N.shape[0]


def _torch_permute(x_TH: torch.Tensor, metadata: RoutingMetadata) -> torch.Tensor:
    # index_select takes the int32 indices as they are: no int64 copy.
    token_of_row_N = torch.div(metadata.sorted_pair_N, metadata.top_k, rounding_mode="floor")
    x_NH = x_TH.index_select(0, token_of_row_N)
    if _may_hold_sentinels(metadata):
        # torch.where also zeroes the gradient of sentinel rows, which a grouped GEMM backward
        # leaves uninitialised, before index_select's backward sums them into dx.
        rows_N = torch.arange(x_NH.shape[0], device=x_NH.device)
        x_NH = torch.where((rows_N < metadata.offsets_E1[-1])[:, None], x_NH, torch.zeros_like(x_NH))
    return x_NH


def _torch_combine(y_NH: torch.Tensor, weights_TK: torch.Tensor, metadata: RoutingMetadata) -> torch.Tensor:
    num_tokens, top_k = weights_TK.shape
    y_TKH = y_NH.index_select(0, metadata.pos_of_pair_N).view(num_tokens, top_k, y_NH.shape[1])
    if _may_hold_sentinels(metadata):
        is_real_TK = (metadata.pos_of_pair_N < metadata.offsets_E1[-1]).view(num_tokens, top_k)
        y_TKH = torch.where(is_real_TK[..., None], y_TKH, torch.zeros_like(y_TKH))
        weights_TK = torch.where(is_real_TK, weights_TK, torch.zeros_like(weights_TK))
    # One batched [1, K] @ [K, H] product per token: the weighting and the K-way sum in a single
    # pass, accumulated in float32 (as transformers' reshape-sum does).
    acc_dtype = torch.promote_types(torch.promote_types(y_NH.dtype, weights_TK.dtype), torch.float32)
    out_T1H = torch.bmm(weights_TK.to(acc_dtype).unsqueeze(1), y_TKH.to(acc_dtype))
    return out_T1H.squeeze(1).to(y_NH.dtype)


def permute(x_TH: torch.Tensor, metadata: RoutingMetadata, *, backend: Backend | None = None) -> torch.Tensor:
    """Gather token rows into expert-contiguous order (differentiable w.r.t. ``x_TH``).

    Args:
        x_TH: ``[T, H]`` hidden states (any strides).
        metadata: from ``routing_metadata`` for this routing.

    Returns:
        ``[N, H]``: row ``j`` is ``x_TH[sorted_pair_N[j] // K]``; sentinel rows are zero. The backward
        is a deterministic gather-sum over each token's K rows (sentinel rows ignored).
    """
    num_tokens = x_TH.shape[0]
    if metadata.pos_of_pair_N.shape[0] != num_tokens * metadata.top_k:
        raise ValueError("metadata was built for a different number of tokens")
    if resolve_backend(x_TH.device, backend) == "triton":
        return load_triton_ops().permute_op(x_TH, metadata.pos_of_pair_N, metadata.offsets_E1, metadata.top_k)
    return _torch_permute(x_TH, metadata)


def combine(
    y_NH: torch.Tensor, weights_TK: torch.Tensor, metadata: RoutingMetadata, *, backend: Backend | None = None
) -> torch.Tensor:
    """Weighted gather-sum back to token order, deterministic and atomic-free.

    ``out[t] = sum_s weights_TK[t, s] * y_NH[pos_of_pair_N[t * K + s]]`` accumulated in float32,
    skipping sentinel pairs whatever their rows hold. Differentiable w.r.t. ``y_NH`` and
    ``weights_TK`` (the routing weights' gradient is ``<grad_out[t], y[pos]>``).

    Args:
        y_NH: ``[N, H]`` expert outputs in expert order (any strides).
        weights_TK: ``[T, K]`` routing weights (any float dtype).
        metadata: from ``routing_metadata`` for this routing.

    Returns:
        ``[T, H]`` in ``y_NH``'s dtype.
    """
    if y_NH.shape[0] != weights_TK.numel() or weights_TK.shape[1] != metadata.top_k:
        raise ValueError(
            f"shape mismatch: y_NH {tuple(y_NH.shape)}, weights_TK {tuple(weights_TK.shape)}, top_k {metadata.top_k}"
        )
    if resolve_backend(y_NH.device, backend) == "triton":
        return load_triton_ops().combine_op(y_NH, weights_TK, metadata.pos_of_pair_N, metadata.offsets_E1)
    return _torch_combine(y_NH, weights_TK, metadata)

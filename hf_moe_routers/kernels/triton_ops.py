"""Triton dispatch ops as ``torch.library`` custom ops, with fake (meta) kernels and autograd.

Custom ops make the kernels opaque but traceable: ``torch.compile`` sees one node per op with a
known output shape (from the fake kernel) and no graph break, and autograd is registered on the op
so compiled and eager training take the same backward.

Imported lazily by ``_backend.load_triton_ops`` (never at package import).

Shape legend: T tokens, H hidden, E experts, K top-k, N = T * K pairs, E1 = E + 1.
"""

from typing import Any

import torch
import triton
import triton.language as tl

from hf_moe_routers.kernels import triton_kernels as kernels
from hf_moe_routers.kernels._backend import triton_interpreting

# Tile sizes. One fixed configuration (no autotune): the interpreter behaves differently under
# autotune, and these shapes are memory-bound copies where the row-tile width matters most.
_BLOCK_T_COPY = 16
_BLOCK_N_METADATA = 128
_BLOCK_C_SCAN = 64


def _block_h(hidden: int, itemsize: int = 2, row_bytes: int = 512) -> int:
    """Columns per program of the copy kernels: ``row_bytes`` of a row (512: 256 bf16, 128 fp32).

    The permute and combine loops are unrolled over K, so K row tiles are in flight at once; at
    K = 8 a 1 KiB fp32 row tile makes ptxas spill (``benchmarks/bench_kernel_resources.py``). The
    combine backward also holds grad_out and takes 256 bytes: 512 leave it at 255 registers.
    """
    # Under the interpreter every program costs milliseconds, so use one wide tile per row block.
    cap = 1024 if triton_interpreting() else row_bytes // itemsize
    return min(cap, triton.next_power_of_2(hidden))


def _block_t_token_owned(num_tokens: int) -> int:
    """Rows per program of the 1-D-grid combine backward: small T needs small tiles to fill the SMs."""
    if triton_interpreting() or num_tokens >= 8192:
        return _BLOCK_T_COPY
    return 4


def _block_t_topk(num_experts: int, *, backward: bool) -> int:
    """Rows per program of the top-k kernels, from the padded expert count.

    The backward keeps three [BLOCK_T, BLOCK_E] fp32 tiles live across K unrolled slots: at 16 rows
    and E = 128 ptxas needs 255 registers and spills to the stack (``benchmarks/bench_kernel_resources.py``),
    so it takes 512 / BLOCK_E rows; the forward fits 2048-element tiles without spilling.
    """
    block_e = triton.next_power_of_2(num_experts)
    return max(1, min(16, (512 if backward else 2048) // block_e))


def _acc(*tensors: torch.Tensor) -> tl.dtype:
    """Accumulate in float32, or float64 when an input is float64 (so gradcheck can run)."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _weights_dtype(logits_TE: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits_TE.dtype, torch.float32)


def _num_buckets(num_experts: int) -> int:
    """Experts, one sentinel bucket and one spare bucket for masked lanes, rounded up to a power of 2."""
    return triton.next_power_of_2(num_experts + 2)


# --------------------------------------------------------------------------------------------- top-k


@torch.library.custom_op("hf_moe_routers::topk_softmax", mutates_args=())
def topk_softmax_op(
    logits_TE: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K], index [T, K] int64): softmax over E then top-k, optionally renormalised."""
    num_tokens, num_experts = logits_TE.shape
    weights_TK = torch.empty(num_tokens, top_k, dtype=_weights_dtype(logits_TE), device=logits_TE.device)
    index_TK = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits_TE.device)
    if num_tokens == 0:
        return weights_TK, index_TK
    block_e = triton.next_power_of_2(num_experts)
    block_t = _block_t_topk(num_experts, backward=False)
    kernels.topk_softmax_fwd_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits_TE, weights_TK, index_TK, num_tokens, num_experts, logits_TE.stride(0), logits_TE.stride(1),
        K=top_k, RENORMALIZE=renormalize, ACC=_acc(logits_TE), BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
    )  # fmt: skip
    return weights_TK, index_TK


@topk_softmax_op.register_fake
def _(logits_TE: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (logits_TE.shape[0], top_k)
    return logits_TE.new_empty(shape, dtype=_weights_dtype(logits_TE)), logits_TE.new_empty(
        shape, dtype=torch.int64
    )


@torch.library.custom_op("hf_moe_routers::topk_softmax_backward", mutates_args=())
def topk_softmax_backward_op(
    logits_TE: torch.Tensor,
    weights_TK: torch.Tensor,
    index_TK: torch.Tensor,
    grad_weights_TK: torch.Tensor,
    renormalize: bool,
) -> torch.Tensor:
    """grad_logits [T, E] of ``topk_softmax_op`` given grad_weights [T, K]."""
    num_tokens, num_experts = logits_TE.shape
    grad_logits_TE = torch.empty(num_tokens, num_experts, dtype=logits_TE.dtype, device=logits_TE.device)
    if num_tokens == 0:
        return grad_logits_TE
    block_e = triton.next_power_of_2(num_experts)
    block_t = _block_t_topk(num_experts, backward=True)
    kernels.topk_softmax_bwd_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits_TE, weights_TK.contiguous(), index_TK.contiguous(), grad_weights_TK.contiguous(), grad_logits_TE,
        num_tokens, num_experts, logits_TE.stride(0), logits_TE.stride(1),
        K=index_TK.shape[1], RENORMALIZE=renormalize, ACC=_acc(logits_TE, grad_weights_TK),
        BLOCK_T=block_t, BLOCK_E=block_e,
    )  # fmt: skip
    return grad_logits_TE


@topk_softmax_backward_op.register_fake
def _(logits_TE, weights_TK, index_TK, grad_weights_TK, renormalize):  # type: ignore[no-untyped-def]
    return torch.empty_like(logits_TE, memory_format=torch.contiguous_format)


def _topk_softmax_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits_TE, _top_k, renormalize = inputs
    ctx.renormalize = renormalize
    ctx.save_for_backward(logits_TE, *output)


def _topk_softmax_backward(ctx: Any, grad_weights_TK: torch.Tensor, _grad_index: Any) -> tuple[Any, ...]:
    logits_TE, weights_TK, index_TK = ctx.saved_tensors
    if grad_weights_TK is None:
        return None, None, None
    grad_logits = topk_softmax_backward_op(logits_TE, weights_TK, index_TK, grad_weights_TK, ctx.renormalize)
    return grad_logits, None, None


topk_softmax_op.register_autograd(_topk_softmax_backward, setup_context=_topk_softmax_setup)


# ------------------------------------------------------------------------------------------ metadata


@torch.library.custom_op("hf_moe_routers::routing_metadata", mutates_args=())
def routing_metadata_op(
    index_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offsets_E1, sorted_pair_N, pos_of_pair_N), all int32; see reference.RoutingMetadata.

    Four launches, no host sync: chunk histograms, an in-order scan of each bucket over the chunks,
    the prefix over buckets, and a ranked scatter. All buffers are sized from shapes alone.
    """
    device = index_TK.device
    ids_N = index_TK.reshape(-1).contiguous()
    num_pairs = ids_N.shape[0]
    buckets = _num_buckets(num_experts)
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    sorted_pair_N = torch.empty(num_pairs, dtype=torch.int32, device=device)
    pos_of_pair_N = torch.empty(num_pairs, dtype=torch.int32, device=device)
    if num_pairs == 0:
        return offsets_E1, sorted_pair_N, pos_of_pair_N
    num_chunks = triton.cdiv(num_pairs, _BLOCK_N_METADATA)
    partial_CB = torch.empty(num_chunks, buckets, dtype=torch.int32, device=device)
    chunk_base_CB = torch.empty_like(partial_CB)
    bucket_count_B = torch.empty(buckets, dtype=torch.int32, device=device)
    kernels.chunk_histogram_kernel[(num_chunks,)](
        ids_N, partial_CB, num_pairs, num_experts, B=buckets, BLOCK_N=_BLOCK_N_METADATA
    )
    block_b = min(buckets, 32)
    kernels.chunk_scan_kernel[(buckets // block_b,)](
        partial_CB,
        chunk_base_CB,
        bucket_count_B,
        num_chunks,
        B=buckets,
        BLOCK_C=_BLOCK_C_SCAN,
        BLOCK_B=block_b,
    )
    kernels.expert_offsets_kernel[(1,)](bucket_count_B, offsets_E1, num_experts, B=buckets)
    kernels.rank_scatter_kernel[(num_chunks,)](
        ids_N, chunk_base_CB, offsets_E1, sorted_pair_N, pos_of_pair_N, num_pairs, num_experts,
        B=buckets, BLOCK_N=_BLOCK_N_METADATA, num_warps=8,  # the rank tile is BLOCK_N x BLOCK_N
    )  # fmt: skip
    return offsets_E1, sorted_pair_N, pos_of_pair_N


@routing_metadata_op.register_fake
def _(index_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_pairs = index_TK.numel()
    new = index_TK.new_empty
    return (
        new(num_experts + 1, dtype=torch.int32),
        new(num_pairs, dtype=torch.int32),
        new(num_pairs, dtype=torch.int32),
    )


# --------------------------------------------------------------------------- permute / combine (fwd)


def _gather_sum(
    rows_NH: torch.Tensor,
    weights_TK: torch.Tensor | None,
    pos_of_pair_N: torch.Tensor,
    offsets_E1: torch.Tensor,
    num_tokens: int,
    top_k: int,
) -> torch.Tensor:
    """Shared launcher of the combine kernel (weighted) and of the permute backward (unweighted)."""
    hidden = rows_NH.shape[1]
    out_TH = torch.empty(num_tokens, hidden, dtype=rows_NH.dtype, device=rows_NH.device)
    if num_tokens == 0 or hidden == 0:
        return out_TH.zero_()
    block_h = _block_h(hidden, rows_NH.element_size())
    grid = (triton.cdiv(num_tokens, _BLOCK_T_COPY), triton.cdiv(hidden, block_h))
    operands = [rows_NH] if weights_TK is None else [rows_NH, weights_TK]
    kernels.combine_kernel[grid](
        rows_NH, weights_TK if weights_TK is not None else rows_NH, pos_of_pair_N, offsets_E1, out_TH,
        num_tokens, hidden, offsets_E1.shape[0] - 1, rows_NH.stride(0), rows_NH.stride(1),
        K=top_k, HAS_WEIGHTS=weights_TK is not None, ACC=_acc(*operands), BLOCK_T=_BLOCK_T_COPY, BLOCK_H=block_h,
    )  # fmt: skip
    return out_TH


@torch.library.custom_op("hf_moe_routers::permute", mutates_args=())
def permute_op(
    x_TH: torch.Tensor, pos_of_pair_N: torch.Tensor, offsets_E1: torch.Tensor, top_k: int
) -> torch.Tensor:
    """x [T, H] -> expert-ordered rows [N, H]; sentinel rows are zero."""
    num_tokens, hidden = x_TH.shape
    out_NH = torch.empty(num_tokens * top_k, hidden, dtype=x_TH.dtype, device=x_TH.device)
    if num_tokens == 0 or hidden == 0:
        return out_NH
    block_h = _block_h(hidden, x_TH.element_size())
    grid = (triton.cdiv(num_tokens, _BLOCK_T_COPY), triton.cdiv(hidden, block_h))
    kernels.permute_kernel[grid](
        x_TH, pos_of_pair_N, offsets_E1, out_NH, num_tokens, hidden, offsets_E1.shape[0] - 1,
        x_TH.stride(0), x_TH.stride(1), K=top_k, BLOCK_T=_BLOCK_T_COPY, BLOCK_H=block_h,
    )  # fmt: skip
    return out_NH


@permute_op.register_fake
def _(x_TH: torch.Tensor, pos_of_pair_N: torch.Tensor, offsets_E1: torch.Tensor, top_k: int) -> torch.Tensor:
    return x_TH.new_empty(x_TH.shape[0] * top_k, x_TH.shape[1])


@torch.library.custom_op("hf_moe_routers::permute_backward", mutates_args=())
def permute_backward_op(
    grad_NH: torch.Tensor, pos_of_pair_N: torch.Tensor, offsets_E1: torch.Tensor, top_k: int
) -> torch.Tensor:
    """dx [T, H] = sum over each token's real pairs of grad [N, H] rows (an unweighted combine)."""
    return _gather_sum(grad_NH, None, pos_of_pair_N, offsets_E1, grad_NH.shape[0] // top_k, top_k)


@permute_backward_op.register_fake
def _(
    grad_NH: torch.Tensor, pos_of_pair_N: torch.Tensor, offsets_E1: torch.Tensor, top_k: int
) -> torch.Tensor:
    return grad_NH.new_empty(grad_NH.shape[0] // top_k, grad_NH.shape[1])


def _permute_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _x, pos_of_pair_N, offsets_E1, top_k = inputs
    ctx.top_k = top_k
    ctx.save_for_backward(pos_of_pair_N, offsets_E1)


def _permute_backward(ctx: Any, grad_NH: torch.Tensor) -> tuple[Any, ...]:
    pos_of_pair_N, offsets_E1 = ctx.saved_tensors
    return permute_backward_op(grad_NH, pos_of_pair_N, offsets_E1, ctx.top_k), None, None, None


permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("hf_moe_routers::combine", mutates_args=())
def combine_op(
    y_NH: torch.Tensor, weights_TK: torch.Tensor, pos_of_pair_N: torch.Tensor, offsets_E1: torch.Tensor
) -> torch.Tensor:
    """out [T, H] = sum_s weights [T, K] * y [N, H] rows of the token's real pairs (fp32 accumulation)."""
    num_tokens, top_k = weights_TK.shape
    return _gather_sum(y_NH, weights_TK.contiguous(), pos_of_pair_N, offsets_E1, num_tokens, top_k)


@combine_op.register_fake
def _(
    y_NH: torch.Tensor, weights_TK: torch.Tensor, pos_of_pair_N: torch.Tensor, offsets_E1: torch.Tensor
) -> torch.Tensor:
    return y_NH.new_empty(weights_TK.shape[0], y_NH.shape[1])


@torch.library.custom_op("hf_moe_routers::combine_backward", mutates_args=())
def combine_backward_op(
    grad_out_TH: torch.Tensor,
    y_NH: torch.Tensor,
    weights_TK: torch.Tensor,
    pos_of_pair_N: torch.Tensor,
    offsets_E1: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y [N, H], grad_weights [T, K]) of ``combine_op``; one writer per element, no atomics."""
    num_tokens, top_k = weights_TK.shape
    hidden = y_NH.shape[1]
    grad_y_NH = torch.empty(y_NH.shape, dtype=y_NH.dtype, device=y_NH.device)
    grad_weights_TK = torch.empty(num_tokens, top_k, dtype=weights_TK.dtype, device=weights_TK.device)
    if num_tokens == 0:
        return grad_y_NH, grad_weights_TK
    if hidden == 0:
        return grad_y_NH, grad_weights_TK.zero_()
    block_t = _block_t_token_owned(num_tokens)
    kernels.combine_bwd_kernel[(triton.cdiv(num_tokens, block_t),)](
        grad_out_TH, y_NH, weights_TK.contiguous(), pos_of_pair_N, offsets_E1, grad_y_NH, grad_weights_TK,
        num_tokens, hidden, offsets_E1.shape[0] - 1, grad_out_TH.stride(0), grad_out_TH.stride(1),
        y_NH.stride(0), y_NH.stride(1), K=top_k, ACC=_acc(grad_out_TH, y_NH, weights_TK), BLOCK_T=block_t,
        BLOCK_H=_block_h(hidden, y_NH.element_size(), row_bytes=256),
        BLOCK_K=triton.next_power_of_2(top_k),
    )  # fmt: skip
    return grad_y_NH, grad_weights_TK


@combine_backward_op.register_fake
def _(grad_out_TH, y_NH, weights_TK, pos_of_pair_N, offsets_E1):  # type: ignore[no-untyped-def]
    return y_NH.new_empty(y_NH.shape), weights_TK.new_empty(weights_TK.shape)


def _combine_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _combine_backward(ctx: Any, grad_out_TH: torch.Tensor) -> tuple[Any, ...]:
    y_NH, weights_TK, pos_of_pair_N, offsets_E1 = ctx.saved_tensors
    grad_y_NH, grad_weights_TK = combine_backward_op(grad_out_TH, y_NH, weights_TK, pos_of_pair_N, offsets_E1)
    return grad_y_NH, grad_weights_TK, None, None


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)

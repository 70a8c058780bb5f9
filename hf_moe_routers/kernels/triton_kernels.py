"""Triton kernels of the MoE dispatch: top-k softmax, routing metadata, permute, combine, backward.

Only ``triton_ops.py`` imports this module (and only ``_backend.load_triton_ops`` imports that), so
Triton stays optional. Launch, shapes and autograd live in ``triton_ops.py``; this file is the
device code.

Shape legend: T tokens, H hidden, E experts, K top-k, N = T * K pairs, B buckets (a power of two
``>= E + 2``: buckets ``0..E-1`` are experts, ``E`` collects expert-parallel sentinels, the last one
absorbs masked-off lanes). ACC is the accumulation dtype: float32, or float64 for float64 inputs (so
that ``torch.autograd.gradcheck`` can check the kernels).

Reductions and scans call ``tl.reduce`` / ``tl.associative_scan`` directly instead of ``tl.sum`` /
``tl.max`` / ``tl.cumsum``, and ``tl.full`` instead of ``tl.zeros``. Those helpers are themselves
jitted when ``triton.language`` is imported, so if ``triton`` was imported (torch._dynamo does it)
before ``TRITON_INTERPRET=1`` was set, they cannot run in the interpreter; builtins can. The combine
functions are Triton's own when present, because the interpreter recognises them and reduces with
numpy; a combine function it does not know is applied element by element in Python, about a
thousand times slower.

No kernel uses atomics: every output element has exactly one writer, so results are bitwise
reproducible.
"""

import triton
import triton.language as tl


@triton.jit
def _add_fallback(a, b):
    return a + b


@triton.jit
def _maximum_fallback(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum_fallback(a, b):
    return tl.minimum(a, b)


_add = getattr(tl.standard, "_sum_combine", _add_fallback)
_maximum = getattr(tl.standard, "_elementwise_max", _maximum_fallback)
_minimum = getattr(tl.standard, "_elementwise_min", _minimum_fallback)


@triton.jit
def _row_softmax(logits_ptr, rows_T, cols_E, row_ok_T, tile_ok, stride_t, stride_e, ACC: tl.constexpr):
    """softmax over E of the [BLOCK_T, BLOCK_E] logits tile, in ACC; masked lanes get probability 0."""
    logits = tl.load(
        logits_ptr + rows_T[:, None].to(tl.int64) * stride_t + cols_E[None, :] * stride_e,
        mask=tile_ok,
        other=float("-inf"),
    ).to(ACC)
    # Rows past T are all -inf; give them a finite max and a unit sum so that no NaN is produced.
    row_max_T = tl.where(row_ok_T, tl.reduce(logits, 1, _maximum), 0.0)
    numer = tl.exp(logits - row_max_T[:, None])
    denom_T = tl.where(row_ok_T, tl.reduce(numer, 1, _add), 1.0)
    return numer / denom_T[:, None]


@triton.jit
def topk_softmax_fwd_kernel(
    logits_ptr,
    weights_ptr,
    index_ptr,
    T,
    E,
    stride_logits_t,
    stride_logits_e,
    K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """weights[T, K] (in ACC), index[T, K] (int64) = top-k of softmax(logits[T, E]) per row."""
    rows_T = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols_E = tl.arange(0, BLOCK_E)
    slots_K = tl.arange(0, BLOCK_K)
    row_ok_T = rows_T < T
    tile_ok = row_ok_T[:, None] & (cols_E[None, :] < E)
    probs = _row_softmax(logits_ptr, rows_T, cols_E, row_ok_T, tile_ok, stride_logits_t, stride_logits_e, ACC)
    # Probabilities are >= 0, so -1 marks padding and already-chosen experts.
    remaining = tl.where(tile_ok, probs, -1.0)
    chosen_w = tl.full((BLOCK_T, BLOCK_K), 0, ACC)
    chosen_i = tl.full((BLOCK_T, BLOCK_K), 0, tl.int32)
    for slot in tl.static_range(K):
        best_T = tl.reduce(remaining, 1, _maximum)
        # Ties go to the lowest expert id, so the choice is deterministic.
        best_i_T = tl.reduce(tl.where(remaining == best_T[:, None], cols_E[None, :], BLOCK_E), 1, _minimum)
        chosen_w = tl.where(slots_K[None, :] == slot, best_T[:, None], chosen_w)
        chosen_i = tl.where(slots_K[None, :] == slot, best_i_T[:, None], chosen_i)
        remaining = tl.where(cols_E[None, :] == best_i_T[:, None], -1.0, remaining)
    if RENORMALIZE:
        total_T = tl.reduce(tl.where(slots_K[None, :] < K, chosen_w, 0.0), 1, _add)
        chosen_w = chosen_w / tl.where(row_ok_T, total_T, 1.0)[:, None]
    out_offs = rows_T[:, None].to(tl.int64) * K + slots_K[None, :]
    out_ok = row_ok_T[:, None] & (slots_K[None, :] < K)
    tl.store(weights_ptr + out_offs, chosen_w, mask=out_ok)
    tl.store(index_ptr + out_offs, chosen_i.to(tl.int64), mask=out_ok)


@triton.jit
def topk_softmax_bwd_kernel(
    logits_ptr,
    weights_ptr,
    index_ptr,
    grad_weights_ptr,
    grad_logits_ptr,
    T,
    E,
    stride_logits_t,
    stride_logits_e,
    K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """grad_logits[T, E] from grad_weights[T, K].

    With g_e = grad of the slot that chose expert e (0 if none) and c = sum_s dw_s * w_s:
    no renormalisation (w_s = p_e):  dlogits = p * (g - c);
    renormalised (w = softmax over the K chosen logits): dlogits = q * (g - c), q_e = w of expert e.
    """
    rows_T = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols_E = tl.arange(0, BLOCK_E)
    row_ok_T = rows_T < T
    tile_ok = row_ok_T[:, None] & (cols_E[None, :] < E)
    grad_chosen = tl.full((BLOCK_T, BLOCK_E), 0, ACC)
    weight_chosen = tl.full((BLOCK_T, BLOCK_E), 0, ACC)
    dot_T = tl.full((BLOCK_T,), 0, ACC)
    for slot in tl.static_range(K):
        offs_T = rows_T.to(tl.int64) * K + slot
        expert_T = tl.load(index_ptr + offs_T, mask=row_ok_T, other=-1).to(tl.int32)
        w_T = tl.load(weights_ptr + offs_T, mask=row_ok_T, other=0.0).to(ACC)
        dw_T = tl.load(grad_weights_ptr + offs_T, mask=row_ok_T, other=0.0).to(ACC)
        hit = cols_E[None, :] == expert_T[:, None]
        grad_chosen = tl.where(hit, dw_T[:, None], grad_chosen)
        weight_chosen = tl.where(hit, w_T[:, None], weight_chosen)
        dot_T += dw_T * w_T
    if RENORMALIZE:
        scale = weight_chosen
    else:
        scale = _row_softmax(
            logits_ptr, rows_T, cols_E, row_ok_T, tile_ok, stride_logits_t, stride_logits_e, ACC
        )
    grad_logits = scale * (grad_chosen - dot_T[:, None])
    tl.store(
        grad_logits_ptr + rows_T[:, None].to(tl.int64) * E + cols_E[None, :],
        grad_logits.to(grad_logits_ptr.dtype.element_ty),
        mask=tile_ok,
    )


@triton.jit
def _bucket_of(ids, E):
    """Expert id -> bucket: real experts keep their id, sentinels (id < 0 or id >= E) go to E."""
    return tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)


@triton.jit
def chunk_histogram_kernel(index_ptr, partial_ptr, N, E, B: tl.constexpr, BLOCK_N: tl.constexpr):
    """partial[c, b] = number of pairs of chunk c (BLOCK_N pairs) in bucket b."""
    chunk = tl.program_id(0)
    pairs = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = pairs < N
    ids = tl.load(index_ptr + pairs, mask=ok, other=0)
    # Masked lanes go to the spare last bucket instead of using histogram's mask argument,
    # which older Triton releases lack.
    bucket = tl.where(ok, _bucket_of(ids, E), B - 1)
    tl.store(partial_ptr + chunk * B + tl.arange(0, B), tl.histogram(bucket, B))


@triton.jit
def chunk_scan_kernel(
    partial_ptr,
    chunk_base_ptr,
    bucket_count_ptr,
    num_chunks,
    B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Per bucket column: chunk_base[c, b] = sum_{c' < c} partial[c', b]; bucket_count[b] = total.

    One program owns BLOCK_B buckets and walks all chunks in order, so the scan is deterministic.
    """
    buckets = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    carry = tl.full((BLOCK_B,), 0, tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C)
        offs = chunks[:, None] * B + buckets[None, :]
        ok = chunks[:, None] < num_chunks
        tile = tl.load(partial_ptr + offs, mask=ok, other=0)
        inclusive = tl.associative_scan(tile, 0, _add)
        tl.store(chunk_base_ptr + offs, inclusive - tile + carry[None, :], mask=ok)
        carry += tl.reduce(tile, 0, _add)
    tl.store(bucket_count_ptr + buckets, carry)


@triton.jit
def expert_offsets_kernel(bucket_count_ptr, offsets_ptr, E, B: tl.constexpr):
    """offsets[b] = sum_{b' < b} bucket_count[b'] for b <= E (offsets[E] counts the real pairs)."""
    buckets = tl.arange(0, B)
    count = tl.load(bucket_count_ptr + buckets)
    exclusive = tl.associative_scan(count, 0, _add) - count
    tl.store(offsets_ptr + buckets, exclusive, mask=buckets <= E)


@triton.jit
def rank_scatter_kernel(
    index_ptr,
    chunk_base_ptr,
    offsets_ptr,
    sorted_pair_ptr,
    pos_of_pair_ptr,
    N,
    E,
    B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """pos = offsets[bucket] + chunk_base[chunk, bucket] + rank among earlier same-bucket lanes.

    The in-chunk rank counts earlier lanes, and chunks are scanned in order, so pairs of one expert
    keep their pair order: a stable counting sort with no global sort.
    """
    chunk = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_N)
    pairs = chunk * BLOCK_N + lanes
    ok = pairs < N
    bucket = _bucket_of(tl.load(index_ptr + pairs, mask=ok, other=0), E)
    earlier_same = (bucket[:, None] == bucket[None, :]) & (lanes[None, :] < lanes[:, None]) & ok[None, :]
    rank = tl.reduce(earlier_same.to(tl.int32), 1, _add)
    base = tl.load(offsets_ptr + bucket, mask=ok, other=0) + tl.load(
        chunk_base_ptr + chunk * B + bucket, mask=ok, other=0
    )
    pos = base + rank
    tl.store(pos_of_pair_ptr + pairs, pos, mask=ok)
    tl.store(sorted_pair_ptr + pos, pairs, mask=ok)


@triton.jit
def permute_kernel(
    x_ptr,
    pos_of_pair_ptr,
    offsets_ptr,
    out_ptr,
    T,
    H,
    E,
    stride_x_t,
    stride_x_h,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[pos_of_pair[t * K + s]] = x[t] for every slot s; rows of sentinel pairs get zeros.

    Token-owned: each x tile is read once and written K times; positions form a permutation, so
    every output row has exactly one writer.
    """
    rows_T = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols_H = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok_T = rows_T < T
    tile_ok = row_ok_T[:, None] & (cols_H[None, :] < H)
    x = tl.load(
        x_ptr + rows_T[:, None].to(tl.int64) * stride_x_t + cols_H[None, :] * stride_x_h,
        mask=tile_ok,
        other=0.0,
    )
    num_real = tl.load(offsets_ptr + E)
    for slot in tl.static_range(K):
        pos_T = tl.load(pos_of_pair_ptr + rows_T.to(tl.int64) * K + slot, mask=row_ok_T, other=0)
        value = tl.where((pos_T < num_real)[:, None], x, 0.0)
        tl.store(out_ptr + pos_T[:, None].to(tl.int64) * H + cols_H[None, :], value, mask=tile_ok)


@triton.jit
def combine_kernel(
    y_ptr,
    weights_ptr,
    pos_of_pair_ptr,
    offsets_ptr,
    out_ptr,
    T,
    H,
    E,
    stride_y_n,
    stride_y_h,
    K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t] = sum_s w[t, s] * y[pos_of_pair[t * K + s]] over real pairs, fp32, in slot order.

    With HAS_WEIGHTS=False it is the permute backward (dx[t] = sum_s dy_perm[pos]). Sentinel rows
    are never loaded, so garbage there (a grouped GEMM leaves those rows uninitialised) is harmless.
    """
    rows_T = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols_H = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok_T = rows_T < T
    col_ok_H = cols_H < H
    num_real = tl.load(offsets_ptr + E)
    acc = tl.full((BLOCK_T, BLOCK_H), 0, ACC)
    for slot in tl.static_range(K):
        offs_T = rows_T.to(tl.int64) * K + slot
        pos_T = tl.load(pos_of_pair_ptr + offs_T, mask=row_ok_T, other=0)
        real_T = row_ok_T & (pos_T < num_real)
        y = tl.load(
            y_ptr + pos_T[:, None].to(tl.int64) * stride_y_n + cols_H[None, :] * stride_y_h,
            mask=real_T[:, None] & col_ok_H[None, :],
            other=0.0,
        ).to(ACC)
        if HAS_WEIGHTS:
            w_T = tl.load(weights_ptr + offs_T, mask=real_T, other=0.0).to(ACC)
            acc += y * w_T[:, None]
        else:
            acc += y
    tl.store(
        out_ptr + rows_T[:, None].to(tl.int64) * H + cols_H[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok_T[:, None] & col_ok_H[None, :],
    )


@triton.jit
def combine_bwd_kernel(
    grad_out_ptr,
    y_ptr,
    weights_ptr,
    pos_of_pair_ptr,
    offsets_ptr,
    grad_y_ptr,
    grad_weights_ptr,
    T,
    H,
    E,
    stride_go_t,
    stride_go_h,
    stride_y_n,
    stride_y_h,
    K: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """grad_y[pos] = w[t, s] * grad_out[t] (zero for sentinels); grad_w[t, s] = <grad_out[t], y[pos]>.

    Token-owned: a program holds BLOCK_T tokens, walks H once and keeps the K dot products in fp32
    registers, so grad_out is read once and every grad_y row has exactly one writer.
    """
    rows_T = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots_K = tl.arange(0, BLOCK_K)
    row_ok_T = rows_T < T
    num_real = tl.load(offsets_ptr + E)
    dots = tl.full((BLOCK_T, BLOCK_K), 0, ACC)
    for h0 in range(0, H, BLOCK_H):
        cols_H = h0 + tl.arange(0, BLOCK_H)
        tile_ok = row_ok_T[:, None] & (cols_H[None, :] < H)
        grad_out = tl.load(
            grad_out_ptr + rows_T[:, None].to(tl.int64) * stride_go_t + cols_H[None, :] * stride_go_h,
            mask=tile_ok,
            other=0.0,
        ).to(ACC)
        for slot in tl.static_range(K):
            offs_T = rows_T.to(tl.int64) * K + slot
            pos_T = tl.load(pos_of_pair_ptr + offs_T, mask=row_ok_T, other=0)
            real_T = row_ok_T & (pos_T < num_real)
            w_T = tl.load(weights_ptr + offs_T, mask=real_T, other=0.0).to(ACC)
            y = tl.load(
                y_ptr + pos_T[:, None].to(tl.int64) * stride_y_n + cols_H[None, :] * stride_y_h,
                mask=real_T[:, None] & tile_ok,
                other=0.0,
            ).to(ACC)
            dot_T = tl.reduce(grad_out * y, 1, _add)
            dots = tl.where(slots_K[None, :] == slot, dots + dot_T[:, None], dots)
            grad_y = tl.where(real_T[:, None], grad_out * w_T[:, None], 0.0)
            tl.store(
                grad_y_ptr + pos_T[:, None].to(tl.int64) * H + cols_H[None, :],
                grad_y.to(grad_y_ptr.dtype.element_ty),
                mask=tile_ok,
            )
    tl.store(
        grad_weights_ptr + rows_T[:, None].to(tl.int64) * K + slots_K[None, :],
        dots.to(grad_weights_ptr.dtype.element_ty),
        mask=row_ok_T[:, None] & (slots_K[None, :] < K),
    )

"""Routing metrics and router losses against hand-computed values (hf_moe_routers.metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_moe_routers import metrics as M


def close(actual: torch.Tensor, expected: float, tol: float = 1e-6) -> None:
    assert actual.dtype == torch.float32, actual.dtype
    assert abs(float(actual.detach()) - expected) <= tol, (float(actual.detach()), expected)


# --------------------------------------------------------------------------------------------
# Load statistics
# --------------------------------------------------------------------------------------------


def test_load_statistics_four_tokens_three_experts() -> None:
    # Top-1 choices 0, 0, 0, 1 -> counts (3, 1, 0), f = (3/4, 1/4, 0).
    indices_TK = torch.tensor([[0], [0], [0], [1]])
    f_E = M.load_fractions(indices_TK, num_experts=3)
    assert torch.equal(f_E, torch.tensor([0.75, 0.25, 0.0]))
    close(M.load_entropy(f_E), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(3))
    # mean 1/3; deviations 5/12, -1/12, -4/12 -> population variance (25 + 1 + 16) / 144 / 3 = 7/72.
    close(M.load_cv(f_E), math.sqrt(7 / 72) * 3)
    close(M.max_load_ratio(f_E), 3 * 0.75)
    close(M.dead_experts(f_E), 1.0)


def test_load_fractions_count_top_k_slots() -> None:
    # K = 2: slots 0,1 | 0,2 | 0,1 -> counts (3, 2, 1) over 6 slots.
    f_E = M.load_fractions(torch.tensor([[0, 1], [0, 2], [0, 1]]), num_experts=3)
    torch.testing.assert_close(f_E, torch.tensor([1 / 2, 1 / 3, 1 / 6]))


def test_load_statistics_balanced_and_collapsed_extremes() -> None:
    balanced_E = torch.full((4,), 0.25)
    collapsed_E = torch.tensor([1.0, 0.0, 0.0, 0.0])
    close(M.load_entropy(balanced_E), 1.0)
    close(M.load_cv(balanced_E), 0.0)
    close(M.max_load_ratio(balanced_E), 1.0)
    close(M.load_entropy(collapsed_E), 0.0)
    close(M.max_load_ratio(collapsed_E), 4.0)
    close(M.dead_experts(collapsed_E), 3.0)
    # Raw counts give the same statistics as fractions (scale invariance), batched over rows.
    counts_LE = torch.tensor([[5, 5, 5, 5], [7, 0, 0, 0]])
    torch.testing.assert_close(M.load_entropy(counts_LE), torch.tensor([1.0, 0.0]))


def test_padding_tokens_are_not_counted() -> None:
    # Token 3 is padding; counted, it would revive expert 2 and change every statistic.
    indices_TK = torch.tensor([[0], [0], [1], [2]])
    token_mask_T = torch.tensor([True, True, True, False])
    attention_mask_BS = torch.tensor([[1, 1], [1, 0]])  # the same mask in HF layout
    for mask in (token_mask_T, attention_mask_BS):
        f_E = M.load_fractions(indices_TK, 3, mask)
        torch.testing.assert_close(f_E, torch.tensor([2 / 3, 1 / 3, 0.0]))
        close(M.dead_experts(f_E), 1.0)
    close(M.dead_experts(M.load_fractions(indices_TK, 3)), 0.0)


def test_expert_load_accumulator_window() -> None:
    acc = M.ExpertLoadAccumulator(num_experts=4, num_layers=2)
    # Layer 0: micro-batch 1 uses experts 0, 1; micro-batch 2 uses 1 and (padding only) 3.
    acc.update(torch.tensor([[0], [1]]), layer=0)
    acc.update(torch.tensor([[1], [3]]), torch.tensor([1, 0]), layer=0)
    # Layer 1: every expert once across two micro-batches, each batch alone has 2 dead experts.
    acc.update(torch.tensor([[0, 1]]), layer=1)
    acc.update(torch.tensor([[2, 3]]), layer=1)
    assert acc.counts_LE.dtype == torch.int64
    assert acc.counts_LE.tolist() == [[1, 2, 0, 0], [1, 1, 1, 1]]
    assert acc.tokens_L.tolist() == [3, 2]
    stats = acc.metrics()
    torch.testing.assert_close(stats["dead_experts"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(stats["max_load_ratio"], torch.tensor([4 * 2 / 3, 1.0]))
    torch.testing.assert_close(stats["load_entropy"][1], torch.tensor(1.0))
    acc.all_reduce()  # not distributed: a no-op
    assert acc.counts_LE.tolist() == [[1, 2, 0, 0], [1, 1, 1, 1]]
    acc.reset()
    with pytest.raises(ValueError, match="no real tokens"):
        acc.metrics()
    with pytest.raises(ValueError, match="layer"):
        acc.update(torch.tensor([[0]]), layer=2)


def test_expert_load_accumulator_all_reduce_single_process(tmp_path) -> None:
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        acc = M.ExpertLoadAccumulator(num_experts=3, num_layers=1)
        acc.update(torch.tensor([[0], [2], [2]]))
        acc.all_reduce()  # world size 1: the sum over processes is the local count
        assert acc.counts_LE.tolist() == [[1, 0, 2]] and acc.tokens_L.tolist() == [3]
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Token-level confidence
# --------------------------------------------------------------------------------------------


def test_token_entropy_and_top1_probability() -> None:
    # Token 0: p = (1/2, 1/2, 0) (an expert masked to -inf); token 1: p = (3/5, 1/5, 1/5).
    logits_TE = torch.tensor([[0.0, 0.0, -math.inf], [math.log(3), 0.0, 0.0]])
    h0 = math.log(2)
    h1 = -(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2))
    close(M.token_entropy(logits_TE), (h0 + h1) / 2 / math.log(3))
    close(M.top1_prob(logits_TE), (0.5 + 0.6) / 2)
    close(M.token_entropy(torch.zeros(5, 4)), 1.0)


def test_kth_margin() -> None:
    logits_TE = torch.tensor([[3.0, 1.0, 2.0, 0.0], [5.0, 5.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    # k = 2: sorted (3, 2, 1, 0) -> 1; (5, 5, 0, 0) -> 5; ties -> 0. Padding row 2 excluded below.
    close(M.kth_margin(logits_TE, 2), (1 + 5 + 0) / 3)
    close(M.kth_margin(logits_TE, 2, mask=torch.tensor([1, 1, 0])), 3.0)
    close(M.kth_margin(logits_TE[:2], 1), (1 + 0) / 2)
    # k == E: the top-k set holds every expert and cannot change -> +inf by definition.
    assert M.kth_margin(logits_TE, 4).item() == math.inf
    with pytest.raises(ValueError, match="top_k"):
        M.kth_margin(logits_TE, 5)


def test_low_precision_logits_are_upcast() -> None:
    logits_TE = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    indices_TK = logits_TE.float().topk(2).indices
    out = M.routing_metrics(logits_TE, indices_TK)
    ref = M.routing_metrics(logits_TE.float(), indices_TK)
    for name, value in out.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, ref[name])


# --------------------------------------------------------------------------------------------
# Parameter geometry
# --------------------------------------------------------------------------------------------


def test_spectral_norm_and_stable_rank_known_matrices() -> None:
    # [[2, 1], [1, 2]]: eigen/singular values 3 and 1; ‖W‖_F² = 10 -> stable rank 10/9.
    w = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    close(M.spectral_norm(w), 3.0, 1e-5)
    close(M.stable_rank(w), 10 / 9, 1e-5)
    # [[1, 1], [0, 0]]: rank one, σ = √2 -> stable rank 1.
    close(M.spectral_norm(torch.tensor([[1.0, 1.0], [0.0, 0.0]])), math.sqrt(2), 1e-5)
    close(M.stable_rank(torch.tensor([[1.0, 1.0], [0.0, 0.0]])), 1.0, 1e-5)
    # 5 × rotation: both singular values 5 -> stable rank 2.
    close(M.stable_rank(torch.tensor([[3.0, 4.0], [-4.0, 3.0]])), 2.0, 1e-5)
    close(M.stable_rank(torch.zeros(3, 2)), 0.0)


def test_spectral_norm_float32_under_autocast_and_differentiable() -> None:
    w = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sigma = M.spectral_norm(w)
    assert sigma.dtype == torch.float32
    sigma.backward()
    # dσ/dW = u vᵀ with u = v = (1, 1)/√2 for the top singular pair.
    torch.testing.assert_close(w.grad.float(), torch.full((2, 2), 0.5), atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="weight"):
        M.spectral_norm(torch.ones(2, 2, 2))


def test_angular_concentration_hand_case_and_brute_force() -> None:
    # Pairs: (e1, e2) = 0, (e1, e1) = 1, (e2, e1) = 0 -> mean over pairs 1/3. Norms do not matter.
    rows_ND = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    close(M.angular_concentration(rows_ND), 1 / 3)
    close(M.angular_concentration(rows_ND, mask=torch.tensor([True, False, True])), 1.0)
    close(M.angular_concentration(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])), -1.0)
    # Against the explicit N × N cosine matrix.
    x_ND = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    cos_NN = torch.nn.functional.cosine_similarity(x_ND.unsqueeze(1), x_ND.unsqueeze(0), dim=-1)
    off_diagonal = cos_NN[~torch.eye(7, dtype=torch.bool)].mean()
    close(M.angular_concentration(x_ND), float(off_diagonal), 1e-5)
    # Anchors [E, M, r] are flattened to rows; subsampling keeps the statistic of identical rows.
    close(M.angular_concentration(torch.ones(4, 3, 2)), 1.0, 1e-6)
    gen = torch.Generator().manual_seed(0)
    close(M.angular_concentration(torch.ones(50, 3), max_rows=5, generator=gen), 1.0, 1e-6)
    with pytest.raises(ValueError, match="at least 2 rows"):
        M.angular_concentration(rows_ND, mask=torch.tensor([True, False, False]))


# --------------------------------------------------------------------------------------------
# Stability and drift
# --------------------------------------------------------------------------------------------


def test_topk_agreement_is_a_set_overlap() -> None:
    indices_TK = torch.tensor([[0, 1], [2, 3], [0, 1]])
    reference_TK = torch.tensor([[1, 0], [2, 0], [2, 3]])  # order within a set does not matter
    # overlaps 2, 1, 0 -> (1 + 1/2 + 0) / 3
    close(M.topk_agreement(indices_TK, reference_TK), 0.5)
    close(M.topk_agreement(indices_TK, reference_TK, mask=torch.tensor([1, 1, 0])), 0.75)
    with pytest.raises(ValueError, match="reference_TK"):
        M.topk_agreement(indices_TK, reference_TK[:2])


def test_flip_rate_zero_without_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    gate_EH = torch.randn(8, 16, generator=gen)
    x_TH = torch.randn(32, 16, generator=gen)
    result = M.flip_rate(lambda x: (x @ gate_EH.T).topk(2).indices, x_TH, epsilon=0.0, seed=0)
    close(result.flip_rate, 0.0)
    close(result.overlap, 1.0)
    # Large noise flips some tokens of a real linear router; the same seed reproduces the result.
    noisy = M.flip_rate(lambda x: (x @ gate_EH.T).topk(2).indices, x_TH, epsilon=2.0, seed=3)
    again = M.flip_rate(lambda x: (x @ gate_EH.T).topk(2).indices, x_TH, epsilon=2.0, seed=3)
    assert 0.0 < float(noisy.flip_rate) <= 1.0 and noisy == again


def test_flip_rate_perturbation_has_relative_norm_epsilon() -> None:
    seen: list[torch.Tensor] = []

    def recording_router(x_TH: torch.Tensor) -> torch.Tensor:
        seen.append(x_TH.clone())
        return torch.zeros(x_TH.shape[0], 1, dtype=torch.long)

    x_TH = torch.randn(10, 6, generator=torch.Generator().manual_seed(2)) * torch.arange(1.0, 11.0)[:, None]
    M.flip_rate(recording_router, x_TH, epsilon=0.05, seed=1)
    clean_TH, noisy_TH = seen
    torch.testing.assert_close(clean_TH, x_TH)
    # Per token: ‖x' − x‖ = ε‖x‖, a random direction (not parallel to x).
    torch.testing.assert_close((noisy_TH - x_TH).norm(dim=-1), 0.05 * x_TH.norm(dim=-1))
    cos_T = torch.nn.functional.cosine_similarity(noisy_TH - x_TH, x_TH, dim=-1)
    assert cos_T.abs().max() < 0.99


def _sign_router(x_TH: torch.Tensor) -> torch.Tensor:
    """Expert 2 exactly at x = 1, expert 1 above, expert 0 below: any perturbation flips the token."""
    x_T = x_TH[:, 0]
    top1_T = torch.where(x_T > 1, 1, torch.where(x_T < 1, 0, 2))
    return top1_T.unsqueeze(-1)


def test_flip_rate_one_for_a_noise_sign_router() -> None:
    x_TH = torch.ones(64, 1)
    result = M.flip_rate(_sign_router, x_TH, epsilon=0.1, generator=torch.Generator().manual_seed(0))
    close(result.flip_rate, 1.0)
    close(result.overlap, 0.0)
    # In one dimension the unit direction is ±1: both signs occur among 64 tokens.
    assert {0, 1} <= set(_sign_router(x_TH + 0.1 * torch.randn(64, 1)).flatten().tolist())


def test_flip_rate_partial_overlap_and_padding() -> None:
    def route(x_TH: torch.Tensor) -> torch.Tensor:
        # Tokens 0, 1 route to {0, 1} whatever x; tokens 2, 3 swap expert 1 for 2 when x moves.
        moved_T = (x_TH[:, 0] != 1).long()
        fixed_T = torch.tensor([0, 0, 1, 1]).bool()
        second_T = torch.where(fixed_T, 1 + moved_T, torch.ones_like(moved_T))
        return torch.stack([torch.zeros_like(second_T), second_T], dim=-1)

    x_TH = torch.ones(4, 3)
    result = M.flip_rate(route, x_TH, epsilon=0.5, seed=0)
    close(result.flip_rate, 0.5)
    close(result.overlap, (1 + 1 + 0.5 + 0.5) / 4)
    masked = M.flip_rate(route, x_TH, epsilon=0.5, seed=0, mask=torch.tensor([[1, 1], [0, 0]]))
    close(masked.flip_rate, 0.0)
    with pytest.raises(ValueError, match="epsilon"):
        M.flip_rate(route, x_TH, epsilon=-1.0)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _two_opposite_layers() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Layer A sends both tokens to expert 0 with p = (0.8, 0.2); layer B mirrors it onto expert 1."""
    logits_a = torch.log(torch.tensor([[0.8, 0.2], [0.8, 0.2]]))
    logits_b = torch.log(torch.tensor([[0.2, 0.8], [0.2, 0.8]]))
    return [logits_a, logits_b], [torch.tensor([[0], [0]]), torch.tensor([[1], [1]])]


def test_per_layer_balance_loss_hand_computed() -> None:
    (logits_a, logits_b), (idx_a, idx_b) = _two_opposite_layers()
    # Layer A: f = (1, 0), P = (0.8, 0.2) -> E · Σ f P = 2 · 0.8 = 1.6; layer B the same by symmetry.
    close(M.load_balance_loss(logits_a, idx_a), 1.6, 1e-6)
    close(M.load_balance_loss(logits_b, idx_b), 1.6, 1e-6)
    close(M.layerwise_load_balance_loss([logits_a, logits_b], [idx_a, idx_b]), 1.6, 1e-6)
    # Balanced routing with uniform probabilities gives K.
    close(M.load_balance_loss(torch.zeros(4, 4), torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])), 2.0)


def test_pooled_balance_loss_cancels_opposite_layers() -> None:
    logits, indices = _two_opposite_layers()
    # Pooled: f = (2/4, 2/4), P = (0.5, 0.5) -> 2 · (0.25 + 0.25) = 1, the value of perfect balance,
    # although each layer has collapsed onto one expert.
    close(M.pooled_load_balance_loss(logits, indices), 1.0, 1e-6)
    # One layer: both forms agree.
    close(M.pooled_load_balance_loss(logits[:1], indices[:1]), 1.6, 1e-6)


def test_balance_loss_masks_padding_and_its_nan() -> None:
    (logits_a, _), (idx_a, _) = _two_opposite_layers()
    # A padding token routed to expert 1 with garbage (NaN) logits must change nothing.
    logits_TE = torch.cat([logits_a, torch.tensor([[math.nan, math.nan]])]).requires_grad_()
    idx_TK = torch.cat([idx_a, torch.tensor([[1]])])
    mask_T = torch.tensor([True, True, False])
    loss = M.load_balance_loss(logits_TE, idx_TK, mask_T)
    close(loss, 1.6, 1e-6)
    loss.backward()
    assert torch.isfinite(logits_TE.grad).all()
    # Counted as a real token with finite logits, it would change the loss.
    logits_TE = torch.cat([logits_a, torch.log(torch.tensor([[0.1, 0.9]]))])
    assert abs(float(M.load_balance_loss(logits_TE, idx_TK)) - 1.6) > 1e-3
    with pytest.raises(ValueError, match="NaN"):
        M.load_balance_loss(torch.tensor([[math.nan, 0.0]]), torch.tensor([[0]]))


def test_balance_loss_custom_probs() -> None:
    # Probabilities passed by the family (here sigmoid-normalised) replace softmax(logits).
    logits_TE = torch.zeros(2, 2)
    probs_TE = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    # f = (1, 0) from the indices, P = (0.8, 0.2) from probs -> 2 · 0.8.
    close(M.load_balance_loss(logits_TE, torch.tensor([[0], [0]]), probs=probs_TE), 1.6, 1e-6)
    with pytest.raises(ValueError, match="probs"):
        M.load_balance_loss(logits_TE, torch.tensor([[0], [0]]), probs=probs_TE[:1])


def test_routing_probs_families() -> None:
    logits_TE = torch.tensor([[0.0, math.log(3), -5.0]])
    topk_TE = M.routing_probs(logits_TE, "topk_softmax", torch.tensor([[1, 0]]))
    torch.testing.assert_close(topk_TE, torch.tensor([[0.25, 0.75, 0.0]]))
    sig_TE = M.routing_probs(torch.zeros(1, 4), "sigmoid")
    torch.testing.assert_close(sig_TE, torch.full((1, 4), 0.25))
    with pytest.raises(ValueError, match="scoring"):
        M.routing_probs(logits_TE, "relu")  # type: ignore[arg-type]


def test_pooled_balance_loss_matches_transformers() -> None:
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    gen = torch.Generator().manual_seed(0)
    batch, seq, num_experts, top_k = 3, 5, 6, 2
    logits_LTE = tuple(torch.randn(batch * seq, num_experts, generator=gen) * 2 for _ in range(3))
    attention_mask_BS = torch.ones(batch, seq, dtype=torch.long)
    attention_mask_BS[0, 3:] = 0
    attention_mask_BS[2, :1] = 0  # left padding too
    indices_LTK = [torch.topk(torch.softmax(x, -1), top_k, dim=-1).indices for x in logits_LTE]
    expected = mixtral.load_balancing_loss_func(logits_LTE, num_experts, top_k, attention_mask_BS)
    ours = M.pooled_load_balance_loss(logits_LTE, indices_LTK, attention_mask_BS)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-5, atol=1e-6)
    # A single layer: our per-layer loss is transformers' loss too.
    expected_one = mixtral.load_balancing_loss_func(logits_LTE[:1], num_experts, top_k, attention_mask_BS)
    torch.testing.assert_close(
        M.load_balance_loss(logits_LTE[0], indices_LTK[0], attention_mask_BS), expected_one.float()
    )


def test_z_loss_closed_form_and_padding() -> None:
    # logsumexp(0, 0) = log 2, logsumexp(log 3, 0) = log 4 = 2 log 2 -> mean of squares 2.5 log² 2.
    logits_TE = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [50.0, 50.0]])
    close(M.z_loss(logits_TE, torch.tensor([1, 1, 0])), 2.5 * math.log(2) ** 2, 1e-6)
    assert float(M.z_loss(logits_TE)) > 100  # the padding row would dominate if counted
    with pytest.raises(ValueError, match="no real tokens"):
        M.z_loss(logits_TE, torch.zeros(3, dtype=torch.bool))
    # validate=False: no sync, and an all-padding batch gives 0 instead of NaN.
    close(M.z_loss(logits_TE, torch.zeros(3, dtype=torch.bool), validate=False), 0.0)


# --------------------------------------------------------------------------------------------
# The bundle and input errors
# --------------------------------------------------------------------------------------------


def test_routing_metrics_bundle_matches_the_parts() -> None:
    gen = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(12, 4, generator=gen)
    indices_TK = logits_TE.topk(2).indices
    attention_mask_BS = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    out = M.routing_metrics(logits_TE, indices_TK, attention_mask_BS)
    assert set(out) == {
        "load_entropy",
        "load_cv",
        "max_load_ratio",
        "dead_experts",
        "token_entropy",
        "top1_prob",
        "kth_margin",
        "aux_loss",
        "z_loss",
    }
    real_T = attention_mask_BS.flatten().bool()
    real_TE, real_TK = logits_TE[real_T], indices_TK[real_T]
    f_E = M.load_fractions(real_TK, 4)
    torch.testing.assert_close(out["load_entropy"], M.load_entropy(f_E))
    torch.testing.assert_close(out["kth_margin"], M.kth_margin(real_TE, 2))
    torch.testing.assert_close(out["aux_loss"], M.load_balance_loss(real_TE, real_TK))
    torch.testing.assert_close(out["z_loss"], M.z_loss(real_TE))
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.values())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: M.routing_metrics(torch.zeros(4, 3), torch.zeros(5, 1, dtype=torch.long)), "indices_TK"),
        (lambda: M.routing_metrics(torch.zeros(4, 3), torch.zeros(4, 4, dtype=torch.long)), "K = 4 > E = 3"),
        (lambda: M.routing_metrics(torch.zeros(4, 3), torch.zeros(4, 1)), "integer"),
        (
            lambda: M.routing_metrics(torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long), torch.ones(5)),
            "mask",
        ),
        (
            lambda: M.routing_metrics(
                torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long), torch.zeros(2, 2)
            ),
            "no real tokens",
        ),
        (lambda: M.routing_metrics(torch.full((4, 3), math.nan), torch.zeros(4, 1, dtype=torch.long)), "NaN"),
        (lambda: M.load_fractions(torch.tensor([[3]]), 3), r"\[0, 3\)"),
        (lambda: M.token_entropy(torch.zeros(3)), "logits_TE"),
        (
            lambda: M.load_balance_loss(
                torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2)
            ),
            "mask",
        ),
        (lambda: M.pooled_load_balance_loss([], []), "logits_LTE"),
        (lambda: M.layerwise_load_balance_loss([torch.zeros(2, 2)], []), "indices_LTK"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_nan_in_padding_rows_is_ignored_by_metrics() -> None:
    logits_TE = torch.tensor([[1.0, 0.0, 0.0], [math.nan, math.nan, math.nan]])
    indices_TK = torch.tensor([[0], [1]])
    out = M.routing_metrics(logits_TE, indices_TK, torch.tensor([True, False]))
    assert all(torch.isfinite(v) for v in out.values())
    close(out["dead_experts"], 2.0)

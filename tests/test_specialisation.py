"""Specialisation metrics (``hf_moe_routers.metrics.specialisation``): each against a hand-computed case,
the streaming accumulator against the functions, the evaluate-style ``RoutingMetrics`` and the
co-activation plot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_moe_routers import metrics as M
from hf_moe_routers.metrics import catalog

LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# Router saturation
# --------------------------------------------------------------------------------------------


def test_router_saturation_is_the_mean_top_k_overlap_over_real_tokens():
    indices = torch.tensor([[0, 1], [2, 3], [0, 2]])
    reference = torch.tensor([[1, 0], [2, 0], [3, 1]])  # overlaps 2, 1, 0: order inside a set is ignored
    assert float(M.router_saturation(indices, reference)) == pytest.approx((2 + 1 + 0) / 3 / 2)
    mask = torch.tensor([True, True, False])
    assert float(M.router_saturation(indices, reference, mask)) == pytest.approx((2 + 1) / 2 / 2)
    assert float(M.router_saturation(indices, indices)) == 1.0
    with pytest.raises(ValueError, match="reference_TK"):
        M.router_saturation(indices, reference[:2])


# --------------------------------------------------------------------------------------------
# Co-activation
# --------------------------------------------------------------------------------------------


def test_coactivation_counts_and_conditional_probabilities():
    indices = torch.tensor([[0, 1], [0, 2], [1, 0], [3, 2]])
    mask = torch.tensor([1, 1, 1, 0])  # the last token is padding: expert 3 receives nothing
    counts = M.coactivation_counts(indices, 4, mask)
    assert counts.tolist() == [[3, 2, 1, 0], [2, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    probs = M.coactivation(counts)
    nan = math.nan
    expected = torch.tensor(
        [[1, 2 / 3, 1 / 3, 0], [1, 1, 0, 0], [1, 0, 1, 0], [nan, nan, nan, nan]], dtype=torch.float32
    )
    torch.testing.assert_close(probs, expected, equal_nan=True)
    # Off the diagonal each live row sums to K - 1 = 1.
    torch.testing.assert_close(probs[:3].sum(-1) - 1, torch.ones(3))
    # Best partner: 2/3 for expert 0, 1 for experts 1 and 2; expert 3 is left out.
    assert float(M.coactivation_top_partner(probs)) == pytest.approx((2 / 3 + 1 + 1) / 3)


def test_coactivation_of_uniform_pairs_and_of_top1():
    pairs = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])  # every pair once
    probs = M.coactivation(M.coactivation_counts(pairs, 4))
    off = ~torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close(probs[off], torch.full((12,), 1 / 3))  # (K-1)/(E-1)
    assert float(M.coactivation_top_partner(probs)) == pytest.approx(1 / 3)
    top1 = M.coactivation(M.coactivation_counts(torch.tensor([[0], [1], [1]]), 3))
    assert float(M.coactivation_top_partner(top1)) == 0.0
    with pytest.raises(ValueError, match="indices_TK"):
        M.coactivation_counts(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="counts_EE"):
        M.coactivation(torch.zeros(2, 3))


# --------------------------------------------------------------------------------------------
# Vocabulary specialisation
# --------------------------------------------------------------------------------------------

# Token ids 5, 5, 5, 7, 7, 9 with their top-2 of E = 4 experts.
TOKENS = torch.tensor([5, 5, 5, 7, 7, 9])
CHOICES = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 2], [1, 3], [0, 1]])


def test_token_expert_counts_are_slot_counts_of_the_ids_that_occur():
    table = M.token_expert_counts(TOKENS, CHOICES, 4)
    assert table.token_ids_V.tolist() == [5, 7, 9]
    assert table.counts_VE.tolist() == [[2, 1, 2, 1], [0, 2, 1, 1], [1, 1, 0, 0]]
    top1 = M.token_expert_counts(TOKENS, CHOICES, 4, top1=True)
    assert top1.counts_VE.tolist() == [[2, 0, 1, 0], [0, 2, 0, 0], [1, 0, 0, 0]]
    # Ids far beyond any dense table: rows only for the ids that occur.
    huge = M.token_expert_counts(torch.tensor([10**12, 3, 10**12]), torch.tensor([[1], [0], [1]]), 2)
    assert huge.token_ids_V.tolist() == [3, 10**12] and huge.counts_VE.tolist() == [[1, 0], [0, 2]]
    with pytest.raises(ValueError, match="token_ids"):
        M.token_expert_counts(TOKENS[:5], CHOICES, 4)
    with pytest.raises(ValueError, match="token_ids"):
        M.token_expert_counts(-TOKENS, CHOICES, 4)


def test_vocabulary_specialisation_by_hand():
    counts = M.token_expert_counts(TOKENS, CHOICES, 4).counts_VE
    # id 5: 3 occurrences, best expert 0 or 2 with 2 -> 2/3; id 7: expert 1 both times -> 1; id 9 -> 1.
    torch.testing.assert_close(M.token_specialisation(counts, top_k=2), torch.tensor([2 / 3, 1.0, 1.0]))
    assert float(M.vocabulary_specialisation(counts, 2, min_count=1)) == pytest.approx((2 + 2 + 1) / 6)
    assert float(M.vocabulary_specialisation(counts, 2, min_count=2)) == pytest.approx((2 + 2) / 5)
    assert float(M.vocabulary_specialisation(counts, 2, min_count=3)) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="min_count: no token id occurs at least 4 times"):
        M.vocabulary_specialisation(counts, 2, min_count=4)
    # First choices only: id 5 goes to expert 0 twice of 3.
    top1 = M.token_expert_counts(TOKENS, CHOICES, 4, top1=True).counts_VE
    assert float(M.vocabulary_specialisation(top1, 1, min_count=2)) == pytest.approx((2 + 2) / 5)
    # Padding never counts: without the second token, id 5 always has expert 0.
    mask = torch.tensor([1, 0, 1, 1, 1, 1])
    masked = M.token_expert_counts(TOKENS, CHOICES, 4, mask).counts_VE
    assert float(M.vocabulary_specialisation(masked, 2, min_count=2)) == 1.0


# --------------------------------------------------------------------------------------------
# Mutual information
# --------------------------------------------------------------------------------------------


def test_mutual_information_by_hand():
    # A deterministic 2 x 2 table: I = log 2 nats = 1 bit; an independent one: 0.
    assert float(M.mutual_information(torch.tensor([[2, 0], [0, 2]]))) == pytest.approx(LN2)
    assert float(M.mutual_information(torch.tensor([[2, 0], [0, 2]]), unit="bits")) == pytest.approx(1.0)
    assert float(M.mutual_information(torch.tensor([[1, 1], [1, 1]]))) == pytest.approx(0.0, abs=1e-7)
    # An uneven table, written out: p = [[1/2, 1/6], [0, 1/3]], p_A = [2/3, 1/3], p_B = [1/2, 1/2].
    h_a = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    h_b = LN2
    h_ab = -(1 / 2 * math.log(1 / 2) + 1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3))
    table = torch.tensor([[3, 1], [0, 2]])
    assert float(M.mutual_information(table)) == pytest.approx(h_a + h_b - h_ab)
    # Miller-Madow: + (m - 1) / 2N per entropy, N = 6, m_A = 2, m_B = 2, m_AB = 3.
    expected = h_a + h_b - h_ab + (1 + 1 - 2) / 12
    assert float(M.mutual_information(table, miller_madow=True)) == pytest.approx(expected)
    # Independent 2 x 2 with N = 4: the plug-in bias (4 - 2 - 2 + 1)/8 is taken off, below 0.
    independent = M.mutual_information(torch.tensor([[1, 1], [1, 1]]), miller_madow=True)
    assert float(independent) == pytest.approx(-1 / 8)
    with pytest.raises(ValueError, match="unit"):
        M.mutual_information(table, unit="hartleys")
    with pytest.raises(ValueError, match="counts_AB"):
        M.mutual_information(torch.zeros(2, 2))


def test_token_expert_mutual_information_of_singletons_is_the_expert_entropy():
    # Every id seen once (top-1): the plug-in I(token; expert) equals H(expert), the largest value
    # possible, whatever the routing: the bias the module docstring warns of.
    tokens = torch.arange(8)
    choices = torch.tensor([[0], [1], [0], [1], [0], [1], [0], [1]])
    table = M.token_expert_counts(tokens, choices, 2).counts_VE
    assert float(M.mutual_information(table, unit="bits")) == pytest.approx(1.0)
    # Miller-Madow: + ((8-1) + (2-1) - (8-1)) / (2 * 8) nats.
    corrected = M.mutual_information(table, unit="nats", miller_madow=True)
    assert float(corrected) == pytest.approx(LN2 + 1 / 16)


# --------------------------------------------------------------------------------------------
# Domains
# --------------------------------------------------------------------------------------------


def test_domain_specialisation_by_hand():
    choices = torch.tensor([[0], [0], [0], [1], [1], [1], [0]])
    domains = torch.tensor([0, 0, 0, 0, 1, 1, -1])  # the last token has no domain
    counts = M.domain_expert_counts(choices, domains, 2, 2)
    assert counts.tolist() == [[3, 1], [0, 2]]
    result = M.domain_specialisation(counts)
    # f_0 = [3/4, 1/4], f_1 = [0, 1], overall f = [1/2, 1/2]; weights 4/6 and 2/6.
    torch.testing.assert_close(result.tv_D, torch.tensor([0.25, 0.5]))
    kl0 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    torch.testing.assert_close(result.kl_D, torch.tensor([kl0, LN2]))
    torch.testing.assert_close(result.share_D, torch.tensor([4 / 6, 2 / 6]))
    assert float(result.tv) == pytest.approx(4 / 6 * 0.25 + 2 / 6 * 0.5)
    assert float(result.kl) == pytest.approx(4 / 6 * kl0 + 2 / 6 * LN2)
    # The token-weighted KL is the mutual information I(domain; expert).
    assert float(result.kl) == pytest.approx(float(M.mutual_information(counts)))
    # A domain without tokens is NaN and weighs nothing; padding is not counted.
    padded = M.domain_expert_counts(choices, domains, 3, 2, mask=torch.tensor([1, 1, 1, 1, 1, 1, 0]))
    sparse = M.domain_specialisation(padded)
    assert math.isnan(float(sparse.tv_D[2])) and float(sparse.tv) == pytest.approx(float(result.tv))
    with pytest.raises(ValueError, match="domain_ids"):
        M.domain_expert_counts(choices, domains + 2, 2, 2)


# --------------------------------------------------------------------------------------------
# The accumulator
# --------------------------------------------------------------------------------------------


def _two_batches():
    """Two layers (E = 4, K = 2) over two batches: the second layer reverses the choices."""
    return [
        (TOKENS[:4], CHOICES[:4], torch.tensor([0, 0, 1, 1])),
        (TOKENS[4:], CHOICES[4:], torch.tensor([1, 0])),
    ]


def test_the_accumulator_matches_the_functions_on_the_whole_text():
    acc = M.SpecialisationAccumulator(4, num_layers=2, num_domains=2)
    for tokens, choices, domains in _two_batches():
        acc.update(tokens, choices, layer=0, domain_ids=domains, reference_indices_TK=choices)
        acc.update(tokens, choices.flip(0), layer=1, domain_ids=domains, reference_indices_TK=choices)
    values = acc.metrics(min_count=2, miller_madow=False, unit="nats")
    assert list(values) == list(catalog.SPECIALISATION_METRICS)
    all_domains = torch.tensor([0, 0, 1, 1, 1, 0])
    counts = M.token_expert_counts(TOKENS, CHOICES, 4).counts_VE
    assert acc.token_expert_counts(0).counts_VE.tolist() == counts.tolist()
    assert float(values["router_saturation"][0]) == 1.0
    flipped = torch.cat([CHOICES[:4].flip(0), CHOICES[4:].flip(0)])
    assert float(values["router_saturation"][1]) == pytest.approx(
        float(M.router_saturation(flipped, CHOICES))
    )
    probs = M.coactivation(M.coactivation_counts(CHOICES, 4))
    torch.testing.assert_close(acc.coactivation()[0], probs, equal_nan=True)
    assert float(values["coactivation_top_partner"][0]) == pytest.approx(
        float(M.coactivation_top_partner(probs))
    )
    assert float(values["vocab_specialisation"][0]) == pytest.approx(4 / 5)
    assert float(values["token_expert_mi"][0]) == pytest.approx(float(M.mutual_information(counts)))
    domains = M.domain_specialisation(M.domain_expert_counts(CHOICES, all_domains, 2, 4))
    assert float(values["domain_tv"][0]) == pytest.approx(float(domains.tv))
    assert float(values["domain_kl"][0]) == pytest.approx(float(domains.kl))
    # Defaults: MI in bits with Miller-Madow; an unmet min_count is NaN, not an error.
    defaults = acc.metrics(min_count=10)
    assert math.isnan(float(defaults["vocab_specialisation"][0]))
    corrected = M.mutual_information(counts, unit="bits", miller_madow=True)
    assert float(defaults["token_expert_mi"][0]) == pytest.approx(float(corrected))


def test_the_accumulator_without_optional_inputs_merges_and_resets():
    acc = M.SpecialisationAccumulator([4, 3])
    acc.update(None, CHOICES, layer=0)
    acc.update(None, torch.tensor([[0, 1], [1, 2]]), layer=1, mask=torch.tensor([True, False]))
    values = acc.metrics()
    for name in ("router_saturation", "vocab_specialisation", "token_expert_mi", "domain_tv", "domain_kl"):
        assert torch.isnan(values[name]).all(), name
    assert float(values["coactivation_top_partner"][1]) == 1.0  # one real token: 0 and 1 together
    assert acc.tokens_L.tolist() == [6, 1]
    # Merging two halves gives the whole.
    halves = [M.SpecialisationAccumulator(4) for _ in range(2)]
    for half, (tokens, choices, _) in zip(halves, _two_batches()):
        half.update(tokens, choices)
    whole = M.SpecialisationAccumulator(4)
    whole.update(TOKENS, CHOICES)
    halves[0].merge(halves[1])
    assert (
        halves[0].token_expert_counts().counts_VE.tolist() == whole.token_expert_counts().counts_VE.tolist()
    )
    assert torch.equal(halves[0].coactivation_LEE, whole.coactivation_LEE)
    whole.reset()
    with pytest.raises(ValueError, match="received no real tokens"):
        whole.metrics()
    with pytest.raises(ValueError, match="indices_TK has K = 1"):
        halves[0].update(TOKENS, CHOICES[:, :1])
    with pytest.raises(ValueError, match="num_domains = 0"):
        halves[0].update(TOKENS, CHOICES, domain_ids=torch.zeros(6, dtype=torch.long))


def test_the_accumulator_buffers_sparse_entries_and_merges_them(monkeypatch):
    monkeypatch.setattr(M.SpecialisationAccumulator, "_MERGE_EVERY", 4)
    acc = M.SpecialisationAccumulator(4)
    for tokens, choices, _ in _two_batches():
        acc.update(tokens, choices)
    assert (
        acc.token_expert_counts().counts_VE.tolist()
        == M.token_expert_counts(TOKENS, CHOICES, 4).counts_VE.tolist()
    )


def test_the_accumulator_all_reduce_on_one_process(tmp_path):
    import torch.distributed as dist

    acc = M.SpecialisationAccumulator(4)
    acc.update(TOKENS, CHOICES)
    before = acc.token_expert_counts().counts_VE.clone()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        acc.all_reduce()
    finally:
        dist.destroy_process_group()
    assert torch.equal(acc.token_expert_counts().counts_VE, before) and acc.tokens_L.tolist() == [6]


# --------------------------------------------------------------------------------------------
# RoutingMetrics (the evaluate-style API)
# --------------------------------------------------------------------------------------------


def test_routing_metrics_mirrors_evaluate_add_batch_and_compute():
    metric = M.RoutingMetrics(4, domains=["a", "b"], min_count=2, per_layer=True)
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    for (tokens, choices, domains), rows in zip(_two_batches(), (slice(0, 4), slice(4, 6))):
        metric.add_batch(
            predictions=[choices, choices],
            references=[choices, choices.flip(0)],
            token_ids=tokens,
            domain_ids=domains,
            logits=[logits[rows], logits[rows]],
        )
    result = metric.compute()
    assert result["tokens"] == 6
    assert result["router_saturation/layer_0"] == 1.0 and result["router_saturation/layer_1"] < 1.0
    assert result["vocab_specialisation"] == pytest.approx(4 / 5)
    load = M.load_statistics(M.expert_counts(CHOICES, 4))
    assert result["load_entropy"] == pytest.approx(float(load["load_entropy"]))
    # Token-weighted over batches = the value over all tokens at once.
    assert result["token_entropy"] == pytest.approx(float(M.token_entropy(logits)), rel=1e-5)
    assert set(result["domains"]) == {"a", "b"}
    assert set(catalog.SPECIALISATION_METRICS) <= set(result)
    # Like evaluate, compute() empties the module; compute(**batch) adds a batch first.
    with pytest.raises(ValueError, match="no batch"):
        metric.compute()
    once = M.RoutingMetrics(4).compute(indices=CHOICES, token_ids=TOKENS)
    assert "router_saturation" not in once and "domains" not in once
    assert once["coactivation_top_partner"] == pytest.approx(
        float(M.coactivation_top_partner(M.coactivation(M.coactivation_counts(CHOICES, 4))))
    )
    with pytest.raises(ValueError, match="predictions"):
        M.RoutingMetrics(4).add_batch(token_ids=TOKENS)
    with pytest.raises(ValueError, match="not both"):
        M.RoutingMetrics(4).add_batch(predictions=CHOICES, indices=CHOICES)


# --------------------------------------------------------------------------------------------
# The co-activation plot
# --------------------------------------------------------------------------------------------


def test_plot_coactivation_draws_one_panel_per_layer_without_pyplot(tmp_path):
    pytest.importorskip("matplotlib")
    import sys

    from hf_moe_routers.reporting.plots import plot_coactivation

    acc = M.SpecialisationAccumulator(4, num_layers=2)
    acc.update(None, CHOICES, layer=0)
    acc.update(None, CHOICES.flip(0), layer=1)
    probs = acc.coactivation()
    figure = plot_coactivation(probs, ["layer_0", "layer_1"], path=tmp_path / "co.png")
    assert (tmp_path / "co.png").is_file()
    panels = [ax for ax in figure.axes if ax.images]
    assert len(panels) == 2
    shown = np.ma.filled(panels[0].images[0].get_array(), np.nan)
    assert math.isnan(float(shown[1, 1])) and float(shown[0, 1]) == pytest.approx(float(probs[0, 0, 1]))
    assert "matplotlib.pyplot" not in sys.modules or not __import__("matplotlib.pyplot").pyplot.get_fignums()
    with pytest.raises(ValueError, match="layers"):
        plot_coactivation(probs, ["only_one"])

"""The routing report: one computation for the Trainer, ``inspect``, the cards and the experiments."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from hf_moe_routers import metrics as M
from hf_moe_routers.cards import card_sections
from hf_moe_routers.cli.commands import inspect_metrics
from hf_moe_routers.metrics.catalog import (
    BATCH_METRICS,
    LOAD_METRICS,
    ROUTER_METRICS,
    ROUTING_METRICS,
    SPECIALISATION_METRICS,
)
from hf_moe_routers.reporting import (
    RouterCapture,
    RouterCollector,
    RoutingWindow,
    WindowTotals,
    report_captures,
    routing_scoring,
)
from hf_moe_routers.routers import base as router_base


def _batches(n: int = 2, batch: int = 2, seq: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(2, 60, (batch, seq), generator=generator)} for _ in range(n)]


def _captured(model, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per router that ran: all batches' logits ``[T, E]`` and selected experts ``[T, K]``."""
    collector = RouterCollector(model)
    logits, indices = [[] for _ in collector.routers], [[] for _ in collector.routers]
    with torch.no_grad():
        for batch in batches:
            collector.start()
            model(**batch)
            for i, capture in enumerate(collector.stop()):
                if capture is not None:
                    logits[i].append(capture.logits_TE.float())
                    indices[i].append(capture.indices_TK)
    collector.remove()
    return [(torch.cat(lg), torch.cat(ix)) for lg, ix in zip(logits, indices) if lg]


def _balance_by_hand(logits_TE: torch.Tensor, indices_TK: torch.Tensor, probs_TE: torch.Tensor) -> float:
    """``E · Σ_e f_e · P_e``: f_e = slots of expert e per token, P_e = mean probability of expert e."""
    num_tokens, num_experts = logits_TE.shape
    f_E = torch.bincount(indices_TK.reshape(-1), minlength=num_experts).double() / num_tokens
    return float(num_experts * (f_E * probs_TE.double().mean(0)).sum())


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_inspect_aux_loss_uses_the_family_routing_probabilities(family):
    """``inspect`` used to apply a softmax to every family's logits; DeepSeek-V3 scores with a
    sigmoid (normalised per token) and gpt-oss with a softmax over the top-k logits only."""
    model = tiny_model(family)
    batches = _batches()
    layers, per_layer, _ = inspect_metrics(model, batches)
    captured = _captured(model, batches)
    assert len(layers) == len(captured) > 0
    for layer, (logits_TE, indices_TK) in zip(layers, captured):
        if family == "deepseek_v3":
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        else:
            top_TK = torch.softmax(logits_TE.gather(-1, indices_TK), dim=-1)
            probs_TE = torch.zeros_like(logits_TE).scatter(-1, indices_TK, top_TK)
        expected = _balance_by_hand(logits_TE, indices_TK, probs_TE)
        softmax_value = _balance_by_hand(logits_TE, indices_TK, torch.softmax(logits_TE, -1))
        assert per_layer[layer]["aux_loss"] == pytest.approx(expected, rel=1e-5)
        assert abs(expected - softmax_value) > 1e-3  # the old (softmax) number would have failed


def test_inspect_aux_loss_of_a_softmax_family_is_transformers_own():
    model = tiny_model("mixtral")
    layers, per_layer, _ = inspect_metrics(model, _batches())
    for layer, (logits_TE, _) in zip(layers, _captured(model, _batches())):
        expected = load_balancing_loss_func((logits_TE,), logits_TE.shape[-1], top_k=2)
        assert per_layer[layer]["aux_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_a_window_of_one_batch_equals_the_metric_functions():
    generator = torch.Generator().manual_seed(3)
    logits_TE = torch.randn(10, 6, generator=generator)
    indices_TK = logits_TE.topk(2, dim=-1).indices
    mask_T = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    model = tiny_model("mixtral")
    router = RouterCollector(model).routers[0]
    window = RoutingWindow([router])
    window.add([RouterCapture(logits_TE, indices_TK, torch.randn(10, 32))], [mask_T])
    values = WindowTotals.unpack(window.pack(), window.widths).per_layer()
    expected = M.routing_metrics(logits_TE, indices_TK, mask_T, top_k=2)
    assert list(values) == [*BATCH_METRICS, *LOAD_METRICS]
    for name, value in expected.items():
        assert values[name][0] == pytest.approx(float(value), rel=1e-6), name


def test_a_window_averages_batch_metrics_and_pools_the_load():
    model = tiny_model("mixtral")
    router = RouterCollector(model).routers[0]
    window = RoutingWindow([router])
    first = torch.tensor([[0, 1], [0, 1]])
    second = torch.tensor([[2, 3], [4, 5]])
    logits = [torch.randn(2, 6, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    for logits_TE, indices_TK in zip(logits, (first, second)):
        window.add([RouterCapture(logits_TE, indices_TK, torch.randn(2, 32))], [None])
    values = WindowTotals.unpack(window.pack(), window.widths).per_layer()
    entropy = [float(M.token_entropy(lg)) for lg in logits]
    assert values["token_entropy"][0] == pytest.approx(sum(entropy) / 2)
    # Every expert got a slot over the window although each batch alone leaves 2 to 4 idle.
    assert values["dead_experts"][0] == 0.0


def test_report_measures_parameters_with_or_without_inputs():
    model = tiny_model("mixtral")
    routers = RouterCollector(model).routers
    x_TH = torch.randn(12, 32, generator=torch.Generator().manual_seed(0))
    captures = []
    for info in routers:
        logits_TE = info.logits(x_TH)
        captures.append(RouterCapture(logits_TE, logits_TE.topk(2, dim=-1).indices, x_TH))
    with_inputs, loads = report_captures(routers, captures, scoring=routing_scoring(model))
    without, _ = report_captures(routers, captures, measure_inputs=False)
    # Specialisation metrics need token-level inputs a capture does not have (SpecialisationAccumulator).
    assert set(with_inputs) == {
        spec.name for spec in ROUTING_METRICS if spec.group not in ("penalty", "specialisation")
    }
    assert len(loads) == len(routers) and all(sum(row) == pytest.approx(1.0) for row in loads)
    for spec in ROUTING_METRICS:
        if spec.group != "router":
            continue
        for a, b in zip(with_inputs[spec.name], without[spec.name]):
            if spec.needs_inputs:
                assert math.isnan(b) and (spec.name == "drift" or not math.isnan(a)), spec.name
            elif spec.name != "lipschitz_bound":
                assert a == b, spec.name
    # No inputs: the bound is the router's global constant (a linear gate: σ_max, also with inputs).
    assert without["lipschitz_bound"] == without["lipschitz_bound_global"]
    assert without["lipschitz_bound"] == pytest.approx(with_inputs["spectral_norm"])


def test_the_catalog_is_the_card_order_and_partitions_the_metrics():
    names = [spec.name for spec in ROUTING_METRICS]
    assert len(set(names)) == len(names)
    assert list(card_sections.METRIC_DESCRIPTIONS) == names
    groups = [*BATCH_METRICS, *LOAD_METRICS, *ROUTER_METRICS, *SPECIALISATION_METRICS, "reg_loss"]
    assert sorted(groups) == sorted(names)


def test_the_load_accumulator_takes_layers_of_different_widths():
    acc = M.ExpertLoadAccumulator([4, 2])
    acc.update(torch.tensor([[0], [1], [1]]), layer=0)
    acc.update(torch.tensor([[0], [1]]), layer=1)
    assert acc.counts_LE.tolist() == [[1, 2, 0, 0], [1, 1, 0, 0]]
    assert acc.layer_counts(1).tolist() == [1, 1]
    stats = acc.metrics()
    torch.testing.assert_close(stats["dead_experts"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(stats["load_entropy"][1], torch.tensor(1.0))
    with pytest.raises(ValueError, match="num_layers"):
        M.ExpertLoadAccumulator([4, 2], num_layers=3)


def test_routers_and_metrics_share_one_matrix_statistic():
    """One σ_max / stable rank / autocast switch for routers and metrics (hf_moe_routers.numerics)."""
    from hf_moe_routers import numerics

    assert router_base.spectral_norm is numerics.spectral_norm is not None
    assert router_base.stable_rank is numerics.stable_rank
    assert router_base.no_autocast is M.no_autocast is numerics.no_autocast
    weight = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.linalg.svdvals(weight.double())[0]
    torch.testing.assert_close(M.spectral_norm(weight).double(), sigma, rtol=1e-5, atol=0)
    expected = weight.double().pow(2).sum() / sigma**2
    torch.testing.assert_close(M.stable_rank(weight).double(), expected, rtol=1e-5, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with M.no_autocast("cpu"):
            assert not torch.is_autocast_enabled("cpu")


def test_specialisation_helpers_read_a_window_of_captures():
    from hf_moe_routers.reporting import (
        add_specialisation,
        coactivation_pairs,
        domain_report,
        specialisation_report,
        specialisation_window,
    )

    routers = RouterCollector(tiny_model("mixtral")).routers  # 2 layers, E = 6
    window = specialisation_window(routers, num_domains=2)
    chosen = torch.tensor([[0, 1], [0, 1], [2, 0], [3, 4]])
    captures = [RouterCapture(torch.zeros(4, 6), chosen, torch.empty(0, 0)), None]  # layer 1 did not run
    add_specialisation(window, captures, torch.tensor([7, 7, 8, 9]), domain_ids=torch.tensor([0, 0, 1, 1]))
    assert window.tokens_L.tolist() == [4, 0]
    # A window whose second layer saw nothing: read the first layer alone.
    one = specialisation_window(routers[:1], num_domains=2)
    add_specialisation(one, captures[:1], torch.tensor([7, 7, 8, 9]), domain_ids=torch.tensor([0, 0, 1, 1]))
    values = specialisation_report(one, min_count=2)
    # No reference: no saturation; id 7 (twice, always experts 0 and 1) is the only id kept.
    assert list(values) == [
        "coactivation_top_partner",
        "vocab_specialisation",
        "token_expert_mi",
        "domain_tv",
        "domain_kl",
    ]
    assert values["vocab_specialisation"] == [1.0]
    # P(1 | 0) = 2/3, P(0 | 1) = 1, P(0 | 2) = 1, ...: largest first, ties by a then b.
    assert [(p["a"], p["b"]) for p in coactivation_pairs(one, top=4)[0]] == [(1, 0), (2, 0), (3, 4), (4, 3)]
    domains = domain_report(one, ["first", "second"])
    assert domains["first"]["tokens"] == 2 and domains["second"]["tokens"] == 2
    expected = M.domain_specialisation(M.domain_expert_counts(chosen, torch.tensor([0, 0, 1, 1]), 2, 6))
    assert domains["second"]["domain_tv"] == [pytest.approx(float(expected.tv_D[1]))]
    with pytest.raises(ValueError, match="names"):
        domain_report(one, ["only"])

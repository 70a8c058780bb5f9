"""Aux-loss-free expert-bias balancing (DeepSeek-V3): config, selection, updates, persistence.

The bias ``b [E]`` is a float32 buffer of each router, enabled by ``expert_bias_update_rate > 0``:
experts are selected on ``logits + b`` (softmax families, Switch, gpt-oss) or ``sigmoid + b``
(DeepSeek-V3, whose ``e_score_correction_bias`` it is), the gate weights use the unbiased scores,
and ``update_expert_bias(counts_E)`` moves ``b`` against the step's loads (docs/ROUTERS.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import model_inputs, tiny_model
from test_modeling import ROUTERS, auto_class, realign, routed_config, skip_prototype_with_gate_bias

import hf_moe_routers as H
from hf_moe_routers.families import family_for_router
from hf_moe_routers.modeling import RoutedRouterMixin, update_expert_biases
from hf_moe_routers.routers import RouterConfig
from hf_moe_routers.routers.base import expert_bias_delta


def with_bias(config: RouterConfig, rate: float = 1e-2, **fields) -> RouterConfig:
    return dataclasses.replace(config, expert_bias_update_rate=rate, **fields)


def routers_of(model) -> list[tuple[str, RoutedRouterMixin]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedRouterMixin)]


def bias_key(family: str) -> str:
    return "e_score_correction_bias" if family == "deepseek_v3" else "expert_bias"


def choices(router, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [T, E], selected experts [T, K]) of one router call, as the collector reads them."""
    adapter = family_for_router(router)
    with torch.no_grad():
        output = adapter.call_router(router, x_TH)
        logits = adapter.output_logits(output, int(router.num_experts))
        return logits, adapter.output_indices(output, logits, adapter.router_top_k(router), router=router)


# --------------------------------------------------------------------------------------------
# (5) Config validation
# --------------------------------------------------------------------------------------------

BAD_FIELDS = [
    ({"expert_bias_update_rate": -1e-3}, "expert_bias_update_rate", ">= 0.0"),
    ({"expert_bias_update_rate": float("nan")}, "expert_bias_update_rate", "finite"),
    ({"expert_bias_update_rate": "fast"}, "expert_bias_update_rate", "a number"),
    ({"expert_bias_update_rate": True}, "expert_bias_update_rate", "a number"),
    ({"expert_bias_rule": "linear"}, "expert_bias_rule", "'sign', 'proportional'"),
    ({"expert_bias_rule": None}, "expert_bias_rule", "'sign', 'proportional'"),
    ({"expert_bias_clamp": 0.0}, "expert_bias_clamp", "> 0.0"),
    ({"expert_bias_clamp": -1.0}, "expert_bias_clamp", "> 0.0"),
    ({"expert_bias_clamp": "big"}, "expert_bias_clamp", "a number or None"),
    ({"expert_bias_clamp": float("inf")}, "expert_bias_clamp", "finite"),
]


@pytest.mark.parametrize("router_name", list(ROUTERS))
@pytest.mark.parametrize(("fields", "field", "allowed"), BAD_FIELDS, ids=lambda v: str(v))
def test_bad_expert_bias_fields_raise_naming_the_field(router_name, fields, field, allowed):
    cls = type(ROUTERS[router_name])
    with pytest.raises(ValueError) as info:
        cls(**fields)
    assert f"{cls.__name__}.{field}" in str(info.value)
    assert allowed in str(info.value)
    with pytest.raises(ValueError, match=field):  # the dict form (config.json, --router_kwargs) too
        RouterConfig.from_dict({"router_type": cls.router_type, **fields})


def test_expert_bias_fields_default_off_keyword_only_and_round_trip():
    config = H.L2RConfig(rank=4)
    assert (config.expert_bias_update_rate, config.expert_bias_rule, config.expert_bias_clamp) == (
        0.0,
        "sign",
        None,
    )
    assert not config.expert_bias_enabled
    # Keyword-only: the methods' own positional fields keep their positions.
    assert H.CosineRouterConfig(False, 4).dim == 4
    enabled = with_bias(
        H.CosineRouterConfig(dim=4), 1e-3, expert_bias_rule="proportional", expert_bias_clamp=2.0
    )
    assert enabled.expert_bias_enabled
    restored = RouterConfig.from_dict(json.loads(json.dumps(enabled.to_dict())))
    assert restored == enabled
    assert RouterConfig.from_json_kwargs("linear", '{"expert_bias_update_rate": 0.001}').expert_bias_enabled
    # A config.json written before these fields existed reads as "off".
    assert (
        RouterConfig.from_dict({"router_type": "linear", "check_finite": True}).expert_bias_update_rate == 0.0
    )


def test_update_rules_follow_the_documented_formulas():
    counts = torch.tensor([10.0, 0.0, 5.0, 5.0])  # mean 5
    assert torch.equal(expert_bias_delta(counts, 0.1, "sign"), torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    proportional = expert_bias_delta(counts, 0.1, "proportional")
    assert torch.allclose(proportional, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    skewed = expert_bias_delta(torch.tensor([7.0, 3.0, 5.0, 5.0]), 0.1, "proportional")
    assert torch.allclose(skewed, 0.1 * torch.tensor([-2.0, 2.0, 0.0, 0.0]) / 5.0)
    assert torch.equal(expert_bias_delta(torch.zeros(4), 0.1, "proportional"), torch.zeros(4))
    assert expert_bias_delta(torch.tensor([3, 1], dtype=torch.int64), 1.0, "sign").dtype == torch.float32
    with pytest.raises(ValueError, match="expert_bias_rule"):
        expert_bias_delta(counts, 0.1, "momentum")


def test_update_expert_bias_clamps_checks_counts_and_is_a_no_op_when_off():
    model = H.patch_moe_routers(
        tiny_model("mixtral"), H.LinearRouterConfig(expert_bias_update_rate=0.3, expert_bias_clamp=0.5)
    )
    (_, router), *_ = routers_of(model)
    counts = torch.tensor([12, 0, 0, 0, 0, 0])
    router.update_expert_bias(counts)
    assert torch.allclose(router.expert_bias, torch.tensor([-0.3, 0.3, 0.3, 0.3, 0.3, 0.3]))
    router.update_expert_bias(counts)
    assert torch.allclose(router.expert_bias, torch.tensor([-0.5, 0.5, 0.5, 0.5, 0.5, 0.5]))
    for bad in (
        torch.ones(5),
        torch.ones(2, 6),
        torch.tensor([1.0, -1, 0, 0, 0, 0]),
        torch.full((6,), math.nan),
    ):
        with pytest.raises(ValueError, match="counts_E"):
            router.update_expert_bias(bad)

    plain = H.patch_moe_routers(tiny_model("mixtral"), H.LinearRouterConfig())
    assert not any("expert_bias" in key for key in plain.state_dict())
    for _, router in routers_of(plain):
        assert not router.expert_bias_enabled and router.selection_bias() is None
        router.update_expert_bias(torch.arange(6))  # off: nothing to do
    # DeepSeek-V3 keeps its checkpoint's correction bias fixed while the rate is 0.
    deepseek = H.patch_moe_routers(tiny_model("deepseek_v3"), H.LinearRouterConfig())
    (_, router), *_ = routers_of(deepseek)
    assert not router.expert_bias_enabled and router.selection_bias() is router.e_score_correction_bias
    router.update_expert_bias(torch.arange(8))
    assert torch.equal(router.e_score_correction_bias, torch.zeros(8))


def test_model_level_update_checks_names():
    model = H.patch_moe_routers(tiny_model("qwen3_moe"), H.LinearRouterConfig(expert_bias_update_rate=0.1))
    names = [name for name, _ in routers_of(model)]
    counts = {name: torch.tensor([6, 0, 0, 0, 0, 0]) for name in names}
    model.update_expert_biases(counts)
    for _, router in routers_of(model):
        assert torch.allclose(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match="no routed router"):
        update_expert_biases(model, {**counts, "model.layers.0.mlp": torch.ones(6)})
    with pytest.raises(ValueError, match="no counts"):
        update_expert_biases(model, {names[0]: torch.ones(6)})


# --------------------------------------------------------------------------------------------
# (1) A collapsed router recovers balance under repeated updates, and not without them
# --------------------------------------------------------------------------------------------


def load_stats(history: list[torch.Tensor]) -> dict[str, float]:
    """Max-load ratio (max / mean), normalised load entropy and coefficient of variation of the
    loads, averaged over the steps given."""
    loads = torch.stack(history).float()
    share = loads / loads.sum(dim=1, keepdim=True)
    entropy = -(share * share.clamp_min(1e-12).log()).sum(dim=1) / math.log(loads.shape[1])
    return {
        "max_ratio": (loads.max(dim=1).values / loads.mean(dim=1)).mean().item(),
        "entropy": entropy.mean().item(),
        "cv": (loads.std(dim=1, unbiased=False) / loads.mean(dim=1)).mean().item(),
    }


def collapse_run(family: str, rule: str, rate: float, steps: int, update: bool) -> list[torch.Tensor]:
    """Loads per step of one linear router on a fixed batch whose every token strongly prefers
    expert 0 (a constant input feature read only by expert 0's gate row)."""
    model = H.patch_moe_routers(
        tiny_model(family), H.LinearRouterConfig(expert_bias_update_rate=rate, expert_bias_rule=rule)
    )
    (_, router), *_ = routers_of(model)
    num_experts, hidden = int(router.num_experts), router.base_scorer.hidden_size
    generator = torch.Generator().manual_seed(0)
    x_TH = torch.randn(240, hidden, generator=generator)
    x_TH[:, 0] = 1.0
    with torch.no_grad():
        weight = router.base_scorer.weight
        weight.copy_(torch.randn(num_experts, hidden, generator=generator) * 2 / hidden**0.5)
        weight[:, 0] = 0.0
        weight[0, 0] = 6.0
        if router.base_scorer.bias is not None:
            router.base_scorer.bias.zero_()
    history = []
    for _ in range(steps):
        _, indices_TK = choices(router, x_TH)
        counts_E = torch.bincount(indices_TK.reshape(-1), minlength=num_experts)
        history.append(counts_E)
        if update:
            router.update_expert_bias(counts_E)
    return history


@pytest.mark.parametrize(("rule", "rate"), [("sign", 1e-2), ("proportional", 5e-2)])
def test_collapsed_router_recovers_balance_with_updates_only(family, rule, rate):
    collapsed = load_stats(collapse_run(family, rule, rate, steps=5, update=False))
    # Without updates expert 0 takes (nearly) every token: the most loaded expert has 2.5 times
    # its share or more (E / K = 3 at most for top-2 of 6, 4 for DeepSeek's top-2 of 8, 6 for Switch).
    assert collapsed["max_ratio"] > 2.5, collapsed
    assert collapsed["entropy"] < 0.9 and collapsed["cv"] > 0.7, collapsed
    recovered = load_stats(collapse_run(family, rule, rate, steps=300, update=True)[-20:])
    # The sign rule keeps oscillating by about one step of u around balance; proportional settles.
    assert recovered["max_ratio"] < (1.45 if rule == "sign" else 1.05), recovered
    assert recovered["entropy"] > 0.98, recovered
    assert recovered["cv"] < (0.2 if rule == "sign" else 0.02), recovered


# --------------------------------------------------------------------------------------------
# (2) No gradient reaches the bias; it steers selection only
# --------------------------------------------------------------------------------------------


def test_gradients_never_reach_the_bias(family):
    model = H.patch_moe_routers(
        tiny_model(family), H.L2RConfig(rank=4, num_anchors=2, expert_bias_update_rate=1e-2)
    )
    model.train()
    routers = routers_of(model)
    for _, router in routers:
        router.update_expert_bias(torch.arange(int(router.num_experts)))
    before = {name: router.selection_bias().clone() for name, router in routers}
    anchors_before = {name: router.base_scorer.anchors.detach().clone() for name, router in routers}
    assert not any(bias_key(family) in name for name, _ in model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    inputs = model_inputs(family)
    labels = inputs.get("decoder_input_ids", inputs["input_ids"])
    for _ in range(2):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        for _, router in routers:
            assert router.selection_bias().grad is None
            assert router.base_scorer.anchors.grad is not None  # the router itself is trained
        optimizer.step()
        optimizer.zero_grad()
    for name, router in routers:
        bias = router.selection_bias()
        assert not bias.requires_grad and bias.grad is None
        assert torch.equal(bias, before[name])
        assert not torch.equal(router.base_scorer.anchors, anchors_before[name])


def hand_router(family: str):
    """A routed linear router with logits exactly ``[2, 1, 0.5, 0, -1, -2, ...]`` for one token."""
    model = H.patch_moe_routers(tiny_model(family), H.LinearRouterConfig(expert_bias_update_rate=1e-3))
    (_, router), *_ = routers_of(model)
    num_experts, hidden = int(router.num_experts), router.base_scorer.hidden_size
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0, -4.0][:num_experts])
    with torch.no_grad():
        router.base_scorer.weight.copy_(torch.eye(num_experts, hidden))
        if router.base_scorer.bias is not None:
            router.base_scorer.bias.zero_()
    x_TH = torch.zeros(1, hidden)
    x_TH[0, :num_experts] = logits
    return router, x_TH, logits


def test_bias_changes_selection_not_the_weights_of_a_selection_mixtral():
    router, x_TH, logits = hand_router("mixtral")  # softmax, top-2, always renormalised
    _, weights, indices = router(x_TH)
    assert indices.tolist() == [[0, 1]]
    assert torch.allclose(weights, torch.tensor([[math.e**2, math.e]]) / (math.e**2 + math.e))
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 3.0, 0.0, 0.0]))  # 0 + 3 > 2 > 1
    logits_out, weights, indices = router(x_TH)
    assert torch.equal(logits_out, logits[None])  # the logits never include the bias
    assert indices.tolist() == [[3, 0]]
    # The combine weights of experts {3, 0} are the unbiased probabilities, renormalised.
    assert torch.allclose(weights, torch.tensor([[1.0, math.e**2]]) / (1.0 + math.e**2))


def test_bias_changes_selection_not_the_weights_of_a_selection_qwen2_unnormalised():
    router, x_TH, logits = hand_router("qwen2_moe")  # norm_topk_prob False: plain probabilities
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0]))
    _, weights, indices = router(x_TH)
    probs = logits.softmax(dim=-1)
    assert indices.tolist() == [[5, 0]]
    assert torch.allclose(weights, probs[[5, 0]][None])


def test_bias_changes_selection_not_the_weights_of_a_selection_gpt_oss():
    router, x_TH, logits = hand_router("gpt_oss")  # top-k logits, softmax over the k
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, -2.0, 0.0, 0.0, 0.0, 0.0]))  # 1 - 2 < 0.5
    _, weights, indices = router(x_TH)
    assert indices.tolist() == [[0, 2]]
    assert torch.allclose(weights, torch.tensor([[2.0, 0.5]]).softmax(dim=-1))


def test_bias_changes_selection_not_the_weights_of_a_selection_deepseek():
    router, x_TH, logits = hand_router("deepseek_v3")  # sigmoid + bias, 2 groups of 4, best 1 group
    scores = logits.sigmoid()
    _, weights, indices = router(x_TH)
    assert sorted(indices[0].tolist()) == [0, 1]
    with torch.no_grad():  # lifts experts 5 and 6 (group 2) above the best of group 1
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0, 0, 0, 0, 1.0, 1.0, 0]))
    _, weights, indices = router(x_TH)
    assert sorted(indices[0].tolist()) == [5, 6]
    expected = scores[indices[0]] / (scores[indices[0]].sum() + 1e-20) * router.routed_scaling_factor
    if not router.norm_topk_prob:
        expected = scores[indices[0]] * router.routed_scaling_factor
    assert torch.allclose(weights[0], expected)


def test_bias_changes_selection_not_the_weights_of_a_selection_switch():
    router, x_TH, logits = hand_router("switch_transformers")  # top-1 with capacity
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 3.5, 0.0]))  # -1 + 3.5 > 2
    dispatch, top1_prob, _ = router(x_TH[None])
    assert dispatch.reshape(-1).tolist() == [0, 0, 0, 0, 1, 0]
    assert torch.allclose(top1_prob.reshape(()), logits.softmax(dim=-1)[4])
    _, indices = choices(router, x_TH)
    assert indices.tolist() == [[4]]


# --------------------------------------------------------------------------------------------
# (3) Persistence: state dict, save_pretrained / from_pretrained, dtype, remote code
# --------------------------------------------------------------------------------------------


def trained_biases(model) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    for _, router in routers_of(model):
        for _ in range(3):
            router.update_expert_bias(torch.randint(0, 50, (int(router.num_experts),), generator=generator))
    return {name: router.selection_bias().clone() for name, router in routers_of(model)}


@pytest.mark.parametrize("router_name", ["linear", "l2r"])
def test_bias_round_trips_through_state_dict_and_save_pretrained(family, router_name, tmp_path):
    skip_prototype_with_gate_bias(family, router_name)
    config = with_bias(ROUTERS[router_name], 1e-2, expert_bias_rule="proportional", expert_bias_clamp=0.7)
    model = H.patch_moe_routers(tiny_model(family), config).eval()
    biases = trained_biases(model)
    state = model.state_dict()
    for name, bias in biases.items():
        assert torch.equal(state[f"{name}.{bias_key(family)}"], bias)
        assert bias.dtype == torch.float32 and bool(bias.ne(0).any())
    fresh = H.patch_moe_routers(tiny_model(family), config)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.get_submodule(n).selection_bias(), b) for n, b in biases.items())

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["moe_router"] == config.to_dict()
    loaded = realign(auto_class(family).from_pretrained(tmp_path).eval())
    assert loaded.config.router_config == config
    for name, bias in biases.items():
        assert torch.equal(loaded.get_submodule(name).selection_bias(), bias)
    inputs = model_inputs(family)
    with torch.no_grad():
        assert torch.equal(realign(model)(**inputs).logits, loaded(**inputs).logits)
    # Loading in bf16 and casting the model keep the bias in float32, exactly.
    half = auto_class(family).from_pretrained(tmp_path, dtype=torch.bfloat16)
    half.to(torch.float16)
    for name, bias in biases.items():
        assert half.get_submodule(name).selection_bias().dtype == torch.float32
        assert torch.equal(half.get_submodule(name).selection_bias(), bias)


def test_enabling_the_bias_on_a_checkpoint_without_one_starts_at_zero(tmp_path):
    model = H.patch_moe_routers(tiny_model("mixtral"), H.LinearRouterConfig())
    model.save_pretrained(tmp_path)
    config = H.LinearRouterConfig(expert_bias_update_rate=1e-3)
    loaded = H.RoutedMixtralForCausalLM.from_pretrained(tmp_path, moe_router=config.to_dict())
    for _, router in routers_of(loaded):
        assert torch.equal(router.expert_bias, torch.zeros(6))
    built = H.RoutedMixtralForCausalLM(routed_config("mixtral", config))
    assert all(torch.equal(router.expert_bias, torch.zeros(6)) for _, router in routers_of(built))


REMOTE_SCRIPT = """
    import sys
    sys.modules["hf_moe_routers"] = None  # the remote code alone
    import json, torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    results = {}
    for name, case in json.loads(sys.argv[1]).items():
        cls = AutoModelForSeq2SeqLM if case["family"] == "switch_transformers" else AutoModelForCausalLM
        model = cls.from_pretrained(case["repo"], trust_remote_code=True).eval()
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                tensor.data = tensor.data.clone()
        ref = torch.load(case["ref"])
        state = model.state_dict()
        with torch.no_grad():
            logits = model(**ref["inputs"]).logits
        results[name] = {
            "module": type(model).__module__,
            "biases_equal": all(torch.equal(state[k], v) for k, v in ref["biases"].items()),
            "logits_equal": torch.equal(logits, ref["logits"]),
        }
    print(json.dumps(results))
"""


def test_bias_ships_in_remote_code(tmp_path):
    cases = {}
    for family, config in [
        ("mixtral", H.L2RConfig(rank=4, num_anchors=2, expert_bias_update_rate=1e-2)),
        ("deepseek_v3", H.LinearRouterConfig(expert_bias_update_rate=1e-2)),
        ("switch_transformers", H.CosineRouterConfig(dim=6, expert_bias_update_rate=1e-2)),
    ]:
        model = H.patch_moe_routers(tiny_model(family), config).eval()
        biases = {f"{n}.{bias_key(family)}": b for n, b in trained_biases(model).items()}
        repo = tmp_path / family
        model.save_pretrained(repo)
        inputs = model_inputs(family)
        with torch.no_grad():
            logits = realign(model)(**inputs).logits
        torch.save({"inputs": inputs, "logits": logits, "biases": biases}, tmp_path / f"{family}.pt")
        cases[family] = {"family": family, "repo": str(repo), "ref": str(tmp_path / f"{family}.pt")}
    env = {
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(REMOTE_SCRIPT), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for family, got in results.items():
        assert got["module"].startswith("transformers_modules."), family
        assert got["biases_equal"] and got["logits_equal"], (family, got)


# --------------------------------------------------------------------------------------------
# (4) Every family x router type builds with the option and selects with the bias
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router_name", list(ROUTERS))
def test_every_family_and_router_selects_with_the_bias(family, router_name):
    skip_prototype_with_gate_bias(family, router_name)
    plain = H.patch_moe_routers(tiny_model(family), ROUTERS[router_name]).eval()
    model = H.patch_moe_routers(tiny_model(family), with_bias(ROUTERS[router_name])).eval()
    model.load_state_dict(plain.state_dict(), strict=False)  # same routers, bias zero
    routers = routers_of(model)
    assert routers
    for name, router in routers:
        bias = router.selection_bias()
        assert router.expert_bias_enabled and bias.dtype == torch.float32 and not bias.requires_grad
        assert f"{name}.{bias_key(family)}" in model.state_dict()
        assert torch.equal(bias, torch.zeros(int(router.num_experts)))
    inputs = model_inputs(family)
    with torch.no_grad():  # a zero bias routes as no bias does
        assert torch.equal(model(**inputs).logits, plain(**inputs).logits)

    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output):
            adapter = family_for_router(module)
            logits = adapter.output_logits(output, int(module.num_experts))
            captured[name] = adapter.output_indices(
                output, logits, adapter.router_top_k(module), router=module
            )

        return record

    handles = [router.register_forward_hook(hook(name)) for name, router in routers]
    favourite = 3
    with torch.no_grad():
        for _, router in routers:
            router.selection_bias()[favourite] = 100.0
        biased = model(**inputs).logits
    for handle in handles:
        handle.remove()
    assert not torch.equal(biased, plain(**inputs).logits)
    assert set(captured) == {name for name, _ in routers}
    for name, indices in captured.items():
        assert bool((indices == favourite).any(dim=-1).all()), name  # every token picks the favourite

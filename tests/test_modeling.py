"""Routed model classes: Auto registration, from-scratch init, save/load fidelity, fresh processes."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, HIDDEN, model_inputs, tiny_config, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

import hf_moe_routers as H
from hf_moe_routers import metrics as M
from hf_moe_routers.modeling import FAMILIES as ADAPTERS
from hf_moe_routers.modeling import RoutedRouterMixin, supported_families
from hf_moe_routers.reporting import RouterCollector, find_routers, routing_scoring

ROUTERS = {
    "linear": H.LinearRouterConfig(),
    "sr_moe": H.SRMoEConfig(spectral_mode="constrain", sigma_method="power"),
    "prototype": H.SRMoEConfig(scoring="prototype"),
    "l2r": H.L2RConfig(rank=8, num_anchors=3),
    "cosine": H.CosineRouterConfig(dim=6),
}


def realign(model):
    """Copy every tensor into a fresh allocation. safetensors loads zero-copy views at whatever
    byte offset the file gives, and CPU BLAS rounds differently for unaligned operands (seen on
    Qwen2-MoE's 1-row shared_expert_gate), so bit-equality is checked on aligned copies; the
    state dicts themselves are compared bit for bit before."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    return model


def auto_class(family):
    return AutoModelForSeq2SeqLM if family == "switch_transformers" else AutoModelForCausalLM


def skip_prototype_with_gate_bias(family, router_name):
    if family == "gpt_oss" and router_name == "prototype":
        pytest.skip("prototype scoring cannot represent gpt-oss's gate bias (a clear error instead)")


def routed_config(family, router_config):
    host = tiny_config(family)
    data = {
        k: v
        for k, v in host.to_dict().items()
        if k not in ("model_type", "architectures", "transformers_version")
    }
    return ADAPTERS[family].routed_config_class(**data, moe_router=router_config.to_dict())


@pytest.mark.parametrize("router_name", list(ROUTERS))
def test_save_and_auto_load_give_identical_outputs(family, router_name, tmp_path):
    skip_prototype_with_gate_bias(family, router_name)
    model = H.patch_moe_routers(tiny_model(family), ROUTERS[router_name])
    model.train()
    for _ in range(2):  # a few training forwards move the power-iteration state away from its init
        model(**model_inputs(family, seed=5))
    model.eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"routed_{family}"
    assert saved["moe_router"] == ROUTERS[router_name].to_dict()
    loaded = auto_class(family).from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.config.router_config == ROUTERS[router_name]
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    realign(loaded)
    inputs = model_inputs(family, padded=family != "switch_transformers")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_fresh_process_loads_every_family_identically(tmp_path):
    """The issue's acceptance: a new process that imports hf_moe_routers restores identical logits."""
    expected = {}
    for family in FAMILIES:
        model = H.patch_moe_routers(tiny_model(family), H.L2RConfig(rank=8, num_anchors=2))
        folder = tmp_path / family
        model.save_pretrained(folder)
        inputs = model_inputs(family)
        torch.save(inputs, folder / "inputs.pt")
        with torch.no_grad():
            torch.save(model(**inputs).logits, folder / "expected.pt")
        expected[family] = folder
    script = textwrap.dedent(
        f"""
        import sys, torch
        import hf_moe_routers  # registers the routed model types
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
        for family, folder in {json.dumps({k: str(v) for k, v in expected.items()})}.items():
            cls = AutoModelForSeq2SeqLM if family == "switch_transformers" else AutoModelForCausalLM
            model = cls.from_pretrained(folder).eval()
            with torch.no_grad():  # aligned copies: see realign() in the test module
                for tensor in list(model.parameters()) + list(model.buffers()):
                    tensor.data = tensor.data.clone()
            if family != "switch_transformers":  # Switch experts have no experts interface
                assert model.config._experts_implementation == "grouped_mm", model.config._experts_implementation
            with torch.no_grad():
                logits = model(**torch.load(folder + "/inputs.pt")).logits
            assert torch.equal(logits, torch.load(folder + "/expected.pt")), family
            print("ok", family, type(model).__name__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "HF_HUB_OFFLINE": "1",
            "PATH": "/usr/bin:/bin",
            "HF_MODULES_CACHE": os.environ["HF_MODULES_CACHE"],
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok ") == len(FAMILIES)


@pytest.mark.parametrize("router_name", ["sr_moe", "prototype", "l2r", "cosine"])
def test_from_scratch_initialises_every_router_parameter(family, router_name):
    skip_prototype_with_gate_bias(family, router_name)
    torch.manual_seed(0)
    config = routed_config(family, ROUTERS[router_name])
    model = auto_class(family).from_config(config)
    routers = [m for m in model.modules() if isinstance(m, RoutedRouterMixin)]
    assert routers
    for router in routers:
        assert not hasattr(router, "weight") or router_name in ("sr_moe",)
        for name, tensor in list(router.scorer.named_parameters()) + list(router.scorer.named_buffers()):
            assert torch.isfinite(tensor).all(), name
            assert tensor.abs().max() < 50, (name, tensor.abs().max())  # torch.empty garbage is ~1e30
        if router_name == "sr_moe":
            # c and the power vector are "not set" until the router first runs (so the meta-device
            # init path gives the same buffers as __init__); then c = σ of the matrix it starts from.
            assert float(router.scorer.spectral_bound) == 0.0 and not router.scorer.power_u.any()
        if router_name == "l2r":
            norms = router.scorer.anchors.detach().norm(dim=-1)
            torch.testing.assert_close(norms, torch.ones_like(norms))  # unit anchors at init
    out = model(**model_inputs(family), output_router_logits=True)
    assert torch.isfinite(out.logits).all()
    if router_name == "sr_moe":
        for router in routers:
            matrix = router.scorer.weight.detach()
            torch.testing.assert_close(router.scorer.spectral_bound, torch.linalg.matrix_norm(matrix, ord=2))
            top_u = torch.linalg.svd(matrix, full_matrices=False).U[:, 0]
            assert abs(float(router.scorer.power_u @ top_u)) == pytest.approx(1.0, abs=1e-5)


def test_vanilla_checkpoint_loads_into_routed_class_with_initialised_routers(tmp_path):
    vanilla = tiny_model("mixtral")
    vanilla.save_pretrained(tmp_path)
    config = routed_config("mixtral", H.L2RConfig(rank=8, num_anchors=2))
    model = H.RoutedMixtralForCausalLM.from_pretrained(tmp_path, config=config)
    for name, param in model.named_parameters():
        if ".gate.scorer." in name:
            assert torch.isfinite(param).all() and param.abs().max() < 50, name
        else:
            torch.testing.assert_close(param, vanilla.get_parameter(name), msg=name)  # legacy keys converted


def test_auto_classes_are_registered():
    for family in FAMILIES:
        routed_type = ADAPTERS[family].routed_model_type
        config = AutoConfig.for_model(routed_type)
        assert type(config) is ADAPTERS[family].routed_config_class
        assert config.router_config == H.LinearRouterConfig()
    base = AutoModel.from_config(routed_config("olmoe", ROUTERS["cosine"]))
    assert type(base).__name__ == "RoutedOlmoeModel"


def test_routed_config_validates_router_and_top_k():
    with pytest.raises(ValueError, match="L2RConfig.rank must be >= 1"):
        routed_config("mixtral", H.LinearRouterConfig()).__class__(
            moe_router={"router_type": "l2r", "rank": 0}
        )
    with pytest.raises(ValueError, match="top_k"):
        H.RoutedQwen3MoeConfig(num_experts=4, num_experts_per_tok=5)


def test_routed_config_json_round_trip():
    config = routed_config("qwen2_moe", ROUTERS["l2r"])
    restored = H.RoutedQwen2MoeConfig.from_dict(json.loads(config.to_json_string()))
    assert restored.router_config == ROUTERS["l2r"]
    assert restored.model_type == "routed_qwen2_moe"


def test_routed_models_default_to_our_kernel_on_cuda_with_triton(monkeypatch):
    import hf_moe_routers.kernels.experts as kernel_experts

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernel_experts, "triton_available", lambda: True)
    model = auto_class("mixtral").from_config(routed_config("mixtral", ROUTERS["l2r"]))
    assert model.config._experts_implementation == "hf_moe_routers"
    explicit = auto_class("mixtral").from_config(
        routed_config("mixtral", ROUTERS["l2r"]), experts_implementation="eager"
    )
    assert explicit.config._experts_implementation == "eager"
    # our experts implementation gives the eager result (on CPU it runs its torch path)
    inputs = model_inputs("mixtral")
    explicit.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, explicit(**inputs).logits, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(kernel_experts, "triton_available", lambda: False)  # CUDA without Triton: fall back
    fallback = auto_class("mixtral").from_config(routed_config("mixtral", ROUTERS["l2r"]))
    assert fallback.config._experts_implementation == "grouped_mm"


# --------------------------------------------------------------------------------------------
# The family adapter: the only place that knows a family, checked against transformers' own code
# --------------------------------------------------------------------------------------------


def test_the_fixtures_cover_every_supported_family():
    assert sorted(FAMILIES) == supported_families()


def _host_router(model, adapter):
    return next(m for m in model.modules() if type(m) is adapter.host_router_class)


def test_adapter_describes_the_family_router(family):
    adapter = ADAPTERS[family]
    model = tiny_model(family)
    # transformers records router_logits from the adapter's router class, at the adapter's index
    recorder = next(
        spec["router_logits"]
        for module in model.modules()
        if "router_logits" in (spec := getattr(type(module), "_can_record_outputs", None) or {})
    )
    assert recorder.target_class is adapter.host_router_class
    assert (recorder.index or 0) == adapter.logits_index
    router = _host_router(model, adapter)
    assert adapter.routed_router_class.host_gate_attributes == adapter.gate_attributes
    assert all(getattr(router, name, None) is not None for name in adapter.gate_attributes)
    num_experts, top_k = adapter.num_experts(model.config), adapter.top_k(model.config)
    x_TH = torch.randn(9, HIDDEN)
    with torch.no_grad():
        output = adapter.call_router(router, x_TH)
    logits_TE = adapter.output_logits(output, num_experts)
    weight, bias = adapter.dense_gate(router)
    assert weight is adapter.gate_matrix(router)
    expected_TE = F.linear(x_TH, weight.float(), None if bias is None else bias.float())
    torch.testing.assert_close(logits_TE.float(), expected_TE)
    assert adapter.router_top_k(router) == top_k
    indices_TK = adapter.output_indices(output, logits_TE, top_k)
    assert indices_TK.shape == (9, top_k) and not indices_TK.is_floating_point()
    if adapter.indices_index is None:  # Switch: the expert of the one-hot dispatch mask (no token dropped)
        assert torch.equal(output[0].reshape(9, num_experts).argmax(-1), indices_TK[:, 0])
    # the collector reads host and routed models through the adapter
    patched = H.patch_moe_routers(tiny_model(family), H.L2RConfig(rank=4, num_anchors=1))
    for candidate in (model, patched):
        infos = find_routers(candidate)
        assert infos and all(
            info.adapter is adapter and info.top_k == top_k and info.logits_index == adapter.logits_index
            for info in infos
        )
        assert routing_scoring(candidate) == adapter.balance_scoring
        assert infos[0].gate_matrix().shape[-1] == HIDDEN
        assert infos[0].logits(x_TH).shape == (9, num_experts)
        collector = RouterCollector(candidate)
        collector.start()
        with torch.no_grad():
            candidate(**model_inputs(family))
        captures = collector.stop()
        collector.remove()
        assert all(c is not None and c.indices_TK.shape[1] == top_k for c in captures)


def _family_module(router):
    return importlib.import_module(type(router).__module__)


@pytest.mark.parametrize("seed", [0, 1])
def test_balance_probabilities_follow_the_family_code(family, seed):
    """Each adapter's balance rule against transformers' code path of that family: its
    load_balancing_loss_func (softmax families), its router's own weights (DeepSeek-V3: sigmoid
    scores normalised over all experts; gpt-oss: softmax over the selected logits), or its model's
    encoder aux loss (Switch). A wrong rule fails here."""
    adapter = ADAPTERS[family]
    torch.manual_seed(seed)
    x_TH = torch.randn(40, HIDDEN)
    overrides = {}
    if family == "switch_transformers":
        # transformers computes Switch's aux loss only with sparse layers every other block
        overrides = dict(num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)
    model = tiny_model(family, seed=seed, **overrides)
    router = _host_router(model, adapter)
    num_experts, top_k = adapter.num_experts(model.config), adapter.top_k(model.config)
    with torch.no_grad():
        output = adapter.call_router(router, x_TH)
    logits_TE = adapter.output_logits(output, num_experts)
    indices_TK = adapter.output_indices(output, logits_TE, top_k)
    probs_TE = adapter.balance_probabilities(logits_TE, indices_TK)
    assert probs_TE.dtype == torch.float32 and probs_TE.shape == logits_TE.shape
    torch.testing.assert_close(probs_TE.sum(-1), torch.ones(40))
    # the metrics' routing_probs (what the Trainer uses) applies the same rule under the same name
    assert torch.equal(probs_TE, M.routing_probs(logits_TE, adapter.balance_scoring, indices_TK))

    # The reference is chosen by family name, not by the adapter's data under test.
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        expected = _family_module(router).load_balancing_loss_func((logits_TE,), num_experts, top_k)
        ours = M.load_balance_loss(logits_TE, indices_TK, probs=probs_TE)
        torch.testing.assert_close(ours, expected)
    elif family == "deepseek_v3":
        # The router's own weights with every expert chosen, one group, renormalised, unscaled:
        # sigmoid scores normalised over all experts.
        router.top_k, router.num_group, router.topk_group = num_experts, 1, 1
        router.norm_topk_prob, router.routed_scaling_factor = True, 1.0
        with torch.no_grad():
            _, weights_TK, chosen_TK = router(x_TH)
        expected_TE = torch.zeros_like(logits_TE).scatter(-1, chosen_TK, weights_TK)
        torch.testing.assert_close(probs_TE, expected_TE)
    elif family == "gpt_oss":
        with torch.no_grad():
            _, weights_TK, chosen_TK = router(x_TH)  # softmax over the top-k logits
        assert torch.equal(chosen_TK, indices_TK)
        expected_TE = torch.zeros_like(logits_TE).scatter(-1, chosen_TK, weights_TK.float())
        torch.testing.assert_close(probs_TE, expected_TE)
    elif family == "switch_transformers":
        with torch.no_grad():
            _, top1_prob, _ = router(x_TH.unsqueeze(0))  # the router's own softmax, its maximum
        torch.testing.assert_close(probs_TE.max(-1).values, top1_prob.reshape(-1))
        inputs = model_inputs(family)
        with torch.no_grad():
            out = model(**inputs, labels=inputs["decoder_input_ids"], output_router_logits=True)
        logits_BSE = torch.cat(out.encoder_router_logits, dim=1)
        probs_BSE = adapter.balance_probabilities(logits_BSE).reshape(logits_BSE.shape)
        loss = _family_module(router).load_balancing_loss_func(probs_BSE, logits_BSE.argmax(-1))
        torch.testing.assert_close(loss, out.encoder_aux_loss)
    else:
        pytest.fail(f"no transformers reference for {family}'s balance rule")

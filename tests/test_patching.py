"""patch_moe_routers on tiny models of every family: fidelity, isolation, transformers features."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    CAUSAL_FAMILIES,
    EXPERTS,
    FAMILIES,
    HIDDEN,
    MODEL_CLASSES,
    model_inputs,
    tiny_config,
    tiny_model,
    with_selection_bias,
)
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import hf_moe_routers as H
from hf_moe_routers.modeling import RoutedRouterMixin


def router_logits_of(output, family):
    if family == "switch_transformers":
        return list(output.encoder_router_logits) + list(output.decoder_router_logits)
    return list(output.router_logits)


def patched_copy(family, router_config, **kwargs):
    reference = tiny_model(family)
    model = tiny_model(family)
    return reference, H.patch_moe_routers(model, router_config, **kwargs)


def skip_prototype_with_gate_bias(family, router_config):
    if family == "gpt_oss" and getattr(router_config, "scoring", None) == "prototype":
        pytest.skip("prototype scoring cannot represent gpt-oss's gate bias (patching refuses it)")


#: Routers per model of tests/conftest.py's tiny configs: DeepSeek-V3's first layer is dense
#: (first_k_dense_replace=1), Switch has an encoder and a decoder stack of two sparse layers each.
NUM_ROUTERS = {"deepseek_v3": 1, "switch_transformers": 4}


@pytest.mark.parametrize("router_config", [H.LinearRouterConfig(), H.SRMoEConfig()], ids=["linear", "sr_moe"])
def test_linear_and_default_sr_moe_are_bit_identical(family, router_config):
    # A non-zero DeepSeek-V3 selection bias, which the routed router must keep using to choose.
    reference = with_selection_bias(tiny_model(family))
    model = H.patch_moe_routers(with_selection_bias(tiny_model(family)), router_config)
    inputs = model_inputs(family, padded=family != "switch_transformers")
    with torch.no_grad():
        ref = reference(**inputs, output_router_logits=True)
        out = model(**inputs, output_router_logits=True)
    assert torch.equal(out.logits, ref.logits)
    ref_logits, new_logits = router_logits_of(ref, family), router_logits_of(out, family)
    assert len(new_logits) == len(ref_logits) > 0
    for a, b in zip(new_logits, ref_logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family_name", CAUSAL_FAMILIES)
def test_linear_is_bit_identical_in_bf16_and_under_autocast(family_name):
    reference, model = patched_copy(family_name, H.LinearRouterConfig())
    inputs = model_inputs(family_name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)
    reference, model = reference.to(torch.bfloat16), model.to(torch.bfloat16)
    with torch.no_grad():
        ref = reference(**inputs, output_router_logits=True)
        out = model(**inputs, output_router_logits=True)
    assert torch.equal(out.logits, ref.logits)
    assert all(torch.equal(a, b) for a, b in zip(out.router_logits, ref.router_logits))


@pytest.mark.parametrize(
    "router_config",
    [H.L2RConfig(rank=8, num_anchors=2), H.CosineRouterConfig(dim=8), H.SRMoEConfig(scoring="prototype")],
    ids=["l2r", "cosine", "prototype"],
)
def test_new_routers_are_recorded_and_float32_under_bf16_autocast(family, router_config):
    skip_prototype_with_gate_bias(family, router_config)
    _, model = patched_copy(family, router_config)
    routers = [m for m in model.modules() if isinstance(m, RoutedRouterMixin)]
    assert routers and all(type(r.scorer).config_class is type(router_config) for r in routers)
    seen = []
    index = 2 if family == "switch_transformers" else 0
    handles = [r.register_forward_hook(lambda mod, args, out: seen.append(out[index])) for r in routers]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**model_inputs(family), output_router_logits=True)
    for handle in handles:
        handle.remove()
    recorded = router_logits_of(out, family)
    assert len(recorded) == len(routers) == NUM_ROUTERS.get(family, 2)
    # every recorded entry is one of our routers' float32 logits
    for entry in recorded:
        assert entry.dtype == torch.float32
        assert any(entry.shape == s.shape and torch.equal(entry, s) for s in seen)
    assert torch.isfinite(out.logits.float()).all()


@pytest.mark.parametrize("family_name", CAUSAL_FAMILIES)
def test_aux_loss_is_added_with_padding_mask(family_name):
    if family_name == "deepseek_v3":
        pytest.skip("DeepSeek-V3 balances with its selection bias: transformers adds no aux loss")
    _, model = patched_copy(family_name, H.L2RConfig(rank=8, num_anchors=2))
    inputs = model_inputs(family_name, padded=True)
    labels = inputs["input_ids"].clone()
    out = model(**inputs, labels=labels, output_router_logits=True)
    k = model.config.num_experts_per_tok
    expected_aux = load_balancing_loss_func(out.router_logits, EXPERTS, k, inputs["attention_mask"])
    torch.testing.assert_close(out.aux_loss, expected_aux)
    plain = model(**inputs, labels=labels, output_router_logits=False)
    assert plain.aux_loss is None
    torch.testing.assert_close(out.loss, plain.loss + model.config.router_aux_loss_coef * expected_aux)
    out.loss.backward()
    router = next(m for m in model.modules() if isinstance(m, RoutedRouterMixin))
    assert router.scorer.query_proj.grad is not None and router.scorer.query_proj.grad.abs().sum() > 0


def test_generation_works(family):
    _, model = patched_copy(family, H.L2RConfig(rank=8, num_anchors=2))
    inputs = model_inputs(family)
    inputs.pop("decoder_input_ids", None)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == 2 and generated.shape[1] >= 4


def test_patch_reports_agreement_and_distillation_raises_it():
    model = tiny_model("mixtral", gate_std=0.5)
    batches = [model_inputs("mixtral", batch=4, seq=16, seed=s) for s in range(2)]
    model, report = H.patch_moe_routers(
        model, H.L2RConfig(rank=6, num_anchors=4), calibration_batches=batches, return_report=True
    )
    assert report.source == "calibration batches" and len(report.layers) == 2
    assert 0.5 < report.mean_topk_agreement < 1.0
    assert model.router_patch_report is report
    after = H.distill_router(model, batches, steps=150)
    assert after.mean_topk_agreement > report.mean_topk_agreement
    # only router parameters moved
    reference = tiny_model("mixtral", gate_std=0.5)
    for name, param in model.named_parameters():
        if ".gate." not in name:
            assert torch.equal(param, reference.get_parameter(name)), name


def test_distilling_a_router_that_starts_exact_keeps_it_exact():
    # SR-MoE linear copies the gate: the KL starts at rounding noise, which Adam turns into
    # lr-sized steps; keep_best measures the KL before and after and keeps the exact start.
    batches = [model_inputs("mixtral", batch=4, seq=16, seed=s) for s in range(2)]

    def distilled(keep_best):
        model = H.patch_moe_routers(tiny_model("mixtral", gate_std=0.5), H.SRMoEConfig())
        start = {n: p.detach().clone() for n, p in model.named_parameters() if ".scorer." in n}
        H.distill_router(model, batches, steps=30, lr=1e-2, keep_best=keep_best)
        return [torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start]

    assert all(distilled(keep_best=True))
    assert not all(distilled(keep_best=False))  # the pathology keep_best guards against


def test_distillation_that_improves_the_fit_is_kept():
    model = tiny_model("mixtral", gate_std=0.5)
    batches = [model_inputs("mixtral", batch=4, seq=16, seed=s) for s in range(2)]
    model = H.patch_moe_routers(model, H.L2RConfig(rank=6, num_anchors=4))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if ".scorer." in n}
    H.distill_router(model, batches, steps=50)
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)


def test_report_on_random_inputs_and_given_hidden_states():
    _, (model, report) = None, H.patch_moe_routers(tiny_model("olmoe"), H.SRMoEConfig(), return_report=True)
    assert report.mean_topk_agreement == 1.0 and "random" in report.source
    model = tiny_model("olmoe")
    _, report = H.patch_moe_routers(
        model, H.CosineRouterConfig(dim=4), hidden_states=torch.randn(50, HIDDEN), return_report=True
    )
    assert report.source == "given hidden states" and 0.0 < report.mean_topk_agreement <= 1.0


def test_patching_touches_no_other_model_or_config():
    config = tiny_config("mixtral")
    first = MODEL_CLASSES["mixtral"](config)
    H.patch_moe_routers(first, H.L2RConfig(rank=4, num_anchors=2))
    assert type(config).__name__ == "MixtralConfig" and config.model_type == "mixtral"
    other = MODEL_CLASSES["mixtral"](config)
    assert type(other).__name__ == "MixtralForCausalLM"
    assert type(other.model.layers[0].mlp.gate).__name__ == "MixtralTopKRouter"
    inputs = model_inputs("mixtral")
    out = other(**inputs, labels=inputs["input_ids"], output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (14, EXPERTS)
    # the patched model's experts read the routed config object
    assert first.model.layers[0].mlp.experts.config is first.config


def test_unsupported_model_names_supported_families():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError) as info:
        H.patch_moe_routers(model, H.L2RConfig(rank=4))
    message = str(info.value)
    assert "model_type='gpt2'" in message
    for name in FAMILIES:
        assert name in message


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="already patched"):
        H.patch_moe_routers(H.patch_moe_routers(tiny_model("mixtral"), H.SRMoEConfig()), H.SRMoEConfig())
    with pytest.raises(ValueError, match="hidden size 32; got 64"):
        H.patch_moe_routers(tiny_model("mixtral"), H.L2RConfig(rank=64))
    with pytest.raises(ValueError, match="router_type must be one of"):
        H.patch_moe_routers(tiny_model("mixtral"), {"router_type": "hash"})
    with pytest.raises(ValueError, match="top_k"):
        H.patch_moe_routers(tiny_model("mixtral", num_experts_per_tok=EXPERTS + 1), H.SRMoEConfig())
    model = tiny_model("mixtral")
    model._use_kernels = True
    with pytest.raises(ValueError, match="use_kernels"):
        H.patch_moe_routers(model, H.SRMoEConfig())
    model = H.patch_moe_routers(tiny_model("mixtral"), H.L2RConfig(rank=4), keep_reference=False)
    with pytest.raises(ValueError, match="keep_reference=True"):
        H.distill_router(model, model_inputs("mixtral"), steps=1)


def test_nan_hidden_states_raise_a_clear_error():
    model = H.patch_moe_routers(tiny_model("qwen3_moe"), H.L2RConfig(rank=4))
    embeds = torch.randn(1, 5, HIDDEN)
    embeds[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(inputs_embeds=embeds)
    model = H.patch_moe_routers(tiny_model("qwen3_moe"), H.L2RConfig(rank=4, check_finite=False))
    model(inputs_embeds=embeds)  # opted out: no check, NaN flows through


def test_experts_keep_the_fast_implementation(family):
    if family == "switch_transformers":
        pytest.skip("Switch experts are a ModuleDict without the experts interface")
    _, model = patched_copy(family, H.L2RConfig(rank=4))
    assert model.config._experts_implementation == "grouped_mm"
    model.set_experts_implementation("batched_mm")
    assert model.config._experts_implementation == "batched_mm"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_input_check_catches_every_non_finite_value(bad, dtype):
    """The router's finiteness check (min/max reductions) sees one bad value among finite ones."""
    model = H.patch_moe_routers(tiny_model("mixtral"), H.LinearRouterConfig())
    router = next(m for m in model.modules() if isinstance(m, RoutedRouterMixin)).to(dtype)
    x_TH = torch.randn(7, HIDDEN, dtype=dtype)
    router.router_logits(x_TH)  # finite: passes
    router.router_logits(x_TH[:0])  # no tokens: nothing to check
    x_TH[4, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        router.router_logits(x_TH)

"""DeepSeek-V3 (sigmoid, group-limited top-k, selection bias) and gpt-oss (top-k then softmax, bias)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import EXTRA_FAMILIES, RandomTokens, model_inputs, tiny_model
from transformers import AutoModelForCausalLM

import hf_moe_routers as H
from hf_moe_routers.modeling import RoutedRouterMixin
from hf_moe_routers.trainers import MoERouterTrainer, MoERouterTrainingArguments


@pytest.fixture(params=EXTRA_FAMILIES)
def extra_family(request) -> str:
    return request.param


def _with_correction_bias(model):
    """A non-zero DeepSeek selection bias, so the test sees it steer the choice."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.linspace(-0.3, 0.3, buffer.numel()))
    return model


@pytest.mark.parametrize("router_config", [H.LinearRouterConfig(), H.SRMoEConfig()], ids=["linear", "sr_moe"])
def test_linear_and_default_sr_moe_are_bit_identical(extra_family, router_config):
    reference = _with_correction_bias(tiny_model(extra_family))
    model = H.patch_moe_routers(_with_correction_bias(tiny_model(extra_family)), router_config)
    inputs = model_inputs(extra_family, padded=True)
    with torch.no_grad():
        ref = reference(**inputs, output_router_logits=True)
        out = model(**inputs, output_router_logits=True)
    assert torch.equal(out.logits, ref.logits)
    assert len(out.router_logits) == len(ref.router_logits) > 0
    assert all(torch.equal(a, b) for a, b in zip(out.router_logits, ref.router_logits))


def test_save_load_and_generate(extra_family, tmp_path):
    model = H.patch_moe_routers(tiny_model(extra_family), H.L2RConfig(rank=8, num_anchors=2))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    for tensor in list(loaded.parameters()) + list(loaded.buffers()):
        tensor.data = tensor.data.clone()  # aligned copies, see tests/test_modeling.py
    inputs = model_inputs(extra_family)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    generated = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_deepseek_selection_bias_steers_choice_not_weights():
    model = H.patch_moe_routers(tiny_model("deepseek_v3"), H.L2RConfig(rank=8, num_anchors=1))
    router = next(m for m in model.modules() if isinstance(m, RoutedRouterMixin))
    x = torch.randn(50, 32)
    _, weights_before, chosen_before = router(x)
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
        router.e_score_correction_bias[0] = 10.0  # expert 0 always wins the choice ...
    logits, weights, chosen = router(x)
    assert (chosen == 0).any(dim=-1).all()
    scores = logits.sigmoid().gather(1, chosen)
    expected = scores / (scores.sum(-1, keepdim=True) + 1e-20) * router.routed_scaling_factor
    torch.testing.assert_close(weights, expected)  # ... but its weight is its uncorrected score


def test_trainer_uses_the_family_probabilities(extra_family, tmp_path):
    model = H.patch_moe_routers(tiny_model(extra_family), H.SRMoEConfig())
    args = MoERouterTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        router_plots=False,
        router_balance_loss_weight=0.01,
    )
    trainer = MoERouterTrainer(model=model, args=args, train_dataset=RandomTokens(8))
    assert trainer._scoring == {"deepseek_v3": "sigmoid", "gpt_oss": "topk_softmax"}[extra_family]
    trainer.train()
    logs = next(h for h in trainer.state.log_history if "router/aux_loss" in h)
    assert (
        math.isfinite(logs["loss"]) and math.isfinite(logs["router/aux_loss"]) and logs["router/reg_loss"] > 0
    )

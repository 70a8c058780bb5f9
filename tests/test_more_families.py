"""What only DeepSeek-V3 (sigmoid, group-limited top-k, selection bias) and gpt-oss (top-k then
softmax, gate bias) do. Both also run through every family-parametrised test (the ``family`` fixture
of tests/conftest.py): bit-identity, save/load, generation, init."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import RandomTokens, tiny_model

import hf_moe_routers as H
from hf_moe_routers.modeling import FAMILIES as ADAPTERS
from hf_moe_routers.modeling import RoutedRouterMixin
from hf_moe_routers.trainers import MoERouterTrainer, MoERouterTrainingArguments

#: The families whose balance probabilities are not a softmax over every expert.
NON_SOFTMAX_FAMILIES = ("deepseek_v3", "gpt_oss")


@pytest.fixture(params=NON_SOFTMAX_FAMILIES)
def extra_family(request) -> str:
    return request.param


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
    assert trainer._scoring == ADAPTERS[extra_family].balance_scoring
    trainer.train()
    logs = next(h for h in trainer.state.log_history if "router/aux_loss" in h)
    assert (
        math.isfinite(logs["loss"]) and math.isfinite(logs["router/aux_loss"]) and logs["router/reg_loss"] > 0
    )

"""PEFT workflows on routed models: LoRA on fused experts, trainable routers, adapters, merging."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import RandomTokens, model_inputs, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model

import hf_moe_routers as H
from hf_moe_routers.scripts.lora import LoraArguments, lora_config
from hf_moe_routers.trainers import MoERouterTrainer, MoERouterTrainingArguments

ROUTER = H.SRMoEConfig(spectral_bound=0.5, stable_rank_weight=0.1)


def patched_base(family="mixtral"):
    return H.patch_moe_routers(tiny_model(family), ROUTER, keep_reference=False)


def outputs(model, family="mixtral"):
    with torch.no_grad():
        return model(**model_inputs(family)).logits


def train(model, tmp_path, steps=3):
    args = MoERouterTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=steps,
        logging_steps=steps,
        learning_rate=5e-2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        router_plots=False,
    )
    trainer = MoERouterTrainer(model=model, args=args, train_dataset=RandomTokens(16))
    trainer.train()
    return trainer


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_lora_experts_trainable_routers_save_reload_merge(tmp_path, family):
    model = get_peft_model(patched_base(family), lora_config(LoraArguments(lora_r=4)))
    trainer = train(model, tmp_path / "run")
    logs = next(h for h in trainer.state.log_history if "router/reg_loss" in h)
    assert logs["router/reg_loss"] > 0 and math.isfinite(logs["router/spectral_norm"])
    # only the trainable router copies are tracked (PEFT's frozen originals never run)
    assert [r.layer for r in trainer.routers] == ["layer_0", "layer_1"]
    assert all(".modules_to_save.default" in r.name for r in trainer.routers)
    base = model.get_base_model()
    for layer in base.model.layers:
        wrapper = layer.mlp.gate
        trained, frozen = (
            wrapper.modules_to_save["default"].scorer.weight,
            wrapper.original_module.scorer.weight,
        )
        assert not torch.equal(trained, frozen)  # the router copy trained, the original did not
    model.eval()
    trained_logits = outputs(model, family)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(patched_base(family), tmp_path / "adapter").eval()
    assert torch.equal(outputs(reloaded, family), trained_logits)  # adapter + router copies restored exactly

    merged = reloaded.merge_and_unload().eval()
    assert type(merged).__name__.startswith("Routed")
    torch.testing.assert_close(outputs(merged, family), trained_logits, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again = type(merged).from_pretrained(tmp_path / "merged").eval()
    for tensor in list(again.parameters()) + list(again.buffers()):
        tensor.data = tensor.data.clone()  # aligned copies, see tests/test_modeling.py
    assert torch.equal(outputs(again, family), outputs(merged, family))


def test_penalty_is_computed_on_the_lora_adjusted_router_weight(tmp_path):
    """LoRA on the router weight itself: PEFT adds the delta only inside forward; the penalty the
    Trainer adds must be that of W + ΔW, not of the bare W."""
    config = LoraConfig(r=2, lora_alpha=2, target_modules=[], target_parameters=["mlp.gate.scorer.weight"])
    model = get_peft_model(patched_base(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)  # a visible delta
    args = MoERouterTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], router_plots=False
    )
    trainer = MoERouterTrainer(model=model, args=args, train_dataset=RandomTokens(4))
    collector = trainer._collector
    model.train()
    batch = {
        k: torch.stack([RandomTokens(4)[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask")
    }
    collector.start()
    model(**batch)
    captures = collector.stop()
    router = model.get_base_model().model.layers[0].mlp.gate
    scorer = router.base_scorer
    lora_a = next(p for n, p in model.named_parameters() if "layers.0" in n and "lora_A" in n)
    lora_b = next(p for n, p in model.named_parameters() if "layers.0" in n and "lora_B" in n)
    delta = (lora_b @ lora_a).reshape(scorer.weight.shape) * (2 / 2)
    effective = (scorer.weight + delta).detach()
    sigma = torch.linalg.matrix_norm(effective, ord=2)
    expected = torch.relu(sigma - scorer.spectral_bound * (1 + 1e-6)) ** 2
    bare = (
        torch.relu(
            torch.linalg.matrix_norm(scorer.weight.detach(), ord=2) - scorer.spectral_bound * (1 + 1e-6)
        )
        ** 2
    )
    captured = captures[0].penalty_terms["spectral"]
    assert not torch.allclose(expected, bare)  # the delta matters ...
    torch.testing.assert_close(captured.detach(), expected, rtol=1e-4, atol=1e-6)  # ... and is in the penalty
    assert captured.requires_grad  # and its gradient reaches the LoRA parameters
    captured.backward()
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0

"""Modular one-shot adaptation: only the selected experts change, and the numbers are the right ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_moe_routers.experiments.adaptation import (
    AdaptationBudget,
    AdaptationTarget,
    CausalLMTarget,
    VisionTarget,
    adapt_experts,
    adaptation_target,
    exposure,
    interference_pp,
    one_shot_episode,
    preserved_parameters,
    select_experts,
)
from hf_moe_routers.experiments.vision_model import MoEImageClassifier, MoEImageClassifierConfig


class ToyTarget(AdaptationTarget):
    """One MoE layer of two scalar experts; routing is given by the batch (``route [T, 2]``).

    Prediction = ``route @ experts > 0.5``; the loss pulls the routed output to the label. So a
    base example routed to expert 0 flips when expert 0 moves to 1, and one routed to expert 1
    cannot be affected by adapting expert 0: every number below is checkable by hand.
    """

    def __init__(self) -> None:
        self.model = nn.Module()
        self.model.experts = nn.Parameter(torch.zeros(2, 1))
        self.model.frozen = nn.Parameter(torch.ones(3))  # stands in for router / stem / head

    def expert_parameters(self):
        return [[self.model.experts]]

    @torch.no_grad()
    def routing_weights(self, batch):
        return [batch["route"].float()]

    def _output(self, batch):
        return (batch["route"] @ self.model.experts).squeeze(-1) * self.model.frozen[0]

    def loss(self, batch):
        return (self._output(batch) - batch["labels"].float()).pow(2).mean()

    @torch.no_grad()
    def correct_and_total(self, batch):
        pred = (self._output(batch) > 0.5).long()
        return int((pred == batch["labels"]).sum()), int(pred.numel())


def toy_batches():
    to_e0, to_e1 = [1.0, 0.0], [0.0, 1.0]
    base = {"route": torch.tensor([to_e0, to_e0, to_e1, to_e1]), "labels": torch.zeros(4, dtype=torch.long)}
    new = {"route": torch.tensor([to_e0, [0.8, 0.2]]), "labels": torch.ones(2, dtype=torch.long)}
    one_shot = {"route": torch.tensor([to_e0]), "labels": torch.ones(1, dtype=torch.long)}
    return base, new, one_shot


def test_budget_validation_names_the_field():
    for kwargs, field in (
        ({"steps": 0}, "steps"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"experts_per_layer": 0}, "experts_per_layer"),
        ({"momentum": 1.0}, "momentum"),
    ):
        with pytest.raises(ValueError, match=f"AdaptationBudget.{field}"):
            AdaptationBudget(**kwargs)


def test_interference_is_in_percentage_points():
    assert interference_pp(0.9, 0.85) == pytest.approx(-5.0)
    assert interference_pp(0.5, 0.5) == 0.0
    with pytest.raises(ValueError, match="accuracy_after"):
        interference_pp(0.5, 50.0)


def test_toy_episode_gives_the_hand_computed_numbers():
    target = ToyTarget()
    base, new, one_shot = toy_batches()
    # One SGD step on (e0 − 1)² with lr 0.5 moves e0 from 0 to exactly 1: the two base examples
    # routed to expert 0 flip (accuracy 1 → 0.5, −50 pp), the new class is learned (0 → 1).
    report = one_shot_episode(target, one_shot, base, new, AdaptationBudget(steps=1, learning_rate=0.5))
    assert report.selected == [[0]] and report.changed == [[0]] and report.num_changed == 1
    assert report.base_accuracy_before == 1.0 and report.base_accuracy_after == 0.5
    assert report.interference_pp == pytest.approx(-50.0)
    assert report.new_accuracy_before == 0.0 and report.new_accuracy_after == 1.0
    assert report.exposure == pytest.approx(0.5)  # half of the base routing weight is on expert 0
    assert report.losses == [pytest.approx(1.0)]
    assert torch.equal(target.model.experts, torch.zeros(2, 1))  # restored


def test_toy_episode_without_restore_keeps_the_change_and_freezes_the_rest():
    target = ToyTarget()
    base, new, one_shot = toy_batches()
    one_shot_episode(target, one_shot, base, new, AdaptationBudget(steps=1, learning_rate=0.5), restore=False)
    assert target.model.experts.flatten().tolist() == [1.0, 0.0]
    assert torch.equal(target.model.frozen, torch.ones(3))
    assert target.model.frozen.requires_grad and target.model.experts.requires_grad  # flags restored


def test_exposure_and_selection_on_constructed_weights():
    target = ToyTarget()
    batch = {
        "route": torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.1, 0.9]]),
        "labels": torch.zeros(3, dtype=torch.long),
    }
    assert select_experts(target, batch, 1) == [[0]]  # mean weights (0.533, 0.467)
    assert select_experts(target, batch, 2) == [[0, 1]]
    assert exposure(target, batch, [[0]]) == pytest.approx((0.5 + 1.0 + 0.1) / 3)
    assert exposure(target, [batch, batch], [[1]]) == pytest.approx((0.5 + 0.0 + 0.9) / 3)
    assert exposure(target, batch, [[]]) == 0.0
    with pytest.raises(ValueError, match="experts_per_layer"):
        select_experts(target, batch, 3)


def tiny_classifier(top_k=None, seed=0) -> MoEImageClassifier:
    config = MoEImageClassifierConfig(
        input_size=8, stem_channels=4, hidden_size=16, num_stages=3, num_experts=4, expert_intermediate_size=8,
        num_labels=5, top_k=top_k,
    )  # fmt: skip
    torch.manual_seed(seed)
    return MoEImageClassifier(config).eval()


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_vision_adaptation_changes_only_the_selected_expert_rows(top_k, momentum):
    model = tiny_classifier(top_k)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = VisionTarget(model, allowed_classes=[0, 1, 2, 4])
    batch = {"pixel_values": torch.randn(1, 8, 8), "labels": torch.tensor([4])}
    result = adapt_experts(target, batch, AdaptationBudget(steps=3, learning_rate=0.5, momentum=momentum))
    assert len(result.selected) == 3 and all(len(s) == 1 for s in result.selected)
    assert result.changed == result.selected
    assert result.losses[-1] < result.losses[0]
    for name, value in model.state_dict().items():
        if ".experts." not in name:
            assert torch.equal(value, before[name]), f"frozen {name} changed"
            continue
        stage = int(name.split(".")[1])
        moved = (value != before[name]).reshape(value.shape[0], -1).any(-1)
        expected = torch.zeros(4, dtype=torch.bool)
        expected[result.selected[stage]] = True
        assert torch.equal(moved, expected), name
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_vision_target_masks_classes_and_selection_follows_routing():
    model = tiny_classifier()
    x = torch.randn(6, 8, 8)
    target = VisionTarget(model, allowed_classes=[1, 3])
    pred_classes = set(target._logits({"pixel_values": x}).argmax(-1).tolist())
    assert pred_classes <= {1, 3}
    weights = model(x[:1]).routing_weights
    expected = [[int(w[0].argmax())] for w in weights]
    assert select_experts(target, {"pixel_values": x[:1]}, 1) == expected
    with pytest.raises(ValueError, match="allowed_classes"):
        VisionTarget(model, allowed_classes=[7])


def test_preserved_parameters_restores_everything():
    model = tiny_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with preserved_parameters(model), torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_causal_lm_adaptation_touches_only_selected_expert_slices():
    from transformers import AutoModelForCausalLM

    from hf_moe_routers import L2RConfig, RoutedOlmoeConfig

    config = RoutedOlmoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1,
        bos_token_id=None, moe_router=L2RConfig(rank=8, num_anchors=2).to_dict(),
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    target = adaptation_target(model)
    assert isinstance(target, CausalLMTarget) and target.num_experts() == [6, 6]
    ids = torch.randint(2, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    weights = target.routing_weights(batch)
    assert [tuple(w.shape) for w in weights] == [(12, 6), (12, 6)]
    assert ((weights[0] > 0).sum(-1) == 2).all()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = adapt_experts(target, batch, AdaptationBudget(steps=2, learning_rate=1.0, experts_per_layer=2))
    assert result.changed == result.selected and all(len(s) == 2 for s in result.selected)
    for name, value in model.state_dict().items():
        if ".mlp.experts." in name:
            layer = int(name.split(".")[2])
            moved = (value != before[name]).reshape(value.shape[0], -1).any(-1)
            assert moved.nonzero().flatten().tolist() == result.selected[layer], name
        else:
            assert torch.equal(value, before[name]), f"frozen {name} changed"
    correct, total = target.correct_and_total(batch)
    assert total == 11 and 0 <= correct <= 11


def test_unsupported_models_are_rejected_clearly():
    with pytest.raises(ValueError, match="routed causal LM"):
        adaptation_target(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="MoEImageClassifier"):
        VisionTarget(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unexpected options"):
        adaptation_target(nn.Linear(2, 2), allowed_classes=[0])

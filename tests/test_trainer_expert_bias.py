"""MoERouterTrainer and the aux-loss-free expert bias: per optimizer step, the routers' expert counts
(summed over micro-batches, padding excluded) go to ``update_expert_bias`` once, after the step.

Across processes the counts are summed too: tests/test_distributed.py (two gloo processes) checks
that both ranks end with the bias of one process on the concatenated batch.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import RandomTokens, tiny_model
from safetensors.torch import load_file

import hf_moe_routers as H
from hf_moe_routers.routers.base import expert_bias_delta
from hf_moe_routers.trainers import MoERouterTrainer, MoERouterTrainingArguments

RATE = 0.01
NUM_EXPERTS = 6  # conftest's tiny models


def biased_model(rule: str = "sign"):
    config = H.LinearRouterConfig(expert_bias_update_rate=RATE, expert_bias_rule=rule)
    return H.patch_moe_routers(tiny_model("mixtral"), config)


def make_args(tmp_path, **overrides) -> MoERouterTrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        router_plots=False,
        router_costly_metrics_interval=1000,
        train_sampling_strategy="sequential",
        seed=0,
    )
    kwargs.update(overrides)
    return MoERouterTrainingArguments(**kwargs)


class MaskRecordingTrainer(MoERouterTrainer):
    """Keeps the attention mask of every training micro-batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.masks: list[torch.Tensor] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.masks.append(inputs["attention_mask"].detach().clone())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_each_optimizer_step_passes_the_hand_summed_counts_once_after_the_step(tmp_path, monkeypatch):
    """GA 2, 2 steps, padded rows: per router the events are forward, forward, update (twice); the
    update gets the counts of the step's two micro-batches' real tokens; the second micro-batch still
    routes with the step's starting bias; the bias moves by exactly expert_bias_delta(counts)."""
    model = biased_model()
    routers = model.routed_routers()
    events: dict[str, list] = {name: [] for name, _ in routers}
    for name, router in routers:

        def forward_hook(module, args, output, name=name):
            # the routed Mixtral router returns (logits, weights, indices)
            events[name].append(("forward", output[2].detach().clone(), module.selection_bias().clone()))

        router.register_forward_hook(forward_hook)
    router_class = type(routers[0][1])
    original = router_class.update_expert_bias
    names = {id(router): name for name, router in routers}

    def recording_update(self, counts_E):
        before = self.selection_bias().clone()
        original(self, counts_E)
        events[names[id(self)]].append(("update", counts_E.clone(), before, self.selection_bias().clone()))

    monkeypatch.setattr(router_class, "update_expert_bias", recording_update)
    trainer = MaskRecordingTrainer(
        model=model, args=make_args(tmp_path), train_dataset=RandomTokens(8, pad_every=3)
    )
    trainer.train()
    assert len(trainer.masks) == 4 and sum(int((m == 0).any()) for m in trainer.masks) == 3
    for name, _ in routers:
        kinds = [e[0] for e in events[name]]
        assert kinds == ["forward", "forward", "update"] * 2, name
        for step in range(2):
            first, second, update = events[name][3 * step : 3 * step + 3]
            hand = torch.zeros(NUM_EXPERTS, dtype=torch.int64)
            for (_, indices_TK, _), mask in zip((first, second), trainer.masks[2 * step : 2 * step + 2]):
                real = mask.reshape(-1).tolist()
                for t, experts in enumerate(indices_TK.reshape(len(real), -1).tolist()):
                    if real[t]:
                        for e in experts:
                            hand[e] += 1
            _, counts, before, after = update
            assert torch.equal(counts.cpu().to(torch.int64), hand), (name, step)
            assert int(hand.sum()) == 2 * sum(int(m.sum()) for m in trainer.masks[2 * step : 2 * step + 2])
            # no update inside the step: both micro-batches route with the bias the step began with
            assert torch.equal(first[2], before) and torch.equal(second[2], before)
            torch.testing.assert_close(after, before + expert_bias_delta(hand, RATE, "sign"))
        assert events[name][-1][3].abs().max() > 0  # the bias did move
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(
        math.isfinite(h["router/expert_bias_absmax"]) and "router/expert_bias_absmax/layer_0" in h
        for h in logs
    )
    assert logs[-1]["router/expert_bias_absmax"] == pytest.approx(
        sum(float(r.selection_bias().abs().max()) for _, r in routers) / len(routers)
    )


def test_no_bias_no_update_and_no_bias_logs(tmp_path):
    model = H.patch_moe_routers(tiny_model("mixtral"), H.LinearRouterConfig())
    trainer = MoERouterTrainer(model=model, args=make_args(tmp_path), train_dataset=RandomTokens(8))
    trainer.train()
    assert trainer._step_loads.step is None  # nothing accumulated
    assert not any("expert_bias" in k for h in trainer.state.log_history for k in h)


def _train(tmp_path, model, max_steps: int, resume: str | None = None, **overrides) -> MoERouterTrainer:
    args = make_args(
        tmp_path,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=2,
        learning_rate=5e-2,
        **overrides,
    )
    trainer = MoERouterTrainer(model=model, args=args, train_dataset=RandomTokens(16, pad_every=3))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_continues_the_expert_bias_exactly(tmp_path):
    """4 steps straight vs the step-2 checkpoint resumed for steps 3 and 4: identical bias buffers."""
    straight = biased_model("proportional")
    _train(tmp_path / "straight", straight, 4)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed = biased_model("proportional")
    _train(tmp_path / "resumed", resumed, 4, resume=str(checkpoint))
    saved = load_file(checkpoint / "model.safetensors")
    for (name, a), (_, b) in zip(straight.routed_routers(), resumed.routed_routers()):
        assert torch.equal(a.selection_bias(), b.selection_bias()), name
        at_two = saved[f"{name}.expert_bias"]
        # the checkpoint holds a moved bias, and steps 3 and 4 moved it further
        assert at_two.abs().max() > 0 and not torch.equal(at_two, a.selection_bias())
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)

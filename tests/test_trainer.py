"""MoERouterTrainer: losses, GA scaling, logged routing metrics, precision, backends."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import RandomTokens, tiny_model

import hf_moe_routers as H
from hf_moe_routers.trainers import MoERouterTrainer, MoERouterTrainingArguments

REQUIRED = (
    "router/load_entropy",
    "router/load_cv",
    "router/dead_experts",
    "router/spectral_norm",
    "router/stable_rank",
    "router/lipschitz_bound",
    "router/flip_rate",
    "router/aux_loss",
    "router/reg_loss",
)


def make_args(tmp_path, **overrides) -> MoERouterTrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=4,
        logging_steps=2,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        router_plots=False,
        seed=0,
    )
    kwargs.update(overrides)
    return MoERouterTrainingArguments(**kwargs)


@pytest.mark.parametrize(
    "router_config",
    [H.LinearRouterConfig(), H.SRMoEConfig(), H.L2RConfig(rank=8, num_anchors=2)],
    ids=["linear", "sr_moe", "l2r"],
)
def test_short_training_logs_every_required_key_with_finite_values(tmp_path, router_config):
    model = H.patch_moe_routers(tiny_model("mixtral"), router_config)
    args = make_args(tmp_path, eval_strategy="steps", eval_steps=4)
    trainer = MoERouterTrainer(
        model=model,
        args=args,
        train_dataset=RandomTokens(32, pad_every=3),
        eval_dataset=RandomTokens(8, seed=1),
    )
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h and "router/load_entropy" in h]
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(train_logs) == 2 and len(eval_logs) == 1
    for logs in train_logs:
        for key in REQUIRED:
            assert key in logs and math.isfinite(logs[key]), key
            assert f"{key}/layer_0" in logs or key == "router/reg_loss"
    for key in REQUIRED[:-1]:
        assert math.isfinite(eval_logs[0][f"eval_{key}"])
    # the metrics are consistent with their definitions
    assert 0 < train_logs[0]["router/load_entropy"] <= 1
    assert train_logs[0]["router/dead_experts"] == 0
    if router_config.router_type == "sr_moe":
        assert train_logs[0]["router/reg_loss"] > 0
    else:
        assert train_logs[0]["router/reg_loss"] == 0
    assert len(trainer.routing_history.split("train")) == 2


def _one_step(tmp_path, batch, accumulation, **overrides):
    model = H.patch_moe_routers(
        tiny_model("mixtral"), H.SRMoEConfig(spectral_bound=0.5, stable_rank_weight=0.5)
    )
    args = make_args(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        router_costly_metrics_interval=1000,
        **overrides,
    )
    trainer = MoERouterTrainer(model=model, args=args, train_dataset=RandomTokens(8))
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_gives_the_same_step(tmp_path, monkeypatch):
    """1×B and 2×(B/2) give the same update with CE, z-loss and the SR-MoE penalties."""
    reference = tiny_model("mixtral")
    one = _one_step(tmp_path / "a", 4, 1, router_balance_loss="none", router_z_loss_weight=0.1)
    two = _one_step(tmp_path / "b", 2, 2, router_balance_loss="none", router_z_loss_weight=0.1)
    moved = 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
        if ".gate.scorer.weight" in name:
            moved += int(not torch.equal(one[name], reference.get_parameter(name.replace("scorer.", ""))))
    assert moved == 2  # the router weights did move (penalties and z-loss act on them)
    # Without the division by the GA steps the router terms would count twice in the 2×(B/2) run.
    monkeypatch.setattr(MoERouterTrainer, "_loss_counts_as_ga_scaled", lambda self, n: False)
    doubled = _one_step(tmp_path / "c", 2, 2, router_balance_loss="none", router_z_loss_weight=0.1)
    assert not torch.allclose(
        doubled["model.layers.0.mlp.gate.scorer.weight"],
        one["model.layers.0.mlp.gate.scorer.weight"],
        atol=1e-6,
    )


def _train_layer_biases(kind: str, steps: int = 200) -> list[float]:
    """Two layers route the same tokens; a learnable logit bias per layer starts them collapsed on
    complementary experts ({0, 1} and {2, 3} of 4), so pooled over layers the load looks uniform.
    Only the balance loss trains the biases; returns each layer's normalised load entropy."""
    from hf_moe_routers import metrics as M

    torch.manual_seed(0)
    base = 0.1 * torch.randn(2, 256, 4)
    bias = torch.tensor([[4.0, 4.0, 0.0, 0.0], [0.0, 0.0, 4.0, 4.0]], requires_grad=True)
    optimizer = torch.optim.SGD([bias], lr=1.0)
    for _ in range(steps):
        logits = base + bias[:, None, :]
        indices = logits.topk(2, dim=-1).indices
        if kind == "per_layer":
            loss = torch.stack([M.load_balance_loss(logits[i], indices[i]) for i in range(2)]).mean()
        else:
            loss = M.pooled_load_balance_loss(list(logits), list(indices))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    logits = base + bias[:, None, :]
    indices = logits.topk(2, dim=-1).indices
    return [float(M.load_entropy(M.load_fractions(indices[i], 4))) for i in range(2)]


def test_per_layer_balance_fixes_what_the_pooled_form_cannot_see():
    start = _train_layer_biases("pooled", steps=0)
    assert start == pytest.approx([0.5, 0.5])  # each layer uses 2 of 4 experts
    pooled = _train_layer_biases("pooled")
    per_layer = _train_layer_biases("per_layer")
    # Pooled, the loss sits at its balanced value with zero gradient: nothing moves.
    assert pooled == pytest.approx([0.5, 0.5])
    # Per layer, each layer spreads over all its experts.
    assert min(per_layer) > 0.75


@pytest.mark.parametrize("kind", ["per_layer", "pooled", "model", "none"])
def test_every_balance_option_trains(tmp_path, kind):
    model = H.patch_moe_routers(tiny_model("olmoe"), H.SRMoEConfig())
    args = make_args(tmp_path, max_steps=2, router_balance_loss=kind, router_costly_metrics_interval=1000)
    trainer = MoERouterTrainer(model=model, args=args, train_dataset=RandomTokens(8, pad_every=2))
    trainer.train()
    logs = next(h for h in trainer.state.log_history if "router/aux_loss" in h)
    assert math.isfinite(logs["loss"]) and math.isfinite(logs["router/aux_loss"])


def test_bf16_training_keeps_router_math_float32_and_finite(tmp_path):
    model = H.patch_moe_routers(tiny_model("mixtral"), H.L2RConfig(rank=8, num_anchors=2))
    trainer = MoERouterTrainer(
        model=model, args=make_args(tmp_path, bf16=True), train_dataset=RandomTokens(16)
    )
    seen = []
    router = model.model.layers[0].mlp.gate
    handle = router.register_forward_hook(lambda m, a, out: seen.append(out[0].dtype))
    trainer.train()
    handle.remove()
    assert seen and all(dtype == torch.float32 for dtype in seen)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["router/aux_loss"]) for h in logs)


def test_unpatched_model_gets_metrics_only(tmp_path):
    model = tiny_model("qwen3_moe")
    before = {n: p.clone() for n, p in model.named_parameters() if "gate" in n}
    trainer = MoERouterTrainer(model=model, args=make_args(tmp_path), train_dataset=RandomTokens(16))
    trainer.train()
    logs = next(h for h in trainer.state.log_history if "router/load_entropy" in h)
    assert logs["router/reg_loss"] == 0.0 and math.isfinite(logs["router/spectral_norm"])
    assert any(not torch.equal(p, model.get_parameter(n)) for n, p in before.items())  # balance loss trains


def test_switch_transformers_trains_and_logs_encoder_and_decoder_routers(tmp_path):
    model = H.patch_moe_routers(tiny_model("switch_transformers"), H.SRMoEConfig())
    trainer = MoERouterTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=2, logging_steps=2),
        train_dataset=RandomTokens(8, encoder_decoder=True),
    )
    trainer.train()
    logs = next(h for h in trainer.state.log_history if "router/load_entropy" in h)
    layers = {k.split("/")[-1] for k in logs if k.startswith("router/load_entropy/")}
    assert layers == {"encoder_0", "encoder_1", "decoder_0", "decoder_1"}
    assert math.isfinite(logs["router/aux_loss"]) and logs["router/reg_loss"] > 0


def test_compute_metrics_receives_logits_only(tmp_path):
    received = []

    def compute_metrics(prediction):
        received.append(prediction.predictions)
        return {"n": 1.0}

    model = H.patch_moe_routers(tiny_model("olmoe"), H.L2RConfig(rank=4))
    trainer = MoERouterTrainer(
        model=model,
        args=make_args(tmp_path),
        train_dataset=RandomTokens(8),
        eval_dataset=RandomTokens(4),
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    assert len(received) == 1 and not isinstance(received[0], tuple)
    assert received[0].shape == (4, 16, 64)
    assert "eval_router/load_entropy" in metrics and "eval_n" in metrics


def test_eval_loss_is_the_language_model_loss(tmp_path):
    model = H.patch_moe_routers(tiny_model("mixtral"), H.SRMoEConfig())
    data = RandomTokens(4)
    trainer = MoERouterTrainer(
        model=model,
        args=make_args(tmp_path, router_balance_loss_weight=1.0),
        train_dataset=data,
        eval_dataset=data,
    )
    metrics = trainer.evaluate()
    batch = {
        k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask", "labels")
    }
    with torch.no_grad():
        expected = model(**batch).loss
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_tensorboard_receives_router_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = H.patch_moe_routers(tiny_model("mixtral"), H.SRMoEConfig())
    args = make_args(tmp_path, report_to=["tensorboard"])
    MoERouterTrainer(model=model, args=args, train_dataset=RandomTokens(16)).train()
    event_files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert event_files
    tags = set()
    for path in event_files:
        accumulator = EventAccumulator(str(path.parent))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    for key in REQUIRED:
        assert any(tag.endswith(key) for tag in tags), key


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(
        ValueError, match="router_balance_loss must be one of 'per_layer', 'pooled', 'model', 'none'"
    ):
        make_args(tmp_path, router_balance_loss="mean")
    with pytest.raises(ValueError, match="router_z_loss_weight must be >= 0"):
        make_args(tmp_path, router_z_loss_weight=-1.0)
    with pytest.raises(ValueError, match="router_costly_metrics_interval"):
        make_args(tmp_path, router_costly_metrics_interval=0)


def test_fp16_flag_trains_finite_on_cpu(tmp_path):
    """fp16 autocast is a no-op on CPU (no grad scaler there); the run must still be finite."""
    model = H.patch_moe_routers(tiny_model("mixtral"), H.SRMoEConfig())
    trainer = MoERouterTrainer(
        model=model, args=make_args(tmp_path, fp16=True), train_dataset=RandomTokens(16)
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "router/reg_loss" in h]
    assert logs and all(math.isfinite(h["loss"]) and h["router/reg_loss"] > 0 for h in logs)


def _router_grad_after_one_fp16_step(tmp_path, spectral_weight):
    model = H.patch_moe_routers(tiny_model("mixtral"), H.SRMoEConfig(spectral_bound=0.1)).cuda()
    args = make_args(
        tmp_path,
        fp16=True,
        use_cpu=False,
        max_steps=1,
        router_spectral_weight=spectral_weight,
        router_stable_rank_weight=0.0,
        router_balance_loss="none",
        max_grad_norm=0.0,
    )
    trainer = MoERouterTrainer(model=model, args=args, train_dataset=RandomTokens(8))
    grads = {}
    weight = model.model.layers[0].mlp.gate.scorer.weight
    weight.register_hook(lambda g: grads.setdefault("g", g.detach().float().clone()))
    trainer.train()
    assert trainer.accelerator.scaler is not None
    return grads["g"] / trainer.accelerator.scaler.get_scale()  # the hook sees the scaled gradient


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_grad_scaler_sees_the_regularisation_loss(tmp_path):
    with_penalty = _router_grad_after_one_fp16_step(tmp_path / "a", 10.0)
    without = _router_grad_after_one_fp16_step(tmp_path / "b", 0.0)
    assert torch.isfinite(with_penalty).all() and torch.isfinite(without).all()
    # the penalty's gradient went through the scaled backward: the router gradient differs
    assert (with_penalty - without).abs().max() > 1e-3

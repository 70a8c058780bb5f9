"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2 --cpu`.

``distributed_train.py OUTPUT``: a short run whose window sums the test compares across ranks.
``distributed_train.py OUTPUT balance``: one optimizer step per balance configuration of
``BALANCE_RUNS`` (2 sequences per rank, unequal padding), each rank writing the sequences it trained
on, the router-weight gradients after the data-parallel average, its balance-loss values and the
expert biases after the step; the test replays the concatenated batch in one process.
"""

import json
import sys
from pathlib import Path

import torch
from conftest import RandomTokens, tiny_model
from transformers import TrainerCallback

import hf_moe_routers as H
from hf_moe_routers.scripts.launch import end_distributed
from hf_moe_routers.trainers import MoERouterTrainer, MoERouterTrainingArguments
from hf_moe_routers.trainers.losses import balance_loss as original_balance_loss

#: (name, router_balance_loss, router_balance_granularity) of the balance runs.
BALANCE_RUNS = (
    ("global_per_layer", "per_layer", "global_batch"),
    ("global_pooled", "pooled", "global_batch"),
    ("micro_per_layer", "per_layer", "micro_batch"),
)
#: Real tokens of the 4 sequences: every 2 + 2 split gives the two ranks different counts.
REAL_LENGTHS = (16, 14, 9, 4)


class LengthTokens(RandomTokens):
    """``RandomTokens`` whose row i has ``REAL_LENGTHS[i]`` real tokens, then padding."""

    def __init__(self) -> None:
        super().__init__(len(REAL_LENGTHS), seq=16, seed=3)
        for i, length in enumerate(REAL_LENGTHS):
            self.mask[i, length:] = 0


def balance_model():
    """Mixtral with linear routers and a proportional expert bias (test and worker build the same)."""
    config = H.LinearRouterConfig(expert_bias_update_rate=0.05, expert_bias_rule="proportional")
    return H.patch_moe_routers(tiny_model("mixtral"), config)


def balance_arguments(
    output: Path, per_device: int, kind: str, granularity: str
) -> MoERouterTrainingArguments:
    return MoERouterTrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=per_device,
        train_sampling_strategy="sequential",
        max_steps=1,
        logging_steps=1,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        router_balance_loss=kind,
        router_balance_granularity=granularity,
        router_balance_loss_weight=1.0,
        router_costly_metrics_interval=1000,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        router_plots=False,
        seed=0,
    )


class GradCallback(TrainerCallback):
    """Copies the router gradients right before the optimizer step (after the data-parallel average)."""

    def __init__(self, trainer: MoERouterTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        for name, param in model.named_parameters():
            if ".gate." in name and param.grad is not None:
                self.trainer.router_grads[name] = param.grad.detach().double().tolist()


class RecordingTrainer(MoERouterTrainer):
    """Keeps the sequences of every training micro-batch and the router gradients before the step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[dict] = []
        self.router_grads: dict[str, list] = {}
        self.add_callback(GradCallback(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.seen.append({k: inputs[k].tolist() for k in ("input_ids", "attention_mask", "labels")})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def expert_biases(model) -> dict[str, list]:
    return {name: router.selection_bias().double().tolist() for name, router in model.routed_routers()}


def recording(function, values: list):
    """``function``, appending each value it returns to ``values``."""

    def wrapper(*args, **kwargs):
        value = function(*args, **kwargs)
        values.append(float(value.detach()))
        return value

    return wrapper


def balance_runs(output: Path) -> None:
    from hf_moe_routers.trainers import trainer as trainer_module

    original = original_balance_loss
    for name, kind, granularity in BALANCE_RUNS:
        values: list[float] = []
        trainer_module.balance_loss = recording(original, values)
        try:
            model = balance_model()
            trainer = RecordingTrainer(
                model=model,
                args=balance_arguments(output / name, 2, kind, granularity),
                train_dataset=LengthTokens(),
            )
            trainer.train()
        finally:
            trainer_module.balance_loss = original
        rank = trainer.args.process_index
        result = {
            "world_size": trainer.args.world_size,
            "seen": trainer.seen,
            "router_grads": trainer.router_grads,
            "balance_losses": values,
            "biases": expert_biases(model),
        }
        (output / f"{name}_rank{rank}.json").write_text(json.dumps(result))


def window_run(output: Path) -> None:
    model = H.patch_moe_routers(tiny_model("mixtral"), H.SRMoEConfig())
    args = MoERouterTrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        router_plots=False,
        seed=0,
    )
    trainer = MoERouterTrainer(model=model, args=args, train_dataset=RandomTokens(64, pad_every=3))
    trainer.train()
    rank = trainer.args.process_index
    local = trainer.last_local_window
    (output / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "world_size": trainer.args.world_size,
                "loads": [v.tolist() for v in local["loads"]],
                "counts": local["counts"].tolist(),
            }
        )
    )
    if trainer.is_world_process_zero():
        (output / "log_history.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    torch.set_num_threads(1)
    target = Path(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "balance":
        balance_runs(target)
    else:
        window_run(target)
    end_distributed()  # without it gloo can abort the process at exit

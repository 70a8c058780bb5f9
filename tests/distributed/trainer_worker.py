"""``MoERouterTrainer`` on a sharded model; launched by tests/test_distributed_parallel.py.

Usage: ``trainer_worker.py MODES WORKDIR`` with MODES ``accelerate_fsdp`` (under ``accelerate launch``
with examples/accelerate/fsdp2_cpu_2proc.yaml: FSDP2 by accelerate) or a comma-separated list of
``fsdp`` and ``ep`` (under ``torchrun``: ``from_pretrained(distributed_config=DistributedConfig(...))``
with ``fsdp_size=2``, or ``tp_size=2, ep_size=2``).

For every routed checkpoint in ``WORKDIR/spec.json`` it trains 3 steps; under accelerate (the only
one whose checkpoints transformers' Trainer accepts) with a checkpoint at step 2, from which a fresh
Trainer then resumes for the third step again. Rank 0 writes ``WORKDIR/trainer_<MODE>.json``: the log history of both runs. ``run_training`` (no launcher) is the
single-process reference the test compares to, on the same global batches: under data parallelism
(FSDP2, 2 ranks × 2 sequences) the reference takes 2 accumulated micro-batches of 2 sequences.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest

import torch.distributed as dist  # noqa: E402
from conftest import RandomTokens  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.distributed.configuration_utils import DistributedConfig  # noqa: E402

import hf_moe_routers  # noqa: E402, F401  (registers the routed model types)
from hf_moe_routers.scripts.launch import ends_distributed  # noqa: E402
from hf_moe_routers.trainers import MoERouterTrainer, MoERouterTrainingArguments  # noqa: E402

STEPS = 3
SAVE_AT = 2
SEQUENCES_PER_STEP = 4


def _arguments(output_dir: str, per_device: int, accumulation: int, save: bool) -> MoERouterTrainingArguments:
    return MoERouterTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        train_sampling_strategy="sequential",
        max_steps=STEPS,
        logging_steps=1,
        save_strategy="steps" if save else "no",
        save_steps=SAVE_AT,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        router_costly_metrics_interval=1,
        router_plots=False,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )


def _dataset() -> RandomTokens:
    return RandomTokens(STEPS * SEQUENCES_PER_STEP, seq=8, pad_every=3)


def run_training(load, output_dir: str, per_device: int, accumulation: int, resume: bool = True) -> dict:
    """Train ``STEPS`` steps; with ``resume``, resume a fresh Trainer from the step-``SAVE_AT``
    checkpoint. The log histories of both runs."""
    trainer = MoERouterTrainer(
        model=load(), args=_arguments(output_dir, per_device, accumulation, resume), train_dataset=_dataset()
    )
    trainer.train()
    result = {"first": trainer.state.log_history, "resumed": None}
    counts = trainer.last_local_window.get("counts")
    result["last_local_counts"] = None if counts is None else counts.tolist()
    result["last_window_counts"] = trainer.last_window["counts"].tolist()
    del trainer
    if resume:
        resumed = MoERouterTrainer(
            model=load(),
            args=_arguments(output_dir, per_device, accumulation, True),
            train_dataset=_dataset(),
        )
        resumed.train(resume_from_checkpoint=str(Path(output_dir) / f"checkpoint-{SAVE_AT}"))
        result["resumed"] = resumed.state.log_history
    return result


def _loader(mode: str, path: str):
    """How ``mode`` loads the model, and the sequences per device for 4 per step in all."""
    from accelerate_cpu_fsdp import allow_parallelism_config_on_cpu, make_trainers_use_fsdp_on_cpu

    if mode == "accelerate_fsdp":
        make_trainers_use_fsdp_on_cpu()
        return (lambda: AutoModelForCausalLM.from_pretrained(path)), SEQUENCES_PER_STEP // 2
    if mode == "fsdp":
        config = DistributedConfig(fsdp_size=2)
        per_device = SEQUENCES_PER_STEP // 2  # two data-parallel ranks
    elif mode == "ep":
        allow_parallelism_config_on_cpu()
        config = DistributedConfig(tp_size=2, ep_size=2)
        per_device = SEQUENCES_PER_STEP  # both ranks of the TP/EP group see the same batch
    else:
        raise ValueError(mode)
    return (lambda: AutoModelForCausalLM.from_pretrained(path, distributed_config=config)), per_device


@ends_distributed
def main() -> None:
    modes, workdir = sys.argv[1].split(","), Path(sys.argv[2])
    spec = json.loads((workdir / "spec.json").read_text())
    for mode in modes:
        results = {}
        for router_type, path in spec["models"].items():
            load, per_device = _loader(mode, path)
            output = workdir / f"trainer_{mode}_{router_type}"
            # transformers' Trainer refuses checkpoints of models sharded at load time (DistributedConfig).
            result = run_training(load, str(output), per_device, 1, resume=mode == "accelerate_fsdp")
            counts = [None] * dist.get_world_size()
            dist.all_gather_object(counts, result.pop("last_local_counts"))
            result["last_local_counts"] = counts  # per rank
            results[router_type] = result
            dist.barrier()
        if dist.get_rank() == 0:
            (workdir / f"trainer_{mode}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

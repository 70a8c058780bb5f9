"""Patch a saved MoE checkpoint, optionally distil the new routers, fine-tune, save.

    python examples/finetune_patched.py --model_name_or_path path/to/olmoe --router_type l2r \\
        --router_kwargs '{"rank": 16, "num_anchors": 4}' --distill_steps 100 --output_dir outputs/olmoe-l2r

The checkpoint is any local Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE folder (a routed checkpoint is
fine-tuned as it is, without patching again). Text comes from the same sources as ``train_clm``
(default: the bundled corpus) and is tokenized with the checkpoint's tokenizer when the folder has
one, else with a newly trained byte-level BPE of the model's vocabulary size. The result is saved
with ``save_pretrained`` and restored by ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import set_seed

from ..distillation import distill_router
from ..patching import patch_moe_routers
from .common import (
    CHECKPOINT_RUN_DEFAULTS,
    DataArguments,
    PatchArguments,
    RunArguments,
    UsageError,
    check_checkpoint,
    checkpoint_and_data,
    is_routed,
    parse_flags,
    router_type_of,
    save_run,
    train_and_evaluate,
)
from .launch import ends_distributed
from .threads import configure_torch_threads

#: Unset training flags: a checkpoint run's, with a learning rate gentle on the pretrained weights.
TRAINING_DEFAULTS = dict(CHECKPOINT_RUN_DEFAULTS, output_dir="outputs/finetune_patched", learning_rate=5e-4)
#: The first line of ``--help``.
DESCRIPTION = (
    "Patch a saved MoE checkpoint with a new router (unless it is routed already), optionally distil "
    "it to the old gates, fine-tune and save. The checkpoint, router and data options come first, "
    "then the routing-loss options and the inherited transformers TrainingArguments."
)


def calibration_batches(blocks: torch.Tensor, batch_size: int, num_batches: int) -> list[dict[str, Any]]:
    """The first ``num_batches`` training batches, for the patch report and router distillation."""
    end = min(len(blocks), num_batches * batch_size)
    return [{"input_ids": blocks[i : i + batch_size]} for i in range(0, end, batch_size)]


@ends_distributed
def main(argv: list[str] | None = None, *, prog: str | None = None) -> dict[str, Any]:
    """Patch (unless already routed), distil, fine-tune, evaluate and save; returns the final
    evaluation metrics. ``prog`` names the command in ``--help`` (``hf-moe-routers finetune``); bad
    input raises ``UsageError``."""
    patch_args, data_args, run_args, training_args = parse_flags(
        (PatchArguments, DataArguments, RunArguments),
        argv,
        prog=prog,
        description=DESCRIPTION,
        **TRAINING_DEFAULTS,
    )
    # The checkpoint's path and family, before the corpus and the model load.
    check_checkpoint(patch_args.model_name_or_path)
    # Before any tensor work: torch's default counts the machine's CPUs, not this process's.
    threads = configure_torch_threads(run_args.threads).threads
    set_seed(training_args.seed)
    model, tokenizer, train_dataset, eval_dataset = checkpoint_and_data(patch_args, data_args, training_args)
    if len(tokenizer) > model.config.vocab_size:
        raise UsageError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {model.config.vocab_size}."
        )
    patched = not is_routed(model)
    if patched:
        calibration = calibration_batches(
            train_dataset.blocks, training_args.per_device_train_batch_size, patch_args.distill_batches
        )
        model, report = patch_moe_routers(
            model, patch_args.router_config(), calibration_batches=calibration, return_report=True
        )
        print(report)
        # A resumed run restores the router state from its checkpoint: distilling again would be wasted.
        if patch_args.distill_steps > 0 and training_args.resume_from_checkpoint is None:
            print(
                "after distillation:",
                distill_router(model, calibration, steps=patch_args.distill_steps, lr=patch_args.distill_lr),
            )
    trainer, metrics = train_and_evaluate(model, training_args, train_dataset, eval_dataset, tokenizer)
    # The patch and distillation flags are not TrainingArguments: the card lists them with those,
    # when they applied (a routed checkpoint is trained as it is, whatever --router_type says).
    # The thread count too: it changes the order of floating-point reductions, hence the results.
    run_parameters: dict[str, Any] = {}
    if patched:
        run_parameters = {
            name: getattr(patch_args, name)
            for name in ("router_type", "router_kwargs", "distill_steps", "distill_lr", "distill_batches")
        }
    run_parameters["torch_threads"] = threads
    router_type = router_type_of(model, patch_args.router_type)
    if save_run(trainer, tokenizer, metrics, router_type, data_args, run_parameters):
        print(f"saved to {os.path.abspath(training_args.output_dir)}")
    return metrics


if __name__ == "__main__":  # pragma: no cover
    main()

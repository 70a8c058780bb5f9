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

import dataclasses
import os
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed

from .. import data_utils
from ..distillation import distill_router
from ..modeling.base import RoutedRouterMixin
from ..patching import patch_moe_routers
from ..routers import RouterConfig
from ..trainers.arguments import MoERouterTrainingArguments
from .clm import (
    ROUTER_TYPES,
    DataArguments,
    default_training_arguments,
    load_corpus,
    save_run,
    train_and_evaluate,
)
from .launch import ends_distributed


@dataclasses.dataclass
class PatchArguments:
    """Which checkpoint to load and which router to put in."""

    model_name_or_path: str = dataclasses.field(
        metadata={"help": "A local transformers MoE checkpoint folder."}
    )
    router_type: str = dataclasses.field(default="l2r", metadata={"help": f"One of {ROUTER_TYPES}."})
    router_kwargs: str = dataclasses.field(default="{}", metadata={"help": "Router config fields as JSON."})
    distill_steps: int = dataclasses.field(
        default=0, metadata={"help": "Router distillation steps (0: none)."}
    )
    distill_batches: int = dataclasses.field(
        default=4, metadata={"help": "Training batches used for distillation."}
    )
    distill_lr: float = 1e-2

    def router_config(self) -> RouterConfig:
        return RouterConfig.from_json_kwargs(self.router_type, self.router_kwargs)


def _tokenizer(path: str, texts: list[str], vocab_size: int):
    """The checkpoint's own tokenizer, or a byte-level BPE of the model's vocabulary size."""
    if any(Path(path, name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return AutoTokenizer.from_pretrained(path)
    print(
        f"{path} has no tokenizer: training a byte-level BPE with {vocab_size} tokens on the training texts"
    )
    return data_utils.train_bpe_tokenizer(texts, vocab_size=vocab_size)


@ends_distributed
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = HfArgumentParser((PatchArguments, DataArguments, MoERouterTrainingArguments))
    defaults = default_training_arguments("outputs/finetune_patched")
    defaults.update(max_steps=100, learning_rate=5e-4, eval_steps=50, save_steps=50, logging_steps=10)
    parser.set_defaults(**defaults)
    patch_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if not Path(patch_args.model_name_or_path, "config.json").is_file():
        raise ValueError(
            f"model_name_or_path: {patch_args.model_name_or_path!r} is not a saved model folder (no config.json)."
        )
    set_seed(training_args.seed)
    model = AutoModelForCausalLM.from_pretrained(patch_args.model_name_or_path)
    train_texts, eval_texts = load_corpus(data_args)
    tokenizer = _tokenizer(patch_args.model_name_or_path, train_texts, model.config.vocab_size)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {model.config.vocab_size}."
        )
    train_dataset, eval_dataset = data_utils.build_lm_datasets(
        train_texts,
        eval_texts,
        tokenizer,
        data_args.block_size,
        max_train_blocks=data_args.max_train_blocks,
        max_eval_blocks=data_args.max_eval_blocks,
    )
    already_routed = any(isinstance(m, RoutedRouterMixin) for m in model.modules())
    resuming = training_args.resume_from_checkpoint is not None
    if not already_routed:
        calibration = [
            {"input_ids": train_dataset.blocks[i : i + training_args.per_device_train_batch_size]}
            for i in range(
                0,
                min(
                    len(train_dataset), patch_args.distill_batches * training_args.per_device_train_batch_size
                ),
                training_args.per_device_train_batch_size,
            )
        ]
        model, report = patch_moe_routers(
            model, patch_args.router_config(), calibration_batches=calibration, return_report=True
        )
        print(report)
        # A resumed run restores the router state from its checkpoint: distilling again would be wasted.
        if patch_args.distill_steps > 0 and not resuming:
            print(
                "after distillation:",
                distill_router(model, calibration, steps=patch_args.distill_steps, lr=patch_args.distill_lr),
            )
    trainer, metrics = train_and_evaluate(model, training_args, train_dataset, eval_dataset, tokenizer)
    if save_run(trainer, tokenizer, metrics, patch_args.router_type):
        print(f"saved to {os.path.abspath(training_args.output_dir)}")
    return metrics


if __name__ == "__main__":  # pragma: no cover
    main()

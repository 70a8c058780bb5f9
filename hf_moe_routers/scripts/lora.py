"""LoRA on the fused experts with fully trainable routers: ``examples/finetune_lora.py``.

    python examples/finetune_lora.py --model_name_or_path outputs/main_job --output_dir outputs/lora
    python examples/finetune_lora.py --model_name_or_path path/to/olmoe --router_type sr_moe --merge true

A routed checkpoint is used as it is; a plain transformers MoE checkpoint is patched first
(``--router_type``). PEFT wraps the expert weights with LoRA (``target_parameters``, the fused
``gate_up_proj`` / ``down_proj``) and keeps a trainable copy of every router (``modules_to_save``);
``MoERouterTrainer`` computes the routers' penalties inside their forward, so they see the trained
copy. The adapter is saved to ``output_dir``; with ``--merge`` the merged model too (``merged/``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, HfArgumentParser, set_seed

from .. import data_utils
from ..modeling.base import RoutedRouterMixin
from ..patching import patch_moe_routers
from ..trainers.arguments import MoERouterTrainingArguments
from ..trainers.trainer import MoERouterTrainer
from .clm import DataArguments, default_training_arguments, load_corpus
from .finetune import PatchArguments, _tokenizer
from .launch import ends_distributed

#: Where each family keeps its fused experts and its router, relative to a decoder layer.
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER_MODULES = ["mlp.gate"]  # not "gate": that suffix also matches Qwen2-MoE's shared_expert_gate


@dataclasses.dataclass
class LoraArguments:
    """LoRA hyper-parameters."""

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    train_routers: bool = dataclasses.field(
        default=True, metadata={"help": "Routers fully trainable (modules_to_save)."}
    )
    merge: bool = dataclasses.field(
        default=False, metadata={"help": "Also save the merged model to output_dir/merged."}
    )


def lora_config(args: LoraArguments) -> Any:
    """The ``peft.LoraConfig``: LoRA on the fused expert weights, routers trained in full."""
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=[],
        target_parameters=EXPERT_PARAMETERS,
        modules_to_save=ROUTER_MODULES if args.train_routers else None,
    )


@ends_distributed
def main(argv: list[str] | None = None) -> dict[str, Any]:
    from peft import get_peft_model

    parser = HfArgumentParser((PatchArguments, LoraArguments, DataArguments, MoERouterTrainingArguments))
    defaults = default_training_arguments("outputs/finetune_lora")
    defaults.update(max_steps=100, learning_rate=1e-3, eval_steps=50, save_steps=50, logging_steps=10)
    parser.set_defaults(**defaults)
    patch_args, lora_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if not Path(patch_args.model_name_or_path, "config.json").is_file():
        raise ValueError(
            f"model_name_or_path: {patch_args.model_name_or_path!r} is not a saved model folder (no config.json)."
        )
    set_seed(training_args.seed)
    model = AutoModelForCausalLM.from_pretrained(patch_args.model_name_or_path)
    if not any(isinstance(m, RoutedRouterMixin) for m in model.modules()):
        model = patch_moe_routers(model, patch_args.router_config())
    train_texts, eval_texts = load_corpus(data_args)
    tokenizer = _tokenizer(patch_args.model_name_or_path, train_texts, model.config.vocab_size)
    train_dataset, eval_dataset = data_utils.build_lm_datasets(
        train_texts,
        eval_texts,
        tokenizer,
        data_args.block_size,
        max_train_blocks=data_args.max_train_blocks,
        max_eval_blocks=data_args.max_eval_blocks,
    )
    peft_model = get_peft_model(model, lora_config(lora_args))
    peft_model.print_trainable_parameters()
    trainer = MoERouterTrainer(
        model=peft_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    output = Path(training_args.output_dir)
    peft_model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    if lora_args.merge:
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(output / "merged")
        tokenizer.save_pretrained(output / "merged")
    if trainer.is_world_process_zero():
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        (output / "routing_metrics.json").write_text(json.dumps(clean, indent=2, sort_keys=True, default=str))
        print(
            f"adapter saved to {output}"
            + (f", merged model to {output / 'merged'}" if lora_args.merge else "")
        )
    return metrics


if __name__ == "__main__":  # pragma: no cover
    main()

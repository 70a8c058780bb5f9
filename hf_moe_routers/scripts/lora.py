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
from pathlib import Path
from typing import Any

from transformers import set_seed

from ..patching import patch_moe_routers
from .common import (
    CHECKPOINT_RUN_DEFAULTS,
    DataArguments,
    PatchArguments,
    checkpoint_and_data,
    is_routed,
    parse_flags,
    train_and_evaluate,
)
from .launch import ends_distributed
from .report import write_run_report
from .threads import configure_torch_threads

#: Unset training flags: a checkpoint run's; LoRA's few new weights take a higher rate than a full fine-tune.
TRAINING_DEFAULTS = dict(CHECKPOINT_RUN_DEFAULTS, output_dir="outputs/finetune_lora", learning_rate=1e-3)
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


def save_adapter(peft_model: Any, tokenizer: Any, output: Path, merge: bool) -> None:
    """The adapter and tokenizer to ``output``; with ``merge`` the merged model too (``merged/``)."""
    peft_model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    if merge:
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(output / "merged")
        tokenizer.save_pretrained(output / "merged")


@ends_distributed
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Patch (unless already routed), wrap with LoRA, fine-tune, evaluate and save the adapter;
    returns the final evaluation metrics."""
    from peft import get_peft_model

    patch_args, lora_args, data_args, training_args = parse_flags(
        (PatchArguments, LoraArguments, DataArguments), argv, **TRAINING_DEFAULTS
    )
    configure_torch_threads()
    set_seed(training_args.seed)
    model, tokenizer, train_dataset, eval_dataset = checkpoint_and_data(patch_args, data_args)
    if not is_routed(model):
        model = patch_moe_routers(model, patch_args.router_config())
    peft_model = get_peft_model(model, lora_config(lora_args))
    peft_model.print_trainable_parameters()
    trainer, metrics = train_and_evaluate(peft_model, training_args, train_dataset, eval_dataset, tokenizer)
    output = Path(training_args.output_dir)
    # Not save_run's trainer.save_model: the result is the adapter (and the merged model), not the base.
    save_adapter(peft_model, tokenizer, output, lora_args.merge)
    if write_run_report(trainer, metrics, patch_args.router_type):
        print(
            f"adapter saved to {output}"
            + (f", merged model to {output / 'merged'}" if lora_args.merge else "")
        )
    return metrics


if __name__ == "__main__":  # pragma: no cover
    main()

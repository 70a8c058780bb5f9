"""LoRA on the fused experts with fully trainable routers: ``examples/finetune_lora.py``.

    python examples/finetune_lora.py --model_name_or_path outputs/main_job --output_dir outputs/lora
    python examples/finetune_lora.py --model_name_or_path path/to/olmoe --router_type sr_moe --merge true

A routed checkpoint is used as it is; a plain transformers MoE checkpoint is patched first
(``--router_type``). PEFT wraps the expert weights with LoRA (``target_parameters``, the fused
``gate_up_proj`` / ``down_proj``) and keeps a trainable copy of every router (``modules_to_save``);
``MoERouterTrainer`` computes the routers' penalties inside their forward, so they see the trained
copy. The adapter is saved to ``output_dir``; with ``--merge`` the merged model too (``merged/``),
with a model card rendered from the run (base model, data, hyper-parameters, parameter count,
routing metrics) as every model folder the package writes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from transformers import set_seed

from ..cards import PLOT_FILES, write_model_card
from ..patching import patch_moe_routers
from .common import (
    CHECKPOINT_RUN_DEFAULTS,
    DataArguments,
    PatchArguments,
    RunArguments,
    checkpoint_and_data,
    is_routed,
    parse_flags,
    router_type_of,
    run_training_data,
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


def save_adapter(peft_model: Any, tokenizer: Any, output: Path, merge: bool) -> Any | None:
    """The adapter and tokenizer to ``output``; with ``merge`` the merged model too (``merged/``),
    which is returned (None without ``merge``)."""
    peft_model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    if not merge:
        return None
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(output / "merged")
    tokenizer.save_pretrained(output / "merged")
    return merged


def card_run_parameters(
    patch_args: PatchArguments, lora_args: LoraArguments, *, patched: bool, threads: int
) -> dict[str, Any]:
    """The card's rows for the run's settings that are not ``TrainingArguments``.

    The patch flags only when they applied (a routed base is trained as it is, whatever
    ``--router_type`` says), the LoRA settings, and the torch thread count: it changes the order of
    floating-point reductions, so results compare only at the same count.
    """
    rows: dict[str, Any] = {}
    if patched:
        rows = {"router_type": patch_args.router_type, "router_kwargs": patch_args.router_kwargs}
    rows.update(
        {name: getattr(lora_args, name) for name in ("lora_r", "lora_alpha", "lora_dropout", "train_routers")}
    )
    rows["torch_threads"] = threads
    return rows


def write_merged_card(
    merged: Any,
    folder: Path,
    trainer: Any,
    tokenizer: Any,
    metrics: dict[str, float],
    *,
    base_model: str,
    patched: bool,
    data_args: DataArguments,
    run_parameters: dict[str, Any],
) -> Path | None:
    """The merged model's card (README.md) and ``run_info.json``, rendered from the run.

    The merged model's own ``save_pretrained`` card knows only the model: no data, arguments or
    evaluation. ``write_trainer_model_card`` would describe ``trainer.model``, the PEFT wrapper,
    not the merged weights the folder holds, so the card is written from ``merged`` with the
    trainer's arguments, state and routing history; the plots the Trainer drew in ``output_dir``
    are copied in, so that the card's links work. The card's "Patched from" row fits only a base
    patched in this run; a routed base is named in the data line instead, so the card always says
    what the LoRA was trained on top of. A hand-written README.md is kept.
    """
    drawn = [Path(trainer.args.output_dir, name) for _, name in PLOT_FILES]
    training_data = run_training_data(trainer, tokenizer, data_args)
    if not patched:
        training_data = f"LoRA fine-tune of the routed checkpoint `{base_model}`, merged. {training_data}"
    return write_model_card(
        merged,
        folder,
        overwrite=False,
        plots=[path for path in drawn if path.is_file()],
        record_run=True,
        base_model=base_model if patched else None,
        training_data=training_data,
        training_args=trainer.args,
        trainer_state=trainer.state,
        metrics=metrics,
        history=trainer.routing_history,
        run_parameters=run_parameters,
    )


@ends_distributed
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Patch (unless already routed), wrap with LoRA, fine-tune, evaluate and save the adapter;
    returns the final evaluation metrics."""
    from peft import get_peft_model

    patch_args, lora_args, data_args, run_args, training_args = parse_flags(
        (PatchArguments, LoraArguments, DataArguments, RunArguments), argv, **TRAINING_DEFAULTS
    )
    # Before any tensor work: torch's default counts the machine's CPUs, not this process's.
    threads = configure_torch_threads(run_args.threads).threads
    set_seed(training_args.seed)
    model, tokenizer, train_dataset, eval_dataset = checkpoint_and_data(patch_args, data_args)
    patched = not is_routed(model)
    if patched:
        model = patch_moe_routers(model, patch_args.router_config())
    # Read before PEFT wraps the model: a routed base keeps its router, whatever --router_type says.
    router_type = router_type_of(model, patch_args.router_type)
    peft_model = get_peft_model(model, lora_config(lora_args))
    peft_model.print_trainable_parameters()
    trainer, metrics = train_and_evaluate(peft_model, training_args, train_dataset, eval_dataset, tokenizer)
    output = Path(training_args.output_dir)
    # Not save_run's trainer.save_model: the result is the adapter (and the merged model), not the base.
    merged = save_adapter(peft_model, tokenizer, output, lora_args.merge)
    if write_run_report(trainer, metrics, router_type):
        if merged is not None:
            write_merged_card(
                merged,
                output / "merged",
                trainer,
                tokenizer,
                metrics,
                base_model=patch_args.model_name_or_path,
                patched=patched,
                data_args=data_args,
                run_parameters=card_run_parameters(patch_args, lora_args, patched=patched, threads=threads),
            )
        print(
            f"adapter saved to {output}"
            + (f", merged model to {output / 'merged'}" if lora_args.merge else "")
        )
    return metrics


if __name__ == "__main__":  # pragma: no cover
    main()

"""The run every training script shares: flags, text, tokenizer, train and evaluate, save.

``clm`` (a model from scratch), ``finetune`` (a patched checkpoint) and ``lora`` (LoRA on a patched
checkpoint) each own only how their model is made; the rest of a run goes through here, so every
script reads its data, trains, evaluates and saves the same way::

    patch_args, data_args, training_args = parse_flags((PatchArguments, DataArguments), argv, output_dir="out")
    set_seed(training_args.seed)
    model, tokenizer, train_dataset, eval_dataset = checkpoint_and_data(patch_args, data_args)
    ...  # the script's own job: patch, distil, wrap with LoRA
    trainer, metrics = train_and_evaluate(model, training_args, train_dataset, eval_dataset, tokenizer)
    save_run(trainer, tokenizer, metrics, patch_args.router_type)  # model, tokenizer, JSON, summary

``clm`` builds its model and tokenizer itself and takes only :func:`load_corpus` and
:func:`lm_datasets` for the data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, PreTrainedModel

from .. import data_utils
from ..modeling.base import RoutedRouterMixin
from ..routers import RouterConfig
from ..trainers.arguments import MoERouterTrainingArguments
from ..trainers.trainer import MoERouterTrainer
from .report import write_run_report

__all__ = [
    "CHECKPOINT_RUN_DEFAULTS",
    "ROUTER_TYPES",
    "DataArguments",
    "PatchArguments",
    "checkpoint_and_data",
    "checkpoint_tokenizer",
    "default_training_arguments",
    "is_routed",
    "lm_datasets",
    "load_checkpoint",
    "load_corpus",
    "parse_flags",
    "save_run",
    "train_and_evaluate",
]

ROUTER_TYPES = ("linear", "sr_moe", "l2r", "cosine")
#: Files whose presence marks a folder as holding a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataArguments:
    """Where the text comes from; default: the bundled Shakespeare subset."""

    train_files: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "Local .txt/.json/.jsonl files or folders for training."}
    )
    validation_files: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "Held-out files for validation perplexity."}
    )
    dataset_path: str | None = dataclasses.field(
        default=None,
        metadata={"help": "A `datasets` dataset saved with save_to_disk (train/validation splits)."},
    )
    text_column: str = "text"
    block_size: int = 128
    max_train_blocks: int | None = None
    max_eval_blocks: int | None = dataclasses.field(
        default=128, metadata={"help": "Cap on validation blocks."}
    )


@dataclasses.dataclass
class PatchArguments:
    """Which saved checkpoint to load and which router to put in (when it is not routed yet)."""

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
        """The router to patch in, from ``router_type`` and ``router_kwargs``."""
        return RouterConfig.from_json_kwargs(self.router_type, self.router_kwargs)


#: Training defaults of the scripts that start from a saved checkpoint (``finetune``, ``lora``):
#: a pretrained model needs fewer steps than one trained from scratch, so log and evaluate sooner.
CHECKPOINT_RUN_DEFAULTS: dict[str, Any] = dict(max_steps=100, eval_steps=50, save_steps=50, logging_steps=10)


def default_training_arguments(output_dir: str, **overrides: Any) -> dict[str, Any]:
    """Defaults that make the bundled run take a few minutes on a 2-core CPU; ``overrides`` win."""
    defaults = dict(
        output_dir=output_dir,
        max_steps=300,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=2e-3,
        warmup_steps=20,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        logging_steps=25,
        eval_strategy="steps",
        eval_steps=100,
        save_strategy="steps",
        save_steps=100,
        save_total_limit=1,
        report_to=[],
        seed=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning warns and does nothing on CPU
    )
    return {**defaults, **overrides}


def parse_flags(
    script_arguments: Sequence[type], argv: list[str] | None, output_dir: str, **overrides: Any
) -> tuple[Any, ...]:
    """Parse command-line flags into ``(*script_arguments, MoERouterTrainingArguments)``.

    Unset training flags take :func:`default_training_arguments` of ``output_dir`` and ``overrides``
    (each script's own step counts and learning rate).
    """
    parser = HfArgumentParser((*script_arguments, MoERouterTrainingArguments))
    parser.set_defaults(**default_training_arguments(output_dir, **overrides))
    return tuple(parser.parse_args_into_dataclasses(args=argv))


# --------------------------------------------------------------------------------------------
# Data and checkpoints
# --------------------------------------------------------------------------------------------


def load_corpus(data_args: DataArguments) -> tuple[list[str], list[str]]:
    """Training and validation texts (whole documents)."""
    if data_args.dataset_path is not None:
        train = data_utils.load_texts_from_disk(data_args.dataset_path, data_args.text_column, split="train")
        validation = data_utils.load_texts_from_disk(
            data_args.dataset_path, data_args.text_column, split="validation"
        )
        return train, validation
    if data_args.train_files:
        train = data_utils.load_text_files(data_args.train_files, data_args.text_column)
        if not data_args.validation_files:
            raise ValueError(
                "validation_files: give held-out files for validation perplexity with --train_files."
            )
        return train, data_utils.load_text_files(data_args.validation_files, data_args.text_column)
    corpus = data_utils.bundled_corpus()
    return corpus["train"], corpus["validation"]


def lm_datasets(
    train_texts: list[str], eval_texts: list[str], tokenizer: Any, data_args: DataArguments
) -> tuple[data_utils.LMBlockDataset, data_utils.LMBlockDataset | None]:
    """Training and validation token blocks of ``data_args.block_size``, capped as the flags say."""
    return data_utils.build_lm_datasets(
        train_texts,
        eval_texts,
        tokenizer,
        data_args.block_size,
        max_train_blocks=data_args.max_train_blocks,
        max_eval_blocks=data_args.max_eval_blocks,
    )


def load_checkpoint(model_name_or_path: str) -> PreTrainedModel:
    """The causal LM saved in a local folder; a ValueError names a path that is not one."""
    if not Path(model_name_or_path, "config.json").is_file():
        raise ValueError(
            f"model_name_or_path: {model_name_or_path!r} is not a saved model folder (no config.json)."
        )
    return AutoModelForCausalLM.from_pretrained(model_name_or_path)


def is_routed(model: torch.nn.Module) -> bool:
    """Whether ``model`` already has routed routers (a saved routed checkpoint is not patched again)."""
    return any(isinstance(m, RoutedRouterMixin) for m in model.modules())


def checkpoint_tokenizer(path: str, texts: list[str], vocab_size: int) -> Any:
    """The checkpoint's own tokenizer, or a byte-level BPE of the model's vocabulary size."""
    if any(Path(path, name).is_file() for name in TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(path)
    print(
        f"{path} has no tokenizer: training a byte-level BPE with {vocab_size} tokens on the training texts"
    )
    return data_utils.train_bpe_tokenizer(texts, vocab_size=vocab_size)


def checkpoint_and_data(
    patch_args: PatchArguments, data_args: DataArguments
) -> tuple[PreTrainedModel, Any, data_utils.LMBlockDataset, data_utils.LMBlockDataset | None]:
    """``(model, tokenizer, train_dataset, eval_dataset)``: the saved checkpoint, its tokenizer (or
    a byte-level BPE of its vocabulary size) and the corpus of ``data_args`` in token blocks."""
    model = load_checkpoint(patch_args.model_name_or_path)
    train_texts, eval_texts = load_corpus(data_args)
    tokenizer = checkpoint_tokenizer(patch_args.model_name_or_path, train_texts, model.config.vocab_size)
    return model, tokenizer, *lm_datasets(train_texts, eval_texts, tokenizer, data_args)


# --------------------------------------------------------------------------------------------
# Train, evaluate, save
# --------------------------------------------------------------------------------------------


def train_and_evaluate(
    model: torch.nn.Module,
    training_args: MoERouterTrainingArguments,
    train_dataset: Any,
    eval_dataset: Any,
    tokenizer: Any,
) -> tuple[MoERouterTrainer, dict[str, float]]:
    """Train (resuming when asked), evaluate, and add ``eval_perplexity`` to the metrics."""
    trainer = MoERouterTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    # Capped: a diverged run's loss would overflow exp() and take the report down with it.
    metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    return trainer, metrics


def save_run(trainer: MoERouterTrainer, tokenizer: Any, metrics: dict[str, float], router_type: str) -> bool:
    """Save model and tokenizer to ``output_dir``; on the main process also write
    ``routing_metrics.json`` and ``routing_history.json`` and print the summary table.

    Returns whether this process is the main one (the one that wrote and printed).
    """
    trainer.save_model(trainer.args.output_dir)
    tokenizer.save_pretrained(trainer.args.output_dir)
    return write_run_report(trainer, metrics, router_type)

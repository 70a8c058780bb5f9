"""Train a routed MoE causal LM from scratch on a text corpus: the main job and ``examples/train_clm.py``.

    python examples/train_clm.py --router_type l2r --output_dir outputs/l2r
    python examples/train_clm.py --architecture mixtral --router_type sr_moe \\
        --router_kwargs '{"scoring": "prototype"}' --train_files my_texts/ --validation_files held_out.txt

Defaults train a 4-layer, 8-expert OLMoE-shaped model on the bundled Shakespeare subset (10 plays
for training, 2 held-out plays for validation), with a byte-level BPE tokenizer trained on the
training texts. At the end it prints validation perplexity and the routing metrics and writes the
model, tokenizer, plots, ``routing_metrics.json`` and ``routing_history.json`` to ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, HfArgumentParser, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from .. import data_utils
from ..modeling import FAMILIES
from ..routers import RouterConfig
from ..trainers.arguments import MoERouterTrainingArguments
from ..trainers.trainer import MoERouterTrainer
from .launch import ends_distributed

ARCHITECTURES = ("olmoe", "mixtral", "qwen3_moe", "qwen2_moe")
ROUTER_TYPES = ("linear", "sr_moe", "l2r", "cosine")


@dataclasses.dataclass
class ModelArguments:
    """The model to build (from scratch) and its router."""

    architecture: str = dataclasses.field(default="olmoe", metadata={"help": f"One of {ARCHITECTURES}."})
    router_type: str = dataclasses.field(default="l2r", metadata={"help": f"One of {ROUTER_TYPES}."})
    router_kwargs: str = dataclasses.field(
        default="{}",
        metadata={"help": 'Router config fields as JSON, e.g. \'{"rank": 16, "num_anchors": 4}\'.'},
    )
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_experts: int = 8
    num_experts_per_tok: int = 2
    expert_intermediate_size: int = 256
    vocab_size: int = dataclasses.field(
        default=4096, metadata={"help": "Vocabulary of a newly trained tokenizer."}
    )
    tokenizer_name_or_path: str | None = dataclasses.field(
        default=None, metadata={"help": "A local tokenizer folder; default: train a byte-level BPE."}
    )

    def router_config(self) -> RouterConfig:
        defaults = {}  # tiny-model sizes unless the flags say otherwise
        if self.router_type == "l2r":
            defaults = {"rank": min(16, self.hidden_size), "num_anchors": 4}
        elif self.router_type == "cosine":
            defaults = {"dim": min(16, self.hidden_size)}
        return RouterConfig.from_json_kwargs(self.router_type, self.router_kwargs, defaults)


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


def default_training_arguments(output_dir: str) -> dict[str, Any]:
    """Defaults that make the bundled run take a few minutes on a 2-core CPU."""
    return dict(
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


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, MoERouterTrainingArguments]:
    """Parse command-line flags; unset training flags take ``default_training_arguments``."""
    parser = HfArgumentParser((ModelArguments, DataArguments, MoERouterTrainingArguments))
    parser.set_defaults(**default_training_arguments("outputs/train_clm"))
    return tuple(parser.parse_args_into_dataclasses(args=argv))  # type: ignore[return-value]


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


def build_model(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """A routed model of ``architecture`` built from scratch around ``tokenizer``'s vocabulary."""
    if model_args.architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {', '.join(map(repr, ARCHITECTURES))}; got {model_args.architecture!r}."
        )
    from transformers import AutoModelForCausalLM

    adapter = FAMILIES[model_args.architecture]
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        num_key_value_heads=model_args.num_attention_heads,
        num_experts_per_tok=model_args.num_experts_per_tok,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        moe_router=model_args.router_config().to_dict(),
    )
    if model_args.architecture == "mixtral":
        family = dict(
            num_local_experts=model_args.num_experts, intermediate_size=model_args.expert_intermediate_size
        )
    elif model_args.architecture == "olmoe":
        family = dict(
            num_experts=model_args.num_experts, intermediate_size=model_args.expert_intermediate_size
        )
    else:
        family = dict(
            num_experts=model_args.num_experts,
            moe_intermediate_size=model_args.expert_intermediate_size,
            intermediate_size=model_args.expert_intermediate_size * 2,
        )
        if model_args.architecture == "qwen2_moe":
            family["shared_expert_intermediate_size"] = model_args.expert_intermediate_size
    config = adapter.routed_config_class(**common, **family)
    return AutoModelForCausalLM.from_config(config)


def summary_table(metrics: dict[str, float], router: str) -> str:
    """The final report: validation perplexity and the mean routing metrics."""
    rows = [
        ("router", router),
        ("validation loss", f"{metrics['eval_loss']:.4f}"),
        ("validation perplexity", f"{metrics['eval_perplexity']:.2f}"),
    ]
    for key in (
        "load_entropy",
        "load_cv",
        "max_load_ratio",
        "dead_experts",
        "token_entropy",
        "top1_prob",
        "flip_rate",
        "spectral_norm",
        "stable_rank",
        "lipschitz_bound",
        "query_concentration",
        "expert_concentration",
        "drift",
        "aux_loss",
        "z_loss",
    ):
        value = metrics.get(f"eval_router/{key}")
        if value is not None:
            rows.append((f"router/{key}", f"{value:.4g}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", "-" * (width + 12)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


@ends_distributed
def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_args(argv)
    set_seed(training_args.seed)
    start = time.perf_counter()
    train_texts, eval_texts = load_corpus(data_args)
    if model_args.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
    else:
        tokenizer = data_utils.train_bpe_tokenizer(train_texts, vocab_size=model_args.vocab_size)
    train_dataset, eval_dataset = data_utils.build_lm_datasets(
        train_texts,
        eval_texts,
        tokenizer,
        data_args.block_size,
        max_train_blocks=data_args.max_train_blocks,
        max_eval_blocks=data_args.max_eval_blocks,
    )
    model = build_model(model_args, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{model_args.architecture} ({parameters / 1e6:.2f}M parameters), router {model.config.moe_router}; "
        f"{len(train_dataset)} training and {len(eval_dataset)} validation blocks of {data_args.block_size} tokens"
    )
    trainer, metrics = train_and_evaluate(model, training_args, train_dataset, eval_dataset, tokenizer)
    metrics["train_wall_seconds"] = time.perf_counter() - start
    if save_run(trainer, tokenizer, metrics, model_args.router_type):
        print(
            f"saved model, tokenizer, plots and metrics to {os.path.abspath(training_args.output_dir)} "
            f"({metrics['train_wall_seconds']:.0f} s)"
        )
    return metrics


def train_and_evaluate(
    model: PreTrainedModel,
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
    metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    return trainer, metrics


def save_run(trainer: MoERouterTrainer, tokenizer: Any, metrics: dict[str, float], router_type: str) -> bool:
    """Save model and tokenizer to ``output_dir``; on the main process also write
    ``routing_metrics.json`` and ``routing_history.json`` and print the summary table.

    Returns whether this process is the main one (the one that wrote and printed).
    """
    trainer.save_model(trainer.args.output_dir)
    tokenizer.save_pretrained(trainer.args.output_dir)
    if not trainer.is_world_process_zero():
        return False
    output = Path(trainer.args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "routing_metrics.json").write_text(
        json.dumps(finite_for_json(metrics), indent=2, sort_keys=True)
    )
    trainer.routing_history.save(output / "routing_history.json")
    print(summary_table(metrics, router_type))
    return True


def finite_for_json(metrics: dict[str, float]) -> dict[str, Any]:
    """JSON has no inf/NaN: write them as strings."""
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}


if __name__ == "__main__":  # pragma: no cover
    main()

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
import os
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, set_seed

from .. import data_utils
from ..modeling import FAMILIES
from ..routers import RouterConfig, build_scorer
from ..trainers.arguments import MoERouterTrainingArguments
from .common import (
    ROUTER_TYPES,
    TOKENIZER_FILES,
    DataArguments,
    RunArguments,
    bundled_domains,
    lm_datasets,
    load_corpus,
    parse_flags,
    save_run,
    train_and_evaluate,
)
from .launch import ends_distributed
from .threads import configure_torch_threads

ARCHITECTURES = ("olmoe", "mixtral", "qwen3_moe", "qwen2_moe")


@dataclasses.dataclass
class ModelArguments:
    """The model to build (from scratch) and its router."""

    _argument_group_name = "model and router"  # a help group of its own (HfArgumentParser), not a field

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

    def __post_init__(self) -> None:
        # Every flag of the model is checked while parsing, before the tokenizer is trained and the
        # model built (minutes on a CPU): a bad value fails in a second, naming its flag.
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {', '.join(map(repr, ARCHITECTURES))}; got {self.architecture!r}."
            )
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be between 1 and num_experts ({self.num_experts}); "
                f"got {self.num_experts_per_tok}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.tokenizer_name_or_path and not any(
            Path(self.tokenizer_name_or_path, name).is_file() for name in TOKENIZER_FILES
        ):
            raise ValueError(
                f"tokenizer_name_or_path: {self.tokenizer_name_or_path!r} is not a tokenizer folder "
                f"(none of {', '.join(TOKENIZER_FILES)})."
            )
        # The router's own checks, the ones that need the model's sizes included (rank <= hidden
        # size): a scorer on the meta device costs no memory.
        with torch.device("meta"):
            build_scorer(self.router_config(), self.hidden_size, self.num_experts)

    def router_config(self) -> RouterConfig:
        defaults = {}  # tiny-model sizes unless the flags say otherwise
        if self.router_type == "l2r":
            defaults = {"rank": min(16, self.hidden_size), "num_anchors": 4}
        elif self.router_type == "cosine":
            defaults = {"dim": min(16, self.hidden_size)}
        return RouterConfig.from_json_kwargs(self.router_type, self.router_kwargs, defaults)


#: The first line of ``--help``.
DESCRIPTION = (
    "Train a routed MoE causal LM from scratch (default: a 4-layer, 8-expert OLMoE-shaped model on "
    "the bundled Shakespeare subset). The model, data and router options come first, then the "
    "routing-loss options and the inherited transformers TrainingArguments."
)


def parse_args(
    argv: list[str] | None = None, prog: str | None = None
) -> tuple[ModelArguments, DataArguments, RunArguments, MoERouterTrainingArguments]:
    """Parse command-line flags; unset training flags take ``default_training_arguments``.
    Bad flags raise ``UsageError`` (``scripts.common``)."""
    return parse_flags(  # type: ignore[return-value]
        (ModelArguments, DataArguments, RunArguments),
        argv,
        "outputs/train_clm",
        prog=prog,
        description=DESCRIPTION,
    )


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


@ends_distributed
def main(argv: list[str] | None = None, *, prog: str | None = None) -> dict[str, float]:
    """Build, train, evaluate and save a routed model from the command-line flags; returns the
    final evaluation metrics (with ``eval_perplexity`` and ``train_wall_seconds``). ``prog`` names
    the command in ``--help`` (``hf-moe-routers train``); bad input raises ``UsageError``."""
    model_args, data_args, run_args, training_args = parse_args(argv, prog)
    # Before any tensor work: torch's default counts the machine's CPUs, not this process's.
    threads = configure_torch_threads(run_args.threads).threads
    set_seed(training_args.seed)
    start = time.perf_counter()
    train_texts, eval_texts = load_corpus(data_args)
    if model_args.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path)
    else:
        tokenizer = data_utils.train_bpe_tokenizer(train_texts, vocab_size=model_args.vocab_size)
    domains = bundled_domains(data_args, training_args)
    train_dataset, eval_dataset = lm_datasets(
        train_texts, eval_texts, tokenizer, data_args, eval_domains=domains
    )
    model = build_model(model_args, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{model_args.architecture} ({parameters / 1e6:.2f}M parameters), router {model.config.moe_router}; "
        f"{len(train_dataset)} training and {len(eval_dataset)} validation blocks of {data_args.block_size} tokens"
    )
    trainer, metrics = train_and_evaluate(model, training_args, train_dataset, eval_dataset, tokenizer)
    metrics["train_wall_seconds"] = time.perf_counter() - start
    # The thread count changes the order of floating-point reductions, so results are comparable
    # only at the same count: the card and run_info.json record it.
    run_parameters = {"torch_threads": threads}
    if save_run(trainer, tokenizer, metrics, model_args.router_type, data_args, run_parameters):
        print(
            f"saved model, tokenizer, plots and metrics to {os.path.abspath(training_args.output_dir)} "
            f"({metrics['train_wall_seconds']:.0f} s)"
        )
    return metrics


if __name__ == "__main__":  # pragma: no cover
    main()

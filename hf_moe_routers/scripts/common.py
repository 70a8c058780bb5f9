"""The run every training script shares: flags, text, tokenizer, train and evaluate, save.

``clm`` (a model from scratch), ``finetune`` (a patched checkpoint) and ``lora`` (LoRA on a patched
checkpoint) each own only how their model is made; the rest of a run goes through here, so every
script reads its data, trains, evaluates and saves the same way::

    patch_args, data_args, run_args, training_args = parse_flags(
        (PatchArguments, DataArguments, RunArguments), argv, output_dir="out"
    )
    threads = configure_torch_threads(run_args.threads).threads  # scripts.threads; --threads wins
    set_seed(training_args.seed)
    model, tokenizer, train_dataset, eval_dataset = checkpoint_and_data(patch_args, data_args)
    ...  # the script's own job: patch, distil, wrap with LoRA
    trainer, metrics = train_and_evaluate(model, training_args, train_dataset, eval_dataset, tokenizer)
    save_run(trainer, tokenizer, metrics, router_type_of(model, patch_args.router_type), data_args,
             {"torch_threads": threads})  # model, tokenizer, JSON, card (run_parameters: on the card)

``clm`` builds its model and tokenizer itself and takes only :func:`load_corpus` and
:func:`lm_datasets` for the data.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
    TrainingArguments,
)

from .. import data_utils
from ..cards import write_trainer_model_card
from ..cards.card_sections import dataset_summary
from ..modeling.base import RoutedRouterMixin
from ..routers import RouterConfig
from ..trainers.arguments import MoERouterTrainingArguments
from .report import write_run_report

if TYPE_CHECKING:  # the Trainer (datasets, pandas, pyarrow) loads when a run starts, not for --help
    from ..trainers.trainer import MoERouterTrainer

__all__ = [
    "CHECKPOINT_RUN_DEFAULTS",
    "ROUTER_TYPES",
    "DataArguments",
    "FlagParser",
    "PatchArguments",
    "RunArguments",
    "UsageError",
    "run_script",
    "check_checkpoint",
    "bundled_domains",
    "checkpoint_and_data",
    "checkpoint_tokenizer",
    "default_training_arguments",
    "describe_corpus",
    "is_routed",
    "lm_datasets",
    "load_checkpoint",
    "load_corpus",
    "one_line",
    "parse_flags",
    "positive_threads",
    "router_type_of",
    "run_training_data",
    "save_run",
    "short_text_message",
    "stream_tokens",
    "train_and_evaluate",
]

ROUTER_TYPES = ("linear", "sr_moe", "l2r", "cosine")
#: Files whose presence marks a folder as holding a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


class UsageError(ValueError):
    """Bad command-line input (a flag, its value, a path or the data it names), found before or
    instead of the run's real work.

    ``hf-moe-routers train`` / ``finetune`` report it as one line with exit status 2 and no
    traceback; every other exception is an internal error and keeps its traceback. A ``ValueError``,
    so library callers that catch ``ValueError`` keep working.
    """


def run_script(main: Callable[[], Any], prog: str) -> None:
    """Run a script's ``main`` from the command line (``examples/*.py``): bad input is one line on
    stderr and exit status 2, as under ``hf-moe-routers``; any other error keeps its traceback."""
    try:
        main()
    except UsageError as error:
        print(f"{prog}: error: {error}\n{prog}: run `{prog} --help` for the options", file=sys.stderr)
        raise SystemExit(2) from None


def one_line(message: str) -> str:
    """``message`` with its line breaks folded: an error report is a single line."""
    return " ".join(message.split())


#: Help title of the inherited ``transformers.TrainingArguments`` options (listed last).
TRAINING_GROUP_TITLE = "training (inherited from transformers.TrainingArguments)"
#: Help title of the options ``MoERouterTrainingArguments`` adds to them.
ROUTING_GROUP_TITLE = "routing losses and logs (MoERouterTrainingArguments)"


class FlagParser(HfArgumentParser):
    """``HfArgumentParser`` that raises :class:`UsageError` instead of printing its usage block and
    exiting, and lists the training options in two titled groups after the scripts' own.

    HfArgumentParser puts a dataclass without ``_argument_group_name`` (``TrainingArguments``) in
    the parser's default group, which argparse prints first: 100+ inherited options would bury
    the model, data and router flags that a run is about.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(one_line(message))

    def _add_dataclass_arguments(self, dtype: Any) -> None:
        if hasattr(dtype, "_argument_group_name"):
            super()._add_dataclass_arguments(dtype)
            # HfArgumentParser sets every option's type from its field's annotation and ignores a
            # ``type`` in the metadata: a dataclass that wants its own message for a bad value
            # (``--threads 0``) names its parsers in ``_argument_types``.
            types = getattr(dtype, "_argument_types", {})
            for action in self._actions:
                if action.dest in types:
                    action.type = types[action.dest]
            return
        start = len(self._optionals._group_actions)
        super()._add_dataclass_arguments(dtype)
        # Move what was just added out of the default group (help formatting only: parsing reads
        # the parser's own action list, which is unchanged).
        added = self._optionals._group_actions[start:]
        del self._optionals._group_actions[start:]
        inherited = {field.name for field in dataclasses.fields(TrainingArguments)}
        routing = self.add_argument_group(ROUTING_GROUP_TITLE)
        training = self.add_argument_group(TRAINING_GROUP_TITLE)
        for action in added:
            (training if action.dest in inherited else routing)._group_actions.append(action)


@dataclasses.dataclass
class DataArguments:
    """Where the text comes from; default: the bundled Shakespeare subset."""

    _argument_group_name = "data"  # a help group of its own (HfArgumentParser), not a field

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

    _argument_group_name = "checkpoint and router"  # a help group of its own, not a field

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

    def __post_init__(self) -> None:
        # Checked while parsing, before the checkpoint and the corpus load: the flags alone decide
        # (router_type, the JSON of router_kwargs and every field's value).
        self.router_config()
        for name in ("distill_steps", "distill_batches"):
            minimum = 0 if name == "distill_steps" else 1
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be at least {minimum}; got {getattr(self, name)}.")

    def router_config(self) -> RouterConfig:
        """The router to patch in, from ``router_type`` and ``router_kwargs``."""
        return RouterConfig.from_json_kwargs(self.router_type, self.router_kwargs)


def positive_threads(value: str) -> int:
    """``--threads``' argparse type: a positive integer, else the error that names the allowed values.

    argparse reports an ``ArgumentTypeError`` as ``argument --threads: <message>``; an ``int`` type
    would accept ``0`` and ``-1`` and leave them to fail later, far from the flag.
    """
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer (the CPU threads torch uses, 1 or more); got {value!r}"
        )
    return threads


@dataclasses.dataclass
class RunArguments:
    """How a run uses this machine: the options that are neither the model's, the data's nor a
    ``TrainingArguments`` one (transformers has no CPU-thread option)."""

    _argument_group_name = "run"  # a help group of its own, listed before the inherited options
    #: parsers that replace HfArgumentParser's ``int`` (see ``FlagParser``), for one clear message
    _argument_types: ClassVar[dict[str, Callable[[str], Any]]] = {"threads": positive_threads}

    threads: int | None = dataclasses.field(
        default=None,
        metadata={
            "metavar": "N",
            "help": "CPU threads for torch (a positive integer). Default: an explicit OMP_NUM_THREADS, "
            "else one per CPU available to this process (its affinity mask and cgroup CPU quota).",
        },
    )

    def __post_init__(self) -> None:
        # The flag is checked by its parser; this covers RunArguments built in Python.
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise ValueError(
                f"--threads must be a positive integer (the CPU threads torch uses, 1 or more); "
                f"got {self.threads!r}."
            )


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
    script_arguments: Sequence[type],
    argv: list[str] | None,
    output_dir: str,
    *,
    prog: str | None = None,
    description: str | None = None,
    **overrides: Any,
) -> tuple[Any, ...]:
    """Parse command-line flags into ``(*script_arguments, MoERouterTrainingArguments)``.

    Unset training flags take :func:`default_training_arguments` of ``output_dir`` and ``overrides``
    (each script's own step counts and learning rate). ``prog`` and ``description`` head ``--help``
    (``hf-moe-routers train``). Bad input (an unknown flag, a bad value, a ``ValueError`` of a
    dataclass's own checks) raises :class:`UsageError` with a one-line message.
    """
    parser = FlagParser(
        (*script_arguments, MoERouterTrainingArguments),
        prog=prog,
        description=description,
        # argparse's own usage line would spell out all ~200 options before the description.
        usage="%(prog)s [OPTIONS]",
    )
    parser.set_defaults(**default_training_arguments(output_dir, **overrides))
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except UsageError:
        raise
    except ValueError as error:  # the dataclasses' own checks (__post_init__): flags that do not fit
        raise UsageError(one_line(str(error))) from None
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
    return tuple(parsed)


# --------------------------------------------------------------------------------------------
# Data and checkpoints
# --------------------------------------------------------------------------------------------


def load_corpus(data_args: DataArguments) -> tuple[list[str], list[str]]:
    """Training and validation texts (whole documents); :class:`UsageError` naming the flag whose
    files or dataset cannot be read."""
    if data_args.dataset_path is not None:
        path, column = data_args.dataset_path, data_args.text_column
        train = _read("dataset_path", lambda: data_utils.load_texts_from_disk(path, column, split="train"))
        validation = _read(
            "dataset_path", lambda: data_utils.load_texts_from_disk(path, column, split="validation")
        )
        return train, validation
    if data_args.train_files:
        if not data_args.validation_files:  # checked first: reading the training files may take a while
            raise UsageError(
                "--validation_files: give held-out files for validation perplexity with --train_files."
            )
        files, validation_files = data_args.train_files, data_args.validation_files
        train = _read("train_files", lambda: data_utils.load_text_files(files, data_args.text_column))
        validation = _read(
            "validation_files", lambda: data_utils.load_text_files(validation_files, data_args.text_column)
        )
        return train, validation
    corpus = data_utils.bundled_corpus()
    return corpus["train"], corpus["validation"]


def _read(flag: str, load: Any) -> list[str]:
    """``load()``, with a file or dataset that cannot be read reported against ``--flag``."""
    try:
        return load()
    except (OSError, ValueError) as error:
        raise UsageError(one_line(f"--{flag}: {error}")) from None


def stream_tokens(texts: Sequence[str], tokenizer: Any) -> int:
    """How many tokens ``texts`` give in ``data_utils.build_lm_datasets``' stream (each non-empty
    document's tokens, then an EOS): what a ``--block_size`` error quotes."""
    documents = [doc for doc in texts if doc.strip()]
    if not documents:
        return 0
    encoded = tokenizer(documents, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return sum(len(ids) + 1 for ids in encoded["input_ids"])


def short_text_message(texts: Sequence[str], which: str, tokenizer: Any, block_size: int) -> str | None:
    """The ``--block_size`` error when ``texts`` (``which``: "the training text") hold less than
    one block, with the numbers; None when they hold at least one."""
    available = stream_tokens(texts, tokenizer)
    if available >= block_size:
        return None
    return (
        f"--block_size {block_size} is longer than {which}: it gives {available} tokens, fewer than one "
        f"block of {block_size}; lower --block_size to at most {available} or give more text."
    )


def lm_datasets(
    train_texts: list[str],
    eval_texts: list[str],
    tokenizer: Any,
    data_args: DataArguments,
    *,
    eval_domains: bool = False,
) -> tuple[data_utils.LMBlockDataset, data_utils.LMBlockDataset | None]:
    """Training and validation token blocks of ``data_args.block_size``, capped as the flags say
    (``eval_domains``: tag each validation token with its document, see ``build_lm_datasets``).

    Raises :class:`UsageError` when the flags do not fit the text (a block longer than the text).
    """
    try:
        return data_utils.build_lm_datasets(
            train_texts,
            eval_texts,
            tokenizer,
            data_args.block_size,
            max_train_blocks=data_args.max_train_blocks,
            max_eval_blocks=data_args.max_eval_blocks,
            eval_domains=eval_domains,
        )
    except ValueError as error:
        # build_lm_datasets names the argument that does not fit: they are all flags of DataArguments.
        for texts, which in ((train_texts, "the training text"), (eval_texts, "the validation text")):
            message = short_text_message(texts, which, tokenizer, data_args.block_size)
            if message is not None:
                raise UsageError(message) from None
        raise UsageError(one_line(f"--{error}")) from None


def check_checkpoint(model_name_or_path: str) -> None:
    """Raise :class:`UsageError` unless ``model_name_or_path`` is a saved model folder of a
    supported family (read from its config.json alone: cheap, before anything loads)."""
    from transformers import AutoConfig

    from ..modeling import FAMILIES, supported_families

    if not Path(model_name_or_path, "config.json").is_file():
        raise UsageError(
            f"--model_name_or_path: {model_name_or_path!r} is not a saved model folder (no config.json)."
        )
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(
            one_line(f"--model_name_or_path: cannot read the config in {model_name_or_path!r}: {error}")
        ) from None
    if config.model_type not in FAMILIES:
        raise UsageError(
            f"--model_name_or_path: unsupported model family {config.model_type!r} in "
            f"{model_name_or_path!r}; supported: {', '.join(supported_families())} (and their routed_* forms)."
        )


def load_checkpoint(model_name_or_path: str) -> PreTrainedModel:
    """The causal LM saved in a local folder; a :class:`UsageError` (a ValueError) names a path
    that is not one."""
    check_checkpoint(model_name_or_path)
    return AutoModelForCausalLM.from_pretrained(model_name_or_path)


def is_routed(model: torch.nn.Module) -> bool:
    """Whether ``model`` already has routed routers (a saved routed checkpoint is not patched again)."""
    return any(isinstance(m, RoutedRouterMixin) for m in model.modules())


def router_type_of(model: torch.nn.Module, default: str) -> str:
    """The router type a routed ``model`` carries (its config's ``router_config``), else ``default``.

    A routed checkpoint is trained as it is, whatever ``--router_type`` says (its default is
    ``l2r``): the report and the card must name the router the model really has.
    """
    router = getattr(getattr(model, "config", None), "router_config", None)
    return str(getattr(router, "router_type", None) or default)


def checkpoint_tokenizer(path: str, texts: list[str], vocab_size: int) -> Any:
    """The checkpoint's own tokenizer, or a byte-level BPE of the model's vocabulary size."""
    if any(Path(path, name).is_file() for name in TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(path)
    print(
        f"{path} has no tokenizer: training a byte-level BPE with {vocab_size} tokens on the training texts"
    )
    return data_utils.train_bpe_tokenizer(texts, vocab_size=vocab_size)


def checkpoint_and_data(
    patch_args: PatchArguments, data_args: DataArguments, training_args: Any = None
) -> tuple[PreTrainedModel, Any, data_utils.LMBlockDataset, data_utils.LMBlockDataset | None]:
    """``(model, tokenizer, train_dataset, eval_dataset)``: the saved checkpoint, its tokenizer (or
    a byte-level BPE of its vocabulary size) and the corpus of ``data_args`` in token blocks (the
    validation plays as domains when ``training_args`` asks, see :func:`bundled_domains`)."""
    model = load_checkpoint(patch_args.model_name_or_path)
    train_texts, eval_texts = load_corpus(data_args)
    tokenizer = checkpoint_tokenizer(patch_args.model_name_or_path, train_texts, model.config.vocab_size)
    domains = training_args is not None and bundled_domains(data_args, training_args)
    return model, tokenizer, *lm_datasets(train_texts, eval_texts, tokenizer, data_args, eval_domains=domains)


def bundled_domains(data_args: DataArguments, training_args: Any) -> bool:
    """Whether to tag the validation tokens with their play (domain specialisation in the logs).

    Only for the bundled corpus, whose validation documents are named plays, and only when the
    Trainer logs specialisation; ``router_domain_names`` becomes the plays' titles unless the
    flags name other domains (then nothing is tagged: the ids would index other names).
    """
    if data_args.dataset_path is not None or data_args.train_files:
        return False
    if not getattr(training_args, "router_specialisation", False):
        return False
    titles = [entry["title"] for entry in data_utils.bundled_corpus_manifest()["splits"]["validation"]]
    if training_args.router_domain_names is None:
        training_args.router_domain_names = titles
    return list(training_args.router_domain_names) == titles


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
    from ..trainers.trainer import MoERouterTrainer

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


def describe_corpus(data_args: DataArguments) -> str:
    """Which text a run read, in a sentence for the model card (the flags of :func:`load_corpus`)."""
    if data_args.dataset_path is not None:
        return (
            f"the `datasets` dataset saved at `{data_args.dataset_path}` (its train and validation "
            f"splits, column `{data_args.text_column}`)"
        )
    if data_args.train_files:
        train = ", ".join(f"`{path}`" for path in data_args.train_files)
        validation = ", ".join(f"`{path}`" for path in data_args.validation_files or [])
        return f"the local files {train} for training and {validation} for validation"
    manifest = data_utils.bundled_corpus_manifest()
    splits = manifest["splits"]

    def plays(split: str) -> str:
        return ", ".join(entry["title"] for entry in splits[split])

    return (
        f"the bundled Shakespeare subset (`{manifest['name']}`): {len(splits['train'])} plays for training "
        f"({plays('train')}) and {len(splits['validation'])} held-out plays for validation "
        f"({plays('validation')})"
    )


def run_training_data(trainer: MoERouterTrainer, tokenizer: Any, data_args: DataArguments | None) -> str:
    """The card's data line of a script run: the corpus, its token blocks and the tokenizer."""
    corpus = describe_corpus(data_args) if data_args is not None else "the script's datasets"
    sizes = dataset_summary(trainer.train_dataset, trainer.eval_dataset)
    text = f"Trained on {corpus}" + (f"; {sizes}" if sizes else ".")
    if tokenizer is not None and hasattr(tokenizer, "__len__"):
        text += f" Tokenizer vocabulary: {len(tokenizer):,} tokens."
    return text


def save_run(
    trainer: MoERouterTrainer,
    tokenizer: Any,
    metrics: dict[str, float],
    router_type: str,
    data_args: DataArguments | None = None,
    run_parameters: dict[str, Any] | None = None,
) -> bool:
    """Save model and tokenizer to ``output_dir``; on the main process also write
    ``routing_metrics.json``, ``routing_history.json`` and ``trainer_state.json``, print the summary
    table, and write the model card last, from all of it.

    The card that ``save_model`` writes comes before the run's report files; the final one is
    rendered once they are in the folder, with the data (``data_args``: which corpus) and the final
    evaluation ``metrics``, so the folder's README.md and its ``routing_metrics.json`` agree.

    Returns whether this process is the main one (the one that wrote and printed).
    """
    trainer.save_model(trainer.args.output_dir)
    tokenizer.save_pretrained(trainer.args.output_dir)
    main = write_run_report(trainer, metrics, router_type)
    trainer.save_state()  # trainer_state.json: the card's training log, for `hf-moe-routers card` too
    if main:
        write_trainer_model_card(
            trainer,
            training_data=run_training_data(trainer, tokenizer, data_args),
            metrics=metrics,
            overwrite=False,
            run_parameters=run_parameters,
        )
    return main

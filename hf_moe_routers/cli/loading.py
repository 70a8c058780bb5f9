"""What every command needs: the error type for bad input and the loaders of a model folder, its
tokenizer, a text file's blocks and router options. Imports of the training stack stay inside the
functions, so ``--help`` answers without them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class CommandError(Exception):
    """Bad user input: reported as ``hf-moe-routers <command>: error: <message>`` with exit status 2."""


def model_folder(path: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise CommandError(f"{path!r} is not a folder (expected a model saved with save_pretrained).")
    if not (folder / "config.json").is_file():
        raise CommandError(f"{path!r} is not a saved model folder: it has no config.json.")
    return folder


def load_config(folder: Path) -> Any:
    """The folder's config (routed types resolve: the package is imported); unsupported families fail."""
    from transformers import AutoConfig

    from ..modeling import FAMILIES, supported_families

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise CommandError(f"cannot read the model config in {str(folder)!r}: {error}") from None
    if config.model_type not in FAMILIES:
        raise CommandError(
            f"unsupported model family {config.model_type!r} in {str(folder)!r}; supported: "
            f"{', '.join(supported_families())} (and their routed_* forms)."
        )
    return config


def load_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = load_config(folder)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_pretrained(folder).eval()


def folder_tokenizer(folder: Path, tokenizer_path: str | None) -> Any | None:
    """``--tokenizer``, else the folder's own tokenizer, else None."""
    from transformers import AutoTokenizer

    source = Path(tokenizer_path) if tokenizer_path else folder
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if not any((source / name).is_file() for name in files):
        if tokenizer_path:
            raise CommandError(f"--tokenizer {tokenizer_path!r} has no tokenizer files ({', '.join(files)}).")
        return None
    return AutoTokenizer.from_pretrained(source)


def text_blocks(
    text_file: str | None, tokenizer: Any, block_size: int, max_blocks: int, vocab_size: int
) -> Any:
    """Token blocks ``[N, block_size]`` of ``text_file`` (default: the bundled validation plays)."""
    from .. import data_utils

    if len(tokenizer) > vocab_size:
        raise CommandError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab_size}."
        )
    try:
        texts = (
            data_utils.load_text_files([text_file])
            if text_file
            else data_utils.bundled_corpus()["validation"]
        )
        blocks, _ = data_utils.build_lm_datasets(
            texts, None, tokenizer, block_size, max_train_blocks=max_blocks
        )
    except (OSError, ValueError) as error:
        if str(error).startswith("block_size"):  # data_utils names the argument that does not fit
            from ..scripts.common import short_text_message

            which = f"--text_file {text_file!r}" if text_file else "the bundled held-out plays"
            message = short_text_message(texts, which, tokenizer, block_size)
            if message is not None:
                raise CommandError(message) from None
            raise CommandError(f"--{error}") from None
        raise CommandError(f"--text_file: {error}") from None
    return blocks.blocks


def token_batches(model: Any, blocks: Any, batch_size: int) -> list[dict[str, Any]]:
    batches = []
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size]
        batch = {"input_ids": ids}
        if model.config.is_encoder_decoder:
            batch["decoder_input_ids"] = ids  # routing statistics only: the decoder reads the same text
        batches.append(batch)
    return batches


def parse_router_options(router_type: str, router_kwargs: str) -> Any:
    """The ``RouterConfig`` of ``--router_type`` and ``--router_kwargs`` (a JSON object of its fields)."""
    from ..routers import RouterConfig

    try:
        return RouterConfig.from_json_kwargs(router_type, router_kwargs)
    except ValueError as error:
        message = str(error)
        if message.startswith("router_kwargs"):  # a problem with the flag itself: name the flag
            raise CommandError(f"--{message}") from None
        raise CommandError(f"bad router options: {message}") from None

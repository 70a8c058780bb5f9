"""Text data for causal-LM training: corpora in, fixed-length token blocks out.

The pipeline behind the main job and ``examples/train_clm.py``:

1. texts, from the bundled Shakespeare subset (:func:`bundled_corpus`), local ``.txt`` / ``.json`` /
   ``.jsonl`` files (:func:`load_text_files`) or a ``datasets`` dataset saved with ``save_to_disk``
   (:func:`load_texts_from_disk`) — each a ``list[str]`` with one string per document;
2. a byte-level BPE tokenizer trained on them when the user has none (:func:`train_bpe_tokenizer`);
3. token blocks for the Trainer (:func:`build_lm_datasets`): every document is tokenized, followed by
   EOS, the documents are concatenated into one stream and cut into ``block_size`` blocks with
   ``labels = input_ids`` (the model shifts the labels itself).

>>> corpus = bundled_corpus()
>>> tokenizer = train_bpe_tokenizer(corpus["train"], vocab_size=4096)
>>> train_ds, eval_ds = build_lm_datasets(corpus["train"], corpus["validation"], tokenizer, block_size=128)
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "SPECIAL_TOKENS",
    "LMBlockDataset",
    "build_lm_datasets",
    "bundled_corpus",
    "bundled_corpus_manifest",
    "load_text_files",
    "load_texts_from_disk",
    "token_and_document_blocks",
    "train_bpe_tokenizer",
]

StrPath = str | os.PathLike[str]

#: Special tokens of :func:`train_bpe_tokenizer`, in id order (``<pad>`` = 0, ``<s>`` = 1, ...).
SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}

_SUPPORTED_SUFFIXES = (".txt", ".json", ".jsonl")
# Byte-level BPE starts from all 256 byte symbols, so a smaller vocabulary cannot be honoured.
_MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)


# --------------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------------


def _data_dir() -> Traversable:
    # importlib.resources rather than __file__: it also works when the package is imported from a
    # zipped wheel, where the data files are not on the file system.
    return resources.files("hf_moe_routers").joinpath("data")


def bundled_corpus_manifest() -> dict[str, Any]:
    """The bundled corpus's ``MANIFEST.json``: source, licence, and per split a list of entries
    ``{"play", "title", "file", "chars", "sha256"}`` (length and SHA-256 of the decompressed text)."""
    return json.loads(_data_dir().joinpath("MANIFEST.json").read_text(encoding="utf-8"))


def bundled_corpus() -> dict[str, list[str]]:
    """The bundled Shakespeare subset: ``{"train": [...], "validation": [...]}``, one string per play,
    in ``MANIFEST.json`` order. The validation plays are whole plays absent from the train split."""
    data = _data_dir()
    return {
        split: [
            gzip.decompress(data.joinpath(entry["file"]).read_bytes()).decode("utf-8") for entry in entries
        ]
        for split, entries in bundled_corpus_manifest()["splits"].items()
    }


def _expand_paths(paths: StrPath | Sequence[StrPath]) -> list[Path]:
    """Files named by ``paths`` (a path or a sequence of them); a directory stands for its supported
    files, recursively, in sorted order so that the document order is the same on every machine."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 0:
        raise ValueError("paths: no path given")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"paths: {str(path)!r} does not exist")
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _SUPPORTED_SUFFIXES
            )
            if not found:
                raise ValueError(
                    f"paths: directory {str(path)!r} holds no {', '.join(_SUPPORTED_SUFFIXES)} files"
                )
            files.extend(found)
        elif path.suffix.lower() in _SUPPORTED_SUFFIXES:
            files.append(path)
        else:
            raise ValueError(
                f"paths: {str(path)!r} has unsupported extension {path.suffix!r}; "
                f"expected one of {', '.join(_SUPPORTED_SUFFIXES)}"
            )
    return files


def _record_text(record: Any, text_column: str, where: str) -> str:
    """The ``text_column`` string of one JSON record; ``where`` locates it in error messages."""
    if not isinstance(record, dict):
        raise ValueError(f"paths: {where} is a JSON {type(record).__name__}, not an object with a text field")
    if text_column not in record:
        raise ValueError(
            f"text_column: {where} has no field {text_column!r} (fields: {', '.join(map(repr, record))})"
        )
    value = record[text_column]
    if not isinstance(value, str):
        raise ValueError(
            f"text_column: field {text_column!r} of {where} is a {type(value).__name__}, not a string"
        )
    return value


def _read_documents(path: Path, text_column: str) -> list[str]:
    """Documents of one file: a ``.txt`` file is one document; a ``.json`` file holds one record or a
    list of records; a ``.jsonl`` file holds one record per non-blank line."""
    content = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [content]
    if suffix == ".json":
        try:
            parsed = json.loads(content)
        except json.JSONDecodeError as err:
            raise ValueError(f"paths: {str(path)!r} is not valid JSON: {err}") from err
        records = parsed if isinstance(parsed, list) else [parsed]
        return [_record_text(r, text_column, f"record {i} of {str(path)!r}") for i, r in enumerate(records)]
    documents = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {lineno} of {str(path)!r}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"paths: {where} is not valid JSON: {err}") from err
        documents.append(_record_text(record, text_column, where))
    return documents


def load_text_files(paths: StrPath | Sequence[StrPath], text_column: str = "text") -> list[str]:
    """Documents from local files, one string each, in the order given (directories: sorted files).

    ``.txt``: the whole file is one document. ``.json``: one object or a list of objects, each with a
    string field ``text_column``. ``.jsonl``: one such object per line (blank lines are skipped).
    Blank documents are dropped: they would only add a lone EOS token. Raises ``ValueError`` naming
    ``paths`` (missing path, unsupported extension, invalid JSON, no text at all) or ``text_column``
    (a record without that field, or with a non-string value).
    """
    files = _expand_paths(paths)
    documents = [doc for path in files for doc in _read_documents(path, text_column) if doc.strip()]
    if not documents:
        raise ValueError(f"paths: no text in {', '.join(repr(str(p)) for p in files)}")
    return documents


def load_texts_from_disk(path: StrPath, text_column: str = "text", split: str | None = None) -> list[str]:
    """Documents from a ``datasets.Dataset`` or ``DatasetDict`` saved with ``save_to_disk``.

    ``split`` picks a split of a ``DatasetDict`` (it may be left out when there is only one). Rows whose
    ``text_column`` is None or blank are dropped. Raises ``ValueError`` naming ``path``, ``split`` or
    ``text_column``.
    """
    # Imported here: ``datasets`` pulls in pyarrow and pandas, which nothing else in the package needs.
    from datasets import DatasetDict, load_from_disk

    location = Path(path)
    if not location.exists():
        raise ValueError(f"path: {str(location)!r} does not exist")
    try:
        loaded = load_from_disk(str(location))
    except FileNotFoundError as err:
        raise ValueError(f"path: {str(location)!r} is not a dataset saved with save_to_disk ({err})") from err
    if isinstance(loaded, DatasetDict):
        names = list(loaded)
        if split is None:
            if len(names) != 1:
                raise ValueError(f"split: {str(location)!r} holds splits {names}; choose one with split=")
            split = names[0]
        if split not in loaded:
            raise ValueError(f"split: {split!r} is not among the splits {names} of {str(location)!r}")
        dataset = loaded[split]
    else:
        if split is not None:
            raise ValueError(
                f"split: {str(location)!r} holds a single Dataset, not a DatasetDict; pass split=None"
            )
        dataset = loaded
    if text_column not in dataset.column_names:
        raise ValueError(
            f"text_column: {text_column!r} is not a column of {str(location)!r} (columns: {dataset.column_names})"
        )
    documents = []
    for i, value in enumerate(dataset[text_column]):
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"text_column: row {i} of column {text_column!r} is a {type(value).__name__}, not a string"
            )
        if value and value.strip():
            documents.append(value)
    if not documents:
        raise ValueError(f"path: no text in column {text_column!r} of {str(location)!r}")
    return documents


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts`` and wrap it for transformers.

    Byte-level: every string encodes without ``<unk>`` and ``decode(encode(x)) == x`` exactly (no
    normaliser, no prefix space, no clean-up of spaces). The special tokens are
    :data:`SPECIAL_TOKENS` with ids 0-3; nothing is added automatically when encoding —
    :func:`build_lm_datasets` appends EOS to each document itself. ``model_max_length`` (e.g. the
    model's context length) is only recorded, for the usual transformers length warnings. The result
    round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` offline. Training is
    deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    documents = list(texts)
    if not any(doc.strip() for doc in documents):
        raise ValueError("texts: no text to train the tokenizer on")
    if vocab_size < _MIN_BPE_VOCAB:
        raise ValueError(
            f"vocab_size: {vocab_size} is below {_MIN_BPE_VOCAB} (256 byte symbols + {len(SPECIAL_TOKENS)} special tokens)"
        )
    backend = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(x)) == x; GPT-2's prefix space would add a leading " ".
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        # All 256 bytes from the start, so text unseen in training (any script, emoji) still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer=trainer, length=len(documents))
    kwargs: dict[str, Any] = dict(SPECIAL_TOKENS)
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    # clean_up_tokenization_spaces=False: the clean-up would turn " ." into "." and break the round trip.
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **kwargs)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


class LMBlockDataset(Dataset):
    """Fixed-length causal-LM examples: item ``i`` is ``{"input_ids", "attention_mask", "labels"}``,
    each a LongTensor of shape ``[block_size]``, with ``labels == input_ids`` and a mask of ones (no
    padding). ``default_data_collator`` stacks items into ``[batch, block_size]``.

    Args:
        blocks: LongTensor ``[num_blocks, block_size]`` of token ids.
        domain_blocks: optional LongTensor of the same shape, each token's domain (the index of
            the document it comes from); items then also hold ``"domain_ids"``, which
            ``MoERouterTrainer`` takes out of the batch for its domain-specialisation metrics (a
            plain ``Trainer`` would pass it to the model, which has no such argument).
    """

    def __init__(self, blocks: torch.Tensor, domain_blocks: torch.Tensor | None = None) -> None:
        if blocks.dim() != 2 or blocks.dtype != torch.long:
            raise ValueError(
                f"blocks: expected a 2-D LongTensor, got {blocks.dtype} of shape {tuple(blocks.shape)}"
            )
        if domain_blocks is not None and (
            domain_blocks.shape != blocks.shape or domain_blocks.dtype != torch.long
        ):
            raise ValueError(
                f"domain_blocks: expected a LongTensor of the blocks' shape {tuple(blocks.shape)}, got "
                f"{domain_blocks.dtype} of shape {tuple(domain_blocks.shape)}"
            )
        self.blocks = blocks
        self.domain_blocks = domain_blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        # Copies, not views: a collator that edits its batch in place must not alter the dataset.
        input_ids = self.blocks[index].clone()
        item = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": input_ids.clone(),
        }
        if self.domain_blocks is not None:
            item["domain_ids"] = self.domain_blocks[index].clone()
        return item

    @property
    def block_size(self) -> int:
        return self.blocks.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


def _token_blocks(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_blocks: int | None,
    argument: str,
) -> torch.Tensor:
    """LongTensor ``[num_blocks, block_size]``: each document's tokens then EOS, concatenated, cut into
    whole blocks (the incomplete tail is dropped); with ``max_blocks``, that many evenly spaced blocks.
    ``argument`` names the texts in error messages."""
    return token_and_document_blocks(texts, tokenizer, block_size, max_blocks, argument)[0]


def token_and_document_blocks(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_blocks: int | None,
    argument: str = "texts",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, documents)``: the token blocks ``[N, block_size]`` of :func:`build_lm_datasets`
    and, in the same layout, the index in ``texts`` of each token's document (the EOS after a
    document belongs to it). ``argument`` names the texts in error messages."""
    kept = [i for i, doc in enumerate(texts) if doc.strip()]
    if not kept:
        raise ValueError(f"{argument}: no text to build blocks from")
    # verbose=False: whole documents are far longer than model_max_length, on purpose, before chunking.
    encoded = tokenizer(
        [texts[i] for i in kept], add_special_tokens=False, return_attention_mask=False, verbose=False
    )
    stream = [token for ids in encoded["input_ids"] for token in (*ids, tokenizer.eos_token_id)]
    documents = [doc for doc, ids in zip(kept, encoded["input_ids"]) for _ in range(len(ids) + 1)]
    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        raise ValueError(
            f"block_size: {argument} yield {len(stream)} tokens, fewer than one block of {block_size}"
        )
    shape = (num_blocks, block_size)
    blocks = torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(shape)
    document_blocks = torch.tensor(documents[: num_blocks * block_size], dtype=torch.long).view(shape)
    if max_blocks is not None and max_blocks < num_blocks:
        # Evenly spaced rather than the first blocks, so a capped run still sees every document.
        chosen = torch.arange(max_blocks) * num_blocks // max_blocks
        blocks, document_blocks = blocks[chosen], document_blocks[chosen]
    return blocks, document_blocks


def build_lm_datasets(
    train_texts: Sequence[str],
    eval_texts: Sequence[str] | None,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_train_blocks: int | None = None,
    max_eval_blocks: int | None = None,
    eval_domains: bool = False,
) -> tuple[LMBlockDataset, LMBlockDataset | None]:
    """Causal-LM datasets for ``transformers.Trainer``: ``(train, eval)``; eval is None without
    ``eval_texts``.

    Each side is built from its own texts only (eval blocks never contain training tokens): every
    document is tokenized without special tokens and followed by the tokenizer's EOS, the documents are
    concatenated in order, and the stream is cut into non-overlapping blocks of ``block_size`` tokens,
    dropping the incomplete tail. ``max_train_blocks`` / ``max_eval_blocks`` keep that many evenly
    spaced blocks, for quick runs. Deterministic: shuffling is left to the Trainer's seeded sampler.
    With ``eval_domains`` every evaluation item also holds ``"domain_ids"``: each token's document,
    as its index in ``eval_texts`` (the domain-specialisation metrics of ``MoERouterTrainer``).
    Raises ``ValueError`` naming the offending argument.
    """
    if isinstance(train_texts, str) or isinstance(eval_texts, str):
        # A bare string is a Sequence[str] of characters; treating it as documents would be silent nonsense.
        raise ValueError("train_texts/eval_texts: expected a list of documents, got a single string")
    if block_size < 2:
        raise ValueError(
            f"block_size: must be at least 2 (a causal LM predicts token t+1 from t), got {block_size}"
        )
    for name, cap in (("max_train_blocks", max_train_blocks), ("max_eval_blocks", max_eval_blocks)):
        if cap is not None and cap < 1:
            raise ValueError(f"{name}: must be None or at least 1, got {cap}")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: has no eos_token, which separates documents in the token stream")
    train = LMBlockDataset(_token_blocks(train_texts, tokenizer, block_size, max_train_blocks, "train_texts"))
    if eval_texts is None:
        return train, None
    blocks, documents = token_and_document_blocks(
        eval_texts, tokenizer, block_size, max_eval_blocks, "eval_texts"
    )
    return train, LMBlockDataset(blocks, documents if eval_domains else None)

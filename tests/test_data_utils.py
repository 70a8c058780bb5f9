"""Corpora, tokenizer and causal-LM blocks of ``hf_moe_routers.data_utils``."""

from __future__ import annotations

import gzip
import hashlib
import json
import zipfile
from importlib import resources
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Trainer, TrainingArguments

from hf_moe_routers import data_utils
from hf_moe_routers.data_utils import (
    SPECIAL_TOKENS,
    LMBlockDataset,
    build_lm_datasets,
    bundled_corpus,
    bundled_corpus_manifest,
    load_text_files,
    load_texts_from_disk,
    train_bpe_tokenizer,
)

# --------------------------------------------------------------------------------------------------
# Bundled corpus
# --------------------------------------------------------------------------------------------------


def test_bundled_corpus_splits_are_whole_disjoint_plays():
    manifest = bundled_corpus_manifest()
    plays = {split: [e["play"] for e in entries] for split, entries in manifest["splits"].items()}
    assert set(plays) == {"train", "validation"}
    assert len(plays["train"]) == 10 and len(plays["validation"]) == 2
    assert not set(plays["train"]) & set(plays["validation"])
    assert len(set(plays["train"])) == 10  # no play twice
    files = [e["file"] for entries in manifest["splits"].values() for e in entries]
    assert len(set(files)) == len(files)


def test_bundled_corpus_texts_match_manifest():
    manifest = bundled_corpus_manifest()
    corpus = bundled_corpus()
    assert set(corpus) == {"train", "validation"}
    for split, entries in manifest["splits"].items():
        assert len(corpus[split]) == len(entries)
        for text, entry in zip(corpus[split], entries):
            assert len(text) == entry["chars"]
            assert hashlib.sha256(text.encode("utf-8")).hexdigest() == entry["sha256"]
            assert text.split("\n", 1)[0] == entry["title"]
    assert {"Julius Caesar", "The Comedy of Errors"} == {e["title"] for e in manifest["splits"]["validation"]}


def test_bundled_corpus_is_flat_package_data_and_small():
    # pyproject ships package data with the glob "data/*": every corpus file must sit directly in data/.
    data = resources.files("hf_moe_routers").joinpath("data")
    names = {p.name for p in data.iterdir() if p.is_file()}
    listed = {e["file"] for entries in bundled_corpus_manifest()["splits"].values() for e in entries}
    assert listed <= names
    assert {"MANIFEST.json", "README.md"} <= names
    assert all("/" not in name for name in listed)
    assert sum(len(data.joinpath(name).read_bytes()) for name in listed) < 1_000_000


def test_bundled_corpus_reads_from_a_zipped_package(tmp_path, monkeypatch):
    """A wheel imported from a zip exposes its data only as importlib Traversables, not as files: a
    zipped stand-in package with its own corpus must be what bundled_corpus() returns."""
    manifest = {
        "splits": {
            "train": [{"play": "p1", "file": "p1.txt.gz"}, {"play": "p2", "file": "p2.txt.gz"}],
            "validation": [{"play": "p3", "file": "p3.txt.gz"}],
        }
    }
    archive = tmp_path / "pkg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("hf_moe_routers/data/MANIFEST.json", json.dumps(manifest))
        for name, text in (("p1", "One\n"), ("p2", "Two — ü\n"), ("p3", "Three\n")):
            zf.writestr(f"hf_moe_routers/data/{name}.txt.gz", gzip.compress(text.encode("utf-8")))
    monkeypatch.setattr(data_utils.resources, "files", lambda package: zipfile.Path(archive, f"{package}/"))
    assert bundled_corpus_manifest() == manifest
    assert bundled_corpus() == {"train": ["One\n", "Two — ü\n"], "validation": ["Three\n"]}


# --------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------


def _write(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path


def test_load_txt_json_jsonl_in_given_order(tmp_path):
    txt = _write(tmp_path / "a.txt", "First line.\nSecond line.\n")
    js = _write(tmp_path / "b.json", json.dumps([{"text": "json one", "id": 1}, {"text": "json two"}]))
    single = _write(tmp_path / "c.json", json.dumps({"text": "a single record"}))
    jsonl = _write(tmp_path / "d.jsonl", '{"text": "line one"}\n\n{"text": "line two", "x": 3}\n')
    assert load_text_files([jsonl, txt, js, single]) == [
        "line one",
        "line two",
        "First line.\nSecond line.\n",
        "json one",
        "json two",
        "a single record",
    ]
    assert load_text_files(str(txt)) == ["First line.\nSecond line.\n"]


def test_load_custom_text_column_and_drops_blank_documents(tmp_path):
    js = _write(tmp_path / "a.json", json.dumps([{"body": "kept"}, {"body": "  \n"}, {"body": ""}]))
    jsonl = _write(tmp_path / "b.JSONL", '{"body": "also kept"}\n')
    blank = _write(tmp_path / "c.txt", "\n\n")
    assert load_text_files([js, jsonl, blank], text_column="body") == ["kept", "also kept"]


def test_load_directory_recursively_in_sorted_order(tmp_path):
    _write(tmp_path / "corpus" / "b.txt", "bee")
    _write(tmp_path / "corpus" / "a.txt", "ay")
    _write(tmp_path / "corpus" / "sub" / "c.jsonl", '{"text": "sea"}\n')
    _write(tmp_path / "corpus" / "notes.csv", "ignored,in,a,directory")
    assert load_text_files(tmp_path / "corpus") == ["ay", "bee", "sea"]


@pytest.mark.parametrize(
    ("files", "call", "match"),
    [
        ({}, lambda d: load_text_files([]), r"^paths: no path given"),
        ({}, lambda d: load_text_files(d / "missing.txt"), r"^paths: .*missing\.txt' does not exist"),
        ({"a.csv": "x"}, lambda d: load_text_files(d / "a.csv"), r"^paths: .*unsupported extension '\.csv'"),
        ({"sub/a.md": "x"}, lambda d: load_text_files(d / "sub"), r"^paths: directory .* holds no \.txt"),
        (
            {"a.json": "{not json"},
            lambda d: load_text_files(d / "a.json"),
            r"^paths: .*a\.json' is not valid JSON",
        ),
        ({"a.jsonl": '{"text": "ok"}\n{bad'}, lambda d: load_text_files(d / "a.jsonl"), r"^paths: line 2 of"),
        (
            {"a.json": '["bare string"]'},
            lambda d: load_text_files(d / "a.json"),
            r"^paths: record 0 .* a JSON str",
        ),
        (
            {"a.json": '[{"text": "ok"}, {"body": "x"}]'},
            lambda d: load_text_files(d / "a.json"),
            r"^text_column: record 1 of .* has no field 'text' \(fields: 'body'\)",
        ),
        (
            {"a.jsonl": '{"text": "ok"}\n{"txt": "x"}\n'},
            lambda d: load_text_files(d / "a.jsonl", text_column="text"),
            r"^text_column: line 2 of .* has no field 'text'",
        ),
        (
            {"a.jsonl": '{"text": 7}\n'},
            lambda d: load_text_files(d / "a.jsonl"),
            r"^text_column: field 'text' of line 1 .* is a int",
        ),
        (
            {"a.txt": " \n", "b.jsonl": "\n"},
            lambda d: load_text_files([d / "a.txt", d / "b.jsonl"]),
            r"^paths: no text",
        ),
    ],
)
def test_load_text_files_errors(tmp_path, files, call, match):
    for name, content in files.items():
        _write(tmp_path / name, content)
    with pytest.raises(ValueError, match=match):
        call(tmp_path)


# --------------------------------------------------------------------------------------------------
# Datasets saved with save_to_disk
# --------------------------------------------------------------------------------------------------


def test_load_texts_from_disk_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"text": ["one", None, "two", "  "], "n": [1, 2, 3, 4]}).save_to_disk(tmp_path / "ds")
    assert load_texts_from_disk(tmp_path / "ds") == ["one", "two"]

    DatasetDict(
        train=Dataset.from_dict({"content": ["t1", "t2"]}),
        validation=Dataset.from_dict({"content": ["v1"]}),
    ).save_to_disk(tmp_path / "dd")
    assert load_texts_from_disk(tmp_path / "dd", text_column="content", split="train") == ["t1", "t2"]
    assert load_texts_from_disk(str(tmp_path / "dd"), text_column="content", split="validation") == ["v1"]

    DatasetDict(only=Dataset.from_dict({"text": ["solo"]})).save_to_disk(tmp_path / "one")
    assert load_texts_from_disk(tmp_path / "one") == ["solo"]


def test_load_texts_from_disk_errors(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"text": ["a"], "n": [1]}).save_to_disk(tmp_path / "ds")
    Dataset.from_dict({"text": ["", None]}).save_to_disk(tmp_path / "blank")
    DatasetDict(
        train=Dataset.from_dict({"text": ["a"]}), test=Dataset.from_dict({"text": ["b"]})
    ).save_to_disk(tmp_path / "dd")
    (tmp_path / "plain").mkdir()
    cases = [
        (lambda: load_texts_from_disk(tmp_path / "missing"), r"^path: .*missing' does not exist"),
        (
            lambda: load_texts_from_disk(tmp_path / "plain"),
            r"^path: .* is not a dataset saved with save_to_disk",
        ),
        (lambda: load_texts_from_disk(tmp_path / "dd"), r"^split: .* holds splits \['train', 'test'\]"),
        (
            lambda: load_texts_from_disk(tmp_path / "dd", split="validation"),
            r"^split: 'validation' is not among",
        ),
        (lambda: load_texts_from_disk(tmp_path / "ds", split="train"), r"^split: .* holds a single Dataset"),
        (
            lambda: load_texts_from_disk(tmp_path / "ds", text_column="body"),
            r"^text_column: 'body' is not a column",
        ),
        (lambda: load_texts_from_disk(tmp_path / "ds", text_column="n"), r"^text_column: row 0 .* is a int"),
        (lambda: load_texts_from_disk(tmp_path / "blank"), r"^path: no text in column 'text'"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

SAMPLE = [
    "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n",
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n",
] * 3


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(SAMPLE, vocab_size=300, min_frequency=1, model_max_length=64)


@pytest.mark.parametrize(
    "text",
    [
        "ROMEO:\nBut, soft!",
        "  leading and trailing spaces  ",
        "tabs\tand\n\n\nnewlines , . ! don't",
        "unseen: Ünïcödé — 日本語 🙂 \x00",
        "",
    ],
)
def test_bpe_round_trips_any_text(bpe, text):
    ids = bpe(text)["input_ids"]
    assert bpe.unk_token_id not in ids
    assert bpe.decode(ids) == text


def test_bpe_special_tokens_and_no_automatic_specials(bpe):
    assert [bpe.pad_token_id, bpe.bos_token_id, bpe.eos_token_id, bpe.unk_token_id] == [0, 1, 2, 3]
    assert bpe.convert_ids_to_tokens([0, 1, 2, 3]) == list(SPECIAL_TOKENS.values())
    ids = bpe("Romeo")["input_ids"]
    assert not set(ids) & {0, 1, 2, 3}  # no BOS/EOS added: build_lm_datasets places EOS itself
    assert bpe.model_max_length == 64
    assert 256 + 4 < len(bpe) <= 300  # merges were learned, within the requested size


def test_bpe_save_and_auto_load_round_trip(bpe, tmp_path):
    bpe.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)  # HF_HUB_OFFLINE=1 (conftest): purely local
    text = "JULIET:\nO Romeo — thy name!\n"
    assert loaded(text)["input_ids"] == bpe(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.get_vocab() == bpe.get_vocab()
    for attribute in SPECIAL_TOKENS:
        assert getattr(loaded, attribute) == getattr(bpe, attribute)
    assert loaded.pad_token_id == 0


def test_bpe_training_is_deterministic(bpe):
    again = train_bpe_tokenizer(SAMPLE, vocab_size=300, min_frequency=1, model_max_length=64)
    assert again.get_vocab() == bpe.get_vocab()
    assert again.backend_tokenizer.to_str() == bpe.backend_tokenizer.to_str()


def test_bpe_errors():
    with pytest.raises(ValueError, match=r"^vocab_size: 259 is below 260"):
        train_bpe_tokenizer(SAMPLE, vocab_size=259)
    with pytest.raises(ValueError, match=r"^texts: no text"):
        train_bpe_tokenizer(["", " \n"], vocab_size=300)
    with pytest.raises(ValueError, match=r"^texts: no text"):
        train_bpe_tokenizer(iter([]), vocab_size=300)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


def word_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer with known ids: <pad>=0, </s>=1, <unk>=2, w0=3, w1=4, ..."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(60)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = {"pad_token": "<pad>", "unk_token": "<unk>"} | ({"eos_token": "</s>"} if eos else {})
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def test_blocks_hand_computed():
    train_texts = ["w0 w1 w2", "w3 w4", "   ", "w5 w6 w7 w8"]  # the blank document is dropped
    eval_texts = ["w10 w11", "w12 w13 w14"]
    train, evaluation = build_lm_datasets(train_texts, eval_texts, word_tokenizer(), block_size=5)
    # stream: 3 4 5 </s> 6 7 </s> 8 9 10 11 </s> = 12 tokens -> 2 blocks of 5, the tail [10 11 </s>] dropped
    assert train.blocks.tolist() == [[3, 4, 5, 1, 6], [7, 1, 8, 9, 10]]
    # eval stream: 13 14 </s> 15 16 17 </s> = 7 tokens -> 1 block, only held-out tokens
    assert evaluation.blocks.tolist() == [[13, 14, 1, 15, 16]]
    assert (len(train), train.block_size, train.num_tokens) == (2, 5, 10)
    item = train[1]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    assert item["input_ids"].tolist() == [7, 1, 8, 9, 10]
    assert item["labels"].tolist() == [7, 1, 8, 9, 10]
    assert item["attention_mask"].tolist() == [1, 1, 1, 1, 1]
    assert all(t.dtype == torch.long and t.shape == (5,) for t in item.values())


def test_eval_domains_tag_each_token_with_its_document():
    # documents 0 and 2 (1 is blank and dropped, yet keeps its index): the EOS belongs to its document
    eval_texts = ["w10 w11", " ", "w12 w13 w14", "w15 w16"]
    _, plain = build_lm_datasets(["w0 w1 w2"], eval_texts, word_tokenizer(), block_size=3)
    assert "domain_ids" not in plain[0]  # only when asked: a plain Trainer would pass it to the model
    _, tagged = build_lm_datasets(["w0 w1 w2"], eval_texts, word_tokenizer(), block_size=3, eval_domains=True)
    # stream 13 14 </s> | 15 16 17 </s> | 18 19 </s> = 10 tokens -> 3 blocks of 3, tail dropped
    assert tagged.blocks.tolist() == plain.blocks.tolist() == [[13, 14, 1], [15, 16, 17], [1, 18, 19]]
    assert tagged.domain_blocks.tolist() == [[0, 0, 0], [2, 2, 2], [2, 3, 3]]
    assert tagged[2]["domain_ids"].tolist() == [2, 3, 3]
    _, capped = build_lm_datasets(
        ["w0 w1 w2"], eval_texts, word_tokenizer(), block_size=3, max_eval_blocks=2, eval_domains=True
    )
    assert capped.domain_blocks.tolist() == [[0, 0, 0], [2, 2, 2]]  # blocks 0 and 1 of 3, with their tags
    with pytest.raises(ValueError, match="domain_blocks"):
        LMBlockDataset(tagged.blocks, tagged.domain_blocks[:1])


def test_blocks_caps_keep_evenly_spaced_blocks_and_items_are_copies():
    texts = ["w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"]  # 11 tokens + </s> = 12 -> 6 blocks of 2
    full, _ = build_lm_datasets(texts, None, word_tokenizer(), block_size=2)
    assert full.blocks.tolist() == [[3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 1]]
    capped, none = build_lm_datasets(texts, None, word_tokenizer(), block_size=2, max_train_blocks=4)
    assert none is None
    assert capped.blocks.tolist() == [[3, 4], [5, 6], [9, 10], [11, 12]]  # blocks 0, 1, 3, 4 of 6
    big_cap, evaluation = build_lm_datasets(
        texts, texts, word_tokenizer(), 2, max_train_blocks=99, max_eval_blocks=1
    )
    assert len(big_cap) == 6 and evaluation.blocks.tolist() == [[3, 4]]
    item = full[0]
    item["input_ids"][0] = 0
    item["labels"][1] = -100
    assert full[0]["input_ids"].tolist() == [3, 4] and full[0]["labels"].tolist() == [3, 4]


def test_blocks_with_trained_bpe_decode_back_to_the_corpus(bpe):
    train, _ = build_lm_datasets(SAMPLE, None, bpe, block_size=8)
    text = bpe.decode(train.blocks.flatten().tolist())
    expected = "".join(doc + bpe.eos_token for doc in SAMPLE)
    assert expected.startswith(text) and len(expected) - len(text) < 8 * 10  # only the dropped tail missing


@pytest.mark.slow  # about 5 s, nearly all of it Trainer set-up
def test_blocks_train_with_the_hf_trainer(tmp_path):
    from conftest import tiny_model

    words = " ".join(f"w{(7 * i) % 60}" for i in range(200))
    train, evaluation = build_lm_datasets([words], [words[:300]], word_tokenizer(), block_size=16)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=tiny_model("mixtral", gate_std=None).train(),
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=word_tokenizer(),
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_blocks_errors():
    tok = word_tokenizer()
    cases = [
        (lambda: build_lm_datasets("w0 w1", None, tok, 2), r"^train_texts/eval_texts: .* single string"),
        (lambda: build_lm_datasets(["w0"], "w1", tok, 2), r"^train_texts/eval_texts"),
        (lambda: build_lm_datasets(["w0 w1"], None, tok, 1), r"^block_size: must be at least 2"),
        (lambda: build_lm_datasets(["w0 w1"], None, tok, 4), r"^block_size: train_texts yield 3 tokens"),
        (lambda: build_lm_datasets(["w0 w1"], ["w2"], tok, 3), r"^block_size: eval_texts yield 2 tokens"),
        (lambda: build_lm_datasets([], None, tok, 2), r"^train_texts: no text"),
        (lambda: build_lm_datasets(["w0 w1"], [" "], tok, 2), r"^eval_texts: no text"),
        (
            lambda: build_lm_datasets(["w0 w1"], None, tok, 2, max_train_blocks=0),
            r"^max_train_blocks: must be",
        ),
        (
            lambda: build_lm_datasets(["w0 w1"], None, tok, 2, max_eval_blocks=-1),
            r"^max_eval_blocks: must be",
        ),
        (
            lambda: build_lm_datasets(["w0 w1"], None, word_tokenizer(eos=False), 2),
            r"^tokenizer: has no eos_token",
        ),
        (lambda: LMBlockDataset(torch.zeros(4, dtype=torch.long)), r"^blocks: expected a 2-D LongTensor"),
        (lambda: LMBlockDataset(torch.zeros(2, 4)), r"^blocks: expected a 2-D LongTensor"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()

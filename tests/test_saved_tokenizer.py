"""Loading the tokenizer of a saved routed model, with and without the package.

A routed folder's ``config.json`` has ``model_type="routed_<family>"`` and an ``auto_map`` into the
generated remote code. transformers' ``AutoTokenizer.from_pretrained`` loads that config through
``AutoConfig`` *before* it reads ``tokenizer_config.json`` (transformers 5.x
``tokenization_auto.py``), so in a process without hf_moe_routers, where ``routed_<family>`` is known
only through ``auto_map``, it asks "Do you wish to run the custom code? [y/N]" and waits 15 s for an
answer, although the tokenizer is a stock one whose class ``tokenizer_config.json`` names. Nothing
written at save time avoids that (dropping ``auto_map`` would break
``trust_remote_code=True`` loading of the model), so the README tells users to pass
``trust_remote_code=True`` to the tokenizer as to the model. These tests pin both facts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_model
from transformers import AutoTokenizer

from hf_moe_routers import L2RConfig, data_utils, patch_moe_routers
from hf_moe_routers.modeling.publishing import save_routed_pretrained

PROMPT = "Do you wish to run the custom code?"
TEXT = "To be, or not to be, that is the question."


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A routed OLMoE saved the way the scripts and ``save_routed_pretrained`` save it: model,
    remote code and ``auto_map``, and a byte-level BPE tokenizer of this package."""
    tokenizer = data_utils.train_bpe_tokenizer(data_utils.bundled_corpus()["validation"][:1], vocab_size=300)
    model = patch_moe_routers(
        tiny_model("olmoe", vocab_size=len(tokenizer)), L2RConfig(rank=4, num_anchors=2)
    )
    folder = tmp_path_factory.mktemp("routed") / "model"
    save_routed_pretrained(model, folder, tokenizer=tokenizer)
    return folder


def test_saved_folder_names_its_tokenizer_class(saved_folder: Path) -> None:
    config = json.loads((saved_folder / "config.json").read_text())
    assert config["model_type"] == "routed_olmoe" and "AutoConfig" in config["auto_map"]
    tokenizer_config = json.loads((saved_folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "TokenizersBackend"


def test_tokenizer_loads_without_a_prompt_with_the_package(
    saved_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The package registers routed_olmoe, so transformers treats the code as local: no question.
    tokenizer = AutoTokenizer.from_pretrained(saved_folder)
    assert PROMPT not in capsys.readouterr().out
    reference = AutoTokenizer.from_pretrained(saved_folder, trust_remote_code=True)
    assert tokenizer(TEXT)["input_ids"] == reference(TEXT)["input_ids"]


# Run in a process where `import hf_moe_routers` fails: the user without the package.
WITHOUT_PACKAGE = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_moe_routers"] = None
    from transformers import AutoTokenizer

    folder, text = sys.argv[1], sys.argv[2]
    print("BEGIN trust_remote_code=True", flush=True)
    with_flag = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    print("END", flush=True)
    print("BEGIN no flag", flush=True)
    without_flag = AutoTokenizer.from_pretrained(folder)
    print("END", flush=True)
    print(json.dumps([with_flag(text)["input_ids"], without_flag(text)["input_ids"]]))
    """
)


def test_tokenizer_without_the_package(saved_folder: Path) -> None:
    expected = AutoTokenizer.from_pretrained(saved_folder)(TEXT)["input_ids"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # stdin closed: the prompt's input() fails at once instead of waiting 15 s for an answer.
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_PACKAGE, str(saved_folder), TEXT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    with_flag = out.split("BEGIN trust_remote_code=True", 1)[1].split("END", 1)[0]
    without_flag = out.split("BEGIN no flag", 1)[1].split("END", 1)[0]
    # What the README recommends: the remote config class loads, and nobody is asked anything.
    assert PROMPT not in with_flag, with_flag
    # What it warns about. If this starts failing, transformers no longer reads config.json first
    # (or no longer asks): drop the advice from README.md's Publishing section.
    assert PROMPT in without_flag, without_flag
    ids_with_flag, ids_without_flag = json.loads(out.strip().splitlines()[-1])
    assert ids_with_flag == expected and ids_without_flag == expected

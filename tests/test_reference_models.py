"""The shipped pretrained references in ``benchmarks/reference/`` (``benchmarks/train_reference.py``).

Each folder must load with stock transformers (no ``hf_moe_routers`` class, no remote code), in
bfloat16 as saved and in float32, and reproduce the validation perplexity recorded in
``benchmarks/reference/reference.json`` — recomputed here on the whole validation split of the
package's bundled corpus with the package's own data functions and the folder's own tokenizer, to
within 1 % — and be a trained model (perplexity far below the uniform guess's, the vocabulary
size), with every expert in use.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moe_routers import data_utils

REFERENCE = Path(__file__).resolve().parent.parent / "benchmarks" / "reference"
FAMILIES = {"olmoe": "OlmoeForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: Relative tolerance on a recomputed perplexity: different CPUs and torch builds change the last
#: digits (bfloat16 matmuls most), not the first two.
RTOL = 0.01


@pytest.fixture(scope="module")
def reference() -> dict:
    path = REFERENCE / "reference.json"
    assert path.is_file(), f"{path} is missing: run benchmarks/train_reference.py --family all"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def validation_texts() -> list[str]:
    return data_utils.bundled_corpus()["validation"]


def _validation_blocks(
    folder: Path, texts: list[str], block_size: int, max_blocks: int | None = None
) -> torch.Tensor:
    """The validation split as the package cuts it, tokenized by the folder's own tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    blocks, _ = data_utils.build_lm_datasets(texts, None, tokenizer, block_size, max_train_blocks=max_blocks)
    return blocks.blocks


def _perplexity_and_load(model: torch.nn.Module, blocks: torch.Tensor) -> tuple[float, list[list[float]]]:
    """exp(mean next-token cross-entropy), every block on its own, float32 logits; and each layer's
    share of top-k assignments per expert."""
    config = model.config
    num_experts = getattr(config, "num_experts", None) or config.num_local_experts
    nll, count, loads = 0.0, 0, []
    with torch.inference_mode():
        for start in range(0, blocks.shape[0], 32):
            batch = blocks[start : start + 32]
            out = model(input_ids=batch, output_router_logits=True, use_cache=False)
            logits = out.logits[:, :-1].float()
            nll += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += batch[:, 1:].numel()
            for layer, router_logits in enumerate(out.router_logits):
                chosen = router_logits.float().topk(config.num_experts_per_tok, dim=-1).indices.reshape(-1)
                counts = torch.bincount(chosen, minlength=num_experts).double()
                if layer == len(loads):
                    loads.append(counts)
                else:
                    loads[layer] += counts
    return math.exp(nll / count), [(layer / layer.sum()).tolist() for layer in loads]


def test_index_lists_every_family(reference: dict) -> None:
    assert set(reference["models"]) == set(FAMILIES)
    index = (REFERENCE / "README.md").read_text()
    for family, entry in reference["models"].items():
        assert f"({family}/README.md)" in index
        assert f"{entry['validation']['perplexity_bf16']:.2f}" in index


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_is_a_small_stock_bf16_checkpoint(family: str, reference: dict) -> None:
    folder = REFERENCE / family
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [FAMILIES[family]]
    assert config["dtype"] == "bfloat16"
    assert "auto_map" not in config and "moe_router" not in config  # nothing of this package
    assert config["output_router_logits"] is False  # a forward with labels returns the plain CE
    weights = folder / "model.safetensors"
    assert weights.stat().st_size == reference["models"][family]["size_bytes"]["model.safetensors"]
    assert weights.stat().st_size < 8e6
    assert (folder / "tokenizer.json").is_file() and (folder / "README.md").is_file()
    readme = (folder / "README.md").read_text()
    entry = reference["models"][family]
    assert entry["command"] in readme and f"{entry['validation']['perplexity_bf16']:.3f}" in readme


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_validation_perplexity_is_reproduced(
    family: str, dtype: str, reference: dict, validation_texts: list[str]
) -> None:
    entry = reference["models"][family]
    folder = REFERENCE / family
    blocks = _validation_blocks(folder, validation_texts, reference["data"]["block_size"])
    assert blocks.shape[0] == entry["validation"]["blocks"]  # the package still cuts the split the same way
    # bf16: the dtype the folder was saved in (no dtype argument); fp32: upcast on load.
    kwargs = {} if dtype == "bf16" else {"dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    assert type(model).__name__ == FAMILIES[family]
    assert type(model).__module__.startswith(f"transformers.models.{family}.")
    assert next(model.parameters()).dtype == DTYPES[dtype]

    perplexity, load = _perplexity_and_load(model, blocks)
    recorded = entry["validation"][f"perplexity_{dtype}"]
    assert perplexity == pytest.approx(recorded, rel=RTOL)
    # A trained model: far below the uniform guess over the vocabulary (4096 for these models).
    vocab = model.config.vocab_size
    assert perplexity < vocab / 20, f"{family} ({dtype}): perplexity {perplexity:.1f} vs vocabulary {vocab}"
    # Routing as recorded, and no dead expert. Not "balanced": the families' load-balancing loss
    # pools the layers before its product, so one layer's starved expert can hide behind another
    # layer's busy one (the OLMoE reference's layer 0 gives one expert under 1 % of its assignments).
    for layer, (measured, saved) in enumerate(zip(load, entry[f"expert_load_{dtype}"], strict=True)):
        assert measured == pytest.approx(saved, abs=0.01), f"layer {layer}"
        assert min(measured) > 0.0025, f"{family} ({dtype}) layer {layer}: a dead expert: {measured}"


def test_folders_load_without_the_package(
    reference: dict, validation_texts: list[str], tmp_path: Path
) -> None:
    """A fresh interpreter that never imports hf_moe_routers loads every folder (model and tokenizer)
    and reproduces the recorded perplexity of the validation slice."""
    blocks = {
        family: _validation_blocks(
            REFERENCE / family,
            validation_texts,
            reference["data"]["block_size"],
            max_blocks=reference["data"]["validation_slice_blocks"],
        )
        for family in FAMILIES
    }
    torch.save(blocks, tmp_path / "blocks.pt")
    script = textwrap.dedent(
        """
        import json, math, sys
        import torch
        import torch.nn.functional as F
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        reference, blocks = sys.argv[1], torch.load(sys.argv[2])
        results = {}
        for family, ids in blocks.items():
            tokenizer = AutoTokenizer.from_pretrained(f"{reference}/{family}")
            assert tokenizer.decode(tokenizer("To be, or not to be").input_ids) == "To be, or not to be"
            model = AutoModelForCausalLM.from_pretrained(f"{reference}/{family}")
            with torch.inference_mode():
                logits = model(input_ids=ids).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            results[family] = {
                "class": type(model).__module__ + "." + type(model).__name__,
                "dtype": str(next(model.parameters()).dtype),
                "perplexity": math.exp(nll.item()),
            }
        results["imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "hf_moe_routers")
        print(json.dumps(results))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(REFERENCE), str(tmp_path / "blocks.pt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # not the repository root
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results.pop("imported") == []
    for family, result in results.items():
        assert (
            result["class"].startswith(f"transformers.models.{family}.")
            and result["dtype"] == "torch.bfloat16"
        )
        recorded = reference["models"][family]["validation_slice"]["perplexity_bf16"]
        assert result["perplexity"] == pytest.approx(recorded, rel=RTOL)

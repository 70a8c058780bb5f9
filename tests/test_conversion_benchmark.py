"""``benchmarks/conversion.py``: its measurements, its goal logic and its command line.

Runs the script's own functions on a tiny plain OLMoE built here (the shipped references are
exercised by ``tests/test_reference_models.py`` and ``tests/test_pretrained_loading.py``), so the
whole file takes seconds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM

from hf_moe_routers import data_utils

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "conversion.py"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """``conversion.main`` sets torch's thread count for its process; give the next test its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def conversion():
    spec = importlib.util.spec_from_file_location("conversion_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory) -> Path:
    """A plain OLMoE with its own tokenizer, saved as the references are (``<dir>/olmoe``)."""
    root = tmp_path_factory.mktemp("reference")
    corpus = data_utils.bundled_corpus()
    tokenizer = data_utils.train_bpe_tokenizer(corpus["train"][:1], vocab_size=300)
    config = OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = OlmoeForCausalLM(config)
    with torch.no_grad():  # gates far from zero, as a trained model's are
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    model.save_pretrained(root / "olmoe")
    tokenizer.save_pretrained(root / "olmoe")
    return root


def test_perplexity_is_exp_of_the_models_own_mean_loss(conversion, tiny_reference):
    model, _, validation = conversion.load_family(tiny_reference / "olmoe", max_eval_blocks=4)
    blocks = validation[:4]
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss  # transformers' mean over shifted tokens
    assert conversion.perplexity(model, blocks) == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_calibration_batches_take_the_requested_tokens_evenly(conversion):
    blocks = torch.arange(100 * 128).reshape(100, 128)
    batches = conversion.calibration_batches(blocks, 40 * 128 - 5)  # rounds up to 40 blocks
    ids = torch.cat([b["input_ids"] for b in batches])
    assert ids.shape == (40, 128)
    assert [b["input_ids"].shape[0] for b in batches] == [16, 16, 8]
    assert ids[0, 0] == 0 and ids[-1, 0] == 99 * 128  # first and last block of the split


def test_linear_conversion_is_exact_and_the_table_says_so(conversion, tiny_reference, tmp_path):
    out = tmp_path / "results"
    argv = [
        "--families", "olmoe",
        "--routers", "sr_moe_linear", "l2r_r4_m1",
        "--steps", "0", "3",
        "--tokens", "256",
        "--finetune_steps", "1",
        "--max_eval_blocks", "4",
        "--reference_dir", str(tiny_reference),
        "--output_dir", str(out),
        "--no_plot",
    ]  # fmt: skip
    assert conversion.main(argv) == 0
    payload = json.loads((out / "conversion.json").read_text())
    (result,) = payload["results"]
    rows = {(r["router"], r["distill_steps"]): r for r in result["rows"]}
    assert set(rows) == {("sr_moe_linear", 0), ("sr_moe_linear", 3), ("l2r_r4_m1", 0), ("l2r_r4_m1", 3)}
    linear = rows[("sr_moe_linear", 0)]
    # SR-MoE linear scoring copies the gate: the same model, to the last bit.
    assert linear["perplexity"] == result["original_perplexity"]
    assert linear["top1_agreement"] == linear["topk_agreement"] == 1.0
    # rank 4 of an 8-expert gate drops directions: the routing changes
    assert rows[("l2r_r4_m1", 0)]["topk_agreement"] < 1.0
    goals = {g["router"]: g for g in payload["goals"]}
    assert goals["sr_moe_linear"]["goal_met"] is True
    assert [r["router"] for r in result["finetune"]] == ["original (unpatched)", "sr_moe_linear", "l2r_r4_m1"]
    table = (out / "conversion.md").read_text()
    assert "| olmoe | sr_moe_linear |" in table and "yes" in table
    # the distilled exact router stays exact (distill_router keeps the better of start and end)
    assert rows[("sr_moe_linear", 3)]["perplexity"] == result["original_perplexity"]
    assert set(result["rank_limits"]) == {"4"} and "What a latent rank can reach" in table


def test_rank_limit_truncates_every_gate_to_that_rank(conversion, tiny_reference, monkeypatch):
    model, _, validation = conversion.load_family(tiny_reference / "olmoe", max_eval_blocks=2)
    seen = []
    monkeypatch.setattr(conversion, "perplexity", lambda m, blocks: seen.append(m) or 1.0)
    conversion.rank_limited_perplexity(model, 3, validation)
    (limited,) = seen
    gates = {n: p for n, p in limited.named_parameters() if n.endswith(".gate.weight")}
    assert gates
    for name, gate in gates.items():
        original = model.get_parameter(name).detach()
        assert torch.linalg.matrix_rank(gate.detach()) == 3
        # the best rank-3 approximation: the error is the dropped singular values (Eckart-Young)
        dropped = torch.linalg.svdvals(original)[3:]
        assert torch.linalg.matrix_norm(gate.detach() - original) == pytest.approx(
            float(dropped.norm()), rel=1e-4
        )


def test_goal_needs_one_percent_within_the_budget(conversion):
    def row(router, steps, tokens, ratio):
        return {
            "family": "f",
            "router": router,
            "distill_steps": steps,
            "calibration_tokens": tokens,
            "perplexity": 100 * ratio,
            "perplexity_ratio": ratio,
        }

    rows = [
        row("l2r", 0, None, 1.2),
        row("l2r", 200, 100_000, 1.02),
        row("l2r", 1000, 100_000, 1.005),  # meets 1% only beyond the step budget
        row("cosine", 0, None, 1.05),
        row("cosine", 200, 10_000, 1.009),
    ]
    goals = {
        g["router"]: g
        for g in conversion.goal_rows([{"family": "f", "original_perplexity": 100.0, "rows": rows}])
    }
    assert goals["l2r"]["goal_met"] is False
    assert goals["l2r"]["best_within_goal"]["distill_steps"] == 200
    assert goals["l2r"]["best_overall"]["distill_steps"] == 1000
    assert goals["cosine"]["goal_met"] is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--routers", "nope"], "--routers: unknown ['nope']"),
        (["--families", "llama"], "--families: unknown ['llama']"),
        (["--steps", "-1"], "--steps: must be >= 0"),
        (["--tokens", "10"], "--tokens: each must be >= 128"),
        (["--reference_dir", "/nonexistent"], "has no config.json"),
    ],
)
def test_bad_flags_exit_2_with_one_line(conversion, argv, message, capsys):
    assert conversion.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_peak_rss_sees_an_allocation():
    # In a fresh process: in this one, memory freed by earlier tests can take the allocation without
    # the resident set growing at all.
    code = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('conversion_benchmark', {str(SCRIPT)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "with module.PeakRSS() as memory:\n"
        "    block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched\n"
        "    block += 1\n"
        "del block\n"
        "print(memory.growth_mb)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert float(out.stdout.split()[-1]) > 32

"""The training scripts end to end on tiny settings: outputs, reload, resume, patch-and-fine-tune."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import hf_moe_routers  # noqa: F401  (registers the routed model types)
from hf_moe_routers.scripts import clm, finetune

TINY = [
    "--hidden_size",
    "32",
    "--num_hidden_layers",
    "2",
    "--num_attention_heads",
    "2",
    "--num_experts",
    "4",
    "--expert_intermediate_size",
    "32",
    "--vocab_size",
    "300",
    "--block_size",
    "32",
    "--max_train_blocks",
    "64",
    "--max_eval_blocks",
    "8",
    "--per_device_train_batch_size",
    "4",
    "--per_device_eval_batch_size",
    "8",
    "--logging_steps",
    "2",
    "--eval_steps",
    "4",
    "--save_steps",
    "2",
    "--disable_tqdm",
    "true",
    "--router_plots",
    "false",
]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def keep_torch_threads(monkeypatch: pytest.MonkeyPatch):
    """Put torch's thread count back after a run with ``--threads``: other tests compare results bit
    for bit, and the count changes the order of floating-point reductions. The inter-op count can be
    set once per process, so its setter is a no-op here."""
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda threads: None)
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_train_clm_trains_with_threads_records_them_and_keeps_one_resumable_checkpoint(
    tmp_path, monkeypatch, keep_torch_threads
):
    # 2 threads: not the test run's OMP_NUM_THREADS=1, so only --threads can have set it.
    seen: list[int] = []
    train_and_evaluate = clm.train_and_evaluate

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())  # as training starts, after data and model are built
        return train_and_evaluate(*args, **kwargs)

    monkeypatch.setattr(clm, "train_and_evaluate", recording)
    output = tmp_path / "out"
    # save_total_limit is left at the scripts' default (1), as in the main job.
    clm.main(TINY + ["--threads", "2", "--max_steps", "4", "--output_dir", str(output)])
    assert seen == [2]
    info = json.loads((output / "run_info.json").read_text())
    assert info["run_parameters"]["torch_threads"] == 2
    assert "| `torch_threads` | 2 |" in (output / "README.md").read_text()
    # What the README's main-job section says is written: only the newest checkpoint (saves at
    # steps 2 and 4), resumable: weights with the optimizer, scheduler and RNG state.
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4"]
    checkpoint = output / "checkpoint-4"
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (checkpoint / name).is_file(), name
    assert (checkpoint / "optimizer.pt").stat().st_size > (checkpoint / "model.safetensors").stat().st_size


def test_main_job_defaults_keep_the_checkpoint_the_readme_names():
    # README: the main job keeps `checkpoint-300/` and resumes from it; the defaults decide that.
    *_, args = clm.parse_args(["--output_dir", "outputs/main_job"])
    assert (args.max_steps, args.save_total_limit, args.save_only_model) == (300, 1, False)
    assert args.max_steps % args.save_steps == 0  # the last save is at step 300
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"outputs/main_job/checkpoint-{args.max_steps}/" in readme


@pytest.mark.parametrize("architecture", ["olmoe", "mixtral"])
def test_train_clm_writes_a_model_that_reloads_and_resumes_identically(tmp_path, architecture):
    common = TINY + [
        "--architecture",
        architecture,
        "--router_type",
        "sr_moe",
        "--router_kwargs",
        '{"sigma_method": "power", "spectral_mode": "constrain"}',
    ]
    full = tmp_path / "full"
    metrics = clm.main(common + ["--output_dir", str(full), "--max_steps", "4", "--save_total_limit", "3"])
    assert metrics["eval_perplexity"] > 1 and "eval_router/load_entropy" in metrics
    saved = json.loads((full / "routing_metrics.json").read_text())
    assert saved["eval_loss"] == pytest.approx(metrics["eval_loss"])
    assert (full / "routing_history.json").is_file() and (full / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(full)
    assert model.config.model_type == f"routed_{architecture}"
    assert model.config.router_config.spectral_mode == "constrain"

    # Resume from the step-2 checkpoint of that run: the router state (weights, power-iteration
    # vectors, optimizer) comes back and the final weights equal the uninterrupted run's.
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    clm.main(
        common
        + [
            "--output_dir",
            str(resumed),
            "--max_steps",
            "4",
            "--resume_from_checkpoint",
            str(resumed / "checkpoint-2"),
        ]
    )
    final, again = _state(model), _state(AutoModelForCausalLM.from_pretrained(resumed))
    assert final.keys() == again.keys()
    for key in final:
        torch.testing.assert_close(again[key], final[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any("power_u" in k for k in final)


def test_train_clm_rejects_bad_flags(tmp_path):
    with pytest.raises(ValueError, match="router_type must be one of"):
        clm.main(TINY + ["--router_type", "hash", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="architecture must be one of"):
        clm.main(TINY + ["--architecture", "gpt2", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="router_kwargs must be a JSON object"):
        clm.main(TINY + ["--router_kwargs", "rank=4", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="L2RConfig.rank must be >= 1"):
        clm.main(TINY + ["--router_kwargs", '{"rank": 0}', "--output_dir", str(tmp_path)])


def test_finetune_patched_patches_distils_trains_and_saves(tmp_path):
    base = tiny_model("olmoe", vocab_size=300)
    base.save_pretrained(tmp_path / "base")
    output = tmp_path / "out"
    metrics = finetune.main(
        [
            "--model_name_or_path",
            str(tmp_path / "base"),
            "--router_type",
            "l2r",
            "--router_kwargs",
            '{"rank": 8, "num_anchors": 2}',
            "--distill_steps",
            "5",
            "--output_dir",
            str(output),
            "--max_steps",
            "2",
            "--block_size",
            "32",
            "--max_train_blocks",
            "32",
            "--max_eval_blocks",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--logging_steps",
            "1",
            "--save_steps",
            "2",
            "--disable_tqdm",
            "true",
            "--router_plots",
            "false",
        ]
    )
    assert "eval_router/flip_rate" in metrics
    card = (output / "README.md").read_text()
    # The patch and distillation flags are on the card with the training hyper-parameters.
    for row in ("| `distill_steps` | 5 |", "| `router_type` | l2r |", "| `distill_lr` | 0.01 |"):
        assert row in card, row
    loaded = AutoModelForCausalLM.from_pretrained(output).eval()
    assert loaded.config.model_type == "routed_olmoe" and loaded.config.router_config.rank == 8
    ids = torch.randint(0, 300, (1, 12))
    reloaded = AutoModelForCausalLM.from_pretrained(output).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reloaded(ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="is not a saved model folder"):
        finetune.main(["--model_name_or_path", str(tmp_path / "nothing"), "--output_dir", str(output)])


#: A LoRA run of two steps on a tiny checkpoint, no checkpoints or plots.
LORA_TINY = [
    "--merge",
    "true",
    "--lora_r",
    "2",
    "--threads",
    "2",
    "--block_size",
    "32",
    "--max_train_blocks",
    "16",
    "--max_eval_blocks",
    "4",
    "--per_device_train_batch_size",
    "4",
    "--logging_steps",
    "1",
    "--save_strategy",
    "no",
    "--eval_strategy",
    "no",
    "--disable_tqdm",
    "true",
    "--router_plots",
    "false",
]


def _merged_card_rows(folder) -> tuple[str, dict]:
    """The merged folder's README.md and run_info.json."""
    return (folder / "README.md").read_text(), json.loads((folder / "run_info.json").read_text())


def test_finetune_of_a_routed_checkpoint_reports_its_own_router(tmp_path, monkeypatch, capsys):
    base = hf_moe_routers.patch_moe_routers(tiny_model("olmoe", vocab_size=300), hf_moe_routers.SRMoEConfig())
    base.save_pretrained(tmp_path / "base")
    output = tmp_path / "out"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # no --threads: the documented default decides
    finetune.main(
        LORA_TINY[LORA_TINY.index("--block_size") :]  # data and logging flags: no LoRA ones, no --threads
        + ["--model_name_or_path", str(tmp_path / "base"), "--output_dir", str(output), "--max_steps", "1"]
    )
    # Trained as it is (no patch): --router_type's default (l2r) and the distillation flags did not
    # apply, so neither the report nor the card may name them.
    assert "router                       sr_moe" in capsys.readouterr().out
    card = (output / "README.md").read_text()
    assert "| `router_type` |" not in card and "| `distill_steps` |" not in card
    assert "| `torch_threads` | 1 |" in card


def test_finetune_lora_saves_an_adapter_and_a_merged_model(tmp_path, keep_torch_threads, capsys):
    from peft import PeftModel

    from hf_moe_routers.cards import is_generated_card
    from hf_moe_routers.cards.card_sections import format_parameter_count
    from hf_moe_routers.scripts import lora

    base = hf_moe_routers.patch_moe_routers(tiny_model("olmoe", vocab_size=300), hf_moe_routers.SRMoEConfig())
    base.save_pretrained(tmp_path / "base")
    output = tmp_path / "lora"
    lora.main(
        LORA_TINY
        + [
            "--model_name_or_path",
            str(tmp_path / "base"),
            "--output_dir",
            str(output),
            "--max_steps",
            "2",
        ]
    )
    # The base is routed (SR-MoE): it is trained as it is, and the report names its router, not
    # --router_type's default (l2r).
    assert "router                       sr_moe" in capsys.readouterr().out
    assert (output / "adapter_config.json").is_file() and (output / "merged" / "config.json").is_file()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), output
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(output / "merged").eval()
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)

    # The merged folder's card is rendered from the run, as every folder the package writes.
    card, info = _merged_card_rows(output / "merged")
    assert is_generated_card(output / "merged" / "README.md")
    assert f"LoRA fine-tune of the routed checkpoint `{tmp_path / 'base'}`, merged." in card
    assert "the bundled Shakespeare subset" in card and "16 blocks of 32 tokens" in card
    for row in (
        "| `lora_r` | 2 |",
        "| `learning_rate` | 0.001 |",
        "| `trained_steps` | 2 |",
        "| `torch_threads` | 2 |",
    ):
        assert row in card, row
    assert "| `router_type` |" not in card  # the flag did not apply to a routed base
    parameters = sum(p.numel() for p in merged.parameters())
    assert f"| Parameters | {format_parameter_count(parameters)} |" in card
    assert info["parameters"] == parameters and info["run_parameters"]["lora_alpha"] == 16
    assert "validation perplexity" in card  # the final evaluation's metric table


def test_finetune_lora_merged_card_names_a_base_it_patched(tmp_path, keep_torch_threads):
    from hf_moe_routers.scripts import lora

    tiny_model("olmoe", vocab_size=300).save_pretrained(tmp_path / "plain")
    output = tmp_path / "lora"
    lora.main(
        LORA_TINY
        + [
            "--model_name_or_path",
            str(tmp_path / "plain"),
            "--router_type",
            "cosine",
            "--output_dir",
            str(output),
            "--max_steps",
            "1",
        ]
    )
    card, info = _merged_card_rows(output / "merged")
    # Patched in this run: the base is the card's "Patched from" row, the patch flags are listed.
    assert f"| Patched from | `{tmp_path / 'plain'}` |" in card
    assert "| `router_type` | cosine |" in card and info["run_parameters"]["router_type"] == "cosine"
    assert "| `torch_threads` | 2 |" in card


@pytest.mark.parametrize("script", ["train_clm.py", "finetune_patched.py", "finetune_lora.py"])
def test_example_scripts_report_bad_flags_in_one_line(script):
    """``examples/*.py`` answer an unknown flag as the CLI does: one line, exit 2, no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / script
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(path), "--no_such_flag", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"examples/{script}: error: "), done.stderr
    assert "--no_such_flag" in lines[0] or "required" in lines[0], lines[0]  # finetune: its path first

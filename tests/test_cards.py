"""The card of every model folder the package writes is rendered from what that run recorded.

Main job (``hf-moe-routers train``), ``patch`` and ``MoERouterTrainer.save_model``: the README.md
names the data, the hyper-parameters and the parameter count, shows the routing-metric table of the
run's final measurement (the values of its ``routing_metrics.json``) and links the plots in the
folder; ``hf-moe-routers card`` renders the same from the folder alone (``run_info.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import RandomTokens, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

import hf_moe_routers as H
from hf_moe_routers import cards
from hf_moe_routers.cards.card_sections import PLOT_FILES, format_value
from hf_moe_routers.cli import main
from hf_moe_routers.trainers import MoERouterTrainer, MoERouterTrainingArguments

#: The main job's flags, shrunk to a 2-step run of a 2-layer, 4-expert model (tests/test_scripts.py).
TINY_TRAIN = [
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
    "16",
    "--max_eval_blocks",
    "4",
    "--per_device_train_batch_size",
    "4",
    "--per_device_eval_batch_size",
    "4",
    "--max_steps",
    "2",
    "--logging_steps",
    "1",
    "--eval_steps",
    "2",
    "--save_steps",
    "2",
    "--learning_rate",
    "0.003",
    "--disable_tqdm",
    "true",
]


def _numel(folder: Path) -> int:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _assert_metric_rows(
    card: str, metrics: dict, names: tuple[str, ...] = ("load_entropy", "load_cv")
) -> None:
    """Each named metric's row holds the mean and per-layer values of ``metrics`` (the JSON file)."""
    layers = sorted({k.split("/")[2] for k in metrics if k.startswith("eval_router/") and k.count("/") == 2})
    assert layers
    for name in names:
        cells = [format_value(metrics[f"eval_router/{name}/{layer}"]) for layer in layers]
        row = f"| {name} | {format_value(metrics[f'eval_router/{name}'])} | " + " | ".join(cells) + " |"
        assert row in card, row


def test_main_job_card_has_data_hyperparameters_parameters_metrics_and_plots(tmp_path):
    out = tmp_path / "main_job"
    assert main(["train", *TINY_TRAIN, "--output_dir", str(out)]) == 0
    card = (out / "README.md").read_text()
    metrics = json.loads((out / "routing_metrics.json").read_text())

    assert "**Data.** Trained on the bundled Shakespeare subset (`shakespeare-subset`)" in card
    assert (
        "training: 16 blocks of 32 tokens (512 tokens); validation: 4 blocks of 32 tokens (128 tokens)"
        in card
    )
    assert "No training information was recorded" not in card and "No routing evaluation" not in card
    for row in (
        "| `learning_rate` | 0.003 |",
        "| `max_steps` | 2 |",
        "| `per_device_train_batch_size` | 4 |",
        "| `router_balance_loss` | per_layer |",
        "| `trained_steps` | 2 |",
    ):
        assert row in card, row
    assert f"| Parameters | {_numel(out):,} |" in card
    assert f"validation loss: **{metrics['eval_loss']:.4f}**" in card
    _assert_metric_rows(card, metrics)
    for alt, name in PLOT_FILES:
        assert (out / name).is_file() and f"![{alt}]({name})" in card
    assert "pip install hf-moe-routers`" not in card and "pip install /path/to/hf-moe-routers" in card

    # `hf-moe-routers card` renders it again from the folder alone: nothing is lost.
    again = str(cards.folder_model_card(AutoConfig.from_pretrained(out), out))
    for part in ("**Data.** Trained on", f"| Parameters | {_numel(out):,} |", "| `learning_rate` | 0.003 |"):
        assert part in again, part
    _assert_metric_rows(again, metrics)


def test_patch_card_has_calibration_distillation_parameters_and_metrics(tmp_path, capsys):
    tiny_model("olmoe").save_pretrained(tmp_path / "olmoe")
    out = tmp_path / "olmoe-l2r"
    argv = [
        "patch",
        str(tmp_path / "olmoe"),
        "--router_type",
        "l2r",
        "--router_kwargs",
        '{"rank": 8, "num_anchors": 2}',
    ]
    argv += ["--num_blocks", "4", "--block_size", "16", "--batch_size", "2", "--distill_steps", "2"]
    assert main([*argv, "--output_dir", str(out)]) == 0
    card = (out / "README.md").read_text()
    metrics = json.loads((out / "routing_metrics.json").read_text())

    assert "calibrated on 4 blocks of 16 tokens (64 tokens) of random token ids" in card
    assert "then distilled to the original gates for 2 steps" in card
    for row in ("| `calibration_blocks` | 4 |", "| `distill_steps` | 2 |", "| `distill_lr` | 0.01 |"):
        assert row in card, row
    assert f"| Parameters | {_numel(out):,} |" in card and "of top-k choices" in card
    assert "On the 64 calibration tokens per router, after patching and distillation" in card
    _assert_metric_rows(card, metrics)
    again = str(cards.folder_model_card(AutoConfig.from_pretrained(out), out))
    assert "of top-k choices" in again and f"| Parameters | {_numel(out):,} |" in again
    assert "| `distill_steps` | 2 |" in again and "On the 64 calibration tokens" in again


def test_trainer_save_model_card_is_rendered_from_the_run(tmp_path):
    model = H.patch_moe_routers(tiny_model("mixtral"), H.L2RConfig(rank=8, num_anchors=2))
    args = MoERouterTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        router_plots=True,
        seed=0,
    )
    trainer = MoERouterTrainer(
        model=model, args=args, train_dataset=RandomTokens(8), eval_dataset=RandomTokens(4, seed=1)
    )
    trainer.train()
    metrics = trainer.evaluate()
    saved = tmp_path / "saved"  # not output_dir: the plots drawn there come along
    trainer.save_model(str(saved))
    card = (saved / "README.md").read_text()
    assert "**Data.** The Trainer's datasets: training: 8 examples; validation: 4 examples." in card
    assert "| `learning_rate` | 0.001 |" in card and "| `trained_steps` | 2 |" in card
    assert f"| Parameters | {sum(p.numel() for p in model.parameters()):,} |" in card
    _assert_metric_rows(card, metrics)
    for name in ("routing_load_heatmap_eval.png", "routing_curves.png"):
        assert (saved / name).is_file() and f"]({name})" in card

    # A hand-written README survives save_model.
    (saved / "README.md").write_text("# mine\n")
    trainer.save_model(str(saved))
    assert (saved / "README.md").read_text() == "# mine\n"


@pytest.mark.parametrize("count, text", [(44196, "44,196"), (12_345_678, "12,345,678 (12.35M)")])
def test_parameter_count_is_exact(count, text):
    assert cards.card_sections.format_parameter_count(count) == text


def test_card_shows_specialisation_metrics_and_domains_when_the_metrics_have_them():
    from hf_moe_routers.metrics.catalog import METRIC_DESCRIPTIONS

    metrics = {
        "eval_router/load_entropy": 0.9,
        "eval_router/load_entropy/layer_0": 0.9,
        "eval_router/router_saturation": 0.75,
        "eval_router/router_saturation/layer_0": 0.75,
        "eval_router/vocab_specialisation/layer_0": 0.5,
        "eval_router/token_expert_mi/layer_0": "nan",  # a layer without a value: "–"
        "eval_router_domains/Julius Caesar/domain_tv": 0.125,
        "eval_router_domains/Julius Caesar/domain_kl": 0.0123456,
        "eval_router_domains/The Comedy of Errors/domain_tv": 0.25,
    }
    text = cards.build_model_card(tiny_model("olmoe"), metrics=metrics).text
    assert "| router_saturation | 0.75 | 0.75 |" in text
    assert "| vocab_specialisation | 0.5 | 0.5 |" in text and "| token_expert_mi | – | – |" in text
    # Canonical order: the load metric before the specialisation rows; their legend from the catalog.
    assert text.index("| load_entropy |") < text.index("| router_saturation |")
    assert f"`router_saturation`: {METRIC_DESCRIPTIONS['router_saturation']}" in text
    assert "| domain | domain_tv | domain_kl |" in text
    assert "| Julius Caesar | 0.125 | 0.01235 |" in text and "| The Comedy of Errors | 0.25 | – |" in text
    # Without domain keys there is no domain table.
    plain = cards.build_model_card(tiny_model("olmoe"), metrics={"eval_router/load_entropy": 0.9}).text
    assert "| domain |" not in plain

"""The ``hf-moe-routers`` command line: patch, card, inspect, bench, help and errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, BertConfig

import hf_moe_routers as H
from hf_moe_routers import cards, data_utils, modeling
from hf_moe_routers import metrics as M
from hf_moe_routers.cli import COMMANDS, main

REMOTE_FILES = {
    "modeling_routed_moe.py",
    "routed_moe_families.py",
    "routed_moe_modeling_base.py",
    "routed_moe_numerics.py",
    "routed_moe_routers.py",
    "routed_moe_routers_base.py",
    "routed_moe_routers_cosine.py",
    "routed_moe_routers_l2r.py",
    "routed_moe_routers_linear.py",
    "routed_moe_routers_sr_moe.py",
}
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "README.md"}
L2R_KWARGS = '{"rank": 8, "num_anchors": 2}'


def realign(model):
    """Aligned copies of every tensor (see tests/test_modeling.py: safetensors gives unaligned views)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    return model


def run_error(argv: list[str], capsys) -> str:
    """Run a command that must fail with status 2; return its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> dict[str, Path]:
    """A tiny Mixtral with a byte-level BPE tokenizer of its vocabulary, saved, and a text file."""
    root = tmp_path_factory.mktemp("cli")
    text = data_utils.bundled_corpus()["train"][0][:30000]
    tokenizer = data_utils.train_bpe_tokenizer([text], vocab_size=300)
    model = tiny_model("mixtral", vocab_size=len(tokenizer))
    model.save_pretrained(root / "mixtral")
    tokenizer.save_pretrained(root / "mixtral")
    (root / "text.txt").write_text(text[:6000])
    return {"model": root / "mixtral", "text": root / "text.txt", "root": root}


@pytest.fixture
def olmoe_folder(tmp_path) -> Path:
    tiny_model("olmoe").save_pretrained(tmp_path / "olmoe")
    return tmp_path / "olmoe"


def _blocks(model_path: Path, text_file: Path, block_size: int, num_blocks: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, _ = data_utils.build_lm_datasets(
        data_utils.load_text_files([text_file]), None, tokenizer, block_size, max_train_blocks=num_blocks
    )
    return train.blocks


# --------------------------------------------------------------------------------------------
# help
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["patch", "card", "inspect", "bench", "patch-demo", "train", "finetune"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if command in ("train", "finetune"):
        assert "--router_type" in out and "--learning_rate" in out
    else:
        assert f"hf-moe-routers {command}" in out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


# --------------------------------------------------------------------------------------------
# patch
# --------------------------------------------------------------------------------------------


def test_patch_distils_and_saves_exactly_what_the_api_would(text_model, tmp_path, capsys):
    out = tmp_path / "mixtral-l2r"
    argv = ["patch", str(text_model["model"]), "--router_type", "l2r", "--router_kwargs", L2R_KWARGS]
    argv += ["--output_dir", str(out), "--distill_steps", "3", "--text_file", str(text_model["text"])]
    argv += ["--block_size", "32", "--num_blocks", "4", "--batch_size", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    # The same steps through the Python API.
    blocks = _blocks(text_model["model"], text_model["text"], 32, 4)
    batches = [{"input_ids": blocks[i : i + 2]} for i in range(0, 4, 2)]
    reference, report = H.patch_moe_routers(
        AutoModelForCausalLM.from_pretrained(text_model["model"]),
        H.L2RConfig(rank=8, num_anchors=2),
        calibration_batches=batches,
        return_report=True,
    )
    distilled = H.distill_router(reference, batches, steps=3)
    assert f"patched: {report}" in printed and f"after 3 distillation steps: {distilled}" in printed

    loaded = realign(AutoModelForCausalLM.from_pretrained(out).eval())
    assert type(loaded) is H.RoutedMixtralForCausalLM and loaded.config.router_config == H.L2RConfig(
        rank=8, num_anchors=2
    )
    state, expected = loaded.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    files = {p.name for p in out.iterdir()}
    assert MODEL_FILES | REMOTE_FILES <= files and "tokenizer.json" in files
    assert modeling.check_remote_code(out) == []
    card = (out / "README.md").read_text()
    assert (
        f"Patched from | `{text_model['model']}`" in card
        and f"{distilled.mean_topk_agreement:.1%} of top-k" in card
    )
    # routing_metrics.json has the specialisation metrics of the saved routers on the same blocks
    from hf_moe_routers.reporting.collector import RouterCollector

    collector = RouterCollector(reference.eval())
    chosen = [[] for _ in collector.routers]
    with torch.no_grad():
        for batch in batches:
            collector.start()
            reference(**batch)
            for layer, capture in enumerate(collector.stop()):
                chosen[layer].append(capture.indices_TK)
    ids = torch.cat([b["input_ids"].reshape(-1) for b in batches])
    saved = json.loads((out / "routing_metrics.json").read_text())
    for info, indices in zip(collector.routers, chosen):
        counts = M.token_expert_counts(ids, torch.cat(indices), info.num_experts).counts_VE
        mi = float(M.mutual_information(counts, unit="bits", miller_madow=True))
        assert saved[f"eval_router/token_expert_mi/{info.layer}"] == pytest.approx(mi, rel=1e-6, abs=1e-9)


def test_patch_without_a_tokenizer_calibrates_on_random_ids_and_loads_without_the_package(
    olmoe_folder, tmp_path, capsys
):
    out = tmp_path / "olmoe-sr"
    argv = [
        "patch",
        str(olmoe_folder),
        "--router_type",
        "sr_moe",
        "--router_kwargs",
        '{"scoring": "prototype"}',
    ]
    assert main([*argv, "--output_dir", str(out), "--num_blocks", "2", "--block_size", "8"]) == 0
    assert "calibrating on random token ids" in capsys.readouterr().out
    # The card's sources: the routing measured on the calibration blocks, and what the run recorded.
    card_sources = {"routing_metrics.json", "run_info.json"}
    assert {p.name for p in out.iterdir()} == MODEL_FILES | REMOTE_FILES | card_sources
    model = realign(AutoModelForCausalLM.from_pretrained(out).eval())
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(input_ids=ids).logits}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_moe_routers"] = None  # the package cannot be imported in this process
        import torch
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                tensor.data = tensor.data.clone()
            assert torch.equal(model(input_ids=ref["ids"]).logits, ref["logits"])
        print("ok")
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", ""), "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def _bert_folder(tmp_path: Path) -> Path:
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.mark.parametrize(
    "make_path, router_type, router_kwargs, message",
    [
        (lambda t, o: t / "missing", "l2r", "{}", "is not a folder"),
        (lambda t, o: t, "l2r", "{}", "it has no config.json"),
        (lambda t, o: _bert_folder(t), "l2r", "{}", "unsupported model family 'bert'"),
        (lambda t, o: o, "l2r", "{rank: 8}", "--router_kwargs must be a JSON object"),
        (lambda t, o: o, "l2r", "[8]", "--router_kwargs must be a JSON object"),
        (lambda t, o: o, "l2r", '{"bogus": 1}', "Unknown field(s) ['bogus'] for L2RConfig"),
        (lambda t, o: o, "sr_moe", '{"scoring": "nope"}', "SRMoEConfig.scoring must be one of"),
        (
            lambda t, o: o,
            "top2",
            "{}",
            "router_type must be one of 'cosine', 'l2r', 'linear', 'sr_moe'; got 'top2'",
        ),
        (
            lambda t, o: o,
            "l2r",
            "{}",
            "L2RConfig.rank must be between 1 and the model's hidden size 32; got 128",
        ),
    ],
    ids=[
        "missing",
        "no-config",
        "bert",
        "bad-json",
        "not-object",
        "unknown-field",
        "bad-value",
        "bad-type",
        "too-big",
    ],
)
def test_patch_reports_bad_input_with_status_2(
    make_path, router_type, router_kwargs, message, olmoe_folder, tmp_path, capsys
):
    path = make_path(tmp_path, olmoe_folder)
    argv = ["patch", str(path), "--router_type", router_type, "--router_kwargs", router_kwargs]
    err = run_error(
        [*argv, "--output_dir", str(tmp_path / "out"), "--num_blocks", "1", "--block_size", "4"], capsys
    )
    assert "hf-moe-routers patch: error:" in err and message in err
    assert not (tmp_path / "out").exists()


def test_patch_refuses_an_already_routed_checkpoint(olmoe_folder, tmp_path, capsys):
    H.patch_moe_routers(tiny_model("olmoe"), H.SRMoEConfig()).save_pretrained(tmp_path / "routed")
    err = run_error(
        ["patch", str(tmp_path / "routed"), "--router_type", "l2r", "--output_dir", str(tmp_path / "o")],
        capsys,
    )
    assert "already patched" in err


def test_missing_required_option_is_an_argparse_error(olmoe_folder, capsys):
    err = run_error(["patch", str(olmoe_folder), "--router_type", "l2r"], capsys)
    assert "--output_dir" in err


# --------------------------------------------------------------------------------------------
# card
# --------------------------------------------------------------------------------------------


def test_card_renders_a_metrics_json_and_keeps_hand_written_readmes(tmp_path, capsys):
    folder = tmp_path / "model"
    modeling.save_routed_pretrained(
        H.patch_moe_routers(tiny_model("mixtral"), H.CosineRouterConfig(dim=6)), folder
    )
    metrics = {
        "eval_loss": 2.5,
        "eval_router/load_cv": 0.25,
        "eval_router/load_cv/layer_0": 0.5,
        "eval_router/load_cv/layer_1": 0,
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert (
        main(
            [
                "card",
                str(folder),
                "--metrics",
                str(tmp_path / "metrics.json"),
                "--model_id",
                "me/m",
                "--license",
                "mit",
            ]
        )
        == 0
    )
    card = (folder / "README.md").read_text()
    assert "| load_cv | 0.25 | 0.5 | 0 |" in card and "validation loss: **2.5000**" in card
    assert "license: mit" in card and 'from_pretrained("me/m", trust_remote_code=True)' in card
    capsys.readouterr()
    assert main(["card", str(folder), "--print"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("---\n") and "library_name: transformers" in printed
    (folder / "README.md").write_text("# hand-written\n")
    err = run_error(["card", str(folder)], capsys)
    assert (
        "was not written by hf-moe-routers" in err
        and (folder / "README.md").read_text() == "# hand-written\n"
    )
    assert main(["card", str(folder), "--output", str(tmp_path / "CARD.md")]) == 0
    assert "cosine-router" in (tmp_path / "CARD.md").read_text()
    assert main(["card", str(folder), "--force"]) == 0 and cards.is_generated_card(folder / "README.md")


def test_card_reports_bad_input_with_status_2(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_model("olmoe").save_pretrained(folder)
    assert "no config.json" in run_error(["card", str(tmp_path)], capsys)
    assert "--metrics" in run_error(["card", str(folder), "--metrics", str(tmp_path / "none.json")], capsys)
    (tmp_path / "list.json").write_text("[1, 2]")
    assert "JSON object" in run_error(["card", str(folder), "--metrics", str(tmp_path / "list.json")], capsys)
    assert "unsupported model family 'bert'" in run_error(["card", str(_bert_folder(tmp_path))], capsys)


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def test_inspect_metrics_match_a_direct_computation(text_model, tmp_path, capsys):
    folder = tmp_path / "routed"
    model = H.patch_moe_routers(
        AutoModelForCausalLM.from_pretrained(text_model["model"]), H.L2RConfig(rank=8, num_anchors=2)
    )
    modeling.save_routed_pretrained(model, folder)
    shutil.copy(text_model["model"] / "tokenizer.json", folder)
    shutil.copy(text_model["model"] / "tokenizer_config.json", folder)
    argv = [
        "inspect",
        str(folder),
        "--text_file",
        str(text_model["text"]),
        "--block_size",
        "16",
        "--max_blocks",
        "6",
    ]
    assert main([*argv, "--batch_size", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["model_type"] == "routed_mixtral"
        and report["router"] == H.L2RConfig(rank=8, num_anchors=2).to_dict()
    )
    assert list(report["layers"]) == ["layer_0", "layer_1"] and report["tokens"] == 6 * 16

    # Reference: the model's own recorded router logits, through hf_moe_routers.metrics.
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    blocks = _blocks(text_model["model"], text_model["text"], 16, 6)
    with torch.no_grad():
        outputs = [loaded(input_ids=blocks[i : i + 4], output_router_logits=True) for i in (0, 4)]
    for layer in range(2):
        logits = torch.cat([o.router_logits[layer] for o in outputs]).float()
        expected = M.routing_metrics(logits, logits.topk(2, dim=-1).indices, top_k=2)
        for name, value in expected.items():
            assert report["layers"][f"layer_{layer}"][name] == pytest.approx(
                float(value), rel=1e-5, abs=1e-6
            ), name
        bound = loaded.model.layers[layer].mlp.gate.lipschitz_bound()
        assert report["layers"][f"layer_{layer}"]["lipschitz_bound"] == str(float(bound))  # inf: affine_tanh
    mean = (report["layers"]["layer_0"]["load_cv"] + report["layers"]["layer_1"]["load_cv"]) / 2
    assert report["mean"]["load_cv"] == pytest.approx(mean)

    # --text_file: no domains; no --reference: no saturation; the rest of the specialisation is there.
    special = report["specialisation"]
    assert special["reference"] is None and special["domains"] is None and special["domain_report"] is None
    assert "router_saturation" not in report["mean"] and "domain_tv" not in report["mean"]
    for layer in range(2):
        logits = torch.cat([o.router_logits[layer] for o in outputs]).float()
        chosen = logits.topk(2, dim=-1).indices
        num_experts = logits.shape[-1]
        probs = M.coactivation(M.coactivation_counts(chosen, num_experts))
        values = report["layers"][f"layer_{layer}"]
        assert values["coactivation_top_partner"] == pytest.approx(float(M.coactivation_top_partner(probs)))
        table = M.token_expert_counts(blocks.reshape(-1), chosen, num_experts).counts_VE
        assert values["vocab_specialisation"] == pytest.approx(
            float(M.vocabulary_specialisation(table, 2, 5))
        )
        mi = M.mutual_information(table, unit="bits", miller_madow=True)
        assert values["token_expert_mi"] == pytest.approx(float(mi), abs=1e-6)
        top = special["coactivation_top_pairs"][f"layer_{layer}"]
        assert top[0]["p"] == pytest.approx(float(probs.fill_diagonal_(float("nan")).nan_to_num(-1).max()))

    assert main(argv) == 0
    table = capsys.readouterr().out
    assert '"router_type": "l2r"' in table and "\nmean " in table
    # The metric table and the specialisation table: one row per layer each.
    assert table.count("\nlayer_") == 4 and "expert specialisation" in table and "co-activation" in table


def test_inspect_an_unpatched_checkpoint_and_bad_input(text_model, olmoe_folder, capsys):
    argv = ["inspect", str(text_model["model"]), "--text_file", str(text_model["text"]), "--block_size", "16"]
    assert main([*argv, "--max_blocks", "2"]) == 0
    assert "Mixtral's own router (not patched)" in capsys.readouterr().out
    assert "pass --tokenizer" in run_error(["inspect", str(olmoe_folder)], capsys)
    err = run_error(
        ["inspect", str(text_model["model"]), "--text_file", str(text_model["root"] / "none.txt")], capsys
    )
    assert "--text_file" in err


def _routed_copy(text_model, folder: Path, *, perturb: float = 0.0) -> Path:
    """The tiny Mixtral patched with L2R routers, saved with its tokenizer (router noise optional)."""
    model = H.patch_moe_routers(
        AutoModelForCausalLM.from_pretrained(text_model["model"]), H.L2RConfig(rank=8, num_anchors=2)
    )
    if perturb:
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".gate." in name:
                    parameter.add_(perturb * torch.randn(parameter.shape, generator=generator))
    modeling.save_routed_pretrained(model, folder)
    shutil.copy(text_model["model"] / "tokenizer.json", folder)
    shutil.copy(text_model["model"] / "tokenizer_config.json", folder)
    return folder


def test_inspect_reference_gives_router_saturation(text_model, tmp_path, capsys):
    folder = _routed_copy(text_model, tmp_path / "routed")
    changed = _routed_copy(text_model, tmp_path / "changed", perturb=1.0)
    argv = ["inspect", str(folder), "--text_file", str(text_model["text"]), "--block_size", "16"]
    argv += ["--max_blocks", "6", "--json"]
    assert main([*argv, "--reference", str(folder)]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["specialisation"]["reference"] == str(folder)
    assert same["mean"]["router_saturation"] == 1.0
    assert all(same["layers"][layer]["router_saturation"] == 1.0 for layer in ("layer_0", "layer_1"))
    assert main([*argv, "--reference", str(changed)]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["mean"]["router_saturation"] < 1.0

    # The same number from the two models' own recorded routing.
    blocks = _blocks(text_model["model"], text_model["text"], 16, 6)
    models = [AutoModelForCausalLM.from_pretrained(f).eval() for f in (folder, changed)]
    with torch.no_grad():
        routed = [m(input_ids=blocks, output_router_logits=True).router_logits for m in models]
    for layer in range(2):
        mine, theirs = (r[layer].topk(2, dim=-1).indices for r in routed)
        expected = float(M.router_saturation(mine, theirs))
        assert other["layers"][f"layer_{layer}"]["router_saturation"] == pytest.approx(expected)

    plain = ["inspect", str(folder), "--text_file", str(text_model["text"]), "--block_size", "16"]
    assert main([*plain, "--max_blocks", "2", "--reference", str(changed)]) == 0
    assert "saturation against" in capsys.readouterr().out
    assert "is not a folder" in run_error([*argv, "--reference", str(tmp_path / "none")], capsys)


def test_inspect_bundled_plays_are_domains_and_the_card_shows_them(text_model, tmp_path, capsys):
    folder = _routed_copy(text_model, tmp_path / "routed")
    metrics_file = tmp_path / "out" / "routing_metrics.json"
    plot = tmp_path / "co.png"
    argv = ["inspect", str(folder), "--block_size", "32", "--max_blocks", "8", "--batch_size", "3"]
    argv += ["--output_metrics", str(metrics_file), "--plot_coactivation", str(plot), "--min_count", "2"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    plays = [e["title"] for e in data_utils.bundled_corpus_manifest()["splits"]["validation"]]
    special = report["specialisation"]
    assert special["min_count"] == 2 and list(special["domain_report"]) == plays
    assert sum(row["tokens"] for row in special["domain_report"].values()) == 8 * 32
    for name in ("domain_tv", "domain_kl"):
        assert 0.0 <= report["mean"][name] and name in report["layers"]["layer_0"]
    assert plot.is_file()
    written = json.loads(metrics_file.read_text())
    assert written["eval_router/domain_tv"] == pytest.approx(report["mean"]["domain_tv"])
    assert written["eval_router/load_entropy/layer_1"] == report["layers"]["layer_1"]["load_entropy"]
    assert f"eval_router_domains/{plays[0]}/domain_kl" in written
    # The card of the folder renders those values: the table rows and the per-play table.
    assert main(["card", str(folder), "--metrics", str(metrics_file), "--print"]) == 0
    card = capsys.readouterr().out
    assert "| vocab_specialisation |" in card and "| domain_tv |" in card
    assert f"| {plays[0]} |" in card and "`token_expert_mi`: mutual information" in card
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "domains: the bundled held-out plays" in out and all(title in out for title in plays)


def test_bundled_domain_blocks_follow_the_token_blocks(text_model):
    from transformers import AutoTokenizer

    from hf_moe_routers.cli.commands import bundled_domain_blocks
    from hf_moe_routers.cli.loading import text_blocks

    tokenizer = AutoTokenizer.from_pretrained(text_model["model"])
    # A capped run keeps evenly spaced blocks, the same ones of both.
    full_blocks = text_blocks(None, tokenizer, 32, 10**6, len(tokenizer))
    _, full_domains = bundled_domain_blocks(tokenizer, 32, 10**6)
    pick = torch.arange(8) * full_blocks.shape[0] // 8
    capped = text_blocks(None, tokenizer, 32, 8, len(tokenizer))
    assert torch.equal(capped, full_blocks[pick])
    assert torch.equal(bundled_domain_blocks(tokenizer, 32, 8)[1], full_domains[pick])
    for block_size, max_blocks in ((32, 8), (64, 10**6)):
        blocks = text_blocks(None, tokenizer, block_size, max_blocks, len(tokenizer))
        titles, domains = bundled_domain_blocks(tokenizer, block_size, max_blocks)
        assert len(titles) == 2 and domains.shape == blocks.shape
        stream, ids = domains.reshape(-1), blocks.reshape(-1)
        assert bool((stream[1:] >= stream[:-1]).all()) and set(stream.tolist()) == {0, 1}
        if max_blocks > blocks.shape[0]:  # every block: the play changes right after its EOS
            change = int((stream[1:] != stream[:-1]).nonzero()[0]) + 1
            assert int(ids[change - 1]) == tokenizer.eos_token_id


def test_inspect_min_count_default_is_the_metrics_default():
    from hf_moe_routers.cli import build_parser

    _, parsers = build_parser()
    assert parsers["inspect"].get_default("min_count") == M.DEFAULT_MIN_COUNT


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


def test_bench_runs_a_benchmark_script_with_its_arguments(tmp_path, capsys):
    (tmp_path / "bench_echo.py").write_text(
        "import json, sys\n"
        f"open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        "sys.exit(3)\n"
    )
    assert main(["bench", "--benchmarks_dir", str(tmp_path), "echo", "--device", "cpu", "--n", "1"]) == 3
    assert json.loads((tmp_path / "argv.json").read_text()) == ["--device", "cpu", "--n", "1"]
    capsys.readouterr()
    assert main(["bench", "--benchmarks_dir", str(tmp_path), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["echo"]
    err = run_error(["bench", "--benchmarks_dir", str(tmp_path), "nope"], capsys)
    assert "no benchmark 'nope'" in err and "available: echo" in err


def test_bench_lists_the_repository_benchmarks(capsys):
    if not (Path(__file__).resolve().parent.parent / "benchmarks" / "bench_dispatch.py").is_file():
        pytest.skip("benchmarks/bench_dispatch.py is not in this checkout")
    assert main(["bench", "--list"]) == 0
    assert "dispatch" in capsys.readouterr().out.split()


# --------------------------------------------------------------------------------------------
# real processes
# --------------------------------------------------------------------------------------------


def _env(tmp_path: Path) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", ""), "HF_HOME": str(tmp_path / "hf")}


def test_console_script(olmoe_folder, tmp_path):
    script = Path(sys.executable).parent / "hf-moe-routers"
    if not script.is_file():
        pytest.skip(f"{script} is not installed: reinstall the package (pip install -e .) to create it")
    result = subprocess.run(
        [str(script), "card", str(olmoe_folder), "--print"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "library_name: transformers" in result.stdout and "Olmoe's own router" in result.stdout


def test_python_dash_m_reports_errors_with_status_2(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_moe_routers",
            "patch",
            str(tmp_path / "nope"),
            "--router_type",
            "l2r",
            "--output_dir",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "hf-moe-routers patch: error:" in result.stderr and "is not a folder" in result.stderr


# --------------------------------------------------------------------------------------------
# bad input: one line and status 2 for every command
# --------------------------------------------------------------------------------------------


def assert_one_line_error(err: str, command: str, fragment: str) -> None:
    """``err`` is the two short lines every command prints for bad input: the problem, the hint."""
    # Only the last two lines: a progress bar of what ran before the check may precede them.
    lines = err.strip().splitlines()[-2:]
    assert len(lines) == 2, err
    assert lines[0].startswith(f"hf-moe-routers {command}: error: "), err
    assert fragment in lines[0], err
    assert lines[1] == f"run `hf-moe-routers {command} --help` for the options", err
    assert "Traceback" not in err and "usage:" not in err


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (
            ["--num_experts", "4", "--num_experts_per_tok", "5"],
            "num_experts_per_tok must be between 1 and num_experts (4); got 5",
        ),
        (["--router_type", "top2"], "router_type must be one of"),
        (["--router_kwargs", '{"rank": 0}'], "L2RConfig.rank must be >= 1"),
        (["--router_kwargs", "{rank: 8}"], "router_kwargs must be a JSON object"),
        (
            ["--router_kwargs", '{"rank": 512}'],
            "L2RConfig.rank must be between 1 and the model's hidden size 128",
        ),
        (["--architecture", "llama"], "architecture must be one of"),
        (
            ["--tokenizer_name_or_path", "/nonexistent/tokenizer"],
            "tokenizer_name_or_path: '/nonexistent/tokenizer'",
        ),
        (
            ["--train_files", "/nonexistent/t.txt", "--validation_files", "v.txt"],
            "--train_files: paths: '/nonexistent/t.txt' does not exist",
        ),
        (["--bogus_flag", "1"], "unrecognized arguments: --bogus_flag 1"),
        (["--max_steps", "many"], "invalid int value: 'many'"),
    ],
    ids=[
        "top-k",
        "router-type",
        "rank-0",
        "bad-json",
        "rank-too-big",
        "architecture",
        "tokenizer",
        "files",
        "unknown-flag",
        "bad-int",
    ],
)
def test_train_reports_bad_input_in_one_line_with_status_2(flags, fragment, tmp_path, capsys):
    err = run_error(["train", *flags, "--output_dir", str(tmp_path / "out")], capsys)
    assert_one_line_error(err, "train", fragment)
    assert not (tmp_path / "out").exists()  # failed while parsing: nothing trained, nothing written


@pytest.mark.parametrize(
    "make_path, flags, fragment",
    [
        (lambda t, o: t / "missing", [], "is not a saved model folder (no config.json)"),
        (lambda t, o: _bert_folder(t), [], "unsupported model family 'bert'"),
        (lambda t, o: o, ["--router_type", "top2"], "router_type must be one of"),
        (lambda t, o: o, ["--router_kwargs", '{"rank": 0}'], "L2RConfig.rank must be >= 1"),
        (lambda t, o: o, ["--router_kwargs", "{rank: 8}"], "router_kwargs must be a JSON object"),
        (lambda t, o: o, ["--distill_steps", "-1"], "distill_steps must be at least 0"),
        (lambda t, o: o, ["--bogus_flag"], "unrecognized arguments: --bogus_flag"),
    ],
    ids=["missing", "bert", "router-type", "rank-0", "bad-json", "distill-steps", "unknown-flag"],
)
def test_finetune_reports_bad_input_in_one_line_with_status_2(
    make_path, flags, fragment, olmoe_folder, tmp_path, capsys
):
    path = make_path(tmp_path, olmoe_folder)
    argv = ["finetune", "--model_name_or_path", str(path), *flags, "--output_dir", str(tmp_path / "out")]
    assert_one_line_error(run_error(argv, capsys), "finetune", fragment)
    assert not (tmp_path / "out").exists()


def test_train_block_size_longer_than_the_text_names_the_flag(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("To be, or not to be.\n")
    (tmp_path / "valid.txt").write_text("That is the question.\n")
    flags = ["--train_files", str(tmp_path / "train.txt"), "--validation_files", str(tmp_path / "valid.txt")]
    flags += ["--vocab_size", "300", "--block_size", "512", "--output_dir", str(tmp_path / "out")]
    err = run_error(["train", *flags], capsys)
    assert_one_line_error(err, "train", "--block_size 512 is longer than the training text: it gives")


def test_argparse_errors_of_every_command_are_one_line(olmoe_folder, capsys):
    err = run_error(["patch", str(olmoe_folder), "--router_type", "l2r"], capsys)
    assert_one_line_error(err, "patch", "the following arguments are required: --output_dir")
    assert_one_line_error(run_error(["card"], capsys), "card", "required: model_path")
    assert_one_line_error(
        run_error(["inspect", "x", "--block_size", "big"], capsys), "inspect", "--block_size"
    )
    err = run_error(
        ["patch", str(olmoe_folder / "nope"), "--router_type", "l2r", "--output_dir", "o"], capsys
    )
    assert_one_line_error(err, "patch", "is not a folder")
    err = run_error(["nope"], capsys)
    assert err.strip().splitlines()[-1] == "run `hf-moe-routers --help` for the options"


def test_inspect_short_text_names_block_size_and_the_numbers(text_model, tmp_path, capsys, monkeypatch):
    (tmp_path / "short.txt").write_text("To be, or not to be.")
    argv = ["inspect", str(text_model["model"]), "--text_file", str(tmp_path / "short.txt")]

    def no_weights(folder):  # the text is checked before the weights are loaded
        raise AssertionError("inspect loaded the model before checking the text")

    monkeypatch.setattr("hf_moe_routers.cli.commands.load_model", no_weights)
    err = run_error([*argv, "--block_size", "128"], capsys)
    assert_one_line_error(err, "inspect", "--block_size 128 is longer than --text_file")
    assert "fewer than one block of 128; lower --block_size to at most" in err
    assert "train_texts" not in err


def test_patch_demo_spells_distill_steps_like_patch():
    from hf_moe_routers.cli import build_parser

    _, parsers = build_parser()
    assert parsers["patch-demo"].parse_args(["--distill_steps", "3"]).distill_steps == 3
    assert parsers["patch-demo"].parse_args(["--distill-steps", "4"]).distill_steps == 4  # the old alias
    assert parsers["patch-demo"].parse_args([]).distill_steps == 100
    assert "--distill-steps" not in parsers["patch-demo"].format_help()


def test_patch_help_lists_every_family(capsys):
    with pytest.raises(SystemExit):
        main(["patch", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for family in (
        "Mixtral",
        "Qwen2-MoE",
        "Qwen3-MoE",
        "OLMoE",
        "DeepSeek-V3",
        "gpt-oss",
        "Switch Transformers",
    ):
        assert family in out


@pytest.mark.parametrize("command", ["train", "finetune"])
def test_training_help_lists_our_options_before_the_inherited_ones(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hf-moe-routers {command} [OPTIONS]\n")
    ours = out.index("model and router:" if command == "train" else "checkpoint and router:")
    data, routing = out.index("\ndata:"), out.index("routing losses and logs")
    inherited = out.index("training (inherited from transformers.TrainingArguments):")
    assert ours < data < routing < inherited
    assert ours < out.index("--router_kwargs") < data and inherited < out.index("--learning_rate")


def test_training_bad_input_has_no_traceback_in_a_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hf_moe_routers", "train", "--architecture", "llama"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "train", "architecture must be one of")

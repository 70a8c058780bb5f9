"""The README's snippets and commands work as written.

Every ```python block of README.md runs, in a subprocess without network access, after the
replacements of :data:`SUBSTITUTIONS` (tiny checkpoints for the model paths, a few steps for the
long loops; the README says so next to its Set-up commands). A block is skipped only when the line
right before it is ``<!-- not-run: reason -->``, and :data:`EXPECTED_RUN_BLOCKS` pins how many run,
so a snippet cannot drop out unnoticed.

Every ``python -m hf_moe_routers <cmd>`` / ``hf-moe-routers <cmd>`` / ``examples/*.py`` /
``accelerate launch`` / ``python -m hf_moe_routers.experiments`` command in a ```bash block (and
in inline code) is parsed by the command's own parser: the command and every flag must exist. None
of them is run (most train for minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

#: How many ```python blocks of the README run (the rest are marked not-run). Change it together
#: with the README.
EXPECTED_RUN_BLOCKS = 8
EXPECTED_NOT_RUN_BLOCKS = 1

#: (text in the README, what the test runs instead). Each must occur in at least one run block, so
#: the table cannot go stale. ``{mixtral}`` etc. are the tiny checkpoints the runner builds first.
SUBSTITUTIONS: list[tuple[str, str]] = [
    ('"path/to/mixtral"', '"{mixtral}"'),  # a plain 2-layer Mixtral, 4 experts, with a BPE tokenizer
    ('"path/to/olmoe"', '"{olmoe}"'),  # a plain 2-layer OLMoE, 4 experts, with a BPE tokenizer
    ('"outputs/main_job"', '"{main_job}"'),  # a tiny routed (L2R) OLMoE saved with its tokenizer
    ("distill_router(model, batches, steps=100)", "distill_router(model, batches, steps=3)"),
    ("max_steps=100", "max_steps=2"),
    ("max_steps=50", "max_steps=2"),
    # the shipped reference, by absolute path: blocks run in their own working directories
    ('"benchmarks/reference/olmoe"', f'"{ROOT / "benchmarks" / "reference" / "olmoe"}"'),
]

#: Output a run block must print (keyed by a fragment of its source): the numbers the README states.
EXPECTED_OUTPUT = {
    "train_bpe_tokenizer(corpus": "3.94M parameters, vocabulary 4096",
    "export_to_family(routed_model)": "OlmoeForCausalLM",
    # no training before "patched": deterministic; distillation may move the last digits elsewhere
    "L2RConfig(rank=16, num_anchors=4), calibration_batches=calibration": "original 150.89, patched 174.12, distilled 151.",
}

NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>[^>]*?)\s*-->")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$", re.M | re.S)


@dataclass
class Block:
    """One fenced code block of the README."""

    lang: str
    body: str
    line: int  # 1-based line of the opening fence
    not_run: str | None  # the reason of a ``<!-- not-run: ... -->`` marker right before it


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text``, with the not-run marker of the line before each."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.search(before)
        blocks.append(
            Block(
                lang=match["lang"],
                body=match["body"],
                line=text.count("\n", 0, match.start()) + 1,
                not_run=marker["reason"] if marker else None,
            )
        )
    return blocks


def python_blocks() -> tuple[list[Block], list[Block]]:
    """``(run, not_run)`` python blocks of the README."""
    blocks = [b for b in readme_blocks(README.read_text(encoding="utf-8")) if b.lang == "python"]
    return [b for b in blocks if b.not_run is None], [b for b in blocks if b.not_run is not None]


def substituted(source: str) -> str:
    """``source`` with every :data:`SUBSTITUTIONS` entry replaced."""
    for old, new in SUBSTITUTIONS:
        source = source.replace(old, new)
    return source


# The runner: builds the tiny checkpoints, then runs each block in a fresh namespace and a fresh
# working directory, in one interpreter (importing torch and transformers once per block would
# take most of the time budget). A fresh namespace still catches a block that uses a name it never
# defines or imports.
RUNNER = textwrap.dedent(
    r'''
    import contextlib, io, json, os, sys, traceback
    from pathlib import Path

    blocks, workdir, results_path = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), sys.argv[3]

    def checkpoints():
        """Tiny stand-ins for the README's model paths, each saved with a tokenizer."""
        import hf_moe_routers
        from hf_moe_routers import L2RConfig, patch_moe_routers
        from hf_moe_routers.data_utils import bundled_corpus, train_bpe_tokenizer
        from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig

        tokenizer = train_bpe_tokenizer(bundled_corpus()["validation"][:1], vocab_size=512)
        common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, num_experts_per_tok=2,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
        paths = {name: workdir / "checkpoints" / name for name in ("mixtral", "olmoe", "main_job")}
        models = {
            "mixtral": AutoModelForCausalLM.from_config(MixtralConfig(num_local_experts=4, **common)),
            "olmoe": AutoModelForCausalLM.from_config(OlmoeConfig(num_experts=4, **common)),
        }
        models["main_job"] = patch_moe_routers(
            AutoModelForCausalLM.from_config(OlmoeConfig(num_experts=4, **common)),
            L2RConfig(rank=16, num_anchors=2),
        )
        for name, model in models.items():
            model.save_pretrained(paths[name])
            tokenizer.save_pretrained(paths[name])
        return {name: str(path) for name, path in paths.items()}

    def check_data_files(cwd):
        """The data-format block's files read back as the train/finetune commands read them."""
        from hf_moe_routers.data_utils import bundled_corpus, load_text_files, load_texts_from_disk

        corpus = bundled_corpus()
        assert load_text_files(cwd / "texts") == corpus["train"]  # play0.txt ... play9.txt, sorted
        assert load_text_files(cwd / "held_out.txt") == corpus["validation"][:1]
        assert load_text_files(cwd / "held_out.jsonl") == corpus["validation"]
        for split in ("train", "validation"):
            assert load_texts_from_disk(cwd / "plays_dataset", split=split) == corpus[split]

    paths = checkpoints()
    results = []
    for i, block in enumerate(blocks):
        cwd = workdir / f"block{i}"
        cwd.mkdir()
        os.chdir(cwd)
        source = block["source"].replace("{mixtral}", paths["mixtral"]).replace(
            "{olmoe}", paths["olmoe"]).replace("{main_job}", paths["main_job"])
        out = io.StringIO()
        error = None
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(source, f"README.md (block at line {block['line']})", "exec"),
                     {"__name__": "__main__"})
            if 'save_to_disk("plays_dataset")' in source:
                check_data_files(cwd)
        except BaseException:
            error = traceback.format_exc()
        results.append({"line": block["line"], "stdout": out.getvalue(), "error": error})
        Path(results_path).write_text(json.dumps(results))
    '''
)


@pytest.fixture(scope="module")
def block_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Run every run block once (one subprocess for all), return ``{"line", "stdout", "error"}`` each."""
    run, _ = python_blocks()
    workdir = tmp_path_factory.mktemp("readme")
    spec = workdir / "blocks.json"
    spec.write_text(json.dumps([{"line": b.line, "source": substituted(b.body)} for b in run]))
    results_path = workdir / "results.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The README's commands run in the repo's environment; the snippets import the package from it.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(spec), str(workdir), str(results_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    if not results_path.is_file():
        pytest.fail(f"the README runner crashed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    results = json.loads(results_path.read_text())
    assert len(results) == len(run), f"the runner stopped early:\n{proc.stderr[-4000:]}"
    return results


def test_python_block_count() -> None:
    run, not_run = python_blocks()
    assert len(run) == EXPECTED_RUN_BLOCKS, [b.line for b in run]
    assert len(not_run) == EXPECTED_NOT_RUN_BLOCKS, [(b.line, b.not_run) for b in not_run]
    assert all(b.not_run for b in not_run), "a not-run marker must give its reason"


def test_substitutions_are_used() -> None:
    """Every substitution applies to a run block, and after them no model path is left to download."""
    run, _ = python_blocks()
    for old, _new in SUBSTITUTIONS:
        assert any(old in b.body for b in run), f"{old!r} no longer occurs in a README python block"
    for block in run:
        assert "path/to/" not in substituted(block.body), f"block at line {block.line}: unsubstituted path"


def test_python_blocks_run(block_results: list[dict]) -> None:
    failures = [f"README.md block at line {r['line']}:\n{r['error']}" for r in block_results if r["error"]]
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("fragment", sorted(EXPECTED_OUTPUT))
def test_python_blocks_print_what_the_readme_says(block_results: list[dict], fragment: str) -> None:
    run, _ = python_blocks()
    (index,) = [i for i, b in enumerate(run) if fragment in b.body]
    assert EXPECTED_OUTPUT[fragment] in block_results[index]["stdout"], block_results[index]["stdout"]


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------

#: examples/<script>.py -> the script module whose flags it takes.
EXAMPLE_SCRIPTS = {"train_clm": "clm", "finetune_patched": "finetune", "finetune_lora": "lora"}
#: Commands the test knows and does not parse (make targets, one-off Python).
UNCHECKED = (("make",), ("python", "-c"))


def shell_commands(text: str) -> list[list[str]]:
    """The commands of the README's ```bash blocks, one token list each (comments and line
    continuations handled as the shell does)."""
    commands = []
    for block in readme_blocks(text):
        if block.lang != "bash":
            continue
        for line in block.body.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(tokens)
    return commands


def inline_commands(text: str) -> list[list[str]]:
    """Commands of this package written in inline code (`hf-moe-routers export ...`)."""
    found = re.findall(r"`((?:\.venv/bin/)?(?:python -m hf_moe_routers |hf-moe-routers )[^`]*)`", text)
    return [shlex.split(code.replace("\n", " ")) for code in found]


def _training_parser(script: str) -> argparse.ArgumentParser:
    """The HfArgumentParser of a training script (``clm``, ``finetune``, ``lora``)."""
    from transformers import HfArgumentParser

    from hf_moe_routers.scripts.clm import ModelArguments
    from hf_moe_routers.scripts.common import DataArguments, PatchArguments
    from hf_moe_routers.scripts.lora import LoraArguments
    from hf_moe_routers.trainers.arguments import MoERouterTrainingArguments

    classes = {
        "clm": (ModelArguments, DataArguments),
        "finetune": (PatchArguments, DataArguments),
        "lora": (PatchArguments, LoraArguments, DataArguments),
    }[script]
    return HfArgumentParser((*classes, MoERouterTrainingArguments))


def check_training_flags(script: str, args: list[str]) -> None:
    """Parse ``args`` as ``script`` would (without building the dataclasses: that would validate
    device flags such as ``--bf16`` against this machine), and check the router options."""
    from hf_moe_routers.routers import RouterConfig
    from hf_moe_routers.scripts.clm import ARCHITECTURES
    from hf_moe_routers.scripts.common import ROUTER_TYPES

    parser = _training_parser(script)
    parser.allow_abbrev = False  # the README must spell flags out, not rely on prefixes
    namespace = parser.parse_args(args)
    assert namespace.router_type in ROUTER_TYPES, namespace.router_type
    RouterConfig.from_json_kwargs(namespace.router_type, namespace.router_kwargs)
    if script == "clm":
        assert namespace.architecture in ARCHITECTURES, namespace.architecture


def check_command(tokens: list[str]) -> str:
    """Parse one README command with its own parser; returns what was checked (for messages).
    argparse exits (SystemExit) on an unknown command or flag."""
    from hf_moe_routers.cli import COMMANDS, build_parser

    tokens = [t.removeprefix(".venv/bin/") for t in tokens]
    if tokens[:2] == ["accelerate", "launch"]:
        rest = tokens[2:]
        assert rest[0] == "--config_file", tokens
        assert (ROOT / rest[1]).is_file(), f"no accelerate config {rest[1]}"
        tokens = ["python", *rest[2:]]
    if tuple(tokens[:1]) in UNCHECKED or tuple(tokens[:2]) in UNCHECKED:
        return "unchecked"
    if tokens[0] == "python" and tokens[1].startswith("examples/"):
        script = Path(tokens[1]).stem
        assert (ROOT / tokens[1]).is_file(), f"no script {tokens[1]}"
        check_training_flags(EXAMPLE_SCRIPTS[script], tokens[2:])
        return script
    if tokens[:3] == ["python", "-m", "hf_moe_routers.experiments"]:
        from hf_moe_routers.experiments.__main__ import build_parser as experiments_parser

        parser = experiments_parser()
        parser.allow_abbrev = False
        parser.parse_args(tokens[3:])
        return "experiments"
    if tokens[:3] == ["python", "-m", "hf_moe_routers"]:
        tokens = ["hf-moe-routers", *tokens[3:]]
    assert tokens[0] == "hf-moe-routers", f"the test does not know this command: {shlex.join(tokens)}"
    command, args = tokens[1], tokens[2:]
    if command in ("--help", "-h"):
        return "help"
    assert command in COMMANDS, f"{command!r} is not a command ({', '.join(COMMANDS)})"
    if "--help" in args or "..." in args:  # help, or flags left out in the prose: the name is what counts
        return command
    if command in ("train", "finetune"):
        check_training_flags({"train": "clm", "finetune": "finetune"}[command], args)
    else:
        _, parsers = build_parser()
        parsers[command].allow_abbrev = False  # the README must spell flags out, not rely on prefixes
        parsers[command].parse_args(args)
    return command


def test_commands_exist_with_their_flags() -> None:
    text = README.read_text(encoding="utf-8")
    commands = shell_commands(text) + inline_commands(text)
    checked = []
    for tokens in commands:
        try:
            checked.append(check_command(tokens))
        except SystemExit as exit_:  # argparse: unknown command or flag, missing argument
            pytest.fail(f"README command does not parse (exit {exit_.code}): {shlex.join(tokens)}")
    # The README's command families, so that a parsing regression cannot skip them all.
    for kind in (
        "train_clm",
        "finetune_patched",
        "experiments",
        "patch",
        "inspect",
        "card",
        "export",
        "train",
    ):
        assert kind in checked, (kind, checked)


def test_command_checker_rejects_unknown_flags() -> None:
    """The checks above can fail: a misspelt flag or command is caught."""
    with pytest.raises(SystemExit):
        check_command(["python", "examples/train_clm.py", "--router_typo", "l2r"])
    with pytest.raises(SystemExit):
        check_command(["hf-moe-routers", "inspect", "outputs/main_job", "--text", "a.txt"])  # a prefix
    with pytest.raises(AssertionError):
        check_command(["hf-moe-routers", "publish", "x"])

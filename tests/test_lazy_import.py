"""``import hf_moe_routers`` is cheap and still registers everything before transformers is used.

Each check runs in a fresh interpreter (``sys.modules`` of this test process has torch and
transformers loaded long ago), and asserts on what the import loaded or registered, not on time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_moe_routers.cli import help_cache

REPO = Path(__file__).resolve().parent.parent


def _python(code: str, tmp_path: Path, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object, returned here."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


REGISTERED = """
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers import AutoModelForCausalLM
state["configs"] = sorted(t for t in CONFIG_MAPPING._extra_content if t.startswith("routed_"))
state["experts"] = "hf_moe_routers" in ALL_EXPERTS_FUNCTIONS
config = CONFIG_MAPPING["routed_olmoe"](vocab_size=32, hidden_size=16, intermediate_size=8,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_experts=4,
    num_experts_per_tok=2)
state["model"] = type(AutoModelForCausalLM.from_config(config)).__name__
print(json.dumps(state))
"""

ALL_ROUTED = [
    "routed_deepseek_v3",
    "routed_gpt_oss",
    "routed_mixtral",
    "routed_olmoe",
    "routed_qwen2_moe",
    "routed_qwen3_moe",
    "routed_switch_transformers",
]


def test_import_loads_neither_torch_nor_transformers(tmp_path):
    state = _python(
        """
        import json, sys
        import hf_moe_routers
        print(json.dumps({m: m in sys.modules for m in ("torch", "transformers", "hf_moe_routers.modeling")}))
        """,
        tmp_path,
    )
    assert state == {"torch": False, "transformers": False, "hf_moe_routers.modeling": False}


@pytest.mark.parametrize(
    "first",
    [
        "import hf_moe_routers",  # the package, then transformers: the watcher registers
        "import transformers, hf_moe_routers",  # transformers already there: registered at once
        "from hf_moe_routers.routers import L2RConfig",  # our own module imports transformers
        "import hf_moe_routers.metrics",  # ours imports torch only; transformers comes later
        "import transformers.models.olmoe.modeling_olmoe; import hf_moe_routers",
    ],
)
def test_routed_types_are_registered_whatever_the_import_order(first, tmp_path):
    state = _python(f"import json\n{first}\nstate = {{}}\n" + REGISTERED, tmp_path)
    assert state == {"configs": ALL_ROUTED, "experts": True, "model": "RoutedOlmoeForCausalLM"}


def test_public_names_resolve_lazily_and_unknown_names_fail(tmp_path):
    import hf_moe_routers as H
    from hf_moe_routers.patching import patch_moe_routers
    from hf_moe_routers.routers import L2RConfig

    assert H.patch_moe_routers is patch_moe_routers and H.L2RConfig is L2RConfig
    assert set(H.__all__) <= set(dir(H))
    for name in H.__all__:
        assert getattr(H, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        H.not_a_name  # noqa: B018


# --------------------------------------------------------------------------------------------
# the import watcher, on stand-in packages (no torch or transformers needed)
# --------------------------------------------------------------------------------------------


def _stand_ins(root: Path) -> None:
    """``target`` (the stand-in for transformers) and ``ours`` whose submodule imports it."""
    (root / "ours").mkdir()
    (root / "ours" / "__init__.py").write_text(
        "import sys\nfrom hf_moe_routers._import_hooks import call_after_import\n"
        "EVENTS = []\n"
        "def _callback():\n"
        "    import ours.late  # what our registration does: import a module of ours that needs target\n"
        "    EVENTS.append(('callback', sorted(m for m in sys.modules if m.startswith('ours.'))))\n"
        "call_after_import('target', 'ours', _callback)\n"
    )
    (root / "ours" / "inner.py").write_text(
        "import ours\nours.EVENTS.append(('inner starts', None))\n"
        "import target\nours.EVENTS.append(('inner ends', None))\n"
    )
    (root / "ours" / "outer.py").write_text(
        "import ours\nfrom ours import inner\nours.EVENTS.append(('outer ends', None))\nDONE = True\n"
    )
    # Needs a name outer defines last: run while outer is half-executed, it raises ImportError.
    (root / "ours" / "late.py").write_text("from ours.outer import DONE\n")
    (root / "target.py").write_text("VALUE = 1\n")


def _events(code: str, tmp_path: Path) -> list:
    _stand_ins(tmp_path)
    return _python(
        f"import json, sys\nsys.path.insert(0, {str(tmp_path)!r})\n{code}\n"
        "import ours\nprint(json.dumps(ours.EVENTS))",
        tmp_path,
    )


#: The callback imports late -> outer -> inner (which imports target), then records itself.
EVENTS_OF_ONE_CALLBACK = [
    ["inner starts", None],
    ["inner ends", None],
    ["outer ends", None],
    ["callback", ["ours.inner", "ours.late", "ours.outer"]],
]


def test_watcher_calls_back_after_the_target_is_imported(tmp_path):
    assert _events("import ours\nimport target", tmp_path) == EVENTS_OF_ONE_CALLBACK


def test_watcher_calls_at_once_when_the_target_is_loaded(tmp_path):
    assert _events("import target\nimport ours", tmp_path) == EVENTS_OF_ONE_CALLBACK


def test_watcher_waits_for_our_outermost_module_to_finish(tmp_path):
    # outer -> inner -> target: the callback (which imports outer again) must wait for outer's end;
    # run half-way it would see a half-executed ours.outer.
    assert _events("import ours.outer", tmp_path) == EVENTS_OF_ONE_CALLBACK


def test_watcher_never_calls_when_the_target_is_never_imported(tmp_path):
    assert _events("import ours", tmp_path) == []


# --------------------------------------------------------------------------------------------
# train/finetune --help from the cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], True),
        (["--output_dir", "x", "-h"], True),
        (["--output_dir", "x"], False),
        (["--", "--help"], False),  # after "--" it is a value, not the option
        (["--helpful"], False),
    ],
)
def test_wants_help(argv, expected):
    assert help_cache.wants_help(argv) is expected


def _fake_run(calls: list) -> object:
    def run(argv: list[str]) -> None:
        calls.append(argv)
        print(f"usage: fake (call {len(calls)})")
        raise SystemExit(0)

    return run


def test_help_is_rendered_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MOE_ROUTERS_CACHE", str(tmp_path / "cache"))
    calls: list = []
    first = help_cache.cached_help("train", _fake_run(calls))
    second = help_cache.cached_help("train", _fake_run(calls))
    assert first == second == "usage: fake (call 1)\n"
    assert calls == [["--help"]]
    # another command has its own text
    assert help_cache.cached_help("finetune", _fake_run(calls)) == "usage: fake (call 2)\n"


def test_help_cache_key_changes_with_the_code(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("X = 1\n")
    monkeypatch.setattr(help_cache, "_PACKAGE_DIR", package)
    before = help_cache.help_cache_key("train")
    assert help_cache.help_cache_key("train") == before
    assert help_cache.help_cache_key("finetune") != before
    (package / "a.py").write_text("X = 2\n")
    assert help_cache.help_cache_key("train") != before


def test_help_is_rendered_live_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HF_MOE_ROUTERS_CACHE", str(blocker))
    calls: list = []
    assert help_cache.cached_help("train", _fake_run(calls)) == "usage: fake (call 1)\n"
    assert help_cache.cached_help("train", _fake_run(calls)) == "usage: fake (call 2)\n"


def test_cached_training_help_equals_the_live_parser_help(tmp_path, capsys, monkeypatch):
    from hf_moe_routers.cli import main
    from hf_moe_routers.scripts.clm import main as clm_main

    monkeypatch.setenv("HF_MOE_ROUTERS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit):
        clm_main(["--help"], prog="hf-moe-routers train")
    live = capsys.readouterr().out
    for _ in range(2):  # rendered and stored, then read back
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out == live
    assert len(list((tmp_path / "cache" / "help").glob("train-*.txt"))) == 1


@pytest.mark.parametrize(
    "command", ["", "patch", "card", "inspect", "bench", "export", "patch-demo", "train"]
)
def test_help_of_every_command_loads_neither_torch_nor_transformers(command, tmp_path):
    cache = tmp_path / "cache"
    code = f"""
        import json, sys
        from hf_moe_routers.cli import main
        argv = {[command, "--help"] if command else ["--help"]!r}
        try:
            main(argv)
        except SystemExit:
            pass
        print(json.dumps({{m: m in sys.modules for m in ("torch", "transformers")}}))
        """
    if command == "train":
        _python(code, tmp_path, HF_MOE_ROUTERS_CACHE=str(cache))  # renders: loads everything once
    state = _python(code, tmp_path, HF_MOE_ROUTERS_CACHE=str(cache))
    assert state == {"torch": False, "transformers": False}

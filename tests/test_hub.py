"""Publishing: remote code that loads without hf_moe_routers, Hub uploads (mocked), model cards."""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from conftest import RandomTokens, model_inputs, tiny_model
from huggingface_hub import HfApi, ModelCard
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel
from transformers.dynamic_module_utils import check_imports, get_relative_import_files

import hf_moe_routers as H
from hf_moe_routers import cards, modeling
from hf_moe_routers.modeling import RoutedMixtralForCausalLM, RoutedPreTrainedMixin
from hf_moe_routers.modeling import remote_code as RC
from hf_moe_routers.records import RoutingHistory, RoutingRecord
from hf_moe_routers.trainers import MoERouterTrainer, MoERouterTrainingArguments

REPO_ROOT = Path(__file__).resolve().parent.parent
# Spelled out, not derived: a change of the generated layout must show up here.
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
CASES = {  # repo name -> (family, router config)
    "mixtral-l2r": ("mixtral", H.L2RConfig(rank=8, num_anchors=2)),
    "olmoe-srmoe": ("olmoe", H.SRMoEConfig(scoring="prototype")),
    "switch-cosine": ("switch_transformers", H.CosineRouterConfig(dim=6)),
    "qwen2-srmoe-power": ("qwen2_moe", H.SRMoEConfig(spectral_mode="constrain", sigma_method="power")),
    "qwen3-linear": ("qwen3_moe", H.LinearRouterConfig()),
    "deepseek-l2r": ("deepseek_v3", H.L2RConfig(rank=8, num_anchors=2)),
    "gptoss-cosine": ("gpt_oss", H.CosineRouterConfig(dim=6)),
}


def realign(model):
    """Aligned copies of every tensor (see tests/test_modeling.py: safetensors gives unaligned views)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    return model


def auto_class(family):
    return AutoModelForSeq2SeqLM if family == "switch_transformers" else AutoModelForCausalLM


class FakeHub:
    """Stands in for the Hub: ``create_repo`` answers, ``create_commit`` copies what it is sent.

    ``upload_folder`` itself runs (it builds the commit operations from the folder); only its xet
    pipeline is switched off, so that every upload ends in ``create_commit``, and its YAML check,
    which asks the Hub.
    """

    def __init__(self, root: Path):
        self.root = root
        self.commits: list[dict] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
        hub_self = self

        def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
            return types.SimpleNamespace(repo_id=repo_id)

        def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
            target = hub_self.root / repo_id.replace("/", "--")
            paths = []
            for op in operations:
                assert type(op).__name__ == "CommitOperationAdd", op
                (target / op.path_in_repo).parent.mkdir(parents=True, exist_ok=True)
                (target / op.path_in_repo).write_bytes(Path(op.path_or_fileobj).read_bytes())
                paths.append(op.path_in_repo)
            hub_self.commits.append({"repo_id": repo_id, "paths": sorted(paths), "message": commit_message})
            return types.SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/0", oid="0" * 40)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, *args, **kwargs: None)
        monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)
        return self

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id.replace("/", "--")


def fake_png(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    return path


# --------------------------------------------------------------------------------------------
# Publishing every case once (module scope: the subprocess tests share the uploads)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Push each case with push_routed_to_hub to a fake Hub; keep what each commit sent."""
    root = tmp_path_factory.mktemp("hub")
    heatmap = fake_png(root / "routing_load_heatmap.png")
    cases = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        fake = FakeHub(root / "repos").install(monkeypatch)
        for name, (family, router_config) in CASES.items():
            model = H.patch_moe_routers(tiny_model(family), router_config)
            model.train()
            for _ in range(2):  # training forwards move SR-MoE's power-iteration state from its init
                model(**model_inputs(family, seed=5))
            model.eval()
            modeling.push_routed_to_hub(model, f"me/{name}", plots=[heatmap], datasets=["wikitext"])
            inputs = model_inputs(family, padded=family != "switch_transformers")
            with torch.no_grad():
                torch.save({"inputs": inputs, "logits": model(**inputs).logits}, root / f"{name}.pt")
            cases[name] = {
                "family": family,
                "repo": fake.repo(f"me/{name}"),
                "ref": root / f"{name}.pt",
                "routers": len(model.routed_routers()) if family != "switch_transformers" else 2,  # encoder
            }
    return {"root": root, "cases": cases, "commits": fake.commits}


def test_upload_sends_weights_config_card_plot_and_remote_code(published):
    commits = published["commits"]
    assert [c["repo_id"] for c in commits] == [f"me/{name}" for name in CASES]
    for commit in commits:
        assert set(commit["paths"]) == MODEL_FILES | REMOTE_FILES | {"routing_load_heatmap.png"}, commit[
            "repo_id"
        ]
    config = json.loads((published["cases"]["switch-cosine"]["repo"] / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "modeling_routed_moe.RoutedSwitchTransformersConfig",
        "AutoModel": "modeling_routed_moe.RoutedSwitchTransformersModel",
        "AutoModelForSeq2SeqLM": "modeling_routed_moe.RoutedSwitchTransformersForConditionalGeneration",
    }
    config = json.loads((published["cases"]["mixtral-l2r"]["repo"] / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "modeling_routed_moe.RoutedMixtralConfig",
        "AutoModel": "modeling_routed_moe.RoutedMixtralModel",
        "AutoModelForCausalLM": "modeling_routed_moe.RoutedMixtralForCausalLM",
    }
    card = ModelCard.load(published["cases"]["mixtral-l2r"]["repo"] / "README.md")
    assert card.data.library_name == "transformers" and "l2r" in card.data.tags
    assert 'from_pretrained("me/mixtral-l2r", trust_remote_code=True)' in card.text
    assert "![Expert load per layer during training](routing_load_heatmap.png)" in card.text
    for case in published["cases"].values():
        assert modeling.check_remote_code(case["repo"]) == []


def _run(script: str, tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    env = {
        "HF_HUB_OFFLINE": "1",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_MODULES_CACHE": str(tmp_path / f"modules_{name}"),
    }
    # cwd outside the repository, so that '' on sys.path cannot find the package either.
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )


NO_PACKAGE_SCRIPT = """
    import sys
    sys.modules["hf_moe_routers"] = None  # before anything else: hf_moe_routers cannot be imported
    try:
        import hf_moe_routers  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_moe_routers is importable")
    import json, torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    def realign(model):
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                tensor.data = tensor.data.clone()
        return model

    results = {}
    for name, case in json.loads(sys.argv[1]).items():
        cls = AutoModelForSeq2SeqLM if case["family"] == "switch_transformers" else AutoModelForCausalLM
        try:
            cls.from_pretrained(case["repo"], trust_remote_code=False)
            refused = False
        except ValueError:
            refused = True
        model = realign(cls.from_pretrained(case["repo"], trust_remote_code=True).eval())
        ref = torch.load(case["ref"])
        with torch.no_grad():
            out = model(**ref["inputs"], output_router_logits=True)
        router_logits = out.encoder_router_logits if case["family"] == "switch_transformers" else out.router_logits
        results[name] = {
            "refused_without_trust": refused,
            "module": type(model).__module__,
            "class": type(model).__name__,
            "router_type": model.config.moe_router["router_type"],
            "equal": torch.equal(out.logits, ref["logits"]),
            "recorded_routers": sum(1 for r in router_logits if r is not None and r.numel() > 0),
        }
        if name == "mixtral-l2r":
            # The CUDA default-kernel branch runs its remote-code fallback: transformers' default.
            is_available, torch.cuda.is_available = torch.cuda.is_available, lambda: True
            results[name]["cuda_default"] = model.get_correct_experts_implementation(None)
            torch.cuda.is_available = is_available
            # Saved again where only the remote code exists, then reloaded.
            model.save_pretrained(case["repo"] + "-resaved")
            again = realign(cls.from_pretrained(case["repo"] + "-resaved", trust_remote_code=True).eval())
            with torch.no_grad():
                results[name]["resaved_equal"] = torch.equal(again(**ref["inputs"]).logits, ref["logits"])
    assert sys.modules["hf_moe_routers"] is None
    assert not any(key.startswith("hf_moe_routers.") for key in sys.modules)
    print(json.dumps(results))
"""


def test_uploaded_folders_load_by_remote_code_without_the_package(published, tmp_path):
    cases = {
        name: {"family": c["family"], "repo": str(c["repo"]), "ref": str(c["ref"])}
        for name, c in published["cases"].items()
    }
    result = _run(NO_PACKAGE_SCRIPT, tmp_path, "no_package", json.dumps(cases))
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(results) == set(CASES)
    for name, (family, router_config) in CASES.items():
        got = results[name]
        assert got["module"].startswith("transformers_modules.") and got["module"].endswith(
            ".modeling_routed_moe"
        )
        assert got["class"] == published_class(family)
        assert got["router_type"] == router_config.router_type
        assert got["equal"], name
        assert got["refused_without_trust"], name
        assert got["recorded_routers"] == published["cases"][name]["routers"] > 0, name
    assert results["mixtral-l2r"]["resaved_equal"]
    assert results["mixtral-l2r"]["cuda_default"] == "grouped_mm"


def published_class(family: str) -> str:
    return {
        "mixtral": "RoutedMixtralForCausalLM",
        "olmoe": "RoutedOlmoeForCausalLM",
        "qwen2_moe": "RoutedQwen2MoeForCausalLM",
        "qwen3_moe": "RoutedQwen3MoeForCausalLM",
        "switch_transformers": "RoutedSwitchTransformersForConditionalGeneration",
        "deepseek_v3": "RoutedDeepseekV3ForCausalLM",
        "gpt_oss": "RoutedGptOssForCausalLM",
    }[family]


REMOTE_THEN_PACKAGE_SCRIPT = """
    import sys, torch
    from transformers import AutoConfig, AutoModelForCausalLM
    repo, ref_path = sys.argv[1], sys.argv[2]
    ref = torch.load(ref_path)

    def logits(model):
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                tensor.data = tensor.data.clone()
            return model.eval()(**ref["inputs"]).logits

    remote = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
    assert type(remote).__module__.startswith("transformers_modules."), type(remote).__module__
    assert "hf_moe_routers" not in sys.modules
    import hf_moe_routers  # registers routed_mixtral while the remote classes of the same names exist
    from hf_moe_routers.modeling import RoutedMixtralConfig, RoutedMixtralForCausalLM
    local = AutoModelForCausalLM.from_pretrained(repo)
    trusted = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
    assert type(local) is RoutedMixtralForCausalLM and type(trusted) is RoutedMixtralForCausalLM
    assert type(AutoConfig.from_pretrained(repo, trust_remote_code=True)) is RoutedMixtralConfig
    assert AutoModelForCausalLM._model_mapping[type(remote.config)] is type(remote)
    assert AutoModelForCausalLM._model_mapping[RoutedMixtralConfig] is RoutedMixtralForCausalLM
    for model in (remote, local, trusted):
        assert torch.equal(logits(model), ref["logits"]), type(model)
    with torch.no_grad():  # the remote model still records its routers next to ours
        assert len(remote(**ref["inputs"], output_router_logits=True).router_logits) == 2
    print("ok")
"""


def test_remote_classes_and_registered_classes_coexist_in_one_process(published, tmp_path):
    """Remote code loaded first, then the package: same model_type and class names, no collision."""
    case = published["cases"]["mixtral-l2r"]
    result = _run(
        REMOTE_THEN_PACKAGE_SCRIPT, tmp_path, "remote_then_package", str(case["repo"]), str(case["ref"])
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("trust_remote_code", [None, False, True])
def test_with_the_package_imported_auto_map_never_runs_remote_code(published, trust_remote_code):
    case = published["cases"]["mixtral-l2r"]
    kwargs = {} if trust_remote_code is None else {"trust_remote_code": trust_remote_code}
    model = realign(AutoModelForCausalLM.from_pretrained(case["repo"], **kwargs).eval())
    assert type(model) is RoutedMixtralForCausalLM
    assert type(AutoConfig.from_pretrained(case["repo"], **kwargs)) is H.RoutedMixtralConfig
    assert not any(key.startswith("transformers_modules") and "mixtral" in key for key in sys.modules)
    ref = torch.load(case["ref"])
    with torch.no_grad():
        assert torch.equal(model(**ref["inputs"]).logits, ref["logits"])


# --------------------------------------------------------------------------------------------
# The generated files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
def test_generated_files_import_only_torch_transformers_and_their_siblings(family, tmp_path):
    model = H.patch_moe_routers(tiny_model(family), H.L2RConfig(rank=8, num_anchors=2))
    model.save_pretrained(tmp_path)
    written = modeling.prepare_remote_code(model, tmp_path)
    assert set(written) == REMOTE_FILES | {"config.json"}
    # transformers' own view: the entry file's relative imports reach exactly the other files, and
    # every package they import exists here (check_imports raises otherwise).
    entry = tmp_path / "modeling_routed_moe.py"
    assert {Path(f).name for f in get_relative_import_files(entry)} == REMOTE_FILES - {entry.name}
    for name in REMOTE_FILES:
        check_imports(tmp_path / name)
        tree = ast.parse((tmp_path / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in REMOTE_FILES, (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for root in (r.split(".")[0] for r in roots):
                    assert root in sys.stdlib_module_names or root in {
                        "torch",
                        "transformers",
                        "huggingface_hub",
                    }, (
                        name,
                        root,
                    )


def _import_lines(tree: ast.Module, keep) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and keep(node):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


@pytest.mark.parametrize("family", ["olmoe", "switch_transformers"])
def test_generated_files_are_the_package_source_with_only_imports_rewritten(family):
    """Drift is impossible: every non-import line of each source module is in its generated file."""
    for file in modeling.remote_code_files(f"routed_{family}"):
        source = Path(sys.modules[file.module].__file__).read_text()
        source_tree = ast.parse(source)
        internal = _import_lines(
            source_tree, lambda n: n.level > 0 or (n.module or "").startswith("hf_moe_routers")
        )
        expected = [line for i, line in enumerate(source.splitlines(), 1) if i not in internal]
        generated = file.text.split("# ---- generated by hf_moe_routers.modeling.remote_code")[0].rstrip("\n")
        lines = generated.splitlines()
        assert (
            lines[0].startswith("# hf-moe-routers remote code: generated from ")
            and file.source_sha256 in lines[0]
        )
        body = "\n".join(lines[3:])
        rewritten = _import_lines(ast.parse(body), lambda n: n.level == 1)
        kept = [
            line
            for i, line in enumerate(body.splitlines(), 1)
            if i not in rewritten
            and "is not part of the remote code" not in line
            and "# noqa: E731" not in line
        ]
        assert kept == expected, file.filename
    # And generation is deterministic: a folder written now is current.
    assert [f.text for f in modeling.remote_code_files(f"routed_{family}")] == [
        f.text for f in modeling.remote_code_files(f"routed_{family}")
    ]


def test_check_remote_code_reports_a_folder_that_differs_from_the_source(tmp_path, monkeypatch):
    model = H.patch_moe_routers(tiny_model("olmoe"), H.SRMoEConfig())
    model.save_pretrained(tmp_path)
    modeling.prepare_remote_code(model, tmp_path)
    assert modeling.check_remote_code(tmp_path) == []
    # The package source changes (simulated): the saved folder is reported stale.
    real = RC._module_source

    def edited(module):
        text, path, is_package = real(module)
        if module == "hf_moe_routers.routers.l2r":
            text += "\n# an edit\n"
        return text, path, is_package

    monkeypatch.setattr(RC, "_module_source", edited)
    assert modeling.check_remote_code(tmp_path) == [
        "routed_moe_routers_l2r.py differs from a generation from hf_moe_routers.routers.l2r"
    ]
    monkeypatch.undo()
    (tmp_path / "routed_moe_routers_cosine.py").unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "elsewhere.Model"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert modeling.check_remote_code(tmp_path) == [
        "routed_moe_routers_cosine.py is missing",
        "config.json auto_map['AutoModelForCausalLM'] is 'elsewhere.Model', expected "
        "'modeling_routed_moe.RoutedOlmoeForCausalLM'",
    ]


def test_every_router_method_ships_and_excluded_modules_fall_back(tmp_path):
    files = {f.module: f for f in modeling.remote_code_files("routed_mixtral")}
    for scorer in H.routers.SCORERS.values():
        assert scorer.__module__ in files
    assert not any(module.startswith("hf_moe_routers.kernels") for module in files)
    base = files["hf_moe_routers.modeling.base"].text
    assert "preferred_experts_implementation = lambda device: None" in base
    with pytest.raises(RuntimeError, match="no remote-code fallback"):
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setitem(RC.EXCLUDED_MODULES, "hf_moe_routers.kernels", {})
            modeling.remote_code_files("routed_mixtral")


# The save_pretrained / push_to_hub wiring RoutedPreTrainedMixin is to get (modeling/base.py).
MIXIN_WIRING = """
    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
        if kwargs.get("is_main_process", True):
            # Late and left out of the remote code: publishing generates that code from this file.
            from .publishing import write_hub_files

            write_hub_files(self, save_directory)

    def push_to_hub(self, repo_id, **kwargs):
        from .publishing import push_routed_to_hub

        if push_routed_to_hub is None:  # remote code: transformers' own upload
            return super().push_to_hub(repo_id, **kwargs)  # type: ignore[misc]
        return push_routed_to_hub(self, repo_id, **kwargs)

"""


def test_the_mixin_wiring_stays_out_of_the_remote_code(tmp_path, monkeypatch):
    """With the Hub hooks in RoutedPreTrainedMixin, remote code still loads, saves and reloads."""
    real = RC._module_source

    def wired(module):
        text, path, is_package = real(module)
        if module == "hf_moe_routers.modeling.base" and "write_hub_files" not in text:
            anchor = "    def routed_routers(self)"
            assert anchor in text
            text = text.replace(anchor, MIXIN_WIRING.lstrip("\n") + anchor)
        return text, path, is_package

    monkeypatch.setattr(RC, "_module_source", wired)
    files = {f.module: f for f in modeling.remote_code_files("routed_olmoe")}
    assert not any(module.startswith("hf_moe_routers.modeling.publishing") for module in files)
    base = files["hf_moe_routers.modeling.base"].text
    assert "write_hub_files = lambda model, folder: []" in base and "push_routed_to_hub = None" in base
    folder = tmp_path / "wired"
    model = H.patch_moe_routers(tiny_model("olmoe"), H.SRMoEConfig())
    PreTrainedModel.save_pretrained(model, folder)  # the host save; the wiring is only in the files
    modeling.prepare_remote_code(model, folder)
    inputs = model_inputs("olmoe")
    with torch.no_grad():
        torch.save({"inputs": inputs, "logits": model(**inputs).logits}, tmp_path / "ref.pt")
    script = """
        import sys
        sys.modules["hf_moe_routers"] = None
        import torch
        from transformers import AutoModelForCausalLM
        folder, ref = sys.argv[1], torch.load(sys.argv[2])
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        model.save_pretrained(folder + "-again")  # runs the wired save_pretrained with its fallback
        again = AutoModelForCausalLM.from_pretrained(folder + "-again", trust_remote_code=True).eval()
        assert type(again).__module__.startswith("transformers_modules."), type(again).__module__
        with torch.no_grad():
            for tensor in list(again.parameters()) + list(again.buffers()):
                tensor.data = tensor.data.clone()
            assert torch.equal(again(**ref["inputs"]).logits, ref["logits"])
        print("ok")
    """
    result = _run(script, tmp_path, "wired", str(folder), str(tmp_path / "ref.pt"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("ok")


def test_remote_code_refuses_what_needs_none(tmp_path):
    plain = tiny_model("mixtral")
    with pytest.raises(ValueError, match="loads without remote code"):
        modeling.remote_code_files(plain)
    with pytest.raises(ValueError, match="routed models only"):
        modeling.remote_code_files("bert")
    with pytest.raises(ValueError, match="no config.json"):
        modeling.prepare_remote_code("routed_mixtral", tmp_path)
    with pytest.raises(ValueError, match="needs a routed model"):
        modeling.save_routed_pretrained(plain, tmp_path)


def test_patching_a_loaded_checkpoint_still_publishes_as_routed(tmp_path):
    """A config read from config.json keeps the host's model_type as an instance attribute."""
    tiny_model("olmoe").save_pretrained(tmp_path / "host")
    model = H.patch_moe_routers(AutoModelForCausalLM.from_pretrained(tmp_path / "host"), H.SRMoEConfig())
    modeling.save_routed_pretrained(model, tmp_path / "routed")
    assert modeling.check_remote_code(tmp_path / "routed") == []
    assert json.loads((tmp_path / "routed" / "config.json").read_text())["model_type"] == "routed_olmoe"


# --------------------------------------------------------------------------------------------
# Wiring: save_pretrained, push_to_hub and the Trainer (as the package will wire them)
# --------------------------------------------------------------------------------------------


def _wire_save_and_push(monkeypatch):
    """What RoutedPreTrainedMixin gets: save_pretrained writes the hub files, push_to_hub publishes."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        super(RoutedPreTrainedMixin, self).save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            modeling.write_hub_files(self, save_directory)

    def push_to_hub(self, repo_id, **kwargs):
        return modeling.push_routed_to_hub(self, repo_id, **kwargs)

    monkeypatch.setattr(RoutedPreTrainedMixin, "save_pretrained", save_pretrained, raising=False)
    monkeypatch.setattr(RoutedPreTrainedMixin, "push_to_hub", push_to_hub, raising=False)


def test_wired_save_pretrained_writes_remote_code_and_keeps_a_hand_written_card(tmp_path, monkeypatch):
    _wire_save_and_push(monkeypatch)
    model = H.patch_moe_routers(tiny_model("qwen3_moe"), H.CosineRouterConfig(dim=6))
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == MODEL_FILES | REMOTE_FILES
    assert modeling.check_remote_code(tmp_path) == [] and cards.is_generated_card(tmp_path / "README.md")
    (tmp_path / "README.md").write_text("# my own card\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card\n"
    fake = FakeHub(tmp_path / "repos").install(monkeypatch)
    model.push_to_hub("me/qwen3-cosine", commit_message="first")
    assert fake.commits[0]["paths"] == sorted(MODEL_FILES | REMOTE_FILES)
    assert fake.commits[0]["message"] == "first"


def test_trainer_push_to_hub_uploads_card_with_metrics_plots_and_remote_code(tmp_path, monkeypatch):
    _wire_save_and_push(monkeypatch)

    class Trainer(MoERouterTrainer):  # the create_model_card override the package will carry
        def create_model_card(self, **kwargs):
            cards.write_trainer_model_card(self, **kwargs)

    fake = FakeHub(tmp_path / "repos").install(monkeypatch)
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
        hub_model_id="me/trained",
        seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=RandomTokens(8), eval_dataset=RandomTokens(4, seed=1)
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.push_to_hub(dataset_tags="wikitext")
    paths = set(fake.commits[-1]["paths"])
    assert MODEL_FILES | REMOTE_FILES | {"routing_load_heatmap.png", "routing_load_heatmap_eval.png"} <= paths
    assert not any(p.startswith("checkpoint-") for p in paths)
    repo = fake.repo("me/trained")
    card = ModelCard.load(repo / "README.md")
    assert card.data.datasets == ["wikitext"] and "mixture-of-experts" in card.data.tags
    assert "| `learning_rate` | 0.001 |" in card.text and "| `router_balance_loss` | per_layer |" in card.text
    load_entropy = f"{metrics['eval_router/load_entropy']:.4g}"
    layer0 = f"{metrics['eval_router/load_entropy/layer_0']:.4g}"
    assert f"| load_entropy | {load_entropy} | {layer0} |" in card.text
    assert "![Expert load per layer at evaluation](routing_load_heatmap_eval.png)" in card.text
    assert modeling.check_remote_code(repo) == []


# --------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------


def test_card_metadata_router_and_usage(tmp_path):
    model = H.patch_moe_routers(tiny_model("switch_transformers"), H.CosineRouterConfig(dim=6))
    card = cards.build_model_card(
        model,
        model_id="me/switch-cosine",
        base_model="google/switch-base-8",
        datasets=["c4", str(tmp_path)],
        license="apache-2.0",
        language="en",
    )
    data = card.data.to_dict()
    assert data == {
        "base_model": "google/switch-base-8",
        "datasets": ["c4"],  # a local path is no Hub dataset id: body only
        "language": ["en"],
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "text2text-generation",
        "tags": ["hf-moe-routers", "moe", "mixture-of-experts", "cosine-router", "switch_transformers"],
    }
    text = card.text
    assert '"router_type": "cosine"' in text and '"dim": 6' in text
    assert 'AutoModelForSeq2SeqLM.from_pretrained("me/switch-cosine", trust_remote_code=True)' in text
    assert "import hf_moe_routers" in text
    for arxiv in ("2601.03889", "2601.21349", "2204.09179"):
        assert arxiv in text
    assert "Delibasoglu" in text and "Haseyama" in text
    assert f"`{tmp_path}`" in text
    assert "of top-k choices" in text  # the patch report


def test_card_base_model_from_a_local_path_stays_out_of_the_yaml(tmp_path):
    card = cards.build_model_card(
        H.patch_moe_routers(tiny_model("mixtral"), H.SRMoEConfig()), base_model=str(tmp_path)
    )
    assert card.data.base_model is None and f"Patched from | `{tmp_path}`" in card.text


def test_metrics_table_from_an_evaluation_dict():
    table = cards.routing_metrics_table(
        {
            "eval_loss": 2.0,
            "eval_router/stable_rank": 3.0,
            "eval_router/stable_rank/layer_0": 2.5,
            "eval_router/stable_rank/layer_1": 3.5,
            "eval_router/load_entropy": 0.95,
            "eval_router/load_entropy/layer_0": 0.9,
            "eval_router/load_entropy/layer_1": 1.0,
            "eval_router/lipschitz_bound_global": "inf",
            "router/load_entropy": 0.1,  # training keys lose to evaluation keys
        }
    )
    assert table.layers == ["layer_0", "layer_1"]
    assert [(r["name"], r["mean"], r["cells"]) for r in table.rows] == [
        ("load_entropy", "0.95", ["0.9", "1"]),
        ("stable_rank", "3", ["2.5", "3.5"]),
        ("lipschitz_bound_global", "∞", ["–", "–"]),
    ]
    assert cards.routing_metrics_table({"eval_loss": 1.0}) is None


def test_metrics_table_from_a_history_uses_the_last_evaluation():
    history = RoutingHistory(
        [
            RoutingRecord(
                10, "eval", ["layer_0", "layer_1"], [[0.5, 0.5], [0.5, 0.5]], {"load_cv": [0.25, 0.75]}
            ),
            RoutingRecord(
                20, "train", ["layer_0", "layer_1"], [[1.0, 0.0], [1.0, 0.0]], {"load_cv": [9.0, 9.0]}
            ),
        ]
    )
    table = cards.routing_metrics_table(None, history.to_dict())
    assert "step 10" in table.source
    assert [(r["name"], r["mean"], r["cells"]) for r in table.rows] == [("load_cv", "0.5", ["0.25", "0.75"])]


def test_card_shows_training_from_arguments_and_state(tmp_path):
    args = MoERouterTrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, max_steps=7, report_to=[])
    state = {
        "global_step": 7,
        "log_history": [
            {"step": 5, "epoch": 0.5, "loss": 3.25},
            {"step": 7, "epoch": 0.7, "eval_loss": 3.0, "eval_router/drift": 0.875},
        ],
    }
    card = cards.build_model_card(
        H.patch_moe_routers(tiny_model("olmoe"), H.SRMoEConfig()), training_args=args, trainer_state=state
    )
    text = card.text
    assert "| `learning_rate` | 0.0003 |" in text and "| `max_steps` | 7 |" in text
    assert "num_train_epochs" not in text  # max_steps overrides the epochs
    assert "| `trained_steps` | 7 |" in text and "| `router_balance_loss` | per_layer |" in text
    assert "router_z_loss_weight" not in text and "router_plots" not in text  # None / logging only
    assert "| 5 | 0.5 | 3.2500 | – |" in text and "| 7 | 0.7 | – | 3.0000 |" in text
    assert "validation perplexity: **20.09**" in text  # exp(3.0): the last evaluation of the state
    assert "| drift | 0.875 |" in text


def test_write_model_card_links_plots_only_when_present_and_keeps_hand_written_readmes(tmp_path):
    model = H.patch_moe_routers(tiny_model("mixtral"), H.L2RConfig(rank=8, num_anchors=2))
    model.save_pretrained(tmp_path)
    cards.write_model_card(model, tmp_path)
    assert "routing_load_heatmap" not in (tmp_path / "README.md").read_text()
    fake_png(tmp_path / "routing_load_heatmap.png")
    outside = fake_png(tmp_path.parent / f"{tmp_path.name}_extra.png")
    cards.write_model_card(model, tmp_path, plots=[outside])
    text = (tmp_path / "README.md").read_text()
    assert "](routing_load_heatmap.png)" in text and f"]({outside.name})" in text
    assert (tmp_path / outside.name).is_file()
    (tmp_path / "README.md").write_text("mine\n")
    assert cards.write_model_card(model, tmp_path, overwrite=False) is None
    assert (tmp_path / "README.md").read_text() == "mine\n"


def test_card_of_an_unpatched_model_names_its_own_router():
    card = cards.build_model_card(tiny_model("qwen2_moe"))
    assert "Qwen2Moe's own router (not patched)" in card.text and "linear-router" in card.data.tags


def test_template_ships_in_the_package_and_model_cards_links_to_it():
    shipped = cards.template_text()
    assert shipped == (REPO_ROOT / "model_cards" / "routed_model_card.md").read_text()
    assert "{{ card_data }}" in shipped


def test_template_is_declared_as_package_data():
    """A wheel ships only declared data files: without the glob, template_text() fails once installed."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    declared = re.search(r"\[tool\.setuptools\.package-data\]\s*hf_moe_routers\s*=\s*\[([^\]]*)\]", text)
    globs = re.findall(r'"([^"]+)"', declared.group(1)) if declared else []
    assert any(fnmatch.fnmatch("cards/templates/routed_model_card.md", g) for g in globs), globs


def test_plot_file_names_match_the_trainer_plots():
    from hf_moe_routers.reporting import plots
    from hf_moe_routers.trainers.trainer import COACTIVATION_PLOT

    expected = {
        plots._file_name(base, split)
        for base in (plots.LOAD_HEATMAP_FILE, plots.CURVES_FILE)
        for split in ("train", "eval")
    }
    assert {name for _, name in cards.PLOT_FILES} == expected | {COACTIVATION_PLOT}

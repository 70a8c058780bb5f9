"""Remote code: the flat set of files that lets plain transformers load a routed checkpoint.

``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` in an environment without
hf-moe-routers imports the module named by ``config.auto_map`` from a copy of the folder's ``*.py``
files; transformers copies only a flat set of files, follows only ``from .sibling import``
imports, and refuses files that import a package the environment lacks (``check_imports``).

The files are *generated from this package's own source*, never maintained by hand: each module the
family's modeling file needs (found by following its relative imports) becomes one flat file, with
its package-relative imports rewritten to the flat sibling names and nothing else changed, except
that a function-level import of an optional module left out of the remote code (the Triton
kernels, ``EXCLUDED_MODULES``) binds its names to their documented "not available" answer. A
header records the source path and its SHA-256, so ``check_remote_code`` can tell a stale folder
from a current one. The entry file gets one generated addition, the checkpoint-conversion
registration that ``hf_moe_routers.modeling.register_auto_classes`` does for the family; it
registers nothing with the Auto classes, so a process that also imports hf_moe_routers keeps its
own ``routed_*`` registrations (transformers registers remote classes under their config class).

With hf_moe_routers imported, transformers prefers the registered classes over ``auto_map`` even
with ``trust_remote_code=True`` (an Auto class whose registered model is not from ``transformers.``
counts as explicit local code), so the remote files are never executed there.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from ..families import FAMILIES, FamilyAdapter, model_type_of

__all__ = [
    "ENTRY_MODULE",
    "EXCLUDED_MODULES",
    "REMOTE_CODE_PREFIX",
    "RemoteCodeFile",
    "auto_map_for",
    "check_remote_code",
    "prepare_remote_code",
    "remote_code_files",
]

PACKAGE = "hf_moe_routers"
#: The file that holds the family's config and model classes (``auto_map`` points into it).
ENTRY_MODULE = "modeling_routed_moe"
#: Prefix of every other generated file, so they sort together and are easy to recognise.
REMOTE_CODE_PREFIX = "routed_moe_"
#: Third-party packages the generated files may import. transformers itself imports
#: huggingface_hub (its own config files use ``huggingface_hub.dataclasses.strict``), so an
#: environment that can import transformers passes ``check_imports`` for all three.
ALLOWED_THIRD_PARTY = frozenset({"torch", "transformers", "huggingface_hub"})
_HEADER_TAG = "# hf-moe-routers remote code"
#: ``topk_softmax(logits_TE, top_k, renormalize=False) -> (weights_TK float32, index_TK)`` in torch
#: alone: softmax in float32, top-k, then optionally divide by the kept sum (what the host routers do).
_TORCH_TOPK_SOFTMAX = (
    "lambda logits_TE, top_k, renormalize=False: (lambda weights_TK, index_TK: ("
    "weights_TK / weights_TK.sum(dim=-1, keepdim=True) if renormalize else weights_TK, index_TK))("
    "*torch.topk(logits_TE.float().softmax(dim=-1), top_k, dim=-1))"
)
#: Package modules left out of the remote code, with what each name imported from them becomes.
#: The Triton kernels are an optional speed-up that imports triton; without them transformers' own
#: experts implementation runs, which is what ``preferred_experts_implementation`` answering None
#: means, and the softmax routers' ``topk_softmax`` is its torch reference
#: (``kernels.reference.reference_topk_softmax`` for non-float64 logits, the only ones the router
#: passes), bit for bit. Only imports inside functions may name these modules, and only names listed here:
#: anything else stops the generation, so a new dependency cannot slip in unnoticed.
#: The publishing module (which holds this generator) is left out too: where only the remote code runs, transformers'
#: ``save_pretrained`` already copies the remote files and sets ``auto_map`` (nothing to add), and
#: a ``push_to_hub`` override falls back to transformers' own upload when the name is None.
EXCLUDED_MODULES: dict[str, dict[str, str]] = {
    "hf_moe_routers.kernels": {
        "preferred_experts_implementation": "lambda device: None",
        "topk_softmax": _TORCH_TOPK_SOFTMAX,
    },
    "hf_moe_routers.modeling.publishing": {
        "write_hub_files": "lambda model, folder: []",
        "push_routed_to_hub": "None",
    },
}
_AUTO_CLASSES = (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM)

# Appended to the entry file. Kept small on purpose: the only behaviour not already in the family's
# own module, mirroring the conversion half of hf_moe_routers.modeling.register_auto_classes.
_ENTRY_EPILOGUE = """

# ---- generated by hf_moe_routers.modeling.remote_code ---------------------------------------------
# transformers applies checkpoint conversion rules (legacy per-expert layouts) by class name or
# model_type, and classes defined outside transformers get none: register the host family's rules
# under this family's routed names, as hf_moe_routers.modeling.register_auto_classes does. Nothing
# is registered with the Auto classes here (transformers does that for remote code itself).
ADAPTER.register_conversion_mapping()
"""


@dataclasses.dataclass(frozen=True)
class RemoteCodeFile:
    """One generated file: its flat name, the package module it comes from, and its text."""

    filename: str
    module: str
    source_sha256: str
    text: str


# --------------------------------------------------------------------------------------------
# Module graph
# --------------------------------------------------------------------------------------------


def _module_source(module: str) -> tuple[str, str, bool]:
    """``(text, path relative to the package's parent, is_package)`` of one package module."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise RuntimeError(
            f"Cannot read the source of {module}: remote code is generated from the package's .py files, "
            "which this installation does not have."
        )
    path = Path(spec.origin)
    root = Path(importlib.util.find_spec(PACKAGE).origin).parent.parent  # type: ignore[union-attr, arg-type]
    return (
        path.read_text(encoding="utf-8"),
        path.relative_to(root).as_posix(),
        spec.submodule_search_locations is not None,
    )


def _resolve_relative(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names, for relative or ``hf_moe_routers.*`` imports."""
    if node.level == 0:
        return node.module or ""
    if not node.module:
        raise RuntimeError(
            f"{module}: 'from {'.' * node.level} import ...' is not supported in remote-code modules; "
            "import names from a named sibling module instead."
        )
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}"


def _is_internal(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _excluded(name: str) -> str | None:
    """The ``EXCLUDED_MODULES`` entry that ``name`` is or lies inside, if any."""
    for excluded in EXCLUDED_MODULES:
        if name == excluded or name.startswith(excluded + "."):
            return excluded
    return None


def _flat_name(module: str, entry: str) -> str:
    if module == entry:
        return ENTRY_MODULE
    return REMOTE_CODE_PREFIX + "_".join(module.split(".")[1:])


def _dependency_closure(entry: str) -> list[str]:
    """``entry`` and every package module it imports, transitively; dependencies first."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(module: str) -> None:
        if module in order:
            return
        if module in visiting:
            raise RuntimeError(f"Import cycle through {module}: cannot order the remote-code files.")
        visiting.add(module)
        text, _, is_package = _module_source(module)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _is_internal(alias.name):
                        raise RuntimeError(
                            f"{module}: 'import {alias.name}' cannot be flattened; use 'from ... import'."
                        )
            elif isinstance(node, ast.ImportFrom):
                target = _resolve_relative(module, is_package, node)
                if _is_internal(target) and _excluded(target) is None:
                    visit(target)
        visiting.discard(module)
        order.append(module)

    visit(entry)
    return order


# --------------------------------------------------------------------------------------------
# Rewriting
# --------------------------------------------------------------------------------------------


def _import_statement(flat: str, node: ast.ImportFrom, indent: str) -> str:
    names = [alias.name + (f" as {alias.asname}" if alias.asname else "") for alias in node.names]
    one_line = f"{indent}from .{flat} import {', '.join(names)}\n"
    if len(one_line) <= 110:
        return one_line
    body = "".join(f"{indent}    {name},\n" for name in names)
    return f"{indent}from .{flat} import (\n{body}{indent})\n"


def _fallback_statement(relative_path: str, node: ast.ImportFrom, excluded: str, indent: str) -> str:
    """Bind each name a function imports from an excluded module to its remote-code fallback."""
    fallbacks = EXCLUDED_MODULES[excluded]
    text = f"{indent}# {excluded} is not part of the remote code (see hf_moe_routers.modeling.remote_code)\n"
    for alias in node.names:
        if alias.name not in fallbacks:
            raise RuntimeError(
                f"{relative_path}:{node.lineno}: {alias.name} from {excluded} has no remote-code fallback; "
                "add one to hf_moe_routers.modeling.remote_code.EXCLUDED_MODULES."
            )
        text += f"{indent}{alias.asname or alias.name} = {fallbacks[alias.name]}  # noqa: E731\n"
    return text


def _third_party_roots(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(module, is_package, node)
            if not _is_internal(target):
                roots.add(target.split(".")[0])
    return {root for root in roots if root not in sys.stdlib_module_names and root != "__future__"}


def _rewrite(module: str, entry: str) -> RemoteCodeFile:
    """One package module as a flat file: only its package imports change."""
    text, relative_path, is_package = _module_source(module)
    tree = ast.parse(text)
    foreign = _third_party_roots(tree, module, is_package) - ALLOWED_THIRD_PARTY
    if foreign:
        raise RuntimeError(
            f"{relative_path} imports {sorted(foreign)}: remote code may only import "
            f"{sorted(ALLOWED_THIRD_PARTY)}, the standard library and its sibling files."
        )
    lines = text.splitlines(keepends=True)
    imports = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and _is_internal(_resolve_relative(module, is_package, node))
    ]
    module_level = {id(node) for node in tree.body}
    for node in sorted(imports, key=lambda n: n.lineno, reverse=True):
        first, last = lines[node.lineno - 1], lines[node.end_lineno - 1]  # type: ignore[operator]
        trailing = last[node.end_col_offset :].strip()  # type: ignore[misc]
        if first[: node.col_offset].strip() or (trailing and not trailing.startswith("#")):
            raise RuntimeError(
                f"{relative_path}:{node.lineno}: an import must be alone on its lines to be rewritten."
            )
        target = _resolve_relative(module, is_package, node)
        indent = first[: node.col_offset]
        excluded = _excluded(target)
        if excluded is None:
            replacement = _import_statement(_flat_name(target, entry), node, indent)
        elif id(node) in module_level:
            raise RuntimeError(
                f"{relative_path}:{node.lineno}: a module-level import of {target} cannot be remote code "
                f"({excluded} is left out); import it inside the function that needs it."
            )
        else:
            replacement = _fallback_statement(relative_path, node, excluded, indent)
        lines[node.lineno - 1 : node.end_lineno] = [replacement]
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    header = (
        f"{_HEADER_TAG}: generated from {relative_path} (sha256 {digest}).\n"
        "# Do not edit: regenerate with hf_moe_routers.modeling.prepare_remote_code. Only the package-relative\n"
        "# imports differ from the source; they point at the flat sibling files of this folder.\n"
    )
    body = "".join(lines)
    if module == entry:
        if not any(
            isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "ADAPTER" for t in n.targets)
            for n in tree.body
        ):
            raise RuntimeError(
                f"{relative_path} defines no module-level ADAPTER; it is not a family modeling file."
            )
        body = body.rstrip("\n") + "\n" + _ENTRY_EPILOGUE
    return RemoteCodeFile(_flat_name(module, entry) + ".py", module, digest, header + body)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _adapter_for(model_or_config: Any) -> FamilyAdapter:
    """The family adapter of a routed model, a routed config, or a ``model_type`` string."""
    model_type = model_type_of(model_or_config)
    adapter = FAMILIES.get(model_type)  # type: ignore[arg-type]
    if adapter is None:
        supported = ", ".join(sorted(a.routed_model_type for a in FAMILIES.values()))
        raise ValueError(
            f"Remote code exists for routed models only ({supported}); got model_type={model_type!r}."
        )
    if model_type != adapter.routed_model_type:
        raise ValueError(
            f"model_type={model_type!r} is a transformers model: it loads without remote code. Patch it with "
            "patch_moe_routers first to get a routed model."
        )
    return adapter


def remote_code_files(model_or_config: Any) -> list[RemoteCodeFile]:
    """The generated files for a routed model, config or ``model_type``; dependencies first."""
    adapter = _adapter_for(model_or_config)
    entry = adapter.routed_config_class.__module__
    modules = _dependency_closure(entry)
    files = [_rewrite(module, entry) for module in modules]
    names = [f.filename for f in files]
    if len(set(names)) != len(names):
        raise RuntimeError(f"Two package modules flatten to the same file name: {sorted(names)}.")
    return files


def auto_map_for(model_or_config: Any) -> dict[str, str]:
    """``config.auto_map`` for a routed family: each Auto class our package registers it with.

    Read from the live Auto registrations, so it names exactly the classes that
    ``AutoModel*.from_pretrained`` returns when hf_moe_routers is imported.
    """
    adapter = _adapter_for(model_or_config)
    config_class = adapter.routed_config_class
    auto_map = {"AutoConfig": f"{ENTRY_MODULE}.{config_class.__name__}"}
    for auto_class in _AUTO_CLASSES:
        if config_class in auto_class._model_mapping:
            model_class = auto_class._model_mapping[config_class]
            auto_map[auto_class.__name__] = f"{ENTRY_MODULE}.{model_class.__name__}"
    return auto_map


def _generated_files_in(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.glob("*.py")):
        with path.open(encoding="utf-8") as handle:
            if handle.readline().startswith(_HEADER_TAG):
                found.append(path)
    return found


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # The layout transformers' PreTrainedConfig.to_json_file uses, so a re-save gives no diff.
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def prepare_remote_code(model_or_config: Any, folder: str | os.PathLike[str]) -> list[str]:
    """Write the remote-code files into a saved model folder and set ``auto_map`` in its config.json.

    Args:
        model_or_config: the routed model (or its config, or its ``model_type``) saved in ``folder``.
        folder: a folder written by ``save_pretrained`` (it must hold ``config.json``).

    Returns:
        The names of the files written, config.json last.

    Raises:
        ValueError: ``folder`` has no config.json, its model_type differs from the model's, or the
            model is not a routed model.
    """
    adapter = _adapter_for(model_or_config)
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json: call save_pretrained before prepare_remote_code.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != adapter.routed_model_type:
        raise ValueError(
            f"{config_path} has model_type={config.get('model_type')!r}, not {adapter.routed_model_type!r}."
        )
    files = remote_code_files(adapter.routed_model_type)
    wanted = {f.filename for f in files}
    for stale in _generated_files_in(folder):
        if stale.name not in wanted:  # left by an older layout of the generated files
            stale.unlink()
    for file in files:
        (folder / file.filename).write_text(file.text, encoding="utf-8")
    auto_map = dict(config.get("auto_map") or {})
    auto_map.update(auto_map_for(adapter.routed_model_type))
    config["auto_map"] = auto_map
    _write_json(config_path, config)
    return [f.filename for f in files] + ["config.json"]


def check_remote_code(folder: str | os.PathLike[str]) -> list[str]:
    """Problems that would make a folder's remote code differ from this package's; empty when current.

    Compares every generated file with a fresh generation from the installed source, and
    ``config.json``'s ``auto_map`` with ``auto_map_for``.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        return [f"{folder} has no config.json"]
    config = json.loads(config_path.read_text(encoding="utf-8"))
    try:
        files = remote_code_files(config.get("model_type", ""))
    except ValueError as error:
        return [str(error)]
    problems = []
    for file in files:
        path = folder / file.filename
        if not path.is_file():
            problems.append(f"{file.filename} is missing")
        elif path.read_text(encoding="utf-8") != file.text:
            problems.append(f"{file.filename} differs from a generation from {file.module}")
    extra = {p.name for p in _generated_files_in(folder)} - {f.filename for f in files}
    problems += [f"{name} is a stale generated file" for name in sorted(extra)]
    auto_map = config.get("auto_map") or {}
    for key, value in auto_map_for(config["model_type"]).items():
        if auto_map.get(key) != value:
            problems.append(f"config.json auto_map[{key!r}] is {auto_map.get(key)!r}, expected {value!r}")
    return problems

"""Save and publish routed models: weights, config with ``auto_map``, remote code, card and plots.

``save_routed_pretrained`` writes a folder that loads everywhere: natively where hf_moe_routers is
imported, by remote code (``trust_remote_code=True``) where only transformers and torch are.
``push_routed_to_hub`` uploads such a folder in one commit; ``push_folder_to_hub`` uploads a
folder saved earlier (by the Trainer or ``hf-moe-routers patch``) after making its remote code
current. Uploads go through ``huggingface_hub.HfApi.upload_folder``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from ..cards import write_model_card
from ..families import FAMILIES, model_type_of
from ..version import __version__
from .remote_code import check_remote_code, prepare_remote_code

__all__ = ["push_folder_to_hub", "push_routed_to_hub", "save_routed_pretrained", "write_hub_files"]

#: What the Trainer leaves out of its uploads too: checkpoints and private files.
FOLDER_IGNORE_PATTERNS = ("checkpoint-*", "checkpoint-*/**", "_*")


def _is_routed_type(model_type: str | None) -> bool:
    adapter = FAMILIES.get(model_type or "")
    return adapter is not None and model_type == adapter.routed_model_type


def _is_routed(model_or_config: Any) -> bool:
    return _is_routed_type(model_type_of(model_or_config))


def _api() -> HfApi:
    return HfApi(library_name="hf-moe-routers", library_version=__version__)


def _upload(
    api: HfApi,
    repo_id: str,
    folder: str | os.PathLike[str],
    *,
    commit_message: str | None,
    token: bool | str | None,
    revision: str | None,
    create_pr: bool,
    **upload_kwargs: Any,
) -> Any:
    """``api.upload_folder`` of ``folder`` in one commit, with our default commit message.

    ``upload_kwargs`` go to ``upload_folder`` unchanged (``commit_description``, ``ignore_patterns``).
    """
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or "Upload routed MoE model (hf-moe-routers)",
        token=token,
        revision=revision,
        create_pr=create_pr,
        **upload_kwargs,
    )


def write_hub_files(model: Any, folder: str | os.PathLike[str]) -> list[str]:
    """What a routed model's ``save_pretrained`` adds to the folder transformers just wrote.

    Remote code and ``auto_map`` for routed models (``prepare_remote_code``), and a model card when
    the folder has no README.md yet (an existing card, ours or hand-written, is left alone: the
    Trainer's ``create_model_card`` and ``write_model_card`` refresh ours with more information).

    Returns:
        The files written.
    """
    written: list[str] = []
    if _is_routed(model):
        written += prepare_remote_code(model, folder)
    if not Path(folder, "README.md").exists():
        write_model_card(model, folder)
        written.append("README.md")
    return written


def save_routed_pretrained(
    model: Any,
    folder: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    plots: Iterable[str | os.PathLike[str]] = (),
    card: bool = True,
    save_kwargs: dict[str, Any] | None = None,
    **card_kwargs: Any,
) -> Path:
    """``model.save_pretrained(folder)`` plus remote code, ``auto_map``, the model card and plots.

    Args:
        model: a routed model (``patch_moe_routers`` or a ``Routed*`` class).
        folder: where to write; created if needed.
        tokenizer: saved alongside when given (a tokenizer or processor).
        plots: image files to copy into the folder and show on the card (the Trainer's plot files
            already in the folder are shown anyway).
        card: write README.md (replacing an earlier card of ours, keeping a hand-written one).
        save_kwargs: keyword arguments for ``save_pretrained`` (``max_shard_size``, ...).
        card_kwargs: for ``write_model_card`` (``base_model``, ``datasets``, ``metrics``, ...).

    Returns:
        The folder.

    Raises:
        ValueError: the model is not a routed model (a plain transformers model needs no remote code).
    """
    if not _is_routed(model):
        raise ValueError(
            f"save_routed_pretrained needs a routed model; got model_type={model_type_of(model)!r}. "
            "Patch it with patch_moe_routers."
        )
    folder = Path(folder)
    model.save_pretrained(folder, **(save_kwargs or {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    prepare_remote_code(model, folder)
    if card:
        write_model_card(model, folder, plots=plots, overwrite=False, **card_kwargs)
    return folder


def push_routed_to_hub(
    model: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    tokenizer: Any = None,
    plots: Iterable[str | os.PathLike[str]] = (),
    **card_kwargs: Any,
) -> Any:
    """Upload a routed model so that others can load it with or without hf-moe-routers.

    One commit holds the safetensors weights, ``config.json`` with ``auto_map``, the remote-code
    files, ``README.md`` (our card, with ``repo_id`` in its usage snippet), the tokenizer when given
    and the plots. Takes ``PreTrainedModel.push_to_hub``'s arguments, plus ``write_model_card``'s.

    Returns:
        The ``CommitInfo`` of ``HfApi.upload_folder``.
    """
    api = _api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    card_kwargs.setdefault("title", repo_id.split("/")[-1])
    with tempfile.TemporaryDirectory() as tmp:
        save_routed_pretrained(
            model,
            tmp,
            tokenizer=tokenizer,
            plots=plots,
            save_kwargs={"max_shard_size": max_shard_size},
            model_id=repo_id,
            tags=tags,
            **card_kwargs,
        )
        return _upload(
            api,
            repo_id,
            tmp,
            commit_message=commit_message,
            token=token,
            revision=revision,
            create_pr=create_pr,
            commit_description=commit_description,
        )


def push_folder_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    ignore_patterns: Iterable[str] = FOLDER_IGNORE_PATTERNS,
) -> Any:
    """Upload a saved model folder (Trainer output, ``hf-moe-routers patch`` output, ...).

    A routed folder first gets current remote code and ``auto_map`` (regenerated when
    ``check_remote_code`` finds a difference) and, when it has no README.md, our card. Checkpoint
    folders and ``_*`` files are left out, as ``Trainer.push_to_hub`` does.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} is not a saved model folder (no config.json).")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if _is_routed_type(model_type) and check_remote_code(folder):
        prepare_remote_code(model_type, folder)
    if not (folder / "README.md").is_file():
        from transformers import AutoConfig

        write_model_card(
            AutoConfig.from_pretrained(folder), folder, model_id=repo_id, title=repo_id.split("/")[-1]
        )
    api = _api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    return _upload(
        api,
        repo_id,
        folder,
        commit_message=commit_message,
        token=token,
        revision=revision,
        create_pr=create_pr,
        ignore_patterns=list(ignore_patterns),
    )

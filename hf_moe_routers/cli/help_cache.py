"""``train --help`` and ``finetune --help`` at once: their help text, cached per installation.

Those two commands parse their flags with ``HfArgumentParser`` over transformers'
``TrainingArguments``, and importing ``TrainingArguments`` alone takes about 4 s on our 2-core
machines (it imports torch, accelerate and PEFT), before our own registration adds more. The text
itself changes only when the code or an installed version changes, so it is rendered once by the
live parser and kept in a cache file whose name is a hash of everything it depends on: the
command, every source file of this package, the versions of Python, torch and transformers, and
the terminal width argparse formats for. Any edit or upgrade gives a new name, so a stale text is
never shown; ``make`` warms the cache right after installing.

The cache lives in ``$HF_MOE_ROUTERS_CACHE`` if set, else ``$XDG_CACHE_HOME/hf_moe_routers``, else
``~/.cache/hf_moe_routers``. A cache that cannot be written is not an error: the text is rendered
live every time, as it was before the cache existed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

__all__ = ["cache_dir", "cached_help", "help_cache_key", "wants_help"]

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def wants_help(argv: list[str]) -> bool:
    """Whether argparse would print the help for ``argv``: ``-h``/``--help`` before any ``--``."""
    for arg in argv:
        if arg == "--":
            return False
        if arg in ("-h", "--help"):
            return True
    return False


def cache_dir() -> Path:
    """Where help texts are kept (see the module docstring for the order of the variables)."""
    explicit = os.environ.get("HF_MOE_ROUTERS_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hf_moe_routers"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


def help_cache_key(command: str) -> str:
    """A hash of everything ``command``'s help text depends on (hex, 24 characters).

    Reads every ``.py`` file of the package (a few milliseconds): the flags, their help strings and
    the router types they list are spread over the scripts, the Trainer's arguments and the router
    registry, and a key that missed one of them would show a stale text.
    """
    digest = hashlib.sha256()
    digest.update(command.encode())
    digest.update(sys.version.encode())
    for distribution in ("torch", "transformers", "accelerate", "peft"):
        digest.update(f"{distribution}={_version(distribution)};".encode())
    # argparse wraps the text to the terminal width (COLUMNS, else the terminal, else 80).
    digest.update(str(shutil.get_terminal_size().columns).encode())
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(_PACKAGE_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def render_help(run: Callable[[list[str]], object]) -> str:
    """The text ``run(["--help"])`` prints (argparse prints the help, then exits with status 0)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            run(["--help"])
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise
    return buffer.getvalue()


def cached_help(command: str, run: Callable[[list[str]], object]) -> str:
    """``command``'s help text: from the cache when present, else rendered by ``run`` and stored.

    Args:
        command: the command name, part of the cache key ("train", "finetune").
        run: the command's entry point; ``run(["--help"])`` prints the help and exits (argparse).
    """
    path = cache_dir() / "help" / f"{command}-{help_cache_key(command)}.txt"
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        pass
    text = render_help(run)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written to a temporary file and renamed, so a concurrent reader never sees half a text.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8") as tmp:
            tmp.write(text)
        os.replace(tmp.name, path)
    except OSError:
        pass  # read-only home, full disk: the text was rendered live, which is all the cache saves
    return text

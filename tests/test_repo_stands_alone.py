"""The repository stands alone: no file points outside it, and every cited doc exists.

A clone has only what git holds, so tracked text files (and new, not yet committed ones that git does
not ignore) must not cite team notes that live next to the checkout, and every ``docs/*.md`` path that
code or docs mention must exist.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not match its own patterns.
_OUTSIDE = "|".join(
    [
        re.escape(".." + "/shared"),  # a folder next to the checkout
        re.escape("shared" + "/design"),
        r"(?<![\w-])" + "design" + r"/[\w.-]+\.md",  # e.g. the old routers / transformers notes
        "TRANSFORMERS" + "_V5",
    ]
)
FORBIDDEN_RE = re.compile(_OUTSIDE)
DOCS_PATH_RE = re.compile(r"(?<![\w./-])docs/[\w./-]+?\.md\b")
MD_LINK_RE = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")


def _repo_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    names = sorted({n for n in out.decode("utf-8", "surrogateescape").split("\0") if n})
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def _text(path: Path) -> str | None:
    """The file's text, or None for binary files (NUL bytes or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@pytest.fixture(scope="module")
def repo_texts() -> dict[Path, str]:
    texts = {}
    for path in _repo_files():
        text = _text(path)
        if text is not None:
            texts[path] = text
    return texts


def _where(path: Path, text: str, start: int) -> str:
    line = text.count("\n", 0, start) + 1
    return f"{path.relative_to(ROOT)}:{line}"


def test_no_file_points_outside_the_repo(repo_texts: dict[Path, str]) -> None:
    hits = [
        f"{_where(path, text, m.start())}: {m.group(0)!r}"
        for path, text in repo_texts.items()
        for m in FORBIDDEN_RE.finditer(text)
    ]
    assert not hits, "references to documents outside the repository:\n" + "\n".join(hits)


def test_code_cites_docs_by_their_path(repo_texts: dict[Path, str]) -> None:
    """In code, a doc of ``docs/`` is cited by its path under ``docs/``, never by its bare file name."""
    names = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md")
    if not names:
        return
    bare_re = re.compile(r"(?<![\w./-])(?:" + "|".join(map(re.escape, names)) + r")\b")
    hits = [
        f"{_where(path, text, m.start())}: {m.group(0)}"
        for path, text in repo_texts.items()
        if path.suffix == ".py"
        for m in bare_re.finditer(text)
    ]
    assert not hits, "docs cited without their docs/ path:\n" + "\n".join(hits)


def test_every_cited_doc_exists(repo_texts: dict[Path, str]) -> None:
    missing = []
    for path, text in repo_texts.items():
        if path.suffix not in (".py", ".md"):
            continue
        for m in DOCS_PATH_RE.finditer(text):
            if not (ROOT / m.group(0)).is_file():
                missing.append(f"{_where(path, text, m.start())}: {m.group(0)}")
        if path.suffix == ".md" and path.parent == ROOT / "docs":
            # Relative Markdown links between the docs.
            for m in MD_LINK_RE.finditer(text):
                target = m.group(1)
                if "://" not in target and not (path.parent / target).is_file():
                    missing.append(f"{_where(path, text, m.start())}: {target}")
    assert not missing, "cited docs that do not exist:\n" + "\n".join(missing)

"""Fetch transformers' own test mixins from the source distribution of the installed version.

Nothing of transformers' test code lives in this repo. At test time:

1. ``pip download --no-binary :all: --no-deps transformers==<installed>`` into the cache folder
   (``$HF_MOE_ROUTERS_CONFORMANCE_CACHE`` or ``<repo>/.cache/transformers-tests/<version>/``; reused
   when present);
2. the mixin modules of its ``tests/`` folder (``SDIST_MODULES``) are copied into a package
   ``hf_sdist_tests`` next to our stand-ins (``_standins/``) for the helper modules the sdist lacks,
   under the names the mixins import them by (``STANDINS``);
3. that package's parent folder goes on ``sys.path`` (spawned rank processes inherit it).

The package folder is named after a hash of the sdist and of our stand-ins, so an edited stand-in
builds a new package and concurrent runs never see a half-written one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "hf_sdist_tests"
SDIST_MODULES = (
    "test_modeling_common.py",
    "test_configuration_common.py",
    "test_training_mixin.py",
    "test_tensor_parallel_mixin.py",
    "test_expert_parallel_mixin.py",
    "test_fsdp_mixin.py",
)
# our file in _standins/ -> the module path the sdist mixins import
STANDINS = {
    "distributed_testing_utils.py": "distributed_testing_utils.py",
    "export_tester.py": "exporters/test_export.py",
    "generation_tester.py": "generation/test_utils.py",
    "configuration_kwargs.py": "utils/test_configuration_utils.py",
}
STANDIN_DIR = Path(__file__).with_name("_standins")
REPO_ROOT = Path(__file__).resolve().parents[2]


class SdistUnavailable(RuntimeError):
    """The sdist could not be downloaded or read."""


def cache_dir(version: str = transformers.__version__) -> Path:
    root = os.environ.get("HF_MOE_ROUTERS_CONFORMANCE_CACHE")
    base = Path(root) if root else REPO_ROOT / ".cache" / "transformers-tests"
    return base / version


def download_sdist(version: str = transformers.__version__) -> Path:
    """The sdist tarball of ``transformers==version`` in the cache, downloaded once."""
    folder = cache_dir(version)
    tarball = folder / f"transformers-{version}.tar.gz"
    if tarball.is_file():
        return tarball
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"]
        cmd += [f"transformers=={version}", "--dest", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SdistUnavailable(f"`{' '.join(cmd)}` did not run: {exc}") from exc
        found = list(Path(tmp).glob("transformers-*.tar.gz"))
        if proc.returncode != 0 or len(found) != 1:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise SdistUnavailable(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' | '.join(tail)}")
        os.replace(found[0], tarball)
    return tarball


def _digest(tarball: Path) -> str:
    h = hashlib.sha256(tarball.read_bytes())
    for name in sorted(STANDINS):
        h.update(name.encode() + (STANDIN_DIR / name).read_bytes())
    return h.hexdigest()[:12]


def build_package(version: str = transformers.__version__) -> Path:
    """Download (once) and assemble ``hf_sdist_tests``; returns the folder to put on ``sys.path``."""
    tarball = download_sdist(version)
    root = cache_dir(version) / f"pkg-{_digest(tarball)}"
    if (root / PACKAGE / "__init__.py").is_file():
        return root
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=cache_dir(version)))
    pkg = staging / PACKAGE
    pkg.mkdir()
    try:
        with tarfile.open(tarball) as tar:
            for module in SDIST_MODULES:
                member = f"transformers-{version}/tests/{module}"
                try:
                    source = tar.extractfile(member)
                except KeyError:
                    source = None
                if source is None:
                    raise SdistUnavailable(f"{tarball.name} has no {member}")
                (pkg / module).write_bytes(source.read())
        for ours, target in STANDINS.items():
            dest = pkg / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(STANDIN_DIR / ours, dest)
        for folder in [pkg, *(p for p in pkg.rglob("*") if p.is_dir())]:
            (folder / "__init__.py").touch()
        try:
            os.rename(staging, root)
        except OSError:  # built concurrently by another run: use theirs
            if not (root / PACKAGE / "__init__.py").is_file():
                raise
    except (tarfile.TarError, OSError) as exc:
        raise SdistUnavailable(f"could not assemble the test package from {tarball}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def import_root() -> Path:
    """Build (or reuse) the package and put it on ``sys.path``."""
    root = build_package()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root

"""Run a callback once transformers has been imported, without importing it ourselves.

``import hf_moe_routers`` must be cheap (the command line's ``--help`` answers before torch and
transformers load), yet importing the package promises that the routed model types are registered
with transformers' Auto classes before anyone uses them. The two meet here: the package root asks
for its registration to run as soon as the ``transformers`` package has finished executing its
``__init__`` (immediately, when transformers is already imported).

One subtlety decides the design. If transformers is first imported *by one of our own modules*
(``from hf_moe_routers.routers import L2RConfig`` in a fresh process imports torch and transformers
from ``routers/``), the registration cannot run at that moment: it imports ``hf_moe_routers.modeling``,
which imports the very module that is half-executed. So the watcher also counts the
``hf_moe_routers`` submodules that are executing, and a callback due while any is runs when the
outermost of them finishes.

Nothing here imports torch or transformers, and nothing here imports the rest of the package (it
sits below every layer, docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["call_after_import"]


class _ImportWatcher(importlib.abc.MetaPathFinder):
    """A meta-path finder that finds nothing itself: it wraps the loaders other finders return.

    For ``target`` it calls ``callback`` after the module executed; for every module under
    ``package`` it keeps the nesting depth, so that a callback falling due inside our own import
    waits until that import is complete.
    """

    def __init__(self, target: str, package: str, callback: Callable[[], None]) -> None:
        self.target = target
        self.package_prefix = package + "."
        self.callback = callback
        self.depth = 0
        self.pending = False
        self.done = False
        # Imports take a per-module lock, not a global one: another thread may be importing.
        self._lock = threading.RLock()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        watched = fullname == self.target or fullname.startswith(self.package_prefix)
        if self.done or not watched:
            return None
        spec = self._find_with_other_finders(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        # The loader object is created for this one module (a SourceFileLoader per file), so
        # replacing its bound exec_module on the instance changes nothing for any other module and
        # keeps the loader's type (importlib.resources and pkgutil look at it).
        loader: Any = spec.loader
        original = loader.exec_module
        if fullname == self.target:
            loader.exec_module = lambda module: self._exec_target(original, module)
        else:
            loader.exec_module = lambda module: self._exec_own(original, module)
        return spec

    def _find_with_other_finders(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None
    ) -> importlib.machinery.ModuleSpec | None:
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def _exec_target(self, exec_module: Callable[[ModuleType], None], module: ModuleType) -> None:
        exec_module(module)
        with self._lock:
            if self.depth > 0:
                self.pending = True
                return
        self._fire()

    def _exec_own(self, exec_module: Callable[[ModuleType], None], module: ModuleType) -> None:
        with self._lock:
            self.depth += 1
        try:
            exec_module(module)
        finally:
            with self._lock:
                self.depth -= 1
                due = self.pending and self.depth == 0
        if due:
            self._fire()

    def _fire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
            self.pending = False
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.callback()


def call_after_import(target: str, package: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once, as soon as the module ``target`` has been imported.

    Immediately when ``target`` is already in ``sys.modules``; otherwise right after ``target``'s
    module code has run, or, when that happens while a submodule of ``package`` is executing (our
    own code imported ``target``), right after the outermost such submodule has finished.

    An exception from ``callback`` propagates to the import statement that triggered it: a
    registration that failed must not pass unnoticed.
    """
    if target in sys.modules:
        callback()
        return
    sys.meta_path.insert(0, _ImportWatcher(target, package, callback))

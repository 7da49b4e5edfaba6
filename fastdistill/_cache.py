"""Numba's on-disk cache of the package's kernels, keyed on the kernel sources.

Numba stamps a cached function with its own file only: a kernel in ``cpu/_kernels.py`` that inlines a
helper of ``cpu/_math.py`` or ``_scalar.py``, or reads a constant of ``_spec.py``, kept loading its old
machine code after that other file changed (an edit, an upgrade in place, a pull into an editable
install). :func:`install` puts a cache locator first in Numba's list (CPU, and numba-cuda's own list
once it is imported) that, for a function defined in a file of this package, wraps the locator Numba
would have chosen and adds to its source stamp a digest of the *kernel sources* of that file: the file
and every module of the package it imports, directly or through other package modules (imports found
in the source text; numpy, numba and the standard library are not followed). A kernel whose sources
changed finds a stale index and compiles afresh; its entries are overwritten in place, so nothing
accumulates. Where the files live is Numba's choice, unchanged: ``NUMBA_CACHE_DIR`` when set, else the
``__pycache__`` folder next to the source, else (a read-only install) Numba's user-wide cache folder.

For the same files, an unreadable index (truncated, overwritten) counts as empty and a data file
carries a SHA-256 digest of its contents: one that is cut short or altered is not loaded, the kernel
compiles again and replaces it.

Private module, imported by the modules that define cached kernels (never by ``import fastdistill``)
before their first ``cache=True`` decorator: importing it installs the hook; ``cuda._kernels`` calls
:func:`install` again once numba-cuda is imported. The package's files are read
and hashed once per process, when the first kernel's cache is set up (a few milliseconds). Numba's
cache internals are private: with a Numba whose internals differ, :func:`install` warns and leaves
Numba's default (each kernel keyed on its own file) in place. A caller who sets
``NUMBA_CACHE_LOCATOR_CLASSES`` chooses Numba's locators and gets that default too.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
import threading
import warnings
from typing import Any

# bump to invalidate every entry written under an older keying scheme
SCHEME = 1
_MARK = "fastdistill-kernel-sources"
# data files of this package's kernels: magic, SHA-256 of the payload, payload
_DATA_MAGIC = b"FDKC\x01"
_DIGEST = 32

PKG_DIR = os.path.dirname(os.path.realpath(__file__))

_lock = threading.RLock()
_graphs: dict[str, "_Graph"] = {}
_inside: dict[str, bool] = {}
_patched: set[str] = set()  # caching modules already handled (by name)
_warned = False

# an import statement at the start of a line: ``from <dots><name> import <names>`` (names in parentheses
# may span lines) or ``import <names>``; backslash continuations are joined first. Text in strings that
# looks like an import only adds a dependency: the digest errs towards compiling again.
_IMPORT = re.compile(
    rb"[ \t]*(?:from[ \t]+(\.*)[ \t]*([\w.]*)[ \t]+import[ \t]*(\((?:[^)#]|#[^\n]*)*\)|[^\n]*)"
    rb"|import[ \t]+([^\n]*))"
)
_COMMENT = re.compile(rb"#[^\n]*")


def _names(text: bytes) -> list[str]:
    """The imported names of an import statement's tail (``a as b, c`` or ``(a, b)``)."""
    text = _COMMENT.sub(b"", text.split(b";")[0] if not text.startswith(b"(") else text)
    out = []
    for part in text.strip(b"() \t\r\n").split(b","):
        words = part.split()
        if words:
            out.append(words[0].decode("ascii", "replace"))
    return out


class _Graph:
    """The package's modules (by dotted parts below the top package), their digests and imports."""

    def __init__(self, pkg_dir: str) -> None:
        pkg_dir = os.path.realpath(pkg_dir)
        self.pkg_dir = pkg_dir
        self.top = os.path.basename(pkg_dir)
        self.files: dict[tuple[str, ...], str] = {}  # module parts -> path relative to pkg_dir
        self.digest: dict[tuple[str, ...], bytes] = {}
        self.deps: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
        self.by_path: dict[str, tuple[str, ...]] = {}  # real path -> module parts
        sources: dict[tuple[str, ...], bytes] = {}
        for root, dirs, files in os.walk(pkg_dir):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            rel = os.path.relpath(root, pkg_dir)
            base = () if rel == os.curdir else tuple(rel.split(os.sep))
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                parts = base if name == "__init__.py" else base + (name[:-3],)
                path = os.path.join(root, name)
                try:
                    with open(path, "rb") as f:
                        src = f.read()
                except OSError:
                    continue
                sources[parts] = src
                self.files[parts] = os.path.relpath(path, pkg_dir).replace(os.sep, "/")
                self.digest[parts] = hashlib.sha256(src).digest()
                self.by_path[path] = parts
        for parts, src in sources.items():
            self.deps[parts] = self._imports(parts, src)
        self._stamps: dict[tuple[str, ...], str] = {}

    def _resolve(self, parts: tuple[str, ...], dots: int, name: str) -> tuple[str, ...] | None:
        if dots:
            is_pkg = self.files[parts].endswith("__init__.py")
            package = parts if is_pkg else parts[:-1]
            if dots - 1 > len(package):
                return None
            base = package[: len(package) - (dots - 1)]
            return base + tuple(name.split(".")) if name else base
        names = name.split(".")
        if names[0] != self.top:
            return None
        return tuple(names[1:])

    def _imports(self, parts: tuple[str, ...], src: bytes) -> set[tuple[str, ...]]:
        deps = set()
        if b"\\\n" in src or b"\\\r\n" in src:
            src = src.replace(b"\\\r\n", b" ").replace(b"\\\n", b" ")
        starts = []  # the start of each line holding the word ``import`` (a plain search: fast)
        k = src.find(b"import")
        while k >= 0:
            start = src.rfind(b"\n", 0, k) + 1
            if not starts or starts[-1] != start:
                starts.append(start)
            k = src.find(b"import", k + 6)
        for start in starts:
            m = _IMPORT.match(src, start)
            if m is None:
                continue
            dots, name, what, plain = m.groups()
            if plain is not None:
                for full in _names(plain):
                    target = self._resolve(parts, 0, full)
                    if target is not None and target in self.files:
                        deps.add(target)
                continue
            target = self._resolve(parts, len(dots), name.decode("ascii", "replace"))
            if target is None:
                continue
            for n in _names(what):
                if target + (n,) in self.files:
                    deps.add(target + (n,))  # a submodule
                elif target in self.files:
                    deps.add(target)  # a name the module defines (or ``*``)
        deps.discard(parts)
        return deps

    def closure(self, parts: tuple[str, ...]) -> list[tuple[str, ...]]:
        """``parts`` and every package module it imports, directly or not (sorted)."""
        seen = {parts}
        todo = [parts]
        while todo:
            for d in self.deps.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return sorted(seen)

    def stamp(self, parts: tuple[str, ...] | None) -> str:
        """Hex digest of the kernel sources of module ``parts`` (every module of the package for None:
        a file the walk did not see)."""
        key = parts if parts is not None else ("<all>",)
        s = self._stamps.get(key)
        if s is None:
            h = hashlib.sha256(b"%d\0" % SCHEME)
            for p in self.closure(parts) if parts is not None else sorted(self.files):
                h.update(self.files[p].encode() + b"\0" + self.digest[p])
            s = self._stamps[key] = h.hexdigest()
        return s


def _graph(pkg_dir: str = PKG_DIR) -> _Graph:
    pkg_dir = os.path.realpath(pkg_dir)
    with _lock:
        g = _graphs.get(pkg_dir)
        if g is None:
            g = _graphs[pkg_dir] = _Graph(pkg_dir)
        return g


def kernel_sources(py_file: str, pkg_dir: str = PKG_DIR) -> list[str]:
    """The files (relative to ``pkg_dir``) whose contents key the cached kernels of ``py_file``."""
    g = _graph(pkg_dir)
    parts = g.by_path.get(os.path.realpath(py_file))
    return [g.files[p] for p in (g.closure(parts) if parts is not None else sorted(g.files))]


def source_stamp(py_file: str, pkg_dir: str = PKG_DIR) -> str:
    """Hex digest of the kernel sources of ``py_file`` (read once per process and package folder)."""
    g = _graph(pkg_dir)
    return g.stamp(g.by_path.get(os.path.realpath(py_file)))


def _in_package(py_file: str) -> bool:
    r = _inside.get(py_file)
    if r is None:
        try:
            r = os.path.realpath(py_file).startswith(PKG_DIR + os.sep)
        except (TypeError, ValueError, OSError):
            r = False
        _inside[py_file] = r
    return r


def _is_ours(stamp: Any) -> bool:
    return isinstance(stamp, tuple) and len(stamp) == 4 and stamp[0] == _MARK


def _make_locator(caching: Any, impl: type) -> type:
    """A locator class for ``caching`` (``numba.core.caching`` or numba-cuda's copy) whose
    ``from_function`` takes this package's files: it asks the other locators of ``impl``'s list in
    order, as Numba would, and wraps the first that accepts."""
    base = caching._CacheLocator

    class KernelSourceLocator(base):  # type: ignore[misc, valid-type]
        def __init__(self, inner: Any, py_file: str) -> None:
            self._inner = inner
            self._py_file = py_file
            self._stamp = source_stamp(py_file)

        def __getattr__(self, name: str) -> Any:  # anything else a cache reads (``_lineno``, ...)
            if name == "_inner":
                raise AttributeError(name)
            return getattr(self._inner, name)

        def ensure_cache_path(self) -> None:
            self._inner.ensure_cache_path()

        def get_cache_path(self) -> str:
            return self._inner.get_cache_path()

        def get_source_stamp(self) -> Any:
            return (_MARK, SCHEME, self._inner.get_source_stamp(), self._stamp)

        def get_disambiguator(self) -> str:
            return self._inner.get_disambiguator()

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            if not _in_package(py_file):
                return None
            for other in list(impl._locator_classes):
                if getattr(other, "_fastdistill_locator", False):
                    continue
                inner = other.from_function(py_func, py_file)
                if inner is not None:
                    return cls(inner, py_file)
            return None

    KernelSourceLocator._fastdistill_locator = True  # type: ignore[attr-defined]
    KernelSourceLocator.__qualname__ = KernelSourceLocator.__name__
    return KernelSourceLocator


def _make_index_file(base: type) -> type:
    """``IndexDataCacheFile`` that, for this package's kernels, reads an unreadable index as an empty
    one and writes and checks a digest with every data file."""

    class CheckedIndexDataCacheFile(base):  # type: ignore[misc, valid-type]
        def _load_index(self):  # type: ignore[no-untyped-def]
            if not _is_ours(getattr(self, "_source_stamp", None)):
                return super()._load_index()
            try:
                overloads = super()._load_index()
            except Exception:  # truncated or overwritten: compile and write a fresh one
                return {}
            return overloads if isinstance(overloads, dict) else {}

        def _save_data(self, name, data):  # type: ignore[no-untyped-def]
            if not _is_ours(getattr(self, "_source_stamp", None)):
                return super()._save_data(name, data)
            payload = self._dump(data)
            with self._open_for_write(self._data_path(name)) as f:
                f.write(_DATA_MAGIC + hashlib.sha256(payload).digest() + payload)
            return None

        def _load_data(self, name):  # type: ignore[no-untyped-def]
            if not _is_ours(getattr(self, "_source_stamp", None)):
                return super()._load_data(name)
            with open(self._data_path(name), "rb") as f:  # OSError: a miss (Numba's own handling)
                blob = f.read()
            head = len(_DATA_MAGIC) + _DIGEST
            payload = blob[head:]
            if blob[: len(_DATA_MAGIC)] != _DATA_MAGIC or hashlib.sha256(payload).digest() != blob[len(_DATA_MAGIC):head]:
                return None  # cut short or altered: a miss, compiled and written again
            try:
                return pickle.loads(payload)
            except Exception:
                return None

    CheckedIndexDataCacheFile._fastdistill_index = True  # type: ignore[attr-defined]
    CheckedIndexDataCacheFile.__qualname__ = CheckedIndexDataCacheFile.__name__
    return CheckedIndexDataCacheFile


def _warn(what: str, err: BaseException | None = None) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    try:
        import numba

        version = numba.__version__
    except Exception:  # pragma: no cover
        version = "?"
    warnings.warn(
        f"fastdistill: the cache internals of this Numba ({version}; {what}{': ' + repr(err) if err else ''}) "
        "are not the ones expected, so compiled kernels are cached by Numba's default rule, keyed on each "
        "kernel's own file only: after fastdistill's sources change (an edit, an upgrade in place), delete "
        "its __pycache__/*.nbi and *.nbc files or point NUMBA_CACHE_DIR at an empty folder",
        RuntimeWarning,
        stacklevel=3,
    )


def _install_into(caching: Any) -> bool:
    """Put the locator first in ``caching``'s list and its checked index file in place: True when done,
    else a warning and Numba's default behaviour."""
    try:
        impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl")
        classes = impl._locator_classes
        if not isinstance(classes, list) or not isinstance(getattr(caching, "_CacheLocator"), type):
            raise TypeError("CacheImpl._locator_classes is not a list of locator classes")
        index_file = caching.IndexDataCacheFile
        for attr in ("_load_index", "_load_data", "_save_data", "_dump", "_data_path", "_open_for_write"):
            if not callable(getattr(index_file, attr, None)):
                raise AttributeError(f"IndexDataCacheFile.{attr}")
    except Exception as err:
        _warn(getattr(caching, "__name__", "?"), err)
        return False
    if not any(getattr(c, "_fastdistill_locator", False) for c in classes):
        classes.insert(0, _make_locator(caching, impl))
    if not getattr(index_file, "_fastdistill_index", False):
        caching.IndexDataCacheFile = _make_index_file(index_file)
    return True


def install() -> None:
    """Key the on-disk cache of this package's kernels on their sources, in ``numba.core.caching`` and
    (once imported) numba-cuda's ``numba.cuda.core.caching``. Idempotent and cheap after the first call."""
    with _lock:
        try:
            from numba.core import caching
        except Exception as err:  # pragma: no cover - no numba: nothing is cached anyway
            _warn("numba.core.caching", err)
            return
        for mod in (caching, sys.modules.get("numba.cuda.core.caching")):
            if mod is None or mod.__name__ in _patched:
                continue
            if _install_into(mod):
                _patched.add(mod.__name__)


install()

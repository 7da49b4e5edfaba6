"""The on-disk kernel cache is keyed on the kernel sources (``fastdistill._cache``): a copy of the package
whose helper changes between two processes computes with the new helper, in ``NUMBA_CACHE_DIR`` and in
the in-tree ``__pycache__``; a later process still loads from the cache; damaged cache files are
compiled again, never loaded. Each subprocess compiles (or loads) one float64 softmax kernel."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fastdistill import _cache

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fastdistill"

SCRIPT = """
import json, numpy as np, fastdistill as fd
from fastdistill.cpu import _kernels as K
x = np.arange(32, dtype=np.float64).reshape(4, 8) / 8
y = fd.softmax(x)
st = K.softmax_kernel(False).stats
print(json.dumps({"file": fd.__file__, "y": y.tolist(), "hits": sum(st.cache_hits.values()),
                  "misses": sum(st.cache_misses.values())}))
"""

# the float64 exponential every float64 softmax calls (``cpu/_math.py``), and its edit: exp(k * x)
# makes the kernel compute softmax(k * x)
EXP64 = "        def impl64(x):  # type: ignore[no-untyped-def]\n            return math.exp(x)\n"


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


X = np.arange(32, dtype=np.float64).reshape(4, 8) / 8


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(PKG, dst / "fastdistill", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def _set_exp_scale(src: Path, k: float) -> None:
    path = src / "fastdistill" / "cpu" / "_math.py"
    text = path.read_text()
    assert text.count(EXP64) == 1
    path.write_text(text.replace(EXP64, EXP64.replace("math.exp(x)", f"math.exp({k!r} * x)")))


def _run(src: Path, cache_dir: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "NUMBA_CACHE_LOCATOR_CLASSES", "PYTHONPATH")}
    env["PYTHONPATH"] = str(src)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=src, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["file"] == str(src / "fastdistill" / "__init__.py")
    return out


def _close(out: dict, k: float) -> bool:
    return bool(np.allclose(out["y"], _softmax(k * X), rtol=1e-12, atol=0.0))


def test_an_edited_helper_recompiles_and_damaged_files_are_not_loaded(tmp_path):
    src = _copy(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    first = _run(src, cache)
    assert _close(first, 1.0) and first["misses"] == 1 and first["hits"] == 0
    _set_exp_scale(src, 2.0)  # a helper in another file than the kernel
    edited = _run(src, cache)
    assert _close(edited, 2.0), "the kernel compiled before the helper changed was loaded from the cache"
    assert edited["misses"] == 1
    again = _run(src, cache)  # nothing changed: loaded
    assert _close(again, 2.0) and (again["hits"], again["misses"]) == (1, 0)

    # damaged files, in one process: the kernel's data file with one byte changed; of the functions it
    # calls, data files cut short or overwritten, or their indexes: compiled again, never loaded
    indexes = sorted(cache.rglob("*.nbi"))
    assert len(indexes) > 4
    for i, index in enumerate(indexes):
        stem = index.name[: -len(".nbi")]
        data = sorted(index.parent.glob(stem + ".*.nbc"))
        assert data
        if "softmax_kernel" in stem:
            b = data[0].read_bytes()
            data[0].write_bytes(b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 0xFF]) + b[len(b) // 2 + 1:])
        elif i % 4 < 2:
            for d in data:
                b = d.read_bytes()
                d.write_bytes(b[: len(b) // 3] if i % 4 == 0 else os.urandom(len(b)))
        else:
            index.write_bytes(index.read_bytes()[:5] if i % 4 == 2 else os.urandom(64))
    damaged = _run(src, cache)
    assert _close(damaged, 2.0) and (damaged["hits"], damaged["misses"]) == (0, 1)
    again = _run(src, cache)  # and written again, whole
    assert _close(again, 2.0) and (again["hits"], again["misses"]) == (1, 0)


def test_in_tree_cache_follows_an_edited_helper(tmp_path):
    src = _copy(tmp_path)
    first = _run(src, None)
    assert _close(first, 1.0)
    assert list((src / "fastdistill" / "cpu" / "__pycache__").glob("*softmax_kernel*.nbi"))
    _set_exp_scale(src, 0.5)
    assert _close(_run(src, None), 0.5), "the kernel compiled before the helper changed was loaded from __pycache__"


# ------------------------------------------------------------------ the digest, in this process


def test_stamp_follows_the_modules_kernels_import(tmp_path):
    pkg = _copy(tmp_path) / "fastdistill"
    kernels = str(pkg / "cpu" / "_kernels.py")
    assert {"cpu/_kernels.py", "cpu/_math.py", "_formulas/__init__.py", "_formulas/mixture.py", "_spec.py"} <= \
        set(_cache.kernel_sources(kernels, str(pkg)))
    assert "_scalar.py" in _cache.kernel_sources(str(pkg / "cpu" / "_sparse.py"), str(pkg))
    assert "demo.py" not in _cache.kernel_sources(kernels, str(pkg))
    before = _cache.source_stamp(kernels, str(pkg))
    stamps = set()
    for name in ("_spec.py", "_formulas/mixture.py", "cpu/_math.py", "demo.py"):
        p = pkg / name
        text = p.read_text()
        p.write_text(text + "\n# edited\n")
        _cache._graphs.pop(os.path.realpath(pkg), None)  # a new process: read again
        stamps.add((name, _cache.source_stamp(kernels, str(pkg)) == before))
        p.write_text(text)
    assert stamps == {("_spec.py", False), ("_formulas/mixture.py", False), ("cpu/_math.py", False),
                      ("demo.py", True)}
    _cache._graphs.pop(os.path.realpath(pkg), None)


def _ast_imports(pkg: Path, rel: str) -> set[str]:
    """The package modules ``rel`` imports, by Python's own parser (the reference for the text scan)."""
    parts = tuple(rel[:-3].split("/"))
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    package = parts if is_pkg else parts[:-1]
    files = {tuple(str(p.relative_to(pkg))[:-3].split("/")): str(p.relative_to(pkg))
             for p in pkg.rglob("*.py") if "__pycache__" not in p.parts}
    files = {(k[:-1] if k[-1] == "__init__" else k): v for k, v in files.items()}
    out = set()
    for node in ast.walk(ast.parse((pkg / rel).read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = tuple(node.module.split(".")) if node.module else ()
            if node.level:
                target = package[: len(package) - (node.level - 1)] + mod
            elif mod and mod[0] == pkg.name:
                target = mod[1:]
            else:
                continue
            for a in node.names:
                if target + (a.name,) in files:
                    out.add(files[target + (a.name,)])
                elif target in files:
                    out.add(files[target])
        elif isinstance(node, ast.Import):
            for a in node.names:
                names = a.name.split(".")
                if names[0] == pkg.name and tuple(names[1:]) in files:
                    out.add(files[tuple(names[1:])])
    out.discard(rel)
    return out


def test_text_scan_finds_every_import_the_parser_finds():
    g = _cache._Graph(str(PKG))
    for parts, rel in g.files.items():
        found = {g.files[d] for d in g.deps[parts]}
        assert _ast_imports(PKG, rel) <= found, rel


def test_unexpected_numba_internals_warn_and_leave_numba_alone(monkeypatch):
    monkeypatch.setattr(_cache, "_warned", False)
    fake = SimpleNamespace(__name__="numba.core.caching")  # none of the internals the hook needs
    with pytest.warns(RuntimeWarning, match="Numba's default rule"):
        assert _cache._install_into(fake) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cache._install_into(fake) is False  # warned once


def test_installed_once_for_this_package():
    from numba.core import caching

    import fastdistill.cpu  # noqa: F401  (installs)

    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
    ours = [c for c in impl._locator_classes if getattr(c, "_fastdistill_locator", False)]
    assert len(ours) == 1 and impl._locator_classes[0] is ours[0]
    _cache.install()
    assert [c for c in impl._locator_classes if getattr(c, "_fastdistill_locator", False)] == ours
    assert getattr(caching.IndexDataCacheFile, "_fastdistill_index", False)


def test_cuda_kernels_are_keyed_on_their_sources_too():
    pytest.importorskip("numba.cuda")
    ck = pytest.importorskip("fastdistill.cuda._kernels")
    if ck.SIM:
        pytest.skip("the simulator caches nothing")
    caching = pytest.importorskip("numba.cuda.core.caching")  # numba-cuda's own copy of the cache module
    cache = ck.shard_rescale_kernel._cache
    assert type(cache._impl.locator).__name__ == "KernelSourceLocator"
    stamp = cache._cache_file._source_stamp
    assert stamp[0] == _cache._MARK and stamp[-1] == _cache.source_stamp(ck.__file__)
    assert getattr(caching.IndexDataCacheFile, "_fastdistill_index", False)

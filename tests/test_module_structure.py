"""The package's dependency directions: one dispatch site, and no import cycles between the modules
that used to import each other (``_dispatch`` and ``sparse``; ``torch`` and ``_torch_linear``).

Every import statement of a module counts, at module level or inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "fastdistill"


def imports(rel: str) -> set[str]:
    """The package modules ``fastdistill/<rel>`` imports, as dotted names below ``fastdistill``
    (``from . import x`` counts as ``x``, ``from .a import b`` as ``a`` and ``a.b``)."""
    path = PKG / rel
    package = list(Path(rel).parts[:-1])  # the package the module lies in (a package's __init__: itself)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            mod = base + (node.module.split(".") if node.module else [])
            if node.module:
                out.add(".".join(mod))
            for alias in node.names:
                out.add(".".join(mod + [alias.name]))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastdistill"):
            out.add(node.module.split(".", 1)[1] if "." in node.module else "")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fastdistill."):
                    out.add(alias.name.split(".", 1)[1])
    return out


def test_imports_helper_resolves_relative_names():
    assert "_dispatch" in imports("distillers.py")
    assert "cpu._kernels" in imports("cpu/__init__.py")


@pytest.mark.parametrize("rel, banned", [
    ("sparse.py", {"_dispatch", "cpu", "cuda"}),  # the backend is chosen in _dispatch (which imports sparse)
    ("sharded.py", {"cpu", "cuda", "cpu._kernels", "cuda._kernels"}),  # its backend comes from _dispatch.shard_run
    ("_torch_linear.py", {"torch"}),  # both op modules build on _torch_ops
    ("_torch_ops.py", {"torch", "_torch_linear"}),
    ("hf.py", set()),
])
def test_no_reverse_imports(rel, banned):
    got = {m for m in imports(rel) if m in banned or any(m.startswith(b + ".") for b in banned)}
    assert not got, f"fastdistill/{rel} imports {sorted(got)}"


def test_backends_never_import_the_facade():
    for rel in ("cpu/__init__.py", "cuda/__init__.py"):
        assert "_dispatch" not in imports(rel)


def test_torch_modules_import_cleanly_in_any_order():
    pytest.importorskip("torch")
    import subprocess
    import sys

    for first in ("fastdistill._torch_linear", "fastdistill.torch", "fastdistill._torch_ops", "fastdistill.sparse"):
        code = f"import {first}; import fastdistill.torch as T; assert T.FusedLinearDistillationLoss"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=600)

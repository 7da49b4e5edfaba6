"""Teacher signals in: what inference servers and training tools emit, as :class:`~fastdistill.SparseTeacher`
objects, and a memory-mapped store of them on disk.

- :func:`from_vllm`, :func:`from_sglang`, :func:`from_axolotl`: one sequence's top-k log-probabilities
  as a ``SparseTeacher`` whose row ``i`` is the teacher's distribution over the token that follows
  position ``i`` (aligned with a causal LM's logits at position ``i``: the usual shift);
- :func:`save` / :func:`load`: a teacher store (a directory of Arrow IPC shards and a manifest), opened
  memory-mapped, that HF ``datasets`` opens as is;
- :func:`capture`: score token sequences with a running vLLM or SGLang server into a store (the
  ``fastdistill teacher capture`` command).

Importing this package imports NumPy only; pyarrow (the store) and httpx, tqdm, msgspec (capture) are
imported when used: ``pip install 'fastdistill[teachers]'``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from ._errors import CaptureError, TeacherFormatError, TeacherStoreError
from ._readers import from_axolotl, from_sglang, from_vllm

if TYPE_CHECKING:  # pragma: no cover
    from ..sparse import SparseTeacher
    from ._capture import CaptureInterrupted, CaptureResult, capture
    from ._store import TeacherStore

__all__ = [
    "from_vllm",
    "from_sglang",
    "from_axolotl",
    "save",
    "load",
    "capture",
    "CaptureResult",
    "TeacherStore",
    "TeacherFormatError",
    "TeacherStoreError",
    "CaptureError",
    "CaptureInterrupted",
]


def save(path: Any, teachers: "SparseTeacher | Iterable[SparseTeacher]", *, meta: dict | None = None,
         dtype: str = "float16") -> int:
    """Append ``teachers`` (one ``SparseTeacher`` of shape ``(T, k)`` per sequence, or an iterable of
    them) to the teacher store at ``path`` (a directory, created if missing) as one new shard; returns
    the number of sequences the store holds afterwards. ``meta``: the store's metadata (``vocab_size``,
    ``k``, ``kind``, ``temperature``, ``source``, ``tokenizer``, anything JSON can hold); on an existing
    store the keys given must agree with the store's and new keys are added. ``dtype``: the values'
    storage, ``"float16"`` (6 bytes a slot with the int32 id) or ``"float32"``. Needs pyarrow."""
    from ._store import save as _save

    return _save(path, teachers, meta=meta, dtype=dtype)


def load(path: Any, *, tail: str = "renormalize", verify: bool = False) -> "TeacherStore":
    """Open the teacher store at ``path`` memory-mapped: ``store[i]`` is sequence ``i`` as a
    ``SparseTeacher`` whose arrays are views of the mapped files (no copy), ``len(store)``,
    ``store.meta``. ``tail`` is given to each ``SparseTeacher``. A truncated, damaged or foreign store
    raises :class:`TeacherStoreError` here; ``verify=True`` also checks every shard's CRC-32 (reads the
    whole store). Needs pyarrow."""
    from ._store import load as _load

    return _load(path, tail=tail, verify=verify)


def __getattr__(name: str) -> Any:
    # imported on first use: the store needs pyarrow, the capture asyncio (and httpx when it runs)
    if name == "TeacherStore":
        from ._store import TeacherStore

        return TeacherStore
    if name in ("capture", "CaptureResult", "CaptureInterrupted"):
        from . import _capture

        return getattr(_capture, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

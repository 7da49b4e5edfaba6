"""Function forms of the losses, softmax, and thread/backend control."""
from __future__ import annotations

import os
from typing import Any

from . import _dispatch
from . import _validate as V
from ._spec import Terms
from .losses import DistilLoss
from .sparse import SparseTeacher


def softmax(x: Any, temperature: float = 1.0, *, backend: str = "auto") -> Any:
    """Row-wise, numerically stable ``softmax(x / temperature)``; ``-inf`` entries get probability 0."""
    return _dispatch.softmax(x, temperature, log=False, backend=backend)


def log_softmax(x: Any, temperature: float = 1.0, *, backend: str = "auto") -> Any:
    """Row-wise, numerically stable ``log_softmax(x / temperature)``."""
    return _dispatch.softmax(x, temperature, log=True, backend=backend)


def kl_divergence(student: Any, teacher: Any, temperature: float = 1.0, *, reduction: str = "mean",
                  num_items: Any = None, backend: str = "auto") -> Any:
    """``T**2 * KL(softmax(teacher/T) || softmax(student/T))`` per row, reduced."""
    return _dispatch.response(student, teacher, None, lambda: DistilLoss.kl_divergence(temperature).terms(),
                              reduction=reduction, num_items=num_items, backend=backend)[0]


def cross_entropy(student: Any, labels: Any, *, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, num_items: Any = None, backend: str = "auto") -> Any:
    """PyTorch's ``F.cross_entropy(student, labels)`` (log space, ``ignore_index``, ``label_smoothing``)."""
    if labels is None:
        raise TypeError("cross_entropy needs labels")
    ignore_index = V.integer(ignore_index, "ignore_index")
    return _dispatch.response(
        student, student, labels, lambda: Terms(hard_w=1.0, smoothing=V.label_smoothing(label_smoothing)),
        ignore_index=ignore_index, reduction=reduction, num_items=num_items, backend=backend,
        needs_labels=True,
    )[0]


def mse(student: Any, teacher: Any, *, reduction: str = "mean", num_items: Any = None,
        backend: str = "auto") -> Any:
    """Mean over classes (features) of ``(teacher - student)**2`` per row, reduced."""
    return DistilLoss.mse().compute(student, teacher, reduction=reduction, num_items=num_items, backend=backend)


def cosine_distance(student: Any, teacher: Any, *, reduction: str = "mean", num_items: Any = None,
                    backend: str = "auto") -> Any:
    """``1 - cos(student, teacher)`` per row (1.0 for a zero-norm row), reduced."""
    return DistilLoss.cosine().compute(student, teacher, reduction=reduction, num_items=num_items,
                                       backend=backend)


def top_k(logits: Any, k: int, *, temperature: float = 1.0, top_p: float | None = None, min_k: int = 1,
          backend: str = "auto") -> SparseTeacher:
    """Per row the ``k`` largest logits' ids (sorted by decreasing value; ties: the lower id first) and
    their exact log-probabilities ``log_softmax(logits / temperature)`` (normaliser over the full row),
    as a ``SparseTeacher(kind="logprobs", temperature=temperature)``: int32 ids and float32 values
    (float64 for float64 logits),
    NumPy arrays of the logits' leading shape. One pass over the logits (vectorized reductions per span
    of columns), then the selection from cache. Device logits run on the GPU and give arrays of the caller's
    kind (int64 ids, float64 values: the kernel's own).

    ``top_p`` in (0, 1] (the nucleus, Megatron-LM's offline saver): each row keeps only its shortest
    prefix, by decreasing probability under ``softmax(logits / temperature)``, whose probability reaches
    ``top_p``, with at least ``min_k`` and at most ``k`` entries; the other slots get id ``-1`` and value
    ``-inf``. The cut is a prefix scan over the sorted selection, in the same pass."""
    return _dispatch.top_k(logits, k, temperature=temperature, top_p=top_p, min_k=min_k, backend=backend)


def set_num_threads(n: int) -> None:
    """Threads the CPU kernels use from this Python thread (1 .. the number numba started with)."""
    import numba

    n = V.integer(n, "n")
    top = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= top:
        raise V.InvalidParameterError(f"n must be in [1, {top}] (numba's thread pool size), got {n}")
    numba.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the CPU kernels use from this Python thread."""
    import numba

    return int(numba.get_num_threads())


def available_backends() -> list[str]:
    """``["cpu"]``, plus ``"cuda"`` when numba-cuda is installed and a GPU really works."""
    out = ["cpu"]
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return out  # the simulator is for tests, not a backend
    try:
        _dispatch.cuda_backend()
    except Exception:  # noqa: BLE001 - any failure means: no usable GPU
        return out
    out.append("cuda")
    return out

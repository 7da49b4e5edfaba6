"""CPU backend: host wrappers around the Numba kernels in ``_kernels``.

Inputs arrive validated and normalised by the façade: C-contiguous 2-D float32/float64 arrays of one
dtype, labels as int64 or ``None``.
"""
from __future__ import annotations

import os

import numba
import numpy as np

from .._spec import DIV_NONE, Terms
from . import _kernels as K

# Calls from several Python (or C) threads at once need a thread-safe threading layer (workqueue aborts
# the process): prefer OpenMP, then TBB. The caller's NUMBA_THREADING_LAYER(_PRIORITY) setting wins.
if "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

_NO_LABELS = np.zeros(0, dtype=np.int64)
# calls on at most this many logits run in the calling thread alone: waking the thread pool costs ~2 us
# on an idle machine and tens of microseconds on a busy one, more than such a call's work
SMALL = 1 << 15


def _threads_for(size: int) -> tuple[int, int]:
    """(Numba threads for a call on ``size`` logits, the caller's current setting)."""
    n = numba.get_num_threads()
    return (n if size > SMALL else 1), n


def _launch(kernel, threads: tuple[int, int], *args) -> None:  # type: ignore[no-untyped-def]
    """``kernel(*args)`` on ``threads[0]`` Numba threads (a thread-local setting, restored to ``threads[1]``)."""
    nthreads, n = threads
    if nthreads == n:
        kernel(*args)
        return
    numba.set_num_threads(nthreads)
    try:
        kernel(*args)
    finally:
        numba.set_num_threads(n)


def ce_mode(terms: Terms, has_labels: bool) -> int:
    """How the kernels evaluate the hard-label term."""
    if terms.hard_w == 0.0 or not has_labels:
        return K.CE_NONE
    if terms.div_kind != DIV_NONE and terms.tau == 1.0:
        return K.CE_SHARED
    return K.CE_OWN


def response(
    s: np.ndarray,
    t: np.ndarray,
    labels: np.ndarray | None,
    terms: Terms,
    ignore_index: int,
    scale: float,
    want_grad: bool,
    grad_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Row losses (float64, 0 for ignored rows) and, if asked, the gradient of ``scale * sum(rows)``."""
    has_labels = labels is not None
    lin = terms.mse_w != 0.0 or terms.cos_w != 0.0
    ce = ce_mode(terms, has_labels)
    kernel = K.response_kernel(terms.div_kind, ce, lin, K.power_of(terms.tau, terms.div_kind, ce))
    out_loss = np.empty(s.shape[0], dtype=np.float64)
    if want_grad:
        grad = grad_out if grad_out is not None else np.empty_like(s)
    else:
        grad = s  # never written: the kernel only writes it when want_grad
    threads = _threads_for(s.size)
    _launch(
        kernel,
        threads,
        s,
        t,
        labels if has_labels else _NO_LABELS,
        has_labels,
        ignore_index,
        terms.pack(),
        float(scale),
        want_grad,
        out_loss,
        grad,
        threads[0],
    )
    return out_loss, (grad if want_grad else None)


def softmax(x: np.ndarray, tau: float, log: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Row-wise softmax (or log-softmax) of ``x / tau``."""
    if out is None:
        out = np.empty_like(x)
    _launch(K.softmax_kernel(log), _threads_for(x.size), x, float(1.0 / tau), out)
    return out

"""CPU backend: host wrappers around the Numba kernels in ``_kernels``.

Inputs arrive validated and normalised by the façade: C-contiguous 2-D arrays in the storage of the
:class:`~fastdistill._spec.Variant` to run (float32, float64, or 16-bit floats as their bits), labels as
int64 or ``None``. Read-only and
memory-mapped inputs reach the kernels as writable-typed aliases (:func:`as_kernel_input`), so every
input uses the same compiled code.
"""
from __future__ import annotations

import os

import numba
import numpy as np

from .. import _cache  # noqa: F401  (before the kernels: their disk cache keyed on the kernel sources)
from .._arrays import same_memory
from .._shard_check import ROUND_MAX, ROUND_MIX, ROUND_SUM
from .._spec import TAILS, Variant
from . import _kernels as K

# Calls from several Python (or C) threads at once need a thread-safe threading layer (workqueue aborts
# the process): prefer OpenMP, then TBB. The caller's NUMBA_THREADING_LAYER(_PRIORITY) setting wins.
if "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

_NO_LABELS = np.zeros(0, dtype=np.int64)
# calls on at most this many logits run in the calling thread alone: waking the thread pool costs ~2 us
# on an idle machine and tens of microseconds on a busy one, more than such a call's work
SMALL = 1 << 15


_NO_GRAD: dict = {}
_ADDRESSES: dict = {}  # worker address by variant


def _no_grad(dtype: np.dtype) -> np.ndarray:
    """A writable one-element stand-in for the gradient of a loss-only call (never written)."""
    g = _NO_GRAD.get(dtype)
    if g is None:
        g = _NO_GRAD[dtype] = np.zeros((1, 1), dtype=dtype)
    return g


class _Alias:
    """An ``__array_interface__`` that describes another array's memory as writable."""

    __slots__ = ("__array_interface__", "base")

    def __init__(self, a: np.ndarray) -> None:
        iface = dict(a.__array_interface__)
        iface["data"] = (iface["data"][0], False)
        self.__array_interface__ = iface
        self.base = a  # keeps the memory alive


def as_kernel_input(a: np.ndarray) -> np.ndarray:
    """``a`` itself, or for a read-only array (``setflags(write=False)``, ``np.load(mmap_mode="r")``) a
    writable-typed alias of the same memory: Numba compiles one machine-code version per argument type,
    and a read-only array is another type (and failed to type where the student doubles as the gradient
    buffer). The kernels never write their inputs; only the gradient, which is checked writable."""
    if a.flags.writeable:
        return a
    return np.asarray(_Alias(a))


def _grad_buffer(s: np.ndarray, want_grad: bool, grad_out: np.ndarray | None) -> np.ndarray:
    """What a kernel writes the gradient into: the caller's buffer, a new one like ``s``, or for a loss-only
    call a ``(1, 1)`` stand-in (never written: the kernels only write it when ``want_grad``)."""
    if not want_grad:
        return _no_grad(s.dtype)
    return grad_out if grad_out is not None else np.empty_like(s)


def _address(variant: Variant, inplace: bool = False) -> int:
    """The address of ``variant``'s worker (compiled or loaded on first use); ``inplace``: its worker for
    a gradient written over the student (:func:`in_place`)."""
    key = (variant, inplace)
    address = _ADDRESSES.get(key)
    if address is None:
        address = _ADDRESSES[key] = K.worker(variant, inplace).address
    return address


def in_place(s: np.ndarray, grad: np.ndarray | None) -> bool:
    """Whether the gradient buffer is the student's own memory (the façade has checked that a buffer
    overlapping the student is exactly its memory). Such a call runs kernels that write the gradient
    through the student's pointer: given two pointers to the same memory, LLVM's run-time overlap check
    sends the vector loops to their scalar fallback (4x slower at 1024x32000 float32)."""
    return grad is not None and same_memory(grad, s)


def _in_place_layout(batch: tuple, s: np.ndarray, grad: np.ndarray, want_grad: bool) -> bool:
    """:func:`in_place` from a batch's layout (the addresses it holds already: reading an array's
    address from Python costs microseconds, a tenth of a small call)."""
    _, _, lds, _, ldg, sp, _, gp = batch[0]
    return want_grad and sp == gp and lds == ldg and grad.dtype.itemsize == s.dtype.itemsize


def _batch(s: np.ndarray, t: np.ndarray, grad: np.ndarray, labels: np.ndarray | None, ignore_index: int,
           params: np.ndarray, scale: float, want_grad: bool) -> tuple:
    """The batch arguments both drivers take, in their order (the logits' layout and addresses, the
    other inputs as the kernels' types)."""
    return (K.batch_layout(as_kernel_input(s), as_kernel_input(t), grad),
            as_kernel_input(labels) if labels is not None else _NO_LABELS, labels is not None, ignore_index, params,
            float(scale), want_grad)


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


def response(
    variant: Variant,
    s: np.ndarray,
    t: np.ndarray,
    labels: np.ndarray | None,
    params: np.ndarray,
    ignore_index: int,
    scale: float,
    want_grad: bool,
    grad_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Row losses (float64, 0 for ignored rows) and, if asked, the gradient of ``scale * sum(rows)``.

    ``params`` is ``Terms.pack()`` of the call's terms. ``s`` and ``t`` may differ in width (truncated
    vocabularies): the first ``min`` of both classes are computed.
    """
    out_loss = np.empty(s.shape[0], dtype=np.float64)
    grad = _grad_buffer(s, want_grad, grad_out)
    batch = _batch(s, t, grad, labels, ignore_index, params, scale, want_grad)
    threads = _threads_for(s.size)
    _launch(
        K.drive,
        threads,
        _address(variant, _in_place_layout(batch, s, grad, want_grad)),
        *batch,
        out_loss,
        threads[0],
        variant.two_pass,
    )
    if want_grad and s.shape[1] > t.shape[1]:
        grad[:, t.shape[1]:] = 0  # student classes beyond a truncated teacher's: the loss does not see them
    return out_loss, (grad if want_grad else None)


def softmax(x: np.ndarray, tau: float, log: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Row-wise softmax (or log-softmax) of ``x / tau``."""
    if out is None:
        out = np.empty_like(x)
    _launch(K.softmax_kernel(log), _threads_for(x.size), as_kernel_input(x), float(1.0 / tau), out)
    return out


def shard_step(variant: Variant, step: int, s: np.ndarray, t: np.ndarray, labels: np.ndarray | None,
               params: np.ndarray, ignore_index: int, scale: float, want_grad: bool, out_loss: np.ndarray,
               grad: np.ndarray | None, stats: np.ndarray, local_max: np.ndarray, classes: int) -> None:
    """One step of a vocabulary shard's computation (:func:`fastdistill.cpu._kernels.drive_shard`)."""
    g = grad if grad is not None else _no_grad(s.dtype)
    batch = _batch(s, t, g, labels, ignore_index, params, scale, want_grad)
    _launch(
        K.drive_shard,
        _threads_for(s.size),
        _address(variant, _in_place_layout(batch, s, g, want_grad)),
        np.int64(step),
        *batch,
        out_loss,
        stats,
        local_max,
        np.int64(classes),
    )


# a shard's steps as ``drive_shard`` numbers them
_SHARD_STEPS = {"stats": K.SHARD_STATS, "div2": K.SHARD_DIV2, "finish": K.SHARD_FINISH}
# the rounds of sums: (round, the statistics [k0, k1) a row exchanges in it); the maxima are [0, N_MAX)
_SHARD_SUMS = {"sum": (ROUND_SUM, K.N_MAX, K.S_DSUM), "mix": (ROUND_MIX, K.S_DSUM, K.N_STATS)}


class ShardRun:
    """One vocabulary shard's steps on the CPU (:class:`fastdistill.sharded.VocabShard`), the calls of the
    CUDA backend's ``ShardRun``: ``s``, ``t`` the shard's logits and ``grad`` its gradient buffer (``None``
    unless ``call.want_grad``) as :func:`response` takes them, ``lab`` its labels (a column of the shard,
    ``_spec.SHARD_LABEL_ELSEWHERE`` or ``SHARD_LABEL_IGNORED``), ``to_caller`` what makes the kernels'
    gradient the caller's. Each row's statistics (``N_STATS`` float64 numbers, ``_kernels``' layout) stay
    here from step to step; the buffers the caller combines are new float64 arrays of a round's slice of
    them (2 maxima, 12 sums, 5 second sums a row), each followed by the rows of its check entries
    (``tail(round, k)``: ``fastdistill._shard_check``). The maxima's buffer is written by the kernel
    itself."""

    kind = "host"  # the caller's buffers are host arrays: it checks each round as it is read back

    def __init__(self, call, s: np.ndarray, t: np.ndarray, lab: np.ndarray | None, params: np.ndarray,  # type: ignore[no-untyped-def]
                 scale: float, classes: int, grad: np.ndarray | None, to_caller, tail) -> None:
        self.call = call
        self.s, self.t, self.lab, self.params, self.grad = s, t, lab, params, grad
        self.scale = float(scale)
        self.classes = int(classes)
        self.to_caller = to_caller
        self.tail = tail
        self.out = np.empty(call.rows, dtype=np.float64)
        self.stats = np.empty((call.rows, K.N_STATS), dtype=np.float64)
        # round 1's buffer: the maxima (the kernel's view of its rows), then the check entries
        self.max_buf = self._buffer(ROUND_MAX, K.N_MAX)
        self.local_max = self.max_buf[: call.rows]
        self.combined_max = self.max_buf

    def _buffer(self, rnd: int, k: int) -> np.ndarray:
        """A round's buffer: ``rows`` rows of ``k`` numbers (filled by the caller), then the check rows."""
        rows = self.call.rows
        tail = self.tail(rnd, k)
        buf = np.empty((rows + tail.shape[0], k), dtype=np.float64)
        buf[rows:] = tail
        return buf

    def step(self, step: str) -> None:
        """Run one step: "stats" (the shard's maxima and its sums relative to them), "div2" (the
        mixtures' and TVD's second sums), "finish" (the row losses and the gradient)."""
        c = self.call
        shard_step(c.variant, _SHARD_STEPS[step], self.s, self.t, self.lab, self.params, c.ignore_index, self.scale,
                   c.want_grad, self.out, self.grad, self.stats, self.local_max, self.classes)

    def exchanged(self, name: str) -> np.ndarray:
        """The buffer of round ``name`` ("max", "sum", "mix") the caller combines in place."""
        if name == "max":
            return self.max_buf
        rnd, k0, k1 = _SHARD_SUMS[name]
        buf = self._buffer(rnd, k1 - k0)
        buf[: self.call.rows] = self.stats[:, k0:k1]
        return buf

    def take_back(self, name: str, combined: np.ndarray) -> None:
        """Round ``name``'s combined buffer: the maxima kept for :meth:`rescale`, the sums stored."""
        if name == "max":
            self.combined_max = combined
            return
        _, k0, k1 = _SHARD_SUMS[name]
        self.stats[:, k0:k1] = combined[: self.call.rows]

    def rescale(self) -> None:
        """The sums moved from this shard's maxima to the combined ones (after the max exchange)."""
        K.rescale_shard_sums(self.stats, self.combined_max[: self.call.rows], self.call.terms.tau)

    def result(self, reduce) -> tuple:  # type: ignore[no-untyped-def]
        """(``reduce`` of the row losses, the gradient as the caller gets it or None)."""
        return reduce(self.out), (self.to_caller(self.grad) if self.call.want_grad else None)


def top_k(x: np.ndarray, k: int, tau: float, top_p: float = 2.0, min_k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``fastdistill.top_k`` of host logits ``x`` (C-contiguous ``(rows, classes)``, 16-bit floats as
    their bits): (ids int64, log-probabilities float64), ``(rows, k)``; ``top_p`` at most 1: the nucleus
    cut (at least ``min_k`` entries)."""
    from . import _sparse as S

    rows = x.shape[0]
    out_idx = np.empty((rows, k), np.int64)
    out_val = np.empty((rows, k), np.float64)
    S.top_k_kernel(as_kernel_input(x), np.int64(k), float(1.0 / tau), out_idx, out_val, float(top_p), np.int64(min_k))
    return out_idx, out_val


def sparse_response(call, s: np.ndarray, idx: np.ndarray, vals: np.ndarray, labels: np.ndarray | None,  # type: ignore[no-untyped-def]
                    params: np.ndarray, tail: str, scale: float,
                    grad_out: np.ndarray | None = None, t_gen: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Row losses and (``call.want_grad``) the gradient for a sparse teacher (``cpu._sparse``): ``idx``
    int64 and ``vals`` float64 ``(rows, k)``, checked; ``t_gen`` the temperature the values were
    produced at."""
    from . import _sparse as S

    v = call.variant
    out_loss = np.empty(s.shape[0], dtype=np.float64)
    grad = _grad_buffer(s, call.want_grad, grad_out)
    _launch(S.sparse_response, _threads_for(s.size), as_kernel_input(s), idx, vals,
            as_kernel_input(labels) if labels is not None else _NO_LABELS, labels is not None,
            np.int64(call.ignore_index), params, np.int64(v.div), np.int64(v.ce), np.int64(TAILS.index(tail)),
            call.want_grad, float(scale), out_loss, grad, np.int64(S.STREAM_BYTES), float(t_gen),
            *((True,) if call.want_grad and in_place(s, grad_out) else ()))  # (in place: compiled on first use)
    return out_loss, (grad if call.want_grad else None)

"""Backend choice, the resolved call, and the round trip of the caller's arrays.

Two operations cover the whole library: :func:`response` (every loss, with its gradient) and
:func:`softmax`; besides them :func:`top_k` (a sparse teacher from logits) and :func:`shard_run` (one
vocabulary shard's steps, for :mod:`fastdistill.sharded`). This is the one place a backend is chosen
(``docs/backends.md`` lists what a backend provides). Both validate through
:mod:`fastdistill._validate` in the contract's order, resolve the call once -- its terms, reduction
and kernel :class:`~fastdistill._spec.Variant` -- and hand the same :class:`ResponseCall` to the CPU
kernels (imported on first use, so ``import fastdistill`` stays light) or to the CUDA backend (imported
only when a GPU path is taken). Backends never import this module.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Union

import numpy as np

from . import _arrays as A
from . import _storage
from . import _validate as V
from ._spec import FLOAT64, HALF, TAILS, ResponseCall, Terms, Variant, resolve, teacher_storage
from . import sparse
from .errors import BackendUnavailableError, InvalidParameterError
from .sparse import SparseTeacher

TermsLike = Union[Terms, Callable[[], Terms]]


_CPU: list = []


def _cpu():  # type: ignore[no-untyped-def]
    """The CPU backend module (imported on the first call that needs it)."""
    if not _CPU:
        from . import cpu

        _CPU.append(cpu)
    return _CPU[0]


def cuda_backend():  # type: ignore[no-untyped-def]
    """The CUDA backend module, or :class:`BackendUnavailableError` saying why it cannot run."""
    try:
        from . import cuda
    except ImportError as exc:  # numba-cuda missing
        raise BackendUnavailableError(
            f"backend='cuda' needs numba-cuda (pip install 'fastdistill[cuda]'): {exc}"
        ) from exc
    ok, reason = cuda.status()
    if not ok:
        raise BackendUnavailableError(f"backend='cuda' is not usable here: {reason}")
    return cuda


def use_cuda(backend: str, *arrays: Any) -> bool:
    """Whether a call runs on the GPU: asked for, or ``auto`` with an input on a CUDA device."""
    if backend == "cuda":
        return True
    if backend == "cpu":
        if any(A.is_device(a) for a in arrays if a is not None):
            raise V.InvalidParameterError(
                "backend='cpu' got an array that lives on a CUDA device; move it to the host first "
                "or use backend='auto'/'cuda'"
            )
        return False
    return any(A.is_device(a) for a in arrays if a is not None)


def response(
    student: Any,
    teacher: Any,
    labels: Any,
    terms: TermsLike,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: Any = None,
    want_grad: bool = False,
    grad_out: Any = None,
    backend: str = "auto",
    needs_labels: bool = False,
    vocab_mismatch: str = "error",
) -> tuple[Any, Any]:
    """Validate, resolve and run one response loss. Returns ``(loss, grad or None)``.

    ``terms`` may be a callable, evaluated after the input checks (so a bad parameter is reported after
    a bad input, in the contract's order). ``needs_labels``: the loss has a hard-label term.
    ``vocab_mismatch="truncate"``: student and teacher widths may differ; the loss is computed on the
    first ``min`` of both (the student's other columns get a zero gradient).
    """
    if isinstance(teacher, SparseTeacher):
        return _sparse_response(student, teacher, labels, terms, ignore_index=ignore_index, reduction=reduction,
                                num_items=num_items, want_grad=want_grad, grad_out=grad_out, backend=backend,
                                needs_labels=needs_labels)
    s_shape, s_dtype = A.shape_dtype(student)
    t_shape, t_dtype = A.shape_dtype(teacher)
    V.check_pair(s_shape, s_dtype, t_shape, t_dtype, truncate=vocab_mismatch == "truncate")
    n = min(s_shape[-1], t_shape[-1])  # the classes computed
    if labels is not None:
        l_shape, l_dtype = A.shape_dtype(labels)
        V.check_labels_meta(l_shape, l_dtype, s_shape)
    on_gpu = use_cuda(V.backend(backend), student, teacher, labels, grad_out)
    gpu = cuda_backend() if on_gpu else None
    host_lab = None
    n_counted = 0
    if labels is not None and _labels_on_host(on_gpu, labels):
        host_lab, n_counted = V.host_labels(A.on_host(labels), n, ignore_index)  # range checked here
    storages = _storages(s_dtype, t_dtype, grad_out if want_grad else None)
    try:
        call = _resolve(terms, s_shape, storages, n, labels is not None, ignore_index, reduction, num_items,
                        want_grad, needs_labels)
    except V.InvalidParameterError:
        if gpu is not None and labels is not None and host_lab is None:
            gpu.check_label_range(labels, n, ignore_index)  # a bad label is reported first
        raise
    if gpu is not None:
        if s_shape != t_shape:
            raise V.InvalidParameterError(
                f"vocab_mismatch='truncate' on the CUDA backend needs student and teacher of one width (got "
                f"{s_shape[-1]} and {t_shape[-1]} classes): pass x[..., :{n}] made contiguous "
                "(fastdistill.torch does this for CUDA tensors)"
            )
        return gpu.response(call, student, teacher, labels if host_lab is None else host_lab, grad_out)
    return _cpu_response(call, student, teacher, host_lab, n_counted, grad_out)


def _sparse_response(student: Any, teacher: SparseTeacher, labels: Any, terms: TermsLike, *, ignore_index: int,
                     reduction: str, num_items: Any, want_grad: bool, grad_out: Any, backend: str,
                     needs_labels: bool) -> tuple[Any, Any]:
    """:func:`response` with a sparse (top-k) teacher: the checks in the contract's order (the teacher's
    leading dims, ids and repeats after the student's), then the CPU kernel of ``cpu._sparse``."""
    s_shape, s_dtype = A.shape_dtype(student)
    V.check_logits(s_shape, s_dtype, "student")
    n = int(s_shape[-1])
    if labels is not None:
        l_shape, l_dtype = A.shape_dtype(labels)
        V.check_labels_meta(l_shape, l_dtype, s_shape)
    on_gpu = use_cuda(V.backend(backend), student, labels, grad_out, teacher.indices, teacher.values)
    gpu = cuda_backend() if on_gpu else None
    idx, vals = sparse.host_arrays(teacher, s_shape, n)  # (rows x k, checked on the host)
    host_lab, n_counted = None, 0
    if labels is not None and _labels_on_host(on_gpu, labels):
        host_lab, n_counted = V.host_labels(A.on_host(labels), n, ignore_index)
    storages = _storages(s_dtype, s_dtype, grad_out if want_grad else None)  # (no teacher array: the student's)
    call = _resolve(terms, s_shape, storages, n, labels is not None, ignore_index, reduction, num_items, want_grad,
                    needs_labels)
    s_store, _, g_store = storages
    sparse.check_terms(teacher, call.terms)
    if gpu is not None:
        return gpu.sparse_response(call, student, idx, vals, labels if host_lab is None else host_lab,
                                   TAILS.index(teacher.tail), grad_out, teacher.temperature)
    s_host = _storage.host_logits(student, s_store, "student")
    s2 = V.rows_2d(s_host)
    g2 = None
    if want_grad and grad_out is not None:
        g2 = V.grad_out(grad_out, call.shape, g_store, (host_lab, idx), s_host).reshape(s2.shape)
    scale = _scale(call, host_lab, n_counted)
    rows, grad = _cpu().sparse_response(call, s2, idx, vals, host_lab, packed(call.terms), teacher.tail, scale, g2,
                                        teacher.temperature)
    if want_grad:
        grad = caller_grad(call, grad, student, grad_out)
    return reduce_rows(rows, call.reduction, scale, call.shape, s_store), grad


def _labels_on_host(on_gpu: bool, labels: Any) -> bool:
    """Whether a call's labels are checked (and read) on the host: host labels, and device labels of
    an unsigned 64-bit type (the device kernels read labels as int64, which would wrap ids above its
    range into ``-1`` or ``ignore_index``: their host copy is checked instead, ``rows`` numbers)."""
    if not (on_gpu and A.is_device(labels)):
        return True
    dt = A.shape_dtype(labels)[1]
    return getattr(dt, "kind", "") == "u" and getattr(dt, "itemsize", 0) >= 8


def _storages(s_dtype: Any, t_dtype: Any, grad_out: Any) -> tuple[str, str, str]:
    """(student, teacher, gradient) storage of a call, from the arrays' metadata: the teacher's as the
    kernels read it (:func:`fastdistill._spec.teacher_storage`), the gradient's from ``grad_out``'s
    dtype when one is given (checked: the student's, or float32 for a half-precision student)."""
    s = _storage.check(s_dtype, "student")
    t = teacher_storage(s, _storage.check(t_dtype, "teacher"))
    g = s if grad_out is None else V.grad_storage(A.shape_dtype(grad_out)[1], s)
    return s, t, g


def _resolve(terms: TermsLike, s_shape: tuple[int, ...], storages: tuple[str, str, str], n: int, has_labels: bool,
             ignore_index: int, reduction: str, num_items: Any, want_grad: bool, needs_labels: bool) -> ResponseCall:
    """The call's parameters, checked after its inputs (contract order), and its kernel variant
    (``storages``: :func:`_storages`)."""
    resolved = terms() if callable(terms) else terms
    red = V.reduction(reduction)
    n_items = V.num_items(num_items, red)
    if needs_labels and not has_labels:
        raise V.InvalidParameterError(
            f"labels are required when hard_label_weight is non-zero (it is {resolved.hard_w})"
        )
    rows = 1
    for d in s_shape[:-1]:
        rows *= int(d)
    return ResponseCall(_variant(resolved, has_labels, storages), resolved, red, n_items, int(ignore_index),
                        bool(want_grad), has_labels, tuple(s_shape), rows, int(n))


def host_batch(call: ResponseCall, student: Any, teacher: Any, lab: np.ndarray | None, n_counted: int,
               grad_out: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """What a CPU call runs on: ``(s, t, g, scale)``, student and teacher as C-contiguous ``(rows,
    classes)`` arrays as the kernels read them (16-bit floats as their bits; the teacher converted only
    where its storage has no kernels beside the student's, see :func:`fastdistill._spec.teacher_storage`),
    the caller's gradient buffer checked and seen as ``(rows, classes)`` (None when not given or not
    wanted), and the reduction's factor (``lab``: the checked host labels, counting ``n_counted`` rows)."""
    s_store, t_store, g_store = call.variant.storage()
    s = _storage.host_logits(student, s_store, "student")
    t_own = _storage.check(A.shape_dtype(teacher)[1], "teacher")
    t_caller = t = _storage.host_logits(teacher, t_own, "teacher")
    if t_own != t_store:
        t = _storage.to_float(t, t_own, t_store)
    g_out = (V.grad_out(grad_out, call.shape, g_store, (t_caller, t, lab), s)
             if (call.want_grad and grad_out is not None) else None)
    s2 = V.rows_2d(s)
    g2 = g_out.reshape(s2.shape) if g_out is not None else None
    return s2, V.rows_2d(t), g2, _scale(call, lab, n_counted)


def _scale(call: ResponseCall, lab: np.ndarray | None, n_counted: int) -> float:
    """The reduction's factor of the row losses and the gradient (0 when "mean" counts no row)."""
    div = V.divisor(n_counted if lab is not None else call.rows, call.reduction, call.num_items)
    return 1.0 / div if div > 0 else 0.0


def _cpu_response(call: ResponseCall, student: Any, teacher: Any, lab: np.ndarray | None, n_counted: int,
                  grad_out: Any) -> tuple[Any, Any]:
    s2, t2, g2, scale = host_batch(call, student, teacher, lab, n_counted, grad_out)
    rows, grad = _cpu().response(call.variant, s2, t2, lab, packed(call.terms), call.ignore_index, scale,
                                 call.want_grad, g2)
    if call.want_grad:
        grad = caller_grad(call, grad, student, grad_out)
    return reduce_rows(rows, call.reduction, scale, call.shape, call.variant.dtype), grad


def caller_grad(call: ResponseCall, grad: np.ndarray, student: Any, grad_out: Any) -> Any:
    """The gradient as the caller gets it: their own buffer (array or tensor) when they gave one, else
    the kernels' ``grad`` in the student's shape and dtype."""
    if grad_out is not None:
        return grad_out
    grad = grad.reshape(call.shape)
    return _storage.like_caller(grad, student) if call.variant.dtype in HALF else grad


@functools.lru_cache(maxsize=256)
def _variant(terms: Terms, has_labels: bool, storages: tuple[str, str, str]) -> Variant:
    """``resolve(terms, has_labels, *storages)``, kept for the losses and argument kinds a process uses."""
    return resolve(terms, has_labels, *storages)


@functools.lru_cache(maxsize=256)
def packed(terms: Terms) -> np.ndarray:
    """``terms.pack()``, kept for the losses a process uses (read only by the kernels)."""
    return terms.pack()


def reduce_rows(rows: np.ndarray, red: str, scale: float, s_shape: tuple[int, ...], storage: str) -> Any:
    """The reduced loss: a Python float, or the per-row array (the student's leading shape, in the
    student's dtype; float32 for half-precision students)."""
    if red == "none":
        return rows.astype(np.float32 if storage in HALF else storage, copy=False).reshape(s_shape[:-1])
    return float(rows.sum() * scale) if red == "mean" else float(rows.sum())


def softmax(x: Any, temperature: Any, *, log: bool, backend: str = "auto") -> Any:
    """Row-wise (log-)softmax of ``x / temperature``; the result has ``x``'s shape and dtype."""
    shape, dtype = A.shape_dtype(x)
    V.check_logits(shape, dtype, "x")
    on_gpu = use_cuda(V.backend(backend), x)
    tau = V.temperature(temperature)
    if on_gpu:
        return cuda_backend().softmax(x, tau, log=log)
    storage = _storage.check(dtype, "x")
    a = V.rows_2d(_storage.host_logits(x, storage, "x"))
    out = _cpu().softmax(a, tau, log).reshape(shape)
    return _storage.like_caller(out, x) if storage in HALF else out


def top_k(logits: Any, k: int, *, temperature: float = 1.0, top_p: float | None = None, min_k: int = 1,
          backend: str = "auto") -> SparseTeacher:
    """:func:`fastdistill.top_k` (documented there): the arguments checked, then the backend's ``top_k``."""
    shape, dtype = A.shape_dtype(logits)
    V.check_logits(shape, dtype, "logits")
    kk = V.integer(k, "k")
    n = int(shape[-1])
    if not 1 <= kk <= n:
        raise InvalidParameterError(f"k must be in [1, {n}] (the logits' classes), got {kk}")
    tau = V.temperature(temperature)
    tp = 2.0  # (no cut)
    if top_p is not None:
        tp = V.finite(top_p, "top_p")
        if not 0.0 < tp <= 1.0:
            raise InvalidParameterError(f"top_p must be in (0, 1], got {tp}")
    mk = V.integer(min_k, "min_k")
    if not 1 <= mk <= kk:
        raise InvalidParameterError(f"min_k must be in [1, k={kk}], got {mk}")
    storage = _storage.check(dtype, "logits")
    if use_cuda(V.backend(backend), logits):
        idx, vals = cuda_backend().top_k(logits, kk, tau, storage, tp, mk)
        return SparseTeacher(idx, vals, kind="logprobs", temperature=tau)
    x = V.rows_2d(_storage.host_logits(logits, storage, "logits"))
    out_idx, out_val = _cpu().top_k(x, kk, tau, tp, mk)
    lead = tuple(shape[:-1])
    vdt = np.float64 if storage == FLOAT64 else np.float32
    return SparseTeacher(out_idx.astype(np.int32).reshape(lead + (kk,)), out_val.astype(vdt).reshape(lead + (kk,)),
                         kind="logprobs", temperature=tau)


def shard_run(call: ResponseCall, student: Any, teacher: Any, labels: Any, lab: np.ndarray | None,
              glob: np.ndarray | None, n_counted: int, classes: int, grad_out: Any, tail: Callable,
              backend: str) -> tuple[Any, float]:
    """``(run, scale)``: the backend's ``ShardRun`` of one vocabulary shard (:mod:`fastdistill.sharded`)
    and the reduction's factor. ``call`` is resolved for the shard's columns, ``labels`` are the
    caller's (they take part in the backend's choice), ``glob`` their checked host copy (global ids,
    ``n_counted`` rows counted), ``lab`` the shard's labels as the kernels take them (``_spec``'s
    ``SHARD_LABEL_*``), ``tail(round, k)`` a round's check rows."""
    if use_cuda(V.backend(backend), student, teacher, labels, grad_out):
        scale = _scale(call, glob, n_counted)
        return cuda_backend().ShardRun(call, student, teacher, lab, scale, classes, grad_out, tail), scale
    s, t, g, scale = host_batch(call, student, teacher, glob, n_counted, grad_out)
    grad = (g if g is not None else np.empty_like(s)) if call.want_grad else None

    def to_caller(grad: np.ndarray) -> Any:
        return caller_grad(call, grad, student, grad_out)

    return _cpu().ShardRun(call, s, t, lab, packed(call.terms), scale, classes, grad, to_caller, tail), scale

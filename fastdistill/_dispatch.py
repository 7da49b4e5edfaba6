"""Backend choice, the resolved call, and the round trip of the caller's arrays.

Two operations cover the whole library: :func:`response` (every loss, with its gradient) and
:func:`softmax`. Both validate through :mod:`fastdistill._validate` in the contract's order, resolve the
call once -- its terms, reduction and kernel :class:`~fastdistill._spec.Variant` -- and hand the same
:class:`ResponseCall` to the CPU kernels (imported on first use, so ``import fastdistill`` stays light) or
to the CUDA backend (imported only when a GPU path is taken). Backends never import this module.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import numpy as np

from . import _validate as V
from ._spec import ResponseCall, Terms, resolve
from .errors import BackendUnavailableError

TermsLike = Union[Terms, Callable[[], Terms]]
# (``dtype.name`` is a Python property of NumPy's, a few microseconds per call)
_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}


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
        if any(V.is_device(a) for a in arrays if a is not None):
            raise V.InvalidParameterError(
                "backend='cpu' got an array that lives on a CUDA device; move it to the host first "
                "or use backend='auto'/'cuda'"
            )
        return False
    return any(V.is_device(a) for a in arrays if a is not None)


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
    s_shape, s_dtype = V.shape_dtype(student)
    t_shape, t_dtype = V.shape_dtype(teacher)
    V.check_pair(s_shape, s_dtype, t_shape, t_dtype, truncate=vocab_mismatch == "truncate")
    n = min(s_shape[-1], t_shape[-1])  # the classes computed
    if labels is not None:
        l_shape, l_dtype = V.shape_dtype(labels)
        V.check_labels_meta(l_shape, l_dtype, s_shape)
    on_gpu = use_cuda(V.backend(backend), student, teacher, labels, grad_out)
    gpu = cuda_backend() if on_gpu else None
    host_lab = None
    n_counted = 0
    if labels is not None and not (on_gpu and V.is_device(labels)):
        host_lab, n_counted = V.host_labels(labels, n, ignore_index)  # range checked here
    try:
        call = _resolve(terms, s_shape, s_dtype, n, labels is not None, ignore_index, reduction, num_items,
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


def _resolve(terms: TermsLike, s_shape: tuple[int, ...], s_dtype: np.dtype, n: int, has_labels: bool,
             ignore_index: int, reduction: str, num_items: Any, want_grad: bool, needs_labels: bool) -> ResponseCall:
    """The call's parameters, checked after its inputs (contract order), and its kernel variant."""
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
    variant = resolve(resolved, has_labels, _DTYPE_NAMES[s_dtype])
    return ResponseCall(variant, resolved, red, n_items, int(ignore_index), bool(want_grad), has_labels,
                        tuple(s_shape), rows, int(n))


def host_batch(call: ResponseCall, student: Any, teacher: Any, lab: np.ndarray | None, n_counted: int,
               grad_out: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """What a CPU call runs on: ``(s, t, g, scale)``, student and teacher as C-contiguous ``(rows,
    classes)`` arrays (the teacher in the student's precision), the caller's gradient buffer checked and
    seen as ``(rows, classes)`` (None when not given or not wanted), and the reduction's factor (``lab``:
    the checked host labels, counting ``n_counted`` rows)."""
    s = V.host_array(student, "student")
    t = V.host_array(teacher, "teacher")
    if t.dtype != s.dtype:
        t = t.astype(s.dtype)  # computed in the student's precision
    g_out = (V.grad_out(grad_out, call.shape, s.dtype, (t, lab))
             if (call.want_grad and grad_out is not None) else None)
    s2 = V.rows_2d(s)
    div = V.divisor(n_counted if lab is not None else call.rows, call.reduction, call.num_items)
    g2 = g_out.reshape(s2.shape) if g_out is not None else None
    return s2, V.rows_2d(t), g2, (1.0 / div if div > 0 else 0.0)


def _cpu_response(call: ResponseCall, student: Any, teacher: Any, lab: np.ndarray | None, n_counted: int,
                  grad_out: Any) -> tuple[Any, Any]:
    s2, t2, g2, scale = host_batch(call, student, teacher, lab, n_counted, grad_out)
    rows, grad = _cpu().response(call.variant, s2, t2, lab, packed(call.terms), call.ignore_index, scale,
                                 call.want_grad, g2)
    if call.want_grad:  # the caller's own buffer (array or tensor) when one was given
        grad = grad_out if g2 is not None else grad.reshape(call.shape)
    return reduce_rows(rows, call.reduction, scale, call.shape, s2.dtype), grad


_PACKED: dict = {}


def packed(terms: Terms) -> np.ndarray:
    """``terms.pack()``, kept for the losses a process uses (read only by the kernels)."""
    p = _PACKED.get(terms)
    if p is None:
        if len(_PACKED) > 256:
            _PACKED.clear()
        p = _PACKED[terms] = terms.pack()
    return p


def reduce_rows(rows: np.ndarray, red: str, scale: float, s_shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """The reduced loss: a Python float, or the per-row array (the student's leading shape)."""
    if red == "none":
        return rows.astype(dtype, copy=False).reshape(s_shape[:-1])
    return float(rows.sum() * scale) if red == "mean" else float(rows.sum())


def softmax(x: Any, temperature: Any, *, log: bool, backend: str = "auto") -> Any:
    """Row-wise (log-)softmax of ``x / temperature``; the result has ``x``'s shape and dtype."""
    shape, dtype = V.shape_dtype(x)
    V.check_logits(shape, dtype, "x")
    on_gpu = use_cuda(V.backend(backend), x)
    tau = V.temperature(temperature)
    if on_gpu:
        return cuda_backend().softmax(x, tau, log=log)
    a = V.rows_2d(V.host_array(x, "x"))
    return _cpu().softmax(a, tau, log).reshape(shape)

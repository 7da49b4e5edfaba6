"""CUDA backend: the resolved calls of the façade, run by the ``@cuda.jit`` kernels in ``_kernels``.

Private package, reached through ``backend="cuda"`` (or ``"auto"`` with device inputs). Importing it is
cheap: ``numba.cuda`` is imported by :func:`status`, the kernels on the first call that needs them.
The façade has checked the inputs' shapes and dtypes and resolved the call (its terms, reduction and
:class:`~fastdistill._spec.Variant`); labels that live on the device are range-checked here, on the
device. Arrays and streams are :mod:`._device`'s job, launch geometry :mod:`._launch`'s. The only
host synchronisation is the read of a four-number buffer ``[counted rows, bad labels, loss, blocks
done]`` when a Python float must be returned or labels checked.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import _arrays as A
from .. import _storage
from .. import _validate as V
from .._scalar import reads_rest_bin
from .._spec import FLOAT32, FLOAT64, ResponseCall
from . import _device as D
from . import _launch as L
from ._device import launch_path, status

__all__ = ["status", "response", "softmax", "check_label_range", "launch_path", "ShardRun"]


def _K():  # type: ignore[no-untyped-def]
    from . import _kernels

    return _kernels


def _S():  # type: ignore[no-untyped-def]
    from . import _sparse

    return _sparse


def _info(kind: str, like: Any, stream: Any):  # type: ignore[no-untyped-def]
    """The kernel view of a zeroed float64 ``[counted rows, bad labels, loss, blocks done]`` buffer."""
    return D.alloc(kind, like, (4,), np.float64, stream, zeros=True)[1]


def _raise_bad_labels(lab: Any, n: int, ignore_index: int, stream: Any) -> None:
    err = V.label_range_error(lab.copy_to_host(stream=stream).astype(np.int64), n, ignore_index)
    if err is not None:
        raise err


def _count_labels(lab: Any, n: int, ignore_index: int, info: Any, stream: Any) -> None:
    K = _K()
    L.launch(K.label_kernel, 1, K.RED_BLOCK, stream, (lab, n, int(ignore_index), info))


def check_label_range(labels: Any, n: int, ignore_index: int) -> None:
    """:class:`LabelOutOfRangeError` for a device label outside ``[0, n)`` that is not ``ignore_index``."""
    kind = D.kind_of(labels)
    stream = D.stream_for(kind, labels)
    lab = D.view(labels, kind, stream, "labels", (int(np.prod(A.shape_dtype(labels)[0], dtype=np.int64)),),
                 np.int64)
    info = _info(kind, labels, stream)
    _count_labels(lab, n, ignore_index, info, stream)
    if D.read_info(info, stream)[1] > 0:
        _raise_bad_labels(lab, n, ignore_index, stream)


def _grad_buffer(call: ResponseCall, student: Any, teacher: Any, labels: Any, grad_out: Any, kind: str, t: Any,
                 lab: Any, stream: Any, s: Any) -> tuple[Any, Any, Any]:
    """(what the caller gets back, the kernel's view of it, the host array to copy it into (as the
    kernel's element type) or None). ``s``: the kernels' view of the student, which the gradient may be
    exactly (an in-place update) but not overlap otherwise."""
    rows, n = call.rows, call.n
    g_store = call.variant.storage()[2]
    g_dtype_k = D.DEVICE_DTYPES[g_store]
    if grad_out is None:
        native, g = D.alloc_logits(kind, student, (rows, n), g_store, stream)
        return native, g, None
    g_kind = D.kind_of(grad_out)
    if g_kind == "host":
        host = V.grad_out(grad_out, call.shape, g_store,
                          (A.host_array(teacher, "teacher") if D.kind_of(teacher) == "host" else None,),
                          A.host_array(student, "student") if kind == "host" else None)
        g = D.numba_cuda().device_array((rows, n), dtype=g_dtype_k, stream=stream)
        return grad_out, g, host.view(g_dtype_k)
    g_shape, g_dtype = A.shape_dtype(grad_out)
    if tuple(g_shape) != tuple(call.shape):
        raise V.DimensionMismatchError(
            expected=rows * n, got=int(np.prod(g_shape, dtype=np.int64)),
            message=f"grad_out shape {tuple(g_shape)} differs from student shape {tuple(call.shape)}",
        )
    V.grad_storage(g_dtype, call.variant.dtype)  # (the variant was resolved for this storage)
    if g_kind == "torch" and D.fast() and grad_out.is_contiguous() and D.torch_dtype(grad_out) is not None:
        g = D.DevArg(grad_out, grad_out.data_ptr(), (rows, n), D.torch_dtype(grad_out))
    else:
        gv = grad_out if getattr(grad_out, "__cuda_ndarray__", False) else D.numba_cuda().as_cuda_array(
            D._bits(grad_out.detach()) if A.is_torch(grad_out) else grad_out, sync=False)
        if not gv.is_c_contiguous():
            raise V.InvalidParameterError("grad_out must be a writable C-contiguous array")
        g = gv.reshape(rows, n)
    t_kind = D.kind_of(teacher)
    if t_kind != "host" and _storage.check(A.shape_dtype(teacher)[1], "teacher") != call.variant.storage()[1]:
        # the kernels read a converted copy: the caller's own teacher is checked as well
        t = (t, D.view(D._bits(teacher.detach()) if t_kind == "torch" else teacher, t_kind, stream, "teacher", (rows, n)))
    else:
        t = (t,)
    if any(D.overlaps(g, x) for x in t) or (labels is not None and D.overlaps(g, lab)):
        raise V.InvalidParameterError("grad_out must not share memory with the teacher logits or labels")
    if D.overlaps(g, s) and not D.same_span(g, s):
        raise V.InvalidParameterError(
            "grad_out overlaps the student without being its memory: pass the student itself for an in-place "
            "update, or a separate buffer"
        )
    return grad_out, g, None


def response(call: ResponseCall, student: Any, teacher: Any, labels: Any, grad_out: Any) -> tuple[Any, Any]:
    """One resolved response-loss call on the GPU: ``(loss, grad or None)`` in the caller's array kind.

    ``labels`` is a checked host int64 vector or a device array (range-checked here).
    """
    K = _K()
    v = call.variant
    rows, n = call.rows, call.n
    s_store, t_store, _ = v.storage()
    kind = D.kind_of(student)
    stream = D.stream_for(kind, student)
    dev = D.device_id(kind, student)
    s = D.view_logits(student, kind, stream, "student", (rows, n), s_store)
    # the teacher as the kernels read it (converted where its storage has no kernels beside the student's)
    t = D.view_logits(teacher, D.kind_of(teacher), stream, "teacher", (rows, n), t_store)
    has_labels = labels is not None
    fused = L.fused(rows, n)
    info = None
    lab = D.dummy(np.int64, dev)
    if has_labels:
        lab = D.view(labels, D.kind_of(labels), stream, "labels", (rows,), np.int64)
        info = _info(kind, student, stream)
        if not fused:
            _count_labels(lab, n, call.ignore_index, info, stream)
    g_native, g, g_host = (None, s, None)  # s: never written unless want_grad
    if call.want_grad:
        g_native, g, g_host = _grad_buffer(call, student, teacher, labels, grad_out, kind, t, lab, stream, s)
    # the row losses, in float64 (one kernel signature for every reduction)
    rows_native, row_buf = D.alloc(kind, student, (rows,), np.float64, stream)
    if info is None and call.reduction != "none":
        info = _info(kind, student, stream)
    red_mean = call.reduction == "mean"
    nit = float(call.num_items) if call.num_items is not None else 0.0
    info_arg = info if info is not None else D.dummy(np.float64, dev)
    kernel = K.response_kernel(v.div, v.ce, v.lin, v.math == FLOAT32, fused)
    grid, block, G = L.geometry(rows, n)
    params = D.device_params(call.terms, stream, dev)
    L.launch(kernel, grid, block, stream,
             (s, t, lab, has_labels, call.ignore_index, params, info_arg, red_mean, nit, call.want_grad,
              row_buf, g, G, call.reduction != "none"))
    if call.reduction != "none" and not fused:
        L.launch(K.sum_kernel, 1, K.RED_BLOCK, stream, (row_buf, has_labels, red_mean, nit, info))
    loss: Any = None
    if info is not None:
        h = D.read_info(info, stream)
        if has_labels and h[1] > 0:
            _raise_bad_labels(lab, n, call.ignore_index, stream)
        if call.reduction != "none":
            loss = float(h[2])
    return _results(call, kind, stream, student, grad_out, loss, rows_native, (g_native, g, g_host))


def _results(call: ResponseCall, kind: str, stream: Any, student: Any, grad_out: Any, loss: Any, rows_native: Any,
             grads: tuple[Any, Any, Any]) -> tuple[Any, Any]:
    """``(loss, grad or None)`` as the caller gets them: the row losses for ``reduction="none"`` (in the
    student's precision, float32 for 16-bit students, as on the CPU), else ``loss``; the gradient in the
    caller's own buffer (copied back to a host one) or a new array of the caller's kind."""
    g_native, g, g_host = grads
    s_store, _, g_store = call.variant.storage()
    if call.reduction == "none":
        rows_dtype = np.float64 if s_store == FLOAT64 else np.float32
        loss = D.result(D.as_dtype(rows_native, kind, rows_dtype, stream), kind, tuple(call.shape[:-1]), stream)
    grad = None
    if call.want_grad:
        if g_host is not None:
            g.copy_to_host(g_host.reshape(call.rows, call.n), stream=stream)
            D.synchronize(stream)
            grad = g_native  # the caller's own buffer (NumPy array or CPU tensor)
        elif grad_out is not None:
            grad = grad_out
        elif kind == "host":
            grad = D.host_result(g_native, tuple(call.shape), g_store, student, stream)
        else:
            grad = D.result(g_native, kind, tuple(call.shape), stream)
    if kind == "host":
        D.synchronize(stream)
    return loss, grad


def sparse_response(call: ResponseCall, student: Any, idx: np.ndarray, vals: np.ndarray, labels: Any, tail: int,
                    grad_out: Any, t_gen: float = 1.0) -> tuple[Any, Any]:
    """A resolved call with a sparse teacher on the GPU (``idx`` int64, ``vals`` float64 ``(rows, k)``
    host arrays, checked: copied over, ``rows x k``; produced at temperature ``t_gen``): ``(loss, grad or
    None)`` as :func:`response`."""
    K = _K()
    S = _S()
    v = call.variant
    rows, n = call.rows, call.n
    s_store = v.storage()[0]
    kind = D.kind_of(student)
    stream = D.stream_for(kind, student)
    dev = D.device_id(kind, student)
    s = D.view_logits(student, kind, stream, "student", (rows, n), s_store)
    cuda = D.numba_cuda()
    idx_d = cuda.to_device(idx, stream=stream)
    vals_d = cuda.to_device(vals, stream=stream)
    has_labels = labels is not None
    lab = D.dummy(np.int64, dev)
    info = _info(kind, student, stream)
    if has_labels:
        lab = D.view(labels, D.kind_of(labels), stream, "labels", (rows,), np.int64)
        _count_labels(lab, n, call.ignore_index, info, stream)
    g_native, g, g_host = (None, s, None)
    if call.want_grad:
        g_native, g, g_host = _grad_buffer(call, student, idx, labels, grad_out, kind, idx_d, lab, stream, s)
    rows_native, row_buf = D.alloc(kind, student, (rows,), np.float64, stream)
    red_mean = call.reduction == "mean"
    nit = float(call.num_items) if call.num_items is not None else 0.0
    grid, block, G = L.geometry(rows, n)
    G = max(G, block // S.MAX_GROUPS)  # (at most MAX_GROUPS rows a block: their coefficients' shared memory)
    params = D.device_params(call.terms, stream, dev)
    sup = cuda.device_array((rows, idx.shape[1] + 1), dtype=np.float64, stream=stream) if call.want_grad else vals_d
    # each row's used ids, sorted, where the divergence reads the student's mass outside the support
    srt_shape = (rows, idx.shape[1] + 1) if reads_rest_bin(tail, v.div) else (1, 1)
    srt = cuda.device_array(srt_shape, dtype=np.int64, stream=stream)
    L.launch(S.sparse_kernel(v.math == FLOAT32), grid, block, stream,
             (s, idx_d, vals_d, lab, has_labels, call.ignore_index, params, v.div, v.ce, tail, float(t_gen), info,
              red_mean, nit,
              call.want_grad, row_buf, g, sup, srt, G))
    if call.reduction != "none":
        L.launch(K.sum_kernel, 1, K.RED_BLOCK, stream, (row_buf, has_labels, red_mean, nit, info))
    h = D.read_info(info, stream)
    if has_labels and h[1] > 0:
        _raise_bad_labels(lab, n, call.ignore_index, stream)
    return _results(call, kind, stream, student, grad_out, float(h[2]), rows_native, (g_native, g, g_host))


class ShardRun:
    """One vocabulary shard's steps on the GPU (:class:`fastdistill.sharded.VocabShard`): its logits
    as the kernels read them, this shard's labels on the device (a column of the shard,
    ``_spec.SHARD_LABEL_ELSEWHERE`` or ``SHARD_LABEL_IGNORED``), and float64 buffers in the caller's array kind:
    ``xmax`` (2 per row), ``xsum`` (11), ``xmix`` (3), the ones the caller combines across the shards, each
    followed by the rows of its check entries (``tail(round, k)``: ``fastdistill._shard_check``), written
    here once; the kernels see the rows alone. A device buffer's check rows are copied on the device
    when the round is read back (:meth:`take_back`), for :meth:`read_back_tails`."""

    def __init__(self, call: ResponseCall, student: Any, teacher: Any, lab: np.ndarray | None, scale: float,
                 classes: int, grad_out: Any, tail: Any) -> None:
        K = _K()
        v = call.variant
        rows, n = call.rows, call.n
        s_store, t_store, _ = v.storage()
        self.call = call
        self.kind = kind = D.kind_of(student)
        self.stream = stream = D.stream_for(kind, student)
        dev = D.device_id(kind, student)
        self.s = D.view_logits(student, kind, stream, "student", (rows, n), s_store)
        self.t = D.view_logits(teacher, D.kind_of(teacher), stream, "teacher", (rows, n), t_store)
        self.has_labels = lab is not None
        self.lab = D.numba_cuda().to_device(lab, stream=stream) if lab is not None else D.dummy(np.int64, dev)
        self.grads: tuple[Any, Any, Any] = (None, self.s, None)  # s: never written unless want_grad
        if call.want_grad:
            self.grads = _grad_buffer(call, student, teacher, None, grad_out, kind, self.t, self.lab, stream, self.s)
        self.student, self.grad_out = student, grad_out
        self.rows_native, self.row_buf = D.alloc(kind, student, (rows,), np.float64, stream)
        self.own = D.alloc(kind, student, (rows, K.N_SHARD_MAX), np.float64, stream)[1]
        self.buffers: dict[str, Any] = {}  # name: (native, kernel view of the whole buffer)
        self.heads: dict[str, Any] = {}  # name: the kernels' view of its rows
        self.tails: dict[str, Any] = {}  # name: a numba view of its check rows
        self.kept: list[Any] = []  # device copies of the check rows, as each round was read back
        rounds = (("max", K.N_SHARD_MAX), ("sum", K.N_SHARD_SUM)) + ((("mix", K.N_SHARD_MIX),) if v.two_pass else ())
        for rnd, (name, width) in enumerate(rounds):
            checks = tail(rnd, width)
            native, view = D.alloc(kind, student, (rows + checks.shape[0], width), np.float64, stream)
            self.buffers[name] = (native, view)
            plain = view.plain() if isinstance(view, D.DevArg) else view
            self.heads[name] = (D.DevArg(view.obj[:rows], view.ptr, (rows, width), view.dtype)
                                if isinstance(view, D.DevArg) else view[:rows])
            self.tails[name] = plain[rows:]
            self.tails[name].copy_to_device(checks, stream=stream)
        if not v.two_pass:  # (never exchanged: the kernels' argument only)
            self.heads["mix"] = D.alloc(kind, student, (rows, K.N_SHARD_MIX), np.float64, stream)[1]
        self.params = D.device_params(call.terms, stream, dev)
        self.scale = float(scale)
        self.classes = int(classes)
        self.kernel = K.shard_kernel(v.div, v.ce, v.lin, v.math == FLOAT32)

    def step(self, step: str) -> None:
        """Launch one step: "stats", "div2" or "finish" (``SHARD_STATS``, ``SHARD_DIV2``, ``SHARD_FINISH``
        of ``_kernels``)."""
        K = _K()
        c = self.call
        grid, block, G = L.geometry(c.rows, c.n)
        b = self.heads
        k_step = {"stats": K.SHARD_STATS, "div2": K.SHARD_DIV2, "finish": K.SHARD_FINISH}[step]
        L.launch(self.kernel, grid, block, self.stream,
                 (self.s, self.t, self.lab, self.has_labels, self.params, int(k_step), self.scale, self.classes,
                  c.want_grad, b["max"], self.own, b["sum"], b["mix"], self.row_buf, self.grads[1], G))

    def rescale(self) -> None:
        """The sums moved from this shard's maxima to the combined ones (after the max exchange)."""
        K = _K()
        v = self.call.variant
        grid = max(1, min((self.call.rows + 127) // 128, 1024))
        L.launch(K.shard_rescale_kernel, grid, 128 if not D.simulated() else 8, self.stream,
                 (self.own, self.heads["max"], self.heads["sum"], v.div, v.ce, float(1.0 / self.call.terms.tau)))

    def exchanged(self, name: str) -> Any:
        """A buffer the caller combines: itself for device callers, a host copy for host ones."""
        native, view = self.buffers[name]
        if self.kind == "host":
            h = view.copy_to_host(stream=self.stream)
            D.synchronize(self.stream)
            return h
        return native

    def take_back(self, name: str, host: Any) -> None:
        """A host caller's combined copy, back on the device; a device buffer's check rows copied on the
        device as they are now (checked by the caller through :meth:`read_back_tails`)."""
        if self.kind == "host":
            self.buffers[name][1].copy_to_device(np.ascontiguousarray(host), stream=self.stream)
            return
        t = self.tails[name]
        kept = D.numba_cuda().device_array(t.shape, dtype=np.float64, stream=self.stream)
        kept.copy_to_device(t, stream=self.stream)
        self.kept.append(kept)

    def read_back_tails(self) -> list[np.ndarray]:
        """Host copies of the check rows kept by :meth:`take_back`, in the order the rounds were read
        back (one host synchronisation)."""
        out = [k.copy_to_host(stream=self.stream) for k in self.kept]
        D.synchronize(self.stream)
        return out

    def result(self, reduce: Any) -> tuple[Any, Any]:
        """(loss, gradient) as the caller gets them: ``reduce`` (the façade's) of the row losses, or the
        row losses themselves for ``reduction="none"``, in the caller's array kind."""
        loss = None
        if self.call.reduction != "none":
            rows = self.row_buf.copy_to_host(stream=self.stream)
            D.synchronize(self.stream)
            loss = reduce(np.asarray(rows, dtype=np.float64).reshape(-1))
        return _results(self.call, self.kind, self.stream, self.student, self.grad_out, loss, self.rows_native,
                        self.grads)


def top_k(x: Any, k: int, tau: float, storage: str, top_p: float = 2.0, min_k: int = 1) -> tuple[Any, Any]:
    """``fastdistill.top_k`` of device logits: (ids int64, log-probabilities float64), ``x``'s leading
    shape plus ``(k,)``, in the caller's array kind; ``top_p`` at most 1: the nucleus cut (at least
    ``min_k`` entries)."""
    K = _K()
    S = _S()
    shape, _ = A.shape_dtype(x)
    n = int(shape[-1])
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    kind = D.kind_of(x)
    stream = D.stream_for(kind, x)
    xv = D.view_logits(x, kind, stream, "logits", (rows, n), storage)
    idx_native, idx = D.alloc(kind, x, (rows, k), np.int64, stream)
    val_native, val = D.alloc(kind, x, (rows, k), np.float64, stream)
    grid, block, G = L.geometry(rows, n)
    L.launch(S.top_k_kernel(storage != FLOAT64), grid, block, stream,
             (xv, int(k), float(1.0 / tau), float(top_p), int(min_k), idx, val, G))
    out = tuple(D.result(a, kind, tuple(shape[:-1]) + (k,), stream) for a in (idx_native, val_native))
    if kind == "host":
        D.synchronize(stream)
    return out


def softmax(x: Any, tau: float, *, log: bool) -> Any:
    """Row-wise (log-)softmax of ``x / tau`` on the GPU, in ``x``'s array kind, shape and dtype."""
    K = _K()
    shape, dtype = A.shape_dtype(x)
    storage = _storage.check(dtype, "x")
    n = int(shape[-1])
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    kind = D.kind_of(x)
    stream = D.stream_for(kind, x)
    xv = D.view_logits(x, kind, stream, "x", (rows, n), storage)
    out_native, out = D.alloc_logits(kind, x, (rows, n), storage, stream)
    grid, block, G = L.geometry(rows, n)
    L.launch(K.softmax_kernel(bool(log), storage != FLOAT64), grid, block, stream, (xv, float(1.0 / tau), out, G))
    if kind == "host":
        res = D.host_result(out_native, tuple(shape), storage, x, stream)
    else:
        res = D.result(out_native, kind, tuple(shape), stream)
    if kind == "host":
        D.synchronize(stream)
    return res

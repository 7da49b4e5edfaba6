"""CUDA backend: host launchers around the ``@cuda.jit`` kernels in ``_kernels``.

Private package, reached through ``backend="cuda"`` (or ``"auto"`` with device inputs). Importing it is
cheap: ``numba.cuda`` is imported by :func:`status`, the kernels on the first call that needs them.

Arrays cross over without copies: anything with ``__cuda_array_interface__`` (numba device arrays,
CuPy arrays, PyTorch CUDA tensors) is wrapped as a numba device array view (``sync=False``), kernels are
launched on the producer's current stream (PyTorch's or CuPy's current stream, else numba's default
stream), and results are allocated by the caller's library (``torch.empty``, ``cupy.empty``, else
``numba.cuda.device_array``) so they come back as the caller's array kind. NumPy inputs are copied to
the device and the results copied back. The only host synchronisation is the read of a four-number
buffer ``[counted rows, bad labels, loss, blocks done]`` when a Python float must be returned or labels checked.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .. import _validate as V

# numba-cuda 0.30 still references ``np.row_stack``, which NumPy 2.5 removed; an alias keeps it importable
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack  # type: ignore[attr-defined]
from .._spec import DIV_NONE, Terms

_ALLOW_SIM_VAR = "NUMBA_FASTDISTILL_ALLOW_SIM"

# Launch geometry: rows of at most ``small_n`` classes get ``group`` threads each (a warp), several rows
# per block of ``block_small`` threads; longer rows get a whole block (``block_mid`` threads up to
# ``large_n`` classes, ``block_large`` beyond). ``max_grid`` caps the grid (blocks walk rows grid-stride).
# Batches of at most ``fused_rows`` rows and ``fused_elements`` logits run the *fused* loss kernel: it
# counts the labels in every block (8 KB at most, from L2) and reduces the row losses in the block that
# finishes last, so the call is one launch instead of three (label count, loss, sum); for such batches
# the launches cost more than the work. Larger batches keep the lean kernel between the two small ones.
# The simulator uses tiny blocks (its threads are Python threads); tests may edit these dicts.
GPU_LAUNCH = {"small_n": 2048, "group": 32, "block_small": 256, "block_mid": 256, "large_n": 16384,
              "block_large": 256, "max_grid": 65535, "fused_rows": 1024, "fused_elements": 1 << 22}
SIM_LAUNCH = {"small_n": 16, "group": 4, "block_small": 8, "block_mid": 8, "large_n": 64,
              "block_large": 16, "max_grid": 4, "fused_rows": 4, "fused_elements": 1 << 30}

_gpu_status: tuple[bool, str] | None = None


def _simulated() -> bool:
    try:
        from numba.cuda.core import config
    except ImportError:  # older numba-cuda
        from numba.core import config
    return bool(config.ENABLE_CUDASIM)


def status() -> tuple[bool, str]:
    """``(ok, reason)``: whether numba-cuda imports and a CUDA GPU works here."""
    global _gpu_status
    try:
        from numba import cuda
    except Exception as exc:  # noqa: BLE001 - any import failure means: no backend
        return False, f"numba-cuda cannot be imported ({type(exc).__name__}: {exc})"
    if _simulated():
        if os.environ.get(_ALLOW_SIM_VAR) == "1":
            return True, f"CUDA simulator (allowed by {_ALLOW_SIM_VAR}=1)"
        return False, "CUDA simulator"
    if _gpu_status is None:
        try:
            if not cuda.is_available():
                _gpu_status = (False, "no CUDA driver or GPU found")
            else:
                dev = cuda.get_current_device()
                name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
                cc = dev.compute_capability
                _gpu_status = (True, f"{name} (compute capability {cc[0]}.{cc[1]})")
        except Exception as exc:  # noqa: BLE001 - a broken driver is "not usable", with the reason
            _gpu_status = (False, f"CUDA initialisation failed ({type(exc).__name__}: {exc})")
    return _gpu_status


# ------------------------------------------------------------------ arrays and streams


def _cuda():  # type: ignore[no-untyped-def]
    from numba import cuda

    return cuda


def _K():  # type: ignore[no-untyped-def]
    from . import _kernels

    return _kernels


def _kind(x: Any) -> str:
    """'torch', 'cupy', 'numba' (or another ``__cuda_array_interface__`` producer) or 'host'."""
    if x is None or isinstance(x, np.ndarray):
        return "host"
    if V.is_torch(x):
        return "torch" if x.is_cuda else "host"
    if hasattr(x, "__cuda_array_interface__") or getattr(x, "__cuda_ndarray__", False):
        return "cupy" if type(x).__module__.split(".")[0] == "cupy" else "numba"
    return "host"


_streams: dict = {}


def _stream(kind: str, x: Any):  # type: ignore[no-untyped-def]
    """The stream the producer of ``x`` works on (cached wrappers of external streams)."""
    if _simulated():
        return 0
    cuda = _cuda()
    ptr = 0
    if kind == "torch":
        import torch

        ptr = int(torch.cuda.current_stream(x.device).cuda_stream)
    elif kind == "cupy":
        import cupy

        ptr = int(cupy.cuda.get_current_stream().ptr)
    if ptr == 0:
        return cuda.default_stream()
    st = _streams.get(ptr)
    if st is None:
        st = _streams[ptr] = cuda.external_stream(ptr)
    return st


class _DevArg:
    """A contiguous device buffer as a kernel argument, without numba's per-wrap driver calls.

    numba's launcher takes any object with ``__cuda_memory__`` and reads the pointer, shape, dtype and
    strides from ``_strided_memory_view_shim``; ``_numba_type_`` gives its type to the dispatcher.
    ``obj`` keeps the producer's array alive (and serves the rare host copies).
    """

    __slots__ = ("obj", "ptr", "shape", "dtype", "size", "nbytes", "_layout", "_numba_type_")
    __cuda_memory__ = True

    def __init__(self, obj: Any, ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.obj = obj
        self.ptr = ptr
        self.shape = shape
        self.dtype = dtype
        size = 1
        for d in shape:
            size *= d
        self.size = size
        self.nbytes = size * dtype.itemsize
        strides = []
        acc = dtype.itemsize
        for d in reversed(shape):
            strides.append(acc)
            acc *= d
        self._layout = _Layout(tuple(reversed(strides)))
        self._numba_type_ = _array_type(dtype, len(shape))

    @property
    def _strided_memory_view_shim(self) -> "_DevArg":
        return self

    def plain(self):  # type: ignore[no-untyped-def]
        """The same buffer as a numba device array (the portable, slower wrap)."""
        return _cuda().as_cuda_array(_no_grad(self.obj), sync=False).reshape(self.shape)

    def copy_to_host(self, stream: Any = 0) -> np.ndarray:
        o = self.obj
        if V.is_torch(o):
            return o.detach().cpu().numpy().reshape(self.shape)
        return np.asarray(self.plain().copy_to_host(stream=stream))


def _no_grad(x: Any) -> Any:
    """``x`` itself, or a detached view of a tensor (``__cuda_array_interface__`` refuses ones that
    require grad)."""
    return x.detach() if V.is_torch(x) else x


class _Layout:
    __slots__ = ("strides_in_bytes", "is_contiguous_c", "is_contiguous_f", "is_contiguous_any")

    def __init__(self, strides: tuple[int, ...]) -> None:
        self.strides_in_bytes = strides
        self.is_contiguous_c = True
        self.is_contiguous_f = len(strides) <= 1
        self.is_contiguous_any = True


_types: dict = {}


def _array_type(dtype: np.dtype, ndim: int):  # type: ignore[no-untyped-def]
    key = (dtype.str, ndim)
    ty = _types.get(key)
    if ty is None:
        from numba.cuda import types
        from numba.cuda.np.numpy_support import from_dtype

        ty = _types[key] = types.Array(from_dtype(dtype), ndim, "C")
    return ty


_TORCH_DTYPES: dict = {}


def _torch_dtype(x: Any):  # type: ignore[no-untyped-def]
    """NumPy dtype of a torch tensor (None for dtypes the kernels do not take)."""
    if not _TORCH_DTYPES:
        import torch

        for tdt, ndt in ((torch.float32, np.float32), (torch.float64, np.float64), (torch.int64, np.int64),
                         (torch.int32, np.int32), (torch.int16, np.int16), (torch.int8, np.int8),
                         (torch.uint8, np.uint8)):
            _TORCH_DTYPES[tdt] = np.dtype(ndt)
    return _TORCH_DTYPES.get(x.dtype)


# the fast path (``_DevArg`` wraps, launches of the cached specialised kernel); switched off for the
# process if it ever fails, the portable numba path then serves every call
_FAST = {"on": os.environ.get("FASTDISTILL_CUDA_SLOW_LAUNCH") != "1"}


def launch_path() -> str:
    """'fast' or 'portable': how kernels are launched in this process (for benchmarks)."""
    return "fast" if _FAST["on"] and not _simulated() else "portable"


def _view(x: Any, kind: str, stream: Any, name: str, shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
    """A kernel argument of ``shape`` for ``x``: a zero-copy view of device arrays, a copy of host arrays."""
    cuda = _cuda()
    if kind == "host":
        a = np.ascontiguousarray(V.host_array(x, name))
        return cuda.to_device(a, stream=stream).reshape(shape)
    if kind == "torch" and not x.is_contiguous():
        x = x.detach().contiguous()
    elif kind == "cupy" and not x.flags.c_contiguous:
        import cupy

        x = cupy.ascontiguousarray(x)
    if _FAST["on"] and not _simulated():
        if kind == "torch":
            dt = _torch_dtype(x)
            if dt is not None:
                return _DevArg(x, x.data_ptr(), shape, dt)
        elif kind == "cupy":
            return _DevArg(x, int(x.data.ptr), shape, np.dtype(x.dtype))
    if getattr(x, "__cuda_ndarray__", False):
        v = x
    else:
        v = cuda.as_cuda_array(_no_grad(x), sync=False)
    if not v.is_c_contiguous():
        # a strided numba array or foreign producer: one contiguous copy through the host
        v = cuda.to_device(np.ascontiguousarray(v.copy_to_host()), stream=stream)
    return v.reshape(shape)


_SPEC: dict = {}


def _plain(a: Any) -> Any:
    return a.plain() if isinstance(a, _DevArg) else a


def _go(disp: Any, key: Any, grid: int, block: int, stream: Any, args: tuple) -> None:
    """Launch ``disp`` on ``args``: the cached specialised kernel when possible, else numba's dispatcher."""
    if _simulated():
        disp[grid, block, stream](*args)
        return
    if _FAST["on"]:
        k = _SPEC.get(key)
        try:
            if k is None:
                disp[grid, block, stream](*args)  # compiles (or loads from the cache) and launches
                k = disp.overloads.get(tuple(disp.typeof_pyval(a) for a in args))
                if k is not None:
                    _SPEC[key] = k
            else:
                k.launch(args, (grid, 1, 1), (block, 1, 1), stream, 0)
            return
        except Exception:  # noqa: BLE001 - the fast path is an optimisation: fall back for good
            _FAST["on"] = False
    disp[grid, block, stream](*[_plain(a) for a in args])


def _alloc(kind: str, like: Any, shape: tuple[int, ...], dtype: Any, stream: Any,  # type: ignore[no-untyped-def]
           zeros: bool = False):
    """(native array of the caller's kind, numba view of it); filled with 0 when ``zeros``."""
    cuda = _cuda()
    dtype = np.dtype(dtype)
    if kind == "torch":
        import torch

        tdt = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[dtype]
        a = (torch.zeros if zeros else torch.empty)(shape, dtype=tdt, device=like.device)
        if _FAST["on"] and not _simulated():
            return a, _DevArg(a, a.data_ptr(), shape, dtype)
        return a, cuda.as_cuda_array(a, sync=False)
    if kind == "cupy":
        import cupy

        a = (cupy.zeros if zeros else cupy.empty)(shape, dtype=dtype)
        if _FAST["on"] and not _simulated():
            return a, _DevArg(a, int(a.data.ptr), shape, dtype)
        return a, cuda.as_cuda_array(a, sync=False)
    if zeros:
        a = cuda.to_device(np.zeros(shape, dtype=dtype), stream=stream)
    else:
        a = cuda.device_array(shape, dtype=dtype, stream=stream)
    return a, a


def _info(kind: str, like: Any, stream: Any):  # type: ignore[no-untyped-def]
    """The kernel view of a zeroed float64 ``[counted rows, bad labels, loss, blocks done]`` buffer."""
    return _alloc(kind, like, (4,), np.float64, stream, zeros=True)[1]


_params: dict = {}
_dummies: dict = {}


def _device_id(kind: str, x: Any) -> int:
    if _simulated():
        return 0
    if kind == "torch":
        return int(x.device.index or 0)
    return int(_cuda().get_current_device().id)


def _device_params(terms: Terms, stream: Any, dev: int):  # type: ignore[no-untyped-def]
    """The packed parameters on the device, cached per distinct loss and device (read-only)."""
    key = (terms, dev)
    p = _params.get(key)
    if p is None:
        if len(_params) > 256:
            _params.clear()
        p = _params[key] = _cuda().to_device(terms.pack(), stream=stream)
    return p


def _dummy(dtype: Any, dev: int):  # type: ignore[no-untyped-def]
    """A one-element device array standing in for an absent (never read) argument."""
    key = (np.dtype(dtype).str, dev)
    d = _dummies.get(key)
    if d is None:
        d = _dummies[key] = _cuda().to_device(np.zeros(1, dtype=dtype))
    return d


def _cfg() -> dict:
    return SIM_LAUNCH if _simulated() else GPU_LAUNCH


def _launch(rows: int, n: int) -> tuple[int, int, int]:
    """(grid, block, threads per row) for a ``rows x n`` problem."""
    cfg = _cfg()
    if n <= cfg["small_n"]:
        block = cfg["block_small"]
        g = min(cfg["group"], block)
    else:
        block = cfg["block_mid"] if n <= cfg["large_n"] else cfg["block_large"]
        g = block
    per_block = block // g
    grid = max(1, min((rows + per_block - 1) // per_block, cfg["max_grid"]))
    return grid, block, g


def _ptr_range(v: Any) -> tuple[int, int]:
    if isinstance(v, _DevArg):
        return v.ptr, v.nbytes
    if _simulated():
        a = v._ary
        return a.__array_interface__["data"][0], a.nbytes
    return v.device_ctypes_pointer.value or 0, v.nbytes


def _overlaps(a: Any, b: Any) -> bool:
    pa, na = _ptr_range(a)
    pb, nb = _ptr_range(b)
    return pa < pb + nb and pb < pa + na


def _result(native: Any, kind: str, shape: tuple[int, ...], stream: Any) -> Any:
    if kind == "host":
        return native.copy_to_host(stream=stream).reshape(shape)
    return native.reshape(shape)


def _ce_mode(terms: Terms, has_labels: bool) -> int:
    K = _K()
    if terms.hard_w == 0.0 or not has_labels:
        return K.CE_NONE
    if terms.div_kind != DIV_NONE and terms.tau == 1.0:
        return K.CE_SHARED
    return K.CE_OWN


def _read_info(info: Any, stream: Any) -> np.ndarray:
    if isinstance(info, _DevArg) and V.is_torch(info.obj):
        return np.array(info.obj.tolist())  # waits for the tensor's (current) stream
    h = info.copy_to_host(stream=stream)
    if not _simulated():
        stream.synchronize()
    return h


def _raise_bad_labels(lab_view: Any, n: int, ignore_index: int, stream: Any) -> None:
    err = V.label_range_error(lab_view.copy_to_host(stream=stream).astype(np.int64), n, ignore_index)
    if err is not None:
        raise err


# ------------------------------------------------------------------ operations


def response(
    student: Any,
    teacher: Any,
    labels: Any,
    terms: Any,
    ignore_index: int,
    *,
    reduction: str,
    num_items: Any,
    want_grad: bool,
    grad_out: Any,
    needs_labels: bool,
) -> tuple[Any, Any]:
    """One response loss on the GPU: ``(loss, grad or None)`` in the caller's array kind."""
    from .. import _dispatch

    K = _K()
    s_shape, s_dtype = V.shape_dtype(student)
    n = int(s_shape[-1])
    rows = int(np.prod(s_shape[:-1], dtype=np.int64))
    kind = _kind(student)
    stream = _stream(kind, student)
    dev = _device_id(kind, student)
    s = _view(student, kind, stream, "student", (rows, n))
    t = _view(teacher, _kind(teacher), stream, "teacher", (rows, n))
    has_labels = labels is not None
    info = None
    cfg = _cfg()
    fused = rows <= cfg["fused_rows"] and rows * n <= cfg["fused_elements"]

    def count_labels() -> None:
        _go(K.label_kernel, ("label", lab.dtype.str), 1, K.RED_BLOCK, stream, (lab, n, int(ignore_index), info))

    if has_labels:
        lab = _view(labels, _kind(labels), stream, "labels", (rows,))
        info = _info(kind, student, stream)
        if not fused:
            count_labels()
    else:
        lab = _dummy(np.int64, dev)
    try:
        terms, red, n_items = _dispatch.resolve_params(terms, reduction, num_items, labels, needs_labels)
    except V.InvalidParameterError:
        if has_labels:  # contract order: a label out of range is reported before a bad parameter
            if fused:
                count_labels()
            if _read_info(info, stream)[1] > 0:
                _raise_bad_labels(lab, n, ignore_index, stream)
        raise
    # gradient buffer
    g_native = None
    g = s  # never written unless want_grad
    g_host = None
    if want_grad:
        if grad_out is not None:
            g_kind = _kind(grad_out)
            if g_kind == "host":
                g_host = V.grad_out(V.host_array(grad_out, "grad_out"), s_shape, s_dtype,
                                    (V.host_array(teacher, "teacher") if _kind(teacher) == "host" else None,))
                g_native = _cuda().device_array((rows, n), dtype=s_dtype, stream=stream)
                g = g_native
            else:
                g_shape, g_dtype = V.shape_dtype(grad_out)
                if tuple(g_shape) != tuple(s_shape):
                    raise V.DimensionMismatchError(
                        expected=rows * n, got=int(np.prod(g_shape, dtype=np.int64)),
                        message=f"grad_out shape {tuple(g_shape)} differs from student shape {tuple(s_shape)}",
                    )
                if g_dtype != s_dtype:
                    raise TypeError(f"grad_out dtype {g_dtype} differs from student dtype {s_dtype}")
                fast_t = (g_kind == "torch" and _FAST["on"] and not _simulated() and grad_out.is_contiguous()
                          and _torch_dtype(grad_out) is not None)
                if fast_t:
                    g = _DevArg(grad_out, grad_out.data_ptr(), (rows, n), _torch_dtype(grad_out))
                else:
                    gv = grad_out if getattr(grad_out, "__cuda_ndarray__", False) else _cuda().as_cuda_array(
                        _no_grad(grad_out), sync=False)
                    if not gv.is_c_contiguous():
                        raise V.InvalidParameterError("grad_out must be a writable C-contiguous array")
                    g = gv.reshape(rows, n)
                if _overlaps(g, t) or (has_labels and _overlaps(g, lab)):
                    raise V.InvalidParameterError("grad_out must not share memory with the teacher logits or labels")
                g_native = grad_out
        else:
            g_native, g = _alloc(kind, student, (rows, n), s_dtype, stream)
            g_kind = kind
    # row losses: the result itself for 'none', a float64 partials buffer otherwise
    if red == "none":
        rows_native, row_buf = _alloc(kind, student, (rows,), s_dtype, stream)
    else:
        rows_native, row_buf = _alloc(kind, student, (rows,), np.float64, stream)
        if info is None:
            info = _info(kind, student, stream)
    red_mean = red == "mean"
    nit = float(n_items) if n_items is not None else 0.0
    info_arg = info if info is not None else _dummy(np.float64, dev)
    variant = (terms.div_kind, _ce_mode(terms, has_labels), terms.mse_w != 0.0 or terms.cos_w != 0.0,
               s_dtype == np.float32)
    kernel = K.response_kernel(*variant, fused)
    grid, block, G = _launch(rows, n)
    fuse = ((K.FUSE_LABELS if has_labels else 0) | (K.FUSE_SUM if red != "none" else 0)) if fused else 0
    _go(kernel, (variant, fused, lab.dtype.str, row_buf.dtype.str), grid, block, stream,
        (s, t, lab, has_labels, int(ignore_index), _device_params(terms, stream, dev), info_arg,
         red_mean, nit, bool(want_grad), row_buf, g, G, fuse))
    if red != "none" and not fused:
        _go(K.sum_kernel, "sum", 1, K.RED_BLOCK, stream, (row_buf, has_labels, red_mean, nit, info))
    loss: Any = None
    if info is not None:
        h = _read_info(info, stream)
        if has_labels and h[1] > 0:
            _raise_bad_labels(lab, n, ignore_index, stream)
        if red != "none":
            loss = float(h[2])
    if red == "none":
        loss = _result(rows_native, kind, tuple(s_shape[:-1]), stream)
    grad = None
    if want_grad:
        if g_host is not None:
            g_native.copy_to_host(g_host.reshape(rows, n), stream=stream)
            if not _simulated():
                stream.synchronize()
            grad = grad_out  # the caller's own buffer (NumPy array or CPU tensor)
        elif grad_out is not None:
            grad = grad_out
        else:
            grad = _result(g_native, g_kind, tuple(s_shape), stream)
    if kind == "host" and not _simulated():
        stream.synchronize()
    return loss, grad


def softmax(x: Any, tau: float, *, log: bool) -> Any:
    """Row-wise (log-)softmax of ``x / tau`` on the GPU, in ``x``'s array kind, shape and dtype."""
    K = _K()
    shape, dtype = V.shape_dtype(x)
    n = int(shape[-1])
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    kind = _kind(x)
    stream = _stream(kind, x)
    xv = _view(x, kind, stream, "x", (rows, n))
    out_native, out = _alloc(kind, x, (rows, n), dtype, stream)
    grid, block, G = _launch(rows, n)
    variant = (bool(log), dtype == np.float32)
    _go(K.softmax_kernel(*variant), ("softmax", variant), grid, block, stream, (xv, float(1.0 / tau), out, G))
    res = _result(out_native, kind, tuple(shape), stream)
    if kind == "host" and not _simulated():
        stream.synchronize()
    return res


__all__ = ["status", "response", "softmax"]

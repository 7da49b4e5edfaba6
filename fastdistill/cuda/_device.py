"""The device side of the CUDA backend: whether a GPU works, streams, and the caller's arrays.

Arrays cross over without copies: anything with ``__cuda_array_interface__`` (numba device arrays,
CuPy arrays, PyTorch CUDA tensors) is wrapped as a kernel argument view, kernels are launched on the
producer's current stream (PyTorch's or CuPy's current stream, else numba's default stream), and
results are allocated by the caller's library (``torch.empty``, ``cupy.empty``, else
``numba.cuda.device_array``) so they come back as the caller's array kind. NumPy inputs are copied to
the device and the results copied back. ``numba.cuda`` is imported by :func:`status`, never by
``import fastdistill``.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .. import _arrays as A
from .. import _storage
from .._spec import BFLOAT16, FLOAT16, FLOAT32, FLOAT64

# the element type the kernels see for each storage (bfloat16: its bits, see ``_kernels.load``)
DEVICE_DTYPES = {FLOAT32: np.dtype(np.float32), FLOAT64: np.dtype(np.float64), FLOAT16: np.dtype(np.float16),
                 BFLOAT16: np.dtype(np.int16)}

# numba-cuda 0.30 still references ``np.row_stack``, which NumPy 2.5 removed; an alias keeps it importable
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack  # type: ignore[attr-defined]

ALLOW_SIM_VAR = "NUMBA_FASTDISTILL_ALLOW_SIM"

_gpu_status: tuple[bool, str] | None = None


def simulated() -> bool:
    """Whether numba-cuda runs in its simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
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
    if simulated():
        if os.environ.get(ALLOW_SIM_VAR) == "1":
            return True, f"CUDA simulator (allowed by {ALLOW_SIM_VAR}=1)"
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


def numba_cuda():  # type: ignore[no-untyped-def]
    from numba import cuda

    return cuda


# the fast path (``DevArg`` wraps, launches of the cached specialised kernel); switched off for the
# process if it ever fails, the portable numba path then serves every call
FAST = {"on": os.environ.get("FASTDISTILL_CUDA_SLOW_LAUNCH") != "1"}


def fast() -> bool:
    """Whether kernels are launched through the fast path in this process."""
    return FAST["on"] and not simulated()


def launch_path() -> str:
    """'fast' or 'portable': how kernels are launched in this process (for benchmarks)."""
    return "fast" if fast() else "portable"


# ------------------------------------------------------------------ array kinds and streams


def kind_of(x: Any) -> str:
    """'torch', 'cupy', 'numba' (or another ``__cuda_array_interface__`` producer) or 'host'."""
    if x is None or isinstance(x, np.ndarray):
        return "host"
    if A.is_torch(x):
        return "torch" if x.is_cuda else "host"
    if hasattr(x, "__cuda_array_interface__") or getattr(x, "__cuda_ndarray__", False):
        return "cupy" if type(x).__module__.split(".")[0] == "cupy" else "numba"
    return "host"


_streams: dict = {}


def stream_for(kind: str, x: Any):  # type: ignore[no-untyped-def]
    """The stream the producer of ``x`` works on (cached wrappers of external streams)."""
    if simulated():
        return 0
    cuda = numba_cuda()
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


def device_id(kind: str, x: Any) -> int:
    if simulated():
        return 0
    if kind == "torch":
        return int(x.device.index or 0)
    return int(numba_cuda().get_current_device().id)


# ------------------------------------------------------------------ kernel arguments


class DevArg:
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
    def _strided_memory_view_shim(self) -> "DevArg":
        return self

    def plain(self):  # type: ignore[no-untyped-def]
        """The same buffer as a numba device array (the portable, slower wrap)."""
        return numba_cuda().as_cuda_array(_bits(_no_grad(self.obj)), sync=False).reshape(self.shape)

    def copy_to_host(self, stream: Any = 0) -> np.ndarray:
        o = self.obj
        if A.is_torch(o):
            return _bits(o.detach()).cpu().numpy().reshape(self.shape)
        return np.asarray(self.plain().copy_to_host(stream=stream))


def _bits(x: Any) -> Any:
    """A bfloat16 tensor as the int16 tensor of its bits (the kernels' view; ``__cuda_array_interface__``
    and NumPy have no bfloat16), anything else as it is."""
    if A.is_torch(x):
        import torch

        if x.dtype == torch.bfloat16:
            return x.view(torch.int16)
    return x


def plain(a: Any) -> Any:
    """A kernel argument as numba's portable launcher takes it."""
    return a.plain() if isinstance(a, DevArg) else a


def _no_grad(x: Any) -> Any:
    """``x`` itself, or a detached view of a tensor (``__cuda_array_interface__`` refuses ones that
    require grad)."""
    return x.detach() if A.is_torch(x) else x


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


def torch_dtype(x: Any):  # type: ignore[no-untyped-def]
    """NumPy dtype of a torch tensor as the kernels see it (bfloat16: int16 bits; None for dtypes the
    kernels do not take)."""
    if not _TORCH_DTYPES:
        import torch

        for tdt, ndt in ((torch.float32, np.float32), (torch.float64, np.float64), (torch.float16, np.float16),
                         (torch.bfloat16, np.int16), (torch.int64, np.int64),
                         (torch.int32, np.int32), (torch.int16, np.int16), (torch.int8, np.int8),
                         (torch.uint8, np.uint8)):
            _TORCH_DTYPES[tdt] = np.dtype(ndt)
    return _TORCH_DTYPES.get(x.dtype)


def _torch_of(dtype: np.dtype):  # type: ignore[no-untyped-def]
    import torch

    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
            np.dtype(np.float16): torch.float16, np.dtype(np.int64): torch.int64}[np.dtype(dtype)]


def _torch_of_storage(storage: str):  # type: ignore[no-untyped-def]
    import torch

    return {FLOAT32: torch.float32, FLOAT64: torch.float64, FLOAT16: torch.float16,
            BFLOAT16: torch.bfloat16}[storage]


def view_logits(x: Any, kind: str, stream: Any, name: str, shape: tuple[int, ...], storage: str):  # type: ignore[no-untyped-def]  # noqa: E501
    """A kernel argument of ``shape`` holding logits ``x`` in ``storage`` (a storage name): a zero-copy
    view when ``x`` already is in it (bfloat16 as its bits), else one converted copy."""
    own = _storage.check(A.shape_dtype(x)[1], name)
    if kind == "host":
        bits = _storage.host_logits(x, own, name)
        if own != storage:
            bits = _storage.to_float(bits, own, storage)
        a = np.ascontiguousarray(bits).view(DEVICE_DTYPES[storage])  # (float16 bits as float16)
        return numba_cuda().to_device(a, stream=stream).reshape(shape)
    if own != storage:
        if kind == "torch":
            x = x.detach().to(_torch_of_storage(storage))
        elif kind == "cupy":
            x = x.astype(DEVICE_DTYPES[storage])
        else:
            x = _converted(x, kind, DEVICE_DTYPES[storage], stream)
    return view(_bits(x) if kind == "torch" else x, kind, stream, name, shape)


def alloc_logits(kind: str, like: Any, shape: tuple[int, ...], storage: str, stream: Any):  # type: ignore[no-untyped-def]  # noqa: E501
    """:func:`alloc` of an array of ``storage`` (a torch bfloat16 tensor seen as its bits)."""
    if kind == "torch" and storage == BFLOAT16:
        import torch

        a = torch.empty(shape, dtype=torch.bfloat16, device=like.device)
        if fast():
            return a, DevArg(a, a.data_ptr(), shape, DEVICE_DTYPES[storage])
        return a, numba_cuda().as_cuda_array(_bits(a), sync=False)
    return alloc(kind, like, shape, DEVICE_DTYPES[storage], stream)


def host_result(native: Any, shape: tuple[int, ...], storage: str, caller: Any, stream: Any) -> Any:
    """:func:`result` for a host caller, in the caller's dtype (bfloat16 bits viewed as it)."""
    out = native.copy_to_host(stream=stream).reshape(shape)
    if storage == BFLOAT16:
        return _storage.like_caller(out, caller)
    return out


def view(x: Any, kind: str, stream: Any, name: str, shape: tuple[int, ...], dtype: Any = None):  # type: ignore[no-untyped-def]  # noqa: E501
    """A kernel argument of ``shape`` (and ``dtype``) for ``x``: a zero-copy view of a device array of
    that dtype, one converted copy of a device array of another, a copy of a host array."""
    cuda = numba_cuda()
    if kind == "host":
        a = np.ascontiguousarray(A.host_array(x, name), dtype=dtype)
        return cuda.to_device(a, stream=stream).reshape(shape)
    if dtype is not None and np.dtype(dtype) != A.shape_dtype(x)[1]:
        x = _converted(x, kind, np.dtype(dtype), stream)
    if kind == "torch" and not x.is_contiguous():
        x = x.detach().contiguous()
    elif kind == "cupy" and not x.flags.c_contiguous:
        import cupy

        x = cupy.ascontiguousarray(x)
    if fast():
        if kind == "torch":
            dt = torch_dtype(x)
            if dt is not None:
                return DevArg(x, x.data_ptr(), shape, dt)
        elif kind == "cupy":
            return DevArg(x, int(x.data.ptr), shape, np.dtype(x.dtype))
    if getattr(x, "__cuda_ndarray__", False):
        v = x
    else:
        v = cuda.as_cuda_array(_no_grad(x), sync=False)
    if not v.is_c_contiguous():
        # a strided numba array or foreign producer: one contiguous copy through the host
        v = cuda.to_device(np.ascontiguousarray(v.copy_to_host()), stream=stream)
    return v.reshape(shape)


def _converted(x: Any, kind: str, dtype: np.dtype, stream: Any) -> Any:
    """A device array of ``dtype`` holding ``x``'s values (a teacher of another float dtype, labels of
    another integer dtype)."""
    if kind == "torch":
        return x.detach().to(_torch_of(dtype))
    if kind == "cupy":
        return x.astype(dtype)
    src = x if getattr(x, "__cuda_ndarray__", False) else numba_cuda().as_cuda_array(x, sync=False)
    if not src.is_c_contiguous():
        src = numba_cuda().to_device(np.ascontiguousarray(src.copy_to_host()), stream=stream)
    return cast(src, dtype, stream)


def cast(src: Any, dtype: np.dtype, stream: Any):  # type: ignore[no-untyped-def]
    """A numba device array: ``src`` (contiguous) converted to ``dtype`` on the device."""
    from ._kernels import cast_kernel

    cuda = numba_cuda()
    out = cuda.device_array(src.shape, dtype=dtype, stream=stream)
    flat_in, flat_out = src.reshape(src.size), out.reshape(out.size)
    blocks = max(1, min((src.size + 255) // 256, 1024))
    cast_kernel[blocks, 256 if not simulated() else 8, stream](flat_in, flat_out)
    return out


def alloc(kind: str, like: Any, shape: tuple[int, ...], dtype: Any, stream: Any,  # type: ignore[no-untyped-def]
          zeros: bool = False):
    """(native array of the caller's kind, kernel view of it); filled with 0 when ``zeros``."""
    cuda = numba_cuda()
    dtype = np.dtype(dtype)
    if kind == "torch":
        import torch

        a = (torch.zeros if zeros else torch.empty)(shape, dtype=_torch_of(dtype), device=like.device)
        if fast():
            return a, DevArg(a, a.data_ptr(), shape, dtype)
        return a, cuda.as_cuda_array(a, sync=False)
    if kind == "cupy":
        import cupy

        a = (cupy.zeros if zeros else cupy.empty)(shape, dtype=dtype)
        if fast():
            return a, DevArg(a, int(a.data.ptr), shape, dtype)
        return a, cuda.as_cuda_array(a, sync=False)
    if zeros:
        a = cuda.to_device(np.zeros(shape, dtype=dtype), stream=stream)
    else:
        a = cuda.device_array(shape, dtype=dtype, stream=stream)
    return a, a


def as_dtype(native: Any, kind: str, dtype: Any, stream: Any) -> Any:
    """A result array (the caller's kind) converted to ``dtype`` when it is not already."""
    dtype = np.dtype(dtype)
    if kind == "torch":
        return native if native.dtype == _torch_of(dtype) else native.to(_torch_of(dtype))
    if np.dtype(native.dtype) == dtype:
        return native
    if kind == "cupy":
        return native.astype(dtype)
    return cast(native, dtype, stream)


_params: dict = {}
_dummies: dict = {}


def device_params(terms: Any, stream: Any, dev: int):  # type: ignore[no-untyped-def]
    """The packed parameters of ``terms`` on the device, cached per distinct loss and device (read-only)."""
    k = (terms, dev)
    p = _params.get(k)
    if p is None:
        if len(_params) > 256:
            _params.clear()
        p = _params[k] = numba_cuda().to_device(terms.pack(), stream=stream)
    return p


def dummy(dtype: Any, dev: int):  # type: ignore[no-untyped-def]
    """A one-element device array standing in for an absent (never read) argument."""
    key = (np.dtype(dtype).str, dev)
    d = _dummies.get(key)
    if d is None:
        d = _dummies[key] = numba_cuda().to_device(np.zeros(1, dtype=dtype))
    return d


def _ptr_range(v: Any) -> tuple[int, int]:
    if isinstance(v, DevArg):
        return v.ptr, v.nbytes
    if simulated():
        a = v._ary
        return a.__array_interface__["data"][0], a.nbytes
    return v.device_ctypes_pointer.value or 0, v.nbytes


def overlaps(a: Any, b: Any) -> bool:
    pa, na = _ptr_range(a)
    pb, nb = _ptr_range(b)
    return pa < pb + nb and pb < pa + na


def same_span(a: Any, b: Any) -> bool:
    """Whether two C-contiguous device views cover exactly the same bytes."""
    return _ptr_range(a) == _ptr_range(b)


def result(native: Any, kind: str, shape: tuple[int, ...], stream: Any) -> Any:
    """A result in the caller's array kind: a host copy for host callers."""
    if kind == "host":
        return native.copy_to_host(stream=stream).reshape(shape)
    return native.reshape(shape)


def read_info(info: Any, stream: Any) -> np.ndarray:
    """The host copy of the four-number info buffer (the one host synchronisation of a call)."""
    if isinstance(info, DevArg) and A.is_torch(info.obj):
        return np.array(info.obj.tolist())  # waits for the tensor's (current) stream
    h = info.copy_to_host(stream=stream)
    if not simulated():
        stream.synchronize()
    return h


def synchronize(stream: Any) -> None:
    if not simulated():
        stream.synchronize()

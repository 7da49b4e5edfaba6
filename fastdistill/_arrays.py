"""What an array is, without copying it: PyTorch tensors, device arrays (``__cuda_array_interface__``),
NumPy arrays and anything NumPy reads; their shape and dtype; a host view or copy.

Below both the checks (``_validate``) and the storage formats (``_storage``), which read arrays through
these. PyTorch tensors are described from their own attributes (shape, dtype, device), never through
NumPy or ``__cuda_array_interface__``: both refuse tensors that require grad, the usual state of a model's
output, and the interface builds a new dictionary on every access. Nothing here imports PyTorch.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

_TORCH_NP: dict = {}


def cpu_tensor_numpy(x: Any, name: str) -> Any:
    """A CPU tensor's values as NumPy sees them (no copy, whatever its autograd state); a tensor on any
    other device is a ``TypeError`` naming ``name``."""
    if x.device.type != "cpu":
        raise TypeError(f"{name} is a tensor on device '{x.device}'; fastdistill computes on the CPU and on CUDA GPUs")
    return x.detach()


class OtherDtype(str):
    """A dtype NumPy cannot represent (``torch.bfloat16``, float8 ...): never valid here, named in messages."""

    kind = "V"


def is_torch(x: Any) -> bool:
    """True for PyTorch tensors (and their subclasses); never imports PyTorch."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def torch_np_dtype(dtype: Any) -> Any:
    """The NumPy dtype of a PyTorch dtype, or an :class:`OtherDtype` naming it."""
    d = _TORCH_NP.get(dtype)
    if d is None:
        name = str(dtype)
        try:
            d = np.dtype(name.rsplit(".", 1)[-1])
        except TypeError:
            d = OtherDtype(name)
        _TORCH_NP[dtype] = d
    return d


def is_device(x: Any) -> bool:
    """True for arrays that live on a CUDA device (numba device arrays, CuPy, PyTorch CUDA tensors)."""
    if type(x) is np.ndarray:
        return False
    if is_torch(x):
        return bool(x.is_cuda)
    return hasattr(x, "__cuda_array_interface__")


def shape_dtype(x: Any) -> tuple[tuple[int, ...], Any]:
    """Shape and dtype of a host or device array without copying it (dtype: NumPy's, or OtherDtype)."""
    if type(x) is np.ndarray:
        return x.shape, x.dtype
    if is_torch(x):
        return tuple(x.shape), torch_np_dtype(x.dtype)
    if hasattr(x, "__cuda_array_interface__"):
        cai = x.__cuda_array_interface__
        return tuple(int(d) for d in cai["shape"]), np.dtype(cai["typestr"])
    a = np.asarray(x)
    return a.shape, a.dtype


def on_host(x: Any) -> Any:
    """A device array's host copy (for the small arrays checked on the host: a sparse teacher's
    ``rows x k`` ids and values, a vocabulary shard's labels), anything else as it is."""
    if not is_device(x):
        return x
    if is_torch(x):
        return x.detach().cpu()
    if hasattr(x, "get"):  # CuPy
        return x.get()
    return x.copy_to_host()


def host_array(x: Any, name: str) -> np.ndarray:
    """``x`` as a NumPy array (no copy for NumPy input or CPU tensors, whatever their autograd state)."""
    if isinstance(x, np.ndarray):
        return x
    if is_torch(x):
        return cpu_tensor_numpy(x, name).numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"{name} must be an array of floats, got {type(x).__name__}") from exc


def tensor_of(x: Any, device: Any = None) -> Any:
    """``x`` as a PyTorch tensor (PyTorch imported by the caller): a tensor as it is, an array sharing its
    memory where it can (on ``device``, if given, a copy there). A read-only array -- a memory-mapped
    teacher store's -- is taken without PyTorch's warning that writing to it is undefined: fastdistill
    never writes its inputs (a gradient buffer is checked to be writable before any kernel runs)."""
    torch = sys.modules["torch"]
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.as_tensor(x, device=device)
    return torch.as_tensor(x, device=device)


def same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays are views of the same elements, in the same order and element size."""
    if a is b:  # (an in-place call's usual case: reading the addresses builds two dictionaries, ~4 us)
        return True
    return (a.shape == b.shape and a.strides == b.strides and a.dtype.itemsize == b.dtype.itemsize
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])

"""The storage of logits on the host: which float formats are accepted, and how they reach the kernels.

float32 and float64 arrays reach the kernels as they are. 16-bit floats -- NumPy's ``float16``,
``ml_dtypes.bfloat16`` arrays, ``torch.float16`` and ``torch.bfloat16`` tensors -- reach them as their
bits (a view, no copy: bfloat16 as int16, float16 as uint16, see ``cpu._math.BF16_BITS``), and the
kernels convert in registers. ``ml_dtypes`` is never imported here: a bfloat16 NumPy array is recognised
by its dtype's name, and results are views of the caller's own dtype.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ._arrays import cpu_tensor_numpy, host_array
from ._spec import BFLOAT16, FLOAT16, FLOAT32, FLOAT64, HALF

ACCEPTED = "float32, float64, float16 or bfloat16"
# the kernels' view of each 16-bit format
BITS = {BFLOAT16: np.dtype(np.int16), FLOAT16: np.dtype(np.uint16)}
_NUMPY_NAMES = {"float32": FLOAT32, "float64": FLOAT64, "float16": FLOAT16, "bfloat16": BFLOAT16}
_TORCH_NAMES = {"torch.float32": FLOAT32, "torch.float64": FLOAT64, "torch.float16": FLOAT16,
                "torch.bfloat16": BFLOAT16}


_STORAGE_OF: dict = {}


def storage_of(dtype: Any) -> str | None:
    """The storage name of a NumPy dtype or a PyTorch dtype's name (``OtherDtype``), None if not a
    logits format (ml_dtypes' bfloat16 is a NumPy dtype named "bfloat16"; its float8 types are not; nor
    are arrays of the other byte order).
    Kept per dtype: a call asks several times, and ``dtype.name`` costs microseconds."""
    try:
        return _STORAGE_OF[dtype]
    except KeyError:
        pass
    if isinstance(dtype, np.dtype):
        # (a byte-swapped float32 is named "float32" too; the kernels read native byte order only)
        st = _NUMPY_NAMES.get(dtype.name) if (dtype.kind in "fV" and dtype.isnative) else None
    else:
        st = _TORCH_NAMES.get(str(dtype))
    _STORAGE_OF[dtype] = st
    return st


def check(dtype: Any, name: str) -> str:
    """:func:`storage_of`, or a ``TypeError`` naming the argument and the formats accepted."""
    st = storage_of(dtype)
    if st is None:
        raise TypeError(f"{name} must hold {ACCEPTED} logits, got dtype {dtype}")
    return st


def host_logits(x: Any, storage: str, name: str) -> np.ndarray:
    """A host array or CPU tensor of ``storage`` as the kernels read it (16-bit floats as their bits),
    without a copy."""
    if storage in HALF:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(x, torch.Tensor):
            # (NumPy has no bfloat16: the tensor's bits are viewed as 16-bit integers by PyTorch itself)
            return cpu_tensor_numpy(x, name).view(torch.int16).numpy().view(BITS[storage])
        return np.asarray(x).view(BITS[storage])
    return host_array(x, name)


def to_float(bits: np.ndarray, storage: str, target: str) -> np.ndarray:
    """Logits in the kernels' view of ``storage`` converted (a copy, exactly where ``target`` is wider)
    to ``target`` (float32 or float64)."""
    if storage == BFLOAT16:
        # bfloat16 is the top half of a float32
        a = (bits.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    elif storage == FLOAT16:
        a = bits.view(np.float16).astype(np.float32)
    else:
        a = bits
    return a.astype(np.dtype(target), copy=False)


def like_caller(bits: np.ndarray, caller: Any) -> Any:
    """A result computed in the kernels' view of a 16-bit format, in the dtype of the caller's array
    ``caller`` (a view): the caller's NumPy dtype (float16, or ml_dtypes' bfloat16), or a
    ``torch.bfloat16``/``torch.float16`` tensor for a tensor (NumPy has no bfloat16)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(caller, torch.Tensor):
        if caller.dtype == torch.bfloat16:
            return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
        return bits.view(np.float16)
    return bits.view(caller.dtype)

"""The input checks shared by the front doors: arrays and their shapes, labels, parameters, reductions.

The façade calls these in the contract's order -- empty input, shape mismatch, labels length, label
range, parameters -- before any kernel runs. Messages name the argument and the numbers involved.
Device arrays (anything with ``__cuda_array_interface__``) are checked from their metadata only; their
label range is checked by the CUDA backend with :func:`label_range_error`. Checks of one kind of input
live beside it and use these: a sparse teacher's in ``sparse``, a vocabulary shard's in ``sharded``,
tensors' devices and the fused head's shapes in ``torch`` and ``_torch_linear``, the teacher readers'
and the store's in ``teachers``. What an array is (tensor, device array, its shape and dtype) is
``_arrays``'s.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _storage
from ._arrays import host_array, is_torch, same_memory
from ._spec import FLOAT32, HALF, MAX_TEMPERATURE
from .errors import (
    DimensionMismatchError,
    EmptyInputError,
    InvalidParameterError,
    LabelOutOfRangeError,
    TeacherStudentMismatchError,
)

REDUCTIONS = ("mean", "sum", "none")
VOCAB_MISMATCH = ("error", "truncate")
BACKENDS = ("auto", "cpu", "cuda")


def check_logits(shape: tuple[int, ...], dtype: np.dtype, name: str) -> None:
    """One logits array: at least 1-D, no zero-sized dimension, float32/float64/float16/bfloat16."""
    if len(shape) == 0:
        raise DimensionMismatchError(
            expected=1, got=0, message=f"{name} must have at least one dimension (classes), got a scalar"
        )
    if 0 in shape:
        raise EmptyInputError(f"{name} is empty: shape {shape} has a zero-sized dimension")
    _storage.check(dtype, name)


def check_pair(
    s_shape: tuple[int, ...], s_dtype: np.dtype, t_shape: tuple[int, ...], t_dtype: np.dtype,
    student: str = "student", teacher: str = "teacher", truncate: bool = False,
) -> None:
    """Empty, then shape mismatch, then dtype, for a student/teacher pair. ``truncate``: the last
    dimensions (vocabularies padded to other widths) may differ."""
    for shape, name in ((s_shape, student), (t_shape, teacher)):
        if len(shape) > 0 and 0 in shape:
            raise EmptyInputError(f"{name} is empty: shape {shape} has a zero-sized dimension")
    widths_only = truncate and len(s_shape) == len(t_shape) > 0 and s_shape[:-1] == t_shape[:-1]
    if s_shape != t_shape and not widths_only:
        if len(s_shape) == 1 and len(t_shape) == 1:
            raise TeacherStudentMismatchError(
                teacher=t_shape[0], student=s_shape[0],
                message=f"{teacher} has {t_shape[0]} logits but {student} has {s_shape[0]}",
            )
        raise TeacherStudentMismatchError(
            teacher=t_shape, student=s_shape,
            message=f"{teacher} shape {t_shape} differs from {student} shape {s_shape}",
        )
    check_logits(s_shape, s_dtype, student)
    check_logits(t_shape, t_dtype, teacher)


def rows_2d(a: np.ndarray) -> np.ndarray:
    """A C-contiguous ``(rows, classes)`` view of a host array (a copy only if it is not contiguous)."""
    n = a.shape[-1]
    return np.ascontiguousarray(a).reshape(-1, n)


def label_shape_ok(l_shape: tuple[int, ...], s_shape: tuple[int, ...]) -> bool:
    rows = math.prod(s_shape[:-1])
    return l_shape == tuple(s_shape[:-1]) or (len(l_shape) == 1 and l_shape[0] == rows) or (
        len(s_shape) == 1 and l_shape in ((), (1,))
    )


def check_labels_meta(l_shape: tuple[int, ...], l_dtype: np.dtype, s_shape: tuple[int, ...]) -> None:
    """Labels: an integer array with one label per row of the student."""
    if l_dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array, got dtype {l_dtype}")
    if not label_shape_ok(l_shape, s_shape):
        rows = math.prod(s_shape[:-1])
        got = math.prod(l_shape)
        raise DimensionMismatchError(
            expected=rows, got=got,
            message=f"labels must hold one label per row: expected {rows} labels "
            f"(student shape {s_shape}), got {got} (labels shape {l_shape})",
        )


def label_range_error(labels: np.ndarray, n_classes: int, ignore_index: int) -> LabelOutOfRangeError | None:
    """The error for the first label outside ``[0, n_classes)`` that is not ``ignore_index``, or None."""
    if labels.size and 0 <= labels.min() and labels.max() < n_classes:  # the common case: two reductions
        return None
    bad = ((labels < 0) | (labels >= n_classes)) & (labels != ignore_index)
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad)[0])
    lab = int(labels[i])
    return LabelOutOfRangeError(
        label=lab, n_classes=n_classes,
        message=f"labels[{i}] = {lab} is out of range for {n_classes} classes "
        f"(valid: 0..{n_classes - 1}, or ignore_index {ignore_index})",
    )


def above_int64(a: np.ndarray) -> int | None:
    """The flat position of the first value of an unsigned 64-bit array above the int64 range (which a
    cast to int64 would wrap to a negative id: -1 an unused slot, -100 an ignored row), or None."""
    if a.dtype.kind != "u" or a.dtype.itemsize < 8 or a.size == 0:
        return None
    top = np.uint64(np.iinfo(np.int64).max)
    if a.max() <= top:
        return None
    return int(np.flatnonzero(a.reshape(-1) > top)[0])


def host_labels(labels: Any, n: int, ignore_index: int) -> tuple[np.ndarray, int]:
    """(labels as a contiguous int64 vector, the number of rows they count), after their range check
    against ``n`` classes.

    Their dtype and length have passed :func:`check_labels_meta`.
    """
    raw = host_array(labels, "labels").reshape(-1)
    big = above_int64(raw)
    if big is not None:
        lab = int(raw[big])
        raise LabelOutOfRangeError(
            label=lab, n_classes=n,
            message=f"labels[{big}] = {lab} is out of range for {n} classes "
            f"(valid: 0..{n - 1}, or ignore_index {ignore_index})",
        )
    lab = np.ascontiguousarray(raw, dtype=np.int64)
    lo = lab.min()
    hi = lab.max()
    if 0 <= lo and hi < n:  # every label valid: two reductions, and a count only if ignore_index can occur
        return lab, (int(np.count_nonzero(lab != ignore_index)) if lo <= ignore_index <= hi else lab.size)
    err = label_range_error(lab, n, ignore_index)
    if err is not None:
        raise err
    return lab, int(np.count_nonzero(lab != ignore_index))


# ------------------------------------------------------------------ parameters


def finite(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"{name} must be a real number, got {value!r}") from exc
    if not math.isfinite(v):
        raise InvalidParameterError(f"{name} must be finite, got {v}")
    return v


def temperature(value: Any, name: str = "temperature") -> float:
    v = finite(value, name)
    if v <= 0.0:
        raise InvalidParameterError(f"{name} must be > 0, got {v}")
    return v


def loss_temperature(value: Any, name: str = "temperature") -> float:
    """A loss's temperature: finite, above 0 and at most ``MAX_TEMPERATURE`` (beyond it the divergences
    cancel to no correct digit)."""
    v = temperature(value, name)
    if v > MAX_TEMPERATURE:
        raise InvalidParameterError(
            f"{name} must be at most {MAX_TEMPERATURE:g} for a loss, got {v:g}: tau^2 * KL(p_tau || q_tau) "
            "cancels to no correct digit at such temperatures"
        )
    return v


def unit_interval(value: Any, name: str) -> float:
    v = finite(value, name)
    if not 0.0 <= v <= 1.0:
        raise InvalidParameterError(f"{name} must be in [0, 1], got {v}")
    return v


def label_smoothing(value: Any) -> float:
    v = finite(value, "label_smoothing")
    if not 0.0 <= v < 1.0:
        raise InvalidParameterError(f"label_smoothing must be in [0, 1), got {v}")
    return v


def integer(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r}")
    return int(value)


def reduction(value: Any) -> str:
    if value not in REDUCTIONS:
        raise InvalidParameterError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return str(value)


def vocab_mismatch(value: Any) -> str:
    if value not in VOCAB_MISMATCH:
        raise InvalidParameterError(f"vocab_mismatch must be one of {VOCAB_MISMATCH}, got {value!r}")
    return str(value)


def backend(value: Any) -> str:
    if value not in BACKENDS:
        raise InvalidParameterError(f"backend must be one of {BACKENDS}, got {value!r}")
    return str(value)


def num_items(value: Any, red: str) -> float | None:
    if value is None:
        return None
    if red != "mean":
        raise InvalidParameterError(f"num_items only applies to reduction='mean', got reduction={red!r}")
    v = finite(value, "num_items")
    if v <= 0:
        raise InvalidParameterError(f"num_items must be > 0, got {value!r}")
    return v


def divisor(n_counted: int, red: str, n_items: float | None) -> float:
    """What the summed row losses are divided by (0 means: every row ignored, the result is 0)."""
    if red != "mean":
        return 1.0
    return float(n_items) if n_items is not None else float(n_counted)


def grad_storage(g_dtype: Any, s_storage: str) -> str:
    """The storage of a caller's gradient buffer: the student's, or float32 for a half-precision student."""
    st = _storage.storage_of(g_dtype)
    if st != s_storage and not (s_storage in HALF and st == FLOAT32):
        also = " (or float32)" if s_storage in HALF else ""
        raise TypeError(f"grad_out dtype {g_dtype} differs from student dtype {s_storage}{also}")
    return st


def grad_out(g: Any, s_shape: tuple[int, ...], g_storage: str, others: tuple[Any, ...] = (),
             student: Any = None) -> np.ndarray:
    """A caller's gradient buffer (NumPy array or CPU tensor) as the kernels write it (a view; 16-bit
    floats as their bits): the student's shape, C-contiguous, writable, of ``g_storage`` (checked by
    :func:`grad_storage`), sharing no memory with ``others`` (the teacher as the caller gave it and as
    the kernels read it, the labels) and either exactly the memory of ``student`` (the kernels' view
    of it: the in-place update) or none of it."""
    if not (is_torch(g) or isinstance(g, np.ndarray)):
        raise TypeError(f"grad_out must be a NumPy array or a CPU tensor for host inputs, got {type(g).__name__}")
    g = _storage.host_logits(g, g_storage, "grad_out")
    if g.shape != tuple(s_shape):
        raise DimensionMismatchError(
            expected=int(np.prod(s_shape)), got=int(g.size),
            message=f"grad_out shape {g.shape} differs from student shape {tuple(s_shape)}",
        )
    if not g.flags.c_contiguous or not g.flags.writeable:
        raise InvalidParameterError("grad_out must be a writable C-contiguous array")
    for o in others:
        if isinstance(o, np.ndarray) and np.shares_memory(g, o):
            raise InvalidParameterError("grad_out must not share memory with the teacher logits or labels")
    if isinstance(student, np.ndarray) and np.shares_memory(g, student) and not same_memory(g, student):
        raise InvalidParameterError(
            f"grad_out overlaps the student without being its memory (grad_out at byte offset "
            f"{g.__array_interface__['data'][0] - student.__array_interface__['data'][0]} from the student, "
            f"{g.dtype} beside {student.dtype}): pass the student itself for an in-place update, or a separate buffer"
        )
    return g

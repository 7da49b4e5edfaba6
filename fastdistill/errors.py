"""Exception classes of fastdistill's core API.

Every error the library raises on bad input derives from :class:`FastDistillError` (or is a plain
``TypeError`` for a wrong dtype or device), and every message names the offending argument and the
numbers involved. The classes of one kind of input live beside it and derive from these:
``SparseTeacherIndexError`` in ``fastdistill.sparse``, the teacher readers', store's and capture's errors
in ``fastdistill.teachers``.
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "FastDistillError",
    "EmptyInputError",
    "TeacherStudentMismatchError",
    "DimensionMismatchError",
    "LabelOutOfRangeError",
    "InvalidParameterError",
    "BackendUnavailableError",
]


class FastDistillError(Exception):
    """Base class of every fastdistill error."""


class EmptyInputError(FastDistillError, ValueError):
    """An input has zero rows or zero classes."""


class TeacherStudentMismatchError(FastDistillError, ValueError):
    """Student and teacher shapes (or lengths) differ."""

    def __init__(self, teacher: Any, student: Any, message: str | None = None) -> None:
        self.teacher = teacher
        self.student = student
        super().__init__(
            message
            or f"teacher and student logits differ in shape: teacher {teacher}, student {student}"
        )


class DimensionMismatchError(FastDistillError, ValueError):
    """A length or count is not the one expected."""

    def __init__(self, expected: int, got: int, message: str | None = None) -> None:
        self.expected = expected
        self.got = got
        super().__init__(message or f"dimension mismatch: expected {expected}, got {got}")


class LabelOutOfRangeError(DimensionMismatchError):
    """A label is negative (and not ``ignore_index``) or not below the number of classes."""

    def __init__(self, label: int, n_classes: int, message: str | None = None) -> None:
        self.label = label
        self.n_classes = n_classes
        super().__init__(
            expected=n_classes,
            got=label + 1 if label >= 0 else label,
            message=message
            or f"label {label} is out of range for {n_classes} classes (valid: 0..{n_classes - 1})",
        )


class InvalidParameterError(FastDistillError, ValueError):
    """A parameter (temperature, weight, beta, reduction, backend, ...) is not valid."""


class BackendUnavailableError(FastDistillError, RuntimeError):
    """The requested backend cannot run here (no usable GPU, numba-cuda missing, ...)."""

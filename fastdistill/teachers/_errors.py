"""The errors of :mod:`fastdistill.teachers` (all :class:`fastdistill.FastDistillError` subclasses)."""
from __future__ import annotations

from ..errors import FastDistillError

__all__ = ["TeacherFormatError", "TeacherStoreError", "CaptureError"]


class TeacherFormatError(FastDistillError, ValueError):
    """What a teacher emitted is malformed: a missing position, a non-finite or positive log-probability,
    a repeated token id, a structure that is not the documented one. ``position`` is the position in
    the emitted data (``None`` when the error is not about one position)."""

    def __init__(self, message: str, position: int | None = None) -> None:
        self.position = position
        super().__init__(message)


class TeacherStoreError(FastDistillError, ValueError):
    """A teacher store cannot be written or opened: not a store, truncated, damaged, or the sequences
    appended do not match the store (``k``, kind, meta)."""


class CaptureError(FastDistillError, RuntimeError):
    """``fastdistill teacher capture`` cannot go on: the server is unreachable, answers an error or
    something other than the engine's documented format, or the input or output is not usable."""

"""Sparse (top-k) teachers: ``SparseTeacher`` and ``top_k``.

Offline distillation stores, per token, the teacher's k most likely classes and their log-probabilities
(what an inference server returns) instead of the full distribution. A :class:`SparseTeacher` stands
wherever a dense teacher array may stand; the loss is computed from the full student row and the k
teacher entries, fused, and nothing of size ``rows x classes`` is built for the teacher.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _arrays as A
from . import _storage
from . import _validate as V
from ._spec import DIV_NONE, DIV_REVERSE_KL, FLOAT64, TAILS, infinite_off_support
from .errors import DimensionMismatchError, FastDistillError, InvalidParameterError

VALUE_KINDS = ("logprobs", "logits")


class SparseTeacherIndexError(FastDistillError, ValueError):
    """A sparse teacher's class id is out of range or repeated in a row."""


class SparseTeacher:
    """A teacher given by its top-k classes per row: ``indices`` (integers, ``(..., k)``, class ids in
    ``[0, classes)``, ``-1`` for an unused slot) and ``values`` (the same shape, any float dtype: the
    teacher's log-probabilities, ``kind="logprobs"``, or raw logits, ``kind="logits"``).

    ``temperature`` is ``T_gen``, the temperature the values were produced at (an inference server's
    sampling temperature, or :func:`top_k`'s; finite, > 0). At loss temperature ``tau`` the support
    weights are ``w_i = exp(v_i * T_gen / tau)``: with log-probabilities ``p`` is proportional to
    ``p_gen ** (T_gen / tau)`` (``T_gen = 1``: ``exp(v_i / tau)``). Logits (``kind="logits"``) take
    ``temperature=1`` only. The student is always the full row, ``q = softmax(s / tau)``. ``tail`` says
    what the divergence compares:

    - ``"renormalize"`` (DistillKit): ``p = w / sum_S w`` on the support, 0 elsewhere, against the full
      ``q`` (reverse KL and ``jsd(beta=1)`` are infinite there and refused);
    - ``"support"`` (Megatron's top-k KL): ``p`` and ``q`` both renormalised over the support;
    - ``"bucket"``: k + 1 bins, ``p_i = exp(v_i)`` and ``p_rest = max(0, 1 - sum p_i)`` against ``q_i``
      and ``q_rest = sum_{j not in S} q_j`` (needs ``kind="logprobs"`` and the loss's temperature equal
      to ``T_gen``: the values are then the distribution's own log-probabilities).

    Arrays are kept as given (NumPy arrays or tensors); they are checked against the student when a
    loss uses them.
    """

    __slots__ = ("indices", "values", "kind", "tail", "temperature")

    def __init__(self, indices: Any, values: Any, *, kind: str = "logprobs", tail: str = "renormalize",
                 temperature: float = 1.0) -> None:
        if kind not in VALUE_KINDS:
            raise InvalidParameterError(f"kind must be one of {VALUE_KINDS}, got {kind!r}")
        if tail not in TAILS:
            raise InvalidParameterError(f"tail must be one of {TAILS}, got {tail!r}")
        t_gen = V.temperature(temperature, "SparseTeacher temperature")
        if kind == "logits" and t_gen != 1.0:
            raise InvalidParameterError(
                f"SparseTeacher temperature must be 1 with kind='logits' (got {t_gen}): logits are divided by "
                "the loss's temperature directly; temperature is that of log-probabilities"
            )
        i_shape, i_dtype = A.shape_dtype(indices)
        v_shape, v_dtype = A.shape_dtype(values)
        if getattr(i_dtype, "kind", "") not in "iu":
            raise TypeError(f"SparseTeacher indices must be an integer array, got dtype {i_dtype}")
        if _storage.storage_of(v_dtype) is None and getattr(v_dtype, "kind", "") != "f":
            raise TypeError(f"SparseTeacher values must be a float array, got dtype {v_dtype}")
        if len(i_shape) == 0 or tuple(i_shape) != tuple(v_shape):
            raise DimensionMismatchError(
                expected=int(np.prod(i_shape)), got=int(np.prod(v_shape)),
                message=f"SparseTeacher indices shape {tuple(i_shape)} and values shape {tuple(v_shape)} "
                "must be equal, (..., k)",
            )
        if 0 in i_shape:
            raise DimensionMismatchError(expected=1, got=0,
                                         message=f"SparseTeacher has no slots: shape {tuple(i_shape)}")
        self.indices = indices
        self.values = values
        self.kind = kind
        self.tail = tail
        self.temperature = t_gen

    @property
    def shape(self) -> tuple[int, ...]:
        """``(..., k)``."""
        return tuple(A.shape_dtype(self.indices)[0])

    @property
    def k(self) -> int:
        return int(self.shape[-1])

    def __repr__(self) -> str:
        return (f"SparseTeacher(shape={self.shape}, kind={self.kind!r}, tail={self.tail!r}, "
                f"temperature={self.temperature!r})")


def codes(teacher: SparseTeacher) -> list[int]:
    """``[kind, tail, mantissa, exponent]`` of ``teacher`` as integers (positions in ``VALUE_KINDS`` and
    ``TAILS``; the temperature as ``mantissa * 2**(exponent - 53)``, exactly): how the custom ops of
    ``fastdistill.torch`` carry them (plain integer arithmetic: traced through by ``torch.compile``)."""
    m, e = math.frexp(float(teacher.temperature))
    return [VALUE_KINDS.index(teacher.kind), TAILS.index(teacher.tail), int(m * 9007199254740992.0), int(e)]


def from_codes(indices: Any, values: Any, kind_tail: list[int]) -> SparseTeacher:
    """The :class:`SparseTeacher` of ``indices``, ``values`` and :func:`codes`' numbers (a list of two,
    ``[kind, tail]``, is at temperature 1)."""
    t_gen = math.ldexp(float(kind_tail[2]), int(kind_tail[3]) - 53) if len(kind_tail) > 3 else 1.0
    return SparseTeacher(indices, values, kind=VALUE_KINDS[kind_tail[0]], tail=TAILS[kind_tail[1]],
                         temperature=t_gen)


def check_terms(teacher: SparseTeacher, terms: Any) -> None:
    """The loss's parameters against the sparse teacher (the contract's refusals)."""
    if terms.mse_w != 0.0 or terms.cos_w != 0.0:
        raise InvalidParameterError(
            "MSE, cosine and combined losses need dense teacher logits, not a SparseTeacher"
        )
    div = terms.div_kind
    if teacher.tail == "renormalize" and infinite_off_support(div, terms.lam, terms.c_q):  # (the C ABI's rule)
        if div == DIV_REVERSE_KL:
            raise InvalidParameterError(
                "reverse KL (and jsd with beta=1, skew_reverse_kl and alpha_divergence with alpha=0) is infinite "
                "with tail='renormalize': the teacher has no mass outside its support; use tail='support' or "
                "'bucket'"
            )
        raise InvalidParameterError("this mixture is infinite with tail='renormalize'")
    if teacher.tail == "bucket" and (teacher.kind != "logprobs" or terms.tau != teacher.temperature) \
            and div != DIV_NONE:
        raise InvalidParameterError(
            f"tail='bucket' needs kind='logprobs' and the loss's temperature equal to the teacher's "
            f"(got kind={teacher.kind!r}, loss temperature {terms.tau}, teacher temperature "
            f"{teacher.temperature}): its rest bin is 1 - sum exp(values)"
        )


def host_arrays(teacher: SparseTeacher, s_shape: tuple[int, ...], n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices int64 (rows, k), values float64 (rows, k))`` of ``teacher``, checked against a student
    of shape ``s_shape`` with ``n`` classes: leading dims equal, ids in ``[-1, n)``, none repeated in a
    row. (``rows x k`` copies only.)"""
    i_shape = teacher.shape
    if tuple(i_shape[:-1]) != tuple(s_shape[:-1]):
        rows = int(np.prod(s_shape[:-1]))
        raise DimensionMismatchError(
            expected=rows, got=int(np.prod(i_shape[:-1])),
            message=f"SparseTeacher shape {tuple(i_shape)} does not match the student's rows: its leading "
            f"dims must be {tuple(s_shape[:-1])} (student shape {tuple(s_shape)})",
        )
    k = int(i_shape[-1])
    indices, values = A.on_host(teacher.indices), A.on_host(teacher.values)
    raw = A.host_array(indices, "indices").reshape(-1, k)
    big = V.above_int64(raw)
    if big is not None:
        r, c = divmod(big, k)
        raise SparseTeacherIndexError(
            f"SparseTeacher index {int(raw[r, c])} in row {r} (slot {c}) is out of range for {n} classes "
            f"(valid: 0..{n - 1}, or -1 for an unused slot)"
        )
    idx = np.ascontiguousarray(raw, dtype=np.int64)
    v_dtype = A.shape_dtype(values)[1]
    st = _storage.storage_of(v_dtype)
    if st is not None and st != FLOAT64:
        vals = _storage.to_float(_storage.host_logits(values, st, "values"), st, FLOAT64)
    else:
        vals = A.host_array(values, "values")
    vals = np.ascontiguousarray(vals, dtype=np.float64).reshape(-1, k)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < -1 or hi >= n:
        bad = (idx < -1) | (idx >= n)
        r, c = np.argwhere(bad)[0]
        raise SparseTeacherIndexError(
            f"SparseTeacher index {int(idx[r, c])} in row {int(r)} (slot {int(c)}) is out of range for {n} "
            f"classes (valid: 0..{n - 1}, or -1 for an unused slot)"
        )
    if k > 1:
        srt = np.sort(idx, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if dup.any():
            r, c = np.argwhere(dup)[0]
            raise SparseTeacherIndexError(
                f"SparseTeacher index {int(srt[r, c + 1])} appears twice in row {int(r)}"
            )
    if teacher.tail == "bucket":
        above = (vals > 0.0) & (idx >= 0)
        if above.any():
            r, c = np.argwhere(above)[0]
            raise InvalidParameterError(
                f"SparseTeacher values[{int(r)}, {int(c)}] = {vals[r, c]} (row {int(r)}, slot {int(c)}) is a "
                "log-probability above 0: tail='bucket' reads values as log-probabilities (p = exp(value) <= 1)"
            )
    return idx, vals


__all__ = ["SparseTeacher", "SparseTeacherIndexError"]

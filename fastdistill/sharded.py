"""A response loss whose classes are split across processes (vocabulary / tensor parallelism).

Each process holds a contiguous column range -- its *shard* -- of the student's and the teacher's logits
for the same rows, and the labels as global class ids. The loss needs each row's maxima and sums over
all shards; the kernels compute a row in passes of row statistics, so a shard computes its part of the
statistics, the caller combines them across the shards with its own communication (``max`` where the
statistic is a maximum, ``sum`` where it is a sum), and the next pass continues from the combined
values. Every shard then holds the same row losses and writes its own columns of the gradient.

    shard = distiller.vocab_shard(s_shard, t_shard, labels, class_offset=offset, classes=vocab)
    for buf, op in shard.exchanges():        # 2 rounds, 3 for mixture divergences and TVD
        allreduce(buf, op)                   # in place: op is "max" or "sum"
    loss, grad = shard.result()              # grad: this shard's columns

Per row a round exchanges 2 (max), 12 (sum) and, for mixtures and TVD, 5 (sum) float64 numbers:
112 bytes per row for KL-type losses and cross-entropy, 152 for JSD, skew KLs and TVD, never anything
of size ``rows x classes``. After its rows each round's buffer holds a few rows of *check entries*
(``fastdistill._shard_check``): 3 rows of 2 (max: the shard's end and offset, each with both signs,
and ``classes`` and ``-classes``), 1 row of 12 (sum: its width, the sums of its column ids and of their
squares, a hash of its boundaries) and 1 of 5 (the second sums: its width), so a round's buffer is
``(rows + 3, 2)``, ``(rows + 1, 12)`` or ``(rows + 1, 5)``: a fixed 48 + 96 (+ 40) bytes a call beside
the bytes per row, which are unchanged. The step that reads a combined round (the next round, or
:meth:`VocabShard.result`) compares them with the whole row's and raises, on every shard, a
``DimensionMismatchError`` when the shards do not tile ``[0, classes)`` (overlap, gap, wrong or swapped
``class_offset``, shards that disagree on ``classes``: the message names the columns, the classes and
the round) and an ``InvalidParameterError`` when the round was read back before it was combined
(``list(shard.exchanges())``, never combining, ``result()`` before the last round was combined); with
one shard combining is the identity and nothing is refused. A shard forms its sums relative to its own
maxima in the same pass that finds them (one pass over its logits before the first exchange) and moves
them to the combined maxima after it. Any communication library works (``torch.distributed.all_reduce``
on ``torch.from_numpy(buf)``, mpi4py's ``Allreduce(MPI.IN_PLACE, buf, op)``).

On a GPU (``backend="cuda"``, or ``"auto"`` with device arrays: CuPy, numba, PyTorch CUDA tensors) the
rounds' buffers are device arrays of the caller's kind (host copies for host inputs), of 2 (max), 11
(sum) and, for mixtures and TVD, 3 (sum) float64 numbers per row: 104 or 128 bytes per row, and the
same check rows after them (``(rows + 3, 2)``, ``(rows + 1, 11)``, ``(rows + 1, 3)``: a fixed 48 + 88
(+ 24) bytes a call); combine them in place (``torch.distributed.all_reduce`` over NCCL on the tensors
themselves) on the stream the logits were produced on. The device keeps a copy of each round's check
rows as it is read back, and :meth:`VocabShard.result` checks them (no host synchronisation between
the rounds): there the errors come from ``result()``. Host inputs are checked as on the CPU. All
shards of one loss use the same backend.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from . import _arrays as A
from . import _dispatch
from . import _shard_check as SC
from . import _validate as V
from ._spec import SHARD_LABEL_ELSEWHERE, SHARD_LABEL_IGNORED
from .errors import DimensionMismatchError, InvalidParameterError

_IGNORED = SHARD_LABEL_IGNORED  # (never a column of the shard; ignore_index may be one)


class VocabShard:
    """One shard's part of a :class:`~fastdistill.ResponseDistiller` loss (see the module docstring).

    Built by :meth:`ResponseDistiller.vocab_shard`. ``exchanges()`` yields, round by round, a contiguous
    float64 ``(rows + c, k)`` array (``c`` rows of check entries after the rows) and ``"max"`` or
    ``"sum"``: combine it in place across the shards (all shards in the same order of rounds) before
    taking the next. ``result()`` then returns ``(loss, grad)``: the loss of the whole rows (equal on
    every shard; a float, or per row for ``reduction="none"``) and the gradient of this shard's columns
    (``None`` unless ``want_grad``). A round whose combined check entries show shards that do not tile
    the row, or a round read back before it was combined, raises (see the module docstring).
    """

    def __init__(self, distiller: Any, student: Any, teacher: Any, labels: Any, *, class_offset: int,
                 classes: int, reduction: str = "mean", num_items: Any = None, want_grad: bool = True,
                 grad_out: Any = None, backend: str = "auto") -> None:
        s_shape, s_dtype = A.shape_dtype(student)
        t_shape, t_dtype = A.shape_dtype(teacher)
        V.check_pair(s_shape, s_dtype, t_shape, t_dtype)
        width = int(s_shape[-1])
        offset = V.integer(class_offset, "class_offset")
        total = V.integer(classes, "classes")
        if offset < 0 or offset + width > total:
            raise DimensionMismatchError(
                expected=total, got=offset + width,
                message=f"the shard's columns [{offset}, {offset + width}) do not lie in the {total} classes "
                f"of the whole row (class_offset={offset}, shard width {width}, classes={total})",
            )
        glob = lab = None
        n_counted = 0
        if labels is not None:
            l_shape, l_dtype = A.shape_dtype(labels)
            V.check_labels_meta(l_shape, l_dtype, s_shape)
            glob, n_counted = V.host_labels(A.on_host(labels), total, distiller.ignore_index)  # global ids, checked
            local = glob - offset
            ignored = glob == distiller.ignore_index
            lab = np.where(ignored, _IGNORED, np.where((local >= 0) & (local < width), local, SHARD_LABEL_ELSEWHERE))
        call = _dispatch._resolve(distiller.terms, s_shape,
                                  _dispatch._storages(s_dtype, t_dtype, grad_out if want_grad else None), width,
                                  labels is not None, _IGNORED, reduction, num_items, want_grad,
                                  distiller.hard_label_weight != 0.0)
        self._call = call
        self._classes = total
        self._offset = offset
        self._width = width
        self._taken: list[int] = []  # the rounds read back (ROUND_*), in order
        self._error: Exception | None = None  # a failed check: raised again by every later step
        self._next = 0  # rounds handed out
        self._pending: tuple | None = None  # the last round's buffer, until it is read back
        self._result: tuple | None = None  # (loss, grad), once computed
        # the backend's steps and buffers (the labels as every shard kernel takes them: _spec's
        # SHARD_LABEL_* codes); its kind is "host" when the caller's buffers are host arrays
        self._backend, self._scale = _dispatch.shard_run(call, student, teacher, labels, lab, glob, n_counted, total,
                                                         grad_out, self._tail, backend)

    @property
    def rounds(self) -> int:
        """How many exchanges the loss needs (2, or 3 for mixture divergences and TVD)."""
        return 3 if self._call.variant.two_pass else 2

    def exchanges(self) -> Iterator[tuple[np.ndarray, str]]:
        """The rounds: ``(buffer, op)`` to combine in place across the shards, one after the other (each
        round's buffer is read back when the next is asked for, or by :meth:`result`)."""
        if self._next:
            raise InvalidParameterError("a VocabShard's exchanges() can be taken once")
        run = self._backend
        # 1: the maxima (the sums were formed relative to this shard's own: moved to the combined ones)
        run.step("stats")
        yield self._hand_out(run.exchanged("max"), "max", self._back("max", rescale=True), SC.ROUND_MAX)
        # 2: the sums
        self._take_back()
        yield self._hand_out(run.exchanged("sum"), "sum", self._back("sum"), SC.ROUND_SUM)
        if self._call.variant.two_pass:  # 3: the mixtures' and TVD's second pass
            self._take_back()
            run.step("div2")
            yield self._hand_out(run.exchanged("mix"), "sum", self._back("mix"), SC.ROUND_MIX)

    def _tail(self, rnd: int, k: int) -> np.ndarray:
        """The rows after round ``rnd``'s ``(rows, k)`` numbers: this shard's check entries."""
        return SC.tail(rnd, self._offset, self._width, self._classes, k)

    def _back(self, name: str, rescale: bool = False) -> Any:
        """What reads round ``name``'s combined buffer back into the backend's run."""
        def back(combined: Any) -> None:
            self._backend.take_back(name, combined)
            if rescale:
                self._backend.rescale()
        return back

    def _hand_out(self, buf: np.ndarray, op: str, back: Any, rnd: int) -> tuple[np.ndarray, str]:
        self._pending = (buf, back, rnd)
        self._next += 1
        return buf, op

    def _take_back(self) -> None:
        """The combined values of the round handed out last, once its check entries show that it was
        combined across shards that tile the row (a GPU's device buffers: checked by :meth:`result`,
        from the copy the device kept when the round was read back)."""
        if self._pending is not None:
            buf, back, rnd = self._pending
            self._pending = None
            self._taken.append(rnd)
            if self._backend.kind == "host":
                self._check(rnd, np.asarray(buf)[self._call.rows:])
            back(buf)

    def _check(self, rnd: int, tail: np.ndarray) -> None:
        """:meth:`_verify`, remembered: a shard whose check failed never computes a result."""
        if self._error is None:
            try:
                self._verify(rnd, tail)
            except (DimensionMismatchError, InvalidParameterError) as e:
                self._error = e
        if self._error is not None:
            raise self._error

    def _verify(self, rnd: int, tail: np.ndarray) -> None:
        """Raise unless round ``rnd``'s combined check rows ``tail`` are those of the whole row."""
        got = np.ascontiguousarray(tail, dtype=np.float64).reshape(-1)[: SC.N_CHECK[rnd]]
        n = self._classes
        if SC.combined_ok(np.int64(rnd), got, np.int64(n)):
            return
        a, b = self._offset, self._offset + self._width
        where = f"round {rnd + 1} of {self.rounds} ({SC.ROUND_NAMES[rnd]!r})"
        me = f"this shard: columns [{a}, {b}) of {n}"
        if np.array_equal(got, SC.entries(rnd, a, b - a, n)):
            alone = (" (or every shard holds these same columns)" if rnd == SC.ROUND_MAX
                     else " (or no other shard took part: then columns outside it are in no shard)")
            raise InvalidParameterError(
                f"vocabulary shard: {where} was not combined across the shards before it was read back (by the "
                f"next round or result()): its buffer still holds only this shard's own numbers ({me}){alone}; "
                "combine each round in place on every shard, with its op, before taking the next"
            )
        if rnd == SC.ROUND_MAX:
            n_max, n_min = int(got[4]), int(-got[5])
            if n_max != n or n_min != n:
                other = n_max if n_max != n else n_min
                raise DimensionMismatchError(
                    expected=n, got=other,
                    message=f"the vocabulary shards disagree on classes: this shard (columns [{a}, {b})) was "
                    f"built with classes={n}, another with classes={other} (found in {where})",
                )
            end, start = int(got[0]), int(-got[1])
            if end != n:
                raise DimensionMismatchError(
                    expected=n, got=end,
                    message=f"no vocabulary shard ends at column {n}: the shards' columns end at {end} at most, "
                    f"so columns [{end}, {n}) are in no shard ({me}; found in {where})",
                )
            raise DimensionMismatchError(
                expected=0, got=start,
                message=f"no vocabulary shard starts at column 0: the shards' columns start at {start} at least, "
                f"so columns [0, {start}) are in no shard ({me}; found in {where})",
            )
        width = int(got[0])
        if width != n:
            how = ("overlap" if width > n else "leave a gap")
            again = "more than once" if width > n else "across only some of the shards"
            raise DimensionMismatchError(
                expected=n, got=width,
                message=f"the vocabulary shards' widths add up to {width}, not classes={n}: their columns "
                f"{how} (each column of [0, {n}) must be in exactly one shard; {me}), or the buffer of {where} was "
                f"combined {again}",
            )
        whole = SC.entries(rnd, 0, n, n)
        names = ("", "the sum of their column ids", "the sum of their squared column ids",
                 "the hash of their boundaries")
        i = next(i for i in range(1, SC.N_CHECK[rnd]) if got[i] != whole[i])
        raise DimensionMismatchError(
            expected=int(whole[i]), got=int(got[i]),
            message=f"the vocabulary shards' widths add up to classes={n} but their columns do not tile [0, {n}): "
            f"some columns are in two shards and as many in none ({names[i]} is {int(got[i])}, the whole row's "
            f"{int(whole[i])}; {me}; found in {where})",
        )

    def result(self) -> tuple[Any, Any]:
        """``(loss, grad of this shard's columns)``, once every round has been combined."""
        if self._error is not None:
            raise self._error
        if self._result is None:
            if self._next < self.rounds:
                raise InvalidParameterError(
                    f"VocabShard.result() needs all {self.rounds} exchanges combined first ({self._next} taken)"
                )
            self._take_back()
            c = self._call

            def reduce(rows: np.ndarray) -> Any:
                return _dispatch.reduce_rows(rows, c.reduction, self._scale, c.shape, c.variant.dtype)

            run = self._backend
            if run.kind != "host":  # the device's copies of the check rows as each round was read
                for rnd, tail in zip(self._taken, run.read_back_tails()):
                    self._check(rnd, tail)
            run.step("finish")
            self._result = run.result(reduce)
        return self._result


__all__ = ["VocabShard"]

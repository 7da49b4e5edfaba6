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
of size ``rows x classes``. A shard forms its sums relative to its own maxima in the same pass that
finds them (one pass over its logits before the first exchange) and moves them to the combined maxima
after it. Any communication library works (``torch.distributed.all_reduce`` on
``torch.from_numpy(buf)``, mpi4py's ``Allreduce(MPI.IN_PLACE, buf, op)``).

On a GPU (``backend="cuda"``, or ``"auto"`` with device arrays: CuPy, numba, PyTorch CUDA tensors) the
rounds' buffers are device arrays of the caller's kind (host copies for host inputs), of 2 (max), 11
(sum) and, for mixtures and TVD, 3 (sum) float64 numbers per row: 104 or 128 bytes per row; combine
them in place (``torch.distributed.all_reduce`` over NCCL on the tensors themselves) on the stream the
logits were produced on. All shards of one loss use the same backend.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from . import _dispatch
from . import _validate as V
from ._spec import SHARD_LABEL_ELSEWHERE, SHARD_LABEL_IGNORED
from .errors import DimensionMismatchError, InvalidParameterError

_IGNORED = SHARD_LABEL_IGNORED  # (never a column of the shard; ignore_index may be one)


class VocabShard:
    """One shard's part of a :class:`~fastdistill.ResponseDistiller` loss (see the module docstring).

    Built by :meth:`ResponseDistiller.vocab_shard`. ``exchanges()`` yields, round by round, a contiguous
    float64 ``(rows, k)`` array and ``"max"`` or ``"sum"``: combine it in place across the shards (all
    shards in the same order of rounds) before taking the next. ``result()`` then returns ``(loss,
    grad)``: the loss of the whole rows (equal on every shard; a float, or per row for
    ``reduction="none"``) and the gradient of this shard's columns (``None`` unless ``want_grad``).
    """

    def __init__(self, distiller: Any, student: Any, teacher: Any, labels: Any, *, class_offset: int,
                 classes: int, reduction: str = "mean", num_items: Any = None, want_grad: bool = True,
                 grad_out: Any = None, backend: str = "auto") -> None:
        s_shape, s_dtype = V.shape_dtype(student)
        t_shape, t_dtype = V.shape_dtype(teacher)
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
            l_shape, l_dtype = V.shape_dtype(labels)
            V.check_labels_meta(l_shape, l_dtype, s_shape)
            glob, n_counted = V.host_labels(V.on_host(labels), total, distiller.ignore_index)  # global ids, checked
            local = glob - offset
            ignored = glob == distiller.ignore_index
            lab = np.where(ignored, _IGNORED, np.where((local >= 0) & (local < width), local, SHARD_LABEL_ELSEWHERE))
        call = _dispatch._resolve(distiller.terms, s_shape,
                                  _dispatch._storages(s_dtype, t_dtype, grad_out if want_grad else None), width,
                                  labels is not None, _IGNORED, reduction, num_items, want_grad,
                                  distiller.hard_label_weight != 0.0)
        self._call = call
        self._classes = total
        self._grad_out = grad_out
        self._student = student
        self._next = 0  # rounds handed out
        self._pending: tuple | None = None  # the last round's buffer, until it is read back
        self._result: tuple | None = None  # (loss, grad), once computed
        self._gpu: Any = None
        if _dispatch.use_cuda(V.backend(backend), student, teacher, labels, grad_out):
            self._scale = _dispatch._scale(call, glob, n_counted)
            # (the labels as every shard kernel takes them: _spec's SHARD_LABEL_* codes)
            self._gpu = _dispatch.cuda_backend().ShardRun(call, student, teacher, lab, self._scale, total, grad_out)
            return
        self._s, self._t, g, self._scale = _dispatch.host_batch(call, student, teacher, glob, n_counted, grad_out)
        self._lab = lab
        self._grad = (g if g is not None else np.empty_like(self._s)) if call.want_grad else None
        self._out = np.empty(call.rows, dtype=np.float64)
        self._stats = np.empty((call.rows, _K().N_STATS), dtype=np.float64)
        self._local_max = np.empty((call.rows, _K().N_MAX), dtype=np.float64)

    @property
    def rounds(self) -> int:
        """How many exchanges the loss needs (2, or 3 for mixture divergences and TVD)."""
        return 3 if self._call.variant.two_pass else 2

    def _run(self, step: int) -> None:
        from . import cpu

        c = self._call
        cpu.shard_step(c.variant, step, self._s, self._t, self._lab, _dispatch.packed(c.terms), _IGNORED,
                       self._scale, c.want_grad, self._out, self._grad, self._stats, self._local_max,
                       self._classes)

    def exchanges(self) -> Iterator[tuple[np.ndarray, str]]:
        """The rounds: ``(buffer, op)`` to combine in place across the shards, one after the other (each
        round's buffer is read back when the next is asked for, or by :meth:`result`)."""
        if self._next:
            raise InvalidParameterError("a VocabShard's exchanges() can be taken once")
        if self._gpu is not None:
            yield from self._gpu_exchanges()
            return
        K = _K()
        # 1: the maxima (the sums were formed relative to this shard's own: moved to the combined ones)
        self._run(K.SHARD_STATS)
        yield self._hand_out(self._local_max, "max", self._rescale)
        # 2: the sums
        self._take_back()
        yield self._hand_out(np.ascontiguousarray(self._stats[:, K.N_MAX:K.S_KP]), "sum", self._sums_back(K.N_MAX, K.S_KP))
        if self._call.variant.two_pass:  # 3: the mixtures' and TVD's second pass
            self._take_back()
            self._run(K.SHARD_DIV2)
            yield self._hand_out(np.ascontiguousarray(self._stats[:, K.S_KP:]), "sum",
                                 self._sums_back(K.S_KP, K.N_STATS))

    def _gpu_exchanges(self) -> Iterator[tuple[Any, str]]:
        from .cuda import _kernels as CK

        run = self._gpu
        run.step(CK.SHARD_STATS)
        yield self._hand_out(run.exchanged("max"), "max", self._gpu_back("max", rescale=True))
        self._take_back()
        yield self._hand_out(run.exchanged("sum"), "sum", self._gpu_back("sum"))
        if self._call.variant.two_pass:
            self._take_back()
            run.step(CK.SHARD_DIV2)
            yield self._hand_out(run.exchanged("mix"), "sum", self._gpu_back("mix"))

    def _gpu_back(self, name: str, rescale: bool = False) -> Any:
        def back(combined: Any) -> None:
            self._gpu.take_back(name, combined)
            if rescale:
                self._gpu.rescale()
        return back

    def _hand_out(self, buf: np.ndarray, op: str, back: Any) -> tuple[np.ndarray, str]:
        self._pending = (buf, back)
        self._next += 1
        return buf, op

    def _rescale(self, combined: np.ndarray) -> None:
        _K().rescale_shard_sums(self._stats, combined, self._call.terms.tau)

    def _sums_back(self, k0: int, k1: int) -> Any:
        def back(combined: np.ndarray) -> None:
            self._stats[:, k0:k1] = combined
        return back

    def _take_back(self) -> None:
        """The combined values of the round handed out last."""
        if self._pending is not None:
            buf, back = self._pending
            self._pending = None
            back(buf)

    def result(self) -> tuple[Any, Any]:
        """``(loss, grad of this shard's columns)``, once every round has been combined."""
        if self._result is None:
            if self._next < self.rounds:
                raise InvalidParameterError(
                    f"VocabShard.result() needs all {self.rounds} exchanges combined first ({self._next} taken)"
                )
            self._take_back()
            c = self._call

            def reduce(rows: np.ndarray) -> Any:
                return _dispatch.reduce_rows(rows, c.reduction, self._scale, c.shape, c.variant.dtype)

            if self._gpu is not None:
                from .cuda import _kernels as CK

                self._gpu.step(CK.SHARD_FINISH)
                self._result = self._gpu.result(reduce)
            else:
                self._run(_K().SHARD_FINISH)
                grad = _dispatch.caller_grad(c, self._grad, self._student, self._grad_out) if c.want_grad else None
                self._result = (reduce(self._out), grad)
        return self._result


def _K():  # type: ignore[no-untyped-def]
    from .cpu import _kernels

    return _kernels


__all__ = ["VocabShard"]

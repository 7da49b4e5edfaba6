"""``ResponseDistiller`` (hard labels + soft targets) and ``FeatureDistiller`` (weighted layer losses)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import _arrays as A
from . import _dispatch
from . import _validate as V
from ._spec import Terms
from .errors import DimensionMismatchError, EmptyInputError, InvalidParameterError
from .losses import DistilLoss


class ResponseDistiller:
    """Response-based distillation: per row ``hard_label_weight * CE(student, label)
    + soft_label_weight * soft_loss(student, teacher)``, CE at temperature 1 (PyTorch's formula, with
    optional ``label_smoothing``). Rows whose label is ``ignore_index`` count nowhere.

    ``vocab_mismatch="truncate"`` computes on the first ``min(student classes, teacher classes)`` classes
    of both when their widths differ (embedding tables padded to other sizes): labels must lie below that
    width, and the student's other classes get a zero gradient. The default ``"error"`` raises
    :class:`~fastdistill.TeacherStudentMismatchError`.
    """

    def __init__(self, soft_loss: DistilLoss, hard_label_weight: float, soft_label_weight: float, *,
                 ignore_index: int = -100, label_smoothing: float = 0.0, vocab_mismatch: str = "error") -> None:
        if not isinstance(soft_loss, DistilLoss):
            raise TypeError(f"soft_loss must be a DistilLoss, got {type(soft_loss).__name__}")
        self.soft_loss = soft_loss
        self.hard_label_weight = V.finite(hard_label_weight, "hard_label_weight")
        self.soft_label_weight = V.finite(soft_label_weight, "soft_label_weight")
        self.ignore_index = V.integer(ignore_index, "ignore_index")
        self.label_smoothing = V.label_smoothing(label_smoothing)
        self.vocab_mismatch = V.vocab_mismatch(vocab_mismatch)

    @classmethod
    def pure_kl(cls, temperature: float) -> ResponseDistiller:
        """Pure distillation (no hard labels): KL divergence at ``temperature``."""
        return cls(DistilLoss.kl_divergence(temperature), 0.0, 1.0)

    @classmethod
    def balanced(cls) -> ResponseDistiller:
        """``0.5 * CE + 0.5 * KL(T=4)``."""
        return cls(DistilLoss.kl_divergence(4.0), 0.5, 0.5)

    def __repr__(self) -> str:
        return (f"ResponseDistiller({self.soft_loss!r}, hard_label_weight={self.hard_label_weight}, "
                f"soft_label_weight={self.soft_label_weight}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}"
                + (f", vocab_mismatch={self.vocab_mismatch!r})" if self.vocab_mismatch != "error" else ")"))

    def terms(self) -> Terms:
        """This distiller as kernel terms."""
        return self.soft_loss.terms(
            self.soft_label_weight, hard_w=self.hard_label_weight, smoothing=self.label_smoothing
        )

    def _run(self, student: Any, teacher: Any, labels: Any, **kw: Any) -> tuple[Any, Any]:
        return _dispatch.response(student, teacher, labels, self.terms, ignore_index=self.ignore_index,
                                  needs_labels=self.hard_label_weight != 0.0, vocab_mismatch=self.vocab_mismatch,
                                  **kw)

    def loss(self, student: Any, teacher: Any, labels: Any = None, *, reduction: str = "mean",
             num_items: Any = None, backend: str = "auto") -> Any:
        """The distillation loss of a batch (float, or per-row array for ``reduction='none'``)."""
        return self._run(student, teacher, labels, reduction=reduction, num_items=num_items, backend=backend)[0]

    def loss_and_grad(self, student: Any, teacher: Any, labels: Any = None, *, reduction: str = "mean",
                      grad_out: Any = None, num_items: Any = None, backend: str = "auto") -> tuple[Any, Any]:
        """``(loss, d loss / d student)`` in one fused pass. For ``reduction='none'`` each gradient row is
        that row's own loss gradient (the gradient of the sum)."""
        return self._run(student, teacher, labels, reduction=reduction, num_items=num_items,
                         want_grad=True, grad_out=grad_out, backend=backend)

    def vocab_shard(self, student: Any, teacher: Any, labels: Any = None, *, class_offset: int, classes: int,
                    reduction: str = "mean", num_items: Any = None, want_grad: bool = True,
                    grad_out: Any = None, backend: str = "auto") -> Any:
        """This loss on one shard of a vocabulary split across processes: ``student``/``teacher`` are
        the columns ``[class_offset, class_offset + width)`` of rows of ``classes`` classes, ``labels``
        global class ids. Returns a :class:`~fastdistill.sharded.VocabShard`: combine its
        ``exchanges()`` across the shards (max or sum, in place), then ``result()`` is ``(loss, grad of
        this shard)``, equal to the unsharded loss and the shard's columns of its gradient. ``backend``
        as in :meth:`loss_and_grad` (on a GPU the rounds' buffers are device arrays)."""
        from .sharded import VocabShard

        return VocabShard(self, student, teacher, labels, class_offset=class_offset, classes=classes,
                          reduction=reduction, num_items=num_items, want_grad=want_grad, grad_out=grad_out,
                          backend=backend)

    def compute_loss(self, student: Any, teacher: Any, hard_label: Any) -> float:
        """The loss of one 1-D row; ``hard_label`` may be None only when ``hard_label_weight == 0``."""
        s_shape, _ = A.shape_dtype(student)
        if len(s_shape) > 1:
            raise DimensionMismatchError(
                expected=1, got=len(s_shape),
                message=f"compute_loss takes one 1-D row, got student shape {s_shape}; use loss() for batches",
            )
        labels = None if hard_label is None else np.asarray([hard_label])
        if labels is not None and labels.dtype.kind not in "iu":
            raise TypeError(f"hard_label must be an integer, got {hard_label!r}")
        return float(self.loss(student, teacher, labels))

    def compute_batch_loss(self, student: Any, teacher: Any, hard_labels: Any, n_classes: int | None = None) -> float:
        """Mean loss over the counted rows; flat 1-D inputs need ``n_classes`` (as in the seed)."""
        if n_classes is not None:
            n_classes = V.integer(n_classes, "n_classes")
            s_shape, _ = A.shape_dtype(student)
            if len(s_shape) == 1:
                student, teacher = self._unflatten(student, teacher, hard_labels, n_classes)
            elif s_shape[-1] != n_classes:
                raise DimensionMismatchError(
                    expected=n_classes, got=s_shape[-1],
                    message=f"n_classes is {n_classes} but student rows have {s_shape[-1]} classes",
                )
        return float(self.loss(student, teacher, hard_labels, reduction="mean"))

    @staticmethod
    def _unflatten(student: Any, teacher: Any, hard_labels: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        s = A.host_array(student, "student")
        t = A.host_array(teacher, "teacher")
        if hard_labels is None:
            rows = s.size // n_classes if n_classes > 0 else 0
        else:
            rows = int(np.size(A.host_array(hard_labels, "hard_labels")))
        if rows == 0 or n_classes <= 0 or s.size == 0:
            raise EmptyInputError(
                f"compute_batch_loss got an empty batch: {rows} rows of {n_classes} classes, "
                f"{s.size} student logits"
            )
        expected = rows * n_classes
        for arr, name in ((s, "student"), (t, "teacher")):
            if arr.size != expected:
                raise DimensionMismatchError(
                    expected=expected, got=int(arr.size),
                    message=f"{name} has {arr.size} logits, expected rows*n_classes = {rows}*{n_classes} = {expected}",
                )
        return s.reshape(rows, n_classes), t.reshape(rows, n_classes)


class FeatureDistiller:
    """Feature distillation: a weighted **sum** over layers of per-layer losses (each the mean over rows)."""

    def __init__(self, layers: Sequence[tuple[float, DistilLoss]]) -> None:
        checked = []
        for i, layer in enumerate(layers):
            try:
                w, loss = layer
            except (TypeError, ValueError) as exc:
                raise TypeError(f"layers[{i}] must be a (weight, DistilLoss) pair, got {layer!r}") from exc
            if not isinstance(loss, DistilLoss):
                raise TypeError(f"layers[{i}] loss must be a DistilLoss, got {type(loss).__name__}")
            checked.append((V.finite(w, f"layers[{i}] weight"), loss))
        self.layers: list[tuple[float, DistilLoss]] = checked

    @classmethod
    def uniform_mse(cls, n_layers: int) -> FeatureDistiller:
        """``n_layers`` MSE layers of weight ``1 / n_layers``."""
        n = V.integer(n_layers, "n_layers")
        if n < 1:
            raise InvalidParameterError(f"n_layers must be >= 1, got {n}")
        return cls([(1.0 / n, DistilLoss.mse()) for _ in range(n)])

    @classmethod
    def with_weights(cls, weights: Sequence[float], loss: DistilLoss) -> FeatureDistiller:
        """One layer per weight, all with the same ``loss``."""
        return cls([(w, loss) for w in weights])

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"FeatureDistiller({self.layers!r})"

    def _layer(self, index: int) -> tuple[float, DistilLoss]:
        i = V.integer(index, "index")
        if not 0 <= i < self.n_layers:
            raise DimensionMismatchError(
                expected=self.n_layers, got=i + 1,
                message=f"layer index {i} is out of range for {self.n_layers} layers",
            )
        return self.layers[i]

    def _check_count(self, student_feats: Sequence[Any], teacher_feats: Sequence[Any]) -> None:
        for feats, name in ((student_feats, "student_feats"), (teacher_feats, "teacher_feats")):
            if len(feats) != self.n_layers:
                raise DimensionMismatchError(
                    expected=self.n_layers, got=len(feats),
                    message=f"{name} has {len(feats)} layers, the distiller has {self.n_layers}",
                )

    def compute_layer_loss(self, index: int, student_feat: Any, teacher_feat: Any) -> float:
        """The weighted loss of layer ``index``."""
        w, loss = self._layer(index)
        return w * float(loss.compute(student_feat, teacher_feat, reduction="mean"))

    def compute_total_loss(self, student_feats: Sequence[Any], teacher_feats: Sequence[Any]) -> float:
        """The weighted sum over layers."""
        self._check_count(student_feats, teacher_feats)
        return float(sum(self.compute_layer_loss(i, s, t) for i, (s, t) in enumerate(zip(student_feats, teacher_feats))))

    def total_loss_and_grads(self, student_feats: Sequence[Any], teacher_feats: Sequence[Any]) -> tuple[float, list[Any]]:
        """``(total loss, [d total / d student_feats[i] for each layer])``."""
        self._check_count(student_feats, teacher_feats)
        total = 0.0
        grads = []
        for (w, loss), s, t in zip(self.layers, student_feats, teacher_feats):
            terms = loss.terms(w)
            value, g = _dispatch.response(s, t, None, terms, reduction="mean", want_grad=True)
            total += float(value)
            grads.append(g)
        return total, grads

    def normalise_weights(self) -> FeatureDistiller:
        """Divide the weights in place by the sum of their absolute values; returns ``self``."""
        norm = sum(abs(w) for w, _ in self.layers)
        if norm == 0.0:
            raise InvalidParameterError("cannot normalise weights that are all zero")
        self.layers[:] = [(w / norm, loss) for w, loss in self.layers]
        return self

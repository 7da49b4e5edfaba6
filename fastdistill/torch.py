"""PyTorch integration: distillation losses as autograd-aware modules and functions.

``import fastdistill`` never imports PyTorch; importing ``fastdistill.torch`` does.

Every loss here runs one ``torch.library`` custom op, ``torch.ops.fastdistill.response`` (a fake
implementation for tracing, a registered autograd formula), so ``torch.compile(..., fullgraph=True)``
compiles through it. The loss **and** its gradient are computed together in forward by the fused
kernels (:meth:`fastdistill.ResponseDistiller.loss_and_grad`), and only the gradient is saved for
backward, which scales it by the upstream gradient without a host synchronisation. Nothing else of size
``rows x classes`` is kept (PyTorch's own composition keeps the log-softmaxes of student and teacher
and more).

* CPU tensors are handed to the CPU kernels as zero-copy NumPy views; CUDA tensors go to the CUDA
  backend (needs ``numba-cuda``), which returns tensors on the same device.
* float32, float64, float16 and bfloat16 are read natively, without a copy (16-bit tensors as their
  bits, converted in the kernels' registers). The loss of a 16-bit student comes back as float32 and the
  gradient in the student's dtype: bfloat16's written directly, float16's kept in float32 until backward
  (so an upstream gradient such as a ``GradScaler`` scale is applied before the one rounding to float16).
* Non-contiguous tensors are copied once to a contiguous buffer. Labels may be any integer tensor
  (converted to int64 once when they are not already).
* Any leading dims ``(B, T, V)`` are rows; labels then have shape ``(B, T)`` (or ``(B*T,)``).
* The teacher is a constant: it never receives a gradient (run it under ``torch.no_grad()``).
* The loss can be differentiated once (no double backward).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

try:
    import torch
except ImportError as _exc:  # pragma: no cover - exercised only without PyTorch
    raise ImportError(
        "fastdistill.torch needs PyTorch (pip install 'fastdistill[torch]')"
    ) from _exc

from . import _arrays as A
from . import _validate as V
from ._torch_linear import FusedLinearDistillationLoss
from ._torch_ops import (  # noqa: F401  (make_soft_loss, CALL_FIELDS, _describe, _decode: this module's names too)
    CALL_FIELDS,
    _F,
    _FLOATS,
    Resolved,
    _as_backend_input,
    _check_tensor,
    _decode,
    _decode_call,
    _describe,
    _grad_dtype,
    _labels,
    _loss_dtype,
    _num_items_args,
    _num_items_value,
    _prepare,
    _reduction_of,
    _same_device,
    _to_tensor,
    make_soft_loss,
    resolved,
)
from .distillers import ResponseDistiller
from .errors import InvalidParameterError
from .losses import SOFT_LOSSES, DistilLoss

__all__ = ["DistillationLoss", "FusedLinearDistillationLoss", "response_loss", "kl_divergence", "feature_loss",
           "generalized_jsd_loss", "SOFT_LOSSES"]


# ------------------------------------------------------------------ tensor plumbing (the rest: _torch_ops)


def _checked_pair(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    """The loss dtype of a student/teacher pair, after their device and dtype checks."""
    _same_device(teacher, "teacher", student.device)
    cdtype = _loss_dtype(student.dtype)
    if teacher.dtype not in _FLOATS:
        raise TypeError(f"teacher must be a float32, float64, float16 or bfloat16 tensor, got dtype {teacher.dtype}")
    return cdtype


def _run(res: Resolved, student: torch.Tensor, teacher: torch.Tensor, labels: Any,
         reduction: str, num_items: Any, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss tensor and (if asked) the gradient (in the student's dtype), on the student's device."""
    device = student.device
    cdtype = _checked_pair(student, teacher)
    gdtype = _grad_dtype(student.dtype)
    width = student.shape[-1]
    if device.type != "cpu" and res.distiller.vocab_mismatch == "truncate" and teacher.shape[-1] != width:
        # the CUDA kernels read rows of one width: the first n classes of the wider one, copied
        n = min(width, teacher.shape[-1])
        student, teacher = student[..., :n], teacher[..., :n]
    s = _prepare(student)
    t = _prepare(teacher)
    lab = None if labels is None else _as_backend_input(_labels(labels, device))
    args = (_as_backend_input(s), _as_backend_input(t), lab)
    kw: dict = dict(reduction=reduction, num_items=num_items, want_grad=want_grad)
    if not want_grad:
        return _to_tensor(res.run(*args, **kw)[0], cdtype, device), None
    if gdtype != student.dtype:
        kw["grad_out"] = _as_backend_input(torch.empty(s.shape, dtype=gdtype, device=device))
    loss, grad = res.run(*args, **kw)
    grad = _to_tensor(grad, gdtype, device)
    if grad.shape[-1] != width:  # student classes the truncated loss does not see
        grad = torch.nn.functional.pad(grad, (0, width - grad.shape[-1]))
    return _to_tensor(loss, cdtype, device), grad


def _run_vocab_parallel(distiller: ResponseDistiller, student: torch.Tensor, teacher: torch.Tensor, labels: Any,
                        reduction: str, num_items: Any, want_grad: bool,
                        group_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_run` for a vocabulary split over the ranks of a process group: this rank's tensors are
    its contiguous shard of the classes (rank order), labels global ids. The shards' row statistics are
    combined with ``all_reduce`` (a few float64 numbers per row and round, :mod:`fastdistill.sharded`);
    the loss is the whole rows', the gradient this shard's."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    cdtype = _checked_pair(student, teacher)
    dev = student.device
    s = _prepare(student)
    t = _prepare(teacher)
    # (on the logits' device: NCCL groups communicate CUDA tensors, gloo CPU ones)
    width = torch.tensor([s.shape[-1]], dtype=torch.int64, device=dev)
    widths = [torch.zeros_like(width) for _ in range(dist.get_world_size(group))]
    dist.all_gather(widths, width, group=group)
    widths_h = [int(w) for w in torch.cat(widths).cpu()]
    rank = dist.get_rank(group)
    offset = sum(widths_h[:rank])
    classes = sum(widths_h)
    lab = None if labels is None else _as_backend_input(_labels(labels, dev))
    gdtype = _grad_dtype(student.dtype)
    g_out = (_as_backend_input(torch.empty(s.shape, dtype=gdtype, device=dev)) if (want_grad and gdtype != s.dtype)
             else None)
    shard = distiller.vocab_shard(_as_backend_input(s), _as_backend_input(t), lab, class_offset=offset, classes=classes,
                                  reduction=reduction, num_items=num_items, want_grad=want_grad, grad_out=g_out)
    for buf, op in shard.exchanges():  # CPU: NumPy buffers; CUDA: tensors on the logits' device and stream
        dist.all_reduce(buf if isinstance(buf, torch.Tensor) else torch.from_numpy(buf),
                        op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    loss, grad = shard.result()
    return _to_tensor(loss, cdtype, student.device), (None if grad is None else _to_tensor(grad, gdtype,
                                                                                          student.device))


# ------------------------------------------------------------------ the custom op
#
# ``fastdistill::response`` is the one operation behind every loss of this module: a ``torch.library``
# custom op (opaque to torch.compile, with a fake implementation for tracing and a registered autograd
# formula). The call is described by one list of numbers (``_torch_ops.CALL_FIELDS``).

_OP = "fastdistill::response"


def _response_impl(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor], call: list[float],
                   num_items: Optional[torch.Tensor], group: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (0-dim, or per row for ``reduction="none"``; float32 for half-precision students) and,
    when the call wants it, its gradient with respect to ``student`` (else an empty tensor), in the
    student's dtype (float32 for float16 students, see :func:`_grad_dtype`). ``num_items``, when given, is the divisor of "mean" (read here, in forward).
    ``group``: the name of a ``torch.distributed`` process group whose ranks hold the vocabulary's
    shards (``""``: none)."""
    res, reduction, n_items, want_grad = _decode_call(call)
    return _respond(res, reduction, n_items, want_grad, student, teacher, labels, num_items, group)


def _respond(res: Resolved, reduction: str, n_items: float | None, want_grad: bool, student: torch.Tensor,
             teacher: torch.Tensor, labels: Optional[torch.Tensor], num_items: Optional[torch.Tensor],
             group: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_response_impl` of a decoded call (the eager path's, which never encodes it)."""
    if num_items is not None:
        n_items = _num_items_value(num_items)
    if group:
        loss, grad = _run_vocab_parallel(res.distiller, student, teacher, labels, reduction, n_items, want_grad,
                                         group)
    else:
        loss, grad = _run(res, student, teacher, labels, reduction, n_items, want_grad)
    if grad is None:
        grad = torch.empty(0, dtype=_grad_dtype(student.dtype), device=loss.device)
    return loss, grad


_response_op = torch.library.custom_op(_OP, _response_impl, mutates_args=())


@_response_op.register_fake
def _response_fake(student, teacher, labels, call, num_items, group):  # type: ignore[no-untyped-def]
    per_row = _reduction_of(call) == "none"
    loss = student.new_empty(student.shape[:-1] if per_row else (), dtype=_loss_dtype(student.dtype))
    grad = student.new_empty(student.shape if call[_F["want_grad"]] else (0,), dtype=_grad_dtype(student.dtype))
    return loss, grad


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor],
                   call_at: int = 3) -> None:
    """What backward needs of an op whose inputs are ``(student, ..., call at call_at, ...)``."""
    call = inputs[call_at]
    _save(ctx, call[_F["want_grad"]] != 0.0, _reduction_of(call), inputs, output)


def _save(ctx: Any, want_grad: bool, reduction: str, inputs: tuple[Any, ...],
          output: tuple[torch.Tensor, torch.Tensor]) -> None:
    """What backward needs: whether the call made a gradient, one upstream value per row or one in
    all, the student's dtype (``inputs[0]``), how many inputs get a gradient (None but the first), and
    the gradient itself."""
    ctx.want_grad = want_grad
    ctx.per_row = reduction == "none"
    ctx.student_dtype = inputs[0].dtype
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(output[1])


def _eager(x: torch.Tensor) -> bool:
    """Whether ``x`` is a plain tensor of an eager backward (not one being traced by torch.compile or a
    functorch transform)."""
    return type(x) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(x)


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``): its saved tensors are then
    used again. True when PyTorch cannot say."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else bool(keep_graph())


def _backward(ctx: Any, grad_loss: torch.Tensor, _grad_of_grad: Any) -> tuple[Any, ...]:
    """The saved gradient times the upstream one, in the student's dtype; no host synchronisation.

    Eager, when the graph is freed after this backward (the usual ``loss.backward()``): on the CPU an
    upstream of exactly 1 hands the saved buffer over as is (a CPU scalar read on the host is no device
    synchronisation), otherwise it is scaled in place. A kept graph (``retain_graph=True``) uses the
    buffer again, so each pass makes a new product. Traced by torch.compile: a product the compiler can
    fuse. The result has no second derivative (as ``once_differentiable``).
    """
    if not ctx.want_grad:
        raise RuntimeError(f"{_OP} was called with want_grad=False: its loss has no gradient")
    (grad,) = ctx.saved_tensors
    go = grad_loss.to(grad.dtype)
    if ctx.per_row:
        go = go.unsqueeze(-1)  # one upstream value per row, broadcast over the classes
    if not (_eager(grad) and _eager(go)):
        out = grad * go
    else:
        with torch.no_grad():
            if _graph_kept():
                out = grad * go
            elif not ctx.per_row and grad.device.type == "cpu" and go.item() == 1.0:
                out = grad
            else:
                out = grad.mul_(go)
        if torch.is_grad_enabled() and go.requires_grad:  # create_graph=True
            out = _once_differentiable(out)
    if out.dtype != ctx.student_dtype:
        out = out.to(ctx.student_dtype)
    return (out,) + (None,) * (ctx.n_inputs - 1)


def _once_differentiable(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a gradient function that raises if differentiated (what ``once_differentiable`` does)."""
    delayed = getattr(getattr(torch._C, "_functions", None), "DelayedError", None)
    message = "fastdistill losses can be differentiated once (no double backward)"
    if delayed is None:
        raise RuntimeError(message)
    return delayed(message, 1)(x)


_response_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerResponse(torch.autograd.Function):
    """The op's eager path for plain tensors: the op's implementation and autograd formula, without the
    dispatcher's custom-op layers (they cost ~20 us per forward and ~50 us per forward + backward on
    64x1000 CPU tensors, as much as the kernels; ``bench/torch_op_overhead.py``). It takes the distiller
    resolved once (``_torch_ops.resolved``) and the call's options as they are, never the op's list of
    numbers: a graph needs that list as constants, an eager call would only encode and decode it."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, labels: Any, res: Resolved,  # type: ignore[override]
                reduction: str, n_items: Any, num_items: Any, group: str) -> torch.Tensor:
        inputs = (student, teacher, labels, res, reduction, n_items, num_items, group)
        output = _respond(res, reduction, n_items, True, student, teacher, labels, num_items, group)
        _save(ctx, True, reduction, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return _backward(ctx, grad_loss, None)


def _plain_eager(*tensors: Any) -> bool:
    """Whether a call may take the eager path: not traced (torch.compile, export), no dispatch mode
    active (fake tensors, profilers of the dispatcher), plain tensors."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and all(x is None or _eager(x) for x in tensors))



# ------------------------------------------------------------------ sparse (top-k) teachers
#
# ``fastdistill::sparse_response``: the same call description, the teacher as its ids and values, and
# ``sparse = [kind, tail]`` (indices of ``sparse.VALUE_KINDS`` and ``sparse.TAILS``). CPU and CUDA tensors.

_SPARSE_OP = "fastdistill::sparse_response"


def _sparse_impl(student: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, labels: Optional[torch.Tensor],
                 call: list[float], num_items: Optional[torch.Tensor], sparse: list[int]) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """:func:`_response_impl` for a sparse teacher (``indices``, ``values``: its ``(..., k)`` tensors)."""
    from .sparse import from_codes

    res, reduction, n_items, want_grad = _decode_call(call)
    if num_items is not None:
        n_items = _num_items_value(num_items)
    device = student.device
    for x, name in ((indices, "indices"), (values, "values")):
        _same_device(x, f"the SparseTeacher's {name}", device)
    cdtype = _loss_dtype(student.dtype)
    gdtype = _grad_dtype(student.dtype)
    s = _prepare(student)
    teacher = from_codes(_as_backend_input(_prepare(indices)), _as_backend_input(_prepare(values)), sparse)
    lab = None if labels is None else _as_backend_input(_labels(labels, device))
    kw: dict = dict(reduction=reduction, num_items=n_items, want_grad=want_grad)
    if not want_grad:
        loss = res.run(_as_backend_input(s), teacher, lab, **kw)[0]
        return _to_tensor(loss, cdtype, device), torch.empty(0, dtype=gdtype, device=device)
    if gdtype != student.dtype:
        kw["grad_out"] = _as_backend_input(torch.empty(s.shape, dtype=gdtype, device=device))
    loss, grad = res.run(_as_backend_input(s), teacher, lab, **kw)
    return _to_tensor(loss, cdtype, device), _to_tensor(grad, gdtype, device)


_sparse_op = torch.library.custom_op(_SPARSE_OP, _sparse_impl, mutates_args=())


@_sparse_op.register_fake
def _sparse_fake(student, indices, values, labels, call, num_items, sparse):  # type: ignore[no-untyped-def]
    per_row = _reduction_of(call) == "none"
    loss = student.new_empty(student.shape[:-1] if per_row else (), dtype=_loss_dtype(student.dtype))
    grad = student.new_empty(student.shape if call[_F["want_grad"]] else (0,), dtype=_grad_dtype(student.dtype))
    return loss, grad


_sparse_op.register_autograd(_backward, setup_context=lambda ctx, inputs, output: _setup_context(
    ctx, inputs, output, call_at=4))


def _sparse_response(distiller: ResponseDistiller, student: torch.Tensor, teacher: Any, labels: Any, reduction: str,
                     num_items: Any) -> torch.Tensor:
    from .sparse import codes

    idx = A.tensor_of(teacher.indices)
    vals = A.tensor_of(teacher.values)
    lab = None if labels is None else _labels(labels, student.device)
    n_items, n_items_tensor = _num_items_args(num_items, reduction)
    want_grad = torch.is_grad_enabled() and student.requires_grad
    call = _describe(distiller, reduction, n_items, want_grad)
    loss, _ = torch.ops.fastdistill.sparse_response(student, idx.detach(), vals.detach(), lab, call, n_items_tensor,
                                                    codes(teacher))
    return loss


def _response(distiller: ResponseDistiller, student: Any, teacher: Any, labels: Any, reduction: str,
              num_items: Any, group_name: str = "") -> torch.Tensor:
    student = _check_tensor(student, "student")
    if type(teacher).__name__ == "SparseTeacher":
        if group_name:
            raise NotImplementedError("vocab_parallel_group with a SparseTeacher is not supported")
        return _sparse_response(distiller, student, teacher, labels, V.reduction(reduction), num_items)
    teacher = _check_tensor(teacher, "teacher")
    reduction = V.reduction(reduction)
    for x, name in ((student, "student"), (teacher, "teacher")):
        if x.device.type not in ("cpu", "cuda"):
            raise TypeError(f"{name} is a tensor on device '{x.device}'; fastdistill computes on CPU and CUDA tensors")
    lab = None if labels is None else _labels(labels, student.device)
    n_items, n_items_tensor = _num_items_args(num_items, reduction)
    want_grad = torch.is_grad_enabled() and student.requires_grad
    if _plain_eager(student, teacher, lab, n_items_tensor):
        # the distiller resolved once per object, not described as numbers and decoded on every call
        res = resolved(distiller)
        if want_grad:
            return _EagerResponse.apply(student, teacher, lab, res, reduction, n_items, n_items_tensor, group_name)
        return _respond(res, reduction, n_items, False, student, teacher, lab, n_items_tensor, group_name)[0]
    call = _describe(distiller, reduction, n_items, want_grad)
    loss, _ = torch.ops.fastdistill.response(student, teacher, lab, call, n_items_tensor, group_name)
    return loss


# ------------------------------------------------------------------ public API


class DistillationLoss(torch.nn.Module):
    """Knowledge-distillation loss of student logits against teacher logits (and hard labels).

    Per row: ``hard_label_weight * CE(student, label) + soft_label_weight * soft(student, teacher)``,
    CE at temperature 1 (PyTorch's ``F.cross_entropy``, with ``label_smoothing``), ``soft`` one of
    :data:`SOFT_LOSSES` at ``temperature`` (KL-type losses are scaled by ``temperature**2`` unless
    ``t2_scale=False``) or any :class:`~fastdistill.DistilLoss`. Rows whose label is ``ignore_index`` count nowhere; ``"mean"``
    divides by the counted rows (or by ``num_items`` when given, e.g. tokens of a whole accumulation
    step). ``beta`` is the JSD mixture weight (default 0.5), ``alpha`` the skew of the skew KLs
    (default 0.1); ``temperature`` defaults to 1.0. With a ``DistilLoss`` as ``soft_loss`` these come
    from it (passing a different value raises ``InvalidParameterError``). ``vocab_mismatch="truncate"``
    computes on the first ``min`` of the student's and the teacher's classes when their widths differ.
    ``vocab_parallel_group``: a ``torch.distributed`` process group whose ranks each hold a contiguous
    shard of the classes (rank order, widths may differ) of the same rows, labels as global class ids;
    the loss and each shard's gradient equal the unsharded ones, with a few float64 numbers per row
    exchanged (CPU tensors, gloo).

    The parameters are attributes and may be changed between steps (e.g. a temperature schedule).

    Example::

        criterion = DistillationLoss(temperature=4.0, hard_label_weight=0.5, soft_label_weight=0.5)
        loss = criterion(student(x), teacher_logits, y)
        loss.backward()
    """

    def __init__(self, temperature: float | None = None, hard_label_weight: float = 0.5,
                 soft_label_weight: float = 0.5, soft_loss: str | DistilLoss = "kl_divergence", *,
                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 beta: float | None = None, alpha: float | None = None, t2_scale: bool | None = None,
                 vocab_mismatch: str = "error", vocab_parallel_group: Any = None,
                 data_parallel_group: Any = None) -> None:
        super().__init__()
        self.vocab_parallel_group = vocab_parallel_group
        self.data_parallel_group = data_parallel_group
        self._cfg: dict[str, Any] = {}
        self._distiller: ResponseDistiller | None = None
        self._set(soft_loss=soft_loss, temperature=temperature, beta=beta, alpha=alpha, t2_scale=t2_scale,
                  hard_label_weight=hard_label_weight, soft_label_weight=soft_label_weight,
                  ignore_index=ignore_index, label_smoothing=label_smoothing, vocab_mismatch=vocab_mismatch)
        self.reduction = reduction

    def _set(self, **changes: Any) -> None:
        cfg = {**self._cfg, **changes}
        soft = make_soft_loss(cfg["soft_loss"], cfg["temperature"], cfg["beta"], cfg["alpha"], cfg["t2_scale"])
        distiller = ResponseDistiller(
            soft, cfg["hard_label_weight"], cfg["soft_label_weight"],
            ignore_index=cfg["ignore_index"], label_smoothing=cfg["label_smoothing"],
            vocab_mismatch=cfg["vocab_mismatch"],
        )
        # a DistilLoss carries its own parameters; later changes go through a kind name or the loss
        if isinstance(cfg["soft_loss"], DistilLoss):
            cfg["soft_loss"] = soft
            cfg.update(temperature=None, beta=None, alpha=None, t2_scale=None)
        self._cfg = cfg
        self._distiller = distiller

    # the loss parameters: setting one rebuilds (and re-validates) the loss
    @property
    def distiller(self) -> ResponseDistiller:
        """The :class:`~fastdistill.ResponseDistiller` this module evaluates."""
        assert self._distiller is not None
        return self._distiller

    @property
    def soft_loss(self) -> DistilLoss:
        return self.distiller.soft_loss

    @soft_loss.setter
    def soft_loss(self, value: str | DistilLoss) -> None:
        self._set(soft_loss=value)

    @property
    def temperature(self) -> float:
        return self.distiller.soft_loss.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._set_soft_param("temperature", value)

    @property
    def beta(self) -> float:
        return self.distiller.soft_loss.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._set_soft_param("beta", value)

    @property
    def alpha(self) -> float:
        return self.distiller.soft_loss.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._set_soft_param("alpha", value)

    def _set_soft_param(self, name: str, value: float) -> None:
        soft = self._cfg["soft_loss"]
        if isinstance(soft, DistilLoss):
            self._set(soft_loss=dataclasses.replace(soft, **{name: value}))
        else:
            self._set(**{name: value})

    @property
    def vocab_parallel_group(self) -> Any:
        """The ``torch.distributed`` process group over whose ranks the classes are split, or None."""
        return self._group

    @vocab_parallel_group.setter
    def vocab_parallel_group(self, group: Any) -> None:
        # the group's name is what the op receives (a string a compiled graph can hold)
        self._group_name = "" if group is None else str(group.group_name)
        self._group = group

    @property
    def t2_scale(self) -> bool:
        return self.distiller.soft_loss.t2_scale

    @t2_scale.setter
    def t2_scale(self, value: bool) -> None:
        self._set_soft_param("t2_scale", value)

    @property
    def vocab_mismatch(self) -> str:
        return self.distiller.vocab_mismatch

    @vocab_mismatch.setter
    def vocab_mismatch(self, value: str) -> None:
        self._set(vocab_mismatch=value)

    @property
    def hard_label_weight(self) -> float:
        return self.distiller.hard_label_weight

    @hard_label_weight.setter
    def hard_label_weight(self, value: float) -> None:
        self._set(hard_label_weight=value)

    @property
    def soft_label_weight(self) -> float:
        return self.distiller.soft_label_weight

    @soft_label_weight.setter
    def soft_label_weight(self, value: float) -> None:
        self._set(soft_label_weight=value)

    @property
    def ignore_index(self) -> int:
        return self.distiller.ignore_index

    @ignore_index.setter
    def ignore_index(self, value: int) -> None:
        self._set(ignore_index=value)

    @property
    def label_smoothing(self) -> float:
        return self.distiller.label_smoothing

    @label_smoothing.setter
    def label_smoothing(self, value: float) -> None:
        self._set(label_smoothing=value)

    @property
    def reduction(self) -> str:
        return self._reduction

    @reduction.setter
    def reduction(self, value: str) -> None:
        self._reduction = V.reduction(value)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor | None = None, num_items: Any = None) -> torch.Tensor:
        """The loss: a 0-dim tensor, or one value per row (``student_logits.shape[:-1]``) for
        ``reduction="none"``. Differentiable with respect to ``student_logits`` only.

        ``num_items="global"`` (data parallelism): ``"mean"`` divides by the counted rows of every rank
        of ``data_parallel_group`` (the default process group when it is None), summed with one
        all-reduce of one number. Under ``DistributedDataParallel``, which averages the ranks'
        gradients, multiply the loss by the world size to get the gradient of the global mean."""
        if isinstance(num_items, str):
            num_items = self._global_count(student_logits, labels, num_items)
        return _response(self.distiller, student_logits, teacher_logits, labels, self._reduction, num_items,
                         self._group_name)

    def _global_count(self, student: Any, labels: Any, how: str) -> torch.Tensor:
        """The counted rows of every rank of the data-parallel group (a tensor: read in forward)."""
        import torch.distributed as dist

        if how != "global":
            raise InvalidParameterError(f"num_items must be a number, a tensor or 'global', got {how!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise InvalidParameterError("num_items='global' needs an initialised torch.distributed process group")
        student = _check_tensor(student, "student")
        if labels is None:
            count = torch.tensor(float(student.numel() // max(student.shape[-1], 1)), dtype=torch.float64,
                                 device=student.device)
        else:
            lab = A.tensor_of(labels, student.device)
            count = (lab != self.ignore_index).sum().to(torch.float64)
        dist.all_reduce(count, group=self.data_parallel_group)
        return count.clamp_min(1.0)  # every row ignored everywhere: a loss of 0, as "mean" gives

    def extra_repr(self) -> str:
        d = self.distiller
        return (f"soft_loss={d.soft_loss!r}, hard_label_weight={d.hard_label_weight}, "
                f"soft_label_weight={d.soft_label_weight}, ignore_index={d.ignore_index}, "
                f"reduction={self._reduction!r}, label_smoothing={d.label_smoothing}"
                + (f", vocab_mismatch={d.vocab_mismatch!r}" if d.vocab_mismatch != "error" else ""))


def response_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None, *,
                  temperature: float | None = None, hard_label_weight: float = 0.5,
                  soft_label_weight: float = 0.5, soft_loss: str | DistilLoss = "kl_divergence",
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  num_items: Any = None, beta: float | None = None, alpha: float | None = None,
                  t2_scale: bool | None = None, vocab_mismatch: str = "error") -> torch.Tensor:
    """Functional form of :class:`DistillationLoss` (same parameters, same result)."""
    soft = make_soft_loss(soft_loss, temperature, beta, alpha, t2_scale)
    distiller = ResponseDistiller(soft, hard_label_weight, soft_label_weight, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing, vocab_mismatch=vocab_mismatch)
    return _response(distiller, student, teacher, labels, reduction, num_items)


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, *,
                  reduction: str = "mean", num_items: Any = None, t2_scale: bool = True) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher/T) || softmax(student/T))`` per row, reduced ("mean" is PyTorch's
    ``batchmean``): ``T**2 * F.kl_div(F.log_softmax(s/T, -1), F.log_softmax(t/T, -1),
    log_target=True, reduction="batchmean")`` in one fused pass (no ``T**2`` with ``t2_scale=False``)."""
    distiller = ResponseDistiller(DistilLoss.kl_divergence(temperature, t2_scale=t2_scale), 0.0, 1.0)
    return _response(distiller, student, teacher, None, reduction, num_items)


def feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, *,
                 loss: str | DistilLoss = "mse", reduction: str = "mean", num_items: Any = None) -> torch.Tensor:
    """A feature (hidden-state) loss per row -- ``"mse"`` (mean over features of the squared
    difference) or ``"cosine"`` (``1 - cos``) or any ``DistilLoss`` -- reduced over rows. With
    ``"mse"`` and ``"mean"`` this is ``F.mse_loss(student_feat, teacher_feat)``."""
    distiller = ResponseDistiller(make_soft_loss(loss), 0.0, 1.0)
    return _response(distiller, student_feat, teacher_feat, None, reduction, num_items)


# ------------------------------------------------------------------ drop-ins

_TRL_REDUCTIONS = ("batchmean", "sum", "mean", "none")
_TRL_IGNORE = -100


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         labels: torch.Tensor | None = None, beta: float = 0.5, temperature: float = 1.0,
                         reduction: str = "batchmean", num_items_in_batch: Any = None) -> torch.Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss``, fused: the same value and gradient, so that
    ``GKDTrainer.generalized_jsd_loss = staticmethod(fastdistill.torch.generalized_jsd_loss)`` works.

    Per token, ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q``,
    ``p``/``q`` the teacher's/student's softmax at ``temperature`` (no ``T**2``; ``beta = 0`` is the
    forward KL, ``beta = 1`` the reverse KL). Tokens whose label is -100 are left out. Reductions as in
    TRL: ``num_items_in_batch`` given, the sum divided by it; ``"batchmean"``, the sum over the counted
    tokens' divergences divided by their number (at least 1), or without labels by
    ``student_logits.size(0)`` (the batch of ``(B, T, V)`` logits, the rows of ``(N, V)`` ones, the classes
    of one row); ``"sum"``; ``"mean"``, the mean over every
    counted element (tokens times classes); ``"none"``, TRL's elementwise tensor (its shape, or
    ``(counted tokens, classes)`` with labels), computed with PyTorch operations rather than the fused
    kernels (an elementwise result needs the ``rows x classes`` tensor the kernels avoid).
    """
    if reduction not in _TRL_REDUCTIONS:
        raise InvalidParameterError(f"reduction must be one of {_TRL_REDUCTIONS}, got {reduction!r}")
    soft = DistilLoss.jsd(beta=beta, temperature=temperature, t2_scale=False)
    if reduction == "none" and num_items_in_batch is None:
        return _elementwise_jsd(student_logits, teacher_logits, labels, soft)
    distiller = ResponseDistiller(soft, 0.0, 1.0, ignore_index=_TRL_IGNORE)
    student_logits = _check_tensor(student_logits, "student_logits")
    if num_items_in_batch is not None:
        return _response(distiller, student_logits, teacher_logits, labels, "mean", num_items_in_batch)
    if reduction == "sum":
        return _response(distiller, student_logits, teacher_logits, labels, "sum", None)
    classes = student_logits.shape[-1]
    if labels is None:  # TRL: "batchmean" divides by size(0) (the batch of 3-D logits, the rows of 2-D ones)
        size0 = student_logits.shape[0] if student_logits.dim() else 1  # (a scalar is refused by the loss)
        divisor = max(size0, 1) if reduction == "batchmean" else student_logits.numel()
        return _response(distiller, student_logits, teacher_logits, None, "mean", divisor)
    labels = _check_tensor(labels, "labels")
    counted = (labels != _TRL_IGNORE).sum()
    if reduction == "batchmean":
        return _response(distiller, student_logits, teacher_logits, labels, "mean", counted.clamp_min(1))
    loss = _response(distiller, student_logits, teacher_logits, labels, "mean", counted.clamp_min(1) * classes)
    return torch.where(counted > 0, loss, torch.full_like(loss, float("nan")))  # TRL: the mean of nothing


def _elementwise_jsd(student: Any, teacher: Any, labels: Any, soft: DistilLoss) -> torch.Tensor:
    """TRL's elementwise generalized JSD (``reduction="none"``): computed in float64 (an elementwise term
    is a difference of logarithms, which float32 would leave with an absolute error of ~1e-7 times its
    probability), returned in the loss dtype (float32 for half precision)."""
    student = _check_tensor(student, "student_logits")
    teacher = _check_tensor(teacher, "teacher_logits")
    cdtype = _loss_dtype(student.dtype)
    lq = torch.log_softmax(student.to(torch.float64) / soft.temperature, dim=-1)
    lp = torch.log_softmax(teacher.to(torch.float64) / soft.temperature, dim=-1)
    beta = soft.beta

    def kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:  # a * (log a - log b), 0 where a = 0
        return torch.nn.functional.kl_div(log_b, log_a, reduction="none", log_target=True)

    if beta == 0.0:
        out = kl_terms(lp, lq)
    elif beta == 1.0:
        out = kl_terms(lq, lp)
    else:
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        out = beta * kl_terms(lp, lm) + (1.0 - beta) * kl_terms(lq, lm)
    if labels is not None:
        out = out[_check_tensor(labels, "labels") != _TRL_IGNORE]
    return out.to(cdtype)

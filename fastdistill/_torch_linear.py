"""``fastdistill.torch.FusedLinearDistillationLoss``: the distillation loss from hidden states and the
output projection, chunk by chunk, never materialising more than ``chunk_size`` rows of logits.

Private module (its class is exported by :mod:`fastdistill.torch`; the machinery both share is
:mod:`fastdistill._torch_ops`). The whole fused loss is one ``torch.library`` custom op,
``fastdistill::fused_linear_response``: in forward, per chunk of rows, the
student's logits by a matmul (and the teacher's, when given as hidden states and a weight), the fused
loss-and-gradient kernel on that chunk with the gradient written over the chunk's own logits, then
``grad_input`` of the chunk and the accumulated ``grad_weight``/``grad_bias`` by matmuls. Backward
scales the three by the upstream gradient.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from . import _arrays as A
from . import _validate as V
from .distillers import ResponseDistiller
from ._torch_ops import (
    _as_backend_input,
    _grad_dtype,
    _loss_dtype,
    _check_tensor,
    _decode_call,
    _describe,
    _labels,
    _num_items_args,
    _num_items_value,
    _same_device,
    make_soft_loss,
)

_OP = "fastdistill::fused_linear_response"


def _teacher_arg(t: Any) -> Any:
    """A chunk's teacher as the façade takes it (a SparseTeacher as it is)."""
    return t if type(t).__name__ == "SparseTeacher" else _as_backend_input(t)


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_devices(student_input: Any, student_weight: Any, teacher_input: Any, teacher_weight: Any, labels: Any,
                   student_bias: Any, teacher_bias: Any, sparse: bool) -> None:
    """The fused head's arguments are tensors on ``student_input``'s device: checked in forward, before
    the op is dispatched (an argument on the meta device would send the call to the op's fake
    implementation). ``sparse``: ``teacher_input``/``teacher_weight`` are a SparseTeacher's ids and
    values. Everything else is checked by :func:`_check_fused` when the op runs."""
    t_names = ("the SparseTeacher's indices", "the SparseTeacher's values") if sparse else ("teacher_input",
                                                                                           "teacher_weight")
    tensors = [(student_input, "student_input"), (student_weight, "student_weight"), (teacher_input, t_names[0]),
               (teacher_weight, t_names[1]), (student_bias, "student_bias"), (teacher_bias, "teacher_bias"),
               (labels, "labels")]
    for x, name in tensors:
        if x is not None:
            _check_tensor(x, name)
    for x, name in tensors[1:]:
        if x is not None:
            _same_device(x, name, student_input.device, "student_input is")


def _check_fused(student_input: torch.Tensor, student_weight: torch.Tensor, teacher_input: torch.Tensor,
                 teacher_weight: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                 student_bias: Optional[torch.Tensor], teacher_bias: Optional[torch.Tensor], sparse: bool) -> None:
    """Every shape and dtype check of the fused head's arguments, from their metadata only, before any
    chunk (run by the op, so that a compiled graph raises these errors too): the student's logits
    ``student_input @ student_weight.T (+ student_bias)`` have the shape ``student_input.shape[:-1] +
    (classes,)``; the teacher's (its logits, its hidden states times ``teacher_weight``, or a
    SparseTeacher's ``(..., k)`` ids, here ``teacher_input``) pair row for row, with the same leading
    dims; labels one per row. ``sparse``: ``teacher_input``/``teacher_weight`` are a SparseTeacher's ids
    and values."""
    if student_input.dim() == 0:
        raise V.DimensionMismatchError(expected=1, got=0, message="student_input must have at least one dimension "
                                       "(its hidden size), got a scalar")
    lead = _shape(student_input)[:-1]
    h = student_input.shape[-1]
    if student_weight.dim() != 2 or student_weight.shape[1] != h:
        raise V.DimensionMismatchError(
            expected=h, got=int(student_weight.shape[-1]) if student_weight.dim() else 0,
            message=f"student_weight must be (classes, {h}) for student_input of hidden size {h}, got "
            f"{_shape(student_weight)}",
        )
    classes = student_weight.shape[0]
    logits = lead + (classes,)
    _check_bias(student_bias, "student_bias", classes, f"student_weight {_shape(student_weight)}")
    if sparse:
        i_shape = _shape(teacher_input)
        if i_shape[:-1] != lead:
            raise V.DimensionMismatchError(
                expected=math.prod(lead), got=math.prod(i_shape[:-1]),
                message=f"SparseTeacher shape {i_shape} does not match the student's rows: its leading dims must be "
                f"{lead} (student_input shape {_shape(student_input)})",
            )
    elif teacher_weight is None:
        if teacher_bias is not None:
            raise V.InvalidParameterError(
                "teacher_bias needs teacher_weight: without it teacher_input is the teacher's logits (add the "
                "bias to them)")
        t_shape = _shape(teacher_input)
        if t_shape != logits:
            raise V.TeacherStudentMismatchError(
                teacher=t_shape, student=logits,
                message=f"teacher_input (the teacher's logits) shape {t_shape} differs from the student's logits "
                f"shape {logits} (student_input {_shape(student_input)} times student_weight "
                f"{_shape(student_weight)} transposed): one teacher row per student row {lead}",
            )
    else:
        th = teacher_input.shape[-1] if teacher_input.dim() else 0
        if teacher_weight.dim() != 2 or teacher_weight.shape[1] != th:
            raise V.DimensionMismatchError(
                expected=th, got=int(teacher_weight.shape[-1]) if teacher_weight.dim() else 0,
                message=f"teacher_weight must be (classes, {th}) for teacher_input of hidden size {th}, got "
                f"{_shape(teacher_weight)}",
            )
        t_lead = _shape(teacher_input)[:-1]
        if t_lead != lead:
            raise V.TeacherStudentMismatchError(
                teacher=t_lead, student=lead,
                message=f"teacher_input shape {_shape(teacher_input)} has the rows {t_lead} but student_input shape "
                f"{_shape(student_input)} has the rows {lead}: one teacher row per student row",
            )
        t_classes = teacher_weight.shape[0]
        if t_classes != classes:
            raise V.TeacherStudentMismatchError(
                teacher=t_classes, student=classes,
                message=f"teacher_weight has {t_classes} classes but student_weight has {classes}",
            )
        _check_bias(teacher_bias, "teacher_bias", t_classes, f"teacher_weight {_shape(teacher_weight)}")
    if labels is not None:
        V.check_labels_meta(_shape(labels), A.torch_np_dtype(labels.dtype), logits)


def _check_bias(bias: Optional[torch.Tensor], name: str, classes: int, weight: str) -> None:
    if bias is not None and _shape(bias) != (classes,):
        raise V.DimensionMismatchError(
            expected=classes, got=bias.numel(),
            message=f"{name} must be ({classes},), one value per class of {weight}, got shape {_shape(bias)}",
        )


def _logits(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
            buf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w.T (+ b)``, into the first rows of ``buf`` when given (a chunk buffer reused from chunk to
    chunk: a new chunk-sized tensor each time is fresh memory from the system, whose page faults cost
    more than the matmul's writes)."""
    if (buf is not None and buf.dtype == x.dtype == w.dtype and buf.device == x.device
            and (b is None or b.dtype == x.dtype)):
        out = torch.mm(x, w.t(), out=buf[: x.shape[0]])
        return out if b is None else out.add_(b)  # (the same rounding as ``x @ w.T + b``)
    out = x @ w.t()
    if b is not None:
        out = out + b
    return out.contiguous()


def _logit_transform(scale: Any, softcap: Any, who: str) -> tuple[float, float]:
    """``(scale, softcap)`` checked, ``softcap`` 0.0 for none (the op's ``transform`` entries)."""
    try:
        sc = float(scale)
    except (TypeError, ValueError):
        raise V.InvalidParameterError(f"{who}_logit_scale must be a real number, got {scale!r}") from None
    if not math.isfinite(sc):
        raise V.InvalidParameterError(f"{who}_logit_scale must be finite, got {sc}")
    if softcap is None:
        return sc, 0.0
    try:
        cap = float(softcap)
    except (TypeError, ValueError):
        raise V.InvalidParameterError(f"{who}_softcap must be a real number or None, got {softcap!r}") from None
    if not (math.isfinite(cap) and cap > 0.0):
        raise V.InvalidParameterError(f"{who}_softcap must be finite and > 0 (None for no softcapping), got {cap}")
    return sc, cap


def _transform_(z: torch.Tensor, scale: float, cap: float, slope: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The logits a model emits from its head's output ``z``, in place: ``scale · z`` (Cohere's
    ``logit_scale``), then ``cap · tanh(· / cap)`` (Gemma-2's ``final_logit_softcapping``), in the
    chunk's dtype as those models compute them. Given ``slope`` (``z``'s shape) and a cap, writes
    ``1 − tanh²`` there and returns it, the cap's derivative (the gradient's chain rule needs it after
    the kernel has overwritten the logits with their gradient: one more chunk-sized buffer, only when
    capping; a buffer the caller reuses from chunk to chunk). 16-bit chunks are transformed in float32,
    ``_TRANSFORM_ROWS`` rows at a time, each result rounded once: ``1 − tanh²`` of a rounded ``tanh``
    near saturation would lose most of its digits."""
    if cap == 0.0:
        if scale != 1.0:
            z.mul_(scale)
        return None
    wide = z.dtype in (torch.float32, torch.float64)
    step = z.shape[0] if wide else _TRANSFORM_ROWS
    for lo in range(0, z.shape[0], step):
        part = z[lo:lo + step]
        u = part if wide else part.float()
        if scale != 1.0:
            u.mul_(scale)
        u.div_(cap).tanh_()
        if slope is not None:  # 1 - tanh², no temporary beyond the slope's own rows
            sl = slope[lo:lo + step]
            if wide:
                torch.mul(u, u, out=sl)
                sl.neg_().add_(1.0)
            else:
                sl.copy_(1.0 - u * u)
        u.mul_(cap)
        if not wide:
            part.copy_(u)
    return slope


# rows of a 16-bit chunk transformed at a time in float32 (a 64 x 128256 float32 block is 31 MiB)
_TRANSFORM_ROWS = 64


# classes of the weight's gradient accumulated at a time from a 16-bit chunk: the partial product (and
# its float32 conversion) is this many rows of the weight, not all of them (a 128256 x 2048 bfloat16
# partial is 500 MiB, its float32 copy 1 GiB)
ACC_BLOCK = 8192


def _accumulate(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += g.T @ x`` with ``acc`` float32 (float64 for float64 inputs). bfloat16 chunks multiply in
    bfloat16 (float32 products and sums inside the matmul; on CPUs 2-3x faster than converting them):
    each partial is rounded once, to float32 where the device's matmul can write it, and the chunks are
    summed in float32. float16 chunks are converted first (no fast float16 matmul on CPUs). 16-bit
    partials are formed ``ACC_BLOCK`` classes at a time."""
    if g.dtype == acc.dtype:
        acc.addmm_(g.t(), x)
        return
    bf16 = g.dtype == torch.bfloat16
    xa = x if bf16 else x.to(acc.dtype)
    out_dtype = bf16 and g.is_cuda
    for c in range(0, acc.shape[0], ACC_BLOCK):
        part = g[:, c:c + ACC_BLOCK].t()
        dst = acc[c:c + ACC_BLOCK]
        if not bf16:
            dst.addmm_(part.to(acc.dtype), xa)
            continue
        if out_dtype:
            try:
                dst.add_(torch.mm(part, xa, out_dtype=acc.dtype))
                continue
            except (TypeError, RuntimeError, NotImplementedError):  # an older PyTorch: no out_dtype
                out_dtype = False
        dst.add_(part @ xa)


def _fused_impl(student_input: torch.Tensor, student_weight: torch.Tensor, teacher_input: torch.Tensor,
                teacher_weight: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                student_bias: Optional[torch.Tensor], teacher_bias: Optional[torch.Tensor], call: list[float],
                chunk_size: int, num_items: Optional[torch.Tensor], sparse: list[int],
                transform: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_input, grad_weight, grad_bias) of the mean (or ``num_items``-divided) loss over the
    batch's counted rows; ``grad_bias`` is empty without a bias. The gradients of the weight and bias
    are accumulated in float32 (float64 for float64 inputs). ``sparse`` = ``[kind, tail]`` for a sparse
    teacher, whose ids then come as ``teacher_input`` and values as ``teacher_weight`` (else empty).
    ``transform`` = ``[student scale, student softcap, teacher scale, teacher softcap]`` (softcap 0: none;
    the teacher's apply to a teacher head only): see :func:`_transform_`."""
    _check_fused(student_input, student_weight, teacher_input, teacher_weight, labels, student_bias, teacher_bias,
                 bool(sparse))
    res, reduction, n_items, want_grad = _decode_call(call)
    x = student_input.detach().reshape(-1, student_input.shape[-1])
    w = student_weight.detach()
    b = None if student_bias is None else student_bias.detach()
    rows = x.shape[0]
    t_in = teacher_input.detach()
    t_in = t_in.reshape(-1, t_in.shape[-1])
    if sparse:  # a sparse teacher: teacher_input holds its ids, teacher_weight its values
        from .sparse import from_codes

        t_vals = teacher_weight.detach().reshape(-1, teacher_weight.shape[-1])
        teacher_weight = None
    tw = None if teacher_weight is None else teacher_weight.detach()
    tb = None if teacher_bias is None else teacher_bias.detach()
    lab = None if labels is None else _labels(labels, x.device).reshape(-1)
    if num_items is not None:
        n_items = _num_items_value(num_items)
    if n_items is None:  # the mean over the whole batch's counted rows, not each chunk's
        n_items = float(rows if lab is None else int((lab != res.distiller.ignore_index).sum()))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    s_scale, s_cap, t_scale, t_cap = (float(v) for v in transform)
    # float16 cannot hold a large batch's per-element gradients of the mean (smallest normal 6e-5): its
    # chunks' logit gradients are computed unscaled (num_items=1, values within [-1, 1] times the
    # weights), the 1/num_items factor is applied in float32 afterwards, and the three gradients stay in
    # float32 until backward has applied the upstream factor (a GradScaler's), as DistillationLoss does
    # (its _grad_dtype)
    unscaled = _grad_dtype(x.dtype) != x.dtype
    grad_input = (torch.empty(x.shape, dtype=_grad_dtype(x.dtype), device=x.device) if want_grad
                  else x.new_empty(0))
    grad_weight = torch.zeros(w.shape, dtype=acc, device=w.device) if want_grad else w.new_empty(0)
    grad_bias = (torch.zeros(w.shape[0], dtype=acc, device=w.device) if (want_grad and b is not None)
                 else w.new_empty(0))
    total = 0.0
    chunk = max(1, int(chunk_size))
    # one buffer for every chunk's student logits and one for the teacher's (as many as the loop had
    # alive at a time before: reused, not reallocated chunk after chunk)
    s_buf = x.new_empty((min(chunk, rows), w.shape[0]))
    t_buf = None if tw is None else t_in.new_empty((min(chunk, rows), tw.shape[0]))
    slope_buf = x.new_empty((min(chunk, rows), w.shape[0])) if want_grad and s_cap != 0.0 else None
    for lo in range(0, rows, chunk):
        hi = min(rows, lo + chunk)
        s = _logits(x[lo:hi], w, b, s_buf)
        slope = _transform_(s, s_scale, s_cap, None if slope_buf is None else slope_buf[: hi - lo])
        if sparse:
            t = from_codes(_as_backend_input(t_in[lo:hi].contiguous()), _as_backend_input(t_vals[lo:hi].contiguous()),
                           sparse)
        else:
            t = _logits(t_in[lo:hi], tw, tb, t_buf) if tw is not None else t_in[lo:hi].contiguous()
            if tw is not None:
                _transform_(t, t_scale, t_cap, None)
        y = None if lab is None else _as_backend_input(lab[lo:hi].contiguous())
        if n_items > 0:
            kw: dict = dict(reduction="mean", num_items=1.0 if unscaled else n_items)
        else:  # every row ignored: 0 and a zero gradient
            kw = dict(reduction="sum", num_items=None)
        if want_grad:
            # the chunk's gradient written over its own logits (no second buffer; no reference to it is
            # kept past the chunk, so two chunks of logits exist at a time, not three)
            loss = res.run(_as_backend_input(s), _teacher_arg(t), y, want_grad=True, grad_out=_as_backend_input(s),
                           **kw)[0]
            if n_items > 0:
                # the chain rule through the transform: d/dz = scale · (1 − tanh²) · d/ds
                if slope is not None:
                    s.mul_(slope)
                if s_scale != 1.0:
                    s.mul_(s_scale)
                if grad_input.dtype == s.dtype == w.dtype:
                    torch.mm(s, w, out=grad_input[lo:hi])
                else:
                    grad_input[lo:hi] = s @ w
                _accumulate(grad_weight, s, x[lo:hi])
                if b is not None:
                    grad_bias += s.sum(0, dtype=acc)
            else:  # every row ignored
                grad_input[lo:hi] = 0
        else:
            loss = res.run(_as_backend_input(s), _teacher_arg(t), y, want_grad=False, **kw)[0]
        total += float(loss) if n_items > 0 else 0.0
        del s, t, slope
    if unscaled and n_items > 0:
        total /= n_items
        if want_grad:
            for g in (grad_input, grad_weight, grad_bias):
                g /= n_items
    loss_t = torch.tensor(total, dtype=_loss_dtype(x.dtype), device=x.device)
    if want_grad:
        grad_input = grad_input.reshape(student_input.shape)
        if not unscaled:
            grad_weight = grad_weight.to(w.dtype)
            if b is not None:
                grad_bias = grad_bias.to(b.dtype)
    return loss_t, grad_input, grad_weight, grad_bias


_fused_op = torch.library.custom_op(_OP, _fused_impl, mutates_args=())


@_fused_op.register_fake
def _fused_fake(student_input, student_weight, teacher_input, teacher_weight, labels, student_bias, teacher_bias,  # type: ignore[no-untyped-def]  # noqa: E501
                call, chunk_size, num_items, sparse, transform):
    want = call[-1] != 0.0
    loss = student_input.new_empty((), dtype=_loss_dtype(student_input.dtype))
    # (float16's gradients come in float32: see _fused_impl)
    g_dtype = _grad_dtype(student_input.dtype) if want else None
    gi = student_input.new_empty(student_input.shape if want else (0,), dtype=g_dtype)
    gw = student_weight.new_empty(student_weight.shape if want else (0,), dtype=g_dtype)
    gb = (student_bias.new_empty(student_bias.shape, dtype=g_dtype) if (want and student_bias is not None)
          else student_weight.new_empty(0))
    return loss, gi, gw, gb


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    ctx.want_grad = inputs[7][-1] != 0.0
    ctx.has_bias = inputs[5] is not None
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype, inputs[5].dtype if ctx.has_bias else None)
    ctx.save_for_backward(output[1], output[2], output[3])


def _backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
    if not ctx.want_grad:
        raise RuntimeError(f"{_OP} was called without a gradient")
    gi, gw, gb = ctx.saved_tensors
    di, dw, db = ctx.dtypes
    # an upstream gradient of 1 (loss.backward()) returns the saved gradients themselves: no second
    # weight-sized tensor (the graph releases its references before the gradients are accumulated)
    # (not while torch.compile traces the backward: the comparison has no value there)
    one = not torch.compiler.is_compiling() and bool(grad_loss == 1)
    return (_scaled(gi, grad_loss, di, one), _scaled(gw, grad_loss, dw, one), None, None, None,
            _scaled(gb, grad_loss, db, one) if ctx.has_bias else None, None, None, None, None, None, None)


def _scaled(g: torch.Tensor, go: torch.Tensor, dtype: torch.dtype, one: bool) -> torch.Tensor:
    """``g * go`` in ``g``'s dtype, rounded once to ``dtype`` (float16's gradients came in float32)."""
    return (g if one else g * go.to(g.dtype)).to(dtype)


_fused_op.register_autograd(_backward, setup_context=_setup)


class FusedLinearDistillationLoss(torch.nn.Module):
    """The distillation loss of ``DistillationLoss`` computed from hidden states: the student's logits
    ``student_input @ student_weight.T (+ student_bias)`` exist only ``chunk_size`` rows at a time.

    ``forward(student_input, student_weight, teacher_input, teacher_weight=None, labels=None,
    student_bias=None, teacher_bias=None, num_items=None)``: ``teacher_weight=None`` means that
    ``teacher_input`` already holds the teacher's logits (rows x classes) or is a ``SparseTeacher``. The loss is the mean over the
    whole batch's counted rows (or divided by ``num_items``); gradients reach ``student_input``,
    ``student_weight`` and ``student_bias``, computed in forward (the weight's accumulated in float32)
    and scaled by the upstream gradient in backward. Extra memory: about three chunks of logits.

    ``student_logit_scale``, ``student_softcap`` (and the teacher's): the logits a model really emits,
    ``scale · z`` then ``softcap · tanh(· / softcap)`` of the head's output ``z`` (Cohere's
    ``logit_scale``, Gemma-2's ``final_logit_softcapping``), applied per chunk, the student's gradient
    taken through both (one more chunk of logits while capping). The teacher's apply to a teacher head
    (``teacher_weight``) only: teacher logits and a ``SparseTeacher`` are taken as they are.
    """

    def __init__(self, soft_loss: Any = "kl_divergence", temperature: float | None = None,
                 hard_label_weight: float = 0.5, soft_label_weight: float = 0.5, ignore_index: int = -100,
                 chunk_size: int = 1024, *, student_softcap: float | None = None, teacher_softcap: float | None = None,
                 student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0, **soft_params: Any) -> None:
        super().__init__()
        # checked here and again on every eager call (they are plain attributes a trainer may set)
        s_scale, s_cap = _logit_transform(student_logit_scale, student_softcap, "student")
        t_scale, t_cap = _logit_transform(teacher_logit_scale, teacher_softcap, "teacher")
        self.student_logit_scale, self.student_softcap = s_scale, (s_cap or None)
        self.teacher_logit_scale, self.teacher_softcap = t_scale, (t_cap or None)
        soft = make_soft_loss(soft_loss, temperature, soft_params.pop("beta", None), soft_params.pop("alpha", None),
                              soft_params.pop("t2_scale", None))
        if soft_params:
            raise TypeError(f"unknown soft-loss parameters: {sorted(soft_params)}")
        self.distiller = ResponseDistiller(soft, hard_label_weight, soft_label_weight, ignore_index=ignore_index)
        self.chunk_size = V.integer(chunk_size, "chunk_size")
        if self.chunk_size < 1:
            raise V.InvalidParameterError(f"chunk_size must be >= 1, got {self.chunk_size}")

    def forward(self, student_input: torch.Tensor, student_weight: torch.Tensor, teacher_input: torch.Tensor,
                teacher_weight: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                num_items: Any = None) -> torch.Tensor:
        sparse: list[int] = []
        if type(teacher_input).__name__ == "SparseTeacher":
            from .sparse import codes

            if teacher_weight is not None or teacher_bias is not None:
                raise V.InvalidParameterError("a SparseTeacher is the teacher itself: pass no teacher_weight/teacher_bias")
            sparse = codes(teacher_input)
            teacher_weight = A.tensor_of(teacher_input.values)
            teacher_input = A.tensor_of(teacher_input.indices)
        if torch.compiler.is_compiling():
            # (checked at construction and on every eager call; a traced check of a float attribute, which
            # dynamic shapes make symbolic, would break the graph)
            transform = [float(self.student_logit_scale), float(self.student_softcap or 0.0),
                         float(self.teacher_logit_scale), float(self.teacher_softcap or 0.0)]
        else:
            transform = [*_logit_transform(self.student_logit_scale, self.student_softcap, "student"),
                         *_logit_transform(self.teacher_logit_scale, self.teacher_softcap, "teacher")]
        if teacher_weight is None or sparse:
            if transform[2:] != [1.0, 0.0]:
                raise V.InvalidParameterError(
                    "teacher_logit_scale/teacher_softcap apply to a teacher head (teacher_weight): teacher logits "
                    "or a SparseTeacher are taken as the teacher's final logits")
        if labels is not None and not isinstance(labels, torch.Tensor):
            labels = A.tensor_of(labels)
        _check_devices(student_input, student_weight, teacher_input, teacher_weight, labels, student_bias,
                       teacher_bias, bool(sparse))
        n_items, n_items_tensor = _num_items_args(num_items, "mean")
        want_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (student_input, student_weight, student_bias))
        call = _describe(self.distiller, "mean", n_items, want_grad)
        loss, *_ = torch.ops.fastdistill.fused_linear_response(
            student_input, student_weight, teacher_input.detach(),
            None if teacher_weight is None else teacher_weight.detach(), labels, student_bias,
            None if teacher_bias is None else teacher_bias.detach(), call, self.chunk_size, n_items_tensor, sparse,
            transform)
        return loss

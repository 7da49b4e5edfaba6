"""PyTorch integration: distillation losses as autograd-aware modules and functions.

``import fastdistill`` never imports PyTorch; importing ``fastdistill.torch`` does.

The loss **and** its gradient are computed together in forward by the fused kernels
(:meth:`fastdistill.ResponseDistiller.loss_and_grad`), and only the gradient is saved for backward,
which merely scales it by the upstream gradient. Nothing else of size ``rows x classes`` is kept
(PyTorch's own composition keeps the log-softmaxes of student and teacher and more).

* CPU tensors are handed to the CPU kernels as zero-copy NumPy views; CUDA tensors go to the CUDA
  backend (needs ``numba-cuda``), which returns tensors on the same device.
* float32 and float64 are computed natively. float16 and bfloat16 tensors are upcast to float32 for
  the computation (one copy); the loss comes back as float32 and the gradient in the student's dtype
  (it is kept in float32 until backward, so an upstream gradient such as a ``GradScaler`` scale is
  applied before the rounding to half precision).
* Non-contiguous tensors are copied once to a contiguous buffer. Labels may be any integer tensor
  (converted to int64 once when they are not already).
* Any leading dims ``(B, T, V)`` are rows; labels then have shape ``(B, T)`` (or ``(B*T,)``).
* The teacher is a constant: it never receives a gradient (run it under ``torch.no_grad()``).
* The loss can be differentiated once (no double backward).
"""
from __future__ import annotations

import dataclasses
from typing import Any

try:
    import torch
    from torch.autograd.function import once_differentiable
except ImportError as _exc:  # pragma: no cover - exercised only without PyTorch
    raise ImportError(
        "fastdistill.torch needs PyTorch (pip install 'fastdistill[torch]')"
    ) from _exc

from . import _validate as V
from .distillers import ResponseDistiller
from .errors import InvalidParameterError
from .losses import SOFT_LOSSES, DistilLoss, soft_loss_by_name

__all__ = ["DistillationLoss", "response_loss", "kl_divergence", "feature_loss", "SOFT_LOSSES"]


_NATIVE = (torch.float32, torch.float64)
_UPCAST = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------ building the loss


def make_soft_loss(soft_loss: str | DistilLoss = "kl_divergence", temperature: float | None = None,
                   beta: float | None = None, alpha: float | None = None) -> DistilLoss:
    """A :class:`~fastdistill.DistilLoss` from a kind name (or a ``DistilLoss``, returned as is).

    ``temperature`` defaults to 1.0, ``beta`` (jsd) to 0.5, ``alpha`` (skew KLs) to 0.1. With a
    ``DistilLoss`` these must be left unset or agree with it.
    """
    if isinstance(soft_loss, DistilLoss):
        for name, value in (("temperature", temperature), ("beta", beta), ("alpha", alpha)):
            if value is not None and V.finite(value, name) != getattr(soft_loss, name):
                raise InvalidParameterError(
                    f"{name}={value} disagrees with the given soft_loss ({name}={getattr(soft_loss, name)}); "
                    f"set it on the DistilLoss or pass a kind name"
                )
        return soft_loss
    return soft_loss_by_name(soft_loss, temperature, beta, alpha)


# ------------------------------------------------------------------ tensor plumbing


def _check_tensor(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in _NATIVE:
        return dtype
    if dtype in _UPCAST:
        return torch.float32
    raise TypeError(f"student must be a float32, float64, float16 or bfloat16 tensor, got dtype {dtype}")


def _prepare(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` detached, of ``dtype``, C-contiguous: itself when it already is, else one copy."""
    return x.detach().to(dtype=dtype, memory_format=torch.contiguous_format)


def _as_backend_input(x: torch.Tensor) -> Any:
    """What the façade receives: a zero-copy NumPy view for CPU tensors, the tensor for CUDA tensors."""
    return x.numpy() if x.device.type == "cpu" else x


def _to_tensor(x: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A façade result (float, NumPy array, CUDA array) as a tensor of ``dtype`` on ``device``."""
    if isinstance(x, torch.Tensor):
        out = x
    elif isinstance(x, float):
        return torch.tensor(x, dtype=dtype, device=device)
    elif hasattr(x, "__cuda_array_interface__"):  # a numba device array
        out = torch.as_tensor(x, device=device)
    else:
        out = torch.from_numpy(x)
    return out if (out.dtype == dtype and out.device == device) else out.to(device=device, dtype=dtype)


def _labels(labels: Any, device: torch.device) -> torch.Tensor:
    lab = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    if lab.dtype.is_floating_point or lab.dtype.is_complex or lab.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {lab.dtype}")
    if lab.device != device:
        raise RuntimeError(f"labels are on {lab.device} but the student logits are on {device}")
    return lab.detach().to(dtype=torch.int64, memory_format=torch.contiguous_format)


def _num_items(num_items: Any) -> Any:
    if isinstance(num_items, torch.Tensor):
        return float(num_items.item())
    return num_items


def _run(distiller: ResponseDistiller, student: torch.Tensor, teacher: torch.Tensor, labels: Any,
         reduction: str, num_items: Any, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss tensor and (if asked) the gradient, in the computation dtype, on the student's device."""
    device = student.device
    if teacher.device != device:
        raise RuntimeError(f"teacher logits are on {teacher.device} but the student logits are on {device}")
    cdtype = _compute_dtype(student.dtype)
    if not (teacher.dtype in _NATIVE or teacher.dtype in _UPCAST):
        raise TypeError(f"teacher must be a float32, float64, float16 or bfloat16 tensor, got dtype {teacher.dtype}")
    s = _prepare(student, cdtype)
    t = _prepare(teacher, cdtype)
    lab = None if labels is None else _as_backend_input(_labels(labels, device))
    args = (_as_backend_input(s), _as_backend_input(t), lab)
    kw = dict(reduction=reduction, num_items=_num_items(num_items))
    if want_grad:
        loss, grad = distiller.loss_and_grad(*args, **kw)
        return _to_tensor(loss, cdtype, device), _to_tensor(grad, cdtype, device)
    return _to_tensor(distiller.loss(*args, **kw), cdtype, device), None


class _ResponseFunction(torch.autograd.Function):
    """Fused loss + gradient in forward; backward scales the saved gradient."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, labels: Any,  # type: ignore[override]
                distiller: ResponseDistiller, reduction: str, num_items: Any) -> torch.Tensor:
        loss, grad = _run(distiller, student, teacher, labels, reduction, num_items, want_grad=True)
        ctx.save_for_backward(grad)
        ctx.student_dtype = student.dtype
        ctx.per_row = reduction == "none"
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        go = grad_output.to(grad.dtype)
        if ctx.per_row:
            out = grad * go.unsqueeze(-1)  # one upstream value per row, broadcast over the classes
        elif go.item() == 1.0:
            # the common ``loss.backward()``: hand over the saved buffer itself; autograd never writes
            # into an incoming gradient (a leaf's .grad takes it over or copies it)
            out = grad
        else:
            out = grad * go
        if out.dtype != ctx.student_dtype:
            out = out.to(ctx.student_dtype)
        return out, None, None, None, None, None


def _response(distiller: ResponseDistiller, student: Any, teacher: Any, labels: Any, reduction: str,
              num_items: Any) -> torch.Tensor:
    student = _check_tensor(student, "student")
    teacher = _check_tensor(teacher, "teacher")
    reduction = V.reduction(reduction)
    if torch.is_grad_enabled() and student.requires_grad:
        return _ResponseFunction.apply(student, teacher, labels, distiller, reduction, num_items)
    return _run(distiller, student, teacher, labels, reduction, num_items, want_grad=False)[0]


# ------------------------------------------------------------------ public API


class DistillationLoss(torch.nn.Module):
    """Knowledge-distillation loss of student logits against teacher logits (and hard labels).

    Per row: ``hard_label_weight * CE(student, label) + soft_label_weight * soft(student, teacher)``,
    CE at temperature 1 (PyTorch's ``F.cross_entropy``, with ``label_smoothing``), ``soft`` one of
    :data:`SOFT_LOSSES` at ``temperature`` (KL-type losses are scaled by ``temperature**2``) or any
    :class:`~fastdistill.DistilLoss`. Rows whose label is ``ignore_index`` count nowhere; ``"mean"``
    divides by the counted rows (or by ``num_items`` when given, e.g. tokens of a whole accumulation
    step). ``beta`` is the JSD mixture weight (default 0.5), ``alpha`` the skew of the skew KLs
    (default 0.1); ``temperature`` defaults to 1.0. With a ``DistilLoss`` as ``soft_loss`` these come
    from it (passing a different value raises ``InvalidParameterError``).

    The parameters are attributes and may be changed between steps (e.g. a temperature schedule).

    Example::

        criterion = DistillationLoss(temperature=4.0, hard_label_weight=0.5, soft_label_weight=0.5)
        loss = criterion(student(x), teacher_logits, y)
        loss.backward()
    """

    def __init__(self, temperature: float | None = None, hard_label_weight: float = 0.5,
                 soft_label_weight: float = 0.5, soft_loss: str | DistilLoss = "kl_divergence", *,
                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 beta: float | None = None, alpha: float | None = None) -> None:
        super().__init__()
        self._cfg: dict[str, Any] = {}
        self._distiller: ResponseDistiller | None = None
        self._set(soft_loss=soft_loss, temperature=temperature, beta=beta, alpha=alpha,
                  hard_label_weight=hard_label_weight, soft_label_weight=soft_label_weight,
                  ignore_index=ignore_index, label_smoothing=label_smoothing)
        self.reduction = reduction

    def _set(self, **changes: Any) -> None:
        cfg = {**self._cfg, **changes}
        soft = make_soft_loss(cfg["soft_loss"], cfg["temperature"], cfg["beta"], cfg["alpha"])
        distiller = ResponseDistiller(
            soft, cfg["hard_label_weight"], cfg["soft_label_weight"],
            ignore_index=cfg["ignore_index"], label_smoothing=cfg["label_smoothing"],
        )
        # a DistilLoss carries its own parameters; later changes go through a kind name or the loss
        if isinstance(cfg["soft_loss"], DistilLoss):
            cfg["soft_loss"] = soft
            cfg.update(temperature=None, beta=None, alpha=None)
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
        ``reduction="none"``. Differentiable with respect to ``student_logits`` only."""
        return _response(self.distiller, student_logits, teacher_logits, labels, self._reduction, num_items)

    def extra_repr(self) -> str:
        d = self.distiller
        return (f"soft_loss={d.soft_loss!r}, hard_label_weight={d.hard_label_weight}, "
                f"soft_label_weight={d.soft_label_weight}, ignore_index={d.ignore_index}, "
                f"reduction={self._reduction!r}, label_smoothing={d.label_smoothing}")


def response_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None, *,
                  temperature: float | None = None, hard_label_weight: float = 0.5,
                  soft_label_weight: float = 0.5, soft_loss: str | DistilLoss = "kl_divergence",
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  num_items: Any = None, beta: float | None = None, alpha: float | None = None) -> torch.Tensor:
    """Functional form of :class:`DistillationLoss` (same parameters, same result)."""
    soft = make_soft_loss(soft_loss, temperature, beta, alpha)
    distiller = ResponseDistiller(soft, hard_label_weight, soft_label_weight, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing)
    return _response(distiller, student, teacher, labels, reduction, num_items)


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, *,
                  reduction: str = "mean", num_items: Any = None) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher/T) || softmax(student/T))`` per row, reduced ("mean" is PyTorch's
    ``batchmean``): ``T**2 * F.kl_div(F.log_softmax(s/T, -1), F.log_softmax(t/T, -1),
    log_target=True, reduction="batchmean")`` in one fused pass."""
    distiller = ResponseDistiller(DistilLoss.kl_divergence(temperature), 0.0, 1.0)
    return _response(distiller, student, teacher, None, reduction, num_items)


def feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, *,
                 loss: str | DistilLoss = "mse", reduction: str = "mean", num_items: Any = None) -> torch.Tensor:
    """A feature (hidden-state) loss per row -- ``"mse"`` (mean over features of the squared
    difference) or ``"cosine"`` (``1 - cos``) or any ``DistilLoss`` -- reduced over rows. With
    ``"mse"`` and ``"mean"`` this is ``F.mse_loss(student_feat, teacher_feat)``."""
    distiller = ResponseDistiller(make_soft_loss(loss), 0.0, 1.0)
    return _response(distiller, student_feat, teacher_feat, None, reduction, num_items)

"""The machinery the custom ops of :mod:`fastdistill.torch` and of the fused linear head
(:mod:`fastdistill._torch_linear`) share: the soft loss from its name, the tensors as the façade takes
them and its results as tensors, the checks of devices, labels and ``num_items``, and the description
of a call as one list of numbers (what a compiled graph holds as constants) with its decoding.

Private module; both op modules import it, and neither imports the other.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from . import _arrays as A
from . import _dispatch
from . import _validate as V
from ._spec import LOSS_CODES, Terms
from .distillers import ResponseDistiller
from .errors import InvalidParameterError
from .losses import DistilLoss, soft_loss_by_name

_HALF = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float32, torch.float64) + _HALF


# ------------------------------------------------------------------ building the loss


def make_soft_loss(soft_loss: str | DistilLoss = "kl_divergence", temperature: float | None = None,
                   beta: float | None = None, alpha: float | None = None,
                   t2_scale: bool | None = None) -> DistilLoss:
    """A :class:`~fastdistill.DistilLoss` from a kind name (or a ``DistilLoss``, returned as is).

    ``temperature`` defaults to 1.0, ``beta`` (jsd) to 0.5, ``alpha`` (skew KLs) to 0.1, ``t2_scale`` to
    True. With a ``DistilLoss`` these must be left unset or agree with it.
    """
    if isinstance(soft_loss, DistilLoss):
        if t2_scale is not None and bool(t2_scale) != soft_loss.t2_scale:
            raise InvalidParameterError(
                f"t2_scale={t2_scale} disagrees with the given soft_loss (t2_scale={soft_loss.t2_scale}); "
                f"set it on the DistilLoss or pass a kind name"
            )
        for name, value in (("temperature", temperature), ("beta", beta), ("alpha", alpha)):
            if value is not None and V.finite(value, name) != getattr(soft_loss, name):
                raise InvalidParameterError(
                    f"{name}={value} disagrees with the given soft_loss ({name}={getattr(soft_loss, name)}); "
                    f"set it on the DistilLoss or pass a kind name"
                )
        return soft_loss
    return soft_loss_by_name(soft_loss, temperature, beta, alpha, True if t2_scale is None else t2_scale)


# ------------------------------------------------------------------ tensor plumbing


def _check_tensor(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the loss of a student of ``dtype`` (float32 for half precision; the gradient is in
    the student's own dtype)."""
    if dtype in _HALF:
        return torch.float32
    if dtype in _FLOATS:
        return dtype
    raise TypeError(f"student must be a float32, float64, float16 or bfloat16 tensor, got dtype {dtype}")


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the op computes a student's gradient in: the student's, but float32 for float16, whose
    range (smallest normal 6e-5) cannot hold per-element gradients of a large batch's mean before the
    upstream factor (a GradScaler's 65536) is applied in backward; the product is rounded once. bfloat16
    has float32's range: its gradient is written in bfloat16 directly."""
    return torch.float32 if dtype == torch.float16 else dtype


def _prepare(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached and C-contiguous: itself when it already is, else one copy (half-precision
    tensors are read as they are, on the CPU and on the GPU)."""
    return x.detach().contiguous()


def _as_backend_input(x: torch.Tensor) -> Any:
    """What the façade receives: a zero-copy NumPy view for CPU tensors (the tensor itself for bfloat16,
    which NumPy lacks: the façade views its bits), the tensor for CUDA tensors."""
    return x.numpy() if (x.device.type == "cpu" and x.dtype != torch.bfloat16) else x


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


def _same_device(x: torch.Tensor, name: str, device: torch.device, other: str = "the student logits are") -> None:
    """``TypeError`` naming ``name`` and both devices unless ``x`` lives on ``device`` (as for a tensor on a
    device fastdistill does not compute on)."""
    if x.device != device:
        raise TypeError(f"{name} is on device '{x.device}' but {other} on '{device}'; move it to '{device}'")


def _labels(labels: Any, device: torch.device) -> torch.Tensor:
    lab = A.tensor_of(labels)
    if lab.dtype.is_floating_point or lab.dtype.is_complex or lab.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {lab.dtype}")
    if lab.dtype == getattr(torch, "uint64", None):
        # (its conversion to int64 wraps ids above 2**63 into -1 or ignore_index; PyTorch's own losses
        # take int64 targets only)
        raise TypeError("labels must be an integer tensor of at most 63 bits (int64, int32, ...), got torch.uint64: "
                        "convert them with labels.to(torch.int64) after checking their range")
    _same_device(lab, "labels", device)
    return lab.detach().to(dtype=torch.int64, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------ the call description
#
# Every custom op of fastdistill takes the call as one list of numbers (the fields of ``CALL_FIELDS``),
# so that a compiled graph holds it as constants; the op rebuilds (and caches) what it describes. One
# list rather than a dozen arguments: PyTorch's custom-op layer costs microseconds per schema argument
# and call.

CALL_FIELDS = (
    "kind", "temperature", "kl_weight", "mse_weight", "beta", "alpha", "t2_scale",  # the soft loss
    "hard_label_weight", "soft_label_weight", "label_smoothing", "ignore_index", "ignore_index_low",
    "vocab_mismatch",  # the distiller (ignore_index: the integer's high and low 32 bits, each exact as a float)
    "reduction", "num_items", "want_grad",  # the call (num_items: 0 when not given; it is > 0 when given)
)
_IGNORE_SPLIT = 1 << 32
_LOSS_KINDS = {code: kind for kind, code in LOSS_CODES.items()}
_F = {name: i for i, name in enumerate(CALL_FIELDS)}
_N_HEAD = _F["reduction"]  # the distiller's fields come first
_CALLS: dict = {}  # a call list (as a tuple): (Resolved, reduction, num_items, want_grad)
_HEADS: dict = {}  # a distiller's fields: its Resolved
_OBJECTS: dict = {}  # id(distiller): (the distiller, what its fields were read from, its Resolved)


class Resolved(NamedTuple):
    """A distiller as the ops run it, resolved once: the distiller rebuilt from its numbers (what a
    compiled graph holds; equal to the caller's), its kernel terms, and those numbers (the call list's
    first fields)."""

    distiller: ResponseDistiller
    terms: Terms
    head: tuple

    def run(self, student: Any, teacher: Any, labels: Any, *, reduction: str, num_items: Any, want_grad: bool,
            grad_out: Any = None) -> tuple[Any, Any]:
        """``distiller.loss_and_grad`` (``want_grad``) or ``distiller.loss`` (then ``(loss, None)``) with
        the terms computed once: the arguments ``ResponseDistiller`` hands the façade."""
        d = self.distiller
        return _dispatch.response(student, teacher, labels, self.terms, ignore_index=d.ignore_index,
                                  reduction=reduction, num_items=num_items, want_grad=want_grad, grad_out=grad_out,
                                  needs_labels=d.hard_label_weight != 0.0, vocab_mismatch=d.vocab_mismatch)


def _head(distiller: ResponseDistiller) -> list[float]:
    """``distiller`` as numbers: the fields of ``CALL_FIELDS`` up to ``vocab_mismatch``."""
    soft = distiller.soft_loss
    return [
        float(LOSS_CODES[soft.kind]), soft.temperature, soft.kl_weight, soft.mse_weight, soft.beta, soft.alpha,
        float(soft.t2_scale), distiller.hard_label_weight, distiller.soft_label_weight, distiller.label_smoothing,
        float(distiller.ignore_index // _IGNORE_SPLIT), float(distiller.ignore_index % _IGNORE_SPLIT),
        float(V.VOCAB_MISMATCH.index(distiller.vocab_mismatch)),
    ]


def _describe(distiller: ResponseDistiller, reduction: str, num_items: float | None, want_grad: bool) -> list[float]:
    """The op's ``call`` argument: ``distiller`` and the call's options as numbers (``CALL_FIELDS``).
    (Plain arithmetic on the distiller's attributes: torch.compile traces it into constants.)"""
    return _head(distiller) + [
        float(V.REDUCTIONS.index(reduction)), 0.0 if num_items is None else float(num_items), float(want_grad),
    ]


def _reduction_of(call: list[float]) -> str:
    return V.REDUCTIONS[int(call[_F["reduction"]])]


def _keep(cache: dict, key: Any, value: Any) -> Any:
    """``cache[key] = value``, the cache emptied first when full (it holds what a process uses)."""
    if len(cache) > 256:
        cache.clear()
    cache[key] = value
    return value


def _of_head(head: tuple) -> Resolved:
    """The :class:`Resolved` of a distiller's numbers (kept for the distillers a process uses)."""
    hit = _HEADS.get(head)
    if hit is None:
        f = dict(zip(CALL_FIELDS, head))
        soft = DistilLoss(_LOSS_KINDS[int(f["kind"])], f["temperature"], kl_weight=f["kl_weight"],
                          mse_weight=f["mse_weight"], beta=f["beta"], alpha=f["alpha"], t2_scale=f["t2_scale"] != 0.0)
        distiller = ResponseDistiller(soft, f["hard_label_weight"], f["soft_label_weight"],
                                      ignore_index=int(f["ignore_index"]) * _IGNORE_SPLIT + int(f["ignore_index_low"]),
                                      label_smoothing=f["label_smoothing"],
                                      vocab_mismatch=V.VOCAB_MISMATCH[int(f["vocab_mismatch"])])
        hit = _keep(_HEADS, head, Resolved(distiller, distiller.terms(), head))
    return hit


def resolved(distiller: ResponseDistiller) -> Resolved:
    """``distiller``'s :class:`Resolved`, computed once per object (the eager path's per-call cost is
    reading its six fields): kept by identity, and used again while the fields it was read from are
    still its fields (a ``ResponseDistiller``'s attributes may be reassigned)."""
    d = distiller
    fields = (d.soft_loss, d.hard_label_weight, d.soft_label_weight, d.ignore_index, d.label_smoothing,
              d.vocab_mismatch)
    hit = _OBJECTS.get(id(d))
    if hit is not None and hit[0] is d and hit[1] == fields:
        return hit[2]
    res = _of_head(tuple(_head(d)))
    _keep(_OBJECTS, id(d), (d, fields, res))  # (holding the distiller: its id is not reused meanwhile)
    return res


def _decode_call(call: list[float]) -> tuple[Resolved, str, float | None, bool]:
    """``(Resolved, reduction, num_items, want_grad)`` of a :func:`_describe` list (kept for the calls
    a process makes)."""
    key = tuple(call)
    hit = _CALLS.get(key)
    if hit is None:
        f = dict(zip(CALL_FIELDS, call))
        n_items = None if f["num_items"] == 0.0 else f["num_items"]
        hit = _keep(_CALLS, key, (_of_head(key[:_N_HEAD]), _reduction_of(call), n_items, f["want_grad"] != 0.0))
    return hit


def _decode(call: list[float]) -> tuple[ResponseDistiller, str, float | None, bool]:
    """``(distiller, reduction, num_items, want_grad)`` of a :func:`_describe` list."""
    res, reduction, n_items, want_grad = _decode_call(call)
    return res.distiller, reduction, n_items, want_grad


def _num_items_args(num_items: Any, reduction: str) -> tuple[float | None, torch.Tensor | None]:
    """``num_items`` as a checked number (in the call's description) or a tensor (the op's
    ``num_items``: its metadata checked here, its value when read)."""
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise InvalidParameterError(
                f"num_items must be one number, got a tensor of shape {tuple(num_items.shape)} "
                f"({num_items.numel()} elements)")
        if num_items.dtype.is_complex or num_items.dtype == torch.bool:
            raise InvalidParameterError(f"num_items must be a real number, got a tensor of dtype {num_items.dtype}")
        if reduction != "mean":
            raise InvalidParameterError(
                f"num_items only applies to reduction='mean', got reduction={reduction!r}")
        return None, num_items.detach()
    return V.num_items(num_items, reduction), None


def _num_items_value(num_items: torch.Tensor) -> float:
    """The value of a ``num_items`` tensor (read in forward), checked as a number."""
    return V.num_items(num_items.item(), "mean")  # type: ignore[return-value]


"""``DistilLoss``: the soft (teacher-matching) losses, as immutable value objects."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _dispatch
from . import _validate as V
from ._spec import LOSS_CODES, Terms, soft_terms

KINDS = (
    "kl_divergence", "mse", "cosine", "combined",
    "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "alpha_divergence",
)


@dataclass(frozen=True)
class DistilLoss:
    """A distillation loss between student and teacher logits (argument order: student, teacher).

    Build one with a constructor (``DistilLoss.kl_divergence(4.0)``, ``DistilLoss.mse()``, ...).
    Temperature-based losses compare ``p = softmax(teacher / T)`` with ``q = softmax(student / T)``;
    KL-type losses are scaled by ``T**2`` (Hinton), TVD is not. ``t2_scale=False`` drops the ``T**2``
    factor (Liger-Kernel, TRL and Megatron apply none).
    """

    kind: str
    temperature: float = 1.0
    kl_weight: float | None = None
    mse_weight: float | None = None
    beta: float = 0.5
    alpha: float = 0.1
    t2_scale: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise V.InvalidParameterError(f"kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "temperature", V.loss_temperature(self.temperature))
        # a kind's own weights default to 1 (what its named constructor gives); a weight the kind does
        # not have must be left unset or 0
        has_kl = self.kind not in ("mse", "cosine")
        has_mse = self.kind in ("mse", "combined")
        for name, has in (("kl_weight", has_kl), ("mse_weight", has_mse)):
            value = getattr(self, name)
            if value is None:
                if self.kind == "combined":
                    raise V.InvalidParameterError(
                        f"DistilLoss('combined') needs both kl_weight and mse_weight (got {name}=None); "
                        "or use DistilLoss.combined(kl_weight, mse_weight, temperature)"
                    )
                value = 1.0 if has else 0.0
            value = V.finite(value, name)
            if not has and value != 0.0:
                raise V.InvalidParameterError(f"{name} must be 0 for kind {self.kind!r}, got {value}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "beta", V.unit_interval(self.beta, "beta"))
        object.__setattr__(self, "alpha", V.unit_interval(self.alpha, "alpha"))
        if not isinstance(self.t2_scale, (bool, np.bool_)):
            raise V.InvalidParameterError(f"t2_scale must be True or False, got {self.t2_scale!r}")
        object.__setattr__(self, "t2_scale", bool(self.t2_scale))

    # ------------------------------------------------------------ constructors

    @classmethod
    def kl_divergence(cls, temperature: float = 1.0, *, t2_scale: bool = True) -> DistilLoss:
        """Forward KL, ``T**2 * sum p (log p - log q)`` (PyTorch ``kl_div(..., 'batchmean')`` times T**2)."""
        return cls("kl_divergence", temperature, kl_weight=1.0, t2_scale=t2_scale)

    @classmethod
    def mse(cls) -> DistilLoss:
        """Mean over classes of ``(t - s)**2`` on raw logits."""
        return cls("mse", 1.0, mse_weight=1.0)

    @classmethod
    def cosine(cls) -> DistilLoss:
        """``1 - cos(s, t)`` on raw logits; a zero-norm row gives 1.0."""
        return cls("cosine", 1.0)

    @classmethod
    def combined(cls, kl_weight: float, mse_weight: float, temperature: float = 1.0, *,
                 t2_scale: bool = True) -> DistilLoss:
        """``kl_weight * KL-term + mse_weight * MSE-term``."""
        return cls("combined", temperature, kl_weight=kl_weight, mse_weight=mse_weight, t2_scale=t2_scale)

    @classmethod
    def reverse_kl(cls, temperature: float = 1.0, *, t2_scale: bool = True) -> DistilLoss:
        """Reverse KL, ``T**2 * sum q (log q - log p)`` (MiniLLM, torchtune)."""
        return cls("reverse_kl", temperature, kl_weight=1.0, t2_scale=t2_scale)

    @classmethod
    def jsd(cls, beta: float = 0.5, temperature: float = 1.0, *, t2_scale: bool = True) -> DistilLoss:
        """Generalized JSD of GKD/TRL: ``beta*KL(p||m) + (1-beta)*KL(q||m)``, ``m = beta*p + (1-beta)*q``.

        ``beta = 0`` is forward KL and ``beta = 1`` reverse KL, as in TRL and Liger-Kernel. Times T**2.
        """
        return cls("jsd", temperature, kl_weight=1.0, beta=beta, t2_scale=t2_scale)

    @classmethod
    def skew_kl(cls, alpha: float = 0.1, temperature: float = 1.0, *, t2_scale: bool = True) -> DistilLoss:
        """Skew KL of DistiLLM: ``T**2 * KL(p || alpha*p + (1-alpha)*q)``."""
        return cls("skew_kl", temperature, kl_weight=1.0, alpha=alpha, t2_scale=t2_scale)

    @classmethod
    def skew_reverse_kl(cls, alpha: float = 0.1, temperature: float = 1.0, *,
                        t2_scale: bool = True) -> DistilLoss:
        """Skew reverse KL of DistiLLM: ``T**2 * KL(q || (1-alpha)*p + alpha*q)``."""
        return cls("skew_reverse_kl", temperature, kl_weight=1.0, alpha=alpha, t2_scale=t2_scale)

    @classmethod
    def alpha_divergence(cls, alpha: float, temperature: float = 1.0, *, t2_scale: bool = True) -> DistilLoss:
        """Amari's alpha-divergence, ``T**2 * (1 - sum p**alpha q**(1 - alpha)) / (alpha (1 - alpha))``, alpha in
        [0, 1]: ``alpha = 1`` is ``kl_divergence``, ``alpha = 0`` ``reverse_kl`` (its limits), ``alpha = 0.5`` four
        times the squared Hellinger distance."""
        return cls("alpha_divergence", temperature, kl_weight=1.0, alpha=alpha, t2_scale=t2_scale)

    @classmethod
    def tvd(cls, temperature: float = 1.0, *, t2_scale: bool = True) -> DistilLoss:
        """Total variation distance ``0.5 * sum |p - q|`` (never scaled by T**2: ``t2_scale`` is accepted
        for symmetry and changes nothing)."""
        return cls("tvd", temperature, kl_weight=1.0, t2_scale=t2_scale)

    # ------------------------------------------------------------ kernel description

    def terms(self, weight: float = 1.0, **extra: Any) -> Terms:
        """This loss, times ``weight``, as kernel terms (``extra`` sets the hard-label fields)."""
        div, div_w, mse_w, cos_w, lam, c_p, c_q = soft_terms(
            LOSS_CODES[self.kind], self.temperature, self.kl_weight, self.mse_weight, self.beta, self.alpha,
            self.t2_scale,
        )
        return Terms(
            div=div, tau=self.temperature, div_w=div_w * weight, mse_w=mse_w * weight, cos_w=cos_w * weight,
            lam=lam, c_p=c_p, c_q=c_q, **extra,
        )

    # ------------------------------------------------------------ evaluation

    def compute(self, student: Any, teacher: Any, *, reduction: str = "mean", num_items: Any = None,
                backend: str = "auto") -> Any:
        """The loss between ``student`` and ``teacher`` logits (float, or per-row array for 'none')."""
        loss, _ = _dispatch.response(student, teacher, None, self.terms(), reduction=reduction,
                                     num_items=num_items, backend=backend)
        return loss

    def compute_with_grad(self, student: Any, teacher: Any, *, reduction: str = "mean", grad_out: Any = None,
                          num_items: Any = None, backend: str = "auto") -> tuple[Any, Any]:
        """``(loss, d loss / d student)``; ``grad_out`` may be a preallocated buffer (even ``student``)."""
        return _dispatch.response(student, teacher, None, self.terms(), reduction=reduction,
                                  num_items=num_items, want_grad=True, grad_out=grad_out, backend=backend)


SOFT_LOSSES = ("kl_divergence", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "alpha_divergence", "mse",
               "cosine")


def soft_loss_by_name(kind: str, temperature: float | None = None, beta: float | None = None,
                      alpha: float | None = None, t2_scale: bool = True) -> DistilLoss:
    """The ``DistilLoss`` of a kind name (one of :data:`SOFT_LOSSES`): ``temperature`` defaults to 1.0,
    ``beta`` (jsd) to 0.5, ``alpha`` to 0.1 (skew KLs) and 0.5 (``alpha_divergence``)."""
    if kind not in SOFT_LOSSES:
        raise V.InvalidParameterError(f"soft_loss must be a DistilLoss or one of {SOFT_LOSSES}, got {kind!r}")
    tau = 1.0 if temperature is None else V.loss_temperature(temperature)
    b = 0.5 if beta is None else beta
    a = 0.1 if alpha is None else alpha
    if kind == "mse":
        return DistilLoss.mse()
    if kind == "cosine":
        return DistilLoss.cosine()
    if kind == "jsd":
        return DistilLoss.jsd(beta=b, temperature=tau, t2_scale=t2_scale)
    if kind == "skew_kl":
        return DistilLoss.skew_kl(alpha=a, temperature=tau, t2_scale=t2_scale)
    if kind == "skew_reverse_kl":
        return DistilLoss.skew_reverse_kl(alpha=a, temperature=tau, t2_scale=t2_scale)
    if kind == "alpha_divergence":
        return DistilLoss.alpha_divergence(0.5 if alpha is None else alpha, tau, t2_scale=t2_scale)
    return getattr(DistilLoss, kind)(tau, t2_scale=t2_scale)  # kl_divergence, reverse_kl, tvd

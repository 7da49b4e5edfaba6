"""Differential fuzzing of the response losses: explicit hypothesis generators of adversarial cases, float64
references written from the definitions of the API contract, and the agreement rules between a front door
and the reference (and between front doors).

A :class:`Case` is one call: a loss (every soft loss, ``combined``, the hard-label term alone, or both
mixed), its parameters (temperature from 1e-3 to the bound 1e4, ``t2_scale``, beta / alpha at and inside
[0, 1], label smoothing), the student's storage and the teacher's (float32, float64, float16, bfloat16
and mixed pairs), a dense teacher or a sparse one (each tail, both kinds, unused ``-1`` slots, any float
dtype of values), the reduction, ``num_items``, labels with ignored rows, leading dimensions and the
gradient buffer (a fresh one, a buffer of its own, the student itself, float32 beside a 16-bit student).
Its values are drawn from a base of random logits (scale 1 to 100: gaps of 30-100) and a short list of
patches that shrink well: ``-inf`` and ``-1e9`` masks, NaN and +-inf in either input, large logits,
subnormals, whole rows of one value.

The references (:func:`reference`) are float64 PyTorch autograd of the contract's formulas on the values
the library reads (a teacher converted to the storage the contract names for a mixed pair), row by row:
an ignored row contributes 0 and a zero gradient, a row whose reference loss is infinite has its loss
checked (``+inf``) but not its gradient (no derivative of an infinite value), a NaN row must be NaN.

Agreement rules (:func:`check_against_reference`):

- float32 arithmetic (float32 and 16-bit logits, a float32 gradient buffer): the loss within 1e-5 of the
  reference relative to its *condition*, the sum of the absolute values of the terms it adds (a divergence
  is a sum of ``p (log p - log q)`` terms of both signs; for a row whose terms do not cancel this is the
  value itself); each gradient element within 1e-5 of the largest magnitude among its row's terms.
- float64: the same at 1e-9.
- 16-bit gradients: the float32 rule, plus one unit in the last place of the gradient's dtype (the float32
  value rounded once; a value that rounds to +-inf in that dtype must be that infinity).
- NaN exactly where the reference is NaN (loss rows, gradient elements of rows with a finite or NaN
  reference loss); ``+inf`` where the reference loss is ``+inf``; a divergence is never negative.

Between front doors (see ``test_fuzz.py``): bitwise where the code path is shared (``ResponseDistiller``
vs ``DistilLoss``, the C ABI vs the NumPy API, ``fastdistill.torch`` eager and compiled vs the NumPy API),
the reference rules otherwise (vocabulary shards, the fused head, the CUDA simulator).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

import fastdistill as fd
from fastdistill import _spec

try:  # bfloat16 NumPy arrays (a dev dependency of the tests)
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    ml_dtypes = None
    BF16 = None

from hypothesis import strategies as st

IGNORE = -100
DIVERGENCES = ("kl_divergence", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "alpha_divergence")
KINDS = DIVERGENCES + ("mse", "cosine", "combined", "ce_only")
STORAGES = ("float32", "float64", "bfloat16", "float16")
HALF = ("bfloat16", "float16")
TAILS = ("renormalize", "support", "bucket")
# temperatures: the shared normaliser (1), the power variants (2, 4), float32 arithmetic (0.5, 3, 20), float64
# arithmetic for float32 logits (above 32), the far ends of the accepted range (1e-3 .. 1e4)
TAUS = (1.0, 2.0, 4.0, 3.0, 0.5, 20.0, 40.0, 1e-3, 1e-2, 1e3, 1e4)
RTOL = {"float32": 1e-5, "float64": 1e-9}
# a divergence is resolved to this many nats (times its weight and tau**2) besides RTOL of its terms: its
# normalisers' logarithms (lse_t - lse_s) carry a few units of the arithmetic's rounding whatever the
# divergence's size (a teacher equal to the student up to 1e-6 has a KL of 1e-13)
FLOOR = {"float32": 1e-6, "float64": 1e-14}
# values a patch may write: masks, non-finite values, gaps, subnormals (float64, float32, float16)
SPECIALS = (-np.inf, -1e9, np.nan, np.inf, 100.0, -100.0, 60.0, 30.0, 0.0, -0.0,
            5e-324, -1e-310, 1e-40, -1e-45, 6e-8, 1e30, -1e30, 65504.0, 1e9)


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        if BF16 is None:  # pragma: no cover
            raise RuntimeError("bfloat16 cases need ml_dtypes")
        return BF16
    return np.dtype(name)


def storage_of(dtype: Any) -> str:
    d = np.dtype(dtype)
    return "bfloat16" if BF16 is not None and d == BF16 else d.name


def read_storage(student: str, teacher: str) -> str:
    """The storage the contract says a teacher is read in beside a student (usage.md, mixed formats): as it
    is when the pair is the same, a float32 teacher beside a 16-bit student or a 16-bit teacher beside a
    float32 one; else converted once, to float32 beside a 16-bit student, to the student's storage
    otherwise."""
    if teacher == student or (student in HALF and teacher == "float32") or (student == "float32" and teacher in HALF):
        return teacher
    return "float32" if student in HALF else student


def math_storage(student: str, grad: str) -> str:
    """float64 for float64 logits, float32 arithmetic otherwise (its tolerance)."""
    return "float64" if student == "float64" else "float32"


# ------------------------------------------------------------------ the case


@dataclasses.dataclass
class SparseSpec:
    indices: np.ndarray  # int64, lead + (k,)
    values: np.ndarray  # float64 as drawn, lead + (k,)
    values_dtype: str
    kind: str  # "logprobs" | "logits"
    tail: str

    def values_as_given(self) -> np.ndarray:
        return self.values.astype(np_dtype(self.values_dtype))


@dataclasses.dataclass
class Case:
    kind: str
    param: float  # beta (jsd), alpha (skew losses), the MSE weight of "combined"
    tau: float
    t2: bool
    hard_w: float
    soft_w: float
    eps: float  # label smoothing
    ignore_index: int
    reduction: str
    num_items: float | None
    s: np.ndarray  # float64 values as drawn, lead + (n,)
    s_dtype: str
    t: np.ndarray | None  # dense teacher, float64 values as drawn
    t_dtype: str
    sparse: SparseSpec | None
    labels: np.ndarray | None  # int64, lead
    grad: str  # "new" | "buffer" | "inplace" | "float32"

    # -------------------------------------------------------------- inputs as a front door receives them
    def student(self) -> np.ndarray:
        return self.s.astype(np_dtype(self.s_dtype))

    def teacher(self) -> Any:
        if self.sparse is not None:
            sp = self.sparse
            return fd.SparseTeacher(sp.indices.copy(), sp.values_as_given(), kind=sp.kind, tail=sp.tail)
        return self.t.astype(np_dtype(self.t_dtype))

    def grad_storage(self) -> str:
        return "float32" if self.grad == "float32" else self.s_dtype

    def soft_loss(self) -> fd.DistilLoss:
        k, p, tau, t2 = self.kind, self.param, self.tau, self.t2
        if k in ("kl_divergence", "ce_only"):
            return fd.DistilLoss.kl_divergence(tau, t2_scale=t2)
        if k == "reverse_kl":
            return fd.DistilLoss.reverse_kl(tau, t2_scale=t2)
        if k == "jsd":
            return fd.DistilLoss.jsd(p, tau, t2_scale=t2)
        if k == "skew_kl":
            return fd.DistilLoss.skew_kl(p, tau, t2_scale=t2)
        if k == "skew_reverse_kl":
            return fd.DistilLoss.skew_reverse_kl(p, tau, t2_scale=t2)
        if k == "tvd":
            return fd.DistilLoss.tvd(tau, t2_scale=t2)
        if k == "alpha_divergence":
            return fd.DistilLoss.alpha_divergence(p, tau, t2_scale=t2)
        if k == "mse":
            return fd.DistilLoss.mse()
        if k == "cosine":
            return fd.DistilLoss.cosine()
        return fd.DistilLoss.combined(1.0, p, tau, t2_scale=t2)

    def distiller(self) -> fd.ResponseDistiller:
        soft_w = 0.0 if self.kind == "ce_only" else self.soft_w
        return fd.ResponseDistiller(self.soft_loss(), self.hard_w, soft_w, ignore_index=self.ignore_index,
                                    label_smoothing=self.eps)

    def effective_soft_w(self) -> float:
        return 0.0 if self.kind == "ce_only" else self.soft_w

    @property
    def soft_only(self) -> bool:
        """Whether ``DistilLoss.compute_with_grad`` computes the same loss (no hard-label term, weight 1)."""
        return self.hard_w == 0.0 and self.effective_soft_w() == 1.0 and self.kind != "ce_only"

    def variant(self) -> _spec.Variant:
        """The kernel variant of the façade's table this case runs (for the bounded profile's choice)."""
        d = self.distiller()
        t_store = self.s_dtype if self.sparse is not None else read_storage(self.s_dtype, self.t_dtype)
        g_store = self.grad_storage()
        return _spec.resolve(d.terms(), self.labels is not None, self.s_dtype, t_store, g_store)

    # -------------------------------------------------------------- reproduction
    def code(self) -> str:
        """Python that rebuilds this case (``from fuzzing import *`` in ``tests/``)."""
        def arr(a: np.ndarray | None) -> str:
            if a is None:
                return "None"
            if a.dtype.kind in "iu":
                return f"np.array({a.tolist()!r}, dtype=np.int64)"
            return f"np.array({_floats(a.tolist())}, dtype=np.float64)"

        sp = "None"
        if self.sparse is not None:
            s = self.sparse
            sp = (f"SparseSpec(indices={arr(s.indices)}, values={arr(s.values)}, values_dtype={s.values_dtype!r}, "
                  f"kind={s.kind!r}, tail={s.tail!r})")
        return (f"Case(kind={self.kind!r}, param={self.param!r}, tau={self.tau!r}, t2={self.t2!r}, "
                f"hard_w={self.hard_w!r}, soft_w={self.soft_w!r}, eps={self.eps!r}, "
                f"ignore_index={self.ignore_index!r}, reduction={self.reduction!r}, num_items={self.num_items!r}, "
                f"s={arr(self.s)}, s_dtype={self.s_dtype!r}, t={arr(self.t)}, t_dtype={self.t_dtype!r}, "
                f"sparse={sp}, labels={arr(self.labels)}, grad={self.grad!r})")

    def __repr__(self) -> str:  # hypothesis prints the falsifying example with this
        return self.code()


def _floats(x: Any) -> str:
    if isinstance(x, list):
        return "[" + ", ".join(_floats(v) for v in x) + "]"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(float(x))


nan, inf = float("nan"), float("inf")  # for the reproductions' literals


# ------------------------------------------------------------------ generators


@st.composite
def loss_config(draw: Any, sparse: bool = False) -> dict:
    kinds = DIVERGENCES + ("ce_only",) if sparse else KINDS
    kind = draw(st.sampled_from(kinds))
    param = 0.0
    if kind == "jsd":
        param = draw(st.sampled_from([0.5, 0.0, 1.0, 0.1, 0.9]) | st.floats(0.0, 1.0))
    elif kind in ("skew_kl", "skew_reverse_kl"):
        param = draw(st.sampled_from([0.1, 0.0, 1.0, 0.5]) | st.floats(0.0, 1.0))
    elif kind == "alpha_divergence":
        # (its precision near 0 and 1, where the float64 reference below cancels, is tests/test_formulas.py's)
        param = draw(st.sampled_from([0.5, 0.0, 1.0, 0.1, 0.9]) | st.floats(0.01, 0.99))
    elif kind == "combined":
        param = draw(st.sampled_from([0.5, 1.0, 0.0, 2.0]))
    tau = 1.0 if kind in ("mse", "cosine") else draw(st.sampled_from(TAUS) | st.floats(1e-3, 1e4))
    t2 = draw(st.booleans()) if kind not in ("mse", "cosine") else True
    hard_w = draw(st.sampled_from([0.0, 0.5, 1.0, 0.3, 2.5]))
    soft_w = draw(st.sampled_from([1.0, 0.5, 0.7, 2.0]))
    eps = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])) if hard_w else 0.0
    if kind == "ce_only":
        hard_w = hard_w or 1.0
    return dict(kind=kind, param=float(param), tau=float(tau), t2=t2, hard_w=hard_w, soft_w=soft_w, eps=eps)


@st.composite
def values(draw: Any, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Random logits of one scale and a few patches (special values at single positions, or whole rows)."""
    n = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=scale, size=(rows, n))
    patches = draw(st.lists(st.tuples(st.integers(0, rows - 1), st.integers(-1, n - 1), st.sampled_from(SPECIALS)),
                            max_size=4))
    for r, c, v in patches:
        if c < 0:  # the whole row
            x[r, :] = v
        else:
            x[r, c] = v
    return x.reshape(shape)


def _round_trip(x: np.ndarray, storage: str) -> np.ndarray:
    return x.astype(np_dtype(storage)).astype(np.float64)


@st.composite
def cases(draw: Any, *, storages: tuple[str, ...] = STORAGES, mixed: bool = True, sparse: bool | None = None,
          max_rows: int = 6, widths: tuple[int, ...] = (1, 2, 3, 5, 8, 17, 33, 64), wide: int = 0,
          grad_modes: tuple[str, ...] = ("new", "buffer", "inplace", "float32"),
          reductions: tuple[str, ...] = ("mean", "sum", "none")) -> Case:
    """One case; ``wide``: a width drawn now and then (rows longer than a span or a thread's share)."""
    is_sparse = draw(st.booleans()) if sparse is None else sparse
    cfg = draw(loss_config(sparse=is_sparse))
    lead_kind = draw(st.sampled_from(["2d", "2d", "1d", "3d"]))
    if lead_kind == "1d":
        lead: tuple[int, ...] = ()
    elif lead_kind == "3d":
        lead = (draw(st.integers(1, 2)), draw(st.integers(1, 3)))
    else:
        lead = (draw(st.integers(1, max_rows)),)
    n = draw(st.sampled_from(widths + ((wide,) if wide else ())))
    shape = lead + (n,)
    rows = int(np.prod(lead, dtype=np.int64))
    s_dtype = draw(st.sampled_from(storages))
    t_dtype = s_dtype
    if mixed and not is_sparse and draw(st.integers(0, 3)) == 0:
        t_dtype = draw(st.sampled_from(storages))
    scale = draw(st.sampled_from([2.0, 1.0, 5.0, 30.0, 100.0]))
    s = draw(values(shape, scale))
    t = None
    spec = None
    relation = draw(st.sampled_from(["independent", "close", "same"]))
    if not is_sparse:
        t = draw(values(shape, scale))
        if relation != "independent":  # a teacher near (or equal to) the student: divergences near 0
            noise = 0.0 if relation == "same" else draw(st.sampled_from([1e-3, 1e-6, 0.1]))
            base = _round_trip(s, s_dtype)
            t = np.where(np.isfinite(t), base + noise * np.nan_to_num(t) / max(scale, 1.0), t)
    else:
        spec = draw(sparse_teacher(s, shape, cfg))
    # labels
    labels = None
    if cfg["hard_w"] or draw(st.booleans()):
        ignore_index = draw(st.sampled_from([IGNORE, IGNORE, -1, n + 3]))
        lab = np.asarray(draw(st.lists(st.integers(0, n - 1), min_size=rows, max_size=rows)), np.int64)
        ignored = np.asarray(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)), bool)
        if draw(st.integers(0, 9)) == 0:
            ignored[:] = True
        labels = np.where(ignored, ignore_index, lab).reshape(lead)
    else:
        ignore_index = IGNORE
        cfg["hard_w"] = 0.0
        cfg["eps"] = 0.0
        if cfg["kind"] == "ce_only":
            cfg["kind"] = "kl_divergence"
    reduction = draw(st.sampled_from(reductions))
    num_items = draw(st.sampled_from([None, None, 7.0, 0.5, 1e6])) if reduction == "mean" else None
    modes = [m for m in grad_modes if m != "float32" or s_dtype in HALF]
    grad = draw(st.sampled_from(modes))
    return Case(s=s, s_dtype=s_dtype, t=t, t_dtype=t_dtype, sparse=spec, labels=labels, ignore_index=ignore_index,
                reduction=reduction, num_items=num_items, grad=grad, **cfg)


@st.composite
def sparse_teacher(draw: Any, s: np.ndarray, shape: tuple[int, ...], cfg: dict) -> SparseSpec:
    n = shape[-1]
    lead = shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    kind, tau, param = cfg["kind"], cfg["tau"], cfg["param"]
    tails = list(TAILS)
    # the contract's refusals (reverse KL and jsd(beta=1) are infinite with "renormalize"; "bucket" needs
    # log-probabilities at temperature 1)
    if kind == "reverse_kl" or (kind == "jsd" and param == 1.0) or (kind == "skew_reverse_kl" and param == 0.0) \
            or (kind == "alpha_divergence" and param == 0.0):
        tails.remove("renormalize")
    tail = draw(st.sampled_from(tails))
    if tail == "bucket" and kind != "ce_only":
        cfg["tau"] = tau = 1.0
    vkind = "logprobs" if tail == "bucket" else draw(st.sampled_from(["logprobs", "logits"]))
    k = draw(st.integers(1, n))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    teacher = rng.normal(scale=draw(st.sampled_from([2.0, 10.0, 40.0])), size=(rows, n))
    how = draw(st.sampled_from(["top", "random"]))
    if how == "top":
        idx = np.argsort(-teacher, axis=1, kind="stable")[:, :k]
    else:
        idx = np.argsort(rng.random((rows, n)), axis=1)[:, :k]
    lp = teacher - teacher.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    vals = np.take_along_axis(lp if vkind == "logprobs" else teacher, idx, 1)
    idx = idx.astype(np.int64)
    # unused slots (-1) anywhere in a row, their values anything
    pads = draw(st.lists(st.tuples(st.integers(0, rows - 1), st.integers(0, k - 1),
                                   st.sampled_from([0.0, np.nan, np.inf, -3.0])), max_size=3))
    for r, c, v in pads:
        idx[r, c] = -1
        vals[r, c] = v
    # special values in used slots (bucket: log-probabilities <= 0, +inf is a refusal)
    specials = [-np.inf, np.nan, -1e9, -60.0, 0.0, -1e-40] + ([] if tail == "bucket" else [np.inf, 30.0])
    patches = draw(st.lists(st.tuples(st.integers(0, rows - 1), st.integers(0, k - 1), st.sampled_from(specials)),
                            max_size=2))
    for r, c, v in patches:
        if idx[r, c] >= 0:
            vals[r, c] = v
    vdt = draw(st.sampled_from(["float32", "float32", "float64", "float16"]))
    if vdt == "float16" and tail == "bucket":
        vdt = "float32"
    return SparseSpec(indices=idx.reshape(lead + (k,)), values=vals.reshape(lead + (k,)), values_dtype=vdt,
                      kind=vkind, tail=tail)


# ------------------------------------------------------------------ references (float64, from the definitions)


@dataclasses.dataclass
class Ref:
    rows: np.ndarray  # (rows,) loss of each row as the reduction weighs it (0 for an ignored row), unreduced
    weights: np.ndarray  # (rows,) the reduction's factor of each row (1/count for mean, 0 ignored)
    loss: Any  # float, or the per-row array for "none"
    grad: np.ndarray  # (rows, n) float64
    cond: np.ndarray  # (rows,) the sum of the absolute values of each row's terms (before the reduction)
    floor: np.ndarray  # (rows,) what the arithmetic resolves of a divergence (FLOOR nats, times its weight)
    gscale: np.ndarray  # (rows,) largest magnitude among a row's gradient terms (after the reduction)
    counted: np.ndarray  # (rows,) bool


def _torch():
    import torch

    return torch


# the flushed reference's threshold: log of the smallest subnormal of the arithmetic (a probability below
# it is 0 to the kernels, whose exponentials underflow there)
LOG_TINY = {"float32": math.log(2.0**-149), "float64": math.log(5e-324)}
_FLUSH: list = [None]  # the threshold in force (None: exact)


def _kl(la, lb):
    """sum a (log a - log b) over the last axis, a = exp(la): 0 where a is 0 (log a = -inf), +inf where a > 0
    and b = 0, also when a underflows (the exact value; the flushed reference drops terms with log a below
    the arithmetic's smallest subnormal instead). NaN stays NaN."""
    torch = _torch()
    a = la.exp()
    zero = la == -math.inf
    if _FLUSH[0] is not None:
        zero = zero | (la < _FLUSH[0])
    d = torch.where(zero, torch.zeros_like(la), la - lb)
    term = a * d
    infinite = ~zero & (lb == -math.inf) & (la > -math.inf)
    term = torch.where(infinite, torch.full_like(term, math.inf), term)
    return term.sum(-1), torch.where(infinite, torch.zeros_like(term), term.abs()).sum(-1)


def _stand_in(la):
    """-inf log-probabilities as a finite stand-in (autograd of the mixture's log-sum-exp at -inf is NaN)."""
    torch = _torch()
    return torch.where(la == -math.inf, torch.full_like(la, -1e300), la)


def _mix(lp, lq, wp: float, wq: float):
    """log(wp p + wq q), by log-sum-exp of the log-probabilities."""
    torch = _torch()
    parts = []
    if wp > 0:
        parts.append(_stand_in(lp) + math.log(wp))
    if wq > 0:
        parts.append(_stand_in(lq) + math.log(wq))
    return parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts), 0)


def divergence(kind: str, param: float, lp, lq):
    """(divergence, condition) per row between distributions given by log-probabilities over the last axis
    (README's loss table; jsd beta=0 / 1 and the skews at 0 / 1 are their limits). A NaN in either
    distribution makes the row NaN, also where the limit does not read it (skew_reverse_kl at 1 is
    KL(q || q)): the contract's NaN propagation."""
    d, c = _divergence(kind, param, lp, lq)
    torch = _torch()
    undefined = torch.isnan(lp.detach()).any(-1) | torch.isnan(lq.detach()).any(-1)
    return d + torch.where(undefined, math.nan, 0.0), c


def _divergence(kind: str, param: float, lp, lq):
    torch = _torch()
    if kind == "kl_divergence" or (kind == "jsd" and param == 0.0) or (kind == "skew_kl" and param == 0.0):
        return _kl(lp, lq)
    if kind == "reverse_kl" or (kind == "jsd" and param == 1.0) or (kind == "skew_reverse_kl" and param == 0.0):
        return _kl(lq, lp)
    if kind == "jsd":
        lm = _mix(lp, lq, param, 1 - param)
        a, ca = _kl(lp, lm)
        b, cb = _kl(lq, lm)
        return param * a + (1 - param) * b, param * ca + (1 - param) * cb
    if kind == "skew_kl":
        return _kl(lp, _mix(lp, lq, param, 1 - param) if param < 1 else lp)
    if kind == "skew_reverse_kl":
        return _kl(lq, _mix(lp, lq, 1 - param, param) if param < 1 else lq)
    if kind == "tvd":
        d = (lp.exp() - lq.exp()).abs()
        return 0.5 * d.sum(-1), 0.5 * d.sum(-1)
    if kind == "alpha_divergence":
        if param == 0.0:
            return _kl(lq, lp)
        if param == 1.0:
            return _kl(lp, lq)
        # Amari's, sum (a p + (1 - a) q - p^a q^(1-a)) / (a (1 - a)): each term is >= 0; its condition counts
        # the parts whose difference it is
        a = param
        p, q = lp.exp(), lq.exp()
        w = torch.exp(a * _stand_in(lp) + (1 - a) * _stand_in(lq))
        c = a * (1 - a)
        return ((a * p + (1 - a) * q - w) / c).sum(-1), ((a * p + (1 - a) * q + w) / c).sum(-1)
    raise ValueError(kind)


def _t2(case: Case) -> float:
    if case.kind == "tvd" or not case.t2:
        return 1.0
    return case.tau * case.tau


def _gfactor(case: Case) -> float:
    """The factor of a divergence's gradient with respect to the logits (t2 / tau)."""
    return _t2(case) / case.tau


def _dense_soft(case: Case, st_, tt):
    """(soft rows, condition rows, gradient magnitude rows) of a dense teacher."""
    torch = _torch()
    F = torch.nn.functional
    tau = case.tau
    kind = case.kind
    rows = st_.shape[0]
    zero = torch.zeros(rows, dtype=torch.float64)
    if kind == "mse":
        d2 = (tt - st_) ** 2
        return d2.mean(-1), d2.detach().mean(-1), _mse_magnitude(st_, tt)
    if kind == "cosine":
        return _cosine(st_, tt)
    lp = F.log_softmax(tt / tau, -1)
    lq = F.log_softmax(st_ / tau, -1)
    dkind = "kl_divergence" if kind == "combined" else kind
    d, c = divergence(dkind, case.param, lp, lq)
    d = _t2(case) * d
    c = _t2(case) * c.detach()
    mag = _gfactor(case) * _grad_magnitude(lp.detach(), lq.detach())
    if kind == "combined":
        d2 = (tt - st_) ** 2
        d = d + case.param * d2.mean(-1)
        c = c + case.param * d2.detach().mean(-1)
        mag = mag + case.param * _mse_magnitude(st_, tt)
    return d, c, mag + zero


def _mse_magnitude(st_, tt):
    """Largest magnitude among the MSE gradient's terms of a row: 2 (|s| + |t|) / n (finite elements)."""
    a = (tt.detach().abs() + st_.detach().abs()).nan_to_num(0.0, posinf=0.0)
    return 2 * a.amax(-1) / st_.shape[1]


def _grad_magnitude(lp, lq):
    """Largest magnitude among a divergence's gradient terms of a row: (p + q)(1 + |log p - log q|)."""
    torch = _torch()
    p, q = lp.exp(), lq.exp()
    diff = torch.where(lp.isfinite() & lq.isfinite(), (lp - lq).abs(), torch.zeros_like(p))
    m = ((p + q) * (1 + diff)).nan_to_num(0.0)
    return m.amax(-1)


def _cosine(st_, tt):
    """1 - cos(s, t), 1 for a zero-norm row (its gradient 0); the gradient of README's formula."""
    torch = _torch()
    s, t = st_.detach(), tt.detach()
    ns = s.norm(dim=-1)
    nt = t.norm(dim=-1)
    den = ns * nt
    ok = den > 0
    dot = (s * t).sum(-1)
    safe = torch.where(ok, den, torch.ones_like(den))
    cos = dot / safe
    loss = torch.where(ok | den.isnan(), 1 - cos, torch.ones_like(cos))
    g = -t / safe[:, None] + (cos / torch.where(ok, ns * ns, torch.ones_like(ns)))[:, None] * s
    g = torch.where((ok | den.isnan())[:, None], g, torch.zeros_like(g))
    # a function of st_ whose value is loss and whose gradient is g (autograd of the norm at 0 is NaN)
    value = loss + (st_ * g).sum(-1) - (st_ * g).sum(-1).detach()
    mag = (t.abs() / safe[:, None]).amax(-1) + (cos.abs() / torch.where(ok, ns, torch.ones_like(ns))) * 1.0
    return value, torch.ones_like(loss), torch.where(ok, mag, torch.zeros_like(mag))


def _sparse_soft(case: Case, st_):
    """(soft rows, condition rows, gradient magnitude rows) of a sparse teacher, from the tails' definitions."""
    torch = _torch()
    F = torch.nn.functional
    sp = case.sparse
    rows, n = st_.shape
    idx = sp.indices.reshape(rows, -1)
    v = sp.values_as_given().astype(np.float64).reshape(rows, -1)
    tau = case.tau
    out, cond, mag = [], [], []
    lq_full = F.log_softmax(st_ / tau, -1)
    for r in range(rows):
        used = idx[r] >= 0
        ids = torch.tensor(idx[r][used], dtype=torch.int64)
        vr = torch.tensor(v[r][used], dtype=torch.float64)
        if len(ids) == 0 and sp.tail != "bucket":  # no teacher distribution (bucket: all in the rest bin)
            nanv = st_[r].sum() * math.nan
            out.append(nanv)
            cond.append(torch.tensor(0.0, dtype=torch.float64))
            mag.append(torch.tensor(0.0, dtype=torch.float64))
            continue
        if sp.tail == "renormalize":
            lp_s = F.log_softmax(vr / tau, -1)
            lp = torch.full((n,), -math.inf, dtype=torch.float64)
            lp = lp.index_put((ids,), lp_s)
            if torch.isnan(lp_s).any():  # the whole row has no distribution
                lp = lp + math.nan
            lq = lq_full[r]
        elif sp.tail == "support":
            lp = F.log_softmax(vr / tau, -1)
            lq = F.log_softmax(st_[r, ids] / tau, -1)
            if torch.isnan(lq_full[r]).any():  # q = softmax(s / tau) over the whole row is undefined
                lq = lq + math.nan
        else:  # bucket, tau == 1: k + 1 bins
            p = vr.exp()
            p_rest = torch.clamp(1 - p.sum(), min=0.0) if len(ids) else torch.tensor(1.0, dtype=torch.float64)
            if torch.isnan(p).any():
                p_rest = p_rest + math.nan
            lp = torch.cat([vr, torch.log(p_rest).reshape(1)])
            off = torch.ones(n, dtype=torch.bool)
            off[ids] = False
            lq_rest = torch.logsumexp(lq_full[r][off], -1) if bool(off.any()) else \
                torch.tensor(-math.inf, dtype=torch.float64)
            lq = torch.cat([lq_full[r][ids], lq_rest.reshape(1)])
        d, c = divergence(case.kind if case.kind != "ce_only" else "kl_divergence", case.param, lp[None], lq[None])
        out.append(_t2(case) * d[0])
        cond.append(_t2(case) * c[0].detach())
        mag.append(_gfactor(case) * _grad_magnitude(lp.detach()[None], lq.detach()[None])[0])
    return torch.stack(out), torch.stack(cond), torch.stack(mag)


def references(case: Case) -> list[Ref]:
    """The exact reference and, where it differs, the flushed one (probabilities below the arithmetic's
    smallest subnormal taken as 0): a front door may meet either."""
    exact = reference(case)
    _FLUSH[0] = LOG_TINY[case.variant().math if case.effective_soft_w() else "float64"]
    try:
        flushed = reference(case)
    finally:
        _FLUSH[0] = None
    same = np.array_equal(exact.rows, flushed.rows, equal_nan=True) and \
        np.array_equal(exact.grad, flushed.grad, equal_nan=True)
    return [exact] if same else [exact, flushed]


def reference(case: Case) -> Ref:
    """The case's loss and gradient in float64, from the contract's definitions (see the module docstring)."""
    torch = _torch()
    F = torch.nn.functional
    n = case.s.shape[-1]
    s64 = _round_trip(case.s, case.s_dtype).reshape(-1, n)
    rows = s64.shape[0]
    st_ = torch.tensor(s64, requires_grad=True)
    soft_w = case.effective_soft_w()
    zero = torch.zeros(rows, dtype=torch.float64)
    total = zero
    cond = torch.zeros(rows, dtype=torch.float64)
    mag = torch.zeros(rows, dtype=torch.float64)
    floor = np.zeros(rows)
    whole_nan = np.zeros(rows, bool)
    if soft_w != 0.0:
        if case.kind not in ("mse", "cosine"):
            floor += abs(soft_w) * _t2(case) * FLOOR[math_storage(case.s_dtype, case.grad_storage())]
        if case.sparse is not None:
            soft, c, m = _sparse_soft(case, st_)
        else:
            t64 = _round_trip(_round_trip(case.t, case.t_dtype), read_storage(case.s_dtype, case.t_dtype))
            soft, c, m = _dense_soft(case, st_, torch.tensor(t64.reshape(-1, n)))
        total = total + soft_w * soft
        if case.kind != "mse":  # a softmax (or the norms) of the row: a NaN loss has a NaN gradient row
            whole_nan |= np.isnan(soft.detach().numpy())
        cond = cond + abs(soft_w) * c
        mag = mag + abs(soft_w) * m
    counted = np.ones(rows, bool)
    if case.labels is not None:
        lab = case.labels.reshape(-1)
        counted = lab != case.ignore_index
        if case.hard_w != 0.0:
            y = torch.tensor(np.where(counted, lab, 0))
            lq1 = F.log_softmax(st_, -1)
            nll = -lq1.gather(1, y[:, None])[:, 0]
            ce = (1 - case.eps) * nll
            c_ce = (1 - case.eps) * nll.detach().abs()
            if case.eps:
                ce = ce - case.eps * lq1.mean(-1)
                lse = torch.logsumexp(st_.detach(), -1)
                c_ce = c_ce + case.eps * (lse.abs() + st_.detach().abs().mean(-1))
            total = total + case.hard_w * ce
            whole_nan |= np.isnan(ce.detach().numpy())
            cond = cond + abs(case.hard_w) * c_ce
            mag = mag + abs(case.hard_w) * 2.0
    count = int(counted.sum())
    if case.reduction == "mean":
        div = case.num_items if case.num_items is not None else count
        w = np.where(counted, 1.0 / div if div else 0.0, 0.0)
    else:
        w = counted.astype(np.float64)
    wt = torch.tensor(w)
    keep = torch.tensor(counted)
    # rows computed on their own: an ignored row is 0 with a zero gradient whatever its values
    rows_loss = torch.where(keep, total, torch.zeros_like(total))
    if counted.any() and total.requires_grad:
        torch.where(keep, total * wt, torch.zeros_like(total)).sum().backward()
    grad = st_.grad.numpy().copy() if st_.grad is not None else np.zeros_like(s64)
    grad[whole_nan] = np.nan  # the contract: a row without a distribution has a NaN loss and gradient
    grad[~counted] = 0.0
    r = rows_loss.detach().numpy()
    cond = np.where(counted, np.nan_to_num(cond.detach().numpy(), nan=0.0, posinf=0.0), 0.0)
    floor = np.where(counted, floor, 0.0)
    mag = np.where(counted, np.nan_to_num(mag.detach().numpy(), nan=0.0, posinf=0.0), 0.0)
    if case.reduction == "none":
        loss = r.reshape(case.s.shape[:-1])
    else:
        with np.errstate(invalid="ignore"):
            loss = float((r * w).sum()) if counted.any() else 0.0
    return Ref(rows=r, weights=w, loss=loss, grad=grad, cond=cond, floor=floor, gscale=w * mag, counted=counted)


# ------------------------------------------------------------------ agreement rules


class Mismatch(AssertionError):
    """A front door disagrees with the reference or with another front door."""


def _ulp(x: np.ndarray, storage: str) -> np.ndarray:
    """One unit in the last place of |x| in ``storage`` (the spacing above |x| rounded to that storage)."""
    dt = np_dtype(storage)
    a = np.abs(x).astype(dt)
    with np.errstate(over="ignore", invalid="ignore"):
        if storage == "bfloat16":
            bits = a.view(np.uint16).astype(np.uint32) + 1
            up = bits.astype(np.uint16).view(dt).astype(np.float64)
        else:
            up = np.nextafter(a, np.array(np.inf, dt)).astype(np.float64)
        return np.abs(up - a.astype(np.float64))


def check_against_reference(case: Case, loss: Any, grad: Any, refs: list[Ref] | Ref, where: str,
                            grad_storage: str | None = None, loss_storage: str | None = None) -> None:
    """Raise :class:`Mismatch` unless ``(loss, grad)`` of a front door meet the agreement rules against one
    of ``refs`` (:func:`references`)."""
    first = None
    for ref in (refs if isinstance(refs, list) else [refs]):
        try:
            return _check_one(case, loss, grad, ref, where, grad_storage, loss_storage)
        except Mismatch as exc:
            first = first or exc
    raise first


def _check_one(case: Case, loss: Any, grad: Any, ref: Ref, where: str, grad_storage: str | None,
               loss_storage: str | None) -> None:
    math_s = math_storage(case.s_dtype, case.grad_storage())
    rtol = RTOL[math_s]
    n = case.s.shape[-1]
    shape = case.s.shape
    # ---- the loss
    if case.reduction == "none":
        got = np.asarray(loss)
        if got.shape != shape[:-1]:
            raise Mismatch(f"{where}: per-row loss shape {got.shape}, expected {shape[:-1]}")
        want_dtype = "float32" if case.s_dtype in HALF else case.s_dtype
        if storage_of(got.dtype) != want_dtype:
            raise Mismatch(f"{where}: per-row loss dtype {got.dtype}, expected {want_dtype}")
        with np.errstate(over="ignore"):
            rows_rounded = ref.rows.astype(got.dtype).astype(np.float64)  # (float32 rows of 1e59: inf)
        _check_values(got.reshape(-1).astype(np.float64), ref.rows,
                      rtol * (np.abs(ref.rows) + ref.cond) + ref.floor, f"{where}: loss rows", rounded=rows_rounded)
        _check_sign(case, got.reshape(-1), where)
    else:
        if not isinstance(loss, float) and loss_storage is None:
            raise Mismatch(f"{where}: a scalar loss must be a Python float, got {type(loss).__name__}")
        loss = float(loss)
        with np.errstate(invalid="ignore", over="ignore"):
            tol = float(np.nansum(ref.weights * (rtol * (np.abs(np.where(np.isfinite(ref.rows), ref.rows, 0))
                                                         + ref.cond) + ref.floor)))
        rounded = None
        if loss_storage is not None:  # a loss tensor of that dtype: the reference rounded to it may be +-inf
            with np.errstate(over="ignore"):
                rounded = np.array([ref.loss]).astype(np_dtype(loss_storage)).astype(np.float64)
        _check_values(np.array([loss]), np.array([ref.loss]), np.array([tol]), f"{where}: loss", rounded=rounded)
    if grad is None:
        return
    # ---- the gradient
    g = np.asarray(grad)
    gstore = grad_storage or case.grad_storage()
    if g.shape != shape:
        raise Mismatch(f"{where}: gradient shape {g.shape}, expected {shape}")
    if storage_of(g.dtype) != gstore:
        raise Mismatch(f"{where}: gradient dtype {g.dtype}, expected {gstore}")
    g64 = g.astype(np.float64).reshape(-1, n)
    finite_rows = ~np.isinf(ref.rows)  # a row of infinite loss: its gradient is not compared
    tol = rtol * ref.gscale[:, None] + np.zeros_like(g64)
    rounded = None
    if gstore in HALF:
        with np.errstate(invalid="ignore"):
            tol = tol + _ulp(ref.grad, gstore)
            rounded = ref.grad.astype(np_dtype(gstore)).astype(np.float64)
    s_in = _round_trip(case.s, case.s_dtype).reshape(-1, n)
    for r in np.flatnonzero(finite_rows):
        got_r = g64[r]
        want_r = ref.grad[r]
        if np.isnan(ref.rows[r]):  # a NaN row: NaN anywhere in its gradient is the row's NaN
            want_r = np.where(np.isnan(got_r), np.nan, want_r)
        if np.isnan(want_r).all():  # its masked (-inf) columns may keep a finite gradient (0, smoothing's)
            got_r = np.where((s_in[r] == -np.inf) & np.isfinite(got_r), np.nan, got_r)
        _check_values(got_r, want_r, tol[r], f"{where}: gradient row {r}",
                      rounded=None if rounded is None else rounded[r])


def _check_sign(case: Case, rows: np.ndarray, where: str) -> None:
    """A divergence is never negative (a value rounded below 0 is 0)."""
    if case.hard_w == 0.0 and case.effective_soft_w() > 0 and case.kind in DIVERGENCES and (rows < 0).any():
        raise Mismatch(f"{where}: a negative divergence {rows[rows < 0][0]!r}")


def _check_values(got: np.ndarray, want: np.ndarray, tol: np.ndarray, what: str, rounded: np.ndarray | None = None):
    gn, wn = np.isnan(got), np.isnan(want)
    if (gn != wn).any():
        i = int(np.flatnonzero(gn != wn)[0])
        raise Mismatch(f"{what}: NaN where the reference has {want[i]!r} (or the reverse: got {got[i]!r}) at {i}")
    ok = ~wn
    with np.errstate(invalid="ignore", over="ignore"):
        same_inf = np.isinf(want) & (got == want)
        if rounded is not None:
            same_inf |= np.isinf(rounded) & (got == rounded)
        err = np.abs(got - want)
        bad = ok & ~same_inf & ~(err <= tol)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise Mismatch(f"{what}: got {got[i]!r}, reference {want[i]!r} (tolerance {tol[i]:.3g}, error {err[i]:.3g}) "
                       f"at {i}")


def check_bitwise(a: Any, b: Any, what: str) -> None:
    """Equal bits (NaN equal to NaN)."""
    if isinstance(a, float) or isinstance(b, float):
        if not (a == b or (math.isnan(a) and math.isnan(b))):
            raise Mismatch(f"{what}: {a!r} != {b!r}")
        return
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape or x.dtype != y.dtype:
        raise Mismatch(f"{what}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}")
    if not np.array_equal(np.ascontiguousarray(x).view(np.uint8), np.ascontiguousarray(y).view(np.uint8)):
        with np.errstate(invalid="ignore"):
            d = np.flatnonzero(~((x == y) | (np.isnan(x.astype(np.float64)) & np.isnan(y.astype(np.float64)))))
        if d.size == 0:  # only the bits of NaNs or the sign of zeros differ
            return
        i = d[0]
        raise Mismatch(f"{what}: differ at {np.unravel_index(i, x.shape)}: {x.flat[i]!r} vs {y.flat[i]!r}")


# ------------------------------------------------------------------ the NumPy front door


def run_numpy(case: Case, *, api: str = "distiller") -> tuple[Any, Any]:
    """``ResponseDistiller.loss_and_grad`` (``api="distiller"``) or ``DistilLoss.compute_with_grad``
    (``api="distil_loss"``), with the case's gradient buffer."""
    s = case.student()
    teacher = case.teacher()
    kw: dict = dict(reduction=case.reduction)
    if case.num_items is not None:
        kw["num_items"] = case.num_items
    if case.grad == "buffer":
        kw["grad_out"] = np.full(s.shape, 7.0).astype(s.dtype)
    elif case.grad == "inplace":
        kw["grad_out"] = s
    elif case.grad == "float32":
        kw["grad_out"] = np.full(s.shape, 7.0, np.float32)
    if api == "distil_loss":
        loss, grad = case.soft_loss().compute_with_grad(s, teacher, **kw)
    else:
        loss, grad = case.distiller().loss_and_grad(s, teacher, case.labels, **kw)
    if "grad_out" in kw and grad is not kw["grad_out"]:
        raise Mismatch(f"{api}: grad_out was not returned as the gradient")
    return loss, grad


# ------------------------------------------------------------------ the bounded profile's variants


def _cheap_variant(v: _spec.Variant) -> bool:
    """Whether the rest of the suite compiles this variant too (``test_variant_table``: every variant of one
    storage, and of the mixed storages the forward KL with its own cross-entropy and the mixture)."""
    if not (v.teacher or v.grad):
        return True
    return (v.div, v.ce, v.lin, v.pw, v.math) in ((_spec.DIV_FORWARD_KL, _spec.CE_OWN, False, 0, "float32"),
                                                  (_spec.DIV_MIXTURE, _spec.CE_NONE, False, 0, "float32"))


def make_cheap(case: Case) -> Case:
    """The case with a teacher of the student's storage and a gradient of its own when its variant would
    compile only for the fuzzer (a second or more each: the bounded profile stays within the suite's)."""
    if case.sparse is not None:
        if case.grad == "float32":
            return dataclasses.replace(case, grad="buffer")
        return case
    if _cheap_variant(case.variant()):
        return case
    return dataclasses.replace(case, t_dtype=case.s_dtype, grad="buffer" if case.grad == "float32" else case.grad)


# ------------------------------------------------------------------ defects found and not fixed here


def known_defect(case: Any, door: str = "") -> str | None:
    """The name of the open defect (each has a strict xfail test in ``test_fuzz.py``) a case that failed its
    checks may have met: the fuzz tests count it apart and go on, so that they keep finding other ones."""
    if not isinstance(case, Case):
        return None
    if (case.sparse is not None and case.sparse.tail == "renormalize" and case.kind == "skew_reverse_kl"
            and 0.0 < case.param and 1.0 - case.param == 1.0):
        return "skew_reverse_kl_tiny_alpha_refused"
    n = case.s.shape[-1]
    s = _round_trip(case.s, case.s_dtype).reshape(-1, n)
    counted = np.ones(len(s), bool) if case.labels is None else case.labels.reshape(-1) != case.ignore_index
    if not counted.any():
        return None
    s = s[counted]
    tiny_weight = (case.kind == "skew_reverse_kl" and 0.0 < case.param and 1.0 - case.param == 1.0) or \
        (case.kind == "skew_kl" and case.param < 1.0 and 1.0 - case.param == 1.0)
    if case.effective_soft_w() and tiny_weight:
        return "mixture_of_a_weight_below_2**-53"
    if case.sparse is None and case.effective_soft_w() and case.t is not None:
        t = _round_trip(_round_trip(case.t, case.t_dtype), read_storage(case.s_dtype, case.t_dtype))
        t = t.reshape(-1, n)[counted]
        if case.kind == "cosine":
            ns = np.linalg.norm(s, axis=-1)
            if ((ns > 1e18) | ((ns > 0) & (ns < 1e-18))).any():
                return "cosine_gradient_of_extreme_norms"
    if door == "vocab-shards" and (not np.isfinite(s).all() or (case.t is not None and not np.isfinite(case.t).all())):
        return "vocab_shard_nan_row_finite_gradient"
    if door == "cuda-sim" and case.sparse is not None and (np.abs(s) >= 1e6).any():
        return "cuda_sparse_exponential_overflow"
    if door == "cuda-sim" and case.kind in ("mse", "cosine", "combined") and case.s_dtype != "float64" and \
            case.sparse is None:
        t = _round_trip(case.t, case.t_dtype).reshape(-1, n)[counted]
        both = np.concatenate([s, t], axis=-1)
        if (np.abs(np.where(np.isfinite(both), both, 0.0)) > 1.8e19).any():
            return "cuda_float32_linear_products_overflow"
    return None

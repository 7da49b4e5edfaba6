"""The numeric description of a response loss, and of the compiled code that evaluates it.

Every loss of the library (KL and its relatives, cross-entropy, MSE, cosine, and their weighted sums) is
one *response loss*: per row,

    hard_w * CE_eps(s, y) + div_w * D(s, t) + mse_w * MSE(s, t) + cos_w * COS(s, t)

where ``D`` is one divergence of the softmax distributions ``p = softmax(t/tau)``,
``q = softmax(s/tau)``. ``div_w`` already carries the tau**2 factor where the loss has it. Backends
receive a :class:`Terms` and never see ``DistilLoss`` objects; the C ABI and the CUDA kernels receive
the same numbers as the packed array :func:`Terms.pack` returns.

A :class:`Variant` names the compiled code one call runs: which divergence, how the cross-entropy is
evaluated, whether a linear (MSE/cosine) term exists, the power trick, the storage and the arithmetic
precision. :func:`resolve` is the only place that chooses it (the façade calls it once per call and
hands the result to the backend); :func:`reachable` lists every variant ``resolve`` can return, and it
is the table the CPU kernels, the CUDA kernels, the C ABI's dispatch, the offline CUDA compiler, the
warm-up command and the tests all read.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _formulas as _f

# divergence kinds (compile-time constants of the kernels): 0 for none, else a code of the formulas'
# table (fastdistill._formulas: one module per divergence, the only place its mathematics is written)
DIV_NONE = 0
DIV_FORWARD_KL = _f.forward_kl.CODE  # KL(p || q)
DIV_REVERSE_KL = _f.reverse_kl.CODE  # KL(q || p)
DIV_MIXTURE = _f.mixture.CODE  # c_p * KL(p || m) + c_q * KL(q || m),  m = lam * p + (1 - lam) * q
DIV_TVD = _f.tvd.CODE  # 0.5 * sum |p - q|
DIV_ALPHA = _f.alpha.CODE  # Amari's alpha-divergence, alpha = lam
DIVERGENCES = (DIV_NONE, *sorted(_f.FORMULAS))
DIV_NAMES = {DIV_NONE: "none", **{code: m.NAME for code, m in _f.FORMULAS.items()}}
# IS_TWO_PASS[div]: the divergence needs a pass over normalised probabilities (an array: compiled code
# indexes it with a run-time code)
IS_TWO_PASS = np.array([div != DIV_NONE and _f.FORMULAS[div].TWO_PASS for div in DIVERGENCES], dtype=np.bool_)

# cross-entropy (hard-label) modes
CE_NONE = 0  # no hard-label term
CE_SHARED = 1  # cross-entropy at the divergence's temperature (tau == 1): shares its normaliser
CE_OWN = 2  # cross-entropy with its own normaliser
CE_NAMES = {CE_NONE: "no CE", CE_SHARED: "CE shared", CE_OWN: "CE own"}

# float32 logits are computed with float64 exponentials above this temperature: at tau = 100 the float32
# exponentials of nearly uniform rows leave a forward KL with a relative error of 4e-5 (1e-1 at 1e4);
# their float64 counterparts stay below 1e-8 up to tau = 1e4
TAU_FLOAT64_MATH = 32.0
# the largest temperature of a loss: tau^2 * KL(p_tau || q_tau) is a difference of two nearly equal sums
# that cancels as 1/tau^2 (float64: relative error 3e-9 at 1e4, 1e-6 at 1e5, 3e-5 at 1e6, 0.6 at 1e8 on
# 4 x 50 normal logits); every use lies far below it
MAX_TEMPERATURE = 1e4

# tails of a sparse (top-k) teacher: what its divergence compares (fastdistill.sparse.SparseTeacher); a
# tail's code is its position in TAILS, read by every backend (and equal to the C ABI's enum fd_tail)
TAILS = ("renormalize", "support", "bucket")
TAIL_RENORMALIZE, TAIL_SUPPORT, TAIL_BUCKET = range(3)

# a vocabulary shard's labels as its kernels (CPU, CUDA, C entry points) take them: a column of the shard,
# or one of these (an ignored row's: the int64 minimum, never a column, as ignore_index may be one)
SHARD_LABEL_ELSEWHERE = -2  # the label lies in another shard
SHARD_LABEL_IGNORED = -(2**63)

# layout of the packed float64 parameter array
P_TAU, P_HARD_W, P_DIV_W, P_MSE_W, P_COS_W, P_LAM, P_CP, P_CQ, P_SMOOTH = range(9)
N_PARAMS = 9

FLOAT32 = "float32"
FLOAT64 = "float64"
BFLOAT16 = "bfloat16"
FLOAT16 = "float16"
HALF = (BFLOAT16, FLOAT16)  # 16-bit storage, computed in float32 (float64 above TAU_FLOAT64_MATH)
STORAGES = (FLOAT32, FLOAT64, BFLOAT16, FLOAT16)


def teacher_storage(student: str, teacher: str) -> str:
    """The storage the kernels read the teacher in, next to a ``student`` of the given storage: the
    teacher's own when the pair has kernels (the same storage; float32 beside a half-precision student;
    half precision beside a float32 one), else the storage the caller converts it to: float32 beside a
    half-precision student (exact for the other 16-bit format), the student's otherwise (as for float32
    and float64 logits before half precision existed)."""
    if teacher == student or (student in HALF and teacher == FLOAT32) or (student == FLOAT32 and teacher in HALF):
        return teacher
    return FLOAT32 if student in HALF else student


def grad_storages(student: str) -> tuple[str, ...]:
    """The storages a gradient of a ``student`` of this storage may be written in (the student's first)."""
    return (student, FLOAT32) if student in HALF else (student,)


# (student, teacher, gradient) storages with kernels of their own
STORAGE_TRIPLES = tuple(
    (s, t, g) for s in STORAGES for t in STORAGES if teacher_storage(s, t) == t for g in grad_storages(s)
)


class Terms(NamedTuple):
    """Weights and parameters of one response loss."""

    div: int = DIV_NONE
    tau: float = 1.0
    hard_w: float = 0.0
    div_w: float = 0.0
    mse_w: float = 0.0
    cos_w: float = 0.0
    lam: float = 0.0
    c_p: float = 0.0
    c_q: float = 0.0
    smoothing: float = 0.0

    def pack(self) -> np.ndarray:
        """The float64 parameter array the kernels read (indices ``P_*``)."""
        p = np.zeros(N_PARAMS, dtype=np.float64)
        p[P_TAU] = self.tau
        p[P_HARD_W] = self.hard_w
        p[P_DIV_W] = self.div_w
        p[P_MSE_W] = self.mse_w
        p[P_COS_W] = self.cos_w
        p[P_LAM] = self.lam
        p[P_CP] = self.c_p
        p[P_CQ] = self.c_q
        p[P_SMOOTH] = self.smoothing
        return p

    @property
    def div_kind(self) -> int:
        """The divergence the kernels must evaluate (``DIV_NONE`` when its weight is 0)."""
        return self.div if self.div_w != 0.0 else DIV_NONE


class Variant(NamedTuple):
    """What selects compiled code for one response-loss call (every backend reads the same fields)."""

    div: int  # DIV_*: the divergence evaluated (DIV_NONE when its weight is 0)
    ce: int  # CE_*: how the hard-label term is evaluated
    lin: bool  # an MSE or cosine term
    pw: int  # 0, or 2 / 4: exp(s - max) is exp((s - max) / tau) squared once / twice (CPU kernels)
    dtype: str  # storage of the student logits: one of STORAGES
    math: str  # precision of the elementwise arithmetic: "float32" or "float64"
    teacher: str = ""  # storage of the teacher logits ("" means the student's)
    grad: str = ""  # storage of the gradient ("" means the student's)

    def storage(self) -> tuple[str, str, str]:
        """(student, teacher, gradient) storage."""
        return self.dtype, self.teacher or self.dtype, self.grad or self.dtype

    @property
    def two_pass(self) -> bool:
        """Whether the loss needs a pass over normalised probabilities (mixtures, TVD)."""
        return bool(IS_TWO_PASS[self.div])

    @property
    def name(self) -> str:
        parts = [DIV_NAMES[self.div], CE_NAMES[self.ce]]
        if self.lin:
            parts.append("mse/cos")
        if self.pw:
            parts.append(f"pow{self.pw}")
        s, t, g = self.storage()
        store = s if t == s == g else f"{s} (teacher {t}, gradient {g})"
        parts.append(store if self.math == s else f"{store} ({self.math} math)")
        return ", ".join(parts)


# loss kinds: (the name of DistilLoss, the name in the C ABI's enum fd_loss_kind, whether its parameter
# is a weight in [0, 1]); a kind's code is its position (the enum's value: new kinds go last)
LOSS_TABLE = (
    ("kl_divergence", "FD_KL", False), ("reverse_kl", "FD_REVERSE_KL", False), ("jsd", "FD_JSD", True),
    ("skew_kl", "FD_SKEW_KL", True), ("skew_reverse_kl", "FD_SKEW_REVERSE_KL", True), ("tvd", "FD_TVD", False),
    ("mse", "FD_MSE", False), ("cosine", "FD_COSINE", False), ("ce_only", "FD_CE_ONLY", False),
    ("combined", "FD_COMBINED", False), ("alpha_divergence", "FD_ALPHA", True),
)
LOSS_CODES = {name: code for code, (name, _, _) in enumerate(LOSS_TABLE)}
LOSS_ENUM = {c_name: code for code, (_, c_name, _) in enumerate(LOSS_TABLE)}
# UNIT_PARAMETER[code]: the kind's parameter (the C ABI's ``param``) must lie in [0, 1]
UNIT_PARAMETER = np.array([unit for _, _, unit in LOSS_TABLE], dtype=np.bool_)
(K_KL, K_REVERSE_KL, K_JSD, K_SKEW_KL, K_SKEW_REVERSE_KL, K_TVD, K_MSE, K_COSINE, K_CE_ONLY, K_COMBINED,
 K_ALPHA) = range(11)


def soft_terms(code: int, tau: float, kl_w: float, mse_w: float, beta: float, alpha: float,
               t2_scale: bool) -> tuple:
    """The soft part of a loss kind as kernel terms: ``(div, div_w, mse_w, cos_w, lam, c_p, c_q)``.

    Plain scalar code, read by :meth:`DistilLoss.terms` and compiled by Numba for the C ABI (one
    description of the losses for both). ``div_w`` carries tau**2 for the KL-type divergences (not TVD)
    when ``t2_scale``; an unknown ``code`` gives ``div = -1``.
    """
    t2 = tau * tau if t2_scale else 1.0
    div = DIV_NONE
    div_w = 0.0
    lam = 0.0
    c_p = 0.0
    c_q = 0.0
    out_mse = 0.0
    cos_w = 0.0
    if code == K_KL or code == K_COMBINED:
        div = DIV_FORWARD_KL
        div_w = kl_w * t2
        if code == K_COMBINED:
            out_mse = mse_w
    elif code == K_MSE:
        out_mse = mse_w
    elif code == K_COSINE:
        cos_w = 1.0
    elif code == K_CE_ONLY:
        pass
    elif code == K_REVERSE_KL:
        div = DIV_REVERSE_KL
        div_w = kl_w * t2
    elif code == K_JSD:
        div_w = kl_w * t2
        if beta == 0.0:
            div = DIV_FORWARD_KL
        elif beta == 1.0:
            div = DIV_REVERSE_KL
        else:
            div = DIV_MIXTURE
            lam = beta
            c_p = beta
            c_q = 1.0 - beta
    elif code == K_SKEW_KL:
        div = DIV_FORWARD_KL if alpha == 0.0 else DIV_MIXTURE
        div_w = kl_w * t2
        lam = alpha
        c_p = 1.0
    elif code == K_SKEW_REVERSE_KL:
        div = DIV_REVERSE_KL if alpha == 0.0 else DIV_MIXTURE
        div_w = kl_w * t2
        lam = 1.0 - alpha
        c_q = 1.0
    elif code == K_TVD:
        div = DIV_TVD
        div_w = kl_w
    elif code == K_ALPHA:
        # (its limits are the KLs: reverse at alpha = 0, forward at 1)
        div = DIV_REVERSE_KL if alpha == 0.0 else (DIV_FORWARD_KL if alpha == 1.0 else DIV_ALPHA)
        div_w = kl_w * t2
        lam = alpha
    else:
        div = -1
    return div, div_w, out_mse, cos_w, lam, c_p, c_q


def infinite_off_support(div: int, lam: float, c_q: float) -> bool:
    """Whether this divergence is infinite against a teacher with no mass outside a sparse support
    (``tail="renormalize"``), the student having some: the reverse KL, and mixtures whose ``KL(q || m)``
    has ``m = p`` (plain scalar code: the façade and the C ABI both run it)."""
    return div == DIV_REVERSE_KL or (div == DIV_MIXTURE and c_q != 0.0 and lam >= 1.0)


def variant_fields(div_kind: int, hard_w: float, has_labels: bool, tau: float, lin: bool, f32: bool) -> tuple:
    """``(div, ce, lin, pw, float64_math)`` of a call: the choice of compiled code, as plain scalar code
    (:func:`resolve` reads it; Numba compiles it for the C ABI, whose dispatch is this same choice).

    The hard-label term shares the divergence's normaliser at tau == 1 (CE_SHARED); at tau = 4 or 2 its
    ``exp(s - max)`` is the divergence's ``exp((s - max) / tau)`` squared twice or once (``pw``); float32
    logits are computed with float64 exponentials above :data:`TAU_FLOAT64_MATH`.
    """
    ce = CE_NONE
    if hard_w != 0.0 and has_labels:
        ce = CE_SHARED if (div_kind != DIV_NONE and tau == 1.0) else CE_OWN
    pw = 0
    if ce == CE_OWN and div_kind != DIV_NONE:
        pw = 4 if tau == 4.0 else (2 if tau == 2.0 else 0)
    f64_math = (not f32) or (div_kind != DIV_NONE and tau > TAU_FLOAT64_MATH)
    return div_kind, ce, lin, pw, f64_math


def resolve(terms: Terms, has_labels: bool, dtype: str, teacher: str = "", grad: str = "") -> Variant:
    """The variant that evaluates ``terms`` on student logits of ``dtype`` (one of :data:`STORAGES`), a
    teacher stored as ``teacher`` and a gradient as ``grad`` (a :data:`STORAGE_TRIPLES` combination;
    "" for the student's storage)."""
    div, ce, lin, pw, f64_math = variant_fields(terms.div_kind, terms.hard_w, has_labels, terms.tau,
                                                terms.mse_w != 0.0 or terms.cos_w != 0.0, dtype != FLOAT64)
    return Variant(div, ce, lin, pw, dtype, FLOAT64 if f64_math else FLOAT32, "" if teacher == dtype else teacher,
                   "" if grad == dtype else grad)


def reachable() -> tuple[Variant, ...]:
    """Every variant :func:`resolve` returns for the losses of the public API, in a fixed order (by
    storage, in the order of :data:`STORAGE_TRIPLES`).

    A linear term comes only with no divergence (MSE, cosine) or the forward KL (``combined``); the
    shared cross-entropy normaliser and the power trick need a divergence (tau == 1, and tau in {2, 4});
    float64 arithmetic on float32 or half-precision logits needs a divergence above
    :data:`TAU_FLOAT64_MATH`, where tau is neither 1, 2 nor 4.
    """
    out = []
    for dtype, teacher, grad in STORAGE_TRIPLES:
        base = FLOAT64 if dtype == FLOAT64 else FLOAT32  # the arithmetic below TAU_FLOAT64_MATH
        t_field = "" if teacher == dtype else teacher
        g_field = "" if grad == dtype else grad
        for div in DIVERGENCES:
            lins = (False, True) if div in (DIV_NONE, DIV_FORWARD_KL) else (False,)
            ces = (CE_NONE, CE_OWN) if div == DIV_NONE else (CE_NONE, CE_SHARED, CE_OWN)
            maths = (base,) if base == FLOAT64 or div == DIV_NONE else (FLOAT32, FLOAT64)
            for math in maths:
                for ce in ces:
                    if ce == CE_SHARED and math != base:
                        continue
                    for lin in lins:
                        pws = (0, 2, 4) if (ce == CE_OWN and div != DIV_NONE and math == base) else (0,)
                        for pw in pws:
                            out.append(Variant(div, ce, lin, pw, dtype, math, t_field, g_field))
    return tuple(out)


REACHABLE = frozenset(reachable())


def index_table(variants: tuple[Variant, ...]) -> np.ndarray:
    """``table[div, ce, lin, pw, STORAGES.index(dtype), math is float64]``: the position of each of
    ``variants`` whose student, teacher and gradient share one storage (-1 elsewhere), for dispatch in
    compiled code (the C ABI's entry points take one storage for all three)."""
    table = np.full((len(DIVERGENCES), 3, 2, 5, len(STORAGES), 2), -1, dtype=np.int64)
    for i, v in enumerate(variants):
        if not (v.teacher or v.grad):
            table[v.div, v.ce, int(v.lin), v.pw, STORAGES.index(v.dtype), int(v.math == FLOAT64)] = i
    return table


class ResponseCall(NamedTuple):
    """One response-loss call, checked and resolved by the façade: what a backend receives besides the
    arrays (the CPU and the CUDA backend receive the same)."""

    variant: Variant
    terms: Terms
    reduction: str  # "mean" | "sum" | "none"
    num_items: float | None  # the divisor of "mean" when the caller gives one
    ignore_index: int
    want_grad: bool
    has_labels: bool
    shape: tuple[int, ...]  # the student's shape
    rows: int
    n: int  # classes computed (the first n of both student and teacher: fewer than the student's when
    # vocabularies padded to other widths are truncated)

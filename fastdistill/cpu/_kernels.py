"""Numba CPU kernels: row-wise softmax and the fused response loss with its gradient.

Private module. Every loss of the library runs through :func:`worker`, one compiled C function per
:class:`~fastdistill._spec.Variant` (and one more for a gradient written over the student), called by the
parallel drivers :func:`drive` and :func:`drive_shard`. A row is processed in at most four streaming passes
over its logits, each one a branch-free, vectorizable loop:

1. maxima of ``t`` and ``s`` (and a NaN flag);
2. sums of exponentials and the cross terms of the forward/reverse KL (float64 totals); cross-entropy
   normaliser, label-smoothing sum, MSE/cosine dot products when present;
3. (two-pass divergences only: mixtures, TVD) the terms of ``fastdistill._formulas`` that need
   normalised probabilities;
4. (gradient only) one fused write of the gradient of every term.

Rows are spread over threads with ``prange``; when there are fewer rows than threads, each pass of a
row is split into column chunks spread over threads instead, so one huge row still uses every core.
Nothing of size ``rows x classes`` is allocated besides the gradient.

How the code is compiled (the cost users wait for): each pass is an ordinary jitted function, never
inlined at the Numba IR level (``inline="always"`` re-runs the whole pipeline on every inlined body:
most of a 20-30 s variant compile). The variant's constants reach a pass as *literal* arguments
(``literally``): Numba prunes the branches of the other variants before lowering, so each loop is
compiled with only its own terms and vectorizes as if written by hand, and a pass is compiled once per
set of constants it depends on and shared (in memory and in the on-disk cache) by every kernel that
uses it. LLVM inlines the small helpers into their callers. A kernel's ``prange`` bodies are one call
each, which keeps Numba's parfor passes cheap.

``ct`` is a zero of the arithmetic precision (``Variant.math``): float32 logits are read as float32,
or as float64 for the float64-math variants; every total is float64.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, prange
from numba.core import types
from numba.extending import intrinsic, overload

from .._formulas import FORMULAS
from .._formulas import compiled as _compiled_formulas
from .._spec import (
    CE_NONE,
    CE_OWN,
    CE_SHARED,
    DIV_FORWARD_KL,
    DIV_NONE,
    DIV_REVERSE_KL,
    IS_TWO_PASS,
    N_PARAMS,
    P_COS_W,
    P_CP,
    P_CQ,
    P_DIV_W,
    P_HARD_W,
    P_LAM,
    P_MSE_W,
    P_SMOOTH,
    P_TAU,
    REACHABLE,
    SHARD_LABEL_ELSEWHERE,
    Variant,
)
from ._math import (
    BF16_BITS,
    F16_BITS,
    abs_bits,
    borrowed,
    bf16_to_f32,
    constant,
    f16_to_f32,
    f32_to_bf16,
    f32_to_f16,
    fexp,
    from_okey,
    inline_into_callers,
    keep_alive,
    masked,
    okey,
    prefetch,
    wide_vectors,
)

# nnan/ninf are left out on purpose: -inf logits are masked classes and NaN must propagate.
FLAGS = {"nsz", "arcp", "contract", "afn", "reassoc"}
JIT = dict(cache=True, fastmath=FLAGS, error_model="numpy", nogil=True)
# the passes, called from jitted code only: no Python entry point to generate (its boxing code for a
# dozen array arguments costs LLVM time, in every compile)
JIT_INNER = dict(JIT, no_cpython_wrapper=True, no_cfunc_wrapper=True)
JIT_C = dict(cache=True, fastmath=FLAGS, error_model="numpy")  # the workers (C functions: no GIL to release)
# scalar code whose order of operations matters (reassociation would undo a cancellation it arranges)
JIT_STRICT = dict(JIT_INNER, fastmath=False)



def _literal_values(*tys):  # type: ignore[no-untyped-def]
    """The values of Numba literal types (a tuple), or None when one is not a literal."""
    if not all(isinstance(t, types.Literal) for t in tys):
        return None
    return tuple(t.literal_value for t in tys)


# statistics of one row (float64 vector), filled by the passes
S_MT, S_MS, S_NAN, S_SA, S_SB, S_SX, S_SY, S_S1, S_SSUM, S_D2, S_ST, S_SS, S_TT, S_LAB, S_DSUM, S_HSUM = range(16)
N_STATS = 16
# (S_LAB: the student's logit at the row's label, summed over the chunks or shards of a split row; only
# the one holding the label adds it. S_DSUM, S_HSUM: a two-pass divergence's sums of its terms and of
# h = q dD/dq, see fastdistill._formulas)
# statistics that are maxima (merged with max) and those that are sums (merged with +)
N_MAX = 2

# columns summed in the input's precision before a float64 total (float32: error of a block sum <= 1e-6)
BLOCK = 128
# columns per chunk when a row is split across threads
CHUNK = 16384
# bytes per cache line (the prefetch stride)
LINE = 64


def as_type_of(ref, v):  # type: ignore[no-untyped-def]  # pragma: no cover - jitted code only
    """``v`` converted to the float type of ``ref``."""
    return v


@overload(as_type_of, jit_options={"cache": True})
def _as_type_of_impl(ref, v):  # type: ignore[no-untyped-def]
    # 16-bit storage (see ``_math.BF16_BITS``) is decoded to float32 first
    if v == types.int16:
        if ref == types.float32:
            return lambda ref, v: bf16_to_f32(v)
        return lambda ref, v: np.float64(bf16_to_f32(v))
    if v == types.uint16:
        if ref == types.float32:
            return lambda ref, v: f16_to_f32(v)
        return lambda ref, v: np.float64(f16_to_f32(v))
    if ref == types.float32:
        return lambda ref, v: np.float32(v)
    return lambda ref, v: np.float64(v)


def stored(a, v):  # type: ignore[no-untyped-def]  # pragma: no cover - jitted code only
    """``v`` as an element of array ``a`` (16-bit storage: rounded once, to nearest even, from float32)."""
    return v


@overload(stored, jit_options={"cache": True})
def _stored_impl(a, v):  # type: ignore[no-untyped-def]
    if a.dtype == types.int16:
        return lambda a, v: f32_to_bf16(np.float32(v))
    if a.dtype == types.uint16:
        return lambda a, v: f32_to_f16(np.float32(v))
    if a.dtype == types.float32:
        return lambda a, v: np.float32(v)
    return lambda a, v: np.float64(v)


def arithmetic_zero(a):  # type: ignore[no-untyped-def]  # pragma: no cover - jitted code only
    """A zero of the precision array ``a``'s elements are computed in: float64 for float64, else float32."""
    return 0.0


@overload(arithmetic_zero, jit_options={"cache": True})
def _arithmetic_zero_impl(a):  # type: ignore[no-untyped-def]
    if a.dtype == types.float64:
        return lambda a: 0.0
    return lambda a: np.float32(0.0)


def limits_of(ref):  # type: ignore[no-untyped-def]  # pragma: no cover - jitted code only
    """(lowest finite value, argument below which ``exp`` is 0 or subnormal) of ``ref``'s float type."""
    return -np.inf, -np.inf


@overload(limits_of, jit_options={"cache": True})
def _limits_of_impl(ref):  # type: ignore[no-untyped-def]
    if ref == types.float32:
        lo32 = np.float32(np.finfo(np.float32).min)
        cut32 = np.float32(-87.3)
        return lambda ref: (lo32, cut32)
    lo64 = np.finfo(np.float64).min
    return lambda ref: (lo64, -708.0)


@njit(inline="always", **JIT_INNER)
def _exp1(ds, wb, cut, zero, pw):  # type: ignore[no-untyped-def]
    """``exp(ds)`` given ``wb = exp(ds / tau)``: ``wb ** pw`` for ``pw`` 2 or 4 (0 where the result would
    be subnormal, a slow path on x86; ``zero`` is a constant, ``wb * 0`` kept the loop from vectorizing),
    else an exponential of its own."""
    if pw == 4:
        w2 = wb * wb
        return w2 * w2 if ds > cut else zero
    if pw == 2:
        return wb * wb if ds > cut else zero
    return fexp(ds)


# ---------------------------------------------------------------- pass 1: maxima


@njit(**JIT_INNER)
def _max_nan(x, ct, keys_max=None):  # type: ignore[no-untyped-def]
    """(max of ``x`` as float64, whether it holds a NaN), through integer keys (vectorized). Given an
    integer array ``keys_max`` (``okey``'s type), also ``keys_max[j] = max(keys_max[j], key of x[j])``
    in the same loop (without it, Numba prunes that branch: the loop is the same as before)."""
    inline_into_callers()
    wide_vectors()
    x0 = as_type_of(ct, x[0])
    k = okey(as_type_of(x0, -np.inf))
    ab = abs_bits(as_type_of(x0, 0.0))
    for j in range(x.shape[0]):
        xj = as_type_of(ct, x[j])
        a = okey(xj)
        k = a if a > k else k
        if keys_max is not None:
            keys_max[j] = a if a > keys_max[j] else keys_max[j]
        c = abs_bits(xj)
        ab = c if c > ab else ab
    return np.float64(from_okey(k, x0)), ab > abs_bits(as_type_of(x0, np.inf))


@njit(**JIT_INNER)
def _pass_max(s, t, st, ct):  # type: ignore[no-untyped-def]
    inline_into_callers()
    mt, nan_t = _max_nan(t, ct)
    ms, nan_s = _max_nan(s, ct)
    st[S_MT] = max(st[S_MT], mt)
    st[S_MS] = max(st[S_MS], ms)
    if nan_t or nan_s:
        st[S_NAN] += 1.0


# ---------------------------------------------------------------- pass 2: sums


@njit(**JIT_INNER)
def _no_nan(d, lowest):  # type: ignore[no-untyped-def]
    """``d``, with -inf and NaN (a class masked in both rows) raised to ``lowest``: a weight of 0 times it
    is 0, and the select vectorizes where ``masked``'s test on the weight does not."""
    inline_into_callers()
    return d if d > lowest else lowest


@njit(**JIT_INNER)
def _count_eq(x, m):  # type: ignore[no-untyped-def]
    """How many of ``x`` are at ``m`` (``x - m == 0``: none in a row that is all ``-inf``)."""
    wide_vectors()
    inline_into_callers()
    zero = as_type_of(m, 0.0)
    k = 0
    for j in range(x.shape[0]):
        k += 1 if as_type_of(m, x[j]) - m == zero else 0
    return k


@njit(inline="always", **JIT_INNER)
def _sums_block(s, t, j0, j1, mt, ms, invt, div, ce, pw):  # type: ignore[no-untyped-def]
    """The exponential sums ``sa, sb, sx, s1`` of columns ``[j0, j1)``, summed in the arithmetic
    precision (one short vectorized loop; the caller adds them up in float64).

    A column at its row's maximum has an exponential of exactly 1; it is left out of the sums here (and
    counted apart by ``_count_eq``), so that a float32 sum holds only the terms below 1 and keeps their
    digits: a confident row's ``log(1 + 1e-4)`` stays exact to float32 precision instead of to 1e-3.

    Inlined at the Numba IR level into :func:`_pass_sums` (twice: the blocks and the tail): only there
    does LLVM see the fixed trip count of a block, which it unrolls across the accumulators' dependency
    chains; compiled on its own, the same loop ran 3x slower.
    """
    zero = as_type_of(mt, 0.0)
    lowest, cut = limits_of(zero)
    one = as_type_of(zero, 1.0)
    sa = zero
    sb = zero
    sx = zero
    s1 = zero
    for j in range(j0, j1):
        dt = as_type_of(zero, t[j]) - mt
        ds = as_type_of(zero, s[j]) - ms
        # 0 at the maximum, else 1; ``w * keep``, not ``w - 1`` (fastmath's reassociation would add the 1
        # into the sum and take it out at the end) nor a select on the sum (kept the loop from vectorizing)
        keep_s = zero if ds == zero else one
        wb = zero
        if div != DIV_NONE:
            keep_t = zero if dt == zero else one
            wa = fexp(dt * invt)
            wb = fexp(ds * invt)
            sa += wa * keep_t
            sb += wb * keep_s
            # cross terms relative to the maxima: (mt - ms) cancels analytically in the loss
            if div == DIV_FORWARD_KL:
                sx += wa * _no_nan(dt - ds, lowest)
            elif div == DIV_REVERSE_KL:
                sx += wb * _no_nan(ds - dt, lowest)
        if ce == CE_OWN:
            s1 += _exp1(ds, wb, cut, zero, pw) * keep_s
    return sa, sb, sx, s1


@njit(**JIT_INNER)
def _cross_masked(s, t, mt, ms, invt, div):  # type: ignore[no-untyped-def]
    """The KL cross term of :func:`_sums_block` over a whole row or chunk, in the same blocks, each term's
    weight tested (:func:`masked`): a term whose weight is 0 is 0 also where its difference is ``+inf``
    (a ``-inf`` logit on one side against a probability of the other that underflowed to 0), which the
    block loop's ``w * d`` makes NaN. Run only for such a sum (scalar code: it need not vectorize)."""
    zero = as_type_of(mt, 0.0)
    n = s.shape[0]
    total = 0.0
    for j0 in range(0, n, BLOCK):
        acc = zero
        for j in range(j0, min(n, j0 + BLOCK)):
            dt = as_type_of(zero, t[j]) - mt
            ds = as_type_of(zero, s[j]) - ms
            if div == DIV_FORWARD_KL:
                acc += masked(fexp(dt * invt), dt - ds)
            else:
                acc += masked(fexp(ds * invt), ds - dt)
        total += np.float64(acc)
    return total


@njit(**JIT_INNER)
def _prefetch_block(x, j0, j1, ahead):  # type: ignore[no-untyped-def]
    """Prefetch columns ``[j0, j1)`` of the next row of ``x`` (``ahead`` elements on; none when 0)."""
    inline_into_callers()
    if ahead != 0:
        for j in range(j0 + ahead, j1 + ahead, LINE // x.itemsize):
            prefetch(x, j)


def _pass_sums(s, t, st, P, ct, ahead, DIV, CE, PW):  # type: ignore[no-untyped-def]  # pragma: no cover - jitted code only
    """The exponential sums of a row (or chunk). ``ahead`` (elements; 0 for none) is the distance to the
    same columns of the row this thread takes next: their cache lines are prefetched block by block, so
    that the next row's first pass, which streams from memory, overlaps this one, which computes (forward
    35% faster at 16384x1000 and 1024x32000). Prefetching the next gradient row for writing as well was
    measured too: 2% faster at 16384x1000, 7% slower at 1024x32000; left out."""


@overload(_pass_sums, prefer_literal=True, jit_options=JIT_INNER)
def _pass_sums_specialised(s, t, st, P, ct, ahead, DIV, CE, PW):  # type: ignore[no-untyped-def]
    # compiled once per value of the constants, which the body reads as closure constants: Numba
    # prunes the other variants' branches before typing them
    values = _literal_values(DIV, CE, PW)
    if values is None:
        return None
    div, ce, pw = values

    def impl(s, t, st, P, ct, ahead, DIV, CE, PW):  # type: ignore[no-untyped-def]
        inline_into_callers()
        if div == DIV_NONE and ce != CE_OWN:
            return
        wide_vectors()
        n = s.shape[0]
        invt = as_type_of(ct, 1.0 / P[P_TAU])
        mt = as_type_of(ct, st[S_MT])
        ms = as_type_of(ct, st[S_MS])
        # blocks of BLOCK columns summed in the arithmetic precision (a float32 loop vectorizes twice as
        # wide), block totals in float64; a fixed trip count, then the tail
        sa = 0.0
        sb = 0.0
        sx = 0.0
        s1 = 0.0
        nb = n // BLOCK
        for b in range(nb):
            j0 = b * BLOCK
            _prefetch_block(s, j0, j0 + BLOCK, ahead)
            _prefetch_block(t, j0, j0 + BLOCK, ahead)
            a, bb, x, e = _sums_block(s, t, j0, j0 + BLOCK, mt, ms, invt, div, ce, pw)
            sa += np.float64(a)
            sb += np.float64(bb)
            sx += np.float64(x)
            s1 += np.float64(e)
        j0 = nb * BLOCK
        _prefetch_block(s, j0, n, ahead)
        _prefetch_block(t, j0, n, ahead)
        a, bb, x, e = _sums_block(s, t, j0, n, mt, ms, invt, div, ce, pw)
        sa += np.float64(a)
        sb += np.float64(bb)
        sx += np.float64(x)
        s1 += np.float64(e)
        if (div == DIV_FORWARD_KL or div == DIV_REVERSE_KL) and sx != sx and st[S_NAN] == 0.0:
            # no NaN logit, yet a NaN cross term: 0 * inf, a masked class against a probability that
            # underflowed (its term is 0: the value without it); summed again with the weights tested,
            # per row or chunk, so that the block loop keeps its unconditional w * d
            sx = _cross_masked(s, t, mt, ms, invt, div)
        # the columns at the maxima, counted in integer loops (per-element float counts in the block loop
        # cost a quarter of the forward time)
        cs = np.float64(_count_eq(s, ms))
        if div != DIV_NONE:
            st[S_SA] += np.float64(_count_eq(t, mt)) + sa
            st[S_SB] += cs + sb
        if div == DIV_FORWARD_KL:
            st[S_SX] += sx
        elif div == DIV_REVERSE_KL:
            st[S_SY] += sx
        if ce == CE_OWN:
            st[S_S1] += cs + s1

    return impl


@njit(**JIT_INNER)
def _pass_label_smoothing(s, st):  # type: ignore[no-untyped-def]
    """The row sum the label-smoothing term needs."""
    wide_vectors()
    inline_into_callers()
    ssum = 0.0
    for j in range(s.shape[0]):
        ssum += as_type_of(ssum, s[j])
    st[S_SSUM] += ssum


@njit(**JIT_INNER)
def _pass_linear(s, t, st):  # type: ignore[no-untyped-def]
    """The dot products of the MSE and cosine terms (in float64: cosine of (anti)parallel rows is exact)."""
    wide_vectors()
    inline_into_callers()
    d2 = 0.0
    dst = 0.0
    dss = 0.0
    dtt = 0.0
    for j in range(s.shape[0]):
        tj = as_type_of(0.0, t[j])
        sj = as_type_of(0.0, s[j])
        d = tj - sj
        d2 += d * d
        dst += sj * tj
        dss += sj * sj
        dtt += tj * tj
    st[S_D2] += d2
    st[S_ST] += dst
    st[S_SS] += dss
    st[S_TT] += dtt


# ---------------------------------------------------------------- pass 3: two-pass divergences' terms


# each divergence's constants and bins (fastdistill._formulas), compiled for the CPU
_BIN = _compiled_formulas(njit(**JIT_STRICT), "bin")
_CONSTANTS = _compiled_formulas(njit(**JIT_STRICT), "constants")
# the one-pass divergences' row values (their per-element sums are this module's vectorised loops)
_FORWARD_ROW = njit(**JIT_STRICT)(FORMULAS[DIV_FORWARD_KL].row_value)
_REVERSE_ROW = njit(**JIT_STRICT)(FORMULAS[DIV_REVERSE_KL].row_value)


@njit(**JIT_INNER)
def _log_probs(sj, tj, mt, ms, invt, lsa, lsb):  # type: ignore[no-untyped-def]
    """(log p, log q) of one class from the row's maxima and log-normalisers (float64)."""
    inline_into_callers()
    return (tj - mt) * invt - lsa, (sj - ms) * invt - lsb


def _pass_div2(s, t, st, P, DIV):  # type: ignore[no-untyped-def]  # pragma: no cover - jitted code only
    """The sums of a two-pass divergence's terms and ``h`` (:mod:`fastdistill._formulas`) over a row or
    chunk, in float64 (the loop does not vectorize: a call per class costs nothing more)."""


@overload(_pass_div2, prefer_literal=True, jit_options=JIT_INNER)
def _pass_div2_specialised(s, t, st, P, DIV):  # type: ignore[no-untyped-def]
    values = _literal_values(DIV)
    if values is None:
        return None
    (div,) = values
    bin_, constants = _BIN[div], _CONSTANTS[div]

    def impl(s, t, st, P, DIV):  # type: ignore[no-untyped-def]
        mt = st[S_MT]
        ms = st[S_MS]
        invt = 1.0 / P[P_TAU]
        lsa = math.log(st[S_SA])
        lsb = math.log(st[S_SB])
        k = constants(P[P_LAM], P[P_CP], P[P_CQ])
        dsum = 0.0
        hsum = 0.0
        for j in range(s.shape[0]):
            lp, lq = _log_probs(as_type_of(0.0, s[j]), as_type_of(0.0, t[j]), mt, ms, invt, lsa, lsb)
            d, h = bin_(lp, lq, math.exp(lp), math.exp(lq), k)
            dsum += d
            hsum += h
        st[S_DSUM] += dsum
        st[S_HSUM] += hsum

    return impl


# ---------------------------------------------------------------- row loss from the statistics


@njit(**JIT_INNER)
def _undefined(st, div, ce):  # type: ignore[no-untyped-def]
    """Whether the row's distributions are undefined (see :func:`_finish_stats`): a maximum of ``-inf`` (no
    mass) or ``+inf`` (no softmax). Its gradient is written NaN whole: the gradient pass masks the terms
    of NaN probabilities to 0, so a mixture's or the reverse KL's would otherwise come out 0."""
    inline_into_callers()
    return (div != DIV_NONE and abs(st[S_MT]) == np.inf) or \
        ((div != DIV_NONE or ce != CE_NONE) and abs(st[S_MS]) == np.inf)


@njit(**JIT_INNER)
def _finish_stats(st, div, ce):  # type: ignore[no-untyped-def]
    """After the sums: a row whose student (or, for a divergence, teacher) logits are all ``-inf`` has no
    distribution; its normalisers become NaN, so its loss and its gradient are NaN (as in PyTorch),
    never -inf. Neither has a row with a ``+inf`` logit (``inf - inf`` in its softmax): its loss is
    flagged NaN through the NaN count, since the terms the passes mask (0 where a probability is NaN)
    would otherwise sum to a number (the mixtures' loss of 0)."""
    inline_into_callers()
    if (div != DIV_NONE or ce != CE_NONE) and st[S_MS] == -np.inf:
        st[S_SB] = np.nan
        st[S_S1] = np.nan
    if div != DIV_NONE and st[S_MT] == -np.inf:
        st[S_SA] = np.nan
    if _undefined(st, div, ce):
        st[S_NAN] += 1.0


@njit(**JIT_INNER)
def _non_negative(d):  # type: ignore[no-untyped-def]
    """A divergence rounded below 0 is 0 (NaN stays NaN)."""
    inline_into_callers()
    return 0.0 if d < 0.0 else d


@njit(**JIT_INNER)
def _log_sum1(st, ce):  # type: ignore[no-untyped-def]
    """log-sum-exp of the student row at temperature 1, less the row's maximum."""
    inline_into_callers()
    return math.log(st[S_SB] if ce == CE_SHARED else st[S_S1])


@njit(**JIT_INNER)
def _cos_parts(st):  # type: ignore[no-untyped-def]
    """(cosine similarity, |s|*|t|); a zero-norm row has similarity 0 and no gradient."""
    inline_into_callers()
    den = math.sqrt(st[S_SS]) * math.sqrt(st[S_TT])
    return (st[S_ST] / den if den > 0.0 or den != den else 0.0), den  # (a NaN norm: a NaN similarity)


@njit(**JIT_STRICT)
def _row_loss(st, P, div, ce, lin, hard, s_label, n):  # type: ignore[no-untyped-def]
    """The weighted row loss from its statistics (float64). ``hard``: the row has a hard-label term.
    Shared by every variant (its branches are on scalars, outside any loop). Compiled without fastmath:
    the cross-entropy's ``(max - s_label) + log sum`` must not be reassociated into ``(max + log sum) -
    s_label``."""
    inline_into_callers()
    if st[S_NAN] != 0.0:
        return np.nan
    invt = 1.0 / P[P_TAU]
    loss = 0.0
    dw = P[P_DIV_W]
    # (the sums relative to the maxima: no shift)
    if div == DIV_FORWARD_KL:
        loss += dw * _non_negative(_FORWARD_ROW(invt, st[S_SA], st[S_SB], st[S_SX], 0.0))
    elif div == DIV_REVERSE_KL:
        loss += dw * _non_negative(_REVERSE_ROW(invt, st[S_SA], st[S_SB], st[S_SY], 0.0))
    elif IS_TWO_PASS[div]:
        loss += dw * _non_negative(st[S_DSUM])
    if ce != CE_NONE and hard:
        # (max - s_label) + log sum: the maximum cancels first (max + log sum rounds log sum away for
        # logits of 1e15 and beyond)
        ls1 = _log_sum1(st, ce)
        eps = P[P_SMOOTH]
        h = (1.0 - eps) * ((st[S_MS] - s_label) + ls1)
        if eps != 0.0:
            h += eps * ((st[S_MS] - st[S_SSUM] / n) + ls1)
        loss += P[P_HARD_W] * h
    if lin:
        loss += P[P_MSE_W] * st[S_D2] / n
        # the cosine read only where it is weighted: an infinite logit makes it NaN (inf / inf), where the
        # MSE alone takes the logit at face value (+inf); 0 * NaN would make the row NaN
        if P[P_COS_W] != 0.0:
            cos, _ = _cos_parts(st)
            loss += P[P_COS_W] * (1.0 - cos)
    return loss


# ---------------------------------------------------------------- pass 4: gradient


def grad_target(g, sv, j0, j1):  # type: ignore[no-untyped-def]  # pragma: no cover - jitted code only
    """The columns ``[j0, j1)`` a gradient pass writes: ``g[j0:j1]``, or when ``g`` is None (in place)
    ``sv``, the student's view of those columns, itself."""
    return g


@overload(grad_target, inline="always", jit_options={"cache": True})
def _grad_target_impl(g, sv, j0, j1):  # type: ignore[no-untyped-def]
    # a gradient written over the student is written through the very view it is read from, so that
    # LLVM sees one pointer: given a second pointer to the same memory (even a second slice of the same
    # array) it guards the vector loop with a run-time overlap check that fails exactly then, and runs
    # the scalar loop (4x slower at 1024x32000 float32)
    if isinstance(g, types.NoneType):
        return lambda g, sv, j0, j1: sv
    return lambda g, sv, j0, j1: g[j0:j1]


def _pass_grad(s, t, g, st, P, ct, hard, scale, n, lab_col, DIV, CE, LIN, PW):  # type: ignore[no-untyped-def]  # pragma: no cover - jitted code only
    """Write the gradient of ``scale * row loss`` w.r.t. the student into ``g`` (a row or a chunk).

    One loop that reads ``s[j]`` and ``t[j]`` before writing ``g[j]``, so ``g`` may be ``s`` itself;
    ``g`` None writes over ``s`` through ``s`` (:func:`grad_target`: the vectorized loop, where a ``g`` at
    ``s``'s address runs the scalar fallback of LLVM's overlap check).
    ``lab_col``: the label's column in this row or chunk (-1 when it has none): the one-hot part of the
    cross-entropy gradient is subtracted there in the arithmetic precision, before the one rounding to
    the gradient's storage (subtracting it from a stored half-precision ``softmax`` would lose up to
    a quarter of the digits, Liger-Kernel's issue 1432). The columns run in three segments, before, at
    and after the label, so that the loop stays free of a per-column test.
    """


@overload(_pass_grad, prefer_literal=True, jit_options=JIT_INNER)
def _pass_grad_specialised(s, t, g, st, P, ct, hard, scale, n, lab_col, DIV, CE, LIN, PW):  # type: ignore[no-untyped-def]
    # compiled once per value of the constants, which the body reads as closure constants: Numba
    # prunes the other variants' branches before typing them
    values = _literal_values(DIV, CE, LIN, PW)
    if values is None:
        return None
    div, ce, lin, pw = values
    two_pass = bool(IS_TWO_PASS[div])
    bin_ = _BIN[div] if two_pass else None
    constants = _CONSTANTS[div] if two_pass else None

    def impl(s, t, g, st, P, ct, hard, scale, n, lab_col, DIV, CE, LIN, PW):  # type: ignore[no-untyped-def]
        inline_into_callers()
        wide_vectors()
        invt64 = 1.0 / P[P_TAU]
        invt = as_type_of(ct, invt64)
        mt64 = st[S_MT]
        ms64 = st[S_MS]
        mt = as_type_of(ct, mt64)
        ms = as_type_of(ct, ms64)
        zero = as_type_of(ct, 0.0)
        _, cut = limits_of(zero)
        # divergence: d row loss / d s = div_w / tau * d D / d b
        cd64 = scale * P[P_DIV_W] * invt64
        cd = as_type_of(ct, cd64)
        isa = as_type_of(ct, 1.0 / st[S_SA]) if div != DIV_NONE else zero
        isb = as_type_of(ct, 1.0 / st[S_SB]) if div != DIV_NONE else zero
        lsa = math.log(st[S_SA]) if div != DIV_NONE else 0.0
        lsb = math.log(st[S_SB]) if div != DIV_NONE else 0.0
        roff = zero  # reverse KL: dD/db = q * (log q - log p - D)
        if div == DIV_REVERSE_KL:
            d = invt64 * st[S_SY] / st[S_SB] - (lsb - lsa)
            roff = as_type_of(ct, lsa - lsb - d)
        k = constants(P[P_LAM], P[P_CP], P[P_CQ]) if two_pass else (0.0, 0.0, 0.0, 0.0)
        big_h = st[S_HSUM]  # (two-pass: the sum of h over the row)
        # cross-entropy: softmax(s) - eps / n (the one-hot part is the caller's)
        counted_ce = ce != CE_NONE and hard
        ch = as_type_of(ct, scale * P[P_HARD_W] if counted_ce else 0.0)
        ceps = as_type_of(ct, scale * P[P_HARD_W] * P[P_SMOOTH] / n if counted_ce else 0.0)
        is1 = as_type_of(ct, 1.0 / st[S_S1]) if ce == CE_OWN else zero
        # linear (MSE + cosine): g += A * s + B * t
        a_s = zero
        b_t = zero
        if lin:
            cos, den = _cos_parts(st)
            a64 = 2.0 * P[P_MSE_W] / n
            b64 = -a64
            # (a NaN norm: a NaN gradient; an unweighted cosine is left out, as in the row loss)
            if P[P_COS_W] != 0.0 and (den > 0.0 or den != den):
                a64 += P[P_COS_W] * cos / st[S_SS]
                b64 -= P[P_COS_W] / den
            a_s = as_type_of(ct, scale * a64)
            b_t = as_type_of(ct, scale * b64)
        m = s.shape[0]
        at = lab_col if (counted_ce and 0 <= lab_col < m) else m
        one_hot = as_type_of(ct, scale * P[P_HARD_W] * (1.0 - P[P_SMOOTH]) if counted_ce else 0.0)
        for seg in range(3):
            j0 = 0 if seg == 0 else (at if seg == 1 else min(at + 1, m))
            j1 = at if seg == 0 else (min(at + 1, m) if seg == 1 else m)
            off = one_hot if seg == 1 else zero
            # views from column 0: an index that starts elsewhere could be negative to Numba, whose
            # wraparound test per element kept the loop from vectorizing (half the speed)
            sv = s[j0:j1]
            tv = t[j0:j1]
            gv = grad_target(g, sv, j0, j1)
            for j in range(j1 - j0):
                sj = as_type_of(ct, sv[j])
                tj = as_type_of(ct, tv[j])
                acc = zero - off
                q = zero
                wb = zero
                if div != DIV_NONE:
                    wb = fexp((sj - ms) * invt)
                    q = wb * isb
                if div == DIV_FORWARD_KL:
                    acc += cd * (q - fexp((tj - mt) * invt) * isa)
                elif div == DIV_REVERSE_KL:
                    acc += cd * masked(q, (sj - ms) * invt - (tj - mt) * invt + roff)
                elif two_pass:
                    # d D / d s_j = (h_j - q_j sum h) / tau (fastdistill._formulas); 0 where q_j is
                    lp, lq = _log_probs(np.float64(sj), np.float64(tj), mt64, ms64, invt64, lsa, lsb)
                    q64 = math.exp(lq)
                    _, h = bin_(lp, lq, math.exp(lp), q64, k)
                    acc += as_type_of(ct, cd64 * (h - q64 * big_h) if q64 > 0.0 else 0.0)
                if ce == CE_SHARED:
                    acc += ch * q - ceps
                elif ce == CE_OWN:
                    acc += ch * _exp1(sj - ms, wb, cut, zero, pw) * is1 - ceps
                if lin:
                    acc += a_s * sj + b_t * tj
                gv[j] = stored(gv, acc)

    return impl


@njit(**JIT_INNER)
def _fill_nan(g):  # type: ignore[no-untyped-def]
    inline_into_callers()
    for j in range(g.shape[0]):
        g[j] = stored(g, np.nan)


# ---------------------------------------------------------------- the work of one variant on a row or a chunk


@njit(**JIT_INNER)
def _reset(st):  # type: ignore[no-untyped-def]
    inline_into_callers()
    for k in range(N_MAX):
        st[k] = -np.inf
    for k in range(N_MAX, N_STATS):
        st[k] = 0.0


@njit(**JIT_INNER)
def _label_of(has_labels, labels, r, ignore_index):  # type: ignore[no-untyped-def]
    """(counted, label) of row r: ignored rows are not counted; label -1 when there are no labels."""
    inline_into_callers()
    if not has_labels:
        return True, np.int64(-1)
    lab = labels[r]
    return lab != ignore_index, lab


# The work on one row (PHASE_ROW: all of it, in the calling thread) or, for a row split across threads,
# one pass over one chunk of it or the serial step (PHASE_LOSS).
PHASE_ROW = 0  # rows [r, c): statistics, loss into out_loss, gradient
# shares of rows per thread on the row path (a few, so that threads finishing early take another)
ROW_TASKS_PER_THREAD = 4
PHASE_MAX = 1  # chunk c of row r: partial maxima into part[c]
PHASE_STATS = 2  # chunk c: partial sums into part[c] (the merged maxima in st)
PHASE_DIV2 = 3  # chunk c: partial two-pass divergence terms into part[c] (the merged sums in st)
PHASE_LOSS = 4  # row r: its loss from the merged statistics in st
PHASE_GRAD = 5  # chunk c: its part of the gradient (the one-hot part where the label lies)
# the statistics a chunk phase fills: [first, last); the earlier ones come merged in st
PHASE_FIRST = (0, 0, S_SA, S_DSUM)
PHASE_LAST = (0, S_SA, S_DSUM, N_STATS)




# ---------------------------------------------------------------- workers: one compiled function per variant
#
# A variant's code is one C-callable function, its *worker*: ``worker(phase, s, t, g, labels, P, st, part,
# out_loss, rows, n, lds, ldt, ldg, classes, r, c, has_labels, ignore_index, want_grad, scale)``, arrays as
# addresses (int64), flags as 0/1; ``n`` classes are computed (of ``classes`` in the whole row: more in a
# shard of a vocabulary split across processes), ``lds``/``ldt``/``ldg`` are the row lengths of
# ``s``/``t``/``g`` in memory (larger than ``n`` where vocabularies padded to other widths are truncated);
# ``c`` is the end of the share of rows for PHASE_ROW, the chunk for the chunk phases. The parallel loops that call it are one compiled driver per dtype (:func:`drive`), shared by
# every variant: Numba's parfor passes, the costliest part of a parallel kernel's compile, run once per
# dtype instead of once per variant, and the C ABI calls the same workers through the same driver.

WORKER_ARGS = (types.int64,) * 20 + (types.float64,)
# the label of a row whose class lies in another shard of the vocabulary (see ``drive_shard``)
LABEL_ELSEWHERE = SHARD_LABEL_ELSEWHERE  # (_spec: a shard's label in another shard)
WORKER_SIG = types.void(*WORKER_ARGS)
# a scalar of each storage's kernel type (16-bit formats: their bits, see ``_math.BF16_BITS``)
_STORAGE = {"float32": np.float32(0.0), "float64": np.float64(0.0), "bfloat16": BF16_BITS(0), "float16": F16_BITS(0)}


@intrinsic
def _address_as(typingctx, addr, like):  # type: ignore[no-untyped-def]
    """The address ``addr`` as a pointer to elements of ``like``'s type."""
    ty = types.CPointer(like)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], context.get_value_type(ty))

    return ty(addr, like), codegen


@intrinsic
def _call_worker(typingctx, worker, phase, s, t, g, labels, P, st, part, out_loss, rows, n, lds, ldt, ldg, classes,  # type: ignore[no-untyped-def]  # noqa: E501
                 r, c, has_labels, ignore_index, want_grad, scale):
    """Call the worker at address ``worker`` (a function of :data:`WORKER_SIG`)."""
    argtys = (phase, s, t, g, labels, P, st, part, out_loss, rows, n, lds, ldt, ldg, classes, r, c, has_labels,
              ignore_index, want_grad, scale)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fnty = ir.FunctionType(ir.VoidType(), [context.get_value_type(a) for a in WORKER_ARGS])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        vals = [context.cast(builder, v, ty, want) for v, ty, want in zip(args[1:], argtys, WORKER_ARGS)]
        builder.call(fn, vals)
        return context.get_dummy_value()

    return types.none(worker, *argtys), codegen


_WORKERS: dict = {}


def worker(v: Variant, inplace: bool = False):  # type: ignore[no-untyped-def]
    """The compiled worker of variant ``v`` (one of :data:`fastdistill._spec.REACHABLE`), a ``numba.cfunc``
    (its ``.address`` is what :func:`drive` and the C ABI call); compiled on first use, or loaded from
    Numba's on-disk cache. ``inplace``: the worker for calls whose gradient buffer is the student
    itself (same address, layout and storage), which writes the gradient through the student's
    pointer; the same arithmetic in the same order, so the same bits as into a fresh buffer. Compiled
    only for the variants a process calls in place."""
    key = (v, bool(inplace))
    w = _WORKERS.get(key)
    if w is None:
        if v not in REACHABLE:
            raise RuntimeError(f"internal error: kernel variant {v} is not in fastdistill._spec.reachable()")
        st, tt, gt = v.storage()
        if inplace and gt != st:
            raise RuntimeError(f"internal error: an in-place worker needs the gradient in the student's storage: {v}")
        w = _WORKERS[key] = _make_worker(v.div, v.ce, v.lin, v.pw, _STORAGE[st], _STORAGE[tt], _STORAGE[gt],
                                         _STORAGE[v.math], bool(inplace))
    return w


def _make_worker(div, ce, lin, pw, ST, TT, GT, ct, inplace=False):  # type: ignore[no-untyped-def]
    """The worker of the variant ``(div, ce, lin, pw)`` on student logits stored as ``ST``'s type, teacher
    logits as ``TT``'s, the gradient as ``GT``'s, computed in ``ct``'s: one step of its work on a batch
    (see the ``PHASE_*`` constants).

    ``s``, ``t``, ``g`` ``(rows, n)``; ``st`` the row's statistics (PHASE_ROW) or the merged ones of a
    split row; ``part`` ``(chunks, N_STATS)`` the chunks' partial statistics. The variant's constants are
    closure constants: Numba prunes the other variants' branches before typing them. Each pass is called
    from one place (a call site is a compile of its own); the constants go to the shared helpers as
    run-time int64 values (a literal argument would compile a helper once per value; LLVM inlines them
    and folds the constants anyway), and as literals to the passes specialised on them. ``inplace``: the
    gradient is written over ``s`` (``g`` at ``s``'s address), through ``s`` in the gradient pass.
    """
    DIV, CE, LIN, PW = div, ce, lin, pw  # (the passes' literal arguments)
    INPLACE = inplace  # (a constant: Numba prunes the other call of the gradient pass)
    TWO_PASS = bool(IS_TWO_PASS[div])

    @cfunc(WORKER_SIG, **JIT_C)
    def work(phase, sp, tp, gp, lp, pp, stp, partp, outp, rows, n, lds, ldt, ldg, classes, r, c, has_lab,  # type: ignore[no-untyped-def]  # noqa: E501
             ignore_index, grad_flag, scale):
        has_labels = has_lab != 0
        want_grad = grad_flag != 0
        s = carray(_address_as(sp, ST), (rows, lds))
        t = carray(_address_as(tp, TT), (rows, ldt))
        # a loss-only call's gradient is a (1, 1) stand-in
        g = carray(_address_as(gp, GT), (rows if want_grad else 1, ldg if want_grad else 1))
        labels = carray(_address_as(lp, np.int64(0)), (rows if has_labels else 0,))
        P = carray(_address_as(pp, 0.0), (N_PARAMS,))
        st = carray(_address_as(stp, 0.0), (N_STATS,))
        part = carray(_address_as(partp, 0.0), ((n + CHUNK - 1) // CHUNK, N_STATS))
        out_loss = carray(_address_as(outp, 0.0), (rows,))
        kdiv = np.int64(div)
        kce = np.int64(ce)
        # PHASE_ROW: the rows [r, c) one after the other (one call per thread's share of rows, so that the
        # call and its array views are paid once per share, not once per row); other phases: row r
        for ri in range(r, c if phase == PHASE_ROW else r + 1):
            if has_labels:
                lab = labels[ri]
                if lab == ignore_index:  # (the driver skips ignored rows of split batches)
                    out_loss[ri] = 0.0
                    if want_grad:
                        borrowed(g, ri, 0, n)[:] = 0
                    continue
            else:
                lab = np.int64(-1)
            whole = phase == PHASE_ROW
            lo = 0
            hi = n
            # prefetch distance: the next row (of the share; on the split paths the next row's same columns,
            # which the same thread takes next); past the last row the prefetch reads nothing
            ahead = n
            stats = st
            if not whole:
                lo = c * CHUNK
                hi = min(n, lo + CHUNK)
                if phase <= PHASE_DIV2:
                    stats = borrowed(part, c, 0, N_STATS)
                    first = PHASE_FIRST[phase]
                    for k in range(first):
                        stats[k] = st[k]
                    for k in range(first, N_STATS):
                        stats[k] = -np.inf if k < N_MAX else 0.0
            else:
                _reset(stats)
            # each chunk works on its own slices (contiguous views, as a whole row is): passing the row and a
            # column range instead compiled to code half as fast
            sr = borrowed(s, ri, lo, hi)
            tr = borrowed(t, ri, lo, hi)
            if whole or phase == PHASE_MAX:
                _pass_max(sr, tr, stats, ct)
            if whole or phase == PHASE_STATS:
                _pass_sums(sr, tr, stats, P, ct, ahead, DIV, CE, PW)
                if ce != CE_NONE and P[P_SMOOTH] != 0.0:
                    _pass_label_smoothing(sr, stats)
                if lin:
                    _pass_linear(sr, tr, stats)
                if not whole and lo <= lab < hi:
                    stats[S_LAB] += as_type_of(0.0, s[ri, lab])
            if whole or phase == PHASE_DIV2:
                if TWO_PASS:
                    _pass_div2(sr, tr, stats, P, DIV)
            if whole or phase == PHASE_LOSS:
                _finish_stats(stats, kdiv, kce)
                hard = lab >= 0 or lab == LABEL_ELSEWHERE
                s_label = 0.0
                if hard:
                    s_label = as_type_of(0.0, s[ri, lab]) if whole else stats[S_LAB]
                out_loss[ri] = _row_loss(stats, P, kdiv, kce, bool(lin), hard, s_label, classes)
            if want_grad and (whole or phase == PHASE_GRAD):
                gr = borrowed(g, ri, lo, hi)
                if _undefined(stats, kdiv, kce):
                    _fill_nan(gr)
                elif INPLACE:  # (g is s: written through s, see grad_target)
                    _pass_grad(sr, tr, None, stats, P, ct, lab >= 0 or lab == LABEL_ELSEWHERE, scale, classes,
                               lab - lo if lab >= 0 else np.int64(-1), DIV, CE, LIN, PW)
                else:
                    _pass_grad(sr, tr, gr, stats, P, ct, lab >= 0 or lab == LABEL_ELSEWHERE, scale, classes,
                               lab - lo if lab >= 0 else np.int64(-1), DIV, CE, LIN, PW)

    return work


@njit(**JIT_INNER)
def _merge(st, part, k0, k1):  # type: ignore[no-untyped-def]
    """Statistics ``[k0, k1)`` of the whole row from the chunks' partial ones."""
    for k in range(k0, k1):
        if k < N_MAX:
            v = -np.inf
            for c in range(part.shape[0]):
                v = max(v, part[c, k])
            st[k] = v
        else:
            v = 0.0
            for c in range(part.shape[0]):
                v += part[c, k]
            st[k] = v


@njit(**JIT)
def batch_layout(s, t, grad):  # type: ignore[no-untyped-def]
    """The logits of a batch as the drivers take them: ``(rows, n, lds, ldt, ldg, s, t, grad)``, the
    classes computed (the first ``min`` of both widths), the arrays' row lengths and their addresses.
    The drivers see addresses, not arrays, so that one compiled driver serves every storage type (a
    parallel driver is the costliest compile of the library); the worker knows the types."""
    rows, lds = s.shape
    ldt = t.shape[1]
    return (np.int64(rows), np.int64(min(lds, ldt)), np.int64(lds), np.int64(ldt), np.int64(grad.shape[1]),
            np.int64(s.ctypes.data), np.int64(t.ctypes.data), np.int64(grad.ctypes.data))


@njit(parallel=True, **JIT)
def drive(worker, layout, labels, has_labels, ignore_index, P, scale, want_grad, out_loss, nthreads, two_pass):  # type: ignore[no-untyped-def]  # noqa: E501
    """Run the worker at address ``worker`` over a batch: rows spread over threads, or, when there are
    fewer rows than threads (``nthreads``, the caller's count) and they are long, each row's passes
    split into column chunks spread over threads.

    ``layout``: :func:`batch_layout` of the student ``s``, the teacher ``t`` (C-contiguous ``(rows, *)``,
    computed on their first ``n = min`` of both widths: equal unless padded vocabularies are truncated)
    and the gradient (``s``'s shape, may be ``s`` itself; any ``(1, 1)`` array when not ``want_grad``),
    which receives the gradient when ``want_grad``; ``labels`` int64 ``(rows,)`` (ignored unless
    ``has_labels``); ``P`` the packed float64 parameters; ``scale`` multiplies the gradient (the reduction
    factor); ``out_loss`` float64 ``(rows,)`` receives the unscaled row losses (0 for ignored rows);
    ``two_pass``: the variant's divergence needs the PHASE_DIV2 pass. Labels must already be validated.
    """
    rows, n, lds, ldt, ldg, sp, tp, gp = layout
    lp = labels.ctypes.data
    pp = P.ctypes.data
    op = out_loss.ctypes.data
    if rows >= nthreads or n < 2 * CHUNK:
        # rows in a few shares per thread (the worker loops over a share's rows)
        tasks = min(rows, ROW_TASKS_PER_THREAD * nthreads)
        per = (rows + tasks - 1) // tasks
        stats = np.empty((tasks, N_STATS), dtype=np.float64)
        stp = stats.ctypes.data
        for k in prange(tasks):
            ki = np.int64(k)
            r0 = ki * per
            r1 = min(rows, r0 + per)
            if r0 < r1:
                _call_worker(worker, PHASE_ROW, sp, tp, gp, lp, pp, stp + ki * (N_STATS * 8), 0, op, rows, n, lds, ldt, ldg,
                             n, r0, r1, has_labels, ignore_index, want_grad, scale)
        keep_alive(stats)
        return
    nchunks = (n + CHUNK - 1) // CHUNK
    part = np.empty((nchunks, N_STATS), dtype=np.float64)
    st = np.empty(N_STATS, dtype=np.float64)
    stp = st.ctypes.data
    partp = part.ctypes.data
    for r in range(rows):
        counted, lab = _label_of(has_labels, labels, r, ignore_index)
        if not counted:  # the worker's row path writes its zeros
            _call_worker(worker, PHASE_ROW, sp, tp, gp, lp, pp, stp, 0, op, rows, n, lds, ldt, ldg, n, r, r + 1,
                         has_labels, ignore_index, want_grad, scale)
            continue
        _reset(st)
        # the passes over chunks, each followed by the merge of its statistics; the loss; the gradient
        for phase in range(PHASE_MAX, (PHASE_DIV2 if two_pass else PHASE_STATS) + 1):
            for c in prange(nchunks):
                _call_worker(worker, phase, sp, tp, gp, lp, pp, stp, partp, op, rows, n, lds, ldt, ldg, n, r,
                             np.int64(c), has_labels, ignore_index, want_grad, scale)
            _merge(st, part, PHASE_FIRST[phase], PHASE_LAST[phase])
        _call_worker(worker, PHASE_LOSS, sp, tp, gp, lp, pp, stp, partp, op, rows, n, lds, ldt, ldg, n, r, 0,
                     has_labels, ignore_index, want_grad, scale)
        if want_grad:
            for c in prange(nchunks):
                _call_worker(worker, PHASE_GRAD, sp, tp, gp, lp, pp, stp, partp, op, rows, n, lds, ldt, ldg, n, r,
                             np.int64(c), has_labels, ignore_index, want_grad, scale)
    keep_alive(part)
    keep_alive(st)


# steps of a vocabulary shard (``drive_shard``). SHARD_STATS: the shard's maxima and, relative to them,
# its sums (one pass over memory); the caller combines the maxima over the shards with max,
# ``rescale_shard_sums`` moves the sums to the combined maxima, the caller combines [N_MAX, S_DSUM) with +.
# SHARD_DIV2 (two-pass divergences): the second pass's sums, combined with +. SHARD_FINISH: loss, gradient.
SHARD_STATS = PHASE_MAX
SHARD_DIV2 = PHASE_DIV2
SHARD_FINISH = PHASE_LOSS


@njit(parallel=True, **JIT)
def drive_shard(worker, step, layout, labels, has_labels, ignore_index, P, scale, want_grad, out_loss,  # type: ignore[no-untyped-def]  # noqa: E501
                stats, local_max, classes):
    """One step of a row batch whose classes are split across shards (processes holding contiguous
    column ranges of the same rows): ``layout`` (:func:`batch_layout`) holds this shard's columns,
    ``stats`` ``(rows, N_STATS)`` float64 the rows' statistics, carried from step to step.

    SHARD_STATS: this shard's maxima into ``local_max`` ``(rows, N_MAX)``, and its sums relative to
    them (a maximum of -inf, a shard with no mass in that row, is replaced by 0 as the reference);
    SHARD_DIV2: the second pass's sums (from the combined statistics); SHARD_FINISH: the row losses
    into ``out_loss`` (the same on every shard) and this shard's gradient. ``labels`` are local: a
    column of this shard, ``LABEL_ELSEWHERE`` for a label in another shard, or ``ignore_index``.
    ``classes`` is the width of the whole row. Rows run in parallel, each row's columns in chunks as on
    the split path of :func:`drive`.
    """
    rows, n, lds, ldt, ldg, sp, tp, gp = layout
    lp = labels.ctypes.data
    pp = P.ctypes.data
    op = out_loss.ctypes.data
    nchunks = (n + CHUNK - 1) // CHUNK
    for r in prange(rows):
        ri = np.int64(r)
        counted, lab = _label_of(has_labels, labels, r, ignore_index)
        st = stats[r]
        stp = stats.ctypes.data + ri * (N_STATS * 8)
        if not counted:
            out_loss[r] = 0.0
            for k in range(N_STATS):  # (combined with the other shards' values: finite, never read)
                st[k] = 0.0
            for k in range(N_MAX):
                local_max[r, k] = 0.0
            if step == SHARD_FINISH:  # the worker's row path writes its zeros
                _call_worker(worker, PHASE_ROW, sp, tp, gp, lp, pp, stp, 0, op, rows, n, lds, ldt, ldg, classes, ri,
                             ri + 1, has_labels, ignore_index, want_grad, scale)
            continue
        if step == SHARD_FINISH:
            _call_worker(worker, PHASE_LOSS, sp, tp, gp, lp, pp, stp, 0, op, rows, n, lds, ldt, ldg, classes, ri,
                         0, has_labels, ignore_index, want_grad, scale)
            if want_grad:
                for c in range(nchunks):
                    _call_worker(worker, PHASE_GRAD, sp, tp, gp, lp, pp, stp, 0, op, rows, n, lds, ldt, ldg, classes,
                                 ri, np.int64(c), has_labels, ignore_index, want_grad, scale)
            continue
        part = np.empty((nchunks, N_STATS), dtype=np.float64)
        partp = part.ctypes.data
        # SHARD_STATS: the max pass, then the sums; SHARD_DIV2: the second pass alone
        first, last = (PHASE_MAX, PHASE_STATS) if step == SHARD_STATS else (PHASE_DIV2, PHASE_DIV2)
        for phase in range(first, last + 1):
            if phase == PHASE_MAX:
                _reset(st)
            for c in range(nchunks):
                _call_worker(worker, phase, sp, tp, gp, lp, pp, stp, partp, op, rows, n, lds, ldt, ldg, classes, ri,
                             np.int64(c), has_labels, ignore_index, want_grad, scale)
            _merge(st, part, PHASE_FIRST[phase], PHASE_LAST[phase])
            if phase == PHASE_MAX:
                for k in range(N_MAX):
                    local_max[r, k] = st[k]
                    if st[k] == -np.inf:
                        st[k] = 0.0
        keep_alive(part)
    keep_alive(stats)


@njit(**JIT)
def rescale_shard_sums(stats, combined_max, tau):  # type: ignore[no-untyped-def]
    """Move a shard's sums from its own maxima (the references in ``stats[:, :N_MAX]``) to the maxima
    combined over the shards, and store those: exponential sums scale by ``exp((ref - max) / tau)``
    (at temperature 1 for the cross-entropy's), the KL cross terms ``sum w (dt - ds)`` also shift by
    their weights' sum times the change of ``dt - ds``. A row whose combined maximum is -inf has no mass
    in any shard: its sums stay 0."""
    invt = 1.0 / tau
    for r in range(stats.shape[0]):
        st = stats[r]
        mt = combined_max[r, S_MT]
        ms = combined_max[r, S_MS]
        dt = st[S_MT] - mt if mt != -np.inf else 0.0
        ds = st[S_MS] - ms if ms != -np.inf else 0.0
        fa = math.exp(dt * invt) if mt != -np.inf else 0.0
        fb = math.exp(ds * invt) if ms != -np.inf else 0.0
        sa = st[S_SA]
        sb = st[S_SB]
        st[S_SX] = _scaled(fa, st[S_SX] + (dt - ds) * sa)
        st[S_SY] = _scaled(fb, st[S_SY] + (ds - dt) * sb)
        st[S_SA] = _scaled(fa, sa)
        st[S_SB] = _scaled(fb, sb)
        st[S_S1] = _scaled(math.exp(ds) if ms != -np.inf else 0.0, st[S_S1])
        st[S_MT] = mt
        st[S_MS] = ms


@njit(**JIT_INNER)
def _scaled(f, x):  # type: ignore[no-untyped-def]
    """``f * x``, 0 where ``x`` is 0: a shard without mass in a row (reference 0 for a maximum of -inf)
    may have a factor that overflows. 0 too where ``f`` is 0 and ``x`` is ``+inf``: a KL cross term
    ``w * inf`` (a ``-inf`` logit against the other side's probability ``w``) whose weight underflows at
    the combined maximum, dropped as the row's own sum drops it (``_cross_masked``), not ``0 * inf``."""
    inline_into_callers()
    return 0.0 if x == 0.0 or (f == 0.0 and x == np.inf) else f * x


# ---------------------------------------------------------------- softmax
# The normaliser is summed in a loop that only reads, so in-place and out-of-place calls give
# bit-identical results (a loop that also stores may be vectorized differently when arrays alias).


@njit(inline="always", **JIT_INNER)
def _expsum_block(x, j0, j1, m, it):  # type: ignore[no-untyped-def]
    """Sum of the exponentials below 1 (columns at the maximum left out): see ``_sums_block``."""
    zero = as_type_of(m, 0.0)
    one = as_type_of(m, 1.0)
    acc = zero
    for j in range(j0, j1):
        d = as_type_of(m, x[j]) - m
        acc += fexp(d * it) * (zero if d == zero else one)
    return acc


@njit(**JIT_INNER)
def _expsum(x, m, it, ahead):  # type: ignore[no-untyped-def]
    """``sum(exp((x - m) * it))`` in float64 over blocks summed in the input's precision, the next row
    prefetched (as in ``_pass_sums``)."""
    wide_vectors()
    n = x.shape[0]
    total = 0.0
    nb = n // BLOCK
    for b in range(nb):
        j0 = b * BLOCK
        _prefetch_block(x, j0, j0 + BLOCK, ahead)
        total += _expsum_block(x, j0, j0 + BLOCK, m, it)
    _prefetch_block(x, nb * BLOCK, n, ahead)
    total += _expsum_block(x, nb * BLOCK, n, m, it)
    return np.float64(_count_eq(x, m)) + total


@njit(**JIT_INNER)
def _softmax_row(xr, orow, invt, ahead, LOG):  # type: ignore[no-untyped-def]
    inline_into_callers()
    log = constant(LOG)
    wide_vectors()
    n = xr.shape[0]
    ct = arithmetic_zero(xr)
    m, nan = _max_nan(xr, ct)
    it = as_type_of(ct, invt)
    mm = as_type_of(ct, m)
    ssum = _expsum(xr, mm, it, ahead)
    if nan:
        ssum = np.nan
    if log:
        off = as_type_of(ct, math.log(ssum))
        for j in range(n):
            orow[j] = stored(orow, (as_type_of(ct, xr[j]) - mm) * it - off)
    else:
        inv = as_type_of(ct, 1.0 / ssum)
        for j in range(n):
            orow[j] = stored(orow, fexp((as_type_of(ct, xr[j]) - mm) * it) * inv)


_SOFTMAX: dict = {}


def softmax_kernel(log: bool):  # type: ignore[no-untyped-def]
    """``kernel(x, invt, out)``: row-wise (log-)softmax of ``x * invt`` into ``out`` (may be ``x``: each
    element is read for the last time before it is overwritten)."""
    k = _SOFTMAX.get(log)
    if k is None:
        k = _SOFTMAX[log] = _make_softmax_kernel(log)
    return k


def _make_softmax_kernel(LOG):  # type: ignore[no-untyped-def]
    @njit(parallel=True, **JIT)
    def kernel(x, invt, out):  # type: ignore[no-untyped-def]
        n = x.shape[1]
        for r in prange(x.shape[0]):
            ri = np.int64(r)
            _softmax_row(borrowed(x, ri, 0, n), borrowed(out, ri, 0, n), invt, n, LOG)

    return kernel

"""Numba CPU kernels: row-wise softmax and the fused response loss with its gradient.

Private module. Every loss of the library runs through :func:`response_kernel`, specialised at compile
time on the divergence kind, the cross-entropy mode and whether a linear (MSE/cosine) term exists, so
each compiled variant holds only the loops it needs. A row is processed in at most four streaming
passes over its logits, each one a branch-free, vectorizable loop:

1. maxima of ``t`` and ``s`` (and a NaN flag);
2. sums of exponentials and the cross terms of the forward/reverse KL (float64 accumulators);
   cross-entropy normaliser, label-smoothing sum, MSE/cosine dot products when present;
3. (mixture divergences and TVD only) the loss terms that need normalised probabilities;
4. (gradient only) one fused write of the gradient of every term.

Rows are spread over threads with ``prange``; when there are fewer rows than threads, each pass of a
row is split into column chunks spread over threads instead, so one huge row still
uses every core. Nothing of size ``rows x classes`` is allocated besides the gradient.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numba.core import types
from numba.extending import overload

from .._spec import (
    DIV_FORWARD_KL,
    DIV_MIXTURE,
    DIV_NONE,
    DIV_REVERSE_KL,
    DIV_TVD,
    P_COS_W,
    P_CP,
    P_CQ,
    P_DIV_W,
    P_HARD_W,
    P_LAM,
    P_MSE_W,
    P_SMOOTH,
    P_TAU,
)
from ._math import abs_bits, fexp, from_okey, masked, okey, prefetch, wide_vectors

# nnan/ninf are left out on purpose: -inf logits are masked classes and NaN must propagate.
FLAGS = {"nsz", "arcp", "contract", "afn", "reassoc"}
JIT = dict(cache=True, fastmath=FLAGS, error_model="numpy", nogil=True)

CE_NONE = 0  # no hard-label term
CE_SHARED = 1  # cross-entropy at the divergence's temperature (tau == 1): shares its normaliser
CE_OWN = 2  # cross-entropy with its own normaliser

# statistics of one row (float64 vector), filled by the passes
S_MT, S_MS, S_NAN, S_SA, S_SB, S_SX, S_SY, S_S1, S_SSUM, S_D2, S_ST, S_SS, S_TT, S_KP, S_KQ, S_R, S_T, S_G = range(18)
N_STATS = 18
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
    if ref == types.float32:
        return lambda ref, v: np.float32(v)
    return lambda ref, v: np.float64(v)


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


def power_of(tau: float, div: int, ce: int) -> int:
    """The ``pw`` variant for a temperature: 4 or 2 when the cross-entropy's ``exp(s - max)`` can be the
    divergence's ``exp((s - max) / tau)`` squared twice or once (tau = 4 or 2), else 0."""
    if ce != CE_OWN or div == DIV_NONE:
        return 0
    return 4 if tau == 4.0 else (2 if tau == 2.0 else 0)


@njit(inline="always", **JIT)
def _exp1(ds, wb, pw, cut, zero):  # type: ignore[no-untyped-def]
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


@njit(inline="always", **JIT)
def _max_nan(x, lo, hi):  # type: ignore[no-untyped-def]
    """(max of ``x[lo:hi]`` as float64, whether it holds a NaN), through integer keys (vectorized)."""
    x0 = x[lo]
    k = okey(as_type_of(x0, -np.inf))
    ab = abs_bits(as_type_of(x0, 0.0))
    for j in range(lo, hi):
        a = okey(x[j])
        k = a if a > k else k
        c = abs_bits(x[j])
        ab = c if c > ab else ab
    return np.float64(from_okey(k, x0)), ab > abs_bits(as_type_of(x0, np.inf))


@njit(inline="always", **JIT)
def _pass_max(s, t, lo, hi, st):  # type: ignore[no-untyped-def]
    wide_vectors()
    mt, nan_t = _max_nan(t, lo, hi)
    ms, nan_s = _max_nan(s, lo, hi)
    st[S_MT] = max(st[S_MT], mt)
    st[S_MS] = max(st[S_MS], ms)
    if nan_t or nan_s:
        st[S_NAN] += 1.0


# ---------------------------------------------------------------- pass 2: sums


@njit(inline="always", **JIT)
def _no_nan(d, lowest):  # type: ignore[no-untyped-def]
    """``d``, with -inf and NaN (a class masked in both rows) raised to ``lowest``: a weight of 0 times it
    is 0, and the select vectorizes where ``masked``'s test on the weight does not."""
    return d if d > lowest else lowest


@njit(inline="always", **JIT)
def _count_eq(x, lo, hi, m):  # type: ignore[no-untyped-def]
    """How many of ``x[lo:hi]`` are at ``m`` (``x - m == 0``: none in a row that is all ``-inf``, whose
    softmax stays NaN)."""
    zero = as_type_of(m, 0.0)
    k = 0
    for j in range(lo, hi):
        k += 1 if x[j] - m == zero else 0
    return k


@njit(inline="always", **JIT)
def _sums_block(s, t, j0, j1, mt, ms, invt, zero, div, ce, pw, acc):  # type: ignore[no-untyped-def]
    """``acc`` (float64 sums ``sa, sb, sx, s1``) plus the exponential sums of columns ``[j0, j1)``, these
    summed in the input's precision (one short vectorized loop).

    A column at its row's maximum has an exponential of exactly 1; it is left out of the sums here (and
    counted apart by ``_count_eq``), so that a float32 sum holds only the terms below 1 and keeps their
    digits: a confident row's ``log(1 + 1e-4)`` stays exact to float32 precision instead of to 1e-3.
    """
    lowest, cut = limits_of(zero)
    one = as_type_of(zero, 1.0)
    sa = zero
    sb = zero
    sx = zero
    s1 = zero
    for j in range(j0, j1):
        dt = t[j] - mt
        ds = s[j] - ms
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
            s1 += _exp1(ds, wb, pw, cut, zero) * keep_s
    a, b, x, e = acc
    return a + np.float64(sa), b + np.float64(sb), x + np.float64(sx), e + np.float64(s1)


@njit(inline="always", **JIT)
def _prefetch_block(x, j0, j1, ahead):  # type: ignore[no-untyped-def]
    """Prefetch columns ``[j0, j1)`` of the next row of ``x`` (``ahead`` elements on; none when 0)."""
    if ahead != 0:
        for j in range(j0 + ahead, j1 + ahead, LINE // x.itemsize):
            prefetch(x, j)


@njit(inline="always", **JIT)
def _pass_sums(s, t, lo, hi, st, P, div, ce, lin, pw, ahead):  # type: ignore[no-untyped-def]
    """The exponential sums of columns ``[lo, hi)``. ``ahead`` (elements; 0 for none) is the distance to
    the same columns of the row this thread takes next: their cache lines are prefetched block by block,
    so that the next row's first pass, which streams from memory, overlaps this one, which computes
    (forward 35% faster at 16384x1000 and 1024x32000). Prefetching the next gradient row for writing as
    well was measured too: 2% faster at 16384x1000, 7% slower at 1024x32000; left out."""
    wide_vectors()
    x0 = s[lo]
    invt = as_type_of(x0, 1.0 / P[P_TAU])
    mt = as_type_of(x0, st[S_MT])
    ms = as_type_of(x0, st[S_MS])
    zero = as_type_of(x0, 0.0)
    if div != DIV_NONE or ce == CE_OWN:
        # blocks of BLOCK columns summed in the input's precision (a float32 loop vectorizes twice as
        # wide), block totals in float64; a fixed trip count, then the tail (a select in the bound of a
        # single loop kept it from vectorizing as well)
        acc = (0.0, 0.0, 0.0, 0.0)
        nb = (hi - lo) // BLOCK
        for b in range(nb):
            j0 = lo + b * BLOCK
            _prefetch_block(s, j0, j0 + BLOCK, ahead)
            _prefetch_block(t, j0, j0 + BLOCK, ahead)
            acc = _sums_block(s, t, j0, j0 + BLOCK, mt, ms, invt, zero, div, ce, pw, acc)
        _prefetch_block(s, lo + nb * BLOCK, hi, ahead)
        _prefetch_block(t, lo + nb * BLOCK, hi, ahead)
        sa, sb, sx, s1 = _sums_block(s, t, lo + nb * BLOCK, hi, mt, ms, invt, zero, div, ce, pw, acc)
        # the columns at the maxima, counted in integer loops (per-element float counts in the block
        # loop cost a quarter of the forward time)
        cs = np.float64(_count_eq(s, lo, hi, ms))
        if div != DIV_NONE:
            st[S_SA] += np.float64(_count_eq(t, lo, hi, mt)) + sa
            st[S_SB] += cs + sb
        if div == DIV_FORWARD_KL:
            st[S_SX] += sx
        elif div == DIV_REVERSE_KL:
            st[S_SY] += sx
        if ce == CE_OWN:
            st[S_S1] += cs + s1
    if ce != CE_NONE and P[P_SMOOTH] != 0.0:
        ssum = 0.0
        for j in range(lo, hi):
            ssum += s[j]
        st[S_SSUM] += ssum
    if lin:
        d2 = 0.0
        dst = 0.0
        dss = 0.0
        dtt = 0.0
        for j in range(lo, hi):
            tj = np.float64(t[j])  # products in float64: cosine of (anti)parallel rows is exact
            sj = np.float64(s[j])
            d = tj - sj
            d2 += d * d
            dst += sj * tj
            dss += sj * sj
            dtt += tj * tj
        st[S_D2] += d2
        st[S_ST] += dst
        st[S_SS] += dss
        st[S_TT] += dtt


# ---------------------------------------------------------------- pass 3: mixture / TVD terms


@njit(inline="always", **JIT)
def _logaddexp(x, y):  # type: ignore[no-untyped-def]
    m = max(x, y)
    if m == -np.inf:
        return m
    return m + math.log(math.exp(x - m) + math.exp(y - m))


@njit(inline="always", **JIT)
def _mix_logs(sj, tj, mt, ms, invt, lsa, lsb, loglam, log1mlam):  # type: ignore[no-untyped-def]
    lp = (tj - mt) * invt - lsa
    lq = (sj - ms) * invt - lsb
    lm = _logaddexp(loglam + lp, log1mlam + lq)
    return lp, lq, lm


@njit(inline="always", **JIT)
def _pass_div2(s, t, lo, hi, st, P, div):  # type: ignore[no-untyped-def]
    """Loss terms of divergences that need normalised probabilities (float64 math)."""
    wide_vectors()
    mt = st[S_MT]
    ms = st[S_MS]
    invt = 1.0 / P[P_TAU]
    lsa = math.log(st[S_SA])
    lsb = math.log(st[S_SB])
    if div == DIV_MIXTURE:
        lam = P[P_LAM]
        cp = P[P_CP]
        cq = P[P_CQ]
        loglam = math.log(lam) if lam > 0.0 else -np.inf
        log1mlam = math.log(1.0 - lam) if lam < 1.0 else -np.inf
        kp = 0.0
        kq = 0.0
        r = 0.0
        for j in range(lo, hi):
            lp, lq, lm = _mix_logs(np.float64(s[j]), np.float64(t[j]), mt, ms, invt, lsa, lsb, loglam, log1mlam)
            p = math.exp(lp)
            q = math.exp(lq)
            kp += masked(p, lp - lm)
            kq += masked(q, lq - lm)
            r += masked(q, (cp * p + cq * q) * math.exp(-lm))
        st[S_KP] += kp
        st[S_KQ] += kq
        st[S_R] += r
    elif div == DIV_TVD:
        tv = 0.0
        g = 0.0
        for j in range(lo, hi):
            p = math.exp((np.float64(t[j]) - mt) * invt - lsa)
            q = math.exp((np.float64(s[j]) - ms) * invt - lsb)
            tv += abs(p - q)
            g += q * 0.5 * np.sign(q - p)
        st[S_T] += tv
        st[S_G] += g


# ---------------------------------------------------------------- row loss from the statistics


@njit(inline="always", **JIT)
def _lse1(st, ce):  # type: ignore[no-untyped-def]
    """log-sum-exp of the student row at temperature 1."""
    return st[S_MS] + math.log(st[S_SB] if ce == CE_SHARED else st[S_S1])


@njit(inline="always", **JIT)
def _cos_parts(st):  # type: ignore[no-untyped-def]
    """(cosine similarity, |s|*|t|); a zero-norm row has similarity 0 and no gradient."""
    den = math.sqrt(st[S_SS]) * math.sqrt(st[S_TT])
    return (st[S_ST] / den if den > 0.0 else 0.0), den


@njit(inline="always", **JIT)
def _row_loss(st, P, div, ce, lin, hard, s_label, n):  # type: ignore[no-untyped-def]
    """The weighted row loss from its statistics (float64). ``hard``: the row has a hard-label term."""
    if st[S_NAN] != 0.0:
        return np.nan
    invt = 1.0 / P[P_TAU]
    ms = st[S_MS]
    loss = 0.0
    dw = P[P_DIV_W]
    if div == DIV_FORWARD_KL:
        loss += dw * (invt * st[S_SX] / st[S_SA] - math.log(st[S_SA] / st[S_SB]))
    elif div == DIV_REVERSE_KL:
        loss += dw * (invt * st[S_SY] / st[S_SB] - math.log(st[S_SB] / st[S_SA]))
    elif div == DIV_MIXTURE:
        loss += dw * (P[P_CP] * st[S_KP] + P[P_CQ] * st[S_KQ])
    elif div == DIV_TVD:
        loss += dw * 0.5 * st[S_T]
    if ce != CE_NONE and hard:
        lse1 = _lse1(st, ce)
        eps = P[P_SMOOTH]
        h = (1.0 - eps) * (lse1 - s_label)
        if eps != 0.0:
            h += eps * (lse1 - st[S_SSUM] / n)
        loss += P[P_HARD_W] * h
    if lin:
        loss += P[P_MSE_W] * st[S_D2] / n
        cos, _ = _cos_parts(st)
        loss += P[P_COS_W] * (1.0 - cos)
    return loss


# ---------------------------------------------------------------- pass 4: gradient


@njit(inline="always", **JIT)
def _pass_grad(s, t, g, lo, hi, st, P, div, ce, lin, hard, scale, n, pw):  # type: ignore[no-untyped-def]
    """Write the gradient of ``scale * row loss`` w.r.t. the student into ``g[lo:hi]``.

    One loop that reads ``s[j]`` and ``t[j]`` before writing ``g[j]``, so ``g`` may be ``s`` itself. The
    one-hot part of the cross-entropy gradient is left to the caller.
    """
    wide_vectors()
    x0 = s[lo]
    invt64 = 1.0 / P[P_TAU]
    invt = as_type_of(x0, invt64)
    mt64 = st[S_MT]
    ms64 = st[S_MS]
    mt = as_type_of(x0, mt64)
    ms = as_type_of(x0, ms64)
    zero = as_type_of(x0, 0.0)
    _, cut = limits_of(zero)
    # divergence: d row loss / d s = div_w / tau * d D / d b
    cd64 = scale * P[P_DIV_W] * invt64
    cd = as_type_of(x0, cd64)
    isa = as_type_of(x0, 1.0 / st[S_SA]) if div != DIV_NONE else zero
    isb = as_type_of(x0, 1.0 / st[S_SB]) if div != DIV_NONE else zero
    lsa = math.log(st[S_SA]) if div != DIV_NONE else 0.0
    lsb = math.log(st[S_SB]) if div != DIV_NONE else 0.0
    roff = zero  # reverse KL: dD/db = q * (log q - log p - D)
    if div == DIV_REVERSE_KL:
        d = invt64 * st[S_SY] / st[S_SB] - (lsb - lsa)
        roff = as_type_of(x0, lsa - lsb - d)
    lam = P[P_LAM]
    cp = P[P_CP]
    cq = P[P_CQ]
    loglam = math.log(lam) if lam > 0.0 else -np.inf
    log1mlam = math.log(1.0 - lam) if lam < 1.0 else -np.inf
    big_g = 0.0
    if div == DIV_MIXTURE:
        big_g = cq * st[S_KQ] - (1.0 - lam) * st[S_R]
    elif div == DIV_TVD:
        big_g = st[S_G]
    # cross-entropy: softmax(s) - eps / n (the one-hot part is the caller's)
    counted_ce = ce != CE_NONE and hard
    ch = as_type_of(x0, scale * P[P_HARD_W] if counted_ce else 0.0)
    ceps = as_type_of(x0, scale * P[P_HARD_W] * P[P_SMOOTH] / n if counted_ce else 0.0)
    is1 = as_type_of(x0, 1.0 / st[S_S1]) if ce == CE_OWN else zero
    # linear (MSE + cosine): g += A * s + B * t
    a_s = zero
    b_t = zero
    if lin:
        cos, den = _cos_parts(st)
        a64 = 2.0 * P[P_MSE_W] / n
        b64 = -a64
        if den > 0.0:
            a64 += P[P_COS_W] * cos / st[S_SS]
            b64 -= P[P_COS_W] / den
        a_s = as_type_of(x0, scale * a64)
        b_t = as_type_of(x0, scale * b64)
    for j in range(lo, hi):
        sj = s[j]
        tj = t[j]
        acc = zero
        q = zero
        wb = zero
        if div != DIV_NONE:
            wb = fexp((sj - ms) * invt)
            q = wb * isb
        if div == DIV_FORWARD_KL:
            acc += cd * (q - fexp((tj - mt) * invt) * isa)
        elif div == DIV_REVERSE_KL:
            acc += cd * masked(q, (sj - ms) * invt - (tj - mt) * invt + roff)
        elif div == DIV_MIXTURE:
            lp, lq, lm = _mix_logs(np.float64(sj), np.float64(tj), mt64, ms64, invt64, lsa, lsb, loglam, log1mlam)
            p64 = math.exp(lp)
            q64 = math.exp(lq)
            gk = cq * (lq - lm) - (1.0 - lam) * (cp * p64 + cq * q64) * math.exp(-lm)
            acc += as_type_of(x0, cd64 * masked(q64, gk - big_g))
        elif div == DIV_TVD:
            p64 = math.exp((np.float64(tj) - mt64) * invt64 - lsa)
            q64 = math.exp((np.float64(sj) - ms64) * invt64 - lsb)
            acc += as_type_of(x0, cd64 * q64 * (0.5 * np.sign(q64 - p64) - big_g))
        if ce == CE_SHARED:
            acc += ch * q - ceps
        elif ce == CE_OWN:
            acc += ch * _exp1(sj - ms, wb, pw, cut, zero) * is1 - ceps
        if lin:
            acc += a_s * sj + b_t * tj
        g[j] = acc


# ---------------------------------------------------------------- whole rows


@njit(inline="always", **JIT)
def _hard(has_labels, labels, r, ignore_index):  # type: ignore[no-untyped-def]
    """(counted, label) of row r: ignored rows are not counted; label -1 when there are no labels."""
    if not has_labels:
        return True, -1
    lab = labels[r]
    return lab != ignore_index, lab


@njit(inline="always", **JIT)
def _one_row(s, t, g, st, P, div, ce, lin, pw, lab, want_grad, scale, n, ahead):  # type: ignore[no-untyped-def]
    """Statistics, loss and (optionally) gradient of one counted row, all columns in this thread."""
    _pass_max(s, t, 0, n, st)
    _pass_sums(s, t, 0, n, st, P, div, ce, lin, pw, ahead)
    if div == DIV_MIXTURE or div == DIV_TVD:
        _pass_div2(s, t, 0, n, st, P, div)
    hard = lab >= 0
    s_label = np.float64(s[lab]) if hard else 0.0
    loss = _row_loss(st, P, div, ce, lin, hard, s_label, n)
    if want_grad:
        _pass_grad(s, t, g, 0, n, st, P, div, ce, lin, hard, scale, n, pw)
        if ce != CE_NONE and hard:
            g[lab] -= as_type_of(s[0], scale * P[P_HARD_W] * (1.0 - P[P_SMOOTH]))
    return loss


@njit(inline="always", **JIT)
def _counted_row(has_labels, labels, r, ignore_index, want_grad, out_loss, grad):  # type: ignore[no-untyped-def]
    """``_hard`` for row ``r``; an ignored row gets its zero loss (and zero gradient row) here."""
    counted, lab = _hard(has_labels, labels, r, ignore_index)
    if not counted:
        out_loss[r] = 0.0
        if want_grad:
            grad[r, :] = 0
    return counted, lab


@njit(inline="always", **JIT)
def _whole_row(s, t, labels, has_labels, ignore_index, P, scale, want_grad, out_loss, grad, st, r, div, ce, lin, pw):  # type: ignore[no-untyped-def]
    """Row ``r`` in this thread: ignored rows get loss 0 (and a zero gradient row)."""
    counted, lab = _counted_row(has_labels, labels, r, ignore_index, want_grad, out_loss, grad)
    if not counted:
        return
    _reset(st)
    # the next row, at s.strides[0] bytes, is usually this thread's next one (prange hands out contiguous
    # ranges); past the last row the prefetch reads nothing
    ahead = s.strides[0] // s.itemsize
    out_loss[r] = _one_row(s[r], t[r], grad[r], st, P, div, ce, lin, pw, lab, want_grad, scale, s.shape[1],
                           ahead)


@njit(inline="always", **JIT)
def _reset(st):  # type: ignore[no-untyped-def]
    for k in range(N_MAX):
        st[k] = -np.inf
    for k in range(N_MAX, N_STATS):
        st[k] = 0.0


_KERNELS: dict = {}


def response_kernel(div: int, ce: int, lin: bool, pw: int = 0):  # type: ignore[no-untyped-def]
    """The compiled response kernel for one (divergence, cross-entropy mode, linear term, power) variant.

    ``pw`` (see :func:`power_of`) is 0, or 2/4 for kernels that only take parameters with that temperature.

    ``kernel(s, t, labels, has_labels, ignore_index, P, scale, want_grad, out_loss, grad, nthreads)``:
    ``s``, ``t`` C-contiguous ``(rows, n)`` float32/float64; ``labels`` int64 ``(rows,)`` (ignored when
    ``has_labels`` is false); ``P`` the packed float64 parameters; ``scale`` multiplies the gradient
    (the reduction factor); ``out_loss`` float64 ``(rows,)`` receives the unscaled row losses (0 for ignored
    rows); ``grad`` (same shape/dtype as ``s``, may be ``s`` itself) receives the gradient when
    ``want_grad``; ``nthreads`` is the caller's thread count (rows fewer than that are split across
    threads). Labels must already be validated.
    """
    key = (div, ce, lin, pw)
    k = _KERNELS.get(key)
    if k is None:
        k = _KERNELS[key] = _make_response_kernel(div, ce, lin, pw)
    return k


def _make_response_kernel(div, ce, lin, pw):  # type: ignore[no-untyped-def]
    two_pass_div = div == DIV_MIXTURE or div == DIV_TVD

    @njit(parallel=True, **JIT)
    def kernel(s, t, labels, has_labels, ignore_index, P, scale, want_grad, out_loss, grad, nthreads):  # type: ignore[no-untyped-def]
        rows, n = s.shape
        # one copy of the row code per path: a serial copy for small batches saved ~2 us per call and
        # cost a third more compile time
        if rows >= nthreads or n < 2 * CHUNK:
            stats = np.empty((rows, N_STATS), dtype=np.float64)
            for r in prange(rows):
                _whole_row(s, t, labels, has_labels, ignore_index, P, scale, want_grad, out_loss, grad,
                           stats[r], r, div, ce, lin, pw)
            return
        # fewer rows than threads: each pass of a row runs over column chunks in parallel, then merges
        nchunks = (n + CHUNK - 1) // CHUNK
        part = np.empty((nchunks, N_STATS), dtype=np.float64)
        st = np.empty(N_STATS, dtype=np.float64)
        for r in range(rows):
            counted, lab = _counted_row(has_labels, labels, r, ignore_index, want_grad, out_loss, grad)
            if not counted:
                continue
            # each chunk works on its own slices s[r, lo:hi] (contiguous views, as a whole row is): passing
            # the row and a column range instead compiled to code half as fast
            for c in prange(nchunks):
                lo, hi = _chunk(c, n)
                pc = part[c]
                _reset(pc)
                _pass_max(s[r, lo:hi], t[r, lo:hi], 0, hi - lo, pc)
            _reset(st)
            _merge(st, part, 0, S_SA)
            for c in prange(nchunks):
                lo, hi = _chunk(c, n)
                pc = part[c]
                _copy_head(pc, st, S_SA)
                _pass_sums(s[r, lo:hi], t[r, lo:hi], 0, hi - lo, pc, P, div, ce, lin, pw, 0)
            _merge(st, part, S_SA, S_KP)
            if two_pass_div:
                for c in prange(nchunks):
                    lo, hi = _chunk(c, n)
                    pc = part[c]
                    _copy_head(pc, st, S_KP)
                    _pass_div2(s[r, lo:hi], t[r, lo:hi], 0, hi - lo, pc, P, div)
                _merge(st, part, S_KP, N_STATS)
            sr = s[r]
            gr = grad[r]
            hard = lab >= 0
            s_label = np.float64(sr[lab]) if hard else 0.0
            out_loss[r] = _row_loss(st, P, div, ce, lin, hard, s_label, n)
            if want_grad:
                for c in prange(nchunks):
                    lo, hi = _chunk(c, n)
                    _pass_grad(s[r, lo:hi], t[r, lo:hi], grad[r, lo:hi], 0, hi - lo, st, P, div, ce, lin, hard, scale, n,
                               pw)
                if ce != CE_NONE and hard:
                    gr[lab] -= as_type_of(sr[0], scale * P[P_HARD_W] * (1.0 - P[P_SMOOTH]))

    return kernel


@njit(inline="always", **JIT)
def _chunk(c, n):  # type: ignore[no-untyped-def]
    """Columns ``[lo, hi)`` of chunk ``c`` of a row of ``n``."""
    lo = c * CHUNK
    return lo, min(n, lo + CHUNK)


@njit(inline="always", **JIT)
def _merge(st, part, k0, k1):  # type: ignore[no-untyped-def]
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


@njit(inline="always", **JIT)
def _copy_head(dst, src, k1):  # type: ignore[no-untyped-def]
    """Give a chunk the merged statistics ``[0, k1)`` and reset its later sums."""
    for k in range(k1):
        dst[k] = src[k]
    for k in range(k1, N_STATS):
        dst[k] = 0.0


# ---------------------------------------------------------------- softmax
# The normaliser is summed in a loop that only reads, so in-place and out-of-place calls give
# bit-identical results (a loop that also stores may be vectorized differently when arrays alias).


@njit(inline="always", **JIT)
def _expsum_block(x, j0, j1, m, it):  # type: ignore[no-untyped-def]
    """Sum of the exponentials below 1 (columns at the maximum left out): see ``_sums_block``."""
    zero = as_type_of(m, 0.0)
    one = as_type_of(m, 1.0)
    acc = zero
    for j in range(j0, j1):
        d = x[j] - m
        acc += fexp(d * it) * (zero if d == zero else one)
    return acc


@njit(inline="always", **JIT)
def _expsum(x, lo, hi, m, it, ahead):  # type: ignore[no-untyped-def]
    """``sum(exp((x[lo:hi] - m) * it))`` in float64 over blocks summed in the input's precision, the next
    row prefetched (as in ``_pass_sums``)."""
    total = 0.0
    nb = (hi - lo) // BLOCK
    for b in range(nb):
        j0 = lo + b * BLOCK
        _prefetch_block(x, j0, j0 + BLOCK, ahead)
        total += _expsum_block(x, j0, j0 + BLOCK, m, it)
    _prefetch_block(x, lo + nb * BLOCK, hi, ahead)
    total += _expsum_block(x, lo + nb * BLOCK, hi, m, it)
    return np.float64(_count_eq(x, lo, hi, m)) + total


_SOFTMAX: dict = {}


def softmax_kernel(log: bool):  # type: ignore[no-untyped-def]
    """``kernel(x, invt, out)``: row-wise (log-)softmax of ``x * invt`` into ``out`` (may be ``x``: each
    element is read for the last time before it is overwritten)."""
    k = _SOFTMAX.get(log)
    if k is None:
        k = _SOFTMAX[log] = _make_softmax_kernel(log)
    return k


def _make_softmax_kernel(log):  # type: ignore[no-untyped-def]
    @njit(parallel=True, **JIT)
    def kernel(x, invt, out):  # type: ignore[no-untyped-def]
        rows, n = x.shape
        for r in prange(rows):
            wide_vectors()
            xr = x[r]
            orow = out[r]
            m, nan = _max_nan(xr, 0, n)
            it = as_type_of(xr[0], invt)
            mm = as_type_of(xr[0], m)
            ssum = _expsum(xr, 0, n, mm, it, x.strides[0] // x.itemsize)
            if nan:
                ssum = np.nan
            if log:
                off = as_type_of(xr[0], math.log(ssum))
                for j in range(n):
                    orow[j] = (xr[j] - mm) * it - off
            else:
                inv = as_type_of(xr[0], 1.0 / ssum)
                for j in range(n):
                    orow[j] = fexp((xr[j] - mm) * it) * inv

    return kernel

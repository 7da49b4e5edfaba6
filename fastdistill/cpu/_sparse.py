"""Numba CPU kernels for sparse (top-k) teachers, and for ``top_k``.

Private module. A sparse teacher gives per row the ids of k classes and their values (log-probabilities
or logits). Its loss touches the full student row only through three row sums -- the maximum, the
normaliser of ``softmax(s / tau)`` and, for the cross-entropy at another temperature, that of
``softmax(s)`` -- and the k student logits at the teacher's ids. So per row:

1. one streaming pass over the student row for its statistics: spans of ``SPAN`` columns, each span's
   maximum and then its exponential sums (read from cache) with an online rescale, vectorized as the
   dense kernels' ``_max_nan`` and ``_expsum``;
2. the divergence over k (or k + 1) *bins* in float64, from k gathers: the teacher's bins, and for the
   ``"renormalize"`` and ``"bucket"`` tails one bin for the mass outside the support;
3. (gradient) one dense write ``g_j = a * q_j + b * q1_j + c`` -- every class outside the support has
   the same derivative per unit of probability -- then the k support columns (and the label's)
   recomputed with their own terms and stored once (never a stored value corrected afterwards: a
   half-precision gradient is rounded once).

With ``h_b = q_b * dD/dq_b`` per bin (finite where ``q_b`` underflows), the gradient of the divergence
with respect to ``s_j`` is ``(h_b(j) * q_j / q_b(j) - q_j * sum_b h_b) / tau``: the support columns are
their bins, the others share the outside bin.
"""
from __future__ import annotations

import math

import numpy as np
from numba import get_thread_id, njit, prange
from numba.core import types
from numba.extending import overload

from .._scalar import (
    REST_FLOOR,
    SUPPORT_GAP,
    bin_logprob,
    ce_term,
    reads_rest_bin,
    sorted_used_ids,
    teacher_weights,
)
from .._spec import (
    CE_NONE,
    CE_SHARED,
    DIV_NONE,
    P_CP,
    P_CQ,
    P_DIV_W,
    P_HARD_W,
    P_LAM,
    P_SMOOTH,
    P_TAU,
    TAIL_BUCKET,
    TAIL_SUPPORT,
    TAU_FLOAT64_MATH,
)
from .._formulas import run_time_dispatch
from ._kernels import JIT, JIT_INNER, JIT_STRICT, LINE, _expsum, _max_nan, arithmetic_zero, as_type_of, grad_target, stored
from ._math import (
    borrowed,
    fexp2,
    fexp2_term,
    from_okey,
    inline_into_callers,
    okey,
    prefetch,
    store_fence,
    stream_line,
    thread_count,
    wide_vectors,
)



def _is_float64(a):  # type: ignore[no-untyped-def]  # pragma: no cover - jitted code only
    """Whether array ``a`` holds float64 (a compile-time constant)."""
    return a.dtype == np.float64


@overload(_is_float64, jit_options={"cache": True})
def _is_float64_impl(a):  # type: ignore[no-untyped-def]
    f64 = a.dtype == types.float64
    return lambda a: f64


_teacher_weights = njit(**JIT_INNER)(teacher_weights)
# scalar formulas whose order of operations matters: compiled without fastmath (its reassociation would
# turn (ms - s) + log Z back into (ms + log Z) - s)
_STRICT = dict(JIT_INNER, fastmath=False)
_bin_logprob = njit(**_STRICT)(bin_logprob)
_ce_term = njit(**_STRICT)(ce_term)
_sorted_used_ids = njit(**JIT_INNER)(sorted_used_ids)
_reads_rest_bin = njit(**JIT_INNER)(reads_rest_bin)


# a divergence's bin and row constants (fastdistill._formulas) by its run-time code: this kernel serves
# every divergence
_bin = run_time_dispatch(njit(**JIT_STRICT), "bin", 5, (0.0, 0.0))
_constants = run_time_dispatch(njit(**JIT_STRICT), "constants", 3, (0.0, 0.0, 0.0, 0.0))


# columns of a row read at a time by the statistics pass: a span's maximum and then its exponential
# sums read it from L1 (16 KB of float32), so the row streams from memory once for all its statistics
SPAN = 4096


@njit(**JIT_INNER)
def _power(e, pw):  # type: ignore[no-untyped-def]
    """``e ** pw`` for pw 2 or 4 (``exp(d) = exp(d / tau) ** tau``: one exponential for both softmaxes)."""
    inline_into_callers()
    e2 = e * e
    return e2 if pw == 2 else e2 * e2


# exp(x) = 2 ** (x * LOG2E): the kernels' float32 exponentials are ``fexp2`` of arguments scaled by a
# factor they multiply by anyway (1 / tau), a third fewer instructions than ``fexp``'s
LOG2E = 1.4426950408889634


# columns per block of ``_expsums32``: each block first prefetches the same columns of the next span,
# so that the next span's reads from memory overlap this span's arithmetic (the forward's statistics
# 1.4x faster at 1024 x 128256 float32; 128 and 256 equally fast, 384 and more slower: the prefetches
# of a block are issued together)
PF_BLOCK = 256
# a gradient of this many bytes or more is written with streaming stores, in blocks of STREAM_BLOCK
# columns staged in a buffer of the thread's (see _write_dense_row): 1024 x 128256 float32, 1.2x faster
# forward+gradient. Below it the gradient may still be in the cache when the caller reads it.
STREAM_BYTES = 64 << 20
STREAM_BLOCK = 256
# columns of unused scratch before and after each thread's row of exponentials. The statistics' loop
# reads the student and stores into that row; LLVM guards its vector loop with a run-time check that
# the two do not overlap, conservative by up to a vector loop's step (32 columns measured), and runs
# the scalar loop instead, whose sums round differently: without the gap, the loss changed in its last
# digits with where the allocator placed the scratch beside the student.
SCRATCH_PAD = 256


@njit(inline="always", **JIT_INNER)
def _expsums_block(x, m, k2, j0, j1, pw, e_out):  # type: ignore[no-untyped-def]
    """Columns ``[j0, j1)`` of ``_expsums32``: its two sums of the columns below ``m`` and the count of
    those at ``m``, in float32 (exact to 2**24 columns), from one loop (a separate count loop cost a
    tenth of the statistics' time); ``e_out`` (or None): each column's exponential kept there (exactly
    0 at and below 2**-126). Numba-inlined into it: LLVM unrolls the fixed-length blocks across the
    accumulators' dependency chains, as in ``_sums_block``."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    lo = np.float32(-126.0)
    a = zero
    b = zero
    c = zero
    if pw == 0:
        for j in range(j0, j1):
            d = as_type_of(m, x[j]) - m
            keep = zero if d == zero else one
            t = d * k2
            e = fexp2_term(t)
            if e_out is not None:
                e_out[j] = e if t > lo else zero
            a += e * keep
            c += keep
    else:
        for j in range(j0, j1):
            d = as_type_of(m, x[j]) - m
            keep = zero if d == zero else one
            t = d * k2
            e = fexp2_term(t)
            if e_out is not None:
                e_out[j] = e if t > lo else zero
            e = e * keep
            a += e
            b += _power(e, pw)
            c += keep
    return np.float64(a), np.float64(b), np.float64(j1 - j0) - np.float64(c)


@njit(**JIT_INNER)
def _expsums32(x, m, it, pw, e_out=None):  # type: ignore[no-untyped-def]
    """(sum exp((x - m) * it), the sum of its ``pw``-th powers, or 0 when ``pw`` is 0) over the span
    ``x`` for float32 ``m`` and ``it``: both normalisers from one exponential per column when ``pw`` is 2
    or 4, in float32 over blocks of ``PF_BLOCK`` (float64 across them), the columns at ``m`` counted
    apart as in ``_expsum`` (a confident row's sum keeps the digits of its terms below 1). Each block
    prefetches the columns ``SPAN`` on: the next span of the row (past its end: the next row's first,
    harmless when another thread takes that row). ``e_out``: see ``_expsums_block``."""
    wide_vectors()
    inline_into_callers()
    k2 = it * np.float32(LOG2E)
    n = x.shape[0]
    a = 0.0
    b = 0.0
    k = 0.0
    nb = n // PF_BLOCK
    for blk in range(nb):
        j0 = blk * PF_BLOCK
        for jp in range(j0 + SPAN, j0 + SPAN + PF_BLOCK, LINE // x.itemsize):
            prefetch(x, jp)
        da, db, dc = _expsums_block(x, m, k2, j0, j0 + PF_BLOCK, pw, e_out)
        a += da
        b += db
        k += dc
    da, db, dc = _expsums_block(x, m, k2, nb * PF_BLOCK, n, pw, e_out)
    k += dc
    return k + a + da, (k + b + db if pw != 0 else 0.0)


@njit(**JIT_INNER)
def _span_sums(x, m, invt, two, pw, f64_math, e_out):  # type: ignore[no-untyped-def]
    """(sum exp((x - m) / tau), sum exp(x - m) when ``two``) over one span, in the row's arithmetic;
    ``e_out`` (float32 arithmetic, not two exponentials): the span's ``exp((x - m) / tau)``."""
    inline_into_callers()
    if f64_math:
        z = _expsum(x, m, invt, 0)
        z1 = _expsum(x, m, 1.0, 0) if two else 0.0
    else:
        mf = np.float32(m)
        z, z1 = _expsums32(x, mf, np.float32(invt), pw if two else 0, e_out)
        if two and pw == 0:
            z1 = _expsums32(x, mf, np.float32(1.0), 0)[0]
    return z, z1


@njit(**JIT_INNER)
def _row_statistics(s_row, invt, ce, pw, f64_math, with_sum, keys_max=None, e_out=None, refs=None):  # type: ignore[no-untyped-def]  # noqa: E501
    """(max, NaN or +inf seen, Z, Z1, sum of the logits): the row maximum and the normalisers of ``softmax(s /
    tau)`` and (cross-entropy at another temperature) ``softmax(s)`` relative to it, in one streaming
    pass of spans with an online rescale (a span's maximum, then its sums from cache). ``pw`` (2 or 4,
    float32 arithmetic, tau = pw): both normalisers from one exponential per column. ``keys_max``
    (``top_k``): the running maximum of column ``j`` of every span, folded in the maximum's loop.
    ``e_out`` and ``refs`` (the gradient's, float32 arithmetic): each column's ``exp((s - m) / tau)``,
    ``m`` the running maximum its span's sums used, kept in ``refs[span]`` (the write pass rescales
    by span instead of computing the exponentials again)."""
    n = s_row.shape[0]
    two = ce != CE_NONE and ce != CE_SHARED
    ms = -np.inf
    nan = False
    z = 0.0
    z1 = 0.0
    ssum = 0.0
    for c0 in range(0, n, SPAN):
        c1 = min(n, c0 + SPAN)
        x = s_row[c0:c1]
        m, nan_x = _max_nan(x, arithmetic_zero(x), keys_max)
        nan = nan or nan_x
        if m > ms:
            if ms != -np.inf:
                z *= math.exp((ms - m) * invt)
                z1 *= math.exp(ms - m)
            ms = m
        if refs is not None:
            refs[c0 // SPAN] = ms
        if ms != -np.inf:
            if e_out is None:
                zx, z1x = _span_sums(x, ms, invt, two, pw, f64_math, None)
            else:
                zx, z1x = _span_sums(x, ms, invt, two, pw, f64_math, e_out[c0:c1])
            z += zx
            z1 += z1x
        elif e_out is not None:
            for j in range(c0, c1):
                e_out[j] = np.float32(0.0)
        if with_sum:
            for j in range(x.shape[0]):
                ssum += as_type_of(0.0, x[j])
    # a +inf logit: no softmax (inf - inf); its NaN is due, not what the sums' exponentials make of it
    return ms, nan or ms == np.inf, z, (z1 if two else z), ssum


@njit(**JIT_INNER)
def _write_dense(g_row, s_row, ms, invt, a, b, c, two, pw):  # type: ignore[no-untyped-def]
    """``g_j = a * exp((s_j - ms) * invt) + b * exp(s_j - ms) + c`` (``b`` only when ``two``; its
    exponential the first's ``pw``-th power when ``pw``), in the arithmetic precision of the row,
    rounded once into ``g``'s storage; ``g_row`` None: over ``s_row``, through ``s_row`` itself (one
    pointer, so that the loop runs vectorized: see ``_kernels.grad_target``)."""
    inline_into_callers()
    wide_vectors()
    g_row = grad_target(g_row, s_row, 0, s_row.shape[0])
    ct = arithmetic_zero(s_row)
    af = as_type_of(ct, a)
    bf = as_type_of(ct, b)
    cf = as_type_of(ct, c)
    mf = as_type_of(ct, ms)
    k2 = as_type_of(ct, invt * LOG2E)
    l2 = as_type_of(ct, LOG2E)
    if two and pw != 0:
        for j in range(s_row.shape[0]):
            e = fexp2((as_type_of(ct, s_row[j]) - mf) * k2)
            g_row[j] = stored(g_row, af * e + bf * _power(e, pw) + cf)
    elif two:
        for j in range(s_row.shape[0]):
            d = as_type_of(ct, s_row[j]) - mf
            g_row[j] = stored(g_row, af * fexp2(d * k2) + bf * fexp2(d * l2) + cf)
    else:
        for j in range(s_row.shape[0]):
            d = as_type_of(ct, s_row[j]) - mf
            g_row[j] = stored(g_row, af * fexp2(d * k2) + cf)


@njit(**JIT_INNER)
def _write_scaled(g_out, e, a, b, c, pw):  # type: ignore[no-untyped-def]
    """``g_j = a * e_j + b * e_j**pw + c`` (``b`` only when ``pw``) from the statistics' exponentials
    ``e`` (float32), rounded once into ``g``'s storage."""
    inline_into_callers()
    wide_vectors()
    af = np.float32(a)
    bf = np.float32(b)
    cf = np.float32(c)
    if pw != 0:
        for j in range(e.shape[0]):
            g_out[j] = stored(g_out, af * e[j] + bf * _power(e[j], pw) + cf)
    else:
        for j in range(e.shape[0]):
            g_out[j] = stored(g_out, af * e[j] + cf)


@njit(**JIT_INNER)
def _write_dense_row(g_row, s_row, ms, invt, a, b, c, two, pw, buf, reuse, e_row, refs, inplace):  # type: ignore[no-untyped-def]  # noqa: E501
    """:func:`_write_dense` over the row, or, ``reuse``: from the statistics' exponentials ``e_row`` and
    their spans' maxima ``refs``, :func:`_write_scaled` by span (``a`` and ``b`` times the span's
    ``exp((ref - ms) / tau)`` and its power: no exponential per column). Given a staging block ``buf``
    (non-empty: a gradient of ``STREAM_BYTES`` or more), the row's whole 64-byte lines are computed
    into ``buf`` first and stored from there with :func:`stream_line`. One call site of each inlined
    loop for the head, the lines, the tail and the spans, and one of ``_write_dense`` for a gradient
    written over the student (``inplace``: ``g_row`` is ``s_row``'s memory), through ``s_row``."""
    n = s_row.shape[0]
    w = buf.shape[0]
    pw_e = pw if two else 0
    per_line = LINE // g_row.itemsize
    line0 = (-(g_row.ctypes.data // g_row.itemsize)) % per_line  # the first line's start
    b0 = 0
    b1 = n if w == 0 else min(n, line0)
    while b0 < n:
        full = w != 0 and b1 - b0 == w and (b0 - line0) % per_line == 0
        p0 = b0
        while p0 < b1:
            p1 = min(b1, (p0 // SPAN + 1) * SPAN) if reuse else b1
            out = buf[p0 - b0:p1 - b0] if full else g_row[p0:p1]
            if reuse:
                f = math.exp((refs[p0 // SPAN] - ms) * invt)
                _write_scaled(out, e_row[p0:p1], a * f, b * f ** pw_e if pw_e != 0 else 0.0, c, pw_e)
            elif inplace and not full:
                _write_dense(None, s_row[p0:p1], ms, invt, a, b, c, two, pw)
            else:
                _write_dense(out, s_row[p0:p1], ms, invt, a, b, c, two, pw)
            p0 = p1
        if full:
            for q in range(0, w, per_line):
                stream_line(g_row, b0 + q, buf, q)
        b0 = b1
        b1 = min(n, b0 + w) if w != 0 else n
    if w != 0:
        store_fence()


@njit(parallel=True, **JIT)
def sparse_response(s, idx, vals, labels, has_labels, ignore_index, P, div, ce, tail, want_grad, scale,  # type: ignore[no-untyped-def]  # noqa: E501
                    out_loss, grad, stream_bytes, t_gen=1.0, inplace=False):
    """Row losses (unscaled, 0 for ignored rows) into ``out_loss`` and, when ``want_grad``, the gradient
    of ``scale * sum(rows)`` into ``grad`` (``s``'s shape), for student logits ``s`` ``(rows, n)`` and a
    sparse teacher ``idx`` int64 ``(rows, k)`` (-1: an unused slot), ``vals`` float64 ``(rows, k)``
    (log-probabilities or logits; the tails use them as ``exp(v / tau)``), ``div``/``ce`` the variant's
    divergence and cross-entropy mode (``_spec``), ``tail`` a ``_spec.TAIL_*``. A gradient of
    ``stream_bytes`` or more is written with streaming stores (``STREAM_BYTES``). ``t_gen``: the
    temperature the values were produced at, their weights ``exp(v * t_gen / tau)`` (``"bucket"``:
    ``tau == t_gen``, its bins ``exp(v)``). ``inplace``: ``grad`` is ``s``'s own memory (its dense
    write then goes through ``s``). Inputs are validated."""
    rows, n = s.shape
    k = idx.shape[1]
    tau = P[P_TAU]
    invt = 1.0 / tau
    # the values' scale T_gen / tau (exactly 1 / tau at T_gen = 1: today's bits; exactly 1 at tau = T_gen)
    vinvt = invt if t_gen == 1.0 else t_gen / tau
    dw = P[P_DIV_W]
    hw = P[P_HARD_W]
    eps = P[P_SMOOTH]
    lam = P[P_LAM]
    cp = P[P_CP]
    cq = P[P_CQ]
    kd = _constants(div, lam, cp, cq)
    f64_math = _is_float64(s) or tau > TAU_FLOAT64_MATH
    # the power trick (as the dense kernels' pw variants): the cross-entropy's exp(s - max) is the
    # divergence's exp((s - max) / tau) to the power tau, for tau 2 and 4 in float32 arithmetic
    pw = 0
    if ce != CE_NONE and ce != CE_SHARED and not f64_math:
        pw = 4 if tau == 4.0 else (2 if tau == 2.0 else 0)
    # a gradient this large bypasses the cache (streaming stores from a staging block per row)
    stream = want_grad and grad.size * grad.itemsize >= stream_bytes and grad.ctypes.data % grad.itemsize == 0
    # the gradient from the statistics' own exponentials (float32, one exponential per column), kept
    # in a row of the thread's: no second exponential per column in the write pass
    reuse = want_grad and not f64_math and (pw != 0 or ce == CE_NONE or ce == CE_SHARED)
    threads = thread_count()
    bufs = np.empty((threads, STREAM_BLOCK if stream else 0), grad.dtype)
    e_rows = np.empty((threads, n + 2 * SCRATCH_PAD), np.float32)
    refs_rows = np.empty((threads, (n + SPAN - 1) // SPAN), np.float64)
    srt_rows = np.empty((threads, k), np.int64)  # a row's used ids in increasing order (the rest bin's)
    for r in prange(rows):
        ri = np.int64(r)
        lab = labels[r] if has_labels else np.int64(-1)
        g_row = borrowed(grad, ri, 0, n) if want_grad else borrowed(grad, 0, 0, 1)
        tid = np.int64(get_thread_id())
        buf = borrowed(bufs, tid, 0, bufs.shape[1])
        e_row = borrowed(e_rows, tid, SCRATCH_PAD, SCRATCH_PAD + n)
        refs = borrowed(refs_rows, tid, 0, refs_rows.shape[1])
        if has_labels and lab == ignore_index:
            out_loss[r] = 0.0
            if want_grad:
                for j in range(n):  # (a slice assignment here became a parfor of its own, never run)
                    g_row[j] = stored(g_row, 0.0)
            continue
        s_row = borrowed(s, ri, 0, n)
        # (kept without a gradient as well: one compiled statistics pass, not two)
        ms, nan, z, z1, ssum = _row_statistics(s_row, invt, ce, pw, f64_math, ce != CE_NONE and eps != 0.0,
                                               None, e_row, refs)
        lz = math.log(z)
        # the teacher's bins: log-weights v / tau (log-probabilities as they are for "bucket")
        ids = idx[r]
        vr = vals[r]
        count, vmax, lacc, bad_v = _teacher_weights(ids, vr, vinvt)
        # the student's log-normaliser over the bins: the row's, or for "support" the support's own
        # (relative to its own maximum: the support's mass may underflow relative to the row's), and
        # the reference of the bins' log-probabilities (s_j - ref_n) / tau - lzn
        ref_n, lzn = _support_lse(s_row, ids, ms, invt) if tail == TAIL_SUPPORT else (ms, lz)
        # a NaN or +inf value, or no mass on the support: the teacher's distribution is undefined
        undefined = div != DIV_NONE and (bad_v or (tail != TAIL_BUCKET and vmax == -np.inf))
        d = 0.0
        h_sum = 0.0
        for b in range(k if not undefined else 0):
            if ids[b] >= 0:
                lq = (as_type_of(0.0, s_row[ids[b]]) - ref_n) * invt - lzn
                lp = _bin_logprob(vr[b], vinvt, vmax, lacc, tail)
                db, hb = _bin(div, lp, lq, math.exp(lp), math.exp(lq), kd)
                d += db
                h_sum += hb
        # the bin outside the support: the student's mass there summed directly, relative to its own
        # maximum m_rest (R = sum exp((s_j - m_rest) / tau) over j outside)
        ref = ms
        rest_sum = 0.0
        h_out = 0.0
        if _reads_rest_bin(tail, div) and not nan and ms != -np.inf and not undefined:
            srt = borrowed(srt_rows, tid, 0, k)
            m_rest, rest_sum = _rest_sums(s_row, srt, _sorted_used_ids(ids, srt), ms, invt, not f64_math, e_row,
                                          refs)
            lq_out = -np.inf
            if rest_sum > 0.0:
                ref = m_rest
                lq_out = (m_rest - ms) * invt + math.log(rest_sum) - lz
            p_s = 0.0
            if tail == TAIL_BUCKET:
                for b in range(k):
                    if ids[b] >= 0:
                        p_s += math.exp(vr[b])
            p_out = max(0.0, 1.0 - p_s) if tail == TAIL_BUCKET else 0.0
            lp_out = math.log(p_out) if p_out > 0.0 else -np.inf
            d_out, h_out = _bin(div, lp_out, lq_out, p_out, math.exp(lq_out), kd)
            d += d_out
            h_sum += h_out
        if d < 0.0:
            d = 0.0  # a divergence rounded below 0 (its terms are not negative)
        if undefined:
            d = np.nan
        loss = dw * d
        counted_ce = ce != CE_NONE and lab >= 0
        s_lab = 0.0
        if counted_ce:
            s_lab = as_type_of(0.0, s_row[lab])
            loss += hw * _ce_term(ms, s_lab, math.log(z) if ce == CE_SHARED else math.log(z1), eps, ssum / n)
        if nan or ms == -np.inf:
            loss = np.nan
        out_loss[r] = loss
        if not want_grad:
            continue
        if loss != loss:
            for j in range(n):
                g_row[j] = stored(g_row, np.nan)
            continue
        # the cross-entropy's softmax (a_ce * exp((s - ms) / tau) or b_ce * exp(s - ms)), its smoothing
        # constant c, and the divergence's part of each column outside the support, cd * (h_out / q_out -
        # sum h) * q_j, which the dense write takes relative to ``ref`` (m_rest: its q_j / q_out is
        # exp((s_j - m_rest) / tau) / R, finite however small q_out)
        cd = scale * dw * invt
        a_ce = 0.0
        b_ce = 0.0
        c = 0.0
        if counted_ce:
            ch = scale * hw
            c = -ch * eps / n
            if ce == CE_SHARED:
                a_ce = ch / z
            else:
                b_ce = ch / z1
        e_ref = math.exp((ref - ms) * invt)
        a = a_ce * e_ref
        if tail != TAIL_SUPPORT:
            a += cd * ((h_out / rest_sum if rest_sum > 0.0 else 0.0) - h_sum * e_ref / z)
        b = b_ce * math.exp(ref - ms)
        one_hot = scale * hw * (1.0 - eps) if counted_ce else 0.0
        lab_c = lab if counted_ce else np.int64(-1)
        sup = np.empty(k + 1, np.float64)
        _support_values(sup, s_row, ids, vr, ms, invt, ref_n, lzn, vmax, lacc, a_ce, b_ce, c, cd, h_sum, one_hot,
                        lab_c, tail, div, kd, ref, a, b, vinvt)
        _write_dense_row(g_row, s_row, ref, invt, a, b, c, b != 0.0, pw, buf, reuse and ref == ms, e_row, refs,
                         inplace)
        _scatter_support(g_row, ids, sup, lab_c)


@njit(**JIT_INNER)
def _support_lse(s_row, ids, ms, invt):  # type: ignore[no-untyped-def]
    """``(ref, log sum_S exp((s_j - ref) / tau))`` over the support's columns, the sum formed relative to
    their own maximum (``-inf`` when every one of them is ``-inf``). ``ref`` is the row's maximum ``ms``,
    or the support's own maximum logit where the support lies more than ``SUPPORT_GAP`` temperatures
    below ``ms``: there ``s_j - ms`` rounds away the support's differences (all of them beside a student
    logit of 1e30), which the support's softmax is made of."""
    top = -np.inf
    for b in range(ids.shape[0]):
        if ids[b] >= 0:
            top = max(top, (as_type_of(0.0, s_row[ids[b]]) - ms) * invt)
    if top == -np.inf:
        return ms, top
    ref = ms
    if top < -SUPPORT_GAP:
        ref = -np.inf
        for b in range(ids.shape[0]):
            if ids[b] >= 0:
                ref = max(ref, as_type_of(0.0, s_row[ids[b]]))
        top = 0.0
    acc = 0.0
    for b in range(ids.shape[0]):
        if ids[b] >= 0:
            acc += math.exp((as_type_of(0.0, s_row[ids[b]]) - ref) * invt - top)
    return ref, top + math.log(acc)


@njit(**JIT_INNER)
def _kept_rest_sum(e_row, refs, srt, m, ms, invt):  # type: ignore[no-untyped-def]
    """``sum exp((s_j - ms) / tau)`` over the columns outside the support (``srt[:m]``) from the
    statistics' kept exponentials (``e_row[j] = exp((s_j - refs[span]) / tau)``): the support's entries
    set to 0 first (the dense write reads them, but the support's columns are stored over it), then
    each span summed whole (vectorized) and rescaled."""
    for i in range(m):
        e_row[srt[i]] = np.float32(0.0)
    n = e_row.shape[0]
    total = 0.0
    for j0 in range(0, n, SPAN):
        total += _plain_sum(e_row, j0, min(n, j0 + SPAN)) * math.exp((refs[j0 // SPAN] - ms) * invt)
    return total


@njit(**JIT_INNER)
def _plain_sum(x, j0, j1):  # type: ignore[no-untyped-def]
    """``sum(x[j0:j1])`` in float64 (vectorized)."""
    wide_vectors()
    inline_into_callers()
    acc = 0.0
    for j in range(j0, j1):
        acc += np.float64(x[j])
    return acc


@njit(**JIT_INNER)
def _rest_sums(s_row, srt, m, ms, invt, kept, e_row, refs):  # type: ignore[no-untyped-def]
    """(ref, R): ``R = sum exp((s_j - ref) / tau)`` over the row's columns outside the support (``srt[:m]``,
    its ids in increasing order), summed directly segment by segment; ``ref`` the row's maximum ``ms``,
    or where that sum falls below ``REST_FLOOR`` the outside columns' own maximum (R = 0 when there is
    no such column or all are ``-inf``). ``kept``: the statistics' exponentials ``e_row`` (spans'
    references ``refs``; float32 arithmetic) are there to sum (their support entries are zeroed)."""
    n = s_row.shape[0]
    ct = arithmetic_zero(s_row)
    it = as_type_of(ct, invt)
    total = 0.0
    if kept:
        total = _kept_rest_sum(e_row, refs, srt, m, ms, invt)
    else:
        lo = 0
        for i in range(m + 1):
            hi = srt[i] if i < m else n
            if hi > lo:
                total += _expsum(s_row[lo:hi], as_type_of(ct, ms), it, 0)
            lo = hi + 1
    if total >= REST_FLOOR:
        return ms, total
    m_rest = -np.inf
    lo = 0
    for i in range(m + 1):
        hi = srt[i] if i < m else n
        if hi > lo:
            seg = s_row[lo:hi]
            m_rest = max(m_rest, _max_nan(seg, arithmetic_zero(seg))[0])
        lo = hi + 1
    if m_rest == -np.inf:
        return m_rest, 0.0
    mr = as_type_of(ct, m_rest)
    total = 0.0
    lo = 0
    for i in range(m + 1):
        hi = srt[i] if i < m else n
        if hi > lo:
            total += _expsum(s_row[lo:hi], mr, it, 0)
        lo = hi + 1
    return m_rest, total


@njit(**JIT_INNER)
def _support_values(out, s_row, ids, vr, ms, invt, ref_n, lzn, vmax, lacc, a_ce, b_ce, c, cd, h_sum, one_hot,  # type: ignore[no-untyped-def]  # noqa: E501
                    lab, tail, div, kd, ref, a, b, vinvt):
    """The gradient at the support's columns (``out[b]`` for slot ``b``) and at the label's when it is
    not one of them (``out[k]``; NaN when there is none), each from all of its terms (the
    cross-entropy's, its bin's ``cd * (h_b - q_b * sum h)``, the one-hot; the label's outside the
    support as the dense write's ``a * exp((s - ref) / tau) + b * exp(s - ref) + c``; ``vinvt`` the
    values' scale ``T_gen / tau``; ``ref_n``, ``lzn``: the bins' log-probabilities are
    ``(s_j - ref_n) / tau - lzn``). Read before the dense write: the gradient may be the student itself."""
    k = ids.shape[0]
    out[k] = np.nan
    lab_in_support = False
    for slot in range(k):
        j = ids[slot]
        if j < 0:
            continue
        sj = as_type_of(0.0, s_row[j])
        dj = (sj - ms) * invt
        lq = (sj - ref_n) * invt - lzn  # (dj - lzn where ref_n is ms)
        lp = _bin_logprob(vr[slot], vinvt, vmax, lacc, tail)
        qb = math.exp(lq)
        _, hb = _bin(div, lp, lq, math.exp(lp), qb, kd)
        val = a_ce * math.exp(dj) + b_ce * math.exp(sj - ms) + c + cd * (hb - qb * h_sum)
        if j == lab:
            val -= one_hot
            lab_in_support = True
        out[slot] = val
    if lab >= 0 and not lab_in_support:
        sl = as_type_of(0.0, s_row[lab])
        out[k] = a * math.exp((sl - ref) * invt) + b * math.exp(sl - ref) + c - one_hot


@njit(**JIT_INNER)
def _scatter_support(g_row, ids, vals, lab):  # type: ignore[no-untyped-def]
    """Store :func:`_support_values` (rounded once) over the dense gradient."""
    k = ids.shape[0]
    for b in range(k):
        if ids[b] >= 0:
            g_row[ids[b]] = stored(g_row, vals[b])
    if lab >= 0 and vals[k] == vals[k]:
        g_row[lab] = stored(g_row, vals[k])


# ---------------------------------------------------------------- top_k


@njit(**JIT_INNER)
def _insert(best_v, best_i, m, v, i):  # type: ignore[no-untyped-def]
    """Insert ``(v, i)`` into the ``m`` entries of ``best_*`` kept sorted by decreasing value, ties by
    increasing id (the caller checked that it belongs)."""
    inline_into_callers()
    pos = m
    while pos > 0 and (best_v[pos - 1] < v or (best_v[pos - 1] == v and best_i[pos - 1] > i)):
        if pos < best_v.shape[0]:
            best_v[pos] = best_v[pos - 1]
            best_i[pos] = best_i[pos - 1]
        pos -= 1
    if pos < best_v.shape[0]:
        best_v[pos] = v
        best_i[pos] = i


@njit(**JIT_INNER)
def _fold_into(acc, y):  # type: ignore[no-untyped-def]
    """``acc[j] = max(acc[j], y[j])`` (integer keys)."""
    wide_vectors()
    inline_into_callers()
    for j in range(y.shape[0]):
        acc[j] = y[j] if y[j] > acc[j] else acc[j]


@njit(**JIT_INNER)
def _kth_largest(a, k):  # type: ignore[no-untyped-def]
    """The ``k``-th largest of ``a``, which it reorders: Hoare's selection, the middle element as the
    pivot (``np.partition`` did the same in 5 s more compilation per storage type)."""
    t = k - 1  # its place in decreasing order
    lo = 0
    hi = a.shape[0] - 1
    while lo < hi:
        p = a[(lo + hi) // 2]
        i = lo
        j = hi
        while i <= j:
            while a[i] > p:
                i += 1
            while a[j] < p:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if t <= j:
            hi = j
        elif t >= i:
            lo = i
        else:
            break  # a[j + 1:i] all equal the pivot
    return a[t]


@njit(**JIT_INNER)
def _kth_floor(gm, k, like):  # type: ignore[no-untyped-def]
    """(key, value) of a floor of the row's k-th largest value, from ``gm``: the largest key of each of
    its column groups (column ``j`` of every span). ``gm`` folded further to ``S`` super-groups (``S``
    halved while it is at least ``8 k``), the k-th largest of their maxima: k distinct columns reach it,
    so the row's k-th largest does. (The fold keeps the floor close: at 1024 x 128256, k = 64, 66 to 80
    columns a row reach it (73 on average), against 64.) Needs at least ``k`` groups."""
    g = gm.shape[0]
    sg = g
    while sg >= 8 * k and sg % 2 == 0:
        sg //= 2
    sup = gm[:sg].copy()
    for q in range(1, g // sg):
        _fold_into(sup, gm[q * sg:(q + 1) * sg])
    fk = _kth_largest(sup, k)
    f = np.float64(from_okey(fk, like))
    if f == 0.0:
        fk = okey(as_type_of(like, -0.0))  # -0.0 and 0.0 tie as values (the lower id first) but not as keys
    return fk, f


@njit(parallel=True, **JIT)
def top_k_kernel(x, k, invt, out_idx, out_val, top_p=2.0, min_k=1):  # type: ignore[no-untyped-def]
    """Per row of ``x`` ``(rows, n)``: the ids of the ``k`` largest logits (decreasing; ties: lower id
    first) into ``out_idx`` int64, their ``log_softmax(x * invt)`` into ``out_val`` float64. With
    ``top_p`` at most 1, only the shortest prefix whose probability reaches ``top_p`` is kept (at least
    ``min_k`` entries, :func:`_nucleus_cut`); the other slots get id ``-1`` and value ``-inf``.

    One streaming pass of ``SPAN``-column spans, the loss's (:func:`_row_statistics`), that also keeps
    the running maximum of column ``j`` of every span (integer keys: vectorized).
    From those maxima a floor of the k-th largest value (:func:`_kth_floor`); then only the columns of
    the groups whose maximum reaches it are visited, in column order, from cache, and inserted into the
    sorted top ``k`` when they belong. (Before: each span was searched for values above the running
    k-th, in vectorized counts of ever smaller blocks; nearly every span of a long row holds one, and
    the selection cost twice the rest.) NaN is a candidate as any value (the row's results are NaN)."""
    rows, n = x.shape
    g = min(n, SPAN)
    for r in prange(rows):
        ri = np.int64(r)
        xr = borrowed(x, ri, 0, n)
        ct = arithmetic_zero(xr)
        gm = np.full(g, okey(as_type_of(ct, -np.inf)))
        ms, nan, z, _, _ = _row_statistics(xr, invt, CE_NONE, 0, _is_float64(xr), False, gm)
        groups = np.empty(g, np.int64)
        ng = 0
        fk = gm[0]
        f = np.nan  # (k above the groups' count: every column a candidate)
        if k <= g:
            fk, f = _kth_floor(gm, k, ct)
        for j in range(g):
            if k > g or gm[j] >= fk:
                groups[ng] = j
                ng += 1
        bv = np.empty(k, np.float64)
        bi = np.empty(k, np.int64)
        m = 0
        for c0 in range(0, n, g):
            for t in range(ng):
                col = c0 + groups[t]
                if col < n:
                    v = np.float64(as_type_of(ct, xr[col]))
                    if not v < f:  # (NaN included, as NaN floors)
                        if m < k:
                            _insert(bv, bi, m, v, col)
                            m += 1
                        elif v > bv[k - 1]:  # (a tie loses: its id is the larger)
                            _insert(bv, bi, k - 1, v, col)
        lse = ms * invt + math.log(z)
        if nan:
            lse = np.nan
        for b in range(k):
            out_idx[r, b] = bi[b]
            out_val[r, b] = bv[b] * invt - lse
        if top_p <= 1.0:
            _nucleus_cut(out_idx[r], out_val[r], top_p, min_k)


@njit(**JIT_INNER)
def _nucleus_cut(ids, lps, top_p, min_k):  # type: ignore[no-untyped-def]
    """Keep the shortest prefix of the sorted top-k (log-probabilities ``lps``) whose probability
    reaches ``top_p``, at least ``min_k`` entries: a prefix scan; the slots after it get id ``-1`` and
    value ``-inf`` (a NaN row never reaches it: all k kept)."""
    k = ids.shape[0]
    keep = k
    cum = 0.0
    for b in range(k):
        cum += math.exp(lps[b])
        if b + 1 >= min_k and cum >= top_p:
            keep = b + 1
            break
    for b in range(keep, k):
        ids[b] = -1
        lps[b] = -np.inf

"""CUDA kernels: the fused response loss with its gradient, vocabulary shards, row-wise softmax, labels
and reduction (sparse teachers and top-k: ``_sparse``).

Private module, imported only once :func:`fastdistill.cuda.status` found a usable device (or the CUDA
simulator was explicitly allowed). Every kernel works on *row groups*: ``G`` consecutive threads of a
block share one row (``G`` = 32, a warp, for short rows; ``G`` = the block for long rows) and the blocks
walk over the rows grid-stride. All loop counters and offsets are int64. Per row:

1. one streaming pass with an *online* softmax: each thread keeps running maxima of ``t`` and ``s`` and
   rescales its sums when a maximum grows, so the maxima, the exponential sums, the KL cross terms, the
   cross-entropy normaliser, the label-smoothing sum and the MSE/cosine dot products all come from one
   read; the group then merges maxima, rescales and sums;
2. (two-pass divergences only: mixtures, TVD) the terms that need the normalised probabilities
   (``fastdistill._formulas``' bins, float64 math);
3. (gradient only) one fused write of the gradient, read-before-write per element, so the gradient may
   be the student array itself;

and, in the fused variants for small batches, the labels are counted in every block and the block that
finishes last reduces the row losses, so such a call is one launch (large batches: a one-block label
kernel before, a one-block sum kernel after).

Logits may be stored as float32, float64, float16 or bfloat16 (the last as its bits, int16 arrays: neither
the simulator nor NumPy has the type); :func:`load` converts an element to float32 (float64 for float64
storage) in registers, :func:`stored` rounds a result once, to nearest even, into the array's format.
Elementwise exponentials run in float32 for float32 and 16-bit logits (float64 for float64 logits and
the float64-math variants); every accumulator and every reduction is float64,
and reductions combine values in a fixed order (the only atomic adds 1.0 to a block counter, which is
exact), so results are deterministic run to run.
The semantics are those of the CPU kernels (``fastdistill.cpu._kernels``).

On a real GPU, group reductions use warp shuffles (plus one shared-memory step across the warps of a
block). The CUDA simulator has no shuffles: when it is active (``SIM``, decided once at import) the
reductions go through shared memory instead; nothing else differs.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64, int16, int32, int64, uint16
try:
    from numba.cuda.core import config as _config
except ImportError:  # older numba-cuda
    from numba.core import config as _config

from .. import _cache
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
    P_COS_W,
    P_CP,
    P_CQ,
    P_DIV_W,
    P_HARD_W,
    P_LAM,
    P_MSE_W,
    P_SMOOTH,
    P_TAU,
    SHARD_LABEL_IGNORED,
)

SIM = bool(_config.ENABLE_CUDASIM)


WARP = 32
FULL_MASK = 0xFFFFFFFF
NK = 10  # values reduced at once
# shared-memory columns of the group reduction: one per warp on a GPU (<= 1024 threads), one per thread
# in the simulator (whose blocks are kept small)
SH = 64 if SIM else 32
MAX_BLOCK = SH if SIM else 1024
RED_BLOCK = 8 if SIM else 256  # threads of the single-block label kernel

NEG_INF = -np.inf
POS_INF = np.inf

_cache.install()  # numba-cuda's disk cache keyed on the kernel sources too
_JIT = {} if SIM else {"cache": True}
# register caps of the response kernel: single-pass float32 variants at 80 (three 256-thread blocks per SM, for
# more loads in flight; the common variants need 78-91 unconstrained), float64 variants at 128 (blocks
# of up to 512 threads stay launchable)
_JIT_RESPONSE32 = {} if SIM else {"cache": True, "max_registers": 80}
_JIT_RESPONSE64 = {} if SIM else {"cache": True, "max_registers": 128}


def response_options(div: int, f32: bool) -> dict:
    """The ``cuda.jit`` options of one response kernel variant (its register cap; ``f32``: float32
    arithmetic)."""
    two_pass = bool(IS_TWO_PASS[div])
    return _JIT_RESPONSE32 if f32 and not two_pass else _JIT_RESPONSE64


# ---------------------------------------------------------------- 16-bit storage


if SIM:  # the simulator runs the kernels as Python, on NumPy scalars
    def load(x):  # type: ignore[no-untyped-def]
        """An element as a float: bfloat16 bits (int16) decoded, float16 widened (exact)."""
        if isinstance(x, np.int16):
            return (np.array([x]).astype(np.int16).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)[0]
        if isinstance(x, np.float16):
            return np.float32(x)
        return x

    def stored(a, v):  # type: ignore[no-untyped-def]
        """``v`` as an element of ``a``: bfloat16 bits rounded to nearest even (NaN quiet), else a cast."""
        if a.dtype == np.int16:
            b = int(np.array([v], np.float32).view(np.uint32)[0])
            if v != v:
                return np.array([((b >> 16) | 0x40) & 0xFFFF], np.uint16).view(np.int16)[0]
            r = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFFFFFF
            return np.array([r >> 16], np.uint16).view(np.int16)[0]
        return a.dtype.type(v)
else:
    from numba.cuda import types as _T
    from numba.cuda.extending import overload as _overload

    def load(x):  # type: ignore[no-untyped-def]  # pragma: no cover - device code only
        """An element as a float: bfloat16 bits (int16) decoded, float16 widened (exact)."""

    def stored(a, v):  # type: ignore[no-untyped-def]  # pragma: no cover - device code only
        """``v`` as an element of ``a``: bfloat16 bits rounded to nearest even (NaN quiet), else a cast."""

    @_overload(load, target="cuda")
    def _load_impl(x):  # type: ignore[no-untyped-def]
        if x == _T.int16:
            return lambda x: cuda.libdevice.int_as_float(int32(uint16(x)) << 16)
        if x == _T.float16:
            return lambda x: float32(x)
        return lambda x: x

    @_overload(stored, target="cuda")
    def _stored_impl(a, v):  # type: ignore[no-untyped-def]
        if a.dtype == _T.int16:
            def bf16(a, v):  # type: ignore[no-untyped-def]
                b = cuda.libdevice.float_as_int(float32(v))
                if v != v:
                    return int16((b >> 16) | 0x40)
                return int16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)
            return bf16
        if a.dtype == _T.float16:
            return lambda a, v: float32(v)  # (the store converts, rounding to nearest even)
        return lambda a, v: v


# ---------------------------------------------------------------- group reductions


@cuda.jit(device=True, inline=True)
def _op(a, b, is_max):  # type: ignore[no-untyped-def]
    if is_max:
        return a if a > b else b
    return a + b


@cuda.jit(device=True)
def _group_reduce(v, nk, is_max, sh, G):  # type: ignore[no-untyped-def]
    """Reduce ``v[0:nk]`` over the ``G`` threads of each row group; every thread gets the results.

    Must be reached by every thread of the block (it synchronises the block when ``G`` spans several
    warps, and always in the simulator). Fixed combination order: deterministic.
    """
    tid = cuda.threadIdx.x
    if SIM:
        base = (tid // G) * G
        cuda.syncthreads()
        for k in range(nk):
            sh[k, tid] = v[k]
        cuda.syncthreads()
        for k in range(nk):
            acc = sh[k, base]
            for i in range(1, G):
                acc = _op(acc, sh[k, base + i], is_max)
            v[k] = acc
        cuda.syncthreads()
    else:
        width = G if G < WARP else WARP
        for k in range(nk):
            x = v[k]
            off = width // 2
            while off > 0:
                x = _op(x, cuda.shfl_xor_sync(FULL_MASK, x, off), is_max)
                off //= 2
            v[k] = x
        if G > WARP:  # G is the whole block here
            nw = G // WARP
            w = tid // WARP
            cuda.syncthreads()
            if tid % WARP == 0:
                for k in range(nk):
                    sh[k, w] = v[k]
            cuda.syncthreads()
            for k in range(nk):
                acc = sh[k, 0]
                for i in range(1, nw):
                    acc = _op(acc, sh[k, i], is_max)
                v[k] = acc


@cuda.jit(device=True, inline=True)
def _rescale(m_own, m_all, invt):  # type: ignore[no-untyped-def]
    """Factor taking a sum of exp((x - m_own) * invt) to the reference m_all (1 when equal, incl. +-inf)."""
    if m_own == m_all:
        return 1.0
    return math.exp((m_own - m_all) * invt)


@cuda.jit(device=True, inline=True)
def _rescale_cross(x, c):  # type: ignore[no-untyped-def]
    """A KL cross term ``x`` moved to a larger maximum by the factor ``c`` (:func:`_rescale`), the factor
    kept above 0: a term ``w * inf`` (a ``-inf`` logit against the other side's probability ``w``) stays
    ``+inf`` where ``c`` underflows (its probability is positive: the exact value), rather than
    ``0 * inf = NaN``. A finite sum whose factor underflows keeps ``1e-300`` of itself instead of 0, below
    the digits of any other term. (A floor: a test of ``x`` cost ptxas 16 more bytes of spills in the
    forward KL + CE float32 kernel.)"""
    return x * max(c, 1e-300)


# each divergence's bins and row constants (fastdistill._formulas), compiled as device functions
_BIN = _compiled_formulas(cuda.jit(device=True, inline=True), "bin")
_CONSTANTS = _compiled_formulas(cuda.jit(device=True, inline=True), "constants")
# the one-pass divergences' row values (their per-element sums are this module's)
_FORWARD_ROW = cuda.jit(device=True, inline=True)(FORMULAS[DIV_FORWARD_KL].row_value)
_REVERSE_ROW = cuda.jit(device=True, inline=True)(FORMULAS[DIV_REVERSE_KL].row_value)


@cuda.jit(device=True, inline=True)
def _no_constants(lam, cp, cq):  # type: ignore[no-untyped-def]
    """The constants of a variant without a two-pass divergence (none read)."""
    return 0.0, 0.0, 0.0, 0.0


@cuda.jit(device=True, inline=True)
def _non_negative(d):  # type: ignore[no-untyped-def]
    """A divergence rounded below 0 is 0 (NaN stays NaN)."""
    return 0.0 if d < 0.0 else d


@cuda.jit(device=True, inline=True)
def _scale(counted, red_mean, n_items):  # type: ignore[no-untyped-def]
    """The reduction factor of the loss and its gradient (0 when no row is counted under 'mean')."""
    if not red_mean:
        return 1.0
    d = n_items
    if d <= 0.0:
        d = counted
    return 1.0 / d if d > 0.0 else 0.0


@cuda.jit(device=True, inline=True)
def _scale_info(has_labels, info, rows, red_mean, n_items):  # type: ignore[no-untyped-def]
    """:func:`_scale` with the counted rows read from ``info[0]`` (written by :func:`label_kernel`) only
    when they are needed."""
    if not red_mean:
        return 1.0
    d = n_items
    if d <= 0.0:
        d = info[0] if has_labels else float64(rows)
    return 1.0 / d if d > 0.0 else 0.0


@cuda.jit(device=True, inline=True)
def _count_labels(labels, n, ignore_index, start, stride):  # type: ignore[no-untyped-def]
    """This thread's share of (rows whose label is not ``ignore_index``, such labels outside [0, n))."""
    cnt = 0.0
    bad = 0.0
    for i in range(start, int64(labels.shape[0]), stride):
        lab = int64(labels[i])
        if lab != ignore_index:
            cnt += 1.0
            if lab < 0 or lab >= n:
                bad += 1.0
    return cnt, bad


# ---------------------------------------------------------------- response kernel


_RESPONSE: dict = {}


def response_kernel(div: int, ce: int, lin: bool, f32: bool, fused: bool = False):  # type: ignore[no-untyped-def]
    """The kernel for one (divergence, cross-entropy mode, linear term, float32 arithmetic, fused) variant.

    ``kernel[grid, block, stream](s, t, labels, has_labels, ignore_index, P, info, red_mean, n_items,
    want_grad, out_loss, grad, G, fuse_sum)``: ``s``, ``t`` 2-D ``(rows, n)`` (float32 or float64 storage;
    the arithmetic is float32 when ``f32``, else float64); ``labels`` 1-D int64; ``P`` the packed float64
    parameters; ``info`` float64 ``[counted rows, bad labels, loss, blocks done]``; ``n_items`` <= 0
    means none; ``out_loss`` float64, receives the unscaled row losses (0 for ignored rows); ``grad`` the
    gradient of the reduced loss when ``want_grad``; ``G`` threads per row (a power of two dividing the
    block; > 32 only when equal to the block).

    Unfused kernels (large batches): :func:`label_kernel` wrote ``info[0:2]`` before them and
    :func:`sum_kernel` reduces the row losses after them. Fused kernels (``fused``; small batches, where
    each launch costs more than the work) count the labels in every block (block 0 stores ``info[0:2]``)
    and, with ``fuse_sum``, reduce the row losses themselves: ``info[3]`` must start at 0, each block adds
    1 to it once its rows are written (an exact float64 atomic, so the count is deterministic) and the
    block that finishes last sums the row losses in a fixed order into ``info[2]``, times the reduction
    factor. The two are separate compilations so that the large-batch kernels carry none of this code (it
    costs registers in the main loops).
    """
    key = (div, ce, lin, f32, fused)
    k = _RESPONSE.get(key)
    if k is None:
        k = _RESPONSE[key] = _make_response(div, ce, lin, f32, fused)
    return k


def _make_element_terms(DIV, CE, ft):  # type: ignore[no-untyped-def]
    """``terms(tj, sj, mt, ms, invt)``: one element's contributions to the row sums of pass 1, relative
    to the running maxima: (teacher weight, student weight, KL cross term, CE weight, NaN flag)."""
    HAS_DIV = DIV != DIV_NONE

    @cuda.jit(device=True, inline=True)
    def terms(tj, sj, mt, ms, invt):  # type: ignore[no-untyped-def]
        zero = ft(0.0)
        wa = zero
        wb = zero
        x = zero
        w1 = zero
        if HAS_DIV:
            wa = zero if tj == NEG_INF else math.exp((tj - mt) * invt)
        if HAS_DIV:
            wb = zero if sj == NEG_INF else math.exp((sj - ms) * invt)
        if DIV == DIV_FORWARD_KL:
            x = wa * (tj - sj) if wa > zero else zero
        elif DIV == DIV_REVERSE_KL:
            x = wb * (sj - tj) if wb > zero else zero
        if CE == CE_OWN:
            w1 = zero if sj == NEG_INF else math.exp(sj - ms)
        bad = zero if (tj == tj and sj == sj) else ft(1.0)
        return wa, wb, x, w1, bad

    return terms


def _make_step_loads(ft):  # type: ignore[no-untyped-def]
    """``loads(s, t, r, j, G, n)``: the elements ``j, j + G, j + 2G, j + 3G`` of row ``r`` of ``s`` and
    ``t`` in the arithmetic precision, all loads issued before any use, and how many are in the row: 4,
    or 1 in the row's tail (then the other three repeat the first)."""

    @cuda.jit(device=True, inline=True)
    def loads(s, t, r, j, G, n):  # type: ignore[no-untyped-def]
        j3 = j + 3 * G
        t0 = ft(load(t[r, j]))
        s0 = ft(load(s[r, j]))
        if j3 < n:
            return s0, ft(load(s[r, j + G])), ft(load(s[r, j + 2 * G])), ft(load(s[r, j3])), t0, \
                ft(load(t[r, j + G])), ft(load(t[r, j + 2 * G])), ft(load(t[r, j3])), 4
        return s0, s0, s0, s0, t0, t0, t0, t0, 1

    return loads


def _make_row_sums(DIV, CE, LIN, ft):  # type: ignore[no-untyped-def]
    """``sums(s, t, r, n, lane, G, invt, invt64)``: pass 1 of this thread's share of row ``r`` (columns
    ``lane, lane + G, ...``), one streaming read with an *online* softmax: running maxima of ``t`` and
    ``s``, the sums rescaled when a maximum grows. Four elements per step (loads first), their terms
    summed pairwise in the arithmetic precision, then added in float64. Returns the thread's
    ``(mt, ms, sa, sb, sx, s1, ssum, d2, dst, dss, dtt, nan)``."""
    HAS_DIV = DIV != DIV_NONE
    NEED_MS = HAS_DIV or CE != CE_NONE
    terms = _make_element_terms(DIV, CE, ft)
    loads = _make_step_loads(ft)

    @cuda.jit(device=True, inline=True)
    def sums(s, t, r, n, lane, G, invt, invt64):  # type: ignore[no-untyped-def]
        zero = ft(0.0)
        mt = ft(NEG_INF)
        ms = ft(NEG_INF)
        sa = 0.0
        sb = 0.0
        sx = 0.0
        s1 = 0.0
        ssum = 0.0
        d2 = 0.0
        dst = 0.0
        dss = 0.0
        dtt = 0.0
        nan = 0.0
        j = lane
        # the step's loads written out, not through _make_step_loads: with the shared helper here, ptxas
        # spilled 76 bytes per thread of the benchmarked variant (forward KL + CE, float32) instead of 52
        while j < n:
            j1 = j + G
            j2 = j1 + G
            j3 = j2 + G
            t0 = ft(load(t[r, j]))
            s0 = ft(load(s[r, j]))
            if j3 < n:
                t1 = ft(load(t[r, j1]))
                s1_ = ft(load(s[r, j1]))
                t2 = ft(load(t[r, j2]))
                s2 = ft(load(s[r, j2]))
                t3 = ft(load(t[r, j3]))
                s3 = ft(load(s[r, j3]))
                k = 4
            else:  # the tail: one element
                t1 = t0
                s1_ = s0
                t2 = t0
                s2 = s0
                t3 = t0
                s3 = s0
                k = 1
            # new maxima of the step (rare rescale of the float64 sums)
            if HAS_DIV:
                cm = max(max(t0, t1), max(t2, t3))
                if cm > mt:
                    c = math.exp((float64(mt) - float64(cm)) * invt64)
                    sa *= c
                    if DIV == DIV_FORWARD_KL:
                        sx = _rescale_cross(sx, c)
                    mt = cm
            if NEED_MS:
                cm = max(max(s0, s1_), max(s2, s3))
                if cm > ms:
                    if HAS_DIV:
                        c = math.exp((float64(ms) - float64(cm)) * invt64)
                        sb *= c
                        if DIV == DIV_REVERSE_KL:
                            sx = _rescale_cross(sx, c)
                    if CE == CE_OWN:
                        s1 *= math.exp(float64(ms) - float64(cm))
                    ms = cm
            e0 = terms(t0, s0, mt, ms, invt)
            if k == 4:
                e1 = terms(t1, s1_, mt, ms, invt)
                e2 = terms(t2, s2, mt, ms, invt)
                e3 = terms(t3, s3, mt, ms, invt)
                # pairwise within the step
                ca = (e0[0] + e1[0]) + (e2[0] + e3[0])
                cb = (e0[1] + e1[1]) + (e2[1] + e3[1])
                cx = (e0[2] + e1[2]) + (e2[2] + e3[2])
                c1 = (e0[3] + e1[3]) + (e2[3] + e3[3])
                cn = (e0[4] + e1[4]) + (e2[4] + e3[4])
                j = j3 + G
            else:
                ca = e0[0]
                cb = e0[1]
                cx = e0[2]
                c1 = e0[3]
                cn = e0[4]
                j = j1
            if HAS_DIV:
                sa += float64(ca)
                sb += float64(cb)
                if DIV == DIV_FORWARD_KL or DIV == DIV_REVERSE_KL:
                    sx += float64(cx)
            if CE == CE_OWN:
                s1 += float64(c1)
            if cn != zero:
                nan += 1.0
            if CE != CE_NONE:
                ssum += float64((s0 + s1_) + (s2 + s3)) if k == 4 else float64(s0)
            if LIN:
                # products in float64, as on the CPU: a float32 product of logits beyond 1.8e19 overflows
                # to inf (and the row to NaN), where the float64 sums hold the value
                a0, a1, a2, a3 = float64(s0), float64(s1_), float64(s2), float64(s3)
                b0, b1, b2, b3 = float64(t0), float64(t1), float64(t2), float64(t3)
                if k == 4:
                    d2 += ((b0 - a0) * (b0 - a0) + (b1 - a1) * (b1 - a1)) + ((b2 - a2) * (b2 - a2)
                                                                              + (b3 - a3) * (b3 - a3))
                    dst += (a0 * b0 + a1 * b1) + (a2 * b2 + a3 * b3)
                    dss += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)
                    dtt += (b0 * b0 + b1 * b1) + (b2 * b2 + b3 * b3)
                else:
                    d2 += (b0 - a0) * (b0 - a0)
                    dst += a0 * b0
                    dss += a0 * a0
                    dtt += b0 * b0
        return mt, ms, sa, sb, sx, s1, ssum, d2, dst, dss, dtt, nan

    return sums


def _make_div2_terms(DIV):  # type: ignore[no-untyped-def]
    """``div2(s, t, r, n, lane, G, MT, MS, invt64, lsa, lsb, kd)``: pass 2 of this thread's share of a row,
    for the two-pass divergences (float64): the sums of the terms and of ``h`` of their bins
    (:mod:`fastdistill._formulas`; ``kd`` the divergence's constants)."""
    bin_ = _BIN[DIV]

    @cuda.jit(device=True, inline=True)
    def div2(s, t, r, n, lane, G, MT, MS, invt64, lsa, lsb, kd):  # type: ignore[no-untyped-def]
        dsum = 0.0
        hsum = 0.0
        for j in range(lane, n, G):
            lp = (float64(load(t[r, j])) - MT) * invt64 - lsa
            lq = (float64(load(s[r, j])) - MS) * invt64 - lsb
            d, h = bin_(lp, lq, math.exp(lp), math.exp(lq), kd)
            dsum += d
            hsum += h
        return dsum, hsum

    return div2


def _make_grad_element(DIV, CE, LIN, ft):  # type: ignore[no-untyped-def]
    """``grad(sj, tj, j, lab, k, k64)``: one element of the gradient of the reduced loss, from the row's
    constants (built by :func:`_grad_constants`): ``k`` in the arithmetic precision, ``k64`` float64."""
    HAS_DIV = DIV != DIV_NONE
    TWO_PASS = bool(IS_TWO_PASS[DIV])
    bin_ = _BIN[DIV] if TWO_PASS else None

    @cuda.jit(device=True, inline=True)
    def grad(sj, tj, j, lab, k, k64):  # type: ignore[no-untyped-def]
        cd, mtf, msf, isa, isb, roff, ch, ceps, c_lab, is1, a_s, b_t, invt = k
        MT, MS, lsa, lsb, k0, k1, k2, k3, big_h, cd64, invt64 = k64
        zero = ft(0.0)
        acc = zero
        q = zero
        if HAS_DIV:
            q = math.exp((sj - msf) * invt) * isb
        if DIV == DIV_FORWARD_KL:
            acc += cd * (q - math.exp((tj - mtf) * invt) * isa)
        elif DIV == DIV_REVERSE_KL:
            if q > zero:
                acc += cd * (q * ((sj - msf) * invt - (tj - mtf) * invt + roff))
            else:
                acc += cd * (q * zero)
        elif TWO_PASS:
            # d D / d s_j = (h_j - q_j sum h) / tau (fastdistill._formulas); 0 where q_j is, NaN where q_j is
            # (an undefined row: a NaN normaliser)
            lp = (float64(tj) - MT) * invt64 - lsa
            lq = (float64(sj) - MS) * invt64 - lsb
            q64 = math.exp(lq)
            _, h = bin_(lp, lq, math.exp(lp), q64, (k0, k1, k2, k3))
            acc += ft(cd64 * (h - q64 * big_h) if q64 > 0.0 else cd64 * (q64 * 0.0))
        if CE == CE_SHARED:
            acc += ch * q - ceps
        elif CE == CE_OWN:
            acc += ch * math.exp(sj - msf) * is1 - ceps
        if CE != CE_NONE and j == lab:
            acc -= c_lab
        if LIN:
            acc += a_s * sj + b_t * tj
        return acc

    return grad


def _make_grad_constants(DIV, CE, LIN, ft):  # type: ignore[no-untyped-def]
    """``constants(P, scale, hard, nf, invt, invt64, eps, kd, MT, MS, SA, SB, SX, S1, HSUM, DSS, cos, den, lsa,
    lsb)``: the row constants of the gradient, as the two tuples
    :func:`_make_grad_element` takes. (The kernel's own values come in rather than being read from
    ``P`` again: ptxas then allocates registers as for the code written in one piece, which spilled
    less.)"""
    HAS_DIV = DIV != DIV_NONE

    @cuda.jit(device=True, inline=True)
    def constants(P, scale, hard, nf, invt, invt64, eps, kd, MT, MS, SA, SB, SX, S1, HSUM, DSS, cos, den, lsa, lsb):  # type: ignore[no-untyped-def]  # noqa: E501
        zero = ft(0.0)
        cd64 = scale * P[P_DIV_W] * invt64
        isa = ft(1.0 / SA) if HAS_DIV else zero
        isb = ft(1.0 / SB) if HAS_DIV else zero
        roff = zero
        if DIV == DIV_REVERSE_KL:
            dd = invt64 * SX / SB - ((MS - MT) * invt64 + lsb - lsa)
            roff = ft(lsa - lsb - dd)
        ch = ft(scale * P[P_HARD_W]) if hard else zero
        ceps = ft(scale * P[P_HARD_W] * eps / nf) if hard else zero
        c_lab = ft(scale * P[P_HARD_W] * (1.0 - eps)) if hard else zero
        is1 = ft(1.0 / S1) if CE == CE_OWN else zero
        a_s = zero
        b_t = zero
        if LIN:
            a64 = 2.0 * P[P_MSE_W] / nf
            b64 = -a64
            # (a NaN norm: a NaN gradient; den is 0 where the cosine is unweighted, see row_loss)
            if den > 0.0 or den != den:
                a64 += P[P_COS_W] * cos / DSS
                b64 -= P[P_COS_W] / den
            a_s = ft(scale * a64)
            b_t = ft(scale * b64)
        k = (ft(cd64), ft(MT), ft(MS), isa, isb, roff, ch, ceps, c_lab, is1, a_s, b_t, invt)
        k64 = (MT, MS, lsa, lsb, kd[0], kd[1], kd[2], kd[3], HSUM, cd64, invt64)
        return k, k64

    return constants


def _make_pass1(DIV, CE, LIN, ft):  # type: ignore[no-untyped-def]
    """``pass1(s, t, r, n, lane, G, invt, invt64, counted, v, sh)``: pass 1 of row ``r`` by its group
    (every thread of the block reaches the group reductions): this thread's partial statistics
    (:func:`_make_row_sums`; none when not ``counted``), the group's maxima, the sums rescaled to them
    and summed. Returns ``(MT, MS, SA, SB, SX, S1, SSUM, D2, DST, DSS, DTT, NAN)``."""
    HAS_DIV = DIV != DIV_NONE
    row_sums = _make_row_sums(DIV, CE, LIN, ft)

    @cuda.jit(device=True, inline=True)
    def pass1(s, t, r, n, lane, G, invt, invt64, counted, v, sh):  # type: ignore[no-untyped-def]
        if counted:
            mt, ms, sa, sb, sx, s1, ssum, d2, dst, dss, dtt, nan = row_sums(s, t, r, n, lane, G, invt, invt64)
        else:
            mt = ft(NEG_INF)
            ms = ft(NEG_INF)
            sa = sb = sx = s1 = ssum = d2 = dst = dss = dtt = nan = 0.0
        v[0] = mt
        v[1] = ms
        _group_reduce(v, 2, True, sh, G)
        MT = v[0]
        MS = v[1]
        if HAS_DIV:
            fa = _rescale(float64(mt), MT, invt64)
            fb = _rescale(float64(ms), MS, invt64)
            sa *= fa
            sb *= fb
            if DIV == DIV_FORWARD_KL:
                sx = _rescale_cross(sx, fa)
            elif DIV == DIV_REVERSE_KL:
                sx = _rescale_cross(sx, fb)
        if CE == CE_OWN:
            s1 *= _rescale(float64(ms), MS, 1.0)
        v[0] = sa
        v[1] = sb
        v[2] = sx
        v[3] = s1
        v[4] = ssum
        v[5] = d2
        v[6] = dst
        v[7] = dss
        v[8] = dtt
        v[9] = nan
        _group_reduce(v, NK, False, sh, G)
        return MT, MS, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]

    return pass1


def _make_pass2(DIV):  # type: ignore[no-untyped-def]
    """``pass2(s, t, r, n, lane, G, counted, MT, MS, invt64, lsa, lsb, kd, v, sh)``: a two-pass divergence's
    sums over row ``r``, summed over its group (:func:`_make_div2_terms`): ``(DSUM, HSUM)``."""
    div2_terms = _make_div2_terms(DIV)

    @cuda.jit(device=True, inline=True)
    def pass2(s, t, r, n, lane, G, counted, MT, MS, invt64, lsa, lsb, kd, v, sh):  # type: ignore[no-untyped-def]
        dsum = 0.0
        hsum = 0.0
        if counted:
            dsum, hsum = div2_terms(s, t, r, n, lane, G, MT, MS, invt64, lsa, lsb, kd)
        v[0] = dsum
        v[1] = hsum
        _group_reduce(v, 2, False, sh, G)
        return v[0], v[1]

    return pass2


def _make_row_loss(DIV, CE, LIN, LAB_GIVEN):  # type: ignore[no-untyped-def]
    """``row_loss(P, invt64, eps, nf, hard, s, r, lab, lab_logit, MT, MS, SA, SB, SX, S1, SSUM, D2, DST, DSS,
    DTT, NAN, DSUM)``: a counted row's loss (float64) from its totals, and the cosine terms
    ``(cos, den)`` the gradient needs. The student's logit at the label is ``lab_logit`` with
    ``LAB_GIVEN``, else read from ``s[r, lab]``, only when ``hard`` (read late: loading it before the
    divergence costs ptxas 24 more bytes of spills in the forward-KL variants)."""

    TWO_PASS = bool(IS_TWO_PASS[DIV])

    @cuda.jit(device=True, inline=True)
    def row_loss(P, invt64, eps, nf, hard, s, r, lab, lab_logit, MT, MS, SA, SB, SX, S1, SSUM, D2, DST, DSS, DTT, NAN,  # type: ignore[no-untyped-def]  # noqa: E501
                 DSUM):
        loss = 0.0
        dw = P[P_DIV_W]
        # (the cross term of raw differences: shifted by the maxima)
        if DIV == DIV_FORWARD_KL:
            loss += dw * _non_negative(_FORWARD_ROW(invt64, SA, SB, SX, (MT - MS) * invt64))
        elif DIV == DIV_REVERSE_KL:
            loss += dw * _non_negative(_REVERSE_ROW(invt64, SA, SB, SX, (MS - MT) * invt64))
        elif TWO_PASS:
            loss += dw * _non_negative(DSUM)
        if CE != CE_NONE and hard:
            ls1 = math.log(S1)  # (max - s_label) + log sum: the maximum cancels first
            h = (1.0 - eps) * ((MS - (lab_logit if LAB_GIVEN else float64(load(s[r, lab])))) + ls1)
            if eps != 0.0:
                h += eps * ((MS - SSUM / nf) + ls1)
            loss += P[P_HARD_W] * h
        cos = 0.0
        den = 0.0
        if LIN:
            lin = P[P_MSE_W] * D2 / nf
            # the cosine read only where it is weighted (den stays 0: no gradient term either): an infinite
            # logit makes it NaN (inf / inf), where the MSE alone takes the logit at face value (+inf)
            if P[P_COS_W] != 0.0:
                den = math.sqrt(DSS) * math.sqrt(DTT)
                cos = DST / den if den > 0.0 or den != den else 0.0  # (a NaN norm: a NaN similarity)
                lin += P[P_COS_W] * (1.0 - cos)
            loss += lin
        if NAN != 0.0:
            loss = np.nan
        return loss, cos, den

    return row_loss


def _make_grad_pass(DIV, CE, LIN, ft):  # type: ignore[no-untyped-def]
    """``grad_pass(s, t, grad, r, n, lane, G, lab, k, k64)``: pass 3, this thread's elements of row
    ``r``'s gradient, four per step with all loads before the stores (so ``grad`` may be ``s``)."""
    grad_element = _make_grad_element(DIV, CE, LIN, ft)
    loads = _make_step_loads(ft)

    @cuda.jit(device=True, inline=True)
    def grad_pass(s, t, grad, r, n, lane, G, lab, k, k64):  # type: ignore[no-untyped-def]
        j = lane
        while j < n:
            s0, s1_, s2, s3, t0, t1, t2, t3, m = loads(s, t, r, j, G, n)
            grad[r, j] = stored(grad, grad_element(s0, t0, j, lab, k, k64))
            if m == 4:
                grad[r, j + G] = stored(grad, grad_element(s1_, t1, j + G, lab, k, k64))
                grad[r, j + 2 * G] = stored(grad, grad_element(s2, t2, j + 2 * G, lab, k, k64))
                grad[r, j + 3 * G] = stored(grad, grad_element(s3, t3, j + 3 * G, lab, k, k64))
            j += m * G

    return grad_pass


def _make_undefined_rows(DIV, CE):  # type: ignore[no-untyped-def]
    """``undefined_rows(MT, MS, SA, SB, S1, NAN)``: ``(SA, SB, S1, NAN)`` of a row after pass 1, as on the CPU
    (``cpu._kernels._finish_stats``). A row masked entirely (a maximum of -inf) has no distribution, nor
    has a row with a +inf logit (inf - inf in its softmax): their normalisers become NaN (a NaN gradient)
    and, where the row has a softmax term, the NaN count grows, so that its loss is NaN too (pass 2's
    terms skip NaN probabilities: a mixture's would sum to 0)."""
    HAS_DIV = DIV != DIV_NONE
    NEED_MS = HAS_DIV or CE != CE_NONE

    @cuda.jit(device=True, inline=True)
    def undefined_rows(MT, MS, SA, SB, S1, NAN):  # type: ignore[no-untyped-def]
        no_t = MT == NEG_INF or MT == POS_INF
        no_s = MS == NEG_INF or MS == POS_INF
        if no_t:
            SA = np.nan
        if no_s:
            SB = np.nan
            S1 = np.nan
        if (HAS_DIV and no_t) or (NEED_MS and no_s):
            NAN += 1.0
        return SA, SB, S1, NAN

    return undefined_rows


def _make_response(DIV, CE, LIN, F32, FUSED):  # type: ignore[no-untyped-def]
    ft = float32 if F32 else float64
    HAS_DIV = DIV != DIV_NONE
    TWO_PASS = bool(IS_TWO_PASS[DIV])
    constants = _CONSTANTS[DIV] if TWO_PASS else _no_constants
    undefined_rows = _make_undefined_rows(DIV, CE)
    pass1 = _make_pass1(DIV, CE, LIN, ft)
    pass2 = _make_pass2(DIV) if TWO_PASS else None
    row_loss = _make_row_loss(DIV, CE, LIN, False)
    grad_constants = _make_grad_constants(DIV, CE, LIN, ft)
    grad_pass = _make_grad_pass(DIV, CE, LIN, ft)

    @cuda.jit(**response_options(DIV, F32))
    def kernel(s, t, labels, has_labels, ignore_index, P, info, red_mean, n_items, want_grad, out_loss, grad, G,  # type: ignore[no-untyped-def]  # noqa: E501
               fuse_sum):
        rows = int64(s.shape[0])
        n = int64(s.shape[1])
        tid = int64(cuda.threadIdx.x)
        nthr = int64(cuda.blockDim.x)
        gpb = nthr // G
        lane = tid % G
        sh = cuda.shared.array((NK, SH), float64)
        v = cuda.local.array(NK, float64)
        if FUSED:
            counted_rows = float64(rows)
            if has_labels:
                cnt, bad = _count_labels(labels, n, ignore_index, tid, nthr)
                v[0] = cnt
                v[1] = bad
                _group_reduce(v, 2, False, sh, nthr)
                counted_rows = v[0]
                if cuda.blockIdx.x == 0 and tid == 0:
                    info[0] = v[0]
                    info[1] = v[1]
            scale = _scale(counted_rows, red_mean, n_items)
        else:
            scale = _scale_info(has_labels, info, rows, red_mean, n_items)
        invt64 = 1.0 / P[P_TAU]
        invt = ft(invt64)
        eps = P[P_SMOOTH]
        nf = float64(n)
        step = int64(cuda.gridDim.x) * gpb
        for base in range(int64(cuda.blockIdx.x) * gpb, rows, step):  # uniform across the block
            r = base + tid // G
            counted = r < rows
            lab = int64(-1)
            if counted and has_labels:
                lab = int64(labels[r])
                counted = lab != ignore_index
            hard = counted and lab >= 0 and lab < n and CE != CE_NONE
            # ---- pass 1: the row's statistics (every thread of the block reaches the group reductions)
            MT, MS, SA, SB, SX, S1, SSUM, D2, DST, DSS, DTT, NAN = pass1(s, t, r, n, lane, G, invt, invt64, counted,
                                                                         v, sh)
            SA, SB, S1, NAN = undefined_rows(MT, MS, SA, SB, S1, NAN)
            if CE == CE_SHARED:
                S1 = SB
            lsa = math.log(SA) if HAS_DIV else 0.0
            lsb = math.log(SB) if HAS_DIV else 0.0
            # ---- pass 2: a two-pass divergence's sums (float64); its constants formed here, after pass 1
            # (live across pass 1 they cost ptxas 24-100 more bytes of spills in the mixtures' kernels)
            kd = constants(P[P_LAM], P[P_CP], P[P_CQ])
            DSUM = 0.0
            HSUM = 0.0
            if TWO_PASS:
                DSUM, HSUM = pass2(s, t, r, n, lane, G, counted, MT, MS, invt64, lsa, lsb, kd, v, sh)
            # ---- row loss (float64)
            if counted:
                loss, cos, den = row_loss(P, invt64, eps, nf, hard, s, r, lab, 0.0, MT, MS, SA, SB, SX, S1, SSUM, D2,
                                          DST, DSS, DTT, NAN, DSUM)
                if lane == 0:
                    out_loss[r] = loss
                # ---- pass 3: gradient, U elements per thread and step: all loads before the stores
                if want_grad:
                    k, k64 = grad_constants(P, scale, hard, nf, invt, invt64, eps, kd, MT, MS, SA, SB, SX, S1, HSUM,
                                            DSS, cos, den, lsa, lsb)
                    grad_pass(s, t, grad, r, n, lane, G, lab, k, k64)
            elif r < rows:
                if lane == 0:
                    out_loss[r] = 0.0
                if want_grad:
                    for j in range(lane, n, G):
                        grad[r, j] = stored(grad, ft(0.0))
        # ---- the reduced loss: the last block to finish sums every row loss (fixed order)
        if FUSED and fuse_sum:
            _sum_in_last_block(out_loss, rows, info, scale, v, sh, tid, nthr)

    return kernel


# ---------------------------------------------------------------- vocabulary shards
#
# A row whose classes are split across processes (``fastdistill.sharded``): one launch per step of a
# shard, the caller combining the shards' numbers between the steps. SHARD_STATS: pass 1 over the
# shard's columns, its maxima into ``xmax`` and its sums relative to them into ``xsum``; the caller
# takes the maxima's max, :func:`shard_rescale_kernel` moves the sums to the combined maxima, the caller
# sums them; SHARD_DIV2 (two-pass divergences): pass 2's sums into ``xmix``, summed by the caller;
# SHARD_FINISH: the row losses (the same on every shard) and this shard's gradient.

SHARD_STATS = 0
SHARD_DIV2 = 1
SHARD_FINISH = 2
N_SHARD_MAX = 2  # MT, MS: combined with max
N_SHARD_SUM = 11  # SA, SB, SX, S1, SSUM, D2, DST, DSS, DTT, NAN, the label's logit: summed
N_SHARD_MIX = 2  # DSUM, HSUM: summed

_SHARD: dict = {}


def shard_kernel(div: int, ce: int, lin: bool, f32: bool):  # type: ignore[no-untyped-def]
    """The shard-step kernel of one variant: ``kernel[grid, block, stream](s, t, labels, has_labels, P,
    step, scale, classes, want_grad, xmax, own_max, xsum, xmix, out_loss, grad, G)``; ``labels``: a column of the
    shard, ``_spec.SHARD_LABEL_ELSEWHERE`` or ``SHARD_LABEL_IGNORED``; ``classes`` the whole row's width; ``scale`` the
    reduction's factor; ``xmax``/``xsum``/``xmix`` float64 ``(rows, N_SHARD_*)``, ``own_max`` a copy of
    this shard's maxima for :func:`shard_rescale_kernel`."""
    key = (div, ce, lin, f32)
    k = _SHARD.get(key)
    if k is None:
        k = _SHARD[key] = _make_shard(div, ce, lin, f32)
    return k


def _make_shard(DIV, CE, LIN, F32):  # type: ignore[no-untyped-def]
    ft = float32 if F32 else float64
    HAS_DIV = DIV != DIV_NONE
    TWO_PASS = bool(IS_TWO_PASS[DIV])
    constants = _CONSTANTS[DIV] if TWO_PASS else _no_constants
    undefined_rows = _make_undefined_rows(DIV, CE)
    pass1 = _make_pass1(DIV, CE, LIN, ft)
    pass2 = _make_pass2(DIV) if TWO_PASS else None
    row_loss = _make_row_loss(DIV, CE, LIN, True)
    grad_constants = _make_grad_constants(DIV, CE, LIN, ft)
    grad_pass = _make_grad_pass(DIV, CE, LIN, ft)

    @cuda.jit(device=True, inline=True)
    def totals(xmax, xsum, r):  # type: ignore[no-untyped-def]
        """A row's combined statistics, an undefined row's normalisers and NaN count as in
        :func:`_make_response` (:func:`_make_undefined_rows`)."""
        MT = xmax[r, 0]
        MS = xmax[r, 1]
        SA = xsum[r, 0]
        SB = xsum[r, 1]
        S1 = xsum[r, 3]
        SA, SB, S1, NAN = undefined_rows(MT, MS, SA, SB, S1, xsum[r, 9])
        if CE == CE_SHARED:
            S1 = SB
        lsa = math.log(SA) if HAS_DIV else 0.0
        lsb = math.log(SB) if HAS_DIV else 0.0
        return MT, MS, SA, SB, S1, lsa, lsb, NAN

    @cuda.jit(**response_options(DIV, F32))
    def kernel(s, t, labels, has_labels, P, step, scale, classes, want_grad, xmax, own_max, xsum, xmix, out_loss, grad,  # type: ignore[no-untyped-def]  # noqa: E501
               G):
        rows = int64(s.shape[0])
        n = int64(s.shape[1])
        tid = int64(cuda.threadIdx.x)
        nthr = int64(cuda.blockDim.x)
        gpb = nthr // G
        lane = tid % G
        sh = cuda.shared.array((NK, SH), float64)
        v = cuda.local.array(NK, float64)
        invt64 = 1.0 / P[P_TAU]
        invt = ft(invt64)
        eps = P[P_SMOOTH]
        nf = float64(classes)
        stride = int64(cuda.gridDim.x) * gpb
        for base in range(int64(cuda.blockIdx.x) * gpb, rows, stride):  # uniform across the block
            r = base + tid // G
            counted = r < rows
            lab = int64(-1)
            if counted and has_labels:
                lab = int64(labels[r])
                counted = lab != SHARD_LABEL_IGNORED
            if step == SHARD_STATS:
                MT, MS, SA, SB, SX, S1, SSUM, D2, DST, DSS, DTT, NAN = pass1(s, t, r, n, lane, G, invt, invt64,
                                                                             counted, v, sh)
                if lane == 0 and r < rows:
                    if not counted:  # (finite: combined with the other shards', never read)
                        MT = MS = SA = SB = SX = S1 = SSUM = D2 = DST = DSS = DTT = NAN = 0.0
                    xmax[r, 0] = MT
                    xmax[r, 1] = MS
                    own_max[r, 0] = MT  # (kept: xmax is combined in place)
                    own_max[r, 1] = MS
                    xsum[r, 0] = SA
                    xsum[r, 1] = SB
                    xsum[r, 2] = SX
                    xsum[r, 3] = S1
                    xsum[r, 4] = SSUM
                    xsum[r, 5] = D2
                    xsum[r, 6] = DST
                    xsum[r, 7] = DSS
                    xsum[r, 8] = DTT
                    xsum[r, 9] = NAN
                    xsum[r, 10] = float64(load(s[r, lab])) if (counted and CE != CE_NONE and lab >= 0) else 0.0
            elif step == SHARD_DIV2:
                if TWO_PASS:
                    MT = MS = lsa = lsb = 0.0
                    if counted:
                        MT, MS, SA, SB, S1, lsa, lsb, NAN = totals(xmax, xsum, r)
                    kd = constants(P[P_LAM], P[P_CP], P[P_CQ])
                    DSUM, HSUM = pass2(s, t, r, n, lane, G, counted, MT, MS, invt64, lsa, lsb, kd, v, sh)
                    if lane == 0 and r < rows:
                        xmix[r, 0] = DSUM
                        xmix[r, 1] = HSUM
            elif counted:  # SHARD_FINISH
                MT, MS, SA, SB, S1, lsa, lsb, NAN = totals(xmax, xsum, r)
                DSUM = 0.0
                HSUM = 0.0
                if TWO_PASS:
                    DSUM = xmix[r, 0]
                    HSUM = xmix[r, 1]
                hard = has_labels and CE != CE_NONE
                SX = xsum[r, 2]
                DSS = xsum[r, 7]
                loss, cos, den = row_loss(P, invt64, eps, nf, hard, s, r, lab, xsum[r, 10], MT, MS, SA, SB, SX, S1,
                                          xsum[r, 4], xsum[r, 5], xsum[r, 6], DSS, xsum[r, 8], NAN, DSUM)
                if lane == 0:
                    out_loss[r] = loss
                if want_grad:
                    kd = constants(P[P_LAM], P[P_CP], P[P_CQ])
                    k, k64 = grad_constants(P, scale, hard, nf, invt, invt64, eps, kd, MT, MS, SA, SB, SX, S1, HSUM,
                                            DSS, cos, den, lsa, lsb)
                    grad_pass(s, t, grad, r, n, lane, G, lab, k, k64)
            elif r < rows:
                if lane == 0:
                    out_loss[r] = 0.0
                if want_grad:
                    for j in range(lane, n, G):
                        grad[r, j] = stored(grad, ft(0.0))

    return kernel


@cuda.jit(**_JIT)
def shard_rescale_kernel(own_max, xmax, xsum, div, ce, invt64):  # type: ignore[no-untyped-def]
    """A shard's sums (``xsum``, relative to its own maxima ``own_max``) moved to the combined maxima
    ``xmax``: the exponential sums and the KL cross term by ``exp((own - combined) / T)`` (the
    cross-entropy's at temperature 1); the other sums do not depend on a reference."""
    for r in range(cuda.grid(1), xsum.shape[0], cuda.gridsize(1)):
        fa = _rescale(own_max[r, 0], xmax[r, 0], invt64)
        fb = _rescale(own_max[r, 1], xmax[r, 1], invt64)
        xsum[r, 0] *= fa
        xsum[r, 1] *= fb
        if div == DIV_FORWARD_KL:
            xsum[r, 2] = _rescale_cross(xsum[r, 2], fa)
        elif div == DIV_REVERSE_KL:
            xsum[r, 2] = _rescale_cross(xsum[r, 2], fb)
        if ce == CE_OWN:
            xsum[r, 3] *= _rescale(own_max[r, 1], xmax[r, 1], 1.0)


@cuda.jit(device=True)
def _sum_in_last_block(out_loss, rows, info, scale, v, sh, tid, nthr):  # type: ignore[no-untyped-def]
    """``info[2]`` = ``scale`` times the fixed-order sum of the row losses, by the block that finishes last
    (``info[3]`` counts the finished blocks)."""
    cuda.threadfence()  # this block's row losses are visible device-wide before it is counted
    cuda.syncthreads()
    if tid == 0:
        sh[0, 0] = cuda.atomic.add(info, 3, 1.0)
    cuda.syncthreads()
    last = sh[0, 0] == float64(cuda.gridDim.x - 1)  # uniform across the block
    cuda.syncthreads()
    if last:
        acc = 0.0
        for i in range(tid, rows, nthr):
            acc += out_loss[i]
        v[0] = acc
        _group_reduce(v, 1, False, sh, nthr)
        if tid == 0:
            info[2] = v[0] * scale


# ---------------------------------------------------------------- softmax


_SOFTMAX: dict = {}


def softmax_kernel(log: bool, f32: bool):  # type: ignore[no-untyped-def]
    """``kernel[grid, block, stream](x, invt, out, G)``: row-wise (log-)softmax of ``x * invt``."""
    key = (log, f32)
    k = _SOFTMAX.get(key)
    if k is None:
        k = _SOFTMAX[key] = _make_softmax(log, f32)
    return k


def _make_row_stats(ft):  # type: ignore[no-untyped-def]
    """``row_stats(x, r, n, lane, G, invt, invt64, active, v, sh) -> (max, sum exp((x - max) * invt),
    NaNs)`` of row ``r``, every thread of the group taking every ``G``-th column in one online pass (the
    sum rescaled when the maximum grows), combined over the group (reached by every thread of the
    block: ``active`` says whether this thread's row exists)."""

    @cuda.jit(device=True, inline=True)
    def row_stats(x, r, n, lane, G, invt, invt64, active, v, sh):  # type: ignore[no-untyped-def]
        m = ft(NEG_INF)
        ssum = 0.0
        nan = 0.0
        if active:
            for j in range(lane, n, G):
                xj = ft(load(x[r, j]))
                if xj != xj:
                    nan += 1.0
                if xj > m:
                    ssum *= float64(math.exp((m - xj) * invt))
                    m = xj
                if xj != NEG_INF:
                    ssum += math.exp((xj - m) * invt)
        v[0] = m
        _group_reduce(v, 1, True, sh, G)
        M = v[0]
        v[0] = ssum * _rescale(float64(m), M, invt64)
        v[1] = nan
        _group_reduce(v, 2, False, sh, G)
        return M, v[0], v[1]

    return row_stats


def _make_softmax(LOG, F32):  # type: ignore[no-untyped-def]
    ft = float32 if F32 else float64
    row_stats = _make_row_stats(ft)

    @cuda.jit(**_JIT)
    def kernel(x, invt64, out, G):  # type: ignore[no-untyped-def]
        rows = int64(x.shape[0])
        n = int64(x.shape[1])
        tid = int64(cuda.threadIdx.x)
        gpb = int64(cuda.blockDim.x) // G
        lane = tid % G
        sh = cuda.shared.array((NK, SH), float64)
        v = cuda.local.array(NK, float64)
        invt = ft(invt64)
        step = int64(cuda.gridDim.x) * gpb
        for base in range(int64(cuda.blockIdx.x) * gpb, rows, step):
            r = base + tid // G
            active = r < rows
            M, S, nan = row_stats(x, r, n, lane, G, invt, invt64, active, v, sh)
            if nan != 0.0 or M == NEG_INF:
                S = np.nan
            if active:
                mf = ft(M)
                if LOG:
                    off = ft(math.log(S))
                    for j in range(lane, n, G):
                        out[r, j] = stored(out, (ft(load(x[r, j])) - mf) * invt - off)
                else:
                    inv = ft(1.0 / S)
                    for j in range(lane, n, G):
                        out[r, j] = stored(out, math.exp((ft(load(x[r, j])) - mf) * invt) * inv)

    return kernel


# ---------------------------------------------------------------- labels and the final sum (large batches)


@cuda.jit(device=True)
def _block_sum(x, buf):  # type: ignore[no-untyped-def]
    """Sum of ``x`` over the block (fixed tree order); thread 0 gets the result. Block size: power of 2."""
    tid = cuda.threadIdx.x
    buf[tid] = x
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if tid < half:
            buf[tid] = buf[tid] + buf[tid + half]
        cuda.syncthreads()
        half //= 2
    return buf[0]


@cuda.jit(**_JIT)
def label_kernel(labels, n, ignore_index, info):  # type: ignore[no-untyped-def]
    """One block: ``info[0]`` = rows whose label is not ``ignore_index``, ``info[1]`` = bad labels."""
    buf = cuda.shared.array(RED_BLOCK, float64)
    tid = int64(cuda.threadIdx.x)
    cnt, bad = _count_labels(labels, n, ignore_index, tid, int64(cuda.blockDim.x))
    c = _block_sum(cnt, buf)
    cuda.syncthreads()
    b = _block_sum(bad, buf)
    if tid == 0:
        info[0] = c
        info[1] = b


@cuda.jit(**_JIT)
def sum_kernel(row_loss, has_labels, red_mean, n_items, info):  # type: ignore[no-untyped-def]
    """One block: ``info[2]`` = the reduced loss (fixed-order sum of the row losses, times the factor)."""
    buf = cuda.shared.array(RED_BLOCK, float64)
    tid = int64(cuda.threadIdx.x)
    rows = int64(row_loss.shape[0])
    acc = 0.0
    for i in range(tid, rows, int64(cuda.blockDim.x)):
        acc += row_loss[i]
    total = _block_sum(acc, buf)
    if tid == 0:
        info[2] = total * _scale_info(has_labels, info, rows, red_mean, n_items)


@cuda.jit(**_JIT)
def cast_kernel(src, dst):  # type: ignore[no-untyped-def]
    """``dst[i] = src[i]`` (1-D, converted to ``dst``'s type): device arrays of other dtypes, for
    producers without a conversion of their own (numba device arrays)."""
    for i in range(cuda.grid(1), src.shape[0], cuda.gridsize(1)):
        dst[i] = src[i]

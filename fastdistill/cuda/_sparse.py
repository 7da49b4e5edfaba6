"""CUDA kernels of sparse (top-k) teachers and of the top-k itself: the CUDA side of
``fastdistill.cpu._sparse`` (the same method, the same formulas: ``fastdistill._scalar`` and the
divergences' bins of ``fastdistill._formulas``). Private module, imported with ``_kernels`` (whose
helpers, options and disk cache it shares).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64, int64

from .._formulas import run_time_dispatch
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
)
from ._kernels import (
    _JIT,
    _JIT_RESPONSE64,
    NEG_INF,
    NK,
    SH,
    _group_reduce,
    _make_row_stats,
    _rescale,
    _scale_info,
    load,
    stored,
)


# ---------------------------------------------------------------- sparse (top-k) teachers
#
# The CPU kernels' method (``fastdistill.cpu._sparse``): the student row's maximum and normalisers from
# one online pass by the row's group, the divergence over the k (or k + 1) bins in float64 by the group's
# first thread (k is small), its coefficients handed to the group through shared memory, one dense write
# of the gradient by the group, then the support's columns (and the label's) rewritten by the first
# thread, each from all of its terms, rounded once. Every thread of a block walks the same rows (the
# block synchronises between the steps).

# coefficients per row handed from the first thread to its group: the dense write's a, b, c and its
# reference (the row's maximum, or the outside columns' own), the one-hot weight, the row's loss
NC = 6
# rows per block at most (the coefficients' shared memory: 64 x 6 float64, 3 KB; the launcher widens
# the groups of a wider block, fastdistill.cuda.sparse_response)
MAX_GROUPS = 64


# a divergence's bin and row constants (fastdistill._formulas) by its run-time code: the sparse kernel
# serves every divergence
_sparse_bin = run_time_dispatch(cuda.jit(device=True, inline=True), "bin", 5, (0.0, 0.0))
_sparse_constants = run_time_dispatch(cuda.jit(device=True, inline=True), "constants", 3, (0.0, 0.0, 0.0, 0.0))


_teacher_weights = cuda.jit(device=True, inline=True)(teacher_weights)
_bin_logprob = cuda.jit(device=True, inline=True)(bin_logprob)
_ce_term = cuda.jit(device=True, inline=True)(ce_term)
_sorted_used_ids = cuda.jit(device=True, inline=True)(sorted_used_ids)
_reads_rest_bin = cuda.jit(device=True, inline=True)(reads_rest_bin)


def sparse_kernel(f32: bool):  # type: ignore[no-untyped-def]
    """``kernel[grid, block, stream](s, idx, vals, labels, has_labels, ignore_index, P, div, ce, tail, t_gen,
    info, red_mean, n_items, want_grad, out_loss, grad, sup, srt, G)``: ``idx`` int64 and ``vals`` float64
    ``(rows, k)``, checked, produced at temperature ``t_gen`` (weights ``exp(v * t_gen / tau)``); ``info``
    as for the response kernel (counted rows written by :func:`label_kernel` before); ``out_loss``
    receives the unscaled row losses; ``sup`` float64 ``(rows, k + 1)`` scratch for the support's
    gradient values; ``srt`` int64 ``(rows, k + 1)`` scratch for each row's used ids in increasing order
    and their count (read when the divergence reads the mass outside the support,
    ``_scalar.reads_rest_bin``; else any int64 2-D array)."""
    k = _SPARSE.get(f32)
    if k is None:
        k = _SPARSE[f32] = _make_sparse(f32)
    return k


_SPARSE: dict = {}


@cuda.jit(device=True)
def _support_lse(s, r, ids, M, invt64):  # type: ignore[no-untyped-def]
    """``(ref, log sum_S exp((s_j - ref) / tau))`` over the support's columns of row ``r``, the sum relative
    to their own maximum (``-inf`` when every one of them is ``-inf``); ``ref`` the row's maximum ``M``, or
    the support's own maximum logit where the support lies more than ``SUPPORT_GAP`` temperatures below
    it: ``cpu._sparse._support_lse``."""
    top = NEG_INF
    for b in range(ids.shape[0]):
        if ids[b] >= 0:
            top = max(top, (float64(load(s[r, ids[b]])) - M) * invt64)
    if top == NEG_INF:
        return M, top
    ref = M
    if top < -SUPPORT_GAP:
        ref = NEG_INF
        for b in range(ids.shape[0]):
            if ids[b] >= 0:
                ref = max(ref, float64(load(s[r, ids[b]])))
        top = 0.0
    acc = 0.0
    for b in range(ids.shape[0]):
        if ids[b] >= 0:
            acc += math.exp((float64(load(s[r, ids[b]])) - ref) * invt64 - top)
    return ref, top + math.log(acc)


def _make_sparse(F32):  # type: ignore[no-untyped-def]
    ft = float32 if F32 else float64

    @cuda.jit(device=True, inline=True)
    def outside_exp_sum(s, r, ids, n_ids, lane, n, G, ref, invt):  # type: ignore[no-untyped-def]
        """This thread's share of ``sum exp((s_j - ref) * invt)`` over row ``r``'s columns outside the
        support, skipping the support's columns along its ``n_ids`` sorted ids ``ids``."""
        acc = 0.0
        p = int64(0)
        for j in range(lane, n, G):
            while p < n_ids and ids[p] < j:
                p += 1
            if p == n_ids or ids[p] != j:
                acc += math.exp((ft(load(s[r, j])) - ref) * invt)
        return acc

    @cuda.jit(**_JIT_RESPONSE64)
    def kernel(s, idx, vals, labels, has_labels, ignore_index, P, div, ce, tail, t_gen, info, red_mean, n_items,  # type: ignore[no-untyped-def]  # noqa: E501
               want_grad, out_loss, grad, sup, srt, G):
        rows = int64(s.shape[0])
        n = int64(s.shape[1])
        kk = int64(idx.shape[1])
        tid = int64(cuda.threadIdx.x)
        gpb = int64(cuda.blockDim.x) // G
        lane = tid % G
        slot = tid // G
        sh = cuda.shared.array((NK, SH), float64)
        coef = cuda.shared.array((MAX_GROUPS, NC), float64)
        v = cuda.local.array(NK, float64)
        tau = P[P_TAU]
        invt64 = 1.0 / tau
        invt = ft(invt64)
        # the values' scale T_gen / tau (cpu._sparse.sparse_response's)
        vinvt = invt64 if t_gen == 1.0 else t_gen / tau
        dw = P[P_DIV_W]
        hw = P[P_HARD_W]
        eps = P[P_SMOOTH]
        kd = _sparse_constants(div, P[P_LAM], P[P_CP], P[P_CQ])
        own_ce = ce != CE_NONE and ce != CE_SHARED
        rest = _reads_rest_bin(tail, div)
        scale = _scale_info(has_labels, info, rows, red_mean, n_items)
        zero = ft(0.0)
        step = int64(cuda.gridDim.x) * gpb
        for base in range(int64(cuda.blockIdx.x) * gpb, rows, step):
            r = base + slot
            active = r < rows
            lab = int64(-1)
            counted = active
            if active and has_labels:
                lab = int64(labels[r])
                counted = lab != ignore_index
            # pass 1: online maximum and normalisers of this thread's columns
            m = ft(NEG_INF)
            z = 0.0
            z1 = 0.0
            ssum = 0.0
            nan = 0.0
            if counted:
                for j in range(lane, n, G):
                    x = ft(load(s[r, j]))
                    if x != x:
                        nan += 1.0
                    if x > m:
                        z *= float64(math.exp((m - x) * invt))
                        if own_ce:
                            z1 *= float64(math.exp(m - x))
                        m = x
                    if x != NEG_INF:
                        z += math.exp((x - m) * invt)
                        if own_ce:
                            z1 += math.exp(x - m)
                    ssum += float64(x)
            v[0] = m
            _group_reduce(v, 1, True, sh, G)
            M = v[0]
            v[0] = z * _rescale(float64(m), M, invt64)
            v[1] = z1 * _rescale(float64(m), M, 1.0)
            v[2] = ssum
            v[3] = nan
            _group_reduce(v, 4, False, sh, G)
            Z = v[0]
            Z1 = v[1] if own_ce else v[0]
            SSUM = v[2]
            NAN = v[3]
            # the bin outside the support: R = sum exp((s_j - ref) / tau) over the columns outside,
            # summed directly (1 - sum_S q cancels for a confident student), each thread skipping the
            # support's columns along the row's sorted ids; ref the row's maximum, or where that sum
            # falls below REST_FLOOR the outside columns' own maximum m_rest (cpu._sparse._rest_sums)
            m_rest = NEG_INF
            rest_sum = 0.0
            if rest:
                if lane == 0 and counted:
                    srt[r, kk] = _sorted_used_ids(idx[r], srt[r])
                cuda.syncthreads()
                n_ids = srt[r, kk] if counted else int64(0)
                live = counted and M != NEG_INF and M == M
                v[0] = outside_exp_sum(s, r, srt[r], n_ids, lane, n, G, ft(M), invt) if live else 0.0
                _group_reduce(v, 1, False, sh, G)
                m_rest = M
                rest_sum = v[0] if live else 0.0
                again = live and rest_sum < REST_FLOOR  # (the passes below: every thread reaches their reductions)
                mr = ft(NEG_INF)
                if again:
                    p = int64(0)
                    for j in range(lane, n, G):
                        while p < n_ids and srt[r, p] < j:
                            p += 1
                        if p == n_ids or srt[r, p] != j:
                            x = ft(load(s[r, j]))
                            mr = x if x > mr else mr
                v[0] = mr
                _group_reduce(v, 1, True, sh, G)
                if again:
                    m_rest = v[0]
                again = again and m_rest != NEG_INF
                v[0] = outside_exp_sum(s, r, srt[r], n_ids, lane, n, G, ft(m_rest), invt) if again else 0.0
                _group_reduce(v, 1, False, sh, G)
                if again:
                    rest_sum = v[0]
            # the k bins, by the row's first thread
            if lane == 0 and active:
                if not counted:
                    out_loss[r] = 0.0
                else:
                    lz = math.log(Z)
                    count, vmax, lacc, bad_v = _teacher_weights(idx[r], vals[r], vinvt)
                    ref_n = M
                    lzn = lz
                    if tail == TAIL_SUPPORT:  # (the bins' log-probabilities: (s_j - ref_n) / tau - lzn)
                        ref_n, lzn = _support_lse(s, r, idx[r], M, invt64)
                    # a NaN or +inf value, or no mass on the support: the teacher's distribution is undefined
                    undefined = div != DIV_NONE and (bad_v or (tail != TAIL_BUCKET and vmax == NEG_INF))
                    d = 0.0
                    h_sum = 0.0
                    for b in range(kk if not undefined else 0):
                        if idx[r, b] >= 0:
                            lq = (float64(load(s[r, idx[r, b]])) - ref_n) * invt64 - lzn
                            lp = _bin_logprob(vals[r, b], vinvt, vmax, lacc, tail)
                            db, hb = _sparse_bin(div, lp, lq, math.exp(lp), math.exp(lq), kd)
                            d += db
                            h_sum += hb
                    ref = M
                    h_out = 0.0
                    if rest and NAN == 0.0 and M != NEG_INF and not undefined:
                        lq_out = NEG_INF
                        if rest_sum > 0.0:
                            ref = m_rest
                            lq_out = (m_rest - M) * invt64 + math.log(rest_sum) - lz
                        p_s = 0.0
                        if tail == TAIL_BUCKET:
                            for b in range(kk):
                                if idx[r, b] >= 0:
                                    p_s += math.exp(vals[r, b])
                        p_out = max(0.0, 1.0 - p_s) if tail == TAIL_BUCKET else 0.0
                        lp_out = math.log(p_out) if p_out > 0.0 else NEG_INF
                        d_out, h_out = _sparse_bin(div, lp_out, lq_out, p_out, math.exp(lq_out), kd)
                        d += d_out
                        h_sum += h_out
                    else:
                        rest_sum = 0.0
                    if d < 0.0:  # (a divergence's terms are not negative)
                        d = 0.0
                    if undefined:
                        d = np.nan
                    loss = dw * d
                    counted_ce = ce != CE_NONE and lab >= 0
                    if counted_ce:
                        loss += hw * _ce_term(M, float64(load(s[r, lab])), math.log(Z1), eps, SSUM / n)
                    if NAN != 0.0 or M == NEG_INF:
                        loss = np.nan
                    out_loss[r] = loss
                    # coefficients as cpu._sparse.sparse_response's: the outside columns' divergence part
                    # relative to ref (m_rest where the divergence reads the outside bin)
                    cd = scale * dw * invt64
                    a_ce = 0.0
                    b_ce = 0.0
                    c = 0.0
                    if counted_ce:
                        ch = scale * hw
                        c = -ch * eps / n
                        if own_ce:
                            b_ce = ch / Z1
                        else:
                            a_ce = ch / Z
                    e_ref = math.exp((ref - M) * invt64)
                    a = a_ce * e_ref
                    if tail != TAIL_SUPPORT:
                        a += cd * ((h_out / rest_sum if rest_sum > 0.0 else 0.0) - h_sum * e_ref / Z)
                    b_sh = b_ce * math.exp(ref - M)
                    coef[slot, 0] = a
                    coef[slot, 1] = b_sh
                    coef[slot, 2] = c
                    coef[slot, 3] = ref
                    coef[slot, 4] = scale * hw * (1.0 - eps) if counted_ce else 0.0
                    coef[slot, 5] = loss
                    if want_grad and loss == loss:
                        # the support's columns and the label's, each from all of its terms, read before
                        # the dense write (the gradient may be the student itself), stored after it
                        one_hot = coef[slot, 4]
                        lab_in_support = False
                        sup[r, kk] = np.nan
                        for b in range(kk):
                            j = idx[r, b]
                            if j >= 0:
                                sj = float64(load(s[r, j]))
                                dj = (sj - M) * invt64
                                lq = (sj - ref_n) * invt64 - lzn  # (dj - lzn where ref_n is M)
                                lp = _bin_logprob(vals[r, b], vinvt, vmax, lacc, tail)
                                qb = math.exp(lq)
                                _, hb = _sparse_bin(div, lp, lq, math.exp(lp), qb, kd)
                                val = a_ce * math.exp(dj) + b_ce * math.exp(sj - M) + c + cd * (hb - qb * h_sum)
                                if j == lab:
                                    val -= one_hot
                                    lab_in_support = True
                                sup[r, b] = val
                        if lab >= 0 and one_hot != 0.0 and not lab_in_support:
                            sl = float64(load(s[r, lab]))
                            sup[r, kk] = a * math.exp((sl - ref) * invt64) + b_sh * math.exp(sl - ref) + c - one_hot
            cuda.syncthreads()
            # the dense gradient, by the group
            if want_grad and active:
                if not counted:
                    for j in range(lane, n, G):
                        grad[r, j] = stored(grad, zero)
                elif coef[slot, 5] != coef[slot, 5]:
                    for j in range(lane, n, G):
                        grad[r, j] = stored(grad, ft(np.nan))
                else:
                    a_f = ft(coef[slot, 0])
                    b_f = ft(coef[slot, 1])
                    c_f = ft(coef[slot, 2])
                    mf = ft(coef[slot, 3])
                    for j in range(lane, n, G):
                        # (at most 0: every column outside the support lies at or below the reference; a
                        # support column above it, rewritten below, must not overflow: the simulator raises)
                        dx = min(ft(load(s[r, j])) - mf, zero)
                        val = a_f * math.exp(dx * invt) + c_f
                        if own_ce:
                            val += b_f * math.exp(dx)
                        grad[r, j] = stored(grad, val)
            cuda.syncthreads()
            # the support's columns and the label's (computed above), stored over the dense gradient
            if want_grad and active and counted and lane == 0 and coef[slot, 5] == coef[slot, 5]:
                for b in range(kk):
                    j = idx[r, b]
                    if j >= 0:
                        grad[r, j] = stored(grad, sup[r, b])
                if lab >= 0 and sup[r, kk] == sup[r, kk]:
                    grad[r, lab] = stored(grad, sup[r, kk])
            cuda.syncthreads()

    return kernel


# ---------------------------------------------------------------- top_k


def top_k_kernel(f32: bool):  # type: ignore[no-untyped-def]
    """``kernel[grid, block, stream](x, k, invt, top_p, min_k, out_idx, out_val, G)``: per row of ``x`` the
    ids of the ``k`` largest logits (decreasing; ties: the lower id first) into ``out_idx`` int64
    ``(rows, k)`` and their ``log_softmax(x * invt)`` into ``out_val`` float64; with ``top_p`` at most 1
    only the shortest prefix whose probability reaches it (at least ``min_k``), the other slots ``-1``
    and ``-inf`` (``cpu._sparse._nucleus_cut``). The row's group computes its maximum and
    normaliser (one online pass); its first thread then selects, skipping every column that cannot
    enter the current top k with one comparison (a simple kernel: the selection is serial per row)."""
    k = _TOP_K.get(f32)
    if k is None:
        k = _TOP_K[f32] = _make_top_k(f32)
    return k


_TOP_K: dict = {}


def _make_top_k(F32):  # type: ignore[no-untyped-def]
    ft = float32 if F32 else float64
    row_stats = _make_row_stats(ft)

    @cuda.jit(**_JIT)
    def kernel(x, k, invt64, top_p, min_k, out_idx, out_val, G):  # type: ignore[no-untyped-def]
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
            lse = M * invt64 + math.log(S)
            if nan != 0.0:
                lse = np.nan
            if active and lane == 0:
                cnt = int64(0)
                for j in range(n):
                    val = float64(load(x[r, j]))
                    if cnt == k and not (val > out_val[r, k - 1]):
                        continue  # (ties keep the lower id, already in)
                    pos = cnt if cnt < k else k - 1
                    while pos > 0 and out_val[r, pos - 1] < val:
                        if pos < k:
                            out_val[r, pos] = out_val[r, pos - 1]
                            out_idx[r, pos] = out_idx[r, pos - 1]
                        pos -= 1
                    out_val[r, pos] = val
                    out_idx[r, pos] = j
                    if cnt < k:
                        cnt += 1
                for b in range(k):
                    out_val[r, b] = out_val[r, b] * invt64 - lse
                if top_p <= 1.0:  # the nucleus: a prefix scan of the sorted probabilities
                    keep = k
                    cum = 0.0
                    for b in range(k):
                        cum += math.exp(out_val[r, b])
                        if b + 1 >= min_k and cum >= top_p:
                            keep = b + 1
                            break
                    for b in range(keep, k):
                        out_idx[r, b] = -1
                        out_val[r, b] = NEG_INF
    return kernel

"""Scalar formulas both backends compile: plain Python, jitted by ``fastdistill.cpu._kernels`` with
``numba.njit`` and by ``fastdistill.cuda._kernels`` as CUDA device functions (one source for both)."""
from __future__ import annotations

import math

from ._spec import DIV_FORWARD_KL, DIV_MIXTURE, DIV_NAMES, DIV_NONE, DIV_REVERSE_KL, DIV_TVD, TAIL_BUCKET, TAIL_SUPPORT

NEG_INF = -math.inf


def logaddexp(x, y):  # type: ignore[no-untyped-def]
    """``log(exp(x) + exp(y))`` without overflow; ``-inf`` when both are."""
    m = x if x > y else y
    if m == NEG_INF:
        return m
    return m + math.log(math.exp(x - m) + math.exp(y - m))


def mix_ratio(lp, lq, lm, cp, cq):  # type: ignore[no-untyped-def]
    """``(cp * p + cq * q) / m`` from the logs of ``p``, ``q`` and the mixture ``m``: each ratio with a
    non-zero weight is bounded (``m`` holds that distribution with a positive weight), so nothing
    overflows or underflows, however small ``p`` and ``q`` (the product form overflowed for subnormal
    ones)."""
    r = 0.0
    if cp != 0.0:
        r += cp * math.exp(lp - lm)
    if cq != 0.0:
        r += cq * math.exp(lq - lm)
    return r


def sparse_bin(div, lp, lq, p, q, lm, lam, cp, cq):  # type: ignore[no-untyped-def]
    """One bin of a sparse teacher's divergence: (its term, ``h = q * dD/dq``) for teacher and student
    probabilities ``p``, ``q`` (``lp``, ``lq`` their logarithms, 0 * log 0 = 0; ``lm`` the log of the
    mixture ``lam * p + (1 - lam) * q``, read by ``DIV_MIXTURE`` only)."""
    if div == DIV_NONE:
        return 0.0, 0.0
    if div == DIV_FORWARD_KL:
        return (p * (lp - lq) if p > 0.0 else 0.0), -p
    if div == DIV_REVERSE_KL:
        if q > 0.0:
            return q * (lq - lp), q * (lq - lp + 1.0)
        return 0.0, 0.0
    if div == DIV_MIXTURE:
        # (a term of weight 0 is skipped, not 0 * inf: skew_kl at alpha = 1 mixes m = p, which is 0 off a
        # renormalized support while q is not)
        d = (cp * p * (lp - lm) if cp != 0.0 and p > 0.0 else 0.0) + (cq * q * (lq - lm) if cq != 0.0 and q > 0.0
                                                                       else 0.0)
        h = 0.0
        if q > 0.0:
            # (1 - lam) q / m, finite where lam < 1 (m >= (1 - lam) q); 0 where m does not hold q
            w_ratio = (1.0 - lam) * math.exp(lq - lm) if lam != 1.0 else 0.0
            if cp != 0.0:
                h -= cp * p * w_ratio
            if cq != 0.0:
                h += cq * q * (lq - lm + 1.0 - w_ratio)
        return d, h
    if div == DIV_TVD:
        return 0.5 * abs(p - q), q * (0.5 if q > p else (-0.5 if q < p else 0.0))
    return math.nan, math.nan  # (unreachable: the divergences are checked below, at import)


# sparse_bin has a branch for each of these divergence codes: a new code must add its own (and to this set)
# before the package imports, rather than fall through to another divergence's bin
if set(DIV_NAMES) != {DIV_NONE, DIV_FORWARD_KL, DIV_REVERSE_KL, DIV_MIXTURE, DIV_TVD}:
    raise ImportError(f"fastdistill._scalar.sparse_bin has no bin for divergence codes "
                      f"{sorted(set(DIV_NAMES) - {DIV_NONE, DIV_FORWARD_KL, DIV_REVERSE_KL, DIV_MIXTURE, DIV_TVD})}")


def teacher_weights(ids, vals, invt):  # type: ignore[no-untyped-def]
    """A sparse teacher row's (used slots, ``vmax``, ``lacc``, whether a used value is NaN or ``+inf``):
    ``log sum exp(v * invt)`` over the used slots is ``vmax + lacc``, kept apart so that each bin's
    log-probability is formed relative to the maximum (:func:`bin_logprob`: values of 1e30 keep their
    differences). ``vmax`` is ``-inf`` when no slot is used or every used value is ``-inf`` (no
    distribution to renormalise); ``lacc`` is NaN with a NaN or ``+inf`` value (the dense rule: the row is
    NaN)."""
    count = 0
    vmax = NEG_INF
    bad = False
    for b in range(ids.shape[0]):
        if ids[b] >= 0:
            count += 1
            v = vals[b]
            if v != v or v == math.inf:
                bad = True
            elif v * invt > vmax:
                vmax = v * invt
    if bad:
        return count, vmax, math.nan, True
    if vmax == NEG_INF:
        return count, vmax, 0.0, False
    acc = 0.0
    for b in range(ids.shape[0]):
        if ids[b] >= 0:
            acc += math.exp(vals[b] * invt - vmax)
    return count, vmax, math.log(acc), False


def ce_term(ms, s_label, log_z, eps, mean_s):  # type: ignore[no-untyped-def]
    """A row's hard-label cross-entropy with label smoothing ``eps``: ``(1 - eps) (lse - s_label) + eps
    (lse - mean s)`` with ``lse = ms + log_z``, formed as ``(ms - s_label) + log_z`` so that a ``log_z``
    beside logits of 1e15 and beyond is kept (``ms + log_z`` rounds it away). Compiled without
    reassociation (a backend's fastmath would undo the order)."""
    h = (1.0 - eps) * ((ms - s_label) + log_z)
    if eps != 0.0:
        h += eps * ((ms - mean_s) + log_z)
    return h


def bin_logprob(v, invt, vmax, lacc, tail):  # type: ignore[no-untyped-def]
    """The teacher's log-probability of a bin of value ``v``: the value itself for ``"bucket"``, else
    ``v / tau`` renormalised over the support (:func:`teacher_weights`' ``vmax`` and ``lacc``; the maximum
    subtracted first: compiled without reassociation)."""
    if tail == TAIL_BUCKET:
        return v
    return (v * invt - vmax) - lacc


def sorted_used_ids(ids, out):  # type: ignore[no-untyped-def]
    """The used ids of a sparse teacher row (``>= 0``) into ``out`` in increasing order (Shell's sort:
    k is small and this needs no allocation); returns how many."""
    m = 0
    for b in range(ids.shape[0]):
        if ids[b] >= 0:
            out[m] = ids[b]
            m += 1
    gap = 1
    while gap < m // 3:
        gap = 3 * gap + 1
    while gap > 0:
        for i in range(gap, m):
            v = out[i]
            j = i
            while j >= gap and out[j - gap] > v:
                out[j] = out[j - gap]
                j -= gap
            out[j] = v
        gap //= 3
    return m


# the student's mass outside a sparse teacher's support is summed relative to the row's maximum first
# (on the CPU from the statistics' kept float32 exponentials, no exponential per column); a sum below this
# floor is summed again relative to the outside columns' own maximum. Kept exponentials are 0 at and below
# 2**-126, so at the floor the terms they drop weigh at most n * 1.2e-38 / 1e-20 of it (1e-11 at 1e7
# columns), and the dense write's coefficient (about 1 / the sum) stays far inside float32.
REST_FLOOR = 1e-20

# a "support" tail's student log-probabilities are (s_j - ref) / tau - lse over the support: ``ref`` the row's
# maximum, or the support's own maximum logit where the support lies more than this many temperatures
# below the row's (its mass there is below e**-1024, zero in any precision). The differences s_j - max
# round at the maximum's magnitude: up to this gap that costs lse at most 1024 * 2**-53 (1e-13); beyond
# it, beside a student logit of 1e30 outside the support, it kept none of the support's digits.
SUPPORT_GAP = 1024.0


def reads_rest_bin(tail, div):  # type: ignore[no-untyped-def]
    """Whether the divergence reads the student's mass outside a sparse teacher's support, summed
    directly over those columns (``1 - sum_S q`` cancels for a confident student): the ``"bucket"``
    tail's rest bin, and the ``"renormalize"`` tail's outside bin for every divergence but the forward
    KL (whose term there is 0: the teacher has no mass outside)."""
    if tail == TAIL_SUPPORT or div == DIV_NONE:
        return False
    return tail == TAIL_BUCKET or div != DIV_FORWARD_KL

"""Scalar code both backends compile, besides the divergences' own (``fastdistill._formulas``): a sparse
teacher's weights and bins, the cross-entropy term. Plain Python, jitted by ``fastdistill.cpu`` with
``numba.njit`` and by ``fastdistill.cuda._kernels`` as CUDA device functions (one source for both)."""
from __future__ import annotations

import math

from ._spec import DIV_FORWARD_KL, DIV_NONE, TAIL_BUCKET, TAIL_SUPPORT

NEG_INF = -math.inf


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

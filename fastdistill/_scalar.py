"""Scalar formulas both backends compile: plain Python, jitted by ``fastdistill.cpu._kernels`` with
``numba.njit`` and by ``fastdistill.cuda._kernels`` as CUDA device functions (one source for both)."""
from __future__ import annotations

import math

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

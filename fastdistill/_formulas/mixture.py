"""Mixtures, ``cp * KL(p || m) + cq * KL(q || m)`` with ``m = lam * p + (1 - lam) * q``: the generalised JSD
(``jsd``: ``cp = lam = beta``, ``cq = 1 - beta``) and the skew KLs (``skew_kl``: ``lam = alpha``, ``cp = 1``;
``skew_reverse_kl``: ``lam = 1 - alpha``, ``cq = 1``)."""
from __future__ import annotations

import math

CODE = 3
NAME = "mixture"
TWO_PASS = True


def constants(lam, cp, cq):  # type: ignore[no-untyped-def]
    """(log lam, log(1 - lam), cp, cq); a weight of 0 has the log -inf."""
    return (math.log(lam) if lam > 0.0 else -math.inf), (math.log(1.0 - lam) if lam < 1.0 else -math.inf), cp, cq


def bin(lp, lq, p, q, k):  # type: ignore[no-untyped-def]
    loglam, log1mlam, cp, cq = k
    # lm = log m = log(exp(loglam + lp) + exp(log1mlam + lq)), without overflow; -inf where m is 0
    x = loglam + lp
    y = log1mlam + lq
    top = x if x > y else y
    lm = top if top == -math.inf else top + math.log(math.exp(x - top) + math.exp(y - top))
    # a term of weight 0 is skipped, not 0 * inf: skew_kl at alpha = 1 mixes m = p, which is 0 off a
    # renormalized support while q is not
    d = 0.0
    if cp != 0.0 and p > 0.0:
        d += cp * p * (lp - lm)
    if cq != 0.0 and q > 0.0:
        d += cq * q * (lq - lm)
    h = 0.0
    if q > 0.0:
        # (1 - lam) q / m, finite where lam < 1 (m >= (1 - lam) q; the ratio formed from the logs, so
        # that subnormal p and q neither overflow nor underflow); 0 where m does not hold q
        w_ratio = math.exp(log1mlam + lq - lm) if log1mlam != -math.inf else 0.0
        if cp != 0.0:
            h -= cp * p * w_ratio
        if cq != 0.0:
            h += cq * q * (lq - lm + 1.0 - w_ratio)
    return d, h

"""Amari's alpha-divergence, ``(1 - sum p**a q**(1 - a)) / (a (1 - a))`` for ``0 < a < 1`` (``alpha_divergence``;
``a = 0.5`` is four times the squared Hellinger distance). Its limits, the reverse KL at ``a = 0`` and the
forward KL at ``a = 1``, are those losses (``_spec.soft_terms`` maps them there).

Each class's term is written as ``(a p + (1 - a) q - p**a q**(1 - a)) / (a (1 - a))`` (the same sum: ``p``
and ``q`` sum to 1), which is never negative (the weighted means' inequality), so a row's sum does not
cancel; and through ``expm1`` of the log-ratio, relative to the distribution whose exponent is near 1
(``q`` for ``a < 1/2``, ``p`` above), so that neither ``a`` nor ``1 - a`` near 0 divides a difference of
nearly equal numbers (at ``a = 1e-6`` the plain form keeps 10 digits fewer). ``k[0]`` is ``a``.
"""
from __future__ import annotations

import math

CODE = 5
NAME = "alpha"
TWO_PASS = True
# above this, expm1 of a log-ratio overflows: the products are formed from the logs instead
_EXP_LIMIT = 700.0


def constants(lam, cp, cq):  # type: ignore[no-untyped-def]
    return lam, 0.0, 0.0, 0.0


def bin(lp, lq, p, q, k):  # type: ignore[no-untyped-def]
    a = k[0]
    if q == 0.0:
        return p / (1.0 - a), 0.0
    if p == 0.0:
        return q / a, q / a
    if a < 0.5:
        r = lp - lq
        ar = a * r
        # w = p**a q**(1 - a) - q = q expm1(a r);  g = p - q = q expm1(r)
        w = q * math.expm1(ar) if ar < _EXP_LIMIT else math.exp(lq + ar) - q
        g = q * math.expm1(r) if r < _EXP_LIMIT else p - q
        return (g - w / a) / (1.0 - a), -w / a
    r = lq - lp
    br = (1.0 - a) * r
    # w = p**a q**(1 - a) - p = p expm1((1 - a) r);  g = q - p = p expm1(r)
    w = p * math.expm1(br) if br < _EXP_LIMIT else math.exp(lp + br) - p
    g = p * math.expm1(r) if r < _EXP_LIMIT else q - p
    return (g - w / (1.0 - a)) / a, (g - w) / a

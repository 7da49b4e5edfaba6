"""Forward KL, ``KL(p || q) = sum p (log p - log q)`` (the ``kl_divergence`` loss)."""
from __future__ import annotations

import math

CODE = 1
NAME = "kl"
TWO_PASS = False


def constants(lam, cp, cq):  # type: ignore[no-untyped-def]
    return 0.0, 0.0, 0.0, 0.0


def row_value(invt, sa, sb, sx, shift):  # type: ignore[no-untyped-def]
    """A dense row's divergence from its one-pass sums: ``sa = sum exp((t - m_t) / tau)``, ``sb = sum
    exp((s - m_s) / tau)``, ``sx = sum exp((t - m_t) / tau) (t - s - c)`` for a constant ``c`` of the
    backend's choice (the CPU's ``m_t - m_s``, CUDA's 0) and ``shift = (m_t - m_s - c) / tau``; ``invt =
    1 / tau``. Compiled without reassociation: the shift is added to the log before the difference."""
    return invt * sx / sa - (shift + math.log(sa / sb))


def bin(lp, lq, p, q, k):  # type: ignore[no-untyped-def]
    # 0 log 0 = 0: a class the teacher gives no mass adds nothing, however small q
    return (p * (lp - lq) if p > 0.0 else 0.0), -p

"""Reverse KL, ``KL(q || p) = sum q (log q - log p)`` (``reverse_kl``; MiniLLM, torchtune)."""
from __future__ import annotations

import math

CODE = 2
NAME = "reverse_kl"
TWO_PASS = False


def constants(lam, cp, cq):  # type: ignore[no-untyped-def]
    return 0.0, 0.0, 0.0, 0.0


def row_value(invt, sa, sb, sy, shift):  # type: ignore[no-untyped-def]
    """A dense row's divergence from its one-pass sums (``forward_kl.row_value``'s, the roles of the
    teacher and the student exchanged): ``sy = sum exp((s - m_s) / tau) (s - t - c)``, ``shift = (m_s - m_t
    - c) / tau``."""
    return invt * sy / sb - (shift + math.log(sb / sa))


def bin(lp, lq, p, q, k):  # type: ignore[no-untyped-def]
    if q > 0.0:
        return q * (lq - lp), q * (lq - lp + 1.0)
    return 0.0, 0.0

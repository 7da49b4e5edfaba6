"""Total variation distance, ``0.5 * sum |p - q|`` (``tvd``)."""
from __future__ import annotations

CODE = 4
NAME = "tvd"
TWO_PASS = True


def constants(lam, cp, cq):  # type: ignore[no-untyped-def]
    return 0.0, 0.0, 0.0, 0.0


def bin(lp, lq, p, q, k):  # type: ignore[no-untyped-def]
    return 0.5 * abs(p - q), q * (0.5 if q > p else (-0.5 if q < p else 0.0))

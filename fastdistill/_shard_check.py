"""The check entries of a vocabulary shard's exchanged buffers: proof that the shards tile the row and
that each round was combined before the next was read.

Every round's buffer carries, after its rows, a few numbers about the shard itself, combined across
the shards with the round's own operation. After combining they must equal the entries of one shard
holding the whole row, ``[0, classes)``; every front door (``fastdistill.sharded`` on the CPU and
the GPU, the C ABI's ``fd_vocab_shard_*``) reads them back from the combined buffer before using it.

- round 1 (``max``), 6 entries: the shard's end ``offset + width``, ``-offset``, ``offset``, ``-end``,
  ``classes`` and ``-classes``. Combined: some shard ends at ``classes``, some starts at 0, and
  ``max(classes) == -max(-classes)``: every shard was built with the same ``classes``. (``offset`` and
  ``-end`` are not compared: with the first two they tell a buffer that holds only this shard's own
  numbers -- all shards alike, or none combined -- from one combined across different shards.)
- the sums round (``sum``), 4 entries: the width, the sum of the shard's column ids, the sum of their
  squares, and ``h(offset + width) - h(offset)`` for a 26-bit hash ``h`` of a column boundary. Combined:
  the widths add up to ``classes`` (the columns are counted once each on average), the ids and their
  squares sum as those of ``[0, classes)``, and the boundaries telescope to ``h(classes) - h(0)``.
- the mixtures' and TVD's second sums round (``sum``), 1 entry: the width.

Why this proves tiling. Shards ``[a_i, b_i)`` tile ``[0, N)`` exactly when the boundaries match up:
``{a_i} + {N} == {b_i} + {0}`` as multisets (the intervals then form one chain from 0 to N, as a path
of forward edges with in-degree = out-degree at every inner point). The width, id and square sums are
the first power sums of those boundaries; with at most 4 shards they decide it (checked exhaustively
for every row of up to 40 classes), with 5 or more a rare non-tiling set matches them (e.g. ``[0, 1),
[2, 5), [2, 4), [7, 9), [7, 8)`` of 9 classes), which the boundary hash tells apart but with a chance
of about ``2**-26``. Exactness: every entry is an integer, and so is every partial sum of an all-reduce
in any order while the totals stay below ``2**53``: the widths and hashes always (fewer than ``2**26``
shards), the id sums up to ``IDS_EXACT`` = 134,217,728 classes, the squares up to ``SQUARES_EXACT`` =
300,080 classes (above these bounds the entry is 0 and not compared).

Why this detects a round read before it was combined. With two or more shards, a shard's own widths
are less than ``classes`` (each shard has at least one column) and its own maxima of the boundaries
are not both those of the whole row, so a buffer read back uncombined fails its check on every shard
(a buffer combined twice doubles its widths). Such a buffer still holds exactly this shard's own
entries, which a combined one never does unless every shard is the same column range (the sums of
the other shards' widths are at least 1; ``offset`` and ``-offset`` reach their maxima on the same
shard only when all offsets are equal, and so for the ends): the error then says the round was not
combined. With one shard combining is the identity, and its own numbers are the right ones.
"""
from __future__ import annotations

import numpy as np

from . import _cache  # noqa: F401  (before the first cache=True: keys the cache on these sources)
from numba import njit

ROUND_MAX = 0  # round 1: the maxima
ROUND_SUM = 1  # round 2: the sums
ROUND_MIX = 2  # round 3 (mixtures and TVD): the second pass's sums
N_CHECK = (6, 4, 1)  # check entries per round
N_CHECK_MAX = 6
N_CHECK_SUM = 4
N_CHECK_MIX = 1
IDS_EXACT = 134_217_728  # largest classes whose column ids sum below 2**53
SQUARES_EXACT = 300_080  # largest classes whose squared column ids sum below 2**53
ROUND_NAMES = ("max", "sum", "sum")

_JIT = dict(cache=True, error_model="numpy", nogil=True)


@njit(**_JIT)
def boundary_hash(x):  # type: ignore[no-untyped-def]
    """A 26-bit hash of a column boundary (splitmix64's finaliser, its top bits)."""
    z = np.uint64(x) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.int64(z >> np.uint64(38))


@njit(**_JIT)
def _squares_below(n):  # type: ignore[no-untyped-def]
    """``sum(x * x for x in range(n))`` (exact in int64 for n <= SQUARES_EXACT)."""
    return (n - 1) * n * (2 * n - 1) // 6


@njit(**_JIT)
def check_entries(rnd, offset, width, classes, out):  # type: ignore[no-untyped-def]
    """This shard's check entries of round ``rnd`` (ROUND_*) into ``out[:N_CHECK[rnd]]`` (float64)."""
    a = np.int64(offset)
    b = a + np.int64(width)
    n = np.int64(classes)
    if rnd == ROUND_MAX:
        out[0] = float(b)
        out[1] = float(-a)
        out[2] = float(a)
        out[3] = float(-b)
        out[4] = float(n)
        out[5] = float(-n)
    elif rnd == ROUND_SUM:
        out[0] = float(b - a)
        out[1] = float((a + b - 1) * (b - a) // 2) if n <= IDS_EXACT else 0.0
        out[2] = float(_squares_below(b) - _squares_below(a)) if n <= SQUARES_EXACT else 0.0
        out[3] = float(boundary_hash(b) - boundary_hash(a))
    else:
        out[0] = float(b - a)


@njit(**_JIT)
def combined_ok(rnd, combined, classes):  # type: ignore[no-untyped-def]
    """Whether round ``rnd``'s combined check entries (``combined``, float64) are the whole row's."""
    whole = np.zeros(6)
    check_entries(rnd, 0, classes, classes, whole)
    k = 6 if rnd == ROUND_MAX else (4 if rnd == ROUND_SUM else 1)
    for i in range(k):
        if combined[i] != whole[i] and not (rnd == ROUND_MAX and (i == 2 or i == 3)):
            return False
    return True


def entries(rnd: int, offset: int, width: int, classes: int) -> np.ndarray:
    """:func:`check_entries` as a new float64 array of ``N_CHECK[rnd]`` numbers."""
    out = np.zeros(6)
    check_entries(np.int64(rnd), np.int64(offset), np.int64(width), np.int64(classes), out)
    return out[: N_CHECK[rnd]]


def tail_rows(rnd: int, k: int) -> int:
    """Rows of ``k`` numbers after a round's rows that hold its check entries."""
    return -(-N_CHECK[rnd] // k)


def tail(rnd: int, offset: int, width: int, classes: int, k: int) -> np.ndarray:
    """The rows after round ``rnd``'s rows of ``k`` numbers: its check entries, then zeros."""
    out = np.zeros((tail_rows(rnd, k), k))
    out.reshape(-1)[: N_CHECK[rnd]] = entries(rnd, offset, width, classes)
    return out


__all__ = ["ROUND_MAX", "ROUND_SUM", "ROUND_MIX", "N_CHECK", "N_CHECK_MAX", "N_CHECK_SUM", "N_CHECK_MIX",
           "IDS_EXACT", "SQUARES_EXACT", "ROUND_NAMES", "check_entries", "combined_ok", "entries", "boundary_hash",
           "tail", "tail_rows"]

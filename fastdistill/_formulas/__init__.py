"""Each divergence's mathematics, written once: one plain-Python module per divergence (``math`` only),
compiled by each backend with its own decorator (``numba.njit`` on the CPU, ``cuda.jit(device=True)`` on
CUDA) and checked in plain Python by the tests.

A divergence module defines:

- ``CODE`` (its ``_spec.DIV_*`` code: a position in the kernels' variant table, 1 on) and ``NAME``;
- ``TWO_PASS``: whether a dense row needs the normalised probabilities ``p`` and ``q``, i.e. a second
  pass over the row after its maxima and normalisers (the forward and reverse KL do not: their
  per-element sums are the kernels' own, vectorised ones, see ``fastdistill/cpu/_kernels.py``);
- ``constants(lam, cp, cq)``: the row constants its bins read, a tuple of :data:`N_CONSTANTS` floats,
  from the packed parameters ``P_LAM``, ``P_CP``, ``P_CQ`` (computed once per row, not per element);
- ``row_value(invt, sa, sb, sx, shift)``, one-pass divergences only: a dense row's divergence from
  the sums of the kernels' first pass;
- ``bin(lp, lq, p, q, k)``: one class (one bin of a sparse teacher) as ``(term, h)``: its term of the
  divergence ``D(p, q)`` and ``h = q * dD/dq``, for teacher and student probabilities ``p``, ``q``
  (``lp``, ``lq`` their logarithms; ``k`` the constants). A row's divergence is the sum of its terms;
  the gradient by the student logits is ``(h_j - q_j * sum h) / tau``. Terms of a row whose ``p`` and
  ``q`` each sum to 1 may carry any multiple of ``p - q`` (they sum to 0): a form may use that to keep
  its terms non-negative, so that a row's sum does not cancel.

A dense row of a two-pass divergence sums the terms and the ``h`` of its classes (the statistics
``S_DSUM`` and ``S_HSUM`` of either backend, combined with ``+`` across chunks and vocabulary shards,
never rescaled); a sparse teacher's row sums them over its bins (the tail's bin included).

:data:`FORMULAS` maps each code to its module; a module missing a piece is an error here, at import,
never a fall-through to another divergence. :func:`run_time_dispatch` builds, for code that takes the
divergence as a run-time value (the sparse kernels), one function that calls the module of a given code.
"""
from __future__ import annotations

import math
from types import ModuleType

from . import alpha, forward_kl, mixture, reverse_kl, tvd

MODULES = (forward_kl, reverse_kl, mixture, tvd, alpha)
N_CONSTANTS = 4
# what a divergence module must define
PIECES = ("CODE", "NAME", "TWO_PASS", "constants", "bin")


def _table(modules: tuple[ModuleType, ...]) -> dict[int, ModuleType]:
    table: dict[int, ModuleType] = {}
    for m in modules:
        missing = [p for p in PIECES if not hasattr(m, p)]
        if missing:
            raise ImportError(f"divergence module {m.__name__} lacks {missing}")
        if m.CODE in table or m.CODE < 1:
            raise ImportError(f"divergence module {m.__name__}: code {m.CODE} is taken or below 1")
        if not m.TWO_PASS and not hasattr(m, "row_value"):
            raise ImportError(f"divergence module {m.__name__} is one-pass and lacks row_value")
        if len(m.constants(0.5, 0.5, 0.5)) != N_CONSTANTS:
            raise ImportError(f"divergence module {m.__name__}: constants() must return {N_CONSTANTS} floats")
        table[m.CODE] = m
    if sorted(table) != list(range(1, len(table) + 1)):
        raise ImportError(f"divergence codes must be 1..{len(table)}, got {sorted(table)}")
    return table


FORMULAS = _table(MODULES)


def compiled(decorator, piece: str) -> dict:  # type: ignore[no-untyped-def]
    """``{code: decorator(module.<piece>)}`` for every divergence (the backend's compiled copies)."""
    return {code: decorator(getattr(m, piece)) for code, m in FORMULAS.items()}


def run_time_dispatch(decorator, piece: str, arity: int, none_value):  # type: ignore[no-untyped-def]
    """``f(div, *args)`` (``arity`` arguments after ``div``), compiled with ``decorator``: the ``piece`` of
    the divergence whose code ``div`` is, ``none_value`` for ``DIV_NONE`` (0) and NaNs of its shape for a
    code no module has (unreachable: the variants are checked before a kernel runs). A chain of small
    compiled functions, one per divergence, since compiled code cannot index a table of functions."""
    fns = compiled(decorator, piece)
    nan = tuple(math.nan for _ in none_value) if isinstance(none_value, tuple) else math.nan
    chain = decorator(_make_end(arity, none_value, nan))
    for code in sorted(fns, reverse=True):
        chain = decorator(_make_link(arity, code, fns[code], chain))
    return chain


# the links take their arguments by name: Numba compiles neither *args forwarding nor a variable arity on
# every target, so each arity a caller needs is written out
def _make_end(arity, none_value, nan):  # type: ignore[no-untyped-def]
    if arity == 3:
        def end3(div, a, b, c):  # type: ignore[no-untyped-def]
            return none_value if div == 0 else nan
        return end3
    if arity == 5:
        def end5(div, a, b, c, d, e):  # type: ignore[no-untyped-def]
            return none_value if div == 0 else nan
        return end5
    raise ValueError(f"no dispatch of arity {arity}")


def _make_link(arity, code, fn, rest):  # type: ignore[no-untyped-def]
    if arity == 3:
        def link3(div, a, b, c):  # type: ignore[no-untyped-def]
            if div == code:
                return fn(a, b, c)
            return rest(div, a, b, c)
        return link3
    if arity == 5:
        def link5(div, a, b, c, d, e):  # type: ignore[no-untyped-def]
            if div == code:
                return fn(a, b, c, d, e)
            return rest(div, a, b, c, d, e)
        return link5
    raise ValueError(f"no dispatch of arity {arity}")

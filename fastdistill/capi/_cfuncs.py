"""The C entry points: ``numba.cfunc`` wrappers around the CPU kernels.

Private module, compiled when first imported (``fastdistill.capi.symbols()`` imports it), with
``cache=True`` so later processes load the machine code from disk. Nothing here touches a Python
object at call time, so the entry points run on any thread, with or without the GIL.

Rules every entry point follows (an exception inside a ``cfunc`` would print and return 0, which is
``FD_OK``):

* every input is checked with plain comparisons first and a non-zero status is returned on failure;
* the status starts as ``FD_INTERNAL_ERROR`` and becomes ``FD_OK`` only after the work completed;
* the computation runs inside ``try/except`` so an unexpected failure (out of memory) is reported as
  ``FD_INTERNAL_ERROR``;
* the thread count of the calling thread is set only for the call and restored afterwards.

Each entry point writes these steps out (check, set the threads, run, restore) rather than calling one
shared guard: a ``cfunc`` needs its parameters listed (``*args`` is refused against an explicit
signature), and an ``njit`` guard that takes the check and the body as function arguments compiles again
in every process (numba 0.68: a new on-disk cache entry per process, never a hit), which would undo the
point of ``cache=True`` here.

The loss kinds' terms and the choice of compiled code are the façade's own functions
(:func:`fastdistill._spec.soft_terms`, :func:`fastdistill._spec.variant_fields`), compiled here; the
entry points call the same workers (one per kernel variant, :func:`fastdistill.cpu._kernels.worker`)
through the same parallel driver as the Python API, found in a table built from
:func:`fastdistill._spec.reachable`.
"""
from __future__ import annotations

import ctypes
import math

import llvmlite.binding as ll
import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.ufunc import parallel as _parallel

from .. import cpu as _cpu  # noqa: F401  (sets the thread-safe threading layer before the pool starts)
from .. import _spec
from .._spec import (
    BFLOAT16,
    FLOAT16,
    FLOAT32,
    FLOAT64,
    IS_TWO_PASS,
    LOSS_TABLE,
    MAX_TEMPERATURE,
    N_PARAMS,
    P_COS_W,
    P_CP,
    P_CQ,
    P_DIV_W,
    P_HARD_W,
    P_LAM,
    P_MSE_W,
    P_SMOOTH,
    P_TAU,
    SHARD_LABEL_IGNORED,
    UNIT_PARAMETER,
)
from ..cpu import _kernels as K
from . import (
    ABI_VERSION,
    FD_BAD_KIND,
    FD_BAD_PARAM,
    FD_BAD_INDEX,
    FD_BAD_REDUCTION,
    FD_BAD_SHAPE,
    FD_CE_ONLY,
    FD_COMBINED,
    FD_COSINE,
    FD_EMPTY_INPUT,
    FD_INTERNAL_ERROR,
    FD_LABEL_OUT_OF_RANGE,
    FD_MEAN,
    FD_MISSING_LABELS,
    FD_MSE,
    FD_NONE,
    FD_NULL_POINTER,
    FD_OK,
    FD_OVERLAP,
    FD_SHARD_DONE,
    FD_SHARD_MAX,
    FD_SHARD_SUM,
    FD_SHARD_WORK,
    FD_SUM,
    FD_TAIL_BUCKET,
    FD_TAIL_RENORMALIZE,
)
from .. import _shard_check as SC
from ..cpu import _sparse as S
from ..cpu._math import thread_count

# ---------------------------------------------------------------- thread pool access without Python

# The threading layer must be loaded before any code that calls its symbols is compiled or loaded from
# the cache (loading cached code does not start it).
_parallel._launch_threads()

# The pool size, read by the compiled code through a named symbol so that a cached entry point always
# sees this process's value (a Python global would be frozen into the cached machine code).
_POOL_SIZE = ctypes.c_int64(int(_parallel.NUM_THREADS))
_POOL_SYMBOL = "fastdistill_capi_pool_size"
ll.add_symbol(_POOL_SYMBOL, ctypes.addressof(_POOL_SIZE))


@intrinsic
def _pool_size(typingctx):  # type: ignore[no-untyped-def]
    """Number of threads in numba's pool (this process)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        mod = builder.module
        gv = mod.globals.get(_POOL_SYMBOL)
        if gv is None:
            gv = ir.GlobalVariable(mod, ir.IntType(64), _POOL_SYMBOL)
            gv.linkage = "external"
        return builder.load(gv)

    return types.int64(), codegen


@intrinsic
def _set_num_threads(typingctx, n):  # type: ignore[no-untyped-def]
    """Set the calling thread's numba thread count (no range check: callers check)."""
    if not isinstance(n, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "set_num_threads")
        v = context.cast(builder, args[0], signature.args[0], types.int32)
        builder.call(fn, [v])
        return context.get_dummy_value()

    return types.void(n), codegen


@intrinsic
def _addr(typingctx, ptr):  # type: ignore[no-untyped-def]
    """A pointer's address as an unsigned integer (0 for NULL)."""
    if not isinstance(ptr, types.CPointer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.ptrtoint(args[0], ir.IntType(64))

    return types.uint64(ptr), codegen


JIT = dict(cache=True, error_model="numpy", nogil=True)
CJIT = dict(cache=True, error_model="numpy")

# ---------------------------------------------------------------- the loss and its variant (the façade's own code)

_soft_terms = njit(**JIT)(_spec.soft_terms)
_infinite_off_support = njit(**JIT)(_spec.infinite_off_support)
N_LOSS_KINDS = len(LOSS_TABLE)
_variant_fields = njit(**JIT)(_spec.variant_fields)


@njit(**JIT)
def loss_terms(kind, tau, hard_w, soft_w, param, smoothing, P):  # type: ignore[no-untyped-def]
    """Fill ``P`` (``N_PARAMS`` float64) as ``Terms.pack()`` and return ``Terms.div`` (-1: unknown kind).

    The numbers of ``DistilLoss.<kind>(...).terms(soft_w, hard_w=hard_w, smoothing=smoothing)``, where
    ``param`` is beta (FD_JSD), alpha (FD_SKEW_KL, FD_SKEW_REVERSE_KL) or the MSE weight (FD_COMBINED,
    whose KL weight is 1). Kinds without a temperature (FD_MSE, FD_COSINE, FD_CE_ONLY) use tau = 1.
    """
    for k in range(N_PARAMS):
        P[k] = 0.0
    if kind == FD_MSE or kind == FD_COSINE or kind == FD_CE_ONLY:
        tau = 1.0
    mse_w = param if kind == FD_COMBINED else 1.0
    div, div_w, mse, cos_w, lam, c_p, c_q = _soft_terms(kind, tau, 1.0, mse_w, param, param, True)
    if div < 0:
        return -1
    P[P_TAU] = tau
    P[P_HARD_W] = hard_w
    P[P_DIV_W] = div_w * soft_w
    P[P_MSE_W] = mse * soft_w
    P[P_COS_W] = cos_w * soft_w
    P[P_LAM] = lam
    P[P_CP] = c_p
    P[P_CQ] = c_q
    P[P_SMOOTH] = smoothing
    return div


VARIANTS = _spec.reachable()
VARIANT_INDEX = _spec.index_table(VARIANTS)


_F64_STORAGE = _spec.STORAGES.index(FLOAT64)


@njit(**JIT)
def kernel_variant(div, P, has_labels, storage):  # type: ignore[no-untyped-def]
    """The position in :data:`VARIANTS` of the variant the Python API runs for these terms on logits of
    ``STORAGES[storage]`` (student, teacher and gradient), and whether it has a second pass (a two-pass divergence)."""
    div_kind = div if P[P_DIV_W] != 0.0 else 0
    lin = P[P_MSE_W] != 0.0 or P[P_COS_W] != 0.0
    d, ce, ln, pw, f64_math = _variant_fields(div_kind, P[P_HARD_W], has_labels, P[P_TAU], lin,
                                              storage != _F64_STORAGE)
    return VARIANT_INDEX[d, ce, int(ln), pw, storage, int(f64_math)], IS_TWO_PASS[d]



# ---------------------------------------------------------------- checks (never raise)


@njit(**JIT)
def _check_shape(rows, n):  # type: ignore[no-untyped-def]
    if rows < 0 or n < 0:
        return FD_BAD_SHAPE
    if rows == 0 or n == 0:
        return FD_EMPTY_INPUT
    if rows > (1 << 58) // n:  # rows * n * 8 bytes must fit comfortably in an address space
        return FD_BAD_SHAPE
    return FD_OK


@njit(**JIT)
def _overlap(a, an, b, bn):  # type: ignore[no-untyped-def]
    """Byte ranges [a, a+an) and [b, b+bn) overlap (a NULL range overlaps nothing)."""
    if a == 0 or b == 0 or an == 0 or bn == 0:
        return False
    return a < b + bn and b < a + an


@njit(**JIT)
def _check_threads(nthreads):  # type: ignore[no-untyped-def]
    if nthreads < 0 or nthreads > _pool_size():
        return FD_BAD_PARAM
    return FD_OK


@njit(**JIT)
def _check_response(sp, tp, lp, rows, n, kind, tau, hard_w, soft_w, param, smoothing, ignore_index,
                    reduction, lossp, gp, nthreads, dense_teacher=True):  # type: ignore[no-untyped-def]
    """Every check of ``fd_response_*``, in the Python API's order; FD_OK or the first failure.
    ``dense_teacher=False``: ``tp`` is the student standing in for a teacher that is not a logits array
    (a sparse teacher's), so the gradient may be it (the in-place update)."""
    st = _check_shape(rows, n)
    if st != FD_OK:
        return st
    if _addr(sp) == 0 or _addr(tp) == 0 or _addr(lossp) == 0:
        return FD_NULL_POINTER
    # outputs must not overlap the inputs (the gradient may be the student itself)
    item = _itemsize(sp)
    nb = np.uint64(rows) * np.uint64(n) * item
    has_labels = _addr(lp) != 0
    lb = np.uint64(rows) * np.uint64(8) if has_labels else np.uint64(0)
    nloss = np.uint64(rows if reduction == FD_NONE else 1) * np.uint64(8)
    g = _addr(gp)
    s = _addr(sp)
    if g != 0 and g != s and _overlap(g, nb, s, nb):
        return FD_OVERLAP
    if dense_teacher and _overlap(g, nb, _addr(tp), nb):
        return FD_OVERLAP
    if _overlap(g, nb, _addr(lp), lb) or _overlap(g, nb, _addr(lossp), nloss):
        return FD_OVERLAP
    if _overlap(_addr(lossp), nloss, s, nb) or _overlap(_addr(lossp), nloss, _addr(tp), nb):
        return FD_OVERLAP
    if _overlap(_addr(lossp), nloss, _addr(lp), lb):
        return FD_OVERLAP
    if has_labels:
        for r in range(rows):
            lab = lp[r]
            if (lab < 0 or lab >= n) and lab != ignore_index:
                return FD_LABEL_OUT_OF_RANGE
    if kind < 0 or kind >= N_LOSS_KINDS:
        return FD_BAD_KIND
    if reduction != FD_MEAN and reduction != FD_SUM and reduction != FD_NONE:
        return FD_BAD_REDUCTION
    uses_tau = kind != FD_MSE and kind != FD_COSINE and kind != FD_CE_ONLY
    if uses_tau and not (math.isfinite(tau) and tau > 0.0 and tau <= MAX_TEMPERATURE):
        return FD_BAD_PARAM
    if not (math.isfinite(hard_w) and math.isfinite(soft_w)):
        return FD_BAD_PARAM
    if UNIT_PARAMETER[kind] and not (param >= 0.0 and param <= 1.0):
        return FD_BAD_PARAM
    if kind == FD_COMBINED and not math.isfinite(param):
        return FD_BAD_PARAM
    if not (smoothing >= 0.0 and smoothing < 1.0):
        return FD_BAD_PARAM
    if hard_w != 0.0 and not has_labels:
        return FD_MISSING_LABELS
    return _check_threads(nthreads)


@njit(**JIT)
def _check_sparse(sp, ip, vp, k, lp, rows, n, kind, tau, hard_w, soft_w, param, smoothing, ignore_index, tail,  # type: ignore[no-untyped-def]  # noqa: E501
                  t_gen, reduction, lossp, gp, nthreads):
    """Every check of ``fd_response_sparse_*``: the dense entry point's (shape, pointers, overlaps of the
    gradient with every input, labels, kind, reduction, parameters), then k, the ids, the tail and the
    teacher's temperature ``t_gen``."""
    st = _check_shape(rows, n)
    if st != FD_OK:
        return st
    if _addr(ip) == 0 or _addr(vp) == 0:
        return FD_NULL_POINTER
    if k < 1 or k > n:
        return FD_BAD_PARAM
    g = _addr(gp)
    nb = np.uint64(rows) * np.uint64(n) * _itemsize(sp)
    kb = np.uint64(rows) * np.uint64(k)
    if _overlap(g, nb, _addr(ip), kb * np.uint64(8)) or _overlap(g, nb, _addr(vp), kb * np.uint64(4)):
        return FD_OVERLAP
    # the dense checks, with the student standing in for the teacher (it is only read; the gradient may
    # be the student)
    st = _check_response(sp, sp, lp, rows, n, kind, tau, hard_w, soft_w, param, smoothing, ignore_index,
                         reduction, lossp, gp, nthreads, False)
    if st != FD_OK:
        return st
    if kind == FD_MSE or kind == FD_COSINE or kind == FD_COMBINED:
        return FD_BAD_KIND
    if tail < 0 or tail > FD_TAIL_BUCKET:
        return FD_BAD_PARAM
    if not (t_gen > 0.0 and t_gen < np.inf):  # (NaN fails both)
        return FD_BAD_PARAM
    if tail == FD_TAIL_BUCKET and kind != FD_CE_ONLY and tau != t_gen:
        return FD_BAD_PARAM
    if tail == FD_TAIL_RENORMALIZE and kind != FD_CE_ONLY:
        div, _, _, _, lam, _, c_q = _soft_terms(kind, tau, 1.0, 1.0, param, param, True)
        if _infinite_off_support(div, lam, c_q):
            return FD_BAD_PARAM
    for r in range(rows):
        base = r * k
        for b in range(k):
            i = ip[base + b]
            if i < -1 or i >= n:
                return FD_BAD_INDEX
            if i >= 0 and tail == FD_TAIL_BUCKET and vp[base + b] > 0.0:
                return FD_BAD_PARAM  # a log-probability above 0
            if i >= 0:
                for c in range(b):
                    if ip[base + c] == i:
                        return FD_BAD_INDEX
    return FD_OK


@njit(**JIT)
def _check_shard(step, sp, tp, lp, rows, n, offset, classes, kind, tau, hard_w, soft_w, param, smoothing,  # type: ignore[no-untyped-def]  # noqa: E501
                 ignore_index, reduction, wp, qp, lossp, gp, nthreads):
    """Every check of ``fd_vocab_shard_*``: the step, the shard's place in the row, the work and request
    buffers (never overlapping an input or output), then the dense entry point's checks with labels
    taken as global ids (range: ``classes``)."""
    if step < 0 or step > 3:
        return FD_BAD_PARAM
    st = _check_shape(rows, n)
    if st != FD_OK:
        return st
    if offset < 0 or classes < n or offset > classes - n:
        return FD_BAD_SHAPE
    if _addr(wp) == 0 or _addr(qp) == 0:
        return FD_NULL_POINTER
    has_labels = _addr(lp) != 0
    wb = np.uint64(rows) * np.uint64(FD_SHARD_WORK * 8)
    nb = np.uint64(rows) * np.uint64(n) * _itemsize(sp)
    lb = np.uint64(rows) * np.uint64(8) if has_labels else np.uint64(0)
    nloss = np.uint64(rows if reduction == FD_NONE else 1) * np.uint64(8)
    w = _addr(wp)
    if (_overlap(w, wb, _addr(sp), nb) or _overlap(w, wb, _addr(tp), nb) or _overlap(w, wb, _addr(gp), nb)
            or _overlap(w, wb, _addr(lp), lb) or _overlap(w, wb, _addr(lossp), nloss)
            or _overlap(_addr(qp), np.uint64(16), w, wb)):
        return FD_OVERLAP
    g = _addr(gp)
    if _overlap(g, nb, _addr(lp), lb) or _overlap(_addr(lossp), nloss, _addr(lp), lb):
        return FD_OVERLAP
    # the dense checks without the labels (their range is the whole row's); a NULL label pointer with
    # a hard term is still FD_MISSING_LABELS there
    st = _check_response(sp, tp, _null_labels(), rows, n, kind, tau, 0.0 if has_labels else hard_w, soft_w,
                         param, smoothing, ignore_index, reduction, lossp, gp, nthreads)
    if st != FD_OK:
        return st
    if not math.isfinite(hard_w):
        return FD_BAD_PARAM
    if has_labels:
        for r in range(rows):
            lab = lp[r]
            if (lab < 0 and lab != ignore_index) or lab >= classes:
                return FD_LABEL_OUT_OF_RANGE
    return FD_OK


# a label the shard kernels never confuse with a column (as fastdistill.sharded's)
_SHARD_IGNORED = np.int64(SHARD_LABEL_IGNORED)
_N_SUM1 = K.S_DSUM - K.N_MAX  # the first round of sums
_N_SUM2 = K.N_STATS - K.S_DSUM  # a two-pass divergence's second pass
# each round's check entries after its rows' numbers (fastdistill._shard_check); the exchanged values
# take rows * _N_SUM1 + _N_CHECK1 doubles at most, FD_SHARD_WORK's 4 doubles per row beyond the
# exchanged and statistics ones cover the check entries for any rows >= 1
_N_CHECK0, _N_CHECK1, _N_CHECK2 = SC.N_CHECK_MAX, SC.N_CHECK_SUM, SC.N_CHECK_MIX


@njit(**JIT)
def _shard_labels(lp, rows, has_labels, offset, n, ignore_index):  # type: ignore[no-untyped-def]
    """Global labels as the shard kernels take them: a column of this shard, LABEL_ELSEWHERE, or the
    ignored marker."""
    out = np.empty(rows if has_labels else 0, dtype=np.int64)
    if has_labels:
        for r in range(rows):
            lab = lp[r]
            if lab == ignore_index:
                out[r] = _SHARD_IGNORED
            elif offset <= lab < offset + n:
                out[r] = lab - offset
            else:
                out[r] = K.LABEL_ELSEWHERE
    return out


@njit(**JIT)
def _shard_run(worker, two_pass, step, layout, lp, rows, n, offset, classes, has_labels, ignore_index, P,  # type: ignore[no-untyped-def]  # noqa: E501
               reduction, want_grad, wp, qp, lossp):
    """One step of ``fd_vocab_shard_*`` (every storage: the logits come as their addresses). ``work``:
    the exchanged values (``rows x 12 + 4`` at most, at its start: a round's numbers per row, then its
    check entries), then the ``rows x N_STATS`` statistics; ``request``: what the caller combines next.
    Returns FD_BAD_PARAM for a step past the last, FD_BAD_SHAPE when the combined check entries of the
    round it reads show shards that do not tile ``[0, classes)`` or a round that was not combined."""
    work = carray(wp, (rows * FD_SHARD_WORK,))
    n_exch = rows * _N_SUM1 + _N_CHECK1
    exch = work[:n_exch]  # (the three rounds' numbers, one round at a time)
    local_max = exch[: rows * K.N_MAX].reshape((rows, K.N_MAX))
    sums = exch[: rows * _N_SUM1].reshape((rows, _N_SUM1))
    mix = exch[: rows * _N_SUM2].reshape((rows, _N_SUM2))
    check0 = exch[rows * K.N_MAX: rows * K.N_MAX + _N_CHECK0]
    check1 = exch[rows * _N_SUM1: rows * _N_SUM1 + _N_CHECK1]
    check2 = exch[rows * _N_SUM2: rows * _N_SUM2 + _N_CHECK2]
    stats = work[n_exch: n_exch + rows * K.N_STATS].reshape((rows, K.N_STATS))
    labels = _shard_labels(lp, rows, has_labels, offset, n, ignore_index)
    scale = _count_and_scale(lp, rows, ignore_index, reduction)
    out = carray(lossp, (rows,)) if reduction == FD_NONE else _empty_f64(rows)
    last = 3 if two_pass else 2
    if step > last:
        return FD_BAD_PARAM
    if step == 0:  # this shard's maxima (and its sums relative to them): the caller takes the max
        K.drive_shard(worker, K.SHARD_STATS, layout, labels, has_labels, _SHARD_IGNORED, P, scale, want_grad, out,
                      stats, local_max, classes)
        SC.check_entries(SC.ROUND_MAX, offset, n, classes, check0)
        qp[0], qp[1] = rows * K.N_MAX + _N_CHECK0, FD_SHARD_MAX
        return FD_OK
    if step == 1:  # the sums, moved to the combined maxima: the caller sums them
        if not SC.combined_ok(SC.ROUND_MAX, check0, classes):
            return FD_BAD_SHAPE
        K.rescale_shard_sums(stats, local_max, P[P_TAU])
        sums[:, :] = stats[:, K.N_MAX:K.S_DSUM]
        SC.check_entries(SC.ROUND_SUM, offset, n, classes, check1)
        qp[0], qp[1] = rows * _N_SUM1 + _N_CHECK1, FD_SHARD_SUM
        return FD_OK
    if step == 2:
        if not SC.combined_ok(SC.ROUND_SUM, check1, classes):
            return FD_BAD_SHAPE
        stats[:, K.N_MAX:K.S_DSUM] = sums
        if two_pass:  # the second pass's sums
            K.drive_shard(worker, K.SHARD_DIV2, layout, labels, has_labels, _SHARD_IGNORED, P, scale, want_grad,
                          out, stats, local_max, classes)
            mix[:, :] = stats[:, K.S_DSUM:]
            SC.check_entries(SC.ROUND_MIX, offset, n, classes, check2)
            qp[0], qp[1] = rows * _N_SUM2 + _N_CHECK2, FD_SHARD_SUM
            return FD_OK
    if step == 3:
        if not SC.combined_ok(SC.ROUND_MIX, check2, classes):
            return FD_BAD_SHAPE
        stats[:, K.S_DSUM:] = mix
    # the row losses (the same on every shard) and this shard's gradient
    K.drive_shard(worker, K.SHARD_FINISH, layout, labels, has_labels, _SHARD_IGNORED, P, scale, want_grad, out,
                  stats, local_max, classes)
    _reduce(out, rows, reduction, scale, lossp)
    qp[0], qp[1] = 0, FD_SHARD_DONE
    return FD_OK


@intrinsic
def _itemsize(typingctx, ptr):  # type: ignore[no-untyped-def]
    """Size in bytes of the element type a pointer points to."""
    if not isinstance(ptr, types.CPointer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        size = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))
        return context.get_constant(types.uint64, size)

    return types.uint64(ptr), codegen


# ---------------------------------------------------------------- the workers, by variant

# The address of each variant's worker, at its position in VARIANTS, then of its in-place worker (the
# gradient written over the student: see cpu._kernels.worker), at len(VARIANTS) + its position (0 until
# built), read by the compiled entry points through a named symbol: a cached entry point always sees this
# process's addresses.
_N_VARIANTS = len(VARIANTS)
_WORKERS = (ctypes.c_int64 * (2 * _N_VARIANTS))()
_WORKERS_SYMBOL = "fastdistill_capi_workers"
ll.add_symbol(_WORKERS_SYMBOL, ctypes.addressof(_WORKERS))


@intrinsic
def _worker_address(typingctx, i):  # type: ignore[no-untyped-def]
    """Entry ``i`` of the worker table (no bounds check: callers check)."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        mod = builder.module
        aty = ir.ArrayType(ir.IntType(64), 2 * _N_VARIANTS)
        gv = mod.globals.get(_WORKERS_SYMBOL)
        if gv is None:
            gv = ir.GlobalVariable(mod, aty, _WORKERS_SYMBOL)
            gv.linkage = "external"
        idx = context.cast(builder, args[0], signature.args[0], types.int64)
        ptr = builder.gep(gv, [ir.Constant(ir.IntType(64), 0), idx])
        return builder.load(ptr)

    return types.int64(i), codegen


@njit(**JIT)
def _worker_for(idx, in_place):  # type: ignore[no-untyped-def]
    """The worker to run variant ``idx`` (0: none; callers check ``idx``): its in-place worker when the
    gradient is the student (``in_place``) and that worker was built, else its own (whose vector loops'
    run-time overlap check sends an in-place call to their scalar fallback: slower, and an element may
    round 1 ulp apart)."""
    if in_place:
        w = _worker_address(idx + _N_VARIANTS)
        if w != 0:
            return w
    return _worker_address(idx)


def build_workers(dtype: str, in_place: bool = False, variants=None) -> None:  # type: ignore[no-untyped-def]
    """Compile (or load from the cache) the worker of every variant on ``dtype`` logits (student, teacher
    and gradient), into the table; ``in_place``: their in-place workers too. ``variants``: only those."""
    for i, v in enumerate(VARIANTS):
        if v.dtype != dtype or v.teacher or v.grad or (variants is not None and v not in variants):
            continue
        if _WORKERS[i] == 0:
            _WORKERS[i] = int(K.worker(v).address)
        if in_place and _WORKERS[_N_VARIANTS + i] == 0:
            _WORKERS[_N_VARIANTS + i] = int(K.worker(v, True).address)


@njit(**JIT)
def _empty_f64(k):  # type: ignore[no-untyped-def]
    """``np.empty(k)``; raises MemoryError (caught by the entry point) when the allocation fails."""
    return np.empty(k, dtype=np.float64)


@njit(**JIT)
def _count_and_scale(lp, rows, ignore_index, reduction):  # type: ignore[no-untyped-def]
    """The gradient scale of the reduction: 1 / counted rows for FD_MEAN (0 if none), else 1."""
    if reduction != FD_MEAN:
        return 1.0
    counted = rows
    if _addr(lp) != 0:
        counted = 0
        for r in range(rows):
            if lp[r] != ignore_index:
                counted += 1
    return 1.0 / counted if counted > 0 else 0.0


@njit(**JIT)
def _reduce(out, rows, reduction, scale, lossp):  # type: ignore[no-untyped-def]
    """Write the reduced loss (FD_MEAN, FD_SUM; FD_NONE rows are already in place)."""
    if reduction != FD_NONE:
        total = 0.0
        for r in range(rows):
            total += out[r]
        lossp[0] = total * scale if reduction == FD_MEAN else total


@intrinsic
def _null_labels(typingctx):  # type: ignore[no-untyped-def]
    """A NULL ``int64*`` (the MSE and cosine entry points have no labels)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return context.get_constant_null(types.CPointer(types.int64))

    return types.CPointer(types.int64)(), codegen


@njit(**JIT)
def _check_softmax(xp, rows, n, tau, outp, nthreads):  # type: ignore[no-untyped-def]
    st = _check_shape(rows, n)
    if st != FD_OK:
        return st
    if _addr(xp) == 0 or _addr(outp) == 0:
        return FD_NULL_POINTER
    nb = np.uint64(rows) * np.uint64(n) * _itemsize(xp)
    if _addr(outp) != _addr(xp) and _overlap(_addr(outp), nb, _addr(xp), nb):
        return FD_OVERLAP
    if not (math.isfinite(tau) and tau > 0.0):
        return FD_BAD_PARAM
    return _check_threads(nthreads)


_SOFTMAX = K.softmax_kernel(False)
_SOFTMAX_LOG = K.softmax_kernel(True)


# ---------------------------------------------------------------- the cfuncs
#
# Each entry point: checks (a failure returns its code), then the computation with the caller's thread
# count, inside try/except; the status is FD_INTERNAL_ERROR until the computation has completed. The
# computation is the Python API's: the variant's worker, run by the parallel driver.


def _response_sig(ft):  # type: ignore[no-untyped-def]
    fp = types.CPointer(ft)
    return types.int32(
        fp, fp, types.CPointer(types.int64), types.int64, types.int64, types.int32, types.float64,
        types.float64, types.float64, types.float64, types.float64, types.int64, types.int32,
        types.CPointer(types.float64), fp, types.int32,
    )


def _linear_sig(ft):  # type: ignore[no-untyped-def]
    fp = types.CPointer(ft)
    return types.int32(fp, fp, types.int64, types.int64, types.int32, types.CPointer(types.float64), fp, types.int32)


def _sparse_sig(ft):  # type: ignore[no-untyped-def]
    fp = types.CPointer(ft)
    ip = types.CPointer(types.int64)
    return types.int32(
        fp, ip, types.CPointer(types.float32), types.int64, ip, types.int64, types.int64, types.int32, types.float64,
        types.float64, types.float64, types.float64, types.float64, types.int64, types.int32, types.float64,
        types.int32, types.CPointer(types.float64), fp, types.int32,
    )


def _shard_sig(ft):  # type: ignore[no-untyped-def]
    fp = types.CPointer(ft)
    ip = types.CPointer(types.int64)
    dp = types.CPointer(types.float64)
    return types.int32(
        types.int32, fp, fp, ip, types.int64, types.int64, types.int64, types.int64, types.int32, types.float64,
        types.float64, types.float64, types.float64, types.float64, types.int64, types.int32, dp, ip, dp, fp,
        types.int32,
    )


def _softmax_sig(ft):  # type: ignore[no-untyped-def]
    fp = types.CPointer(ft)
    return types.int32(fp, types.int64, types.int64, types.float64, fp, types.int32)


def _make(ft):  # type: ignore[no-untyped-def]
    """The entry points for one storage type (16-bit floats: their bits, as the kernels read them)."""
    STORAGE = np.int64(_spec.STORAGES.index(STORAGE_OF_TYPE[ft]))

    @cfunc(_response_sig(ft), **CJIT)
    def response(sp, tp, lp, rows, n, kind, tau, hard_w, soft_w, param, smoothing, ignore_index,
                 reduction, lossp, gp, nthreads):  # type: ignore[no-untyped-def]
        status = FD_INTERNAL_ERROR
        try:
            status = _check_response(sp, tp, lp, rows, n, kind, tau, hard_w, soft_w, param, smoothing,
                                     ignore_index, reduction, lossp, gp, nthreads)
        except Exception:  # noqa: BLE001 - nothing may escape a C entry point
            status = FD_INTERNAL_ERROR
        if status != FD_OK:
            return np.int32(status)
        status = FD_INTERNAL_ERROR
        old = thread_count()
        if nthreads > 0:
            _set_num_threads(nthreads)
        try:
            P = _empty_f64(N_PARAMS)
            div = loss_terms(kind, tau, hard_w, soft_w, param, smoothing, P)
            has_labels = _addr(lp) != 0
            want_grad = _addr(gp) != 0
            s = carray(sp, (rows, n))
            t = carray(tp, (rows, n))
            g = carray(gp, (rows, n)) if want_grad else s  # never written without want_grad
            labels = carray(lp, (rows if has_labels else 0,))
            scale = _count_and_scale(lp, rows, ignore_index, reduction)
            out = carray(lossp, (rows,)) if reduction == FD_NONE else _empty_f64(rows)
            idx, two_pass = kernel_variant(div, P, has_labels, STORAGE)
            worker = _worker_for(idx, want_grad and _addr(gp) == _addr(sp)) if (div >= 0 and idx >= 0) else 0
            if worker != 0:
                K.drive(worker, K.batch_layout(s, t, g), labels, has_labels, np.int64(ignore_index), P, scale,
                        want_grad, out, np.int64(thread_count()), two_pass)
            ran = worker != 0
            if ran:
                _reduce(out, rows, reduction, scale, lossp)
                status = FD_OK
        except Exception:  # noqa: BLE001
            status = FD_INTERNAL_ERROR
        if nthreads > 0:
            _set_num_threads(old)
        return np.int32(status)

    def linear(kind):  # type: ignore[no-untyped-def]
        @cfunc(_linear_sig(ft), **CJIT)
        def entry(sp, tp, rows, n, reduction, lossp, gp, nthreads):  # type: ignore[no-untyped-def]
            status = FD_INTERNAL_ERROR
            try:
                status = _check_response(sp, tp, _null_labels(), rows, n, kind, 1.0, 0.0, 1.0, 0.0, 0.0,
                                         np.int64(-100), reduction, lossp, gp, nthreads)
            except Exception:  # noqa: BLE001
                status = FD_INTERNAL_ERROR
            if status != FD_OK:
                return np.int32(status)
            status = FD_INTERNAL_ERROR
            old = thread_count()
            if nthreads > 0:
                _set_num_threads(nthreads)
            try:
                P = _empty_f64(N_PARAMS)
                div = loss_terms(np.int32(kind), 1.0, 0.0, 1.0, 0.0, 0.0, P)
                want_grad = _addr(gp) != 0
                s = carray(sp, (rows, n))
                t = carray(tp, (rows, n))
                g = carray(gp, (rows, n)) if want_grad else s
                labels = carray(_null_labels(), (0,))
                scale = 1.0 / rows if reduction == FD_MEAN else 1.0
                out = carray(lossp, (rows,)) if reduction == FD_NONE else _empty_f64(rows)
                idx, two_pass = kernel_variant(div, P, np.bool_(False), STORAGE)
                worker = _worker_for(idx, want_grad and _addr(gp) == _addr(sp)) if idx >= 0 else 0
                if worker != 0:
                    # np.bool_: a literal False would compile the driver again, for that literal
                    K.drive(worker, K.batch_layout(s, t, g), labels, np.bool_(False), np.int64(-100), P, scale,
                            want_grad, out, np.int64(thread_count()), two_pass)
                    _reduce(out, rows, reduction, scale, lossp)
                    status = FD_OK
            except Exception:  # noqa: BLE001
                status = FD_INTERNAL_ERROR
            if nthreads > 0:
                _set_num_threads(old)
            return np.int32(status)

        return entry

    @cfunc(_sparse_sig(ft), **CJIT)
    def response_sparse(sp, ip, vp, k, lp, rows, n, kind, tau, hard_w, soft_w, param, smoothing, ignore_index,  # type: ignore[no-untyped-def]  # noqa: E501
                        tail, t_gen, reduction, lossp, gp, nthreads):
        status = FD_INTERNAL_ERROR
        try:
            status = _check_sparse(sp, ip, vp, k, lp, rows, n, kind, tau, hard_w, soft_w, param, smoothing,
                                   ignore_index, tail, t_gen, reduction, lossp, gp, nthreads)
        except Exception:  # noqa: BLE001
            status = FD_INTERNAL_ERROR
        if status != FD_OK:
            return np.int32(status)
        status = FD_INTERNAL_ERROR
        old = thread_count()
        if nthreads > 0:
            _set_num_threads(nthreads)
        try:
            P = _empty_f64(N_PARAMS)
            div = loss_terms(kind, tau, hard_w, soft_w, param, smoothing, P)
            has_labels = _addr(lp) != 0
            want_grad = _addr(gp) != 0
            s = carray(sp, (rows, n))
            g = carray(gp, (rows, n)) if want_grad else s  # never written without want_grad
            labels = carray(lp, (rows if has_labels else 0,))
            idx = carray(ip, (rows, k))
            v32 = carray(vp, (rows, k))
            vals = np.empty((rows, k), dtype=np.float64)
            for r in range(rows):
                for b in range(k):
                    vals[r, b] = v32[r, b]
            scale = _count_and_scale(lp, rows, ignore_index, reduction)
            out = carray(lossp, (rows,)) if reduction == FD_NONE else _empty_f64(rows)
            div_kind = div if P[P_DIV_W] != 0.0 else 0
            d, ce, _, _, _ = _variant_fields(div_kind, P[P_HARD_W], has_labels, P[P_TAU], False, STORAGE != _F64_STORAGE)
            S.sparse_response(s, idx, vals, labels, has_labels, np.int64(ignore_index), P, np.int64(d), np.int64(ce),
                              np.int64(tail), want_grad, scale, out, g, np.int64(S.STREAM_BYTES), t_gen,
                              want_grad and _addr(gp) == _addr(sp))
            _reduce(out, rows, reduction, scale, lossp)
            status = FD_OK
        except Exception:  # noqa: BLE001
            status = FD_INTERNAL_ERROR
        if nthreads > 0:
            _set_num_threads(old)
        return np.int32(status)

    @cfunc(_shard_sig(ft), **CJIT)
    def vocab_shard(step, sp, tp, lp, rows, n, offset, classes, kind, tau, hard_w, soft_w, param, smoothing,  # type: ignore[no-untyped-def]  # noqa: E501
                    ignore_index, reduction, wp, qp, lossp, gp, nthreads):
        status = FD_INTERNAL_ERROR
        try:
            status = _check_shard(step, sp, tp, lp, rows, n, offset, classes, kind, tau, hard_w, soft_w, param,
                                  smoothing, ignore_index, reduction, wp, qp, lossp, gp, nthreads)
        except Exception:  # noqa: BLE001
            status = FD_INTERNAL_ERROR
        if status != FD_OK:
            return np.int32(status)
        status = FD_INTERNAL_ERROR
        old = thread_count()
        if nthreads > 0:
            _set_num_threads(nthreads)
        try:
            P = _empty_f64(N_PARAMS)
            div = loss_terms(kind, tau, hard_w, soft_w, param, smoothing, P)
            has_labels = _addr(lp) != 0
            want_grad = _addr(gp) != 0
            s = carray(sp, (rows, n))
            t = carray(tp, (rows, n))
            g = carray(gp, (rows, n)) if want_grad else s  # never written without want_grad
            idx, two_pass = kernel_variant(div, P, has_labels, STORAGE)
            worker = _worker_for(idx, want_grad and _addr(gp) == _addr(sp)) if (div >= 0 and idx >= 0) else 0
            if worker != 0:
                status = _shard_run(worker, two_pass, np.int64(step), K.batch_layout(s, t, g), lp, rows, n, offset,
                                    classes, has_labels, np.int64(ignore_index), P, reduction, want_grad, wp, qp,
                                    lossp)
        except Exception:  # noqa: BLE001
            status = FD_INTERNAL_ERROR
        if nthreads > 0:
            _set_num_threads(old)
        return np.int32(status)

    def softmax(log):  # type: ignore[no-untyped-def]
        kernel = _SOFTMAX_LOG if log else _SOFTMAX

        @cfunc(_softmax_sig(ft), **CJIT)
        def entry(xp, rows, n, tau, outp, nthreads):  # type: ignore[no-untyped-def]
            status = FD_INTERNAL_ERROR
            try:
                status = _check_softmax(xp, rows, n, tau, outp, nthreads)
            except Exception:  # noqa: BLE001
                status = FD_INTERNAL_ERROR
            if status != FD_OK:
                return np.int32(status)
            status = FD_INTERNAL_ERROR
            old = thread_count()
            if nthreads > 0:
                _set_num_threads(nthreads)
            try:
                kernel(carray(xp, (rows, n)), 1.0 / tau, carray(outp, (rows, n)))
                status = FD_OK
            except Exception:  # noqa: BLE001
                status = FD_INTERNAL_ERROR
            if nthreads > 0:
                _set_num_threads(old)
            return np.int32(status)

        return entry

    return {
        "response": response,
        "mse": linear(FD_MSE),
        "cosine": linear(FD_COSINE),
        "softmax": softmax(False),
        "log_softmax": softmax(True),
        "response_sparse": response_sparse,
        "vocab_shard": vocab_shard,
    }


@cfunc(types.int32(), **CJIT)
def abi_version():  # type: ignore[no-untyped-def]
    return np.int32(ABI_VERSION)


# the element type of each precision's pointers (bfloat16 and float16 are both uint16_t in C; the kernels
# tell them apart by their types' signedness, see cpu._math.BF16_BITS)
FLOAT_TYPES = {"f32": types.float32, "f64": types.float64, "f16": types.uint16, "bf16": types.int16}
DTYPES = {"f32": FLOAT32, "f64": FLOAT64, "f16": FLOAT16, "bf16": BFLOAT16}
STORAGE_OF_TYPE = {FLOAT_TYPES[p]: DTYPES[p] for p in FLOAT_TYPES}
CFUNCS = {"fd_abi_version": abi_version}


def build(precision: str, in_place: bool = False) -> None:
    """Compile (or load from the cache) the entry points of one precision (``PRECISIONS``), and the
    workers they call (``in_place``: their in-place workers too)."""
    build_workers(DTYPES[precision], in_place)
    if f"fd_response_{precision}" not in CFUNCS:
        for name, cf in _make(FLOAT_TYPES[precision]).items():
            CFUNCS[f"fd_{name}_{precision}"] = cf

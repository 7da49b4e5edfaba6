"""Branch-free scalar math for the CPU kernels.

``math.exp`` does not vectorize under Numba's LLVM (no SVML in the pip llvmlite), so float32 kernels use
:func:`fexp`: a Cephes-style ``2**n * P(r)`` exponential whose scale ``2**n`` is built from exponent bits,
with selects instead of branches so that loops calling it vectorize. Relative error below 3e-7 on
``[-80, 0]`` (1e-6 near -87, where results approach the subnormal range); it returns exactly 0 below -87.3 (and for ``-inf``), which is how masked classes vanish.
float64 kernels use ``math.exp`` (their accuracy target is 1e-10).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, errors
from numba.extending import intrinsic, overload


# 1.5 * 2**23 + 127: a float32 in [-126, 0] plus this rounds to the nearest integer n, n + 127 in the
# low bits of the sum's mantissa (its ulp is 1)
_ROUND_POW2 = 12583039.0


@intrinsic
def _round_pow2(typingctx, t):  # type: ignore[no-untyped-def]
    """(n, 2**n) for float32 ``t`` in [-126, 0], n the nearest integer (ties to even): one addition of
    ``_ROUND_POW2`` gives both, n by subtracting it again and 2**n by shifting the sum's bits (the
    exponent field then holds n + 127, the rest of the bits shift out): two instructions fewer than a
    ``floor``, a conversion and an addition to the exponent bits. Both float operations carry ``nsz``
    only, no ``reassoc``: under the caller's fast-math flags LLVM would fold ``(t + c) - c`` to ``t``."""
    if t != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        f32 = ir.FloatType()
        i32 = ir.IntType(32)
        c = ir.Constant(f32, _ROUND_POW2)
        s = builder.fadd(args[0], c, flags=("nsz",))
        n = builder.fsub(s, c, flags=("nsz",))
        p = builder.bitcast(builder.shl(builder.bitcast(s, i32), ir.Constant(i32, 23)), f32)
        return context.make_tuple(builder, signature.return_type, (n, p))

    return types.UniTuple(types.float32, 2)(types.float32), codegen


def fexp(x):  # type: ignore[no-untyped-def]  # pragma: no cover - replaced by the overload in jitted code
    """exp(x) for x <= 0, vectorizable (jitted code only)."""
    return math.exp(x)


@overload(fexp, jit_options={"cache": True})
def _fexp_impl(x):  # type: ignore[no-untyped-def]
    if x == types.float32:
        lo = np.float32(-87.3)
        log2e = np.float32(1.4426950408889634)
        c1 = np.float32(0.693359375)
        c2 = np.float32(-2.12194440e-4)
        p0 = np.float32(1.9875691500e-4)
        p1 = np.float32(1.3981999507e-3)
        p2 = np.float32(8.3334519073e-3)
        p3 = np.float32(4.1665795894e-2)
        p4 = np.float32(1.6666665459e-1)
        p5 = np.float32(5.0000001201e-1)
        one = np.float32(1.0)
        zero = np.float32(0.0)

        def impl(x):  # type: ignore[no-untyped-def]
            xc = x if x > lo else lo
            n, p = _round_pow2(xc * log2e)  # the nearest integer, kept in float32, and 2**n
            r = xc - n * c1 - n * c2
            z = r * r
            y = (((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5) * z + r + one
            return y * p if x > lo else zero

        return impl
    if x == types.float64:

        def impl64(x):  # type: ignore[no-untyped-def]
            return math.exp(x)

        return impl64
    return None


def fexp2(t):  # type: ignore[no-untyped-def]  # pragma: no cover - replaced by the overload in jitted code
    """2**t for t <= 0, vectorizable (jitted code only)."""
    return 2.0**t


def fexp2_term(t):  # type: ignore[no-untyped-def]  # pragma: no cover - replaced by the overload in jitted code
    """:func:`fexp2` for a term of a sum that holds a 1 (jitted code only)."""
    return 2.0**t


def _fexp2_overload(zero_below):  # type: ignore[no-untyped-def]
    def fexp2_impl(t):  # type: ignore[no-untyped-def]
        if t == types.float32:
            lo = np.float32(-126.0)
            q1 = np.float32(0.6931471880293425)
            q2 = np.float32(0.24022348940946947)
            q3 = np.float32(0.05550357104252861)
            q4 = np.float32(0.009666373693208972)
            q5 = np.float32(0.0013390867351412105)
            one = np.float32(1.0)
            zero = np.float32(0.0)

            def impl(t):  # type: ignore[no-untyped-def]
                tc = t if t > lo else lo
                n, p = _round_pow2(tc)
                f = tc - n
                y = ((((q5 * f + q4) * f + q3) * f + q2) * f + q1) * f + one
                if zero_below:
                    return y * p if t > lo else zero
                return y * p

            return impl
        if t == types.float64:
            ln2 = math.log(2.0)

            def impl64(t):  # type: ignore[no-untyped-def]
                return math.exp(t * ln2)

            return impl64
        return None

    return fexp2_impl


# float32: ``2**n * P(t - n)``, n the nearest integer, P a degree-5 fit of ``2**f`` on [-1/2, 1/2] (relative
# error 2.1e-7 before rounding). A third fewer instructions than ``fexp`` for a caller that folds
# ``log2(e)`` into a factor it multiplies by anyway. The argument's own rounding makes
# ``fexp2(x * log2(e))`` less exact than ``fexp(x)`` where ``x`` is large and negative (1e-6 relative at
# x = -20): for terms below 1 of sums, and gradients. ``fexp2`` returns exactly 0 at -126 and below
# (``-inf`` and NaN included); ``fexp2_term`` returns at most 2**-126 there (NaN: a number too), one
# select fewer (a fifth of a sum's time): for the terms of a sum that holds a 1, which they cannot move.
overload(fexp2, jit_options={"cache": True})(_fexp2_overload(True))
overload(fexp2_term, jit_options={"cache": True})(_fexp2_overload(False))


def masked(w, v):  # type: ignore[no-untyped-def]  # pragma: no cover - replaced by the overload in jitted code
    """``w * v`` where the weight ``w`` is positive, 0 where it is 0 (so 0 * inf is 0, not NaN)."""
    return w * v if w > 0 else 0.0 * w


@overload(masked, jit_options={"cache": True})
def _masked_impl(w, v):  # type: ignore[no-untyped-def]
    if not isinstance(w, types.Float):
        return None
    zero = np.float32(0.0) if w == types.float32 else 0.0  # a constant: ``w * 0`` kept loops from vectorizing

    def impl(w, v):  # type: ignore[no-untyped-def]
        return w * v if w > 0 else zero

    return impl


# ---------------------------------------------------------------- maxima through integer keys
# LLVM vectorizes integer max reductions but not float ``a if a > m else m`` ones (those need the nnan
# flag, which would also fold NaN checks away). A float's bits, with the magnitude bits flipped for
# negative numbers, are an integer key with the float's order: max over keys is max over floats.


def _key_types(x):  # type: ignore[no-untyped-def]
    if x == types.float32:
        return ir.FloatType(), ir.IntType(32), types.int32
    if x == types.float64:
        return ir.DoubleType(), ir.IntType(64), types.int64
    return None


def _magnitude_mask(ity):  # type: ignore[no-untyped-def]
    """``0x7f..f``: every bit of an ``ity``-wide float but the sign."""
    return ir.Constant(ity, (1 << (ity.width - 1)) - 1)


def _flip(builder, bits, ity):  # type: ignore[no-untyped-def]
    """``bits ^ ((bits >> (w-1)) & 0x7f..f)``: the ordered key of a float's bits (its own inverse)."""
    sign = builder.ashr(bits, ir.Constant(ity, ity.width - 1))
    return builder.xor(bits, builder.and_(sign, _magnitude_mask(ity)))


def _int_of_float(op, doc):  # type: ignore[no-untyped-def]
    """An intrinsic ``f(x)``: ``op(builder, bits of x, int type)`` for a float32/float64 ``x``."""

    @intrinsic
    def fn(typingctx, x):  # type: ignore[no-untyped-def]
        kt = _key_types(x)
        if kt is None:
            return None
        _, ity, nty = kt

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return op(builder, builder.bitcast(args[0], ity), ity)

        return nty(x), codegen

    fn.__doc__ = doc
    return fn


def _abs(builder, bits, ity):  # type: ignore[no-untyped-def]
    return builder.and_(bits, _magnitude_mask(ity))


okey = _int_of_float(_flip, "Ordered integer key of a float (int32 for float32, int64 for float64).")
abs_bits = _int_of_float(_abs, "The bits of ``|x|`` as an integer: above those of ``inf`` exactly when ``x`` is NaN.")


@intrinsic
def from_okey(typingctx, k, like):  # type: ignore[no-untyped-def]
    """The float (of ``like``'s type) whose ordered key is ``k``."""
    kt = _key_types(like)
    if kt is None:
        return None
    fty, ity, nty = kt
    if k != nty:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(_flip(builder, args[0], ity), fty)

    return like(k, like), codegen


# ---------------------------------------------------------------- vector width
# LLVM tunes recent Intel cores (Ice Lake and later) to prefer 256-bit vectors even where AVX-512 is
# there; the exponential loops run 15-20% faster with 512-bit ones (measured on a Sapphire-Rapids-class
# Xeon). The preference is a per-function attribute, so it is set on the kernels' own functions only
# (numba's process-wide CPU features stay as they are); without AVX-512 it changes nothing.
_WIDE = '"prefer-vector-width"="512"'


@intrinsic
def wide_vectors(typingctx):  # type: ignore[no-untyped-def]
    """Mark the function this is lowered into (after numba's inlining: the loop's own function) to
    vectorize with 512-bit registers where the CPU has them."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        # a string attribute: llvmlite's attribute set only takes its known keywords, so add it as is
        set.add(builder.function.attributes, _WIDE)
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def constant(typingctx, x):  # type: ignore[no-untyped-def]
    """The value of a compile-time argument, as a constant of the generated code.

    A function that calls ``div = constant(DIV)`` on one of its own arguments is compiled once per
    value of that argument: a non-literal ``DIV`` raises Numba's ``ForceLiteralArg``, which Numba answers
    by compiling the function again with ``DIV`` typed as ``Literal[int](value)``, and it asks the same of
    the caller when the caller passed one of its own arguments (so a constant travels down a call chain
    from the kernel that holds it). ``div`` is then the value itself in the LLVM IR: every branch on it
    folds away, in every loop (a literal *argument* alone still arrives at run time, and Numba prunes only
    the branches it can read as ``arg == constant``).
    """
    if not isinstance(x, types.Literal):
        raise errors.ForceLiteralArg({0})
    value = x.literal_value

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return context.get_constant(signature.return_type, value)

    return types.unliteral(x)(x), codegen


@intrinsic
def inline_into_callers(typingctx):  # type: ignore[no-untyped-def]
    """Mark the function this is lowered into ``alwaysinline`` for LLVM: a small helper called in a hot
    loop is compiled once by Numba and then inlined by LLVM into each caller (Numba's own
    ``inline="always"`` re-runs its pipeline on every inlined body and costs seconds per kernel; LLVM's
    inliner alone skips helpers whose vectorized loops exceed its size threshold, and the call, with
    the reference counting of its array arguments, then costs more than the loop)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        builder.function.attributes.add("alwaysinline")
        return context.get_dummy_value()

    return types.none(), codegen


# ---------------------------------------------------------------- raw addresses


@intrinsic
def keep_alive(typingctx, a):  # type: ignore[no-untyped-def]
    """Nothing, at this point of the code: an array whose address went to code Numba cannot see (a
    worker called through a pointer) is otherwise freed after its last visible use, which may come
    before that code runs."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return context.get_dummy_value()

    return types.none(a), codegen


# ---------------------------------------------------------------- borrowed row views


@intrinsic
def borrowed(typingctx, a, r, lo, hi):  # type: ignore[no-untyped-def]
    """Columns ``[lo, hi)`` of row ``r`` of a C-contiguous 2-D array, as a 1-D array that borrows ``a``'s
    memory: like ``a[r, lo:hi]``, without a reference on ``a``'s memory. Every Numba view takes one (an
    atomic increment, and a decrement when it dies), and the threads of a kernel all take theirs on the
    same counter, once per row and pass: a few tens of nanoseconds per row, a tenth of a 1000-class
    row's work. The view must not outlive the call that owns ``a`` (it never leaves the kernels).
    No bounds check."""
    if not (isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C"):
        return None
    if not all(isinstance(x, types.Integer) for x in (r, lo, hi)):
        return None
    rowty = a.copy(ndim=1, layout="C")

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, value=args[0])
        r_, lo_, hi_ = (context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], signature.args[1:]))
        shape = cgutils.unpack_tuple(builder, ary.shape)
        strides = cgutils.unpack_tuple(builder, ary.strides)
        start = builder.add(builder.mul(r_, shape[1]), lo_)
        out = context.make_array(rowty)(context, builder)
        context.populate_array(out, data=builder.gep(ary.data, [start]), shape=[builder.sub(hi_, lo_)],
                               strides=[strides[1]], itemsize=ary.itemsize, meminfo=None)
        return out._getvalue()

    return rowty(a, r, lo, hi), codegen


# ---------------------------------------------------------------- prefetch


@intrinsic
def prefetch(typingctx, arr, j):  # type: ignore[no-untyped-def]
    """Hint the cache line of ``arr``'s element ``j`` into the core's L2, for reading. No bounds check:
    ``j`` may lie past the end of a row view, in the next row of its matrix or past the matrix; a prefetch
    never faults and never changes a result."""
    if not isinstance(arr, types.Array) or not isinstance(j, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(signature.args[0])(context, builder, value=args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        addr = builder.bitcast(builder.gep(ary.data, [idx]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [addr.type, i32, i32, i32])
        call = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # (address, read, locality 2: L2 and outward, data cache)
        builder.call(call, [addr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arr, j), codegen


@intrinsic
def stream_line(typingctx, dst, j, src, i):  # type: ignore[no-untyped-def]
    """Store the 64 bytes of ``src`` from element ``i`` on at element ``j`` of ``dst`` (the same dtype), as
    one non-temporal store: the line goes to memory without being read into the cache first (an
    ordinary store reads every line it writes: a third of a large gradient's memory traffic) and without
    evicting what is there. ``dst``'s element ``j`` must start a 64-byte line; no bounds check. The
    stores are weakly ordered: :func:`store_fence` before another thread may read them."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == src.dtype):
        return None
    if not (isinstance(j, types.Integer) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        d = context.make_array(signature.args[0])(context, builder, value=args[0])
        s = context.make_array(signature.args[2])(context, builder, value=args[2])
        elem = context.get_data_type(signature.args[0].dtype)
        vt = ir.VectorType(elem, 64 // context.get_abi_sizeof(elem))
        jj = context.cast(builder, args[1], signature.args[1], types.intp)
        ii = context.cast(builder, args[3], signature.args[3], types.intp)
        v = builder.load(builder.bitcast(builder.gep(s.data, [ii]), vt.as_pointer()), align=1)
        st = builder.store(v, builder.bitcast(builder.gep(d.data, [jj]), vt.as_pointer()), align=64)
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.none(dst, j, src, i), codegen


@intrinsic
def store_fence(typingctx):  # type: ignore[no-untyped-def]
    """A full memory fence: orders the thread's non-temporal stores before what follows (x86: ``mfence``)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def thread_count(typingctx):  # type: ignore[no-untyped-def]
    """The calling thread's numba thread count (the threading layer's ``get_num_threads``, by symbol:
    ``numba.get_num_threads`` in jitted code reads a ctypes pointer, which keeps a kernel from the
    on-disk cache). Thread ids (``numba.get_thread_id``) lie below it."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fnty = ir.FunctionType(cgutils.intp_t, [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "get_num_threads")
        return builder.call(fn, [])

    return types.intp(), codegen


# ---------------------------------------------------------------- 16-bit storage
# Numba's CPU target has no 16-bit float type, so half-precision logits reach the kernels as their bits:
# bfloat16 as int16 arrays, float16 as uint16 arrays (the two integer types keep the two formats apart
# at compile time; neither is ever a genuine integer input of a kernel). Values are converted to
# float32 in registers on load (vectorized: a shift, or the F16C/NEON conversion) and rounded once, to
# nearest even, on store.
BF16_BITS = np.int16
F16_BITS = np.uint16


@intrinsic
def bf16_to_f32(typingctx, x):  # type: ignore[no-untyped-def]
    """The float32 value of bfloat16 bits (its top half: exact)."""
    if x != types.int16:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i32 = ir.IntType(32)
        v = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def f32_to_bf16(typingctx, x):  # type: ignore[no-untyped-def]
    """bfloat16 bits of a float32, rounded to nearest even (NaN stays a quiet NaN, infinities stay)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i32 = ir.IntType(32)
        b = builder.bitcast(args[0], i32)
        odd = builder.and_(builder.lshr(b, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = builder.add(b, builder.add(odd, ir.Constant(i32, 0x7FFF)))
        nan = builder.fcmp_unordered("uno", args[0], args[0])
        bits = builder.select(nan, builder.or_(b, ir.Constant(i32, 0x00400000)), rounded)
        return builder.trunc(builder.lshr(bits, ir.Constant(i32, 16)), ir.IntType(16))

    return types.int16(x), codegen


@intrinsic
def f16_to_f32(typingctx, x):  # type: ignore[no-untyped-def]
    """The float32 value of float16 bits (exact)."""
    if x != types.uint16:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def f32_to_f16(typingctx, x):  # type: ignore[no-untyped-def]
    """float16 bits of a float32, rounded to nearest even (overflow to infinity, as IEEE 754 does)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(x), codegen

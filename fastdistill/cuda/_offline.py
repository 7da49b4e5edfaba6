"""Every CUDA kernel variant compiled for a chosen GPU architecture, on a machine without a GPU.

The CUDA simulator runs the kernels as Python, so it cannot see typing or lowering errors, register
caps or spills. This module compiles each variant the launchers can ask for the way numba-cuda does on
a GPU (NVVM to PTX, then ptxas through nvJitLink with the variant's register cap) and reads ptxas'
report: registers, spill bytes, stack, shared memory.

Needs NVVM and NVRTC (``pip install nvidia-nvvm nvidia-cuda-nvrtc``; numba-cuda's ``cu13`` extra has
them) and nvJitLink for the cubin step (``nvidia-nvjitlink``). Run it in a process of its own, with the
simulator off: when no GPU is present the device functions are compiled for a stand-in device of the
chosen compute capability, and numba keeps them cached in the process.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, NamedTuple

from .._spec import (
    BFLOAT16,
    CE_NAMES,
    CE_OWN,
    DIV_FORWARD_KL,
    DIV_MIXTURE,
    DIV_NAMES,
    FLOAT32,
    FLOAT64,
    STORAGES,
    reachable,
)


class Compilation(NamedTuple):
    """One kernel and signature to compile offline (not a ``_spec.Variant``: the softmax, sparse, top-k,
    shard and reduction kernels are here too), with the register cap it is launched with."""

    name: str
    kernel: Any  # the numba-cuda dispatcher
    sig: tuple
    max_registers: int | None


class Resources(NamedTuple):
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int


# the mixed storages (a float32 teacher beside a half-precision student, a float32 gradient, ...) are
# compiled here for one kernel, the one they run most (the kernels read every storage through the same
# ``load``/``stored``); their other kernels compile on a GPU's first call
MIXED_KEY = (DIV_FORWARD_KL, CE_OWN, False, True)


def kernel_keys() -> list[tuple[int, int, bool, bool, tuple[str, str, str]]]:
    """``(div, ce, lin, float32 arithmetic, (student, teacher, gradient) storage)`` of the response kernels
    compiled here: those of the variants of :func:`fastdistill._spec.reachable` (the CUDA kernels have no
    power trick) whose three storages are one, and :data:`MIXED_KEY` for each mixed storage."""
    keys = dict.fromkeys((v.div, v.ce, v.lin, v.math == FLOAT32, v.storage()) for v in reachable()
                         if not (v.teacher or v.grad) or (v.div, v.ce, v.lin, v.math == FLOAT32) == MIXED_KEY)
    return list(keys)


def response_signature(storage: tuple[str, str, str]) -> tuple:
    """The argument types :func:`fastdistill.cuda.response` launches a response kernel with, for student,
    teacher and gradient of ``storage`` (labels int64, parameters, info and row losses float64)."""
    from numba.cuda import types as T
    from numba.cuda.np.numpy_support import from_dtype

    from ._device import DEVICE_DTYPES

    st, tt, gt = (from_dtype(DEVICE_DTYPES[x]) for x in storage)

    def arr(t: Any, nd: int = 1) -> Any:
        return T.Array(t, nd, "C")

    return (arr(st, 2), arr(tt, 2), arr(T.int64), T.boolean, T.int64, arr(T.float64), arr(T.float64), T.boolean,
            T.float64, T.boolean, arr(T.float64), arr(gt, 2), T.int64, T.boolean)


def variants(fused_all: bool = False) -> list[Compilation]:
    """Every kernel the launchers can ask for, with the argument types they pass.

    Response kernels: every key of :func:`kernel_keys`, lean (large batches); the fused ones (small
    batches) for the keys with their own cross-entropy normaliser and no linear term (their prologue and
    epilogue do not depend on the terms), or for every key with ``fused_all``. Then softmax, the label
    count, the final sum, the dtype conversion, and the sparse-teacher and top-k kernels of every storage.
    """
    from numba.cuda import types as T

    from . import _kernels as K
    from . import _sparse as S

    def arr(t: Any, nd: int = 1) -> Any:
        return T.Array(t, nd, "C")

    out = []
    for fused in (False, True):
        for div, ce, lin, f32, storage in kernel_keys():
            if fused and not fused_all and (ce != CE_OWN or lin):
                continue
            k = K.response_kernel(div, ce, lin, f32, fused)
            cap = K.response_options(div, f32).get("max_registers")
            arith = "float32" if f32 else "float64"
            s_st, t_st, g_st = storage
            store = s_st if s_st == t_st == g_st else f"{s_st} (teacher {t_st}, gradient {g_st})"
            math = "" if arith == s_st else f" ({arith} math)"
            name = (f"response {DIV_NAMES[div]}, {CE_NAMES[ce]}{', mse/cos' if lin else ''}, {store}{math}"
                    f"{', fused' if fused else ''}")
            out.append(Compilation(name, k, response_signature(storage), cap))
    from numba.cuda.np.numpy_support import from_dtype

    from ._device import DEVICE_DTYPES

    for log in (False, True):
        for storage in STORAGES:
            ft = from_dtype(DEVICE_DTYPES[storage])
            out.append(Compilation(f"{'log_' if log else ''}softmax {storage}", K.softmax_kernel(log, storage != FLOAT64),
                               (arr(ft, 2), T.float64, arr(ft, 2), T.int64), None))
    for storage in STORAGES:  # sparse (top-k) teachers: float32 arithmetic but for float64 logits
        st = from_dtype(DEVICE_DTYPES[storage])
        sig = (arr(st, 2), arr(T.int64, 2), arr(T.float64, 2), arr(T.int64), T.boolean, T.int64, arr(T.float64),
               T.int64, T.int64, T.int64, T.float64, arr(T.float64), T.boolean, T.float64, T.boolean, arr(T.float64),
               arr(st, 2), arr(T.float64, 2), arr(T.int64, 2), T.int64)
        out.append(Compilation(f"sparse {storage}", S.sparse_kernel(storage != FLOAT64), sig, 128))
        out.append(Compilation(f"top_k {storage}", S.top_k_kernel(storage != FLOAT64),
                           (arr(st, 2), T.int64, T.float64, T.float64, T.int64, arr(T.int64, 2), arr(T.float64, 2),
                            T.int64), None))
    # vocabulary shards: the variants a tensor-parallel LLM run uses most (the others compile on a GPU's
    # first call; they share every device function with the response kernels compiled above)
    for div, ce, storage in ((DIV_FORWARD_KL, CE_OWN, FLOAT32), (DIV_FORWARD_KL, CE_OWN, BFLOAT16),
                             (DIV_MIXTURE, CE_OWN, FLOAT32)):
        st = from_dtype(DEVICE_DTYPES[storage])
        f64 = arr(T.float64, 2)
        sig = (arr(st, 2), arr(st, 2), arr(T.int64), T.boolean, arr(T.float64), T.int64, T.float64, T.int64,
               T.boolean, f64, f64, f64, f64, arr(T.float64), arr(st, 2), T.int64)
        out.append(Compilation(f"vocab shard {DIV_NAMES[div]}, {CE_NAMES[ce]}, {storage}",
                           K.shard_kernel(div, ce, False, True), sig, K.response_options(div, True).get("max_registers")))
    out.append(Compilation("vocab shard rescale", K.shard_rescale_kernel,
                       (arr(T.float64, 2), arr(T.float64, 2), arr(T.float64, 2), T.int64, T.int64, T.float64), None))
    out.append(Compilation("labels int64", K.label_kernel, (arr(T.int64), T.int64, T.int64, arr(T.float64)), None))
    out.append(Compilation("final sum", K.sum_kernel, (arr(T.float64), T.boolean, T.boolean, T.float64, arr(T.float64)),
                       None))
    out.append(Compilation("cast float64 -> float32", K.cast_kernel, (arr(T.float64), arr(T.float32)), None))
    return out


@contextlib.contextmanager
def stand_in_device(cc: tuple[int, int]) -> Iterator[None]:
    """numba-cuda asks the current device for its compute capability when it compiles a device
    function; without a GPU, answer ``cc`` for the duration."""
    from numba import cuda
    from numba.cuda import dispatcher

    if cuda.is_available():
        yield
        return

    class _Device:
        compute_capability = cc

    saved = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: _Device()  # type: ignore[assignment]
    try:
        yield
    finally:
        dispatcher.get_current_device = saved  # type: ignore[assignment]


def ptx(v: Compilation, cc: tuple[int, int]) -> str:
    """The PTX numba-cuda generates for ``v`` on a device of compute capability ``cc``."""
    from numba import cuda

    with stand_in_device(cc):
        code, _ = cuda.compile_ptx(v.kernel.py_func, v.sig, cc=cc)
    return code


_NUM = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def assemble(code: str, cc: tuple[int, int], max_registers: int | None) -> Resources:
    """ptxas (through nvJitLink) on ``code`` for ``sm_<cc>`` under the register cap; its report."""
    from cuda.core import Linker, LinkerOptions, ObjectCode

    opts = LinkerOptions(arch=f"sm_{cc[0]}{cc[1]}", max_register_count=max_registers, verbose=True)
    linker = Linker(ObjectCode.from_ptx(code.encode()), options=opts)
    linker.link("cubin")
    log = linker.get_info_log() or ""
    vals = {}
    for key, rx in _NUM.items():
        m = rx.search(log)
        if m is None:
            raise RuntimeError(f"ptxas reported no {key}: {log!r}")
        vals[key] = int(m.group(1))
    return Resources(**vals)


def toolchain_missing() -> str | None:
    """Why kernels cannot be compiled here (None when they can)."""
    from numba import cuda

    def probe(a):  # type: ignore[no-untyped-def]
        a[0] = 1.0

    try:
        from numba.cuda import types as T

        code, _ = cuda.compile_ptx(probe, (T.Array(T.float32, 1, "C"),), cc=(9, 0))
        from cuda.core import Linker  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure: the toolchain is not usable
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Compile every variant; print a Markdown table (or JSON lines). Exit 3 when no toolchain is found."""
    import argparse
    import json
    import time

    ap = argparse.ArgumentParser(description="Compile every fastdistill CUDA kernel variant without a GPU "
                                 "and report ptxas' resource use.")
    ap.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0 (H100/H200), 8.0 (A100)")
    ap.add_argument("--json", action="store_true", help="one JSON object per variant instead of a table")
    ap.add_argument("--fused-all", action="store_true", help="the fused kernel of every variant (default: of "
                    "the variants with their own cross-entropy normaliser and no linear term)")
    ap.add_argument("--no-assemble", action="store_true", help="PTX only (no nvJitLink needed)")
    ap.add_argument("--shard", default="0/1", help="K/N: compile every N-th variant from the K-th (processes "
                    "that compile the table side by side)")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT", help="only the kernels whose name "
                    "contains TEXT (repeatable: any of them), e.g. --only mixture --only sparse")
    args = ap.parse_args(argv)
    cc = tuple(int(x) for x in args.cc.split("."))
    why = toolchain_missing()
    if why is not None:
        print(f"cannot compile CUDA kernels here: {why}")
        return 3
    t0 = time.time()
    if not args.json:
        print(f"| kernel (sm_{cc[0]}{cc[1]}) | registers (cap) | spill stores / loads, bytes | stack bytes "
              "| smem bytes |")
        print("|---|---|---|---|---|")
    k, n = (int(x) for x in args.shard.split("/"))
    chosen = [v for v in variants(args.fused_all) if not args.only or any(x in v.name for x in args.only)]
    for v in chosen[k::n]:
        code = ptx(v, cc)  # type: ignore[arg-type]
        r = None if args.no_assemble else assemble(code, cc, v.max_registers)  # type: ignore[arg-type]
        if args.json:
            print(json.dumps({"name": v.name, "cap": v.max_registers, "ptx_target": f"sm_{cc[0]}{cc[1]}"
                              if f".target sm_{cc[0]}{cc[1]}" in code else None,
                              "resources": r._asdict() if r else None}), flush=True)
        elif r is not None:
            cap = v.max_registers if v.max_registers else "-"
            print(f"| {v.name} | {r.registers} ({cap}) | {r.spill_stores} / {r.spill_loads} | {r.stack} | {r.smem} |",
                  flush=True)
        else:
            print(f"| {v.name} | PTX only | | | |", flush=True)
    if not args.json:
        print(f"\ncompiled in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

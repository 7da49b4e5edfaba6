"""The C ABI's gradient written over the student (``grad == student``) beside a separate gradient buffer,
before and after the in-place workers are built (``fastdistill.capi.symbols(in_place=True)``), in one
process: best of ``--repeat`` calls of ``fd_response_<precision>`` through ctypes.

    python bench/capi_in_place.py [--rows 1024] [--classes 32000] [--precision f32] [--repeat 7]

Without the in-place workers an in-place call runs the vector loops' scalar fallback (their run-time
overlap check fails when the two pointers are equal); with them it runs the loops as a fresh buffer does.
The gradient bits of the three calls are compared.
"""
from __future__ import annotations

import argparse
import ctypes
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--precision", choices=("f32", "f64", "f16", "bf16"), default="f32")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    from fastdistill import capi

    dtype = {"f32": np.float32, "f64": np.float64, "f16": np.float16}.get(args.precision)
    if dtype is None:
        import ml_dtypes

        dtype = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    s = (rng.normal(size=(args.rows, args.classes)) * 3).astype(dtype)
    t = (rng.normal(size=(args.rows, args.classes)) * 3).astype(dtype)
    y = rng.integers(0, args.classes, args.rows).astype(np.int64)
    addr = capi.symbols(args.precision)[f"fd_response_{args.precision}"]
    vp, i32, i64, dbl = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_double
    fn = ctypes.CFUNCTYPE(i32, vp, vp, vp, i64, i64, i32, dbl, dbl, dbl, dbl, dbl, i64, i32, vp, vp, i32)(addr)

    def call(student: np.ndarray, grad: np.ndarray) -> float:
        loss = np.zeros(1)
        st = fn(student.ctypes.data, t.ctypes.data, y.ctypes.data, args.rows, args.classes, capi.FD_KL, 2.0, 0.5,
                0.5, 0.0, 0.0, -100, capi.FD_MEAN, loss.ctypes.data, grad.ctypes.data, 0)
        assert st == capi.FD_OK, capi.status_message(st)
        return float(loss[0])

    separate = np.zeros_like(s)  # one buffer, its pages touched: what is timed is the kernel, not page faults

    def best(in_place: bool) -> tuple[float, np.ndarray, float]:
        times = []
        for _ in range(args.repeat):
            work = s.copy()
            grad = work if in_place else separate
            t0 = time.perf_counter()
            loss = call(work, grad)
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3, grad, loss

    fresh_ms, g_fresh, loss = best(False)
    g_fresh = g_fresh.copy()
    before_ms, g_before, loss_before = best(True)
    capi.symbols(args.precision, in_place=True)
    after_ms, g_after, loss_after = best(True)
    fresh2_ms, _, _ = best(False)
    fresh_ms = min(fresh_ms, fresh2_ms)
    same = (g_fresh.view(np.uint8) == g_after.view(np.uint8)).all() and loss == loss_after
    print(f"fd_response_{args.precision} {args.rows}x{args.classes}, 0.5 CE + 0.5 KL, tau = 2, best of {args.repeat}:")
    print(f"  separate gradient buffer           {fresh_ms:8.1f} ms")
    print(f"  grad == student, no in-place worker {before_ms:8.1f} ms  ({before_ms / fresh_ms:.2f}x)"
          f"  same bits: {bool((g_fresh.view(np.uint8) == g_before.view(np.uint8)).all() and loss == loss_before)}")
    print(f"  grad == student, in-place worker    {after_ms:8.1f} ms  ({after_ms / fresh_ms:.2f}x)  same bits: {bool(same)}")


if __name__ == "__main__":
    main()

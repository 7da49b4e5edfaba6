"""``fastdistill bench``: time the CPU kernels side by side with NumPy, PyTorch and memory floors.

What is measured, per shape ``rows x classes`` (random logits stored as ``--dtype``: float32 by default,
or bfloat16/float16; ~10% of the rows carry ``ignore_index``):

* ``forward``: the response loss ``0.5*CE + 0.5*tau^2*KL`` (tau = 4, reduction ``"mean"``) only, i.e.
  ``ResponseDistiller(DistilLoss.kl_divergence(4.0), 0.5, 0.5).loss(s, t, y)``;
* ``forward+grad``: the same loss and its gradient into a preallocated buffer, as a training loop does
  (``.loss_and_grad(s, t, y, grad_out=g)``);
* ``grad in place`` (beside ``forward+grad``, fastdistill only): the same, the gradient written over
  the student (``grad_out=s``, as the fused linear head does with each chunk's logits; on a working
  copy that holds the previous call's gradient: the kernels' loops are branch-free, their time does not
  depend on the values), timed next to ``forward+grad`` again and checked bitwise against it;
* ``softmax``: ``fastdistill.softmax(s)``.

Baselines in the same process: a plain float32 NumPy implementation of the same math, PyTorch eager on
the CPU (``F.cross_entropy`` + ``F.kl_div(..., log_target=True, reduction="batchmean") * tau**2``, with
``.backward()`` for the gradient), and two memory floors, Numba parallel kernels that only stream the
operation's inputs once (*read floor*) or stream them and write one array (*read+write floor*), in the
logits' own width. With a 16-bit ``--dtype``, fastdistill on the same values in float32 is timed too
(``vs float32``), the NumPy baseline computes in float32 from an upcast copy, and PyTorch on tensors of
that dtype. A time is the median over repeats after a warm-up call; the repeat count adapts to the
call's cost.

The module imports nothing heavy at import time: NumPy, Numba and PyTorch are imported inside functions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

DEFAULT_SHAPES = ((16384, 1000), (1024, 32000), (256, 128256), (1, 262144), (64, 1000))
QUICK_SHAPES = ((256, 100), (8, 4096), (1, 40000))
DEFAULT_SCALING = (1, 262144)
QUICK_SCALING = (1, 40000)

OPS = ("forward", "forward+grad", "softmax")
INPLACE = "grad in place"  # (fastdistill_call's op of forward+grad with grad_out = the student)
DTYPES = ("float32", "bfloat16", "float16")
# fastdistill against the float32 NumPy baseline: the gradient's rounding to the logits' format, relative
# to the largest gradient element
GRAD_TOL = {"float32": 1e-3, "bfloat16": 1e-2, "float16": 2e-3}
IMPLS = ("fastdistill", "numpy", "torch")
FLOORS = ("floor_read", "floor_rw")
TAU = 4.0
HARD_W = 0.5
SOFT_W = 0.5
IGNORE_INDEX = -100
IGNORE_FRACTION = 0.1
SEED = 0

# (warm-up calls, seconds of timed calls per measurement, min samples, max samples)
TIMING_DEFAULT = (1, 0.6, 3, 30)
TIMING_QUICK = (1, 0.02, 2, 5)
MIN_SAMPLE_S = 2e-3  # very fast calls are repeated inside one sample so that a sample lasts this long


# ---------------------------------------------------------------- machine facts


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or what :mod:`platform` knows elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the OS does not report one)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def torch_module() -> Any:
    """``torch`` when importable, else ``None``."""
    try:
        import torch
    except Exception:  # ImportError, or a broken install
        return None
    return torch


def parse_shape(text: str) -> tuple[int, int]:
    """``"16384x1000"`` -> ``(16384, 1000)``."""
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"a shape is ROWSxCLASSES such as 16384x1000, got {text!r}")
    rows, cols = int(parts[0]), int(parts[1])
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"a shape needs at least one row and one class, got {text!r}")
    return rows, cols


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"16384x1000,64x1000"`` -> a list of shapes."""
    shapes = [parse_shape(p) for p in text.split(",") if p.strip()]
    if not shapes:
        raise argparse.ArgumentTypeError("--shapes needs at least one ROWSxCLASSES shape")
    return shapes


def shape_name(shape: Sequence[int]) -> str:
    return f"{shape[0]}x{shape[1]}"


# ---------------------------------------------------------------- inputs


def numpy_dtype(name: str) -> Any:
    """The NumPy dtype of ``name`` (bfloat16: ``ml_dtypes``', which NumPy lacks)."""
    import numpy as np

    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as exc:
            raise SystemExit("fastdistill bench: --dtype bfloat16 needs ml_dtypes (pip install ml_dtypes)") from exc
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class Case:
    """The inputs of one shape: student/teacher logits (``dtype``), labels with ~10% ignored rows, output
    buffers; for a 16-bit ``dtype`` also the same values in float32 (``student32``, ``teacher32``)."""

    def __init__(self, shape: tuple[int, int], seed: int = SEED, dtype: str = "float32") -> None:
        import numpy as np

        rows, cols = shape
        rng = np.random.default_rng([seed, rows, cols])
        self.shape = (rows, cols)
        self.student = rng.standard_normal((rows, cols), dtype=np.float32)
        self.student *= np.float32(2.0)
        self.teacher = rng.standard_normal((rows, cols), dtype=np.float32)
        self.teacher *= np.float32(1.5)
        self.teacher += self.student  # a teacher that agrees somewhat with the student
        labels = rng.integers(0, cols, size=rows, dtype=np.int64)
        n_ignored = int(round(IGNORE_FRACTION * rows))  # 0 for a single row: the row always counts
        if n_ignored:
            labels[rng.choice(rows, size=n_ignored, replace=False)] = IGNORE_INDEX
        self.labels = labels
        self.dtype = dtype
        self.student32 = self.teacher32 = self.grad32 = None
        if dtype != "float32":
            dt = numpy_dtype(dtype)
            self.student32 = self.student.astype(dt).astype(np.float32)  # the 16-bit values, in float32
            self.teacher32 = self.teacher.astype(dt).astype(np.float32)
            self.grad32 = np.empty_like(self.student32)
            self.student = self.student.astype(dt)
            self.teacher = self.teacher.astype(dt)
        self.grad = np.empty_like(self.student)  # the preallocated gradient buffer (grad_out)
        self.work = self.student.copy()  # the student overwritten by its gradient (grad in place)
        self.work32 = self.student32.copy() if self.student32 is not None else None
        self.out = np.empty_like(self.student)  # the floors' write target
        self.partial = np.empty(0, dtype=np.float32)

    def as_float32(self) -> tuple[Any, Any]:
        """Student and teacher in float32 (the same values)."""
        if self.student32 is not None:
            return self.student32, self.teacher32
        return self.student, self.teacher

    def bits(self, a: Any) -> Any:
        """``a`` as raw 16-bit integers for a 16-bit dtype (what the floors stream), else ``a``."""
        import numpy as np

        return a.view(np.uint16) if self.dtype != "float32" else a

    @property
    def nbytes(self) -> int:
        return int(self.student.nbytes)


# ---------------------------------------------------------------- implementations


def numpy_log_softmax(x: Any) -> Any:
    """Row-wise log-softmax, float32, max-subtracted."""
    import numpy as np

    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def numpy_response(s: Any, t: Any, labels: Any, want_grad: bool, grad_out: Any = None,
                   tau: float = TAU, hard_w: float = HARD_W, soft_w: float = SOFT_W,
                   ignore_index: int = IGNORE_INDEX) -> tuple[float, Any]:
    """The benchmark loss in plain float32 NumPy: ``(mean loss, gradient or None)``.

    Per row ``hard_w*CE(s, y) + soft_w*tau^2*KL(softmax(t/tau) || softmax(s/tau))``; rows labelled
    ``ignore_index`` count nowhere; the mean is over counted rows.
    """
    import numpy as np

    rows = s.shape[0]
    counted = labels != ignore_index
    n = int(np.count_nonzero(counted))
    scale = np.float32(1.0 / n) if n else np.float32(0.0)
    y = np.where(counted, labels, 0)
    r = np.arange(rows)
    inv = np.float32(1.0 / tau)
    log_p1 = numpy_log_softmax(s)  # CE at temperature 1
    log_q = numpy_log_softmax(s * inv)
    log_p = numpy_log_softmax(t * inv)
    p = np.exp(log_p)
    ce = -log_p1[r, y]
    kl = (p * (log_p - log_q)).sum(axis=1) * np.float32(tau * tau)
    row = np.float32(hard_w) * ce + np.float32(soft_w) * kl
    loss = float(row[counted].sum(dtype=np.float64)) * float(scale)
    if not want_grad:
        return loss, None
    g = grad_out if grad_out is not None else np.empty_like(s)
    # soft: soft_w * tau * (q - p); hard: hard_w * (softmax(s) - onehot(y)); times the row's factor
    np.exp(log_q, out=g)
    g -= p
    g *= np.float32(soft_w * tau)
    g += np.float32(hard_w) * np.exp(log_p1)
    g[r, y] -= np.float32(hard_w)
    g *= np.where(counted, scale, np.float32(0.0)).astype(s.dtype)[:, None]
    return loss, g


def numpy_softmax(x: Any) -> Any:
    import numpy as np

    e = np.exp(x - x.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


_FLOOR_KERNELS: dict = {}
BLOCK = 16384  # elements per parallel block of the floor kernels


def floor_kernels() -> dict:
    """Numba parallel kernels that only move memory: the floors the loss kernels are compared with.

    ``read1(a, partial)`` / ``read2(a, b, partial)`` sum their flat inputs (each element read once);
    ``rw1(a, out)`` / ``rw2(a, b, out)`` read their inputs once and write ``out`` once;
    ``rw1_stream(a, out)`` is ``rw1`` with streaming stores (float32, ``BLOCK`` a multiple of 256). All float32
    arithmetic (a float64 accumulator would make the "floor" compute-bound), vectorized by LLVM.
    """
    if _FLOOR_KERNELS:
        return _FLOOR_KERNELS
    import numpy as np
    from numba import njit, prange

    jit = dict(parallel=True, cache=True, fastmath={"nsz", "arcp", "contract", "afn", "reassoc"},
               error_model="numpy", nogil=True)

    # each block works on slices of its own: indexing the whole flat array with the block's global index
    # compiled to a loop LLVM did not vectorize, a "floor" 2-5x slower than NumPy's own sum
    @njit(**jit)
    def read1(a, partial):  # type: ignore[no-untyped-def]
        n = a.size
        for k in prange(partial.size):
            lo = k * BLOCK
            x = a[lo:min(n, lo + BLOCK)]
            acc = np.float32(0.0)
            for i in range(x.shape[0]):
                acc += x[i]
            partial[k] = acc
        return partial.sum()

    @njit(**jit)
    def read2(a, b, partial):  # type: ignore[no-untyped-def]
        n = a.size
        for k in prange(partial.size):
            lo = k * BLOCK
            hi = min(n, lo + BLOCK)
            x = a[lo:hi]
            y = b[lo:hi]
            acc = np.float32(0.0)
            for i in range(x.shape[0]):
                acc += x[i] + y[i]
            partial[k] = acc
        return partial.sum()

    @njit(**jit)
    def rw1(a, out):  # type: ignore[no-untyped-def]
        n = a.size
        for k in prange((n + BLOCK - 1) // BLOCK):
            lo = k * BLOCK
            hi = min(n, lo + BLOCK)
            x = a[lo:hi]
            o = out[lo:hi]
            for i in range(x.shape[0]):
                o[i] = x[i] * np.float32(0.5)

    @njit(**jit)
    def rw2(a, b, out):  # type: ignore[no-untyped-def]
        n = a.size
        for k in prange((n + BLOCK - 1) // BLOCK):
            lo = k * BLOCK
            hi = min(n, lo + BLOCK)
            x = a[lo:hi]
            y = b[lo:hi]
            o = out[lo:hi]
            for i in range(x.shape[0]):
                o[i] = x[i] - y[i]

    from .cpu._math import store_fence, stream_line

    @njit(**jit)
    def rw1_stream(a, out):  # type: ignore[no-untyped-def]
        # rw1 by streaming stores from a 256-element staging block (the lines are not read before
        # they are written), as the sparse kernel writes a large gradient: float32 ``out``
        n = a.size
        lead = min(n, (-(out.ctypes.data // 4)) % 16)  # elements before out's first 64-byte line
        for i in range(lead):
            out[i] = a[i] * np.float32(0.5)
        nb = (n - lead) // BLOCK
        for k in prange(nb):
            buf = np.empty(256, np.float32)
            for lo in range(lead + k * BLOCK, lead + (k + 1) * BLOCK, 256):
                x = a[lo:lo + 256]
                for i in range(256):
                    buf[i] = x[i] * np.float32(0.5)
                for q in range(0, 256, 16):
                    stream_line(out, lo + q, buf, q)
            store_fence()
        for i in range(lead + nb * BLOCK, n):
            out[i] = a[i] * np.float32(0.5)

    _FLOOR_KERNELS.update(read1=read1, read2=read2, rw1=rw1, rw2=rw2, rw1_stream=rw1_stream)
    return _FLOOR_KERNELS


def floor_calls(case: Case, op: str) -> dict[str, Callable[[], Any]]:
    """The read floor and the read+write floor of ``op`` on ``case``.

    The loss reads the student and the teacher (``forward``) and writes the gradient
    (``forward+grad``); softmax reads one array and writes one.
    """
    import numpy as np

    k = floor_kernels()
    a = case.bits(case.student).reshape(-1)
    b = case.bits(case.teacher).reshape(-1)
    out = case.bits(case.out).reshape(-1)
    partial = np.empty((a.size + BLOCK - 1) // BLOCK, dtype=np.float32)
    if op == "softmax":
        return {"floor_read": lambda: k["read1"](a, partial), "floor_rw": lambda: k["rw1"](a, out)}
    return {"floor_read": lambda: k["read2"](a, b, partial), "floor_rw": lambda: k["rw2"](a, b, out)}


def fastdistill_call(case: Case, op: str, float32: bool = False) -> Callable[[], Any]:
    """The library call of ``op`` (public API, default CPU dispatch); ``float32``: on the float32 copies of
    a 16-bit case's values."""
    import fastdistill as fd

    s, t, y, g = case.student, case.teacher, case.labels, case.grad
    if op == INPLACE:
        s = g = case.work
    if float32 and case.student32 is not None:
        s, t, g = case.student32, case.teacher32, case.grad32
        if op == INPLACE:
            s = g = case.work32
    if op == "softmax":
        return lambda: fd.softmax(s)
    distiller = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(TAU), HARD_W, SOFT_W, ignore_index=IGNORE_INDEX)
    if op == "forward":
        return lambda: distiller.loss(s, t, y)
    return lambda: distiller.loss_and_grad(s, t, y, grad_out=g)


def numpy_call(case: Case, op: str) -> Callable[[], Any]:
    s, t, y, g = case.student, case.teacher, case.labels, case.grad
    if case.dtype != "float32":  # NumPy computes half precision slowly or not at all: upcast per call
        import numpy as np

        def up(x: Any) -> Any:
            return x.astype(np.float32)

        if op == "softmax":
            return lambda: numpy_softmax(up(s))
        if op == "forward":
            return lambda: numpy_response(up(s), up(t), y, False)
        return lambda: numpy_response(up(s), up(t), y, True)
    if op == "softmax":
        return lambda: numpy_softmax(s)
    if op == "forward":
        return lambda: numpy_response(s, t, y, False)
    return lambda: numpy_response(s, t, y, True, g)


def torch_call(case: Case, op: str, torch: Any) -> Callable[[], Any]:
    """PyTorch eager on the CPU, as a PyTorch user writes the loss (tensors share the NumPy memory)."""
    import torch.nn.functional as F

    def tensor(a: Any) -> Any:
        if case.dtype == "bfloat16":
            return torch.from_numpy(case.bits(a)).view(torch.bfloat16)
        return torch.from_numpy(a)

    s = tensor(case.student)
    t = tensor(case.teacher)
    y = torch.from_numpy(case.labels)

    def loss_of(x: Any) -> Any:
        ce = F.cross_entropy(x, y, ignore_index=IGNORE_INDEX)
        kl = F.kl_div(F.log_softmax(x / TAU, dim=1), F.log_softmax(t / TAU, dim=1),
                      log_target=True, reduction="batchmean") * (TAU * TAU)
        return HARD_W * ce + SOFT_W * kl

    if op == "softmax":
        def run_softmax() -> Any:
            with torch.no_grad():
                return torch.softmax(s, dim=1)
        return run_softmax
    if op == "forward":
        def run_forward() -> float:
            with torch.no_grad():
                return float(loss_of(s))
        return run_forward
    leaf = s.detach().requires_grad_(True)

    def run_grad() -> tuple[float, Any]:
        leaf.grad = None
        loss = loss_of(leaf)
        loss.backward()
        return float(loss.detach()), leaf.grad

    return run_grad


def implementations(case: Case, op: str, torch: Any = None, floors: bool = True) -> dict[str, Callable[[], Any]]:
    """Every implementation of ``op`` on ``case``: name -> zero-argument callable."""
    calls = {"fastdistill": fastdistill_call(case, op), "numpy": numpy_call(case, op)}
    if case.dtype != "float32":
        calls["fastdistill_f32"] = fastdistill_call(case, op, float32=True)
    if torch is not None:
        calls["torch"] = torch_call(case, op, torch)
    if floors:
        calls.update(floor_calls(case, op))
    return calls


# ---------------------------------------------------------------- timing


def measure(fn: Callable[[], Any], timing: tuple[int, float, int, int] = TIMING_DEFAULT) -> dict[str, Any]:
    """Median seconds per call of ``fn`` after warm-up; the number of samples adapts to the call's cost.

    Calls faster than a few milliseconds are repeated inside one sample (the sample's mean is a sample).
    """
    warmup, budget, min_samples, max_samples = timing
    clock = time.perf_counter
    first = 0.0
    for _ in range(max(1, warmup)):
        t0 = clock()
        fn()
        first = clock() - t0
    per_call = first
    if first < 0.05:  # cheap: calibrate on a few more calls (the first one may still have been cold)
        n = 0
        t0 = clock()
        while True:
            fn()
            n += 1
            elapsed = clock() - t0
            if elapsed >= MIN_SAMPLE_S or n >= 10000:
                break
        per_call = elapsed / n
    inner = max(1, int(MIN_SAMPLE_S / max(per_call, 1e-9)))
    per_sample = max(per_call * inner, 1e-9)
    samples = int(min(max_samples, max(min_samples, budget / per_sample)))
    times = []
    for _ in range(samples):
        t0 = clock()
        for _ in range(inner):
            fn()
        times.append((clock() - t0) / inner)
    return {"median_s": statistics.median(times), "min_s": min(times), "samples": samples, "calls_per_sample": inner}


def check_against_numpy(case: Case, op: str) -> dict[str, Any]:
    """Whether fastdistill and the NumPy baseline agree on this case (the harness measures real work)."""
    import numpy as np

    import fastdistill as fd

    s, t, y = case.student, case.teacher, case.labels
    s32, t32 = case.as_float32()
    if op == "softmax":
        got, ref = fd.softmax(s).astype(np.float32), numpy_softmax(s32)
        err = float(np.max(np.abs(got - ref)))
        return {"ok": bool(err <= (1e-5 if case.dtype == "float32" else 4e-3)), "max_abs_err": err}
    distiller = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(TAU), HARD_W, SOFT_W, ignore_index=IGNORE_INDEX)
    if op == "forward":
        got_loss, got_g = distiller.loss(s, t, y), None
        ref_loss, ref_g = numpy_response(s32, t32, y, False)
    else:
        got_loss, got_g = distiller.loss_and_grad(s, t, y)
        got_g = got_g.astype(np.float32)
        ref_loss, ref_g = numpy_response(s32, t32, y, True)
    rel = abs(got_loss - ref_loss) / max(abs(ref_loss), 1e-30)
    out = {"ok": bool(rel <= 1e-4), "loss_rel_err": rel}
    if got_g is not None:
        gmax = float(np.max(np.abs(ref_g))) or 1.0
        gerr = float(np.max(np.abs(got_g - ref_g))) / gmax
        out["grad_rel_err"] = gerr
        out["ok"] = bool(out["ok"] and gerr <= GRAD_TOL[case.dtype])
    return out


def in_place_equal(case: Case) -> bool:
    """Whether the gradient written over the student has the same bits (and the loss) as into a fresh
    buffer."""
    import numpy as np

    import fastdistill as fd

    s, t, y = case.student, case.teacher, case.labels
    distiller = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(TAU), HARD_W, SOFT_W, ignore_index=IGNORE_INDEX)
    loss, g = distiller.loss_and_grad(s, t, y)
    w = s.copy()
    loss_w, _ = distiller.loss_and_grad(w, t, y, grad_out=w)
    return bool(loss == loss_w and np.array_equal(g.view(np.uint8), w.view(np.uint8)))


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def run_bench(shapes: Sequence[tuple[int, int]], threads: int, use_torch: bool = True, quick: bool = False,
              scaling_shape: tuple[int, int] | None = DEFAULT_SCALING, check: bool = True,
              log: Callable[[str], None] | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Run every measurement and return the results as a JSON-ready dict."""
    import numba
    import numpy as np

    import fastdistill as fd

    timing = TIMING_QUICK if quick else TIMING_DEFAULT
    fd.set_num_threads(threads)
    torch = torch_module() if use_torch else None
    if torch is not None:
        torch.set_num_threads(threads)
    say = log or (lambda msg: None)
    load_before = load_average()
    started = time.perf_counter()
    results = []
    in_place: list = []
    for shape in shapes:
        say(f"{shape_name(shape)}: preparing inputs")
        case = Case(shape, dtype=dtype)
        for op in OPS:
            calls = implementations(case, op, torch)
            times: dict[str, float | None] = {}
            detail: dict[str, Any] = {}
            for name in ("floor_read", "floor_rw", "fastdistill", "fastdistill_f32", "numpy", "torch"):
                if name not in calls:
                    times[name] = None
                    continue
                m = measure(calls[name], timing)
                times[name] = m["median_s"] * 1e3
                detail[name] = m
            fd_ms = times["fastdistill"]
            entry = {
                "shape": list(shape),
                "op": op,
                "bytes_per_array": case.nbytes,
                "times_ms": times,
                "min_ms": {k: v["min_s"] * 1e3 for k, v in detail.items()},
                "samples": {k: v["samples"] for k, v in detail.items()},
                "calls_per_sample": {k: v["calls_per_sample"] for k, v in detail.items()},
                "speedup": {"numpy": ratio(times["numpy"], fd_ms), "torch": ratio(times["torch"], fd_ms),
                            "float32": ratio(times["fastdistill_f32"], fd_ms)},
                "x_floor": {"read": ratio(fd_ms, times["floor_read"]), "rw": ratio(fd_ms, times["floor_rw"])},
            }
            if check:
                entry["check"] = check_against_numpy(case, op)
            results.append(entry)
            say(f"{shape_name(shape)} {op}: fastdistill {fd_ms:.3f} ms")
            if op == "forward+grad":  # the same call with the gradient over the student, beside it again
                fresh = measure(fastdistill_call(case, op), timing)["median_s"] * 1e3
                inplace = measure(fastdistill_call(case, INPLACE), timing)["median_s"] * 1e3
                in_place.append({"shape": list(shape), "fresh_ms": fresh, "in_place_ms": inplace,
                                 "x_fresh": ratio(inplace, fresh),
                                 "bitwise_equal": in_place_equal(case) if check else None})
                say(f"{shape_name(shape)} {INPLACE}: fastdistill {inplace:.3f} ms (fresh buffer {fresh:.3f} ms)")
        del case
    scaling = []
    if scaling_shape is not None:
        case = Case(scaling_shape, dtype=dtype)
        for op in ("forward", "forward+grad"):
            fn = fastdistill_call(case, op)
            per_threads = {}
            for n in sorted({1, threads}):
                fd.set_num_threads(n)
                per_threads[n] = measure(fn, timing)["median_s"] * 1e3
            fd.set_num_threads(threads)
            scaling.append({
                "shape": list(scaling_shape), "op": op, "threads": threads,
                "ms_1_thread": per_threads[1], "ms_all_threads": per_threads[threads],
                "speedup": ratio(per_threads[1], per_threads[threads]),
            })
            say(f"scaling {shape_name(scaling_shape)} {op}: {per_threads[1]:.3f} ms -> {per_threads[threads]:.3f} ms")
        del case
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = None
    return {
        "fastdistill_version": fd.__version__,
        "machine": {
            "cpu": cpu_model(),
            "threads": threads,
            "logical_cpus": os.cpu_count(),
            "numba_threading_layer": layer,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "numba": numba.__version__,
            "torch": getattr(torch, "__version__", None),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        "config": {
            "quick": quick, "dtype": dtype, "temperature": TAU, "hard_label_weight": HARD_W,
            "soft_label_weight": SOFT_W, "reduction": "mean", "ignore_index": IGNORE_INDEX,
            "ignored_row_fraction": IGNORE_FRACTION, "timing": "median of samples after warm-up",
            "shapes": [list(s) for s in shapes],
        },
        "results": results,
        "in_place": in_place,
        "scaling": scaling,
        "elapsed_s": time.perf_counter() - started,
    }


# ---------------------------------------------------------------- reporting


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x" if v < 10 else f"{v:.1f}x"


def format_table(report: dict[str, Any], markdown: bool = False) -> str:
    """The results as a text (or Markdown) table, with the machine in the heading."""
    m = report["machine"]
    head = (f"fastdistill {report['fastdistill_version']} on {m['cpu']}, {m['threads']} thread"
            f"{'s' if m['threads'] != 1 else ''} (numba {m['numba']}, threading layer {m['numba_threading_layer']}"
            f"; numpy {m['numpy']}; torch {m['torch'] or 'not used'})")
    dtype = report["config"].get("dtype", "float32")
    half = dtype != "float32"
    sub = (f"{dtype} logits, loss = 0.5*CE + 0.5*tau^2*KL (tau=4, mean, ~10% ignored rows); median ms per call. "
           "speed-up = baseline time / fastdistill time; x floor = fastdistill time / floor time"
           + (f" (floors stream {dtype}; 'float32 ms' is fastdistill on the same values in float32)." if half
              else "."))
    cols = ["shape", "op", "fastdistill ms"] + (["float32 ms"] if half else []) + [
        "numpy ms", "torch ms", "read floor ms", "r+w floor ms"] + (["vs float32"] if half else []) + [
        "vs numpy", "vs torch", "x read floor", "x r+w floor"]
    rows = []
    for e in report["results"]:
        t = e["times_ms"]
        name = shape_name(e["shape"])
        op = e["op"] + ("" if e.get("check", {}).get("ok", True) else " (MISMATCH)")
        rows.append([name, op, _ms(t["fastdistill"])] + ([_ms(t.get("fastdistill_f32"))] if half else []) + [
            _ms(t["numpy"]), _ms(t["torch"]), _ms(t["floor_read"]), _ms(t["floor_rw"])]
            + ([_x(e["speedup"].get("float32"))] if half else [])
            + [_x(e["speedup"]["numpy"]), _x(e["speedup"]["torch"]), _x(e["x_floor"]["read"]), _x(e["x_floor"]["rw"])])
    lines = []
    if markdown:
        lines += [head + "  ", sub, ""]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        fmt = lambda r: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
        lines += [head, sub, "", fmt(cols), fmt(["-" * w for w in widths])]
        lines += [fmt(r) for r in rows]
    for e in report.get("in_place", []):
        if e == report["in_place"][0]:
            lines.append("")
        same = {True: "", False: " (MISMATCH: not the same bits)", None: ""}[e["bitwise_equal"]]
        lines.append(f"forward+grad {shape_name(e['shape'])}: into a fresh buffer {_ms(e['fresh_ms'])} ms, in place "
                     f"(grad_out = the student) {_ms(e['in_place_ms'])} ms -> {_x(e['x_fresh'])}{same}"
                     + ("  " if markdown else ""))
    if report["scaling"]:
        lines.append("")
        for s in report["scaling"]:
            lines.append(f"thread scaling {shape_name(s['shape'])} {s['op']}: 1 thread {_ms(s['ms_1_thread'])} ms, "
                         f"{s['threads']} threads {_ms(s['ms_all_threads'])} ms -> {_x(s['speedup'])}"
                         + ("  " if markdown else ""))
    load = m.get("load_average_before")
    if load is not None and load > 0.5:
        lines.append("")
        lines.append(f"NOTE: the 1-minute load average was {load:.2f} before the run: other processes were using "
                     "the CPU, so these timings are noisy (parallel kernels suffer most).")
    bad = [f"{shape_name(e['shape'])} {e['op']}" for e in report["results"] if not e.get("check", {}).get("ok", True)]
    if bad:
        lines.append("")
        lines.append("WARNING: fastdistill and the NumPy baseline disagree on: " + ", ".join(bad))
    return "\n".join(lines)


def write_plot(report: dict[str, Any], path: str) -> None:
    """A PNG chart: one panel per operation, median ms per implementation and shape (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["fastdistill", "numpy", "torch", "floor_read", "floor_rw"]
    labels = {"fastdistill": "fastdistill", "numpy": "NumPy", "torch": "PyTorch eager",
              "floor_read": "read floor", "floor_rw": "read+write floor"}
    colours = {"fastdistill": "#d62728", "numpy": "#7f7f7f", "torch": "#ff7f0e",
               "floor_read": "#1f77b4", "floor_rw": "#aec7e8"}
    present = [n for n in names if any(e["times_ms"].get(n) is not None for e in report["results"])]
    fig, axes = plt.subplots(1, len(OPS), figsize=(5.2 * len(OPS), 4.6), squeeze=False)
    for ax, op in zip(axes[0], OPS):
        entries = [e for e in report["results"] if e["op"] == op]
        width = 0.8 / max(1, len(present))
        for i, n in enumerate(present):
            xs = [j + (i - (len(present) - 1) / 2) * width for j in range(len(entries))]
            ys = [e["times_ms"].get(n) or 0.0 for e in entries]
            ax.bar(xs, ys, width=width, label=labels[n], color=colours[n])
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels([shape_name(e["shape"]) for e in entries], rotation=20)
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_ylabel("median ms per call (log)")
        ax.grid(axis="y", which="both", alpha=0.3)
    handles, names_ = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="lower center", ncol=len(present), fontsize=9, frameon=False)
    m = report["machine"]
    fig.suptitle(f"fastdistill {report['fastdistill_version']}: {m['cpu']}, {m['threads']} threads, "
                 f"{report['config'].get('dtype', 'float32')} "
                 "(lower is better)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastdistill bench",
        description=("Time the response loss (forward, forward+gradient) and softmax on the CPU, side by side "
                     "with NumPy, PyTorch eager and memory floors."),
    )
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="comma-separated ROWSxCLASSES shapes (default: "
                        + ",".join(shape_name(s) for s in DEFAULT_SHAPES) + ")")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and few repeats (a smoke test; numbers are not meaningful)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for fastdistill, the floors and PyTorch (default: all numba threads)")
    p.add_argument("--no-torch", action="store_true", help="leave the PyTorch baseline out")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="storage of the logits (default float32; bfloat16 needs ml_dtypes)")
    p.add_argument("--scaling", type=str, default=None,
                   help="shape of the 1-thread vs all-threads measurement, or 'none' (default: "
                        f"{shape_name(DEFAULT_SCALING)}; {shape_name(QUICK_SCALING)} with --quick)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the agreement check of fastdistill against the NumPy baseline")
    p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON to PATH")
    p.add_argument("--plot", metavar="PATH", default=None, help="write a PNG chart to PATH (needs matplotlib)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    import numba

    top = int(numba.config.NUMBA_NUM_THREADS)
    threads = top if args.threads is None else args.threads
    if not 1 <= threads <= top:
        print(f"fastdistill bench: --threads must be in [1, {top}] (numba's thread pool), got {threads}",
              file=sys.stderr)
        return 2
    shapes = args.shapes or list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    if args.scaling is None:
        scaling: tuple[int, int] | None = QUICK_SCALING if args.quick else DEFAULT_SCALING
    elif args.scaling.strip().lower() == "none":
        scaling = None
    else:
        try:
            scaling = parse_shape(args.scaling)
        except argparse.ArgumentTypeError as exc:
            print(f"fastdistill bench: --scaling: {exc}", file=sys.stderr)
            return 2
    if threads == 1:
        scaling = None  # nothing to compare
    plot = args.plot
    if plot and not _has_matplotlib():
        print("fastdistill bench: --plot needs matplotlib (pip install 'fastdistill[plot]'); "
              "the chart is skipped", file=sys.stderr)
        plot = None
    use_torch = not args.no_torch
    if use_torch and torch_module() is None:
        print("fastdistill bench: PyTorch is not installed; its baseline is skipped", file=sys.stderr)
        use_torch = False

    def log(msg: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if args.dtype == "bfloat16":
        numpy_dtype("bfloat16")  # (ml_dtypes, or a clear message before any work)
    report = run_bench(shapes, threads, use_torch=use_torch, quick=args.quick, scaling_shape=scaling,
                       check=not args.no_check, log=log, dtype=args.dtype)
    print(format_table(report, markdown=args.markdown))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"\nresults written to {args.json}")
    if plot:
        write_plot(report, plot)
        print(f"chart written to {plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

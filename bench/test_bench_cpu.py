"""CPU benchmarks: fastdistill beside NumPy, PyTorch eager and the memory floors.

Run ``pytest bench/ --benchmark-group-by=param`` (or ``-k 64x1000`` for one shape); each group
``op-shape-dtype`` lists fastdistill, numpy, torch, floor_read and floor_rw side by side (and, for the
16-bit dtypes, fastdistill on the same values in float32). The operations are
``forward`` (loss only), ``forward+grad`` (loss and gradient into a preallocated buffer; and
``fastdistill_inplace``, the gradient written over the student) and ``softmax``;
see ``fastdistill bench --help`` for what each implementation and floor is.
"""
from __future__ import annotations

from typing import Any, Callable

from fastdistill import bench as B


def _run(benchmark: Any, fn: Callable[[], Any]) -> None:
    fn()  # compile / warm up outside the timing
    benchmark(fn)


def test_fastdistill(benchmark: Any, case: tuple[str, B.Case]) -> None:
    op, c = case
    _run(benchmark, B.fastdistill_call(c, op))


def test_fastdistill_float32(benchmark: Any, case: tuple[str, B.Case]) -> None:
    """fastdistill on the same values in float32 (16-bit cases only): the ratio the half formats buy."""
    op, c = case
    if c.dtype == "float32":
        import pytest

        pytest.skip("the float32 case is test_fastdistill itself")
    _run(benchmark, B.fastdistill_call(c, op, float32=True))


def test_fastdistill_inplace(benchmark: Any, case: tuple[str, B.Case]) -> None:
    """forward+grad with the gradient written over the student (``grad_out=s``), beside the fresh buffer's."""
    op, c = case
    if op != "forward+grad":
        import pytest

        pytest.skip("the in-place gradient is a forward+grad call")
    _run(benchmark, B.fastdistill_call(c, B.INPLACE))


def test_numpy(benchmark: Any, case: tuple[str, B.Case]) -> None:
    op, c = case
    _run(benchmark, B.numpy_call(c, op))


def test_torch(benchmark: Any, case: tuple[str, B.Case], torch_mod: Any) -> None:
    op, c = case
    _run(benchmark, B.torch_call(c, op, torch_mod))


def test_floor_read(benchmark: Any, case: tuple[str, B.Case]) -> None:
    op, c = case
    _run(benchmark, B.floor_calls(c, op)["floor_read"])


def test_floor_rw(benchmark: Any, case: tuple[str, B.Case]) -> None:
    op, c = case
    _run(benchmark, B.floor_calls(c, op)["floor_rw"])

"""Fixtures of the pytest-benchmark suite (``pytest bench/``; not part of ``make test``).

The inputs, baselines and floors are the ones ``fastdistill bench`` uses (:mod:`fastdistill.bench`), so
both report the same measurements.
"""
from __future__ import annotations

from typing import Any

import pytest

from fastdistill import bench as B

SHAPES = [B.shape_name(s) for s in B.DEFAULT_SHAPES]
# every shape in float32 and in both 16-bit formats (``-k bfloat16`` for one of them)
CASES = [(op, shape, dtype) for dtype in B.DTYPES for op in B.OPS for shape in SHAPES]
CASE_IDS = [f"{op}-{shape}-{dtype}" for op, shape, dtype in CASES]

_INPUTS: dict[tuple[str, str], B.Case] = {}


def case_for(shape: str, dtype: str = "float32") -> B.Case:
    """The inputs of one shape and dtype, built once per session (one at a time: the large ones take
    gigabytes)."""
    key = (shape, dtype)
    if key not in _INPUTS:
        _INPUTS.clear()
        if dtype == "bfloat16":
            pytest.importorskip("ml_dtypes")
        _INPUTS[key] = B.Case(B.parse_shape(shape), dtype=dtype)
    return _INPUTS[key]


@pytest.fixture(scope="session")
def torch_mod() -> Any:
    """``torch`` with as many threads as fastdistill, or a skip."""
    torch = pytest.importorskip("torch")
    import fastdistill

    torch.set_num_threads(fastdistill.get_num_threads())
    return torch


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request: pytest.FixtureRequest, benchmark: Any) -> tuple[str, B.Case]:
    """``(op, inputs)``; puts the benchmark in the group ``op-shape-dtype`` so implementations sit side by
    side."""
    op, shape, dtype = request.param
    benchmark.group = f"{op}-{shape}-{dtype}"
    benchmark.extra_info.update(op=op, shape=shape, dtype=dtype)
    return op, case_for(shape, dtype)

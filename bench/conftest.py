"""Fixtures of the pytest-benchmark suite (``pytest bench/``; not part of ``make test``).

The inputs, baselines and floors are the ones ``fastdistill bench`` uses (:mod:`fastdistill.bench`), so
both report the same measurements.
"""
from __future__ import annotations

from typing import Any

import pytest

from fastdistill import bench as B

SHAPES = [B.shape_name(s) for s in B.DEFAULT_SHAPES]
CASES = [(op, shape) for op in B.OPS for shape in SHAPES]
CASE_IDS = [f"{op}-{shape}" for op, shape in CASES]

_INPUTS: dict[str, B.Case] = {}


def case_for(shape: str) -> B.Case:
    """The inputs of one shape, built once per session."""
    if shape not in _INPUTS:
        _INPUTS[shape] = B.Case(B.parse_shape(shape))
    return _INPUTS[shape]


@pytest.fixture(scope="session")
def torch_mod() -> Any:
    """``torch`` with as many threads as fastdistill, or a skip."""
    torch = pytest.importorskip("torch")
    import fastdistill

    torch.set_num_threads(fastdistill.get_num_threads())
    return torch


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request: pytest.FixtureRequest, benchmark: Any) -> tuple[str, B.Case]:
    """``(op, inputs)``; puts the benchmark in the group ``op-shape`` so implementations sit side by side."""
    op, shape = request.param
    benchmark.group = f"{op}-{shape}"
    benchmark.extra_info.update(op=op, shape=shape)
    return op, case_for(shape)

"""Every CUDA kernel variant compiles for Hopper (sm_90) the way numba-cuda compiles it on a GPU.

The simulator tests run the kernels as Python: a typing or lowering error, or a register cap ptxas cannot
meet, would only show on a real GPU. Here NVVM and ptxas (nvJitLink) run on the CPU, in a subprocess
with the simulator off. Skipped when those compiler libraries are not installed (the ``dev`` extra
installs them on Linux).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba.cuda")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "cuda_resources.py"), "--json", "--lean", "--cc", "9.0"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_every_variant_compiles_for_sm90(compiled):
    from fastdistill._spec import DIV_FORWARD_KL, DIV_MIXTURE, DIV_NONE, DIV_REVERSE_KL, DIV_TVD

    names = [c["name"] for c in compiled]
    divs = (DIV_NONE, DIV_FORWARD_KL, DIV_REVERSE_KL, DIV_MIXTURE, DIV_TVD)
    lean = [n for n in names if n.startswith("response ") and ", fused" not in n]
    fused = [n for n in names if n.startswith("response ") and ", fused" in n]
    assert len(lean) == len(divs) * 3 * 2 * 2  # divergence x CE mode x linear term x precision
    assert len(fused) == len(divs) * 2  # the CE-own variants, both precisions
    for want in ("softmax float32", "softmax float64", "log_softmax float32", "log_softmax float64",
                 "labels int64", "labels int32", "final sum"):
        assert want in names
    assert len(set(names)) == len(names)
    for c in compiled:
        assert c["ptx_target"] == "sm_90", c
        r = c["resources"]
        assert r["registers"] > 0, c
        if c["cap"] is not None:
            assert r["registers"] <= c["cap"], c


def test_register_caps_are_the_configured_ones(compiled):
    """Single-pass float32 response kernels are capped at 80 registers, the rest at 128 (fused or not)."""
    for c in compiled:
        if not c["name"].startswith("response "):
            assert c["cap"] is None, c
            continue
        single_pass_f32 = "float32" in c["name"] and not any(k in c["name"] for k in ("mixture", "tvd"))
        assert c["cap"] == (80 if single_pass_f32 else 128), c

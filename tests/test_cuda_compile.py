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
# ptxas' spill bytes (stores, loads) of every kernel at sm_90, as recorded (the versions in the file)
SPILLS = json.loads((Path(__file__).resolve().parent / "cuda_spills_sm90.json").read_text())


SHARDS = 2  # compiler processes side by side (NVVM and ptxas are single-threaded)


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "bench" / "cuda_resources.py"), "--json", "--cc", "9.0",
                               "--shard", f"{k}/{SHARDS}"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(SHARDS)]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        if p.returncode == 3:
            pytest.skip(out.strip())
        assert p.returncode == 0, out[-3000:] + err[-5000:]
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def test_every_reachable_variant_compiles_for_sm90(compiled):
    """One lean kernel per reachable (divergence, CE mode, linear term, arithmetic, storage) of the
    variant table, a fused one per CE-own variant without a linear term, and the small kernels."""
    from fastdistill._spec import CE_OWN
    from fastdistill.cuda._offline import kernel_keys, variants

    names = [c["name"] for c in compiled]
    assert sorted(names) == sorted(v.name for v in variants())
    keys = kernel_keys()
    lean = [n for n in names if n.startswith("response ") and ", fused" not in n]
    fused = [n for n in names if n.startswith("response ") and ", fused" in n]
    assert len(lean) == len(keys)
    assert len(fused) == sum(1 for k in keys if k[1] == CE_OWN and not k[2])
    for want in ("softmax float32", "softmax float64", "softmax bfloat16", "log_softmax float16", "log_softmax float32",
                 "log_softmax float64",
                 "labels int64", "final sum", "cast float64 -> float32", "vocab shard rescale",
                 "vocab shard kl, CE own, float32", "vocab shard mixture, CE own, float32"):
        assert want in names
    assert len(set(names)) == len(names)
    for c in compiled:
        assert c["ptx_target"] == "sm_90", c
        r = c["resources"]
        assert r["registers"] > 0, c
        if c["cap"] is not None:
            assert r["registers"] <= c["cap"], c


def test_register_caps_are_the_configured_ones(compiled):
    """Single-pass kernels with float32 arithmetic (response and vocabulary-shard kernels) are capped at 80
    registers, the rest (and the sparse teacher's) at 128; every kernel within its cap."""
    from fastdistill._formulas import FORMULAS

    two_pass = [f" {m.NAME}," for m in FORMULAS.values() if m.TWO_PASS]  # (as the kernels' names hold them)
    assert two_pass
    caps = set()
    for c in compiled:
        caps.add(c["cap"])
        if c["cap"] is not None:
            assert c["resources"]["registers"] <= c["cap"], c
        if c["name"].startswith("sparse "):  # the sparse-teacher kernel, its float64 bins on one thread
            assert c["cap"] == 128, c
            continue
        if c["name"].startswith("vocab shard ") and c["name"] != "vocab shard rescale":  # the response kernel's
            assert c["cap"] == (128 if any(k in c["name"] for k in two_pass) else 80), c
            continue
        if not c["name"].startswith("response "):
            assert c["cap"] is None, c
            continue
        f32_math = "float32 math" in c["name"] or (", float32" in c["name"] and "float64 math" not in c["name"])
        single_pass_f32 = f32_math and not any(k in c["name"] for k in two_pass)
        assert c["cap"] == (80 if single_pass_f32 else 128), c
    assert caps == {None, 80, 128}  # (both caps met: the names above are the kernels' own)


def test_no_kernel_spills_more_than_recorded(compiled):
    """A change that makes a kernel spill registers to local memory shows here, not first on a GPU: a
    kernel recorded without spills has none, the others at most their recorded bytes (a few more allowed
    for another numba-cuda or NVVM than the recording's). After a change that spills less (or a kernel
    added), record again: ``python bench/cuda_resources.py --json`` into ``tests/cuda_spills_sm90.json``."""
    recorded = SPILLS["kernels"]
    worse = []
    for c in compiled:
        name, r = c["name"], c["resources"]
        assert name in recorded, f"{name}: no recorded spills in tests/cuda_spills_sm90.json"
        for got, want in zip((r["spill_stores"], r["spill_loads"]), recorded[name]):
            if got > (0 if want == 0 else want + max(16, want // 8)):
                worse.append(f"{name}: {r['spill_stores']}/{r['spill_loads']} bytes spilled/reloaded, recorded "
                             f"{recorded[name][0]}/{recorded[name][1]}")
                break
    assert not worse, "\n".join(worse)

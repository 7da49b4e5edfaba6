"""``fastdistill.warmup`` and ``fastdistill warmup``: the variants a job will use, compiled ahead of it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastdistill as fd
from fastdistill import _spec
from fastdistill._warmup import variants_for

ROOT = Path(__file__).resolve().parent.parent


def test_variants_for_losses():
    kl = fd.DistilLoss.kl_divergence(3.0)
    assert variants_for([kl], ["float32"]) == [_spec.resolve(kl.terms(), False, "float32")]
    bal = fd.ResponseDistiller.balanced()  # a hard-label term: always with labels
    (v,) = variants_for([bal], ["float64"])
    assert v == _spec.resolve(bal.terms(), True, "float64") and v.pw == 4
    pure = fd.ResponseDistiller.pure_kl(2.0)  # labels optional: both variants (they are the same here)
    assert variants_for([pure], ["float32"]) == [_spec.resolve(pure.terms(), False, "float32")]
    hot = fd.DistilLoss.reverse_kl(100.0)
    assert variants_for([hot], ["float32"])[0].math == "float64"
    assert variants_for([], ["float32"]) == [v for v in _spec.reachable() if v.storage() == ("float32",) * 3]
    assert variants_for([kl], ["bfloat16"]) == [_spec.resolve(kl.terms(), False, "bfloat16")]
    with pytest.raises(ValueError, match="dtypes"):
        variants_for([kl], ["int8"])
    with pytest.raises(TypeError, match="DistilLoss or ResponseDistiller"):
        variants_for(["kl"], ["float32"])


def test_warmup_compiles_what_a_loss_uses_with_progress():
    from fastdistill.cpu import _kernels as K

    seen = []
    loss = fd.DistilLoss.skew_reverse_kl(0.2, 2.0)
    done = fd.warmup(loss, dtypes=("float32",), progress=lambda i, n, c: seen.append((i, n, c.variant)))
    (v,) = variants_for([loss], ["float32"])
    assert [c.variant for c in done] == [v] and seen == [(1, 1, v)]
    assert (v, False) in K._WORKERS and done[0].seconds >= 0.0  # (keyed by variant and in-place)
    fd.warmup(loss, dtypes=("float32",), in_place=True)
    assert (v, True) in K._WORKERS  # the in-place worker (what grad_out=student and the fused head run)
    with pytest.raises(ValueError, match="jobs"):
        fd.warmup(loss, jobs=0)
    with pytest.raises(TypeError, match="in_place must be a bool, got str"):
        fd.warmup(loss, in_place="yes")


def _run(args, env_extra=None, timeout=600):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fastdistill", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_in_parallel_processes_fills_the_cache_a_later_process_loads(tmp_path):
    """Two compile processes side by side write one fresh on-disk cache; the next process finds every
    variant there, its in-place workers too (its first call of them, into a fresh buffer and over the
    student, is a cache load, not a compile)."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    r = _run(["warmup", "--loss", "kl_divergence", "--loss", "tvd", "--temperature", "2", "--dtype", "float32",
              "--jobs", "2", "--in-place"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1].startswith("2 kernel variants ready in")
    assert any(line.startswith("[2/2] ") for line in lines)
    code = ("import time, numpy as np, fastdistill as fd\n"
            "s = np.random.default_rng(0).normal(size=(8, 50)).astype(np.float32)\n"
            "from fastdistill.cpu import _kernels as K\n"
            "for loss in (fd.DistilLoss.kl_divergence(2.0), fd.DistilLoss.tvd(2.0)):\n"
            "    loss.compute_with_grad(s, s[::-1].copy())\n"
            "    w = s.copy()\n"
            "    loss.compute_with_grad(w, s[::-1].copy(), grad_out=w)\n"
            "print(len(K._WORKERS), sum(w.cache_hits for w in K._WORKERS.values()))\n")
    env.update(PYTHONPATH=str(ROOT))
    r2 = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                        text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    workers, hits = (int(x) for x in r2.stdout.split())
    assert (workers, hits) == (4, 4)  # both variants' two workers loaded from the cache the warm-up filled


def test_cli_errors():
    r = _run(["warmup", "--loss", "bogus"])
    assert r.returncode == 2 and "soft_loss must be a DistilLoss or one of" in r.stderr
    r = _run(["warmup", "--jobs", "0", "--dtype", "float32", "--loss", "mse"])
    assert r.returncode == 2 and "jobs must be a positive integer" in r.stderr


def test_a_warmed_variant_gives_the_reference_values():
    s = np.random.default_rng(1).normal(size=(6, 40))
    t = np.random.default_rng(2).normal(size=(6, 40))
    loss = fd.DistilLoss.kl_divergence(2.0)
    fd.warmup(loss, dtypes=("float64",))
    from reference import divergence

    assert loss.compute(s, t) == pytest.approx(divergence("kl_divergence", s, t, 2.0).mean(), rel=1e-12)

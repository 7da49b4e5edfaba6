"""Processes that start at once on one empty kernel cache (the ranks of a ``torchrun`` job, a DataLoader's
workers): each computes the right loss and gradient, and the cache they leave behind serves the next
process without a compile. Real processes, one shared ``NUMBA_CACHE_DIR``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys, numpy as np
from numba.core import event as ev
compiles = []

class Count(ev.Listener):
    def on_start(self, event):
        compiles.append(event.data["dispatcher"].py_func.__name__)
    def on_end(self, event):
        pass

ev.register("numba:compile", Count())
import fastdistill as fd
rank = int(sys.argv[1])
rng = np.random.default_rng(rank)
s = rng.normal(size=(6, 9))
t = rng.normal(size=(6, 9))
y = rng.integers(0, 9, 6)
loss, grad = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5).loss_and_grad(s, t, y)
print(json.dumps({"rank": rank, "loss": loss, "grad": grad.tolist(), "compiles": len(compiles)}))
"""


def _reference(rank: int) -> tuple[float, np.ndarray]:
    """0.5 CE + 0.5 tau^2 KL(softmax(t/tau) || softmax(s/tau)), mean over rows, and its gradient."""
    rng = np.random.default_rng(rank)
    s = rng.normal(size=(6, 9))
    t = rng.normal(size=(6, 9))
    y = rng.integers(0, 9, 6)
    tau = 2.0

    def log_softmax(x):
        m = x.max(1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))

    lq, lp, l1 = log_softmax(s / tau), log_softmax(t / tau), log_softmax(s)
    rows = len(s)
    kl = (np.exp(lp) * (lp - lq)).sum(1) * tau * tau
    ce = -l1[np.arange(rows), y]
    loss = float((0.5 * kl + 0.5 * ce).mean())
    onehot = np.eye(9)[y]
    grad = (0.5 * tau * (np.exp(lq) - np.exp(lp)) + 0.5 * (np.exp(l1) - onehot)) / rows
    return loss, grad


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
    env["NUMBA_CACHE_DIR"] = str(cache)
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_processes_starting_at_once_on_an_empty_cache(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    ranks = range(2)
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(r)], env=_env(cache), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for r in ranks]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert any(o["compiles"] > 0 for o in outs)  # the cache was empty: somebody compiled
    for o in outs:
        loss, grad = _reference(o["rank"])
        assert abs(o["loss"] - loss) <= 1e-12 * abs(loss)
        np.testing.assert_allclose(o["grad"], grad, rtol=1e-10, atol=1e-15)
    # what they left is a usable cache: a later process computes the same without compiling anything
    r = subprocess.run([sys.executable, "-c", SCRIPT, "1"], env=_env(cache), capture_output=True, text=True,
                       cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    later = json.loads(r.stdout.strip().splitlines()[-1])
    assert later["compiles"] == 0
    assert later["loss"] == outs[1]["loss"] and later["grad"] == outs[1]["grad"]

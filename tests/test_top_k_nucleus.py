"""``fd.top_k(..., top_p=, min_k=)``: the nucleus cut (each row's shortest prefix, by decreasing
probability under ``softmax(logits / temperature)``, whose probability reaches ``top_p``; at least
``min_k``, at most ``k`` entries; the other slots ``-1``) against NumPy, and its refusals."""
from __future__ import annotations

import os

import numpy as np
import pytest

import fastdistill as fd

IN_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and os.environ.get("NUMBA_FASTDISTILL_ALLOW_SIM") == "1"


def nucleus_reference(x, k, tau, top_p, min_k):
    """(ids, keep) per row from NumPy: the k best (ties: the lower id) and how many the cut keeps."""
    x64 = x.astype(np.float64) / tau
    lp = x64 - (x64.max(1, keepdims=True) + np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1, keepdims=True)))
    ids = np.argsort(-x.astype(np.float64), axis=1, kind="stable")[:, :k]
    cum = np.cumsum(np.exp(np.take_along_axis(lp, ids, 1)), axis=1)
    reach = np.argmax(cum >= top_p, axis=1) + 1
    reach = np.where((cum >= top_p).any(1), reach, k)
    return ids, np.clip(reach, min_k, k), np.take_along_axis(lp, ids, 1)


def check(top, x, k, tau, top_p, min_k):
    ids, keep, lp = nucleus_reference(x, k, tau, top_p, min_k)
    got_i = np.asarray(top.indices)
    got_v = np.asarray(top.values)
    for r in range(x.shape[0]):
        m = int(keep[r])
        np.testing.assert_array_equal(got_i[r, :m], ids[r, :m])
        assert (got_i[r, m:] == -1).all() and np.isneginf(got_v[r, m:]).all()
        np.testing.assert_allclose(got_v[r, :m], lp[r, :m], rtol=1e-5, atol=1e-5)
    assert top.temperature == tau


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tau", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("top_p,min_k", [(0.5, 1), (0.9, 3), (1.0, 1), (0.05, 1), (0.3, 8)])
def test_nucleus_against_numpy(dtype, tau, top_p, min_k):
    rng = np.random.default_rng(int(top_p * 100) + min_k)
    x = (rng.normal(size=(12, 300)) * rng.uniform(0.5, 4.0, size=(12, 1))).astype(dtype)
    k = 8
    top = fd.top_k(x, k, temperature=tau, top_p=top_p, min_k=min_k)
    check(top, x, k, tau, top_p, min_k)
    # without top_p: every slot used, the same ids as the cut's prefix
    full = fd.top_k(x, k, temperature=tau)
    assert (full.indices >= 0).all()


def test_nucleus_of_long_rows_and_leading_dims():
    rng = np.random.default_rng(3)
    x = rng.normal(scale=3.0, size=(2, 3, 9000)).astype(np.float32)
    top = fd.top_k(x, 16, top_p=0.8, min_k=2)
    assert top.indices.shape == (2, 3, 16)
    check(fd.SparseTeacher(top.indices.reshape(6, 16), top.values.reshape(6, 16)), x.reshape(6, 9000), 16, 1.0,
          0.8, 2)
    # a loss reads the cut teacher (its -1 slots unused)
    s = rng.normal(size=(2, 3, 9000)).astype(np.float32)
    assert np.isfinite(fd.DistilLoss.kl_divergence(1.0).compute(s, top))


def test_refusals():
    x = np.zeros((2, 10), np.float32)
    for bad in (0.0, -0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(fd.InvalidParameterError, match="top_p"):
            fd.top_k(x, 3, top_p=bad)
    with pytest.raises(fd.InvalidParameterError, match="top_p"):
        fd.top_k(x, 3, top_p="a")
    for bad in (0, -1, 4):
        with pytest.raises(fd.InvalidParameterError, match="min_k"):
            fd.top_k(x, 3, top_p=0.5, min_k=bad)
    with pytest.raises((fd.InvalidParameterError, TypeError), match="min_k"):
        fd.top_k(x, 3, min_k=1.5)


@pytest.mark.skipif(not IN_SIM, reason="runs in the CUDA simulator")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nucleus_on_the_device(dtype):
    from numba import cuda

    rng = np.random.default_rng(11)
    x = (rng.normal(size=(6, 50)) * 2).astype(dtype)
    for top_p, min_k in ((0.6, 1), (0.95, 2), (0.1, 4)):
        got = fd.top_k(cuda.to_device(x), 7, temperature=1.5, top_p=top_p, min_k=min_k, backend="cuda")
        top = fd.SparseTeacher(got.indices.copy_to_host(), got.values.copy_to_host(), temperature=got.temperature)
        check(top, x, 7, 1.5, top_p, min_k)
        want = fd.top_k(x, 7, temperature=1.5, top_p=top_p, min_k=min_k)
        np.testing.assert_array_equal(top.indices, want.indices)

"""``t2_scale`` (the tau**2 factor on or off) and ``vocab_mismatch="truncate"`` (padded vocabularies of
other widths), in the NumPy API, against the float64 references of ``reference.py``."""
from __future__ import annotations

import numpy as np
import pytest

import fastdistill as fd

from reference import divergence, response_rows

IGNORE = -100
TEMPERED = [
    ("kl_divergence", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("skew_kl", {"alpha": 0.2}),
    ("skew_reverse_kl", {"alpha": 0.2}), ("tvd", {}),
]


def _loss(kind, tau, t2_scale, **kw):
    return getattr(fd.DistilLoss, kind)(temperature=tau, t2_scale=t2_scale, **kw)


def _grad_ref(kind, s, t, tau, param, scale):
    """d/ds of scale * sum(rows) by central differences of the float64 reference."""
    from reference import numeric_grad

    return numeric_grad(lambda x: scale * divergence(kind, x, t, tau, param).sum(), s)


@pytest.mark.parametrize("kind,kw", TEMPERED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_t2_scale_false_drops_the_tau_squared_factor(kind, kw, dtype):
    rng = np.random.default_rng(1)
    tau = 3.0
    s = (rng.normal(size=(6, 9)) * 2).astype(dtype)
    t = (rng.normal(size=(6, 9)) * 2).astype(dtype)
    param = kw.get("beta", kw.get("alpha", 0.5))
    ref = divergence(kind, s, t, tau, param)
    unscaled_ref = ref if kind == "tvd" else ref / tau**2  # TVD never carries tau**2
    tol = 2e-6 if dtype == np.float32 else 1e-12

    on = _loss(kind, tau, True, **kw)
    off = _loss(kind, tau, False, **kw)
    assert on.t2_scale is True and off.t2_scale is False
    np.testing.assert_allclose(on.compute(s, t, reduction="none"), ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(off.compute(s, t, reduction="none"), unscaled_ref, rtol=tol, atol=tol)

    loss, grad = off.compute_with_grad(s, t)
    assert loss == pytest.approx(unscaled_ref.mean(), rel=tol, abs=tol)
    factor = 1.0 if kind == "tvd" else tau**2
    g_ref = _grad_ref(kind, s.astype(np.float64), t.astype(np.float64), tau, param, 1.0 / (6 * factor))
    np.testing.assert_allclose(grad, g_ref, rtol=1e-4, atol=1e-6 if dtype == np.float32 else 1e-8)


def test_t2_scale_with_hard_labels_and_combined():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(8, 7)) * 2
    t = rng.normal(size=(8, 7)) * 2
    y = rng.integers(0, 7, size=8)
    y[3] = IGNORE
    for tau in (2.0, 4.0, 5.0):  # the power variants (2, 4) and the plain one
        d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(tau, t2_scale=False), 0.4, 0.6)
        rows, keep = response_rows(s, t, y, 0.4, 0.6 / tau**2, "kl_divergence", tau)
        assert d.loss(s, t, y) == pytest.approx(rows[keep].sum() / keep.sum(), rel=1e-12)
    comb = fd.DistilLoss.combined(0.5, 2.0, temperature=3.0, t2_scale=False)
    ref = 0.5 * divergence("kl_divergence", s, t, 3.0) / 9.0 + 2.0 * divergence("mse", s, t)
    np.testing.assert_allclose(comb.compute(s, t, reduction="none"), ref, rtol=1e-12)


def test_t2_scale_must_be_a_bool():
    with pytest.raises(fd.InvalidParameterError, match="t2_scale must be True or False, got 'no'"):
        fd.DistilLoss.kl_divergence(2.0, t2_scale="no")
    # direct construction has the same field
    assert fd.DistilLoss("reverse_kl", 2.0, t2_scale=False).terms().div_w == 1.0
    assert fd.DistilLoss("reverse_kl", 2.0).terms().div_w == 4.0


# ------------------------------------------------------------------ vocab_mismatch


def _padded(rows, n_s, n_t, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    s = (rng.normal(size=(rows, n_s)) * 2).astype(dtype)
    t = (rng.normal(size=(rows, n_t)) * 2).astype(dtype)
    n = min(n_s, n_t)
    y = rng.integers(0, n, size=rows)
    y[::4] = IGNORE
    return s, t, y, n


@pytest.mark.parametrize("n_s,n_t", [(13, 10), (10, 13)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["kl_divergence", "jsd", "mse"])
def test_truncate_computes_on_the_common_classes(n_s, n_t, dtype, kind):
    s, t, y, n = _padded(9, n_s, n_t, dtype=dtype)
    soft = fd.DistilLoss.mse() if kind == "mse" else getattr(fd.DistilLoss, kind)(temperature=2.0)
    d = fd.ResponseDistiller(soft, 0.3, 0.7, vocab_mismatch="truncate")
    assert d.vocab_mismatch == "truncate"
    rows, keep = response_rows(s[:, :n], t[:, :n], y, 0.3, 0.7, kind, 1.0 if kind == "mse" else 2.0)
    tol = 2e-6 if dtype == np.float32 else 1e-12
    loss, grad = d.loss_and_grad(s, t, y)
    assert loss == pytest.approx(rows[keep].sum() / keep.sum(), rel=tol)
    np.testing.assert_allclose(d.loss(s, t, y, reduction="none"), rows, rtol=tol, atol=tol)
    # the gradient has the student's shape; the classes beyond the common ones get exactly 0
    assert grad.shape == s.shape and grad.dtype == s.dtype
    assert (grad[:, n:] == 0).all()
    equal = fd.ResponseDistiller(soft, 0.3, 0.7)
    _, g_ref = equal.loss_and_grad(np.ascontiguousarray(s[:, :n]), np.ascontiguousarray(t[:, :n]), y)
    np.testing.assert_array_equal(grad[:, :n], g_ref)  # the same kernels on the same values


def test_truncate_split_rows_in_place_and_leading_dims():
    # one long row: its passes are split into column chunks over threads
    s, t, y, n = _padded(1, 20_000, 20_480, seed=3)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(4.0), 0.5, 0.5, vocab_mismatch="truncate")
    y[:] = 7
    rows, _ = response_rows(s[:, :n], t[:, :n], y, 0.5, 0.5, "kl_divergence", 4.0)
    loss, grad = d.loss_and_grad(s, t, y)
    assert loss == pytest.approx(rows.sum(), rel=1e-12)
    # the student wider, gradient written over the student itself, (B, T, V) inputs
    s, t, y, n = _padded(12, 21, 16, seed=4)
    s3, t3, y3 = s.reshape(3, 4, 21), t.reshape(3, 4, 16), y.reshape(3, 4)
    _, expected = d.loss_and_grad(s3, t3, y3)
    buf = s3.copy()
    loss, g = d.loss_and_grad(buf, t3, y3, grad_out=buf)
    assert g is buf
    np.testing.assert_allclose(buf, expected, rtol=1e-13, atol=1e-17)  # (aliasing may vectorise otherwise)
    assert (buf[..., n:] == 0).all()


def test_truncate_refuses_what_it_cannot_compute():
    s, t, y, n = _padded(4, 12, 9)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5, vocab_mismatch="truncate")
    bad = y.copy()
    bad[1] = 10  # a valid class of the student, beyond the common width
    with pytest.raises(fd.LabelOutOfRangeError, match="labels\\[1\\] = 10 is out of range for 9 classes"):
        d.loss(s, t, bad)
    with pytest.raises(fd.TeacherStudentMismatchError):  # leading dims must still agree
        d.loss(s, t[:3], y)
    with pytest.raises(fd.TeacherStudentMismatchError, match="teacher shape \\(4, 9\\) differs"):
        fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5).loss(s, t, y)  # default: "error"
    with pytest.raises(fd.InvalidParameterError, match="vocab_mismatch must be one of"):
        fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5, vocab_mismatch="pad")

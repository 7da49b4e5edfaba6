"""Inputs that once gave a wrong number with no error (sparse teachers' values and tails, wrapped
unsigned ids, a gradient buffer over another input, far-out temperatures, an out-of-range
``ignore_index``): each against a float64 reference written from the definitions, or the error the
contract names."""
from __future__ import annotations

import numpy as np
import pytest

import fastdistill as fd
from fastdistill.sparse import SparseTeacher, SparseTeacherIndexError

KL = fd.DistilLoss.kl_divergence


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, -1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _logsumexp(x):
    m = np.max(x)
    return m + np.log(np.exp(x - m).sum()) if np.isfinite(m) else m


# ------------------------------------------------------------ 1. non-finite teacher values


S1 = np.array([[1.0, 2.0, 0.5, -1.0]])


@pytest.mark.parametrize("tail", ["renormalize", "support", "bucket"])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_nan_or_plus_inf_teacher_value_gives_a_nan_loss(tail, bad):
    """The dense rule: a NaN (or +inf, no distribution) teacher value makes its row's loss NaN, not 0
    beside a NaN gradient. (bucket: +inf is a log-probability above 0, refused.)"""
    teacher = SparseTeacher(np.array([[0, 1]]), np.array([[bad, -1.0]]), tail=tail)
    if tail == "bucket" and bad == np.inf:
        with pytest.raises(fd.InvalidParameterError, match="values"):
            KL(1.0).compute_with_grad(S1, teacher)
        return
    loss, grad = KL(1.0).compute_with_grad(S1, teacher)
    assert np.isnan(loss)
    assert np.isnan(grad).all()
    rows = KL(1.0).compute(np.vstack([S1, S1]), SparseTeacher(np.array([[0, 1], [0, 1]]),
                                                              np.array([[bad, -1.0], [-0.5, -1.0]]), tail=tail),
                           reduction="none")
    assert np.isnan(rows[0]) and np.isfinite(rows[1])


@pytest.mark.parametrize("tail", ["renormalize", "support"])
def test_a_support_of_only_minus_inf_values_gives_a_nan_loss(tail):
    """p = w / sum w with every w = 0: no teacher distribution, the row is NaN (its gradient too)."""
    teacher = SparseTeacher(np.array([[0, 1]]), np.array([[-np.inf, -np.inf]]), tail=tail)
    loss, grad = KL(1.0).compute_with_grad(S1, teacher)
    assert np.isnan(loss) and np.isnan(grad).all()


def test_bucket_with_every_value_minus_inf_puts_the_teacher_in_the_rest_bin():
    """bucket: p_rest = 1, so the loss is -log q_rest (the student's mass off the support)."""
    teacher = SparseTeacher(np.array([[0, 1]]), np.array([[-np.inf, -np.inf]]), tail="bucket")
    loss, grad = KL(1.0).compute_with_grad(S1, teacher)
    lq = _log_softmax(S1)[0]
    q = np.exp(lq)
    q_rest = q[2:].sum()
    assert loss == pytest.approx(-np.log(q_rest), rel=1e-12)
    # d(-log q_rest)/ds_j = q_j - [j not in S] q_j / q_rest
    ref = q.copy()
    ref[2:] -= q[2:] / q_rest
    np.testing.assert_allclose(grad[0], ref, rtol=1e-12, atol=1e-15)


def test_nan_teacher_value_through_torch():
    torch = pytest.importorskip("torch")
    from fastdistill.torch import DistillationLoss

    s = torch.tensor(S1, requires_grad=True)
    teacher = SparseTeacher(torch.tensor([[0, 1]]), torch.tensor([[np.nan, -1.0]]))
    loss = DistillationLoss(soft_loss="kl_divergence", hard_label_weight=0.0, soft_label_weight=1.0)(s, teacher)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(s.grad).all()


# ------------------------------------------------------------ 2. support tail, underflowing student mass


def _support_reference(s, ids, lp_teacher, tau):
    """Forward KL of the support-renormalised teacher and student (tau^2 scaled), and its gradient."""
    x = np.asarray(s, np.float64)[ids] / tau
    lq = x - _logsumexp(x)
    lp = lp_teacher / tau - _logsumexp(lp_teacher / tau)
    p = np.exp(lp)
    loss = tau * tau * float(np.sum(p * (lp - lq)))
    g = np.zeros(len(s))
    g[ids] = tau * (np.exp(lq) - p)
    return loss, g


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_support_tail_with_a_masked_student_support(dtype):
    s = np.array([[0.3, -0.2, 1.1, -1e9, -1e9, -1e9]], dtype)
    ids = np.array([3, 4, 5])
    lp = np.log(np.array([0.5, 0.3, 0.2]))
    loss, grad = KL(1.0).compute_with_grad(s, SparseTeacher(ids[None], lp[None], tail="support"))
    ref, g_ref = _support_reference(s[0], ids, lp, 1.0)
    assert ref == pytest.approx(0.068959, abs=1e-6)  # the number, from the definition
    assert loss == pytest.approx(ref, rel=1e-5)
    np.testing.assert_allclose(grad[0], g_ref, rtol=1e-5, atol=1e-7)


def test_support_tail_at_a_tiny_temperature_and_a_large_gap():
    tau = 0.05
    s = np.array([[40.0, 0.0, 0.3, -0.4, 1.0, 0.2]])
    ids = np.array([1, 2, 3])
    lp = np.log(np.array([0.5, 0.3, 0.2]))
    loss, grad = KL(tau).compute_with_grad(s, SparseTeacher(ids[None], lp[None], tail="support"))
    ref, g_ref = _support_reference(s[0], ids, lp, tau)
    assert np.isfinite(loss) and loss == pytest.approx(ref, rel=1e-9)
    np.testing.assert_allclose(grad[0], g_ref, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------ 3. bucket's rest bin, summed directly


def _bucket_reference(s, ids, lp_teacher):
    """Forward KL over the k + 1 bins (tau = 1), the rest bins summed directly, and its gradient."""
    s = np.asarray(s, np.float64)
    lq = _log_softmax(s)
    rest = np.ones(len(s), bool)
    rest[ids] = False
    lq_rest = _logsumexp(lq[rest])
    p = np.exp(lp_teacher)
    p_rest = max(0.0, 1.0 - p.sum())
    loss = float(np.sum(p * (lp_teacher - lq[ids])))
    if p_rest > 0:
        loss += p_rest * (np.log(p_rest) - lq_rest)
    q = np.exp(lq)
    # dD/ds_j = q_j - p_bin(j) * q_j / q_bin(j)
    g = q.copy()
    g[ids] -= p
    g[rest] -= p_rest * np.exp(lq[rest] - lq_rest)
    return loss, g


@pytest.mark.parametrize("gap", [38.0, 42.0, 45.0, 80.0, 100.0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("want_grad", [True, False])
def test_bucket_rest_bin_of_a_confident_student(gap, dtype, want_grad):
    """(The rest summed from the kept float32 exponentials or computed, relative to the row's maximum
    or, past gap ~ 50, to the outside columns' own.)"""
    s = np.full(1000, -gap)
    s[:4] = 0.0
    s[500] = -gap + 1.0
    ids = np.arange(4)
    lp = np.log(np.array([0.4, 0.3, 0.1, 0.1]))
    teacher = SparseTeacher(ids[None], lp[None], tail="bucket")
    ref, g_ref = _bucket_reference(s, ids, lp)
    tol = 1e-9 if dtype == np.float64 else 1e-5
    if not want_grad:
        assert KL(1.0).compute(s[None].astype(dtype), teacher) == pytest.approx(ref, rel=tol)
        return
    loss, grad = KL(1.0).compute_with_grad(s[None].astype(dtype), teacher)
    assert loss == pytest.approx(ref, rel=tol)
    # the outside columns pull the student's rest mass up: a negative gradient
    assert (grad[0, 4:] < 0).all()
    np.testing.assert_allclose(grad[0], g_ref, rtol=10 * tol, atol=0)


@pytest.mark.parametrize("kind", ["jsd", "tvd"])
def test_renormalize_outside_bin_of_a_confident_student(kind):
    """The renormalize tail's outside bin (read by mixtures and TVD) is summed directly too: at a gap of
    50, 1 - sum_S q is exactly 0 and the outside columns' gradient (their share of the outside bin's
    derivative) was lost."""
    torch = pytest.importorskip("torch")
    loss_fn = fd.DistilLoss.jsd(0.5, 1.0) if kind == "jsd" else fd.DistilLoss.tvd(1.0)
    s = np.full(1000, -50.0)
    s[:4] = 0.0
    p = np.array([0.4, 0.3, 0.2, 0.1])
    loss, grad = loss_fn.compute_with_grad(s[None], SparseTeacher(np.arange(4)[None], np.log(p)[None]))
    st = torch.tensor(s, requires_grad=True)
    q = torch.softmax(st, 0)
    pt = torch.tensor(p)
    if kind == "tvd":
        ref = 0.5 * ((pt - q[:4]).abs().sum() + q[4:].sum())
    else:  # beta = 0.5: outside the support m = q / 2
        m = 0.5 * pt + 0.5 * q[:4]
        ref = 0.5 * (pt * (pt / m).log()).sum() + 0.5 * (q[:4] * (q[:4] / m).log()).sum() \
            + 0.5 * (q[4:] * np.log(2.0)).sum()
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-9, abs=0)
    g_ref = st.grad.numpy()
    assert np.all(g_ref[4:] != 0)
    np.testing.assert_allclose(grad[0], g_ref, rtol=1e-9, atol=0)


# ------------------------------------------------------------ 4. bucket log-probabilities above 0


def test_bucket_refuses_log_probabilities_above_zero():
    with pytest.raises(fd.InvalidParameterError, match=r"values\[0, 1\] = 3.0 \(row 0, slot 1\)"):
        KL(1.0).compute(np.zeros((1, 4)), SparseTeacher(np.array([[0, 1]]), np.array([[-1.0, 3.0]]), tail="bucket"))
    # an unused slot's value is ignored, as everywhere
    KL(1.0).compute(np.zeros((1, 4)), SparseTeacher(np.array([[0, -1]]), np.array([[-1.0, 3.0]]), tail="bucket"))


# ------------------------------------------------------------ 5. unsigned ids and labels above int64


def test_uint64_ids_above_int64_are_refused_not_wrapped():
    s = np.zeros((1, 5))
    for bad in (2**64 - 1, 2**64 - 100, 2**63):
        teacher = SparseTeacher(np.array([[1, bad]], np.uint64), np.array([[-1.0, -2.0]]))
        with pytest.raises(SparseTeacherIndexError, match=str(bad)):
            KL(1.0).compute(s, teacher)


def test_uint64_labels_above_int64_are_refused_not_wrapped():
    s = np.zeros((2, 5))
    d = fd.ResponseDistiller(KL(1.0), 0.5, 0.5)
    for bad in (2**64 - 1, 2**64 - 100, 2**63):
        with pytest.raises(fd.LabelOutOfRangeError, match=str(bad)) as err:
            d.loss(s, s, np.array([1, bad], np.uint64))
        assert err.value.label == bad
    assert d.loss(s, s, np.array([1, 4], np.uint64)) == pytest.approx(np.log(5.0) * 0.5)


def test_torch_uint64_labels_are_refused_not_wrapped():
    torch = pytest.importorskip("torch")
    from fastdistill.torch import DistillationLoss

    s = torch.zeros(2, 5, requires_grad=True)
    loss = DistillationLoss(soft_loss="kl_divergence", hard_label_weight=0.5, soft_label_weight=0.5)
    with pytest.raises(TypeError, match="uint64"):
        loss(s, s.detach(), torch.tensor([1, 2**64 - 100], dtype=torch.uint64))
    # the same labels as int64 (in range) are fine: half the CE of a uniform row, averaged over both rows
    out = loss(s, s.detach(), torch.tensor([1, 3], dtype=torch.int64))
    assert float(out.detach()) == pytest.approx(0.5 * np.log(5.0))


# ------------------------------------------------------------ 6, 7. grad_out over another input


def test_grad_out_overlapping_the_student_at_an_offset_is_refused():
    rng = np.random.default_rng(0)
    buf = rng.normal(size=(5, 6))
    s = buf[:4]
    t = rng.normal(size=(4, 6))
    for g in (buf[1:], buf.reshape(-1)[3:27].reshape(4, 6)):
        before = buf.copy()
        with pytest.raises(fd.InvalidParameterError, match="grad_out"):
            KL(1.0).compute_with_grad(s, t, grad_out=g)
        np.testing.assert_array_equal(buf, before)
    # exactly the student's memory: the documented in-place update
    ref_loss, ref_grad = KL(1.0).compute_with_grad(s.copy(), t)
    loss, g = KL(1.0).compute_with_grad(s, t, grad_out=s)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(buf[:4], ref_grad, rtol=1e-12)


def test_grad_out_overlapping_the_student_with_a_sparse_teacher_is_refused():
    buf = np.random.default_rng(1).normal(size=(3, 4))
    teacher = SparseTeacher(np.array([[0, 1], [1, 2]]), np.array([[-0.5, -1.0], [-0.3, -2.0]]))
    with pytest.raises(fd.InvalidParameterError, match="grad_out"):
        KL(1.0).compute_with_grad(buf[:2], teacher, grad_out=buf[1:])


def test_grad_out_over_a_converted_teacher_is_refused():
    """The teacher converted for the kernels (float64 beside a float32 student; bfloat16 beside
    float16): the caller's own teacher array is still checked against grad_out."""
    rng = np.random.default_rng(2)
    t = rng.normal(size=(3, 8))
    s = rng.normal(size=(3, 8)).astype(np.float32)
    g = t.view(np.float32).reshape(-1)[:24].reshape(3, 8)  # float32 over the teacher's bytes
    before = t.copy()
    with pytest.raises(fd.InvalidParameterError, match="teacher"):
        KL(1.0).compute_with_grad(s, t, grad_out=g)
    np.testing.assert_array_equal(t, before)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    tb = rng.normal(size=(3, 8)).astype(ml_dtypes.bfloat16)
    sh = rng.normal(size=(3, 8)).astype(np.float16)
    tb_before = tb.copy()
    with pytest.raises(fd.InvalidParameterError, match="teacher"):
        KL(1.0).compute_with_grad(sh, tb, grad_out=tb.view(np.float16))
    np.testing.assert_array_equal(tb.view(np.uint16), tb_before.view(np.uint16))


# ------------------------------------------------------------ 14. temperatures beyond the documented bound


def test_temperatures_above_the_bound_are_refused():
    from fastdistill._spec import MAX_TEMPERATURE

    assert MAX_TEMPERATURE == 1e4
    for tau in (1e8, 1e30, 1.0001e4):
        with pytest.raises(fd.InvalidParameterError, match="temperature"):
            KL(tau)
        with pytest.raises(fd.InvalidParameterError, match="temperature"):
            fd.DistilLoss.jsd(0.5, tau)
    # at the bound: tau^2 KL tends to half the variance of (t - s) under the uniform distribution; the
    # float64 value at tau = 1e4 meets the series to 1e-6
    rng = np.random.default_rng(3)
    s = rng.normal(size=(1, 50))
    t = rng.normal(size=(1, 50))
    tau = 1e4
    d = (t - s)[0] / tau
    # second-order expansion of tau^2 KL(softmax(t/tau) || softmax(s/tau)) around the uniform distribution
    limit = 0.5 * np.var(d) * tau * tau
    assert KL(tau).compute(s, t) == pytest.approx(limit, rel=1e-3)
    exact_small = KL(1e4).compute(s, t)
    assert KL(5e3).compute(s, t) == pytest.approx(exact_small, rel=1e-3)


# ------------------------------------------------------------ 15. ignore_index outside the classes


def test_an_ignore_index_at_or_above_the_classes_is_accepted():
    rng = np.random.default_rng(4)
    s = rng.normal(size=(4, 10))
    t = rng.normal(size=(4, 10))
    y = np.array([1, 1000, 3, 1000])
    d = fd.ResponseDistiller(KL(2.0), 0.5, 0.5, ignore_index=1000)
    loss, grad = d.loss_and_grad(s, t, y)
    kept = [0, 2]
    ref_loss, ref_grad = fd.ResponseDistiller(KL(2.0), 0.5, 0.5).loss_and_grad(s[kept], t[kept], y[kept])
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(grad[kept], ref_grad, rtol=1e-12)
    np.testing.assert_array_equal(grad[[1, 3]], 0.0)
    # still refused: a label that is neither a class nor ignore_index, with a message that says so
    with pytest.raises(fd.LabelOutOfRangeError, match=r"labels\[1\] = 999 .*10 classes"):
        d.loss(s, t, np.array([1, 999, 3, 1000]))

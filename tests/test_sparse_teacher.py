"""Sparse (top-k) teachers: every tail x divergence x temperature against float64 PyTorch autograd
references written from the contract's formulas, the identities the contract names, validation, and
``top_k``."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import fastdistill as fd
from conftest import IGNORE, rel_err
from fastdistill import top_k
from fastdistill.sparse import SparseTeacher, SparseTeacherIndexError

torch = pytest.importorskip("torch")
F = torch.nn.functional

SOFT = {
    "kl_divergence": lambda tau: fd.DistilLoss.kl_divergence(tau),
    "reverse_kl": lambda tau: fd.DistilLoss.reverse_kl(tau),
    "jsd": lambda tau: fd.DistilLoss.jsd(0.3, tau),
    "skew_kl": lambda tau: fd.DistilLoss.skew_kl(0.2, tau),
    "skew_reverse_kl": lambda tau: fd.DistilLoss.skew_reverse_kl(0.2, tau),
    "tvd": lambda tau: fd.DistilLoss.tvd(tau),
    "alpha_divergence": lambda tau: fd.DistilLoss.alpha_divergence(0.4, tau),
}


def batch(rows, n, k, seed, pad=False):
    """Student logits, a teacher's top-k ids and exact log-probabilities, labels (some ignored)."""
    rng = np.random.default_rng(seed)
    s = rng.normal(scale=2.0, size=(rows, n))
    t = rng.normal(scale=2.0, size=(rows, n)) + 0.5 * s
    idx = np.argsort(-t, axis=1, kind="stable")[:, :k].copy()
    lp = t - np.log(np.exp(t).sum(1, keepdims=True))
    vals = np.take_along_axis(lp, idx, 1)
    if pad:  # a few unused slots
        idx[0, -2:] = -1
        idx[min(1, rows - 1), -1] = -1
    y = rng.integers(0, n, rows)
    if rows > 2:
        y[1] = IGNORE
    return s, idx, vals, y


def divergence(kind, p, q, lp, lq, beta=0.3, alpha=0.2, amari=0.4):
    """A divergence between distributions over the last axis (float64 torch; 0 log 0 = 0)."""
    def kl(a, la, lb):
        return (a * torch.where(a > 0, la - lb, torch.zeros_like(a))).sum(-1)

    def mix_log(w_p, w_q):  # log(w_p p + w_q q)
        parts = []
        if w_p > 0:
            parts.append(lp + np.log(w_p))
        if w_q > 0:
            parts.append(lq + np.log(w_q))
        return torch.logsumexp(torch.stack(parts), 0)

    if kind == "kl_divergence":
        return kl(p, lp, lq)
    if kind == "reverse_kl":
        return kl(q, lq, lp)
    if kind == "jsd":
        lm = mix_log(beta, 1 - beta)
        return beta * kl(p, lp, lm) + (1 - beta) * kl(q, lq, lm)
    if kind == "skew_kl":
        return kl(p, lp, mix_log(alpha, 1 - alpha))
    if kind == "skew_reverse_kl":
        return kl(q, lq, mix_log(1 - alpha, alpha))
    if kind == "alpha_divergence":  # (1 - sum p^a q^(1-a)) / (a (1 - a)); log 0 stand-ins of -1e30 give 0
        return (1 - torch.exp(amari * lp.clamp(min=-1e30) + (1 - amari) * lq.clamp(min=-1e30)).sum(-1)) / \
            (amari * (1 - amari))
    return 0.5 * (p - q).abs().sum(-1)


def reference(kind, tail, s, idx, vals, y, tau, hard_w, soft_w, reduction="mean", t_gen=1.0):
    """(loss, grad) by float64 autograd, from the contract's definitions of the tails: the support's
    weights ``exp(v * t_gen / tau)`` (values produced at temperature ``t_gen``)."""
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    rows, n = s.shape
    valid = torch.tensor(idx >= 0)
    ids = torch.tensor(np.where(idx >= 0, idx, 0))
    v = torch.tensor(vals, dtype=torch.float64)
    neg = torch.full_like(v, -np.inf)
    lq_full = F.log_softmax(st / tau, -1)
    s_sup = torch.gather(st, 1, ids)
    if tail == "renormalize":
        lp_sup = F.log_softmax(torch.where(valid, v * t_gen / tau, neg), -1)
        lp_full = torch.full((rows, n), -np.inf, dtype=torch.float64)  # 0 off the support
        for r in range(rows):
            for b in range(idx.shape[1]):
                if idx[r, b] >= 0:
                    lp_full[r, idx[r, b]] = lp_sup[r, b]
        soft = divergence(kind, lp_full.exp(), lq_full.exp(), lp_full, lq_full)
    elif tail == "support":
        lp = F.log_softmax(torch.where(valid, v * t_gen / tau, neg), -1)
        lq = F.log_softmax(torch.where(valid, s_sup / tau, torch.full_like(s_sup, -np.inf)), -1)
        # unused slots: probability 0, finite stand-ins for their logarithms (autograd of log 0 is NaN)
        lp = torch.where(valid, lp, torch.full_like(lp, -1e30))
        lq = torch.where(valid, lq, torch.full_like(lq, -1e30))
        soft = divergence(kind, lp.exp(), lq.exp(), lp, lq)
    else:  # bucket, tau == t_gen
        assert tau == t_gen
        p = torch.where(valid, v.exp(), torch.zeros_like(v))
        q = torch.where(valid, torch.gather(lq_full.exp(), 1, ids), torch.zeros_like(v))
        p_rest = torch.clamp(1 - p.sum(-1, keepdim=True), min=0.0)
        # the student's mass off the support, summed over those columns (not 1 - sum q: it cancels)
        lq_off = lq_full.clone()
        for r in range(rows):
            for b in range(idx.shape[1]):
                if idx[r, b] >= 0:
                    lq_off[r, idx[r, b]] = -np.inf
        q_rest = torch.logsumexp(lq_off, -1, keepdim=True).exp()
        pb = torch.cat([p, p_rest], -1)
        qb = torch.cat([q, q_rest], -1)
        soft = divergence(kind, pb, qb, torch.log(pb), torch.log(qb))
    t2 = 1.0 if kind == "tvd" else tau * tau
    rows_loss = soft_w * t2 * soft
    keep = torch.tensor(y != IGNORE)
    if hard_w:
        ce = F.cross_entropy(st, torch.tensor(np.where(y == IGNORE, 0, y)), reduction="none")
        rows_loss = rows_loss + hard_w * ce
    rows_loss = torch.where(keep, rows_loss, torch.zeros_like(rows_loss))
    total = rows_loss.sum() / keep.sum() if reduction == "mean" else rows_loss.sum()
    total.backward()
    return float(total.detach()), st.grad.numpy()


CASES = [(kind, tail, tau) for tail in ("renormalize", "support", "bucket") for kind in SOFT
         for tau in ((1.0,) if tail == "bucket" else (1.0, 2.5))
         if not (tail == "renormalize" and kind == "reverse_kl")]


@pytest.mark.parametrize("kind,tail,tau", CASES, ids=[f"{t}-{k}-T{tau}" for k, t, tau in CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_tail_and_divergence_against_float64(kind, tail, tau, dtype):
    s, idx, vals, y = batch(9, 61, 7, seed=len(kind) + int(tau * 10), pad=True)
    s = s.astype(dtype)
    teacher = SparseTeacher(idx, vals.astype(np.float32), tail=tail)
    d = fd.ResponseDistiller(SOFT[kind](tau), 0.3, 0.7)
    loss, grad = d.loss_and_grad(s, teacher, y)
    ref_loss, ref_grad = reference(kind, tail, s.astype(np.float64), idx, vals.astype(np.float32).astype(np.float64),
                                   y, tau, 0.3, 0.7)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    assert loss == pytest.approx(ref_loss, rel=tol)
    assert grad.dtype == dtype and grad.shape == s.shape
    assert rel_err(grad, ref_grad) < tol
    rows = d.loss(s, teacher, y, reduction="none")
    assert rows[1] == 0.0 and rows.shape == (9,)
    assert float(rows.astype(np.float64).sum()) / 8 == pytest.approx(loss, rel=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("tau", [2.0, 4.0, 3.0])
@pytest.mark.parametrize("tail", ["renormalize", "support"])
def test_long_rows_in_spans_and_the_power_trick(tau, tail):
    """Rows wider than the statistics pass's span (several spans, the maximum in a later one, a first
    span masked whole), label smoothing, float32 at T = 2 and 4 (the cross-entropy's normaliser from the
    divergence's exponentials) and 3 (two exponentials): within 1e-5 of the float64 reference."""
    from fastdistill.cpu._sparse import SPAN

    n = 2 * SPAN + 37
    s, idx, vals, y = batch(4, n, 9, seed=int(tau * 7), pad=True)
    s[2, :SPAN] = -np.inf  # the first span of a row masked
    s[3, -5] = 12.0  # the maximum in the last span
    y[2] = SPAN + 3
    idx[2] = np.argsort(-s[2])[:9]  # (the support among its finite columns)
    d = fd.ResponseDistiller(SOFT["kl_divergence"](tau), 0.4, 0.6, label_smoothing=0.0)
    teacher = SparseTeacher(idx, vals.astype(np.float32), tail=tail)
    loss, grad = d.loss_and_grad(s.astype(np.float32), teacher, y)
    ref_loss, ref_grad = reference("kl_divergence", tail, s.astype(np.float32).astype(np.float64), idx,
                                   vals.astype(np.float32).astype(np.float64), y, tau, 0.4, 0.6)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert rel_err(grad, ref_grad) < 1e-5
    # label smoothing's logit sum over the spans (no masked class: it would be infinite)
    s2 = np.where(np.isinf(s), -30.0, s).astype(np.float32)
    ds = fd.ResponseDistiller(SOFT["kl_divergence"](tau), 0.4, 0.6, label_smoothing=0.1)
    got = ds.loss(s2, teacher, y)
    dense_ce = fd.ResponseDistiller(SOFT["kl_divergence"](tau), 0.4, 0.0, label_smoothing=0.1).loss(s2, s2, y)
    no_ce = fd.ResponseDistiller(SOFT["kl_divergence"](tau), 0.0, 0.6).loss(s2, teacher, y)
    assert got == pytest.approx(dense_ce + no_ce, rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0, 3.0])
def test_nan_and_plus_inf_logits_give_nan_rows(tau):
    # a +inf logit has no softmax (inf - inf): its row's loss and gradient are NaN, as a NaN logit's,
    # in the first span or a later one; the other rows are untouched
    from fastdistill.cpu._sparse import SPAN

    n = SPAN + 500
    s, idx, vals, _ = batch(5, n, 6, seed=15)
    y = np.array([1, 2, 3, 4, 5])  # (no ignored row)
    s = s.astype(np.float32)
    s[0, 3] = np.inf
    s[1, SPAN + 7] = np.inf
    s[2, 11] = np.nan
    s[3, SPAN + 2] = np.nan
    d = fd.ResponseDistiller(SOFT["kl_divergence"](tau), 0.5, 0.5)
    rows, grad = d.loss_and_grad(s, SparseTeacher(idx, vals), y, reduction="none")
    assert np.isnan(rows[:4]).all() and np.isnan(grad[:4]).all()
    clean = d.loss_and_grad(s[4:], SparseTeacher(idx[4:], vals[4:]), y[4:], reduction="none")
    assert np.isfinite(rows[4]) and rows[4] == clean[0][0] and np.array_equal(grad[4], clean[1][0])
    top = top_k(s, 4, temperature=tau)
    assert np.isnan(top.values[:4]).all() and np.isfinite(top.values[4]).all()


@pytest.mark.parametrize("kind", list(SOFT))
def test_every_class_with_renormalize_equals_the_dense_teacher(kind):
    if kind == "reverse_kl":
        pytest.skip("refused with tail='renormalize'")
    rng = np.random.default_rng(3)
    s = rng.normal(size=(6, 30))
    t = rng.normal(size=(6, 30))
    order = np.argsort(rng.random((6, 30)), axis=1)  # every class, in any order
    lp = t - np.log(np.exp(t).sum(1, keepdims=True))
    teacher = SparseTeacher(order, np.take_along_axis(lp, order, 1), tail="renormalize")
    d = fd.ResponseDistiller(SOFT[kind](2.0), 0.5, 0.5)
    y = rng.integers(0, 30, 6)
    a, ga = d.loss_and_grad(s, teacher, y)
    b, gb = d.loss_and_grad(s, t, y)
    assert a == pytest.approx(b, rel=1e-10)
    assert rel_err(ga, gb) < 1e-10


@pytest.mark.parametrize("tail", ["support", "bucket"])
@pytest.mark.parametrize("kind", ["kl_divergence", "reverse_kl", "jsd", "tvd"])
def test_a_teacher_of_the_students_own_top_k_gives_zero(tail, kind):
    s, _, _, _ = batch(5, 40, 1, seed=4)
    own = top_k(s, 8)
    loss, grad = SOFT[kind](1.0).compute_with_grad(s, SparseTeacher(own.indices, own.values, tail=tail))
    assert abs(loss) < 1e-9
    if kind != "tvd":  # (|p - q| has no derivative where p == q)
        assert np.max(np.abs(grad)) < 1e-9


def test_reductions_num_items_leading_dims_and_ignored_rows():
    s, idx, vals, y = batch(12, 33, 5, seed=5)
    d = fd.ResponseDistiller(fd.DistilLoss.jsd(0.5, 2.0), 0.5, 0.5)
    teacher = SparseTeacher(idx.reshape(3, 4, 5), vals.reshape(3, 4, 5))
    rows = d.loss(s.reshape(3, 4, 33), teacher, y.reshape(3, 4), reduction="none")
    assert rows.shape == (3, 4)
    total, g_sum = d.loss_and_grad(s.reshape(3, 4, 33), teacher, y.reshape(3, 4), reduction="sum")
    assert total == pytest.approx(float(rows.sum()), rel=1e-12) and g_sum.shape == (3, 4, 33)
    mean, g_mean = d.loss_and_grad(s.reshape(3, 4, 33), teacher, y.reshape(3, 4), num_items=40)
    assert mean == pytest.approx(total / 40, rel=1e-12)
    np.testing.assert_allclose(g_mean, g_sum / 40, rtol=1e-12)
    y_all = np.full(12, IGNORE)
    loss, g = d.loss_and_grad(s, SparseTeacher(idx, vals), y_all)
    assert loss == 0.0 and not g.any()


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_student_and_values(half):
    dt = np.dtype(np.float16) if half == "float16" else np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    s, idx, vals, y = batch(8, 70, 6, seed=6)
    sh = s.astype(dt)
    teacher = SparseTeacher(idx.astype(np.int32), vals.astype(np.float16))
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5)
    loss, grad = d.loss_and_grad(sh, teacher, y)
    assert grad.dtype == dt
    ref_loss, ref_grad = reference("kl_divergence", "renormalize", sh.astype(np.float64), idx,
                                   vals.astype(np.float16).astype(np.float64), y, 2.0, 0.5, 0.5)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    bits = 7 if half == "bfloat16" else 10
    e = np.floor(np.log2(np.maximum(np.abs(ref_grad), 1e-300)))
    ulp = 2.0 ** (np.maximum(e, -126 if half == "bfloat16" else -14) - bits)
    assert np.all(np.abs(grad.astype(np.float64) - ref_grad) <= ulp + 1e-6 * np.abs(ref_grad).max())


def test_no_temporary_of_the_logits_size():
    s, idx, vals, y = batch(256, 4096, 32, seed=7)
    s = s.astype(np.float32)
    teacher = SparseTeacher(idx.astype(np.int32), vals.astype(np.float16))
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5)
    g = np.empty_like(s)
    d.loss_and_grad(s, teacher, y, grad_out=g)
    for call in (lambda: d.loss(s, teacher, y), lambda: d.loss_and_grad(s, teacher, y, grad_out=g)):
        tracemalloc.start()
        call()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 0.1 * s.nbytes, peak


# ------------------------------------------------------------------ validation


def test_bad_sparse_teachers_are_refused_with_clear_errors():
    s, idx, vals, y = batch(4, 20, 3, seed=8)
    kl = fd.DistilLoss.kl_divergence(1.0)
    bad = idx.copy()
    bad[2, 1] = 20
    with pytest.raises(SparseTeacherIndexError, match="index 20 in row 2 .* out of range for 20 classes") as e:
        kl.compute(s, SparseTeacher(bad, vals))
    assert isinstance(e.value, ValueError) and isinstance(e.value, fd.FastDistillError)
    bad[2, 1] = -2
    with pytest.raises(SparseTeacherIndexError, match="index -2 in row 2"):
        kl.compute(s, SparseTeacher(bad, vals))
    dup = idx.copy()
    dup[3, 2] = dup[3, 0]
    with pytest.raises(SparseTeacherIndexError, match=f"index {dup[3, 0]} appears twice in row 3"):
        kl.compute(s, SparseTeacher(dup, vals))
    with pytest.raises(fd.DimensionMismatchError, match="leading dims"):
        kl.compute(s, SparseTeacher(idx[:3], vals[:3]))
    with pytest.raises(fd.DimensionMismatchError, match="must be equal"):
        SparseTeacher(idx, vals[:, :2])
    with pytest.raises(TypeError, match="integer"):
        SparseTeacher(idx.astype(np.float32), vals)
    with pytest.raises(fd.InvalidParameterError, match="infinite with tail='renormalize'"):
        fd.DistilLoss.reverse_kl(1.0).compute(s, SparseTeacher(idx, vals))
    with pytest.raises(fd.InvalidParameterError, match="infinite with tail='renormalize'"):
        fd.DistilLoss.jsd(1.0, 1.0).compute(s, SparseTeacher(idx, vals))
    with pytest.raises(fd.InvalidParameterError, match="infinite with tail='renormalize'"):
        fd.DistilLoss.alpha_divergence(0.0, 1.0).compute(s, SparseTeacher(idx, vals))
    with pytest.raises(fd.InvalidParameterError, match="bucket' needs kind='logprobs' and the loss's temperature"):
        fd.DistilLoss.kl_divergence(2.0).compute(s, SparseTeacher(idx, vals, tail="bucket"))
    with pytest.raises(fd.InvalidParameterError, match="bucket' needs kind='logprobs'"):
        kl.compute(s, SparseTeacher(idx, vals, kind="logits", tail="bucket"))
    for dense_only in (fd.DistilLoss.mse(), fd.DistilLoss.cosine(), fd.DistilLoss.combined(1.0, 0.5, 2.0)):
        with pytest.raises(fd.InvalidParameterError, match="dense teacher logits"):
            dense_only.compute(s, SparseTeacher(idx, vals))
    with pytest.raises(fd.InvalidParameterError, match="tail must be one of"):
        SparseTeacher(idx, vals, tail="rest")
    # -1 padding is fine; a row with no entry at all has no teacher distribution: NaN, not a number
    pad = idx.copy()
    pad[0, :] = -1
    rows = kl.compute(s, SparseTeacher(pad, vals), reduction="none")
    assert np.isnan(rows[0]) and np.isfinite(rows[1:]).all()
    # inputs are not modified
    before = (s.copy(), idx.copy(), vals.copy())
    fd.ResponseDistiller.balanced().loss_and_grad(s, SparseTeacher(idx, vals), y)
    assert all(np.array_equal(a, b) for a, b in zip(before, (s, idx, vals)))


# ------------------------------------------------------------------ top_k


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_top_k_ids_and_exact_log_probabilities(dtype, tau):
    rng = np.random.default_rng(9)
    x = rng.normal(size=(6, 1000)).astype(dtype)
    x[0, [5, 17, 900]] = x[0].max() + 1  # ties: the lower id first
    got = top_k(x, 16, temperature=tau)
    assert got.kind == "logprobs" and got.indices.dtype == np.int32 and got.indices.shape == (6, 16)
    x64 = x.astype(np.float64)
    order = np.lexsort((np.arange(1000)[None, :].repeat(6, 0), -x64), axis=1)[:, :16]
    np.testing.assert_array_equal(got.indices, order)
    assert list(got.indices[0, :3]) == [5, 17, 900]
    lp = x64 / tau - np.log(np.exp(x64 / tau - (x64 / tau).max(1, keepdims=True)).sum(1, keepdims=True)) \
        - (x64 / tau).max(1, keepdims=True)
    np.testing.assert_allclose(got.values, np.take_along_axis(lp, order, 1), rtol=1e-5, atol=1e-6)
    assert got.values.dtype == (np.float64 if dtype == np.float64 else np.float32)


def _top_k_reference(x64, k):
    """ids of the k largest per row (ties, -0.0 and 0.0 included: the lower id first), by a full sort."""
    cols = np.arange(x64.shape[1])[None, :].repeat(x64.shape[0], 0)
    return np.lexsort((cols, -x64), axis=1)[:, :k]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_top_k_of_long_rows_across_spans(dtype):
    # rows of several 4096-column spans: the selection goes through the groups' maxima and their floor
    rng = np.random.default_rng(12)
    n = 3 * 4096 + 1234
    x = (rng.normal(size=(7, n)) * 3).astype(dtype)
    x[0, [7, 4096 + 7, 2 * 4096 + 7, n - 1]] = 50  # equal maxima in one column group: the lower id first
    x[1, :] = 0.0  # a constant row: the first k ids
    x[1, ::2] = -0.0  # -0.0 ties 0.0 as a value
    x[2, rng.choice(n, 100, replace=False)] = -np.inf
    x[3, :] = -np.inf
    x[3, [3000, 9000]] = 1.0
    x[4] = np.sort(x[4])  # increasing: every span raises the k-th value
    x[5] = np.sort(x[5])[::-1]
    x[6, 4000:] = x[6, :4000].max() + 1 + np.abs(x[6, 4000:])  # the first span holds nothing that is kept
    for k in (1, 64, 300):
        got = top_k(x, k)
        x64 = x.astype(np.float64)
        order = _top_k_reference(x64, k)
        np.testing.assert_array_equal(got.indices, order)
        lse = np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1, keepdims=True)) + x64.max(1, keepdims=True)
        want = np.take_along_axis(x64 - lse, order, 1)
        np.testing.assert_allclose(got.values, want, rtol=1e-5, atol=1e-6)


def test_kth_largest_selection():
    from numba import njit

    from fastdistill.cpu._kernels import JIT
    from fastdistill.cpu._sparse import _kth_largest

    call = njit(**JIT)(lambda a, k: _kth_largest(a.copy(), k))
    rng = np.random.default_rng(14)
    for trial in range(400):
        n = int(rng.integers(1, 300))
        k = int(rng.integers(1, n + 1))
        a = (rng.integers(-4, 4, n) if trial % 2 else rng.integers(-2**31, 2**31 - 1, n)).astype(np.int32)
        a = [a, np.sort(a), np.sort(a)[::-1].copy()][trial % 3]  # ties, sorted either way
        assert call(a, k) == np.sort(a)[::-1][k - 1]
    assert call(np.array([2**62, -2**62, 5], np.int64), 2) == 5


def test_top_k_above_the_column_groups_and_nan_rows():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(3, 9000)).astype(np.float32)
    x[1, 2] = np.float32(np.nan)
    x[2, ::3] = np.float32(np.nan)
    got = top_k(x, 4100)  # more than a span's 4096 column groups: every column a candidate
    np.testing.assert_array_equal(got.indices[0], _top_k_reference(x[:1].astype(np.float64), 4100)[0])
    for r in (1, 2):  # NaN rows: NaN values, and still k distinct ids in range
        assert np.isnan(got.values[r]).all()
        assert len(np.unique(got.indices[r])) == 4100 and got.indices[r].min() >= 0 and got.indices[r].max() < 9000
    small = top_k(x[1:, :5000], 64)  # the same through the floor of the groups' maxima
    assert np.isnan(small.values).all()
    assert all(len(np.unique(row)) == 64 and 0 <= row.min() and row.max() < 5000 for row in small.indices)


def test_top_k_shapes_and_errors():
    x = np.random.default_rng(10).normal(size=(2, 3, 50)).astype(np.float32)
    t = top_k(x, 50)
    assert t.indices.shape == (2, 3, 50)
    np.testing.assert_allclose(np.exp(t.values.astype(np.float64)).sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(fd.InvalidParameterError, match=r"k must be in \[1, 50\]"):
        top_k(x, 51)
    with pytest.raises(fd.InvalidParameterError, match="temperature"):
        top_k(x, 3, temperature=0.0)


# ------------------------------------------------------------------ PyTorch


@pytest.mark.parametrize("tail", ["renormalize", "support", "bucket"])
def test_distillation_loss_takes_a_sparse_teacher_of_tensors(tail):
    from fastdistill.torch import DistillationLoss

    s, idx, vals, y = batch(10, 45, 6, seed=11, pad=True)
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    teacher = SparseTeacher(torch.tensor(idx), torch.tensor(vals, dtype=torch.bfloat16), tail=tail)
    tau = 1.0 if tail == "bucket" else 2.0
    crit = DistillationLoss(temperature=tau)
    loss = crit(st, teacher, torch.tensor(y))
    loss.backward()
    v = torch.tensor(vals, dtype=torch.bfloat16).double().numpy()
    ref_loss, ref_grad = reference("kl_divergence", tail, st.detach().double().numpy(), idx, v, y, tau, 0.5, 0.5)
    assert float(loss.detach()) == pytest.approx(ref_loss, rel=1e-5)
    assert rel_err(st.grad.numpy(), ref_grad) < 1e-5
    # the same through torch.compile (the op is a custom op with a fake implementation)
    st.grad = None
    compiled = torch.compile(lambda a, b, c: crit(a, b, c), fullgraph=True)
    loss2 = compiled(st, teacher, torch.tensor(y))
    loss2.backward()
    assert float(loss2.detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
    assert rel_err(st.grad.numpy(), ref_grad) < 1e-5


def test_sparse_op_passes_opcheck():
    from fastdistill.torch import _describe

    s, idx, vals, y = batch(4, 20, 3, seed=12)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5)
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    args = (st, torch.tensor(idx), torch.tensor(vals, dtype=torch.float32), torch.tensor(y),
            _describe(d, "mean", None, True), None, [0, 0])
    torch.library.opcheck(torch.ops.fastdistill.sparse_response, args)


def test_offline_topk_example_runs_quick():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "examples" / "offline_topk" / "run.py"), "--quick"],
                       capture_output=True, text=True, timeout=600, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = {line.split(" test accuracy ")[0].strip(): float(line.rsplit(" ", 1)[1])
             for line in r.stdout.splitlines() if "test accuracy" in line and "student" in line}
    hard = next(v for k, v in lines.items() if "hard" in k)
    dense = next(v for k, v in lines.items() if "dense" in k)
    top = next(v for k, v in lines.items() if "(stored)" in k)
    assert top > hard + 0.1 and abs(top - dense) < 0.05, r.stdout
    store = [v for k, v in lines.items() if "teacher store" in k]
    assert store or "no teacher store" in r.stdout, r.stdout
    if store:  # (the same float16 values, memory-mapped from the store)
        assert store[0] > hard + 0.1 and abs(store[0] - top) < 0.05, r.stdout
    assert "120 B" in r.stdout


@pytest.mark.parametrize("tail", ["renormalize", "support", "bucket"])
def test_gradient_in_place_over_the_student(tail):
    """``grad_out=student``: the support's columns are read before the dense gradient overwrites them."""
    s, idx, vals, y = batch(6, 40, 5, seed=13)
    d = fd.ResponseDistiller(fd.DistilLoss.jsd(0.4, 1.0), 0.5, 0.5)
    teacher = SparseTeacher(idx, vals, tail=tail)
    want, gw = d.loss_and_grad(s, teacher, y)
    work = s.copy()
    got, g = d.loss_and_grad(work, teacher, y, grad_out=work)
    assert g is work and got == want
    np.testing.assert_array_equal(work, gw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("tau", [2.0, 3.0])
def test_streaming_stores_write_the_same_gradient(monkeypatch, dtype, tau):
    """A gradient of ``STREAM_BYTES`` or more goes to memory by streaming stores from a staging block
    (set to 0 here: every gradient): the same values as the ordinary stores, for rows whose lines start
    anywhere (odd widths; an output one element into its buffer), rows narrower than a line or a block,
    rows across spans, ignored rows, and the gradient in place over the student; and the float64
    reference's within 1e-5 for float32."""
    from fastdistill.cpu import _sparse as S

    d = fd.ResponseDistiller(SOFT["kl_divergence"](tau), 0.4, 0.6)
    for n in (1, 5, 17, 300, S.SPAN + 333):
        s, idx, vals, y = batch(5, n, min(n, 7), seed=n)
        s = s.astype(dtype)
        teacher = SparseTeacher(idx, vals.astype(np.float32))
        monkeypatch.setattr(S, "STREAM_BYTES", 1 << 62)
        want_loss, want = d.loss_and_grad(s, teacher, y)
        monkeypatch.setattr(S, "STREAM_BYTES", 0)
        got_loss, got = d.loss_and_grad(s, teacher, y)
        assert got_loss == want_loss
        np.testing.assert_array_equal(got, want)
        # an output one element past an allocation's start (its lines start elsewhere in every row)
        flat = np.full(5 * n + 2, 7.0, dtype=dtype)
        _, g = d.loss_and_grad(s, teacher, y, grad_out=flat[1:-1].reshape(5, n))
        np.testing.assert_array_equal(g, want)
        assert flat[0] == 7.0 and flat[-1] == 7.0
        work = s.copy()
        d.loss_and_grad(work, teacher, y, grad_out=work)
        np.testing.assert_array_equal(work, want)
        if dtype == np.float32 and n > 5:
            _, ref = reference("kl_divergence", "renormalize", s.astype(np.float64), idx,
                               vals.astype(np.float32).astype(np.float64), y, tau, 0.4, 0.6)
            assert rel_err(got, ref) < 1e-5

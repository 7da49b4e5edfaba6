"""The fused response loss (alpha*CE + beta*tau^2*KL) and its gradient against float64 references."""
import numpy as np
import pytest

import fastdistill as fd
from conftest import IGNORE, TOL, make_batch, rel_err
from reference import cross_entropy, divergence, log_softmax, numeric_grad, reduce, response_rows

SHAPES = [(1, 1), (1, 17), (9, 1), (7, 13), (256, 1000), (3, 50000), (1, 70000)]


def np_response_grad(s, t, y, hard_w, soft_w, tau, scale, eps=0.0):
    """Analytic gradient of hard_w*CE + soft_w*tau^2*KL (float64), ignored rows zero."""
    s = s.astype(np.float64)
    t = t.astype(np.float64)
    q1 = np.exp(log_softmax(s))
    q = np.exp(log_softmax(s / tau))
    p = np.exp(log_softmax(t / tau))
    g = soft_w * tau * (q - p)
    if y is not None:
        keep = y != IGNORE
        onehot = np.zeros_like(s)
        onehot[np.arange(len(y))[keep], y[keep]] = 1.0
        n = s.shape[-1]
        g = g + hard_w * (q1 - (1 - eps) * onehot - eps / n)
        g[~keep] = 0.0
    return g * scale


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0, 20.0])
def test_response_loss_and_grad(dtype, shape, tau):
    rows, n = shape
    big = n >= 13 and tau == 0.5
    s, t, y = make_batch(rows, n, dtype, seed=rows * 7 + n, big=big)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(tau), 0.5, 0.5)
    ref_rows, keep = response_rows(s, t, y, 0.5, 0.5, "kl_divergence", tau)
    s_before = s.copy()
    for red in ("mean", "sum", "none"):
        loss, grad = d.loss_and_grad(s, t, y, reduction=red)
        ref = reduce(ref_rows, keep, red)
        if red == "none":
            assert loss.dtype == dtype and loss.shape == (rows,)
            assert rel_err(loss, ref) <= TOL[dtype]
        else:
            assert isinstance(loss, float)
            assert abs(loss - ref) <= TOL[dtype] * max(abs(ref), 1e-12)
        scale = 1.0 / keep.sum() if (red == "mean" and keep.sum()) else (0.0 if red == "mean" else 1.0)
        g_ref = np_response_grad(s, t, y, 0.5, 0.5, tau, scale)
        assert grad.dtype == dtype and grad.shape == s.shape
        assert np.all(np.isfinite(grad))
        assert rel_err(grad, g_ref) <= TOL[dtype] or np.abs(g_ref).max() == 0
        assert np.all(grad[~keep] == 0)
        assert loss_close(d.loss(s, t, y, reduction=red), loss)
    np.testing.assert_array_equal(s, s_before)  # inputs untouched


def loss_close(a, b):
    return np.allclose(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_vocab_high_temperature_accuracy(dtype):
    # the contract's hardest accuracy case: 1e5 classes at tau = 20
    s, t, y = make_batch(4, 100_000, dtype, seed=3, mask=False, ignore=False)
    for tau in (20.0, 1.0):
        loss, grad = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(tau), 0.3, 0.7).loss_and_grad(s, t, y)
        rows, keep = response_rows(s, t, y, 0.3, 0.7, "kl_divergence", tau)
        assert abs(loss - rows.mean()) <= TOL[dtype] * abs(rows.mean())
        assert rel_err(grad, np_response_grad(s, t, y, 0.3, 0.7, tau, 0.25)) <= TOL[dtype]


def test_gradient_by_finite_differences():
    s, t, y = make_batch(3, 6, np.float64, seed=11, mask=False, ignore=False)
    y[1] = IGNORE
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.4, 0.6, label_smoothing=0.1)
    _, g = d.loss_and_grad(s, t, y)
    num = numeric_grad(lambda x: d.loss(x, t, y), s)
    assert rel_err(g, num) < 1e-7


def test_grad_out_and_in_place():
    s, t, y = make_batch(64, 300, np.float32, seed=5)
    d = fd.ResponseDistiller.balanced()
    loss, g = d.loss_and_grad(s, t, y)
    buf = np.full_like(s, 7.0)
    loss2, g2 = d.loss_and_grad(s, t, y, grad_out=buf)
    assert g2 is buf and loss2 == loss
    np.testing.assert_array_equal(buf, g)
    s_inplace = s.copy()
    loss3, g3 = d.loss_and_grad(s_inplace, t, y, grad_out=s_inplace)
    assert g3 is s_inplace and loss3 == loss
    np.testing.assert_array_equal(s_inplace, g)


def test_leading_dims_are_rows():
    s, t, y = make_batch(24, 50, np.float32, seed=6)
    d = fd.ResponseDistiller.balanced()
    l2, g2 = d.loss_and_grad(s, t, y, reduction="none")
    l3, g3 = d.loss_and_grad(s.reshape(2, 12, 50), t.reshape(2, 12, 50), y.reshape(2, 12), reduction="none")
    assert l3.shape == (2, 12) and g3.shape == (2, 12, 50)
    np.testing.assert_array_equal(l3.reshape(-1), l2)
    np.testing.assert_array_equal(g3.reshape(24, 50), g2)


def test_non_contiguous_inputs():
    s, t, y = make_batch(20, 40, np.float64, seed=8)
    sf = np.asfortranarray(s)
    d = fd.ResponseDistiller.balanced()
    assert d.loss(sf, t[:, :], y) == d.loss(s, t, y)
    assert d.loss(s[::2], t[::2], y[::2]) == pytest.approx(d.loss(s[::2].copy(), t[::2].copy(), y[::2]), rel=1e-15)


def test_all_rows_ignored_gives_zero():
    s, t, _ = make_batch(5, 8, np.float32, seed=9)
    y = np.full(5, IGNORE)
    loss, g = fd.ResponseDistiller.balanced().loss_and_grad(s, t, y)
    assert loss == 0.0 and not np.any(g)


def test_custom_ignore_index_and_num_items():
    s, t, y = make_batch(10, 12, np.float64, seed=10, ignore=False)
    y[[2, 5]] = 3
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 1.0, 1.0, ignore_index=3)
    rows, keep = response_rows(s, t, y, 1.0, 1.0, "kl_divergence", 2.0, ignore_index=3)
    n_counted = int(keep.sum())
    assert n_counted <= 8
    assert d.loss(s, t, y) == pytest.approx(rows.sum() / n_counted, rel=1e-12)
    loss, g = d.loss_and_grad(s, t, y, num_items=40)
    assert loss == pytest.approx(rows.sum() / 40, rel=1e-12)
    _, g_mean = d.loss_and_grad(s, t, y)
    np.testing.assert_allclose(g * 40, g_mean * n_counted, rtol=1e-12, atol=1e-15)


def test_nan_propagates():
    s, t, y = make_batch(4, 9, np.float32, seed=12, mask=False, ignore=False)
    s[1, 3] = np.nan
    rows = fd.ResponseDistiller.balanced().loss(s, t, y, reduction="none")
    assert np.isnan(rows[1]) and np.all(np.isfinite(rows[[0, 2, 3]]))


def test_one_sided_masks():
    # teacher-only -inf: forward KL is finite; student -inf where the teacher has mass: infinite
    s, t, _ = make_batch(3, 10, np.float64, seed=13, mask=False)
    t[:, 2] = -np.inf
    kl = fd.kl_divergence(s, t, 2.0, reduction="none")
    np.testing.assert_allclose(kl, divergence("kl_divergence", s, t, 2.0), rtol=1e-12)
    s2 = s.copy()
    s2[0, 4] = -np.inf
    assert np.isinf(fd.kl_divergence(s2, t, reduction="none")[0])


def test_cross_entropy_function_matches_reference():
    s, _, y = make_batch(50, 30, np.float64, seed=14)
    keep = y != IGNORE
    for eps in (0.0, 0.2):
        ref = cross_entropy(s[keep], y[keep], eps).mean()
        assert fd.cross_entropy(s, y, label_smoothing=eps) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tau", [2.0, 4.0])
def test_power_path_equals_exponential_path(dtype, tau):
    # at tau 2 and 4 the kernels take exp(s - max) as exp((s - max) / tau) ** tau; that fast path must
    # agree with the kernel that computes its own exponential, also where exp(s - max) is subnormal
    from fastdistill import cpu
    from fastdistill._spec import resolve

    s, t, y = make_batch(33, 300, dtype, seed=21)
    top = np.where(np.isfinite(s), s, -np.inf).max(axis=1, keepdims=True)
    s[:, 5:25] = top - np.linspace(80.0, 90.0 * tau, 20, dtype=dtype)  # around and below the cut
    s[:2, 5:25] = -np.inf  # and masked (in both rows) in two rows
    t[:2, 5:25] = -np.inf
    y[y >= 0] = np.where((y[y >= 0] >= 5) & (y[y >= 0] < 25), 0, y[y >= 0])
    terms = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(tau), 0.5, 0.5).terms()
    power = resolve(terms, True, np.dtype(dtype).name)
    assert power.pw == int(tau)
    out = {}
    for v in (power, power._replace(pw=0)):
        out[v.pw] = cpu.response(v, s, t, y, terms.pack(), IGNORE, 0.25, True)
    assert rel_err(out[power.pw][0], out[0][0]) < TOL[dtype]
    assert rel_err(out[power.pw][1], out[0][1]) < TOL[dtype]
    masked = np.isneginf(s) & np.isneginf(t)
    assert np.all(out[power.pw][1][masked] == 0.0)
    # and against the float64 reference
    ref, keep = response_rows(s.astype(np.float64), t.astype(np.float64), y, 0.5, 0.5, "kl_divergence", tau)
    assert rel_err(out[power.pw][0], ref) < TOL[dtype]
    assert np.all(out[power.pw][0][~keep] == 0.0)


def test_power_variant_choice():
    from fastdistill._spec import CE_NONE, CE_OWN, DIV_FORWARD_KL, DIV_MIXTURE, DIV_NONE, variant_fields

    def pw(div, tau, hard_w=0.5):
        return variant_fields(div, hard_w, True, tau, False, True)[3]

    assert pw(DIV_FORWARD_KL, 4.0) == 4
    assert pw(DIV_MIXTURE, 2.0) == 2
    assert pw(DIV_FORWARD_KL, 3.0) == 0  # other temperatures: own exponential
    assert pw(DIV_FORWARD_KL, 4.0, hard_w=0.0) == 0  # no cross-entropy term
    assert pw(DIV_NONE, 4.0) == 0  # no divergence exponential to reuse
    assert variant_fields(DIV_FORWARD_KL, 0.5, True, 4.0, False, True)[1] == CE_OWN
    assert variant_fields(DIV_FORWARD_KL, 0.5, False, 4.0, False, True)[1] == CE_NONE  # no labels


HIGH_TAU_LOSSES = {
    "kl_divergence": lambda tau: fd.DistilLoss.kl_divergence(tau),
    "reverse_kl": lambda tau: fd.DistilLoss.reverse_kl(tau),
    "jsd": lambda tau: fd.DistilLoss.jsd(0.5, tau),
    "skew_kl": lambda tau: fd.DistilLoss.skew_kl(0.1, tau),
    "tvd": lambda tau: fd.DistilLoss.tvd(tau),
}


@pytest.mark.parametrize("kind", list(HIGH_TAU_LOSSES))
@pytest.mark.parametrize("tau", [20.0, 32.0, 33.0, 100.0, 1e3, 1e4])
def test_float32_stays_within_1e5_of_float64_at_high_temperature(kind, tau):
    # float32 exponentials of nearly uniform rows lost the KL: relative error 2e-3 at tau 1000, 43% at 1e4
    rng = np.random.default_rng(7)
    s = rng.normal(size=(64, 1000))
    t = rng.normal(size=(64, 1000))
    loss = HIGH_TAU_LOSSES[kind](tau)
    v64, g64 = loss.compute_with_grad(s, t)
    v32, g32 = loss.compute_with_grad(s.astype(np.float32), t.astype(np.float32))
    assert v32 == pytest.approx(v64, rel=1e-5)
    assert rel_err(g32, g64) < 1e-5
    ref = divergence(kind, s, t, tau, 0.5 if kind == "jsd" else 0.1)  # float64 NumPy, independent
    assert v64 == pytest.approx(ref.mean(), rel=1e-7)


@pytest.mark.parametrize("kind", list(HIGH_TAU_LOSSES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_divergence_is_never_negative(kind, dtype):
    # at tau = 1e8 the float32 forward KL was -1.2e7 (such temperatures are refused now: nothing of the
    # divergence survives there); at the largest temperature allowed, it is never negative
    rng = np.random.default_rng(8)
    s = rng.normal(size=(64, 1000)).astype(dtype)
    t = rng.normal(size=(64, 1000)).astype(dtype)
    with pytest.raises(fd.InvalidParameterError, match="temperature"):
        HIGH_TAU_LOSSES[kind](1e8)
    rows = HIGH_TAU_LOSSES[kind](1e4).compute(s, t, reduction="none")
    assert np.all(rows >= 0.0) and np.all(np.isfinite(rows))
    same = HIGH_TAU_LOSSES[kind](3.0).compute(s, s, reduction="none")
    assert np.all(same >= 0.0) and np.max(same) < 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["kl", "reverse_kl", "jsd", "tvd", "ce", "kl+ce"])
def test_a_row_that_is_minus_inf_everywhere_gives_nan(case, dtype):
    # it gave a loss of -inf and a non-finite gradient; PyTorch's log_softmax gives NaN for such a row
    s, t, y = make_batch(4, 9, dtype, seed=3, mask=False, ignore=False)
    s[1] = -np.inf
    losses = {
        "kl": fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.0, 1.0),
        "reverse_kl": fd.ResponseDistiller(fd.DistilLoss.reverse_kl(1.0), 0.0, 1.0),
        "jsd": fd.ResponseDistiller(fd.DistilLoss.jsd(0.5, 2.0), 0.0, 1.0),
        "tvd": fd.ResponseDistiller(fd.DistilLoss.tvd(2.0), 0.0, 1.0),
        "ce": fd.ResponseDistiller(fd.DistilLoss.kl_divergence(), 1.0, 0.0),
        "kl+ce": fd.ResponseDistiller.balanced(),
    }
    d = losses[case]
    labels = y if d.hard_label_weight else None
    rows, g = d.loss_and_grad(s, t, labels, reduction="none")
    assert np.isnan(rows[1]) and np.all(np.isnan(g[1]))
    assert np.all(np.isfinite(rows[[0, 2, 3]])) and np.all(np.isfinite(g[[0, 2, 3]]))
    assert np.isnan(d.loss(s, t, labels))
    if case not in ("ce",):  # the teacher's row too, for the divergences
        s2, t2 = make_batch(4, 9, dtype, seed=3, mask=False, ignore=False)[:2]
        t2[2] = -np.inf
        rows2 = d.loss(s2, t2, labels, reduction="none")
        assert np.isnan(rows2[2]) and np.all(np.isfinite(rows2[[0, 1, 3]]))
    # the same row split across threads
    big_s = np.full((1, 40000), -np.inf, dtype=dtype)
    big_t = np.zeros((1, 40000), dtype=dtype)
    r, gb = d.loss_and_grad(big_s, big_t, np.zeros(1, np.int64) if labels is not None else None, reduction="none")
    assert np.isnan(r[0]) and np.all(np.isnan(gb))

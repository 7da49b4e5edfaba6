"""Every soft loss (KL family, TVD, MSE, cosine, combined) and its gradient against float64 references."""
import numpy as np
import pytest

import fastdistill as fd
from conftest import IGNORE, TOL, make_batch, rel_err
from reference import divergence, numeric_grad, reduce, response_rows, torch_response

# (constructor, reference kind, its parameter)
LOSSES = [
    (lambda tau: fd.DistilLoss.kl_divergence(tau), "kl_divergence", None),
    (lambda tau: fd.DistilLoss.reverse_kl(tau), "reverse_kl", None),
    (lambda tau: fd.DistilLoss.jsd(0.0, tau), "jsd", 0.0),
    (lambda tau: fd.DistilLoss.jsd(0.01, tau), "jsd", 0.01),
    (lambda tau: fd.DistilLoss.jsd(0.5, tau), "jsd", 0.5),
    (lambda tau: fd.DistilLoss.jsd(0.99, tau), "jsd", 0.99),
    (lambda tau: fd.DistilLoss.jsd(1.0, tau), "jsd", 1.0),
    (lambda tau: fd.DistilLoss.skew_kl(0.1, tau), "skew_kl", 0.1),
    (lambda tau: fd.DistilLoss.skew_kl(0.0, tau), "skew_kl", 0.0),
    (lambda tau: fd.DistilLoss.skew_reverse_kl(0.1, tau), "skew_reverse_kl", 0.1),
    (lambda tau: fd.DistilLoss.skew_reverse_kl(1.0, tau), "skew_reverse_kl", 1.0),
    (lambda tau: fd.DistilLoss.tvd(tau), "tvd", None),
    (lambda tau: fd.DistilLoss.alpha_divergence(0.3, tau), "alpha_divergence", 0.3),
    (lambda tau: fd.DistilLoss.alpha_divergence(0.9, tau), "alpha_divergence", 0.9),
    (lambda tau: fd.DistilLoss.mse(), "mse", None),
    (lambda tau: fd.DistilLoss.cosine(), "cosine", None),
]
IDS = ["kl", "rkl", "jsd0", "jsd.01", "jsd.5", "jsd.99", "jsd1", "skl.1", "skl0", "srkl.1", "srkl1", "tvd", "alpha.3", "alpha.9", "mse",
       "cos"]
LINEAR = ("mse", "cosine")


def _inputs(kind, rows, n, dtype, seed):
    # MSE and cosine take logits at face value: no -inf there
    return make_batch(rows, n, dtype, seed=seed, mask=kind not in LINEAR, ignore=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", LOSSES, ids=IDS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 300), (2, 40000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_loss_matches_reference(case, dtype, shape):
    make, kind, param = case
    tau = 2.0
    s, t, _ = _inputs(kind, *shape, dtype, seed=shape[1])
    loss = make(tau)
    ref = divergence(kind, s, t, tau, param)
    got = loss.compute(s, t, reduction="none")
    assert got.dtype == dtype
    assert np.all(np.isfinite(got))
    assert rel_err(got, ref) <= TOL[dtype] * 2 or np.max(np.abs(ref)) < 1e-12 and np.max(np.abs(got)) < 1e-6
    assert loss.compute(s, t) == pytest.approx(ref.mean(), rel=TOL[dtype] * 2, abs=1e-9)
    assert loss.compute(s, t, reduction="sum") == pytest.approx(ref.sum(), rel=TOL[dtype] * 2, abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", LOSSES, ids=IDS)
@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_response_with_each_loss_matches_torch_autograd(torch, case, dtype, tau, eps):
    make, kind, param = case
    # label smoothing sums log q over every class: with masked classes that is (rightly) infinite
    s, t, y = make_batch(16, 37, dtype, seed=21, mask=kind not in LINEAR and eps == 0.0)
    d = fd.ResponseDistiller(make(tau), 0.3, 0.8, label_smoothing=eps)
    for red in ("mean", "none"):
        loss, grad = d.loss_and_grad(s, t, y, reduction=red)
        ref_loss, ref_grad = torch_response(s, t, y, 0.3, 0.8, kind, tau, param if param is not None else 0.5,
                                            eps=eps, reduction=red)
        assert rel_err(loss, ref_loss) <= 2 * TOL[dtype]
        assert np.all(np.isfinite(grad))
        assert rel_err(grad, ref_grad) <= 2 * TOL[dtype]


@pytest.mark.parametrize("case", LOSSES, ids=IDS)
def test_gradient_finite_differences(case):
    make, kind, param = case
    s, t, _ = make_batch(3, 5, np.float64, seed=4, mask=False, ignore=False)
    loss = make(1.5)
    _, g = loss.compute_with_grad(s, t, reduction="sum")
    num = numeric_grad(lambda x: loss.compute(x, t, reduction="sum"), s)
    # absolute floor: skew_reverse_kl(alpha=1) is identically 0 (m = q), its gradient too
    assert np.max(np.abs(g - num)) < 1e-6 * max(1.0, np.max(np.abs(num)))


@pytest.mark.parametrize("case", [c for c in LOSSES if c[1] not in LINEAR], ids=[i for c, i in zip(LOSSES, IDS) if c[1] not in LINEAR])
def test_masked_classes_give_no_nan(case):
    make, kind, param = case
    s, t, _ = make_batch(6, 9, np.float32, seed=30, mask=True, ignore=False)
    loss, g = make(3.0).compute_with_grad(s, t, reduction="none")
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(g))
    assert np.all(g[np.isneginf(s)] == 0)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t, _ = make_batch(8, 20, np.float64, seed=31, ignore=False)
    assert fd.DistilLoss.jsd(0.0, 2.0).compute(s, t) == pytest.approx(fd.DistilLoss.kl_divergence(2.0).compute(s, t), rel=1e-14)
    assert fd.DistilLoss.jsd(1.0, 2.0).compute(s, t) == pytest.approx(fd.DistilLoss.reverse_kl(2.0).compute(s, t), rel=1e-14)


def test_tvd_subgradient_zero_where_equal():
    s, _, _ = make_batch(2, 7, np.float64, seed=32, mask=False, ignore=False)
    loss, g = fd.DistilLoss.tvd().compute_with_grad(s, s.copy())
    assert loss == 0.0
    assert np.all(g == 0)


def test_combined_is_weighted_sum():
    s, t, _ = make_batch(10, 12, np.float64, seed=33, mask=False, ignore=False)
    c = fd.DistilLoss.combined(0.3, 0.7, 2.0)
    ref = 0.3 * divergence("kl_divergence", s, t, 2.0) + 0.7 * divergence("mse", s, t)
    np.testing.assert_allclose(c.compute(s, t, reduction="none"), ref, rtol=1e-12)
    _, g = c.compute_with_grad(s, t, reduction="sum")
    np.testing.assert_allclose(g, numeric_grad(lambda x: c.compute(x, t, reduction="sum"), s), rtol=1e-6, atol=1e-8)


def test_bad_divergence_parameters():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(fd.InvalidParameterError, match="beta"):
            fd.DistilLoss.jsd(bad)
        with pytest.raises(fd.InvalidParameterError, match="alpha"):
            fd.DistilLoss.skew_kl(bad)
        with pytest.raises(fd.InvalidParameterError, match="alpha"):
            fd.DistilLoss.skew_reverse_kl(bad)
    for bad in (-0.1, 1.0, 2.0):
        with pytest.raises(fd.InvalidParameterError, match="label_smoothing"):
            fd.ResponseDistiller(fd.DistilLoss.kl_divergence(), 1.0, 1.0, label_smoothing=bad)
    s, t, y = make_batch(4, 5, np.float32, seed=1)
    for bad in (0, -3, float("inf")):
        with pytest.raises(fd.InvalidParameterError, match="num_items"):
            fd.ResponseDistiller.balanced().loss(s, t, y, num_items=bad)
    with pytest.raises(fd.InvalidParameterError, match="num_items"):
        fd.ResponseDistiller.balanced().loss(s, t, y, reduction="sum", num_items=4)


def test_pytorch_compositions_users_write(torch):
    import torch.nn.functional as F

    s, t, y = make_batch(12, 25, np.float64, seed=40, mask=False)
    st, tt = torch.tensor(s), torch.tensor(t)
    tau = 2.0
    # reverse KL as F.kl_div with the roles swapped
    lq, lp = F.log_softmax(st / tau, -1), F.log_softmax(tt / tau, -1)
    rkl = F.kl_div(lp, lq, log_target=True, reduction="batchmean") * tau**2
    assert fd.DistilLoss.reverse_kl(tau).compute(s, t) == pytest.approx(float(rkl), rel=1e-12)
    # TRL's generalized JSD (GKDTrainer.generalized_jsd_loss), summed over classes, batchmean
    for beta in (0.1, 0.5, 0.9):
        mix = torch.logsumexp(torch.stack([lq + np.log(1 - beta), lp + np.log(beta)]), dim=0)
        kl_t = F.kl_div(mix, lp, reduction="none", log_target=True)
        kl_s = F.kl_div(mix, lq, reduction="none", log_target=True)
        jsd = (beta * kl_t + (1 - beta) * kl_s).sum() / s.shape[0] * tau**2
        assert fd.DistilLoss.jsd(beta, tau).compute(s, t) == pytest.approx(float(jsd), rel=1e-12)
    # F.cross_entropy with label smoothing and ignore_index
    for eps in (0.0, 0.1):
        ce = F.cross_entropy(st, torch.tensor(y), ignore_index=IGNORE, label_smoothing=eps)
        assert fd.cross_entropy(s, y, label_smoothing=eps) == pytest.approx(float(ce), rel=1e-12)
        d = fd.ResponseDistiller(fd.DistilLoss.mse(), 1.0, 0.0, label_smoothing=eps)
        assert d.loss(s, t, y) == pytest.approx(float(ce), rel=1e-12)


MIXTURES = [(c, i) for c, i in zip(LOSSES, IDS) if c[1] in ("jsd", "skew_kl", "skew_reverse_kl") and 0 < c[2] < 1]


@pytest.mark.parametrize("case", [c for c, _ in MIXTURES], ids=[i for _, i in MIXTURES])
def test_mixtures_with_subnormal_probabilities(case):
    # (cp * p + cq * q) * exp(-log m) overflowed where p and q are subnormal: the ratio is formed from logs
    make, kind, param = case
    rng = np.random.default_rng(4)
    s = rng.normal(size=(3, 12))
    t = rng.normal(size=(3, 12))
    s[:, 3] = t[:, 3] = -718.0  # p and q about 1e-313 (subnormal): 1 / m overflows
    s[:, 4] = -725.0
    t[:, 4] = -712.0
    loss = make(1.0)
    rows, g = loss.compute_with_grad(s, t, reduction="none")
    assert np.all(np.isfinite(rows)) and np.all(np.isfinite(g))
    ref = divergence(kind, s, t, 1.0, param)
    assert rel_err(rows, ref) < 1e-10
    num = numeric_grad(lambda x: divergence(kind, x, t, 1.0, param).sum(), s, h=1e-6)
    assert rel_err(g, num) < 1e-6

"""The seed's behaviour, the error contract, softmax, FeatureDistiller, threads, import and caching."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastdistill as fd
from conftest import IGNORE, make_batch, rel_err
from reference import divergence, log_softmax, numeric_grad

# ------------------------------------------------------------------ the seed's own tests


def test_pure_kl_zero_when_student_equals_teacher():
    logits = np.array([1.0, 2.0, 3.0], np.float32)
    assert fd.ResponseDistiller.pure_kl(1.0).compute_loss(logits, logits, 0) == 0.0


def test_hard_label_only_confident_prediction():
    d = fd.ResponseDistiller(fd.DistilLoss.mse(), 1.0, 0.0)
    loss = d.compute_loss(np.array([0.0, 0.0, 10.0], np.float32), np.zeros(3, np.float32), 2)
    assert 0 < loss < 1e-3
    assert loss == pytest.approx(np.log(2 + np.exp(10.0)) - 10.0, rel=1e-5)


def test_hard_label_out_of_range():
    logits = np.array([1.0, 2.0, 3.0], np.float32)
    with pytest.raises(fd.LabelOutOfRangeError) as e:
        fd.ResponseDistiller.pure_kl(1.0).compute_loss(logits, logits, 3)
    assert isinstance(e.value, fd.DimensionMismatchError)
    assert (e.value.label, e.value.n_classes, e.value.expected, e.value.got) == (3, 3, 3, 4)
    assert "3" in str(e.value) and "label" in str(e.value)


def test_teacher_student_mismatch():
    with pytest.raises(fd.TeacherStudentMismatchError) as e:
        fd.ResponseDistiller.pure_kl(1.0).compute_loss(np.ones(4, np.float32), np.ones(3, np.float32), 0)
    assert (e.value.teacher, e.value.student) == (3, 4)
    with pytest.raises(fd.TeacherStudentMismatchError) as e:
        fd.kl_divergence(np.ones((2, 4)), np.ones((2, 5)))
    assert (e.value.teacher, e.value.student) == ((2, 5), (2, 4))
    assert "(2, 5)" in str(e.value) and "(2, 4)" in str(e.value)


def test_batch_loss_of_identical_mse_inputs_is_zero():
    d = fd.ResponseDistiller(fd.DistilLoss.mse(), 0.0, 1.0)
    ones = np.ones(12, np.float32)
    assert d.compute_batch_loss(ones, ones, np.zeros(4, np.int64), 3) == 0.0


def test_balanced_and_pure_kl_construction():
    d = fd.ResponseDistiller.balanced()
    assert (d.hard_label_weight, d.soft_label_weight) == (0.5, 0.5)
    assert d.soft_loss == fd.DistilLoss.kl_divergence(4.0) and d.ignore_index == -100
    p = fd.ResponseDistiller.pure_kl(2.0)
    assert (p.hard_label_weight, p.soft_label_weight, p.soft_loss.temperature) == (0.0, 1.0, 2.0)


def test_higher_temperature_changes_kl():
    s, t, _ = make_batch(4, 10, np.float64, seed=1, mask=False)
    k1 = fd.DistilLoss.kl_divergence(1.0).compute(s, t)
    k4 = fd.DistilLoss.kl_divergence(4.0).compute(s, t)
    assert k1 != pytest.approx(k4, rel=1e-3)
    assert k4 == pytest.approx(divergence("kl_divergence", s, t, 4.0).mean(), rel=1e-12)


def test_cosine_of_opposite_vectors_is_two():
    v = np.array([1.0, -2.0, 3.0])
    assert fd.cosine_distance(v, -v) == pytest.approx(2.0, abs=1e-15)
    assert fd.cosine_distance(np.zeros(3), v) == 1.0


def test_uniform_mse_and_normalised_weights():
    f = fd.FeatureDistiller.uniform_mse(4)
    assert f.n_layers == 4 and all(w == 0.25 and l.kind == "mse" for w, l in f.layers)
    g = fd.FeatureDistiller.with_weights([2.0, -1.0, 1.0], fd.DistilLoss.cosine())
    assert g.normalise_weights() is g
    assert sum(abs(w) for w, _ in g.layers) == pytest.approx(1.0)
    assert [w for w, _ in g.layers] == pytest.approx([0.5, -0.25, 0.25])


# ------------------------------------------------------------------ batch forms


def test_compute_batch_loss_flat_and_2d():
    s, t, y = make_batch(6, 5, np.float32, seed=2)
    d = fd.ResponseDistiller.balanced()
    ref = d.loss(s, t, y)
    assert d.compute_batch_loss(s.reshape(-1), t.reshape(-1), y, 5) == ref
    assert d.compute_batch_loss(s, t, y) == ref
    with pytest.raises(fd.DimensionMismatchError) as e:
        d.compute_batch_loss(s.reshape(-1)[:-1], t.reshape(-1), y, 5)
    assert (e.value.expected, e.value.got) == (30, 29)
    with pytest.raises(fd.DimensionMismatchError) as e:
        d.compute_batch_loss(s.reshape(-1), t.reshape(-1)[:-2], y, 5)
    assert (e.value.expected, e.value.got) == (30, 28)
    with pytest.raises(fd.EmptyInputError):
        d.compute_batch_loss(np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), 5)


# ------------------------------------------------------------------ the error contract


def test_check_order_and_error_classes():
    d = fd.ResponseDistiller.balanced()
    s, t, y = make_batch(4, 6, np.float32, seed=3, ignore=False)
    with pytest.raises(fd.EmptyInputError, match="student"):
        d.loss(np.zeros((0, 6), np.float32), np.zeros((1, 6), np.float32), y)  # empty before mismatch
    with pytest.raises(fd.EmptyInputError, match="teacher"):
        d.loss(s, np.zeros((4, 0), np.float32), y)
    with pytest.raises(fd.TeacherStudentMismatchError):
        d.loss(s, t[:3], y[:2])  # mismatch before labels length
    with pytest.raises(fd.DimensionMismatchError) as e:
        d.loss(s, t, np.array([0, 7, 0], np.int64))  # labels length before range
    assert (e.value.expected, e.value.got) == (4, 3)
    bad = y.copy()
    bad[2] = 6
    with pytest.raises(fd.LabelOutOfRangeError) as e:
        d.loss(s, t, bad, reduction="nope")  # label range before parameters
    assert (e.value.label, e.value.n_classes) == (6, 6)
    assert "labels[2] = 6" in str(e.value)
    bad[2] = -5
    with pytest.raises(fd.LabelOutOfRangeError, match="-5"):
        d.loss(s, t, bad)
    with pytest.raises(fd.InvalidParameterError, match="reduction"):
        d.loss(s, t, y, reduction="nope")
    with pytest.raises(fd.InvalidParameterError, match="backend"):
        d.loss(s, t, y, backend="tpu")
    with pytest.raises(fd.InvalidParameterError, match="labels are required"):
        d.loss(s, t)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(tau):
    with pytest.raises(fd.InvalidParameterError, match="temperature"):
        fd.DistilLoss.kl_divergence(tau)
    with pytest.raises(fd.InvalidParameterError, match="temperature"):
        fd.softmax(np.ones(3), tau)
    with pytest.raises(fd.InvalidParameterError, match="temperature"):
        fd.kl_divergence(np.ones(3), np.ones(3), tau)


def test_bad_weights_and_types():
    with pytest.raises(fd.InvalidParameterError, match="hard_label_weight"):
        fd.ResponseDistiller(fd.DistilLoss.mse(), float("nan"), 1.0)
    with pytest.raises(fd.InvalidParameterError, match="kl_weight"):
        fd.DistilLoss.combined(float("inf"), 1.0, 1.0)
    accepted = "float32, float64, float16 or bfloat16"
    with pytest.raises(TypeError, match=f"student must hold {accepted} logits, got dtype complex64"):
        fd.mse(np.ones(3, np.complex64), np.ones(3, np.complex64))
    with pytest.raises(TypeError, match=f"student must hold {accepted} logits, got dtype int64"):
        fd.mse(np.ones(3, np.int64), np.ones(3, np.int64))
    with pytest.raises(TypeError, match="integer"):
        fd.cross_entropy(np.ones((2, 3)), np.array([0.5, 1.0]))
    with pytest.raises(fd.InvalidParameterError, match="n_layers"):
        fd.FeatureDistiller.uniform_mse(0)


def test_backend_unavailable():
    # no GPU here (or numba-cuda missing): asking for it is a clear, typed error
    if "cuda" in fd.available_backends():
        pytest.skip("a GPU is available")
    with pytest.raises(fd.BackendUnavailableError, match="cuda"):
        fd.mse(np.ones(3), np.ones(3), backend="cuda")
    assert issubclass(fd.BackendUnavailableError, RuntimeError)
    assert fd.available_backends() == ["cpu"]


def test_grad_out_errors():
    s, t, y = make_batch(4, 6, np.float32, seed=4)
    d = fd.ResponseDistiller.balanced()
    with pytest.raises(fd.DimensionMismatchError, match="grad_out shape"):
        d.loss_and_grad(s, t, y, grad_out=np.empty((4, 5), np.float32))
    with pytest.raises(TypeError, match="grad_out dtype"):
        d.loss_and_grad(s, t, y, grad_out=np.empty((4, 6), np.float64))
    with pytest.raises(fd.InvalidParameterError, match="contiguous"):
        d.loss_and_grad(s, t, y, grad_out=np.empty((6, 4), np.float32).T)
    with pytest.raises(fd.InvalidParameterError, match="share memory"):
        d.loss_and_grad(s, t, y, grad_out=t)


def test_inputs_never_modified():
    s, t, y = make_batch(8, 9, np.float64, seed=5)
    copies = [a.copy() for a in (s, t, y)]
    for loss in (fd.DistilLoss.jsd(0.3, 2.0), fd.DistilLoss.cosine(), fd.DistilLoss.tvd()):
        fd.ResponseDistiller(loss, 0.5, 0.5).loss_and_grad(s, t, y)
    fd.softmax(s)
    for a, c in zip((s, t, y), copies):
        np.testing.assert_array_equal(a, c)


def test_layer_errors():
    f = fd.FeatureDistiller.uniform_mse(2)
    x = np.ones((3, 4))
    with pytest.raises(fd.DimensionMismatchError) as e:
        f.compute_layer_loss(2, x, x)
    assert (e.value.expected, e.value.got) == (2, 3)
    with pytest.raises(fd.DimensionMismatchError) as e:
        f.compute_total_loss([x], [x])
    assert (e.value.expected, e.value.got) == (2, 1)


# ------------------------------------------------------------------ functions


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("tau", [0.5, 1.0, 20.0])
def test_softmax_and_log_softmax(dtype, tau):
    x, _, _ = make_batch(33, 257, dtype, seed=6, big=True)
    ref = log_softmax(x.astype(np.float64) / tau)
    lsm = fd.log_softmax(x, tau)
    sm = fd.softmax(x, tau)
    assert sm.dtype == dtype and sm.shape == x.shape
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(sm, np.exp(ref), rtol=0, atol=tol)
    finite = np.isfinite(ref)
    np.testing.assert_allclose(lsm[finite], ref[finite], rtol=tol, atol=tol)
    assert np.all(np.isneginf(lsm[~finite])) and np.all(sm[~finite] == 0)
    np.testing.assert_allclose(fd.softmax(x[0], tau), sm[0], rtol=1e-6)


def test_feature_distiller_losses_and_grads():
    rng = np.random.default_rng(7)
    shapes = [(5, 8), (5, 16), (3, 2, 4)]
    sf = [rng.normal(size=sh) for sh in shapes]
    tf = [rng.normal(size=sh) for sh in shapes]
    f = fd.FeatureDistiller([(0.5, fd.DistilLoss.mse()), (0.3, fd.DistilLoss.cosine()),
                             (0.2, fd.DistilLoss.kl_divergence(2.0))])
    kinds = ["mse", "cosine", "kl_divergence"]
    refs = [w * divergence(k, s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), 2.0).mean()
            for w, k, s, t in zip([0.5, 0.3, 0.2], kinds, sf, tf)]
    for i in range(3):
        assert f.compute_layer_loss(i, sf[i], tf[i]) == pytest.approx(refs[i], rel=1e-12)
    assert f.compute_total_loss(sf, tf) == pytest.approx(sum(refs), rel=1e-12)
    total, grads = f.total_loss_and_grads(sf, tf)
    assert total == pytest.approx(sum(refs), rel=1e-12)
    for i in range(3):
        num = numeric_grad(lambda x: f.compute_layer_loss(i, x, tf[i]), sf[i])
        assert grads[i].shape == sf[i].shape
        assert rel_err(grads[i], num) < 1e-6


def test_threads():
    n = fd.get_num_threads()
    assert n >= 1
    fd.set_num_threads(1)
    try:
        assert fd.get_num_threads() == 1
        s, t, y = make_batch(3, 70000, np.float32, seed=8)
        one = fd.ResponseDistiller.balanced().loss_and_grad(s, t, y)
    finally:
        fd.set_num_threads(n)
    many = fd.ResponseDistiller.balanced().loss_and_grad(s, t, y)
    assert one[0] == pytest.approx(many[0], rel=1e-6)
    np.testing.assert_allclose(one[1], many[1], rtol=1e-5, atol=1e-9)
    with pytest.raises(fd.InvalidParameterError, match="n must be in"):
        fd.set_num_threads(0)


def test_dtype_mix_and_lists():
    s, t, y = make_batch(4, 5, np.float32, seed=9, mask=False)
    a = fd.kl_divergence(s, t.astype(np.float64), 2.0)
    assert a == fd.kl_divergence(s, t, 2.0)
    assert fd.mse([1.0, 2.0], [1.0, 4.0]) == pytest.approx(2.0)


def test_version_and_typed():
    assert isinstance(fd.__version__, str)
    assert os.path.exists(os.path.join(os.path.dirname(fd.__file__), "py.typed"))


# ------------------------------------------------------------------ import cost and kernel cache


def _run(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, check=True).stdout


def test_import_is_light_and_does_not_import_cuda_or_numba():
    out = _run("""
        import sys, time
        t0 = time.perf_counter()
        import fastdistill
        dt = time.perf_counter() - t0
        print(dt, 'numba' in sys.modules, any(m.startswith('numba.cuda') or m.startswith('numba_cuda') for m in sys.modules),
              'torch' in sys.modules)
    """).split()
    assert float(out[0]) < 0.5
    assert out[1:] == ["False", "False", "False"]


def test_second_process_loads_cached_kernels():
    code = """
        import time, numpy as np, fastdistill as fd
        s = np.ones((3, 7), np.float32); t = np.zeros((3, 7), np.float32)
        t0 = time.perf_counter()
        fd.ResponseDistiller(fd.DistilLoss.tvd(3.0), 0.0, 1.0).loss_and_grad(s, t)
        print(time.perf_counter() - t0)
    """
    _run(code)  # compiles (or loads) and stores the kernels
    warm = float(_run(code))
    assert warm < 2.0, f"second process took {warm:.2f}s: kernels were recompiled"


def test_direct_construction_equals_the_named_constructors():
    # DistilLoss("kl_divergence", 2.0) used to compute 0.0 (its kl_weight defaulted to 0)
    s, t, _ = make_batch(8, 20, np.float64, seed=5, mask=False)
    for kind, named in (("kl_divergence", fd.DistilLoss.kl_divergence(2.0)),
                        ("reverse_kl", fd.DistilLoss.reverse_kl(2.0)),
                        ("tvd", fd.DistilLoss.tvd(2.0)),
                        ("jsd", fd.DistilLoss.jsd(0.5, 2.0)),
                        ("skew_kl", fd.DistilLoss.skew_kl(0.1, 2.0)),
                        ("skew_reverse_kl", fd.DistilLoss.skew_reverse_kl(0.1, 2.0))):
        direct = fd.DistilLoss(kind, 2.0)
        assert direct == named and direct.kl_weight == 1.0 and direct.mse_weight == 0.0
        assert direct.compute(s, t) == named.compute(s, t) > 0.0
    assert fd.DistilLoss("mse") == fd.DistilLoss.mse()
    assert fd.DistilLoss("cosine") == fd.DistilLoss.cosine()
    assert fd.DistilLoss("mse").compute(s, t) == pytest.approx(((t - s) ** 2).mean(), rel=1e-12)
    assert fd.DistilLoss("combined", 3.0, 0.5, 0.25) == fd.DistilLoss.combined(0.5, 0.25, 3.0)
    # a weight the kind needs is never silently zero, one it does not have is refused
    half = fd.DistilLoss("kl_divergence", 2.0, kl_weight=0.5)
    assert half.compute(s, t) == pytest.approx(0.5 * fd.DistilLoss.kl_divergence(2.0).compute(s, t), rel=1e-12)
    with pytest.raises(fd.InvalidParameterError, match="needs both kl_weight and mse_weight"):
        fd.DistilLoss("combined", 2.0)
    with pytest.raises(fd.InvalidParameterError, match="kl_weight must be 0 for kind 'mse'"):
        fd.DistilLoss("mse", kl_weight=0.5)
    with pytest.raises(fd.InvalidParameterError, match="mse_weight must be 0 for kind 'reverse_kl'"):
        fd.DistilLoss("reverse_kl", mse_weight=1.0)

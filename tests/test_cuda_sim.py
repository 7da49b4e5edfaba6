"""The CUDA backend, run in the CUDA simulator at tiny shapes with tiny blocks.

numba reads ``NUMBA_ENABLE_CUDASIM`` when ``numba.cuda`` is first imported, so the simulator cannot be
switched on inside a pytest process that other test modules share. In the ordinary run this module
only holds launchers: each starts a fresh interpreter with the simulator variables set, runs this same
file there (where the simulator cases are active and the launchers skip), and asserts it passed.

References are independent: float64 NumPy/PyTorch formulas (``reference.py``), and the CPU backend
for float32 agreement.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastdistill as fd
from conftest import IGNORE, TOL, make_batch, rel_err
from reference import log_softmax, reduce, response_rows, torch_response

IN_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and os.environ.get("NUMBA_FASTDISTILL_ALLOW_SIM") == "1"
# the same cases on a real GPU: FASTDISTILL_TEST_REAL_CUDA=1 python -m pytest tests/test_cuda_sim.py
ON_GPU = os.environ.get("FASTDISTILL_TEST_REAL_CUDA") == "1" and not IN_SIM
IN_SIM = IN_SIM or ON_GPU
HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent

sim = pytest.mark.skipif(not IN_SIM, reason="runs inside the simulator subprocess (test_simulator_suite) or on a GPU")
launcher = pytest.mark.skipif(IN_SIM, reason="launcher of the simulator subprocess")
needs_numba_cuda = pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None and
                                      importlib.util.find_spec("numba.cuda") is None,
                                      reason="numba-cuda is not installed")


def _run(code_or_args, extra_env, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "NUMBA_FASTDISTILL_ALLOW_SIM")}
    env.update(extra_env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE.parent), env.get("PYTHONPATH", "")])
    args = [sys.executable, "-c", code_or_args] if isinstance(code_or_args, str) else [sys.executable, *code_or_args]
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ launchers (ordinary pytest run)


@launcher
@needs_numba_cuda
def test_simulator_suite():
    r = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(HERE)],
             {"NUMBA_ENABLE_CUDASIM": "1", "NUMBA_FASTDISTILL_ALLOW_SIM": "1"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, out[-3000:]


_NO_GPU_CODE = """
import numpy as np, fastdistill as fd
s = np.zeros((2, 3), np.float32)
try:
    fd.kl_divergence(s, s, backend="cuda")
except fd.BackendUnavailableError as e:
    print("RAISED:", e)
else:
    print("RAN")
print("BACKENDS:", fd.available_backends())
"""


@launcher
@needs_numba_cuda
def test_simulator_is_not_a_backend_without_opt_in():
    r = _run(_NO_GPU_CODE, {"NUMBA_ENABLE_CUDASIM": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RAISED:" in r.stdout and "CUDA simulator" in r.stdout, r.stdout
    assert "BACKENDS: ['cpu']" in r.stdout


@launcher
@needs_numba_cuda
def test_backend_cuda_without_gpu_raises_with_reason():
    r = _run(_NO_GPU_CODE, {})
    assert r.returncode == 0, r.stderr[-3000:]
    if "RAN" in r.stdout:
        pytest.skip("a usable CUDA GPU is present")
    assert "RAISED: backend='cuda' is not usable here: " in r.stdout, r.stdout
    assert "BACKENDS: ['cpu']" in r.stdout


def test_import_does_not_load_numba_cuda():
    r = _run("import sys, fastdistill, fastdistill.cuda; print('numba.cuda' in sys.modules)", {})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "False"


# ------------------------------------------------------------------ simulator cases

LOSSES = {
    "kl": (lambda: fd.DistilLoss.kl_divergence(2.0), "kl_divergence", 2.0, 0.5),
    "reverse_kl": (lambda: fd.DistilLoss.reverse_kl(2.0), "reverse_kl", 2.0, 0.5),
    "jsd0": (lambda: fd.DistilLoss.jsd(0.0, 2.0), "jsd", 2.0, 0.0),
    "jsd.5": (lambda: fd.DistilLoss.jsd(0.5, 2.0), "jsd", 2.0, 0.5),
    "jsd1": (lambda: fd.DistilLoss.jsd(1.0, 2.0), "jsd", 2.0, 1.0),
    "skew_kl": (lambda: fd.DistilLoss.skew_kl(0.1, 2.0), "skew_kl", 2.0, 0.1),
    "skew_reverse_kl": (lambda: fd.DistilLoss.skew_reverse_kl(0.1, 2.0), "skew_reverse_kl", 2.0, 0.1),
    "tvd": (lambda: fd.DistilLoss.tvd(2.0), "tvd", 2.0, 0.5),
    "alpha": (lambda: fd.DistilLoss.alpha_divergence(0.3, 2.0), "alpha_divergence", 2.0, 0.3),
    "mse": (lambda: fd.DistilLoss.mse(), "mse", 1.0, 0.5),
    "cosine": (lambda: fd.DistilLoss.cosine(), "cosine", 1.0, 0.5),
}
SHAPES = [(1, 1), (3, 5), (4, 33), (2, 70)]


def _ref_soft(name, s, t, reduction):
    pytest.importorskip("torch")
    _, kind, tau, param = LOSSES[name]
    return torch_response(s, t, None, 0.0, 1.0, kind, tau, param, reduction=reduction)


@sim
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_divergences_float64_against_autograd(name, shape):
    pytest.importorskip("torch")
    s, t, _ = make_batch(*shape, np.float64, seed=len(name) + shape[1], mask=False)
    loss = LOSSES[name][0]()
    for red in ("mean", "none"):
        got, g = loss.compute_with_grad(s, t, reduction=red, backend="cuda")
        ref, rg = _ref_soft(name, s, t, red)
        assert isinstance(g, np.ndarray) and g.shape == s.shape and g.dtype == np.float64
        if red == "mean":
            assert isinstance(got, float)
            assert got == pytest.approx(ref, rel=1e-10, abs=1e-12)
        else:
            assert got.shape == (shape[0],) and got.dtype == np.float64
            np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(g, rg, rtol=1e-9, atol=1e-12)


@sim
@pytest.mark.parametrize("name", list(LOSSES))
def test_masked_classes_float64(name):
    # -inf classes (shared by student and teacher) have probability 0 and gradient 0
    s, t, _ = make_batch(4, 33, np.float64, seed=21, mask=name not in ("mse", "cosine"))
    loss = LOSSES[name][0]()
    _, kind, tau, param = LOSSES[name]
    rows, g = loss.compute_with_grad(s, t, reduction="none", backend="cuda")
    ref_rows, _ = response_rows(s, t, None, 0.0, 1.0, kind, tau, param)
    np.testing.assert_allclose(rows, ref_rows, rtol=1e-10, atol=1e-13)
    assert np.all(np.isfinite(g)) and np.all(g[np.isinf(s)] == 0.0)
    _, gc = loss.compute_with_grad(s, t, reduction="none", backend="cpu")
    assert rel_err(g, gc) < 1e-12


@sim
@pytest.mark.parametrize("shape", [(3, 5), (4, 33), (2, 70)])
@pytest.mark.parametrize("name", list(LOSSES))
def test_divergences_float32_against_cpu_backend(name, shape):
    s, t, _ = make_batch(*shape, np.float32, seed=7 + shape[1], mask=name not in ("mse", "cosine"))
    loss = LOSSES[name][0]()
    got, g = loss.compute_with_grad(s, t, reduction="sum", backend="cuda")
    ref, rg = loss.compute_with_grad(s, t, reduction="sum", backend="cpu")
    assert g.dtype == np.float32
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert rel_err(g, rg) < 1e-5
    f64, _ = _ref_soft(name, s, t, "sum")
    assert got == pytest.approx(f64, rel=1e-5, abs=1e-6)


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_combined_loss(dtype):
    pytest.importorskip("torch")
    s, t, _ = make_batch(4, 33, dtype, seed=3, mask=False)
    loss = fd.DistilLoss.combined(0.7, 0.3, 3.0)
    got, g = loss.compute_with_grad(s, t, backend="cuda")
    kl, gk = torch_response(s, t, None, 0.0, 0.7, "kl_divergence", 3.0)
    ms, gm = torch_response(s, t, None, 0.0, 0.3, "mse", 1.0)
    tol = TOL[dtype]
    assert got == pytest.approx(kl + ms, rel=tol)
    assert rel_err(g, gk + gm) < 10 * tol


RESPONSE = [
    # (soft kind, tau, hard_w, soft_w, label smoothing): CE shares the normaliser at tau 1, else its own
    ("kl_divergence", 1.0, 0.5, 0.5, 0.0),
    ("kl_divergence", 4.0, 0.5, 0.5, 0.1),
    ("reverse_kl", 1.0, 0.3, 0.7, 0.2),
    ("jsd", 2.0, 0.5, 0.5, 0.0),
    ("tvd", 1.0, 0.5, 1.0, 0.1),
    ("mse", 1.0, 1.0, 0.5, 0.0),
]
_CTOR = {
    "kl_divergence": fd.DistilLoss.kl_divergence, "reverse_kl": fd.DistilLoss.reverse_kl,
    "jsd": lambda tau: fd.DistilLoss.jsd(0.5, tau), "tvd": fd.DistilLoss.tvd, "mse": lambda tau: fd.DistilLoss.mse(),
}


def _fused_rows(monkeypatch, rows):
    """The fused loss kernel (labels counted and row losses summed inside) for batches of at most
    ``rows`` rows (0: never)."""
    from fastdistill.cuda import _launch

    name = "GPU_LAUNCH" if ON_GPU else "SIM_LAUNCH"
    monkeypatch.setitem(getattr(_launch, name), "fused_rows", rows)


@sim
@pytest.mark.parametrize("fuse", [0, 64], ids=["three-kernels", "fused-kernel"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", RESPONSE)
def test_response_with_labels(case, reduction, fuse, monkeypatch):
    pytest.importorskip("torch")
    _fused_rows(monkeypatch, fuse)
    kind, tau, hw, sw, eps = case
    s, t, y = make_batch(6, 9, np.float64, seed=11, mask=False)
    y[1] = IGNORE
    d = fd.ResponseDistiller(_CTOR[kind](tau), hw, sw, ignore_index=IGNORE, label_smoothing=eps)
    got, g = d.loss_and_grad(s, t, y, reduction=reduction, backend="cuda")
    ref, rg = torch_response(s, t, y, hw, sw, kind, tau, 0.5, eps, IGNORE, reduction=reduction)
    if reduction == "none":
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
        assert got[1] == 0.0
    else:
        assert got == pytest.approx(ref, rel=1e-10)
    assert rel_err(g, rg) < 1e-9
    assert np.all(g[1] == 0.0)
    # float32 against the CPU backend
    s32, t32 = s.astype(np.float32), t.astype(np.float32)
    a, ga = d.loss_and_grad(s32, t32, y, reduction=reduction, backend="cuda")
    b, gb = d.loss_and_grad(s32, t32, y, reduction=reduction, backend="cpu")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert rel_err(ga, gb) < 1e-5


@sim
def test_cross_entropy_and_num_items():
    s, _, y = make_batch(5, 7, np.float64, seed=5)
    y[0] = IGNORE
    keep = y != IGNORE
    rows, _ = response_rows(s, s, y, 1.0, 0.0, "mse", 1.0, eps=0.1)
    got = fd.cross_entropy(s, y, label_smoothing=0.1, backend="cuda")
    assert got == pytest.approx(reduce(rows, keep, "mean"), rel=1e-10)
    got = fd.cross_entropy(s, y, label_smoothing=0.1, num_items=17, backend="cuda")
    assert got == pytest.approx(rows.sum() / 17, rel=1e-10)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5)
    a, ga = d.loss_and_grad(s, s[::-1].copy(), y, num_items=9.5, backend="cuda")
    b, gb = d.loss_and_grad(s, s[::-1].copy(), y, num_items=9.5, backend="cpu")
    assert a == pytest.approx(b, rel=1e-12)
    assert rel_err(ga, gb) < 1e-12


@sim
def test_all_rows_ignored_gives_zero():
    s, t, _ = make_batch(3, 5, np.float32, seed=2)
    y = np.full(3, IGNORE)
    d = fd.ResponseDistiller.balanced()
    loss, g = d.loss_and_grad(s, t, y, backend="cuda")
    assert loss == 0.0 and np.all(g == 0.0)


@sim
def test_grad_out_and_in_place():
    s, t, y = make_batch(4, 33, np.float32, seed=9)
    d = fd.ResponseDistiller.balanced()
    ref, rg = d.loss_and_grad(s, t, y, backend="cpu")
    buf = np.full_like(s, 7.0)
    loss, g = d.loss_and_grad(s, t, y, grad_out=buf, backend="cuda")
    assert g is buf and loss == pytest.approx(ref, rel=1e-5)
    assert rel_err(buf, rg) < 1e-5
    s2 = s.copy()
    loss, g = d.loss_and_grad(s2, t, y, grad_out=s2, backend="cuda")
    assert g is s2 and rel_err(s2, rg) < 1e-5


@sim
def test_device_arrays_round_trip_and_in_place():
    from numba import cuda

    s, t, y = make_batch(3, 20, np.float64, seed=4)
    d = fd.ResponseDistiller(fd.DistilLoss.reverse_kl(3.0), 0.5, 0.5)
    ref, rg = d.loss_and_grad(s, t, y, reduction="none", backend="cpu")
    ds, dt, dy = cuda.to_device(s), cuda.to_device(t), cuda.to_device(y.astype(np.int32))
    rows, g = d.loss_and_grad(ds, dt, dy, reduction="none", backend="cuda")
    assert hasattr(rows, "copy_to_host") and hasattr(g, "copy_to_host")
    np.testing.assert_allclose(rows.copy_to_host(), ref, rtol=1e-12)
    assert rel_err(g.copy_to_host(), rg) < 1e-12
    loss, g2 = d.loss_and_grad(ds, dt, dy, grad_out=ds, backend="cuda")  # in place on the device
    assert g2 is ds and rel_err(ds.copy_to_host(), rg / np.count_nonzero(y != IGNORE)) < 1e-12
    with pytest.raises(fd.InvalidParameterError):
        d.loss_and_grad(cuda.to_device(s), dt, dy, grad_out=dt, backend="cuda")


@sim
def test_leading_dims_and_single_row():
    pytest.importorskip("torch")
    s, t, _ = make_batch(6, 11, np.float64, seed=8)
    loss = fd.DistilLoss.kl_divergence(2.0)
    rows, g = loss.compute_with_grad(s.reshape(2, 3, 11), t.reshape(2, 3, 11), reduction="none", backend="cuda")
    ref, rg = torch_response(s, t, None, 0.0, 1.0, "kl_divergence", 2.0, reduction="none")
    assert rows.shape == (2, 3) and g.shape == (2, 3, 11)
    np.testing.assert_allclose(rows.reshape(-1), ref, rtol=1e-10, atol=1e-14)
    one = loss.compute(s[0], t[0], backend="cuda")
    assert one == pytest.approx(ref[0], rel=1e-10)


@sim
def test_nan_propagates_and_minus_inf_is_masked():
    s, t, _ = make_batch(3, 9, np.float32, seed=1, mask=True)
    s[1, 2] = np.nan
    rows = fd.DistilLoss.kl_divergence(1.0).compute(s, t, reduction="none", backend="cuda")
    assert np.isnan(rows[1]) and np.all(np.isfinite(rows[[0, 2]]))
    # -inf in the teacher only (forward KL): p = 0 there, finite loss and gradient
    s, t, _ = make_batch(2, 12, np.float32, seed=6, mask=False)
    t[:, 3] = -np.inf
    a, ga = fd.DistilLoss.kl_divergence(2.0).compute_with_grad(s, t, backend="cuda")
    b, gb = fd.DistilLoss.kl_divergence(2.0).compute_with_grad(s, t, backend="cpu")
    assert np.isfinite(a) and np.all(np.isfinite(ga))
    assert a == pytest.approx(b, rel=1e-5) and rel_err(ga, gb) < 1e-5


@sim
@pytest.mark.parametrize("dtype,gap", [(np.float32, 1e9), (np.float64, 1e9), (np.float64, 800.0)])
def test_a_mask_against_an_underflowing_probability_on_the_gpu(dtype, gap):
    # a -inf logit against the other side's logit whose probability underflows: +inf (the exact value, the
    # probability being positive) or, where the arithmetic flushed it to 0, the loss of the other classes;
    # never NaN (the online rescale of the KL cross term made 0 * inf)
    masked = np.array([[-np.inf, -0.2642097265826038, 1.0]], dtype)
    finite = np.array([[-gap, -0.2642097265826038, 1.0]], dtype)
    for loss, s, t in ((fd.DistilLoss.reverse_kl(1.0), finite, masked),
                       (fd.DistilLoss.kl_divergence(1.0), masked, finite)):
        rows, g = loss.compute_with_grad(s, t, reduction="none", backend="cuda")
        want, gw = loss.compute_with_grad(s[:, 1:].copy(), t[:, 1:].copy(), reduction="none", backend="cuda")
        assert not np.isnan(rows).any()
        if rows[0] != np.inf:  # (an infinite loss has no gradient to compare)
            np.testing.assert_allclose(rows, want, rtol=1e-6, atol=1e-7)
            assert g[0, 0] == 0.0
            np.testing.assert_allclose(g[:, 1:], gw, rtol=1e-6, atol=1e-7)


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mse_of_an_infinite_logit_is_infinite_on_the_gpu(dtype):
    # MSE takes logits at face value: a +inf loss and a +inf gradient in that column only (the cosine,
    # unweighted here, is NaN there and made the row NaN)
    s = np.array([[0.25, 1.0], [0.5, -1.0]], dtype)
    t = np.array([[-np.inf, 1.0], [0.25, 2.0]], dtype)
    rows, g = fd.DistilLoss.mse().compute_with_grad(s, t, reduction="none", backend="cuda")
    want, gw = fd.DistilLoss.mse().compute_with_grad(s, t, reduction="none", backend="cpu")
    assert rows[0] == np.inf and g[0, 0] == np.inf and g[0, 1] == 0.0
    assert want[0] == np.inf and gw[0, 0] == np.inf and gw[0, 1] == 0.0
    np.testing.assert_allclose(rows[1], want[1], rtol=1e-6)
    np.testing.assert_allclose(g[1], gw[1], rtol=1e-6)


@sim
@pytest.mark.parametrize("fuse", [0, 64], ids=["three-kernels", "fused-kernel"])
def test_label_errors_come_first(fuse, monkeypatch):
    _fused_rows(monkeypatch, fuse)
    s, t, y = make_batch(4, 5, np.float32, seed=2, ignore=False)
    y[2] = 5
    d = fd.ResponseDistiller.balanced()
    with pytest.raises(fd.LabelOutOfRangeError) as e:
        d.loss_and_grad(s, t, y, backend="cuda")
    assert e.value.label == 5 and e.value.n_classes == 5 and "labels[2]" in str(e.value)
    y[2] = -3
    with pytest.raises(fd.LabelOutOfRangeError):
        d.loss(s, t, y, reduction="none", backend="cuda")
    with pytest.raises(fd.LabelOutOfRangeError):  # label range is checked before parameters
        d.loss(s, t, y, reduction="bogus", backend="cuda")
    y[2] = 1
    with pytest.raises(fd.InvalidParameterError):
        d.loss(s, t, y, reduction="bogus", backend="cuda")


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("log", [False, True])
def test_softmax(log, dtype):
    x, _, _ = make_batch(3, 37, dtype, seed=12, mask=True)
    x[1, :] = np.where(np.isfinite(x[1]), x[1], 0.0)
    fn = fd.log_softmax if log else fd.softmax
    got = fn(x, 2.5, backend="cuda")
    ref = log_softmax(x.astype(np.float64) / 2.5)
    assert got.dtype == dtype and got.shape == x.shape
    if log:
        fin = np.isfinite(ref)
        assert np.all(got[~fin] == -np.inf)
        assert rel_err(got[fin], ref[fin]) < TOL[dtype] * 10
    else:
        assert rel_err(got, np.exp(ref)) < TOL[dtype]
    x[2, 4] = np.nan
    assert np.all(np.isnan(fn(x, 1.0, backend="cuda")[2]))


@sim
@pytest.mark.parametrize("geometry", [
    {"small_n": 8, "group": 1, "block_small": 4, "max_grid": 1},  # one thread per row, grid-stride
    {"small_n": 8, "group": 2, "block_small": 8, "max_grid": 2},
    {"small_n": 4, "block_mid": 4, "large_n": 8, "block_large": 2, "max_grid": 1},  # block per row
    # the fused kernel with many blocks finishing in turn (the last one sums the row losses), and not
    {"small_n": 8, "group": 1, "block_small": 1, "max_grid": 64, "fused_rows": 64},
    {"small_n": 8, "group": 2, "block_small": 4, "max_grid": 3, "fused_rows": 64},
    {"small_n": 8, "group": 2, "block_small": 4, "max_grid": 3, "fused_rows": 0},
])
def test_launch_geometries(geometry, monkeypatch):
    from fastdistill.cuda import _launch

    name = "GPU_LAUNCH" if ON_GPU else "SIM_LAUNCH"
    monkeypatch.setattr(_launch, name, {**getattr(_launch, name), **geometry})
    s, t, y = make_batch(5, 13, np.float32, seed=13)
    d = fd.ResponseDistiller(fd.DistilLoss.jsd(0.5, 2.0), 0.5, 0.5, label_smoothing=0.1)
    a, ga = d.loss_and_grad(s, t, y, backend="cuda")
    b, gb = d.loss_and_grad(s, t, y, backend="cpu")
    assert a == pytest.approx(b, rel=1e-5) and rel_err(ga, gb) < 1e-5
    for red in ("sum", "none"):
        np.testing.assert_allclose(d.loss(s, t, y, reduction=red, backend="cuda"),
                                   d.loss(s, t, y, reduction=red, backend="cpu"), rtol=1e-5)
    sm = fd.softmax(s, 0.5, backend="cuda")
    assert rel_err(sm, fd.softmax(s, 0.5, backend="cpu")) < 1e-6


@sim
def test_deterministic_and_float32_accuracy_at_high_temperature():
    rng = np.random.default_rng(0)
    s = (rng.normal(size=(2, 3000)) * 5).astype(np.float32)
    t = (rng.normal(size=(2, 3000)) * 5).astype(np.float32)
    loss = fd.DistilLoss.kl_divergence(20.0)
    a, ga = loss.compute_with_grad(s, t, backend="cuda")
    b, gb = loss.compute_with_grad(s, t, backend="cuda")
    assert a == b and np.array_equal(ga, gb)
    ref, rg = torch_response(s, t, None, 0.0, 1.0, "kl_divergence", 20.0) if _has_torch() else (None, None)
    if ref is not None:
        assert a == pytest.approx(ref, rel=1e-5)
        assert rel_err(ga, rg) < 1e-5


def _has_torch():
    return importlib.util.find_spec("torch") is not None


@sim
@pytest.mark.parametrize("fuse", [0, 64], ids=["three-kernels", "fused-kernel"])
def test_teacher_of_another_dtype_is_converted(fuse, monkeypatch):
    # a float64 teacher with a float32 student was read as float32 (the launch cache key left out the
    # teacher's dtype, and nothing converted it); the CPU path computes in the student's precision
    _fused_rows(monkeypatch, fuse)
    from numba import cuda

    s, t, y = make_batch(4, 33, np.float32, seed=5)
    t64 = t.astype(np.float64) * 1.5
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5)
    want, gw = d.loss_and_grad(s, t64, y, backend="cpu")
    for teacher in (t64, cuda.to_device(t64)):
        a, ga = d.loss_and_grad(s, teacher, y, backend="cuda")
        assert a == pytest.approx(want, rel=1e-5) and rel_err(ga, gw) < 1e-5
    # the same float32 call after the float64 one, and the reverse, from the launch cache
    b, gb = d.loss_and_grad(s, t64.astype(np.float32), y, backend="cuda")
    assert b == pytest.approx(want, rel=1e-5)
    ds, dt64 = cuda.to_device(s), cuda.to_device(t64)
    rows = d.loss(ds, dt64, cuda.to_device(y), reduction="none", backend="cuda")
    assert rows.dtype == np.float32
    np.testing.assert_allclose(rows.copy_to_host(), d.loss(s, t64, y, reduction="none", backend="cpu"), rtol=1e-5)


@sim
@pytest.mark.parametrize("tau", [33.0, 1e4])
def test_float64_arithmetic_for_float32_at_high_temperature(tau):
    rng = np.random.default_rng(7)
    s = rng.normal(size=(3, 40))
    t = rng.normal(size=(3, 40))
    loss = fd.DistilLoss.kl_divergence(tau)
    v64, g64 = loss.compute_with_grad(s, t, backend="cpu")
    v32, g32 = loss.compute_with_grad(s.astype(np.float32), t.astype(np.float32), backend="cuda")
    assert v32 == pytest.approx(v64, rel=1e-5) and rel_err(g32, g64) < 1e-5
    assert np.all(loss.compute(s.astype(np.float32), t.astype(np.float32), reduction="none", backend="cuda") >= 0)
    assert np.all(fd.DistilLoss.kl_divergence(1e4).compute(s, t, reduction="none", backend="cuda") >= 0)


@sim
def test_a_row_that_is_minus_inf_everywhere_gives_nan_on_the_gpu():
    s, t, y = make_batch(4, 9, np.float64, seed=3, mask=False, ignore=False)
    s[1] = -np.inf
    d = fd.ResponseDistiller.balanced()
    rows, g = d.loss_and_grad(s, t, y, reduction="none", backend="cuda")
    assert np.isnan(rows[1]) and np.all(np.isfinite(rows[[0, 2, 3]]))
    assert np.all(np.isnan(g[1])) and np.all(np.isfinite(g[[0, 2, 3]]))


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_plus_inf_logit_gives_a_nan_row_on_the_gpu(dtype):
    # a +inf student logit, or +inf at the same class of both rows: no softmax (inf - inf), so a NaN loss
    # and a NaN gradient row, as on the CPU (the mixtures' masked terms summed to a loss of 0)
    s, t, y = make_batch(3, 9, dtype, seed=4, mask=False, ignore=False)
    s[0, 2] = np.inf
    s[1, 5] = t[1, 5] = np.inf
    for loss in (fd.DistilLoss.jsd(0.9, 2.0), fd.DistilLoss.reverse_kl(2.0), fd.DistilLoss.kl_divergence(1.0)):
        rows, g = loss.compute_with_grad(s, t, reduction="none", backend="cuda")
        rows_cpu, g_cpu = loss.compute_with_grad(s, t, reduction="none", backend="cpu")
        assert np.isnan(rows[:2]).all() and np.isnan(g[:2]).all()
        assert np.isnan(rows_cpu[:2]).all() and np.isnan(g_cpu[:2]).all()
        assert np.isfinite(rows[2]) and np.isfinite(g[2]).all()
    # the same rows split across vocabulary shards (the +inf of row 1 in the second shard)
    d = fd.ResponseDistiller(fd.DistilLoss.jsd(0.9, 2.0), 0.4, 0.6)
    results, _ = _combine_shards([d.vocab_shard(s[:, a:b].copy(), t[:, a:b].copy(), y, class_offset=a, classes=9,
                                                backend="cuda", reduction="none") for a, b in ((0, 4), (4, 9))])
    for loss, _ in results:
        assert np.isnan(loss[:2]).all() and np.isfinite(loss[2])
    g = np.concatenate([g for _, g in results], axis=1)
    assert np.isnan(g[:2]).all() and np.isfinite(g[2]).all()


# ------------------------------------------------------------------ half precision


def _half(name):
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(np.float16)


def _within_ulp(got, want, dtype):
    """Two roundings of the same float32 arithmetic to ``dtype``: at most one unit in the last place apart
    (and a few float32 units of the row's largest element, where terms cancel)."""
    got = np.asarray(got).astype(np.float64)
    want = np.asarray(want).astype(np.float64)
    e = np.floor(np.log2(np.maximum(np.abs(want), 1e-300)))
    ulp = 2.0 ** (np.maximum(e, -126 if dtype.name == "bfloat16" else -14) - (7 if dtype.name == "bfloat16" else 10))
    slack = 1e-6 * np.max(np.abs(want))
    assert np.all(np.abs(got - want) <= ulp + slack), np.max(np.abs(got - want) / ulp)


@sim
@pytest.mark.parametrize("fuse", [0, 64], ids=["three-kernels", "fused-kernel"])
@pytest.mark.parametrize("kind", ["kl_divergence", "jsd", "reverse_kl", "mse"])
@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_half_precision_matches_the_cpu_backend(half, kind, fuse, monkeypatch):
    _fused_rows(monkeypatch, fuse)
    dt = _half(half)
    s32, t32, y = make_batch(5, 37, np.float32, seed=21, mask=kind != "mse")
    s, t = s32.astype(dt), t32.astype(dt)
    soft = {"kl_divergence": fd.DistilLoss.kl_divergence(2.0), "jsd": fd.DistilLoss.jsd(0.3, 2.0),
            "reverse_kl": fd.DistilLoss.reverse_kl(1.0), "mse": fd.DistilLoss.mse()}[kind]
    d = fd.ResponseDistiller(soft, 0.0 if kind == "mse" else 0.4, 0.6)
    want, gw = d.loss_and_grad(s, t, y, backend="cpu")
    got, gg = d.loss_and_grad(s, t, y, backend="cuda")
    assert gg.dtype == dt and gg.shape == s.shape
    assert got == pytest.approx(want, rel=1e-6)
    _within_ulp(gg, gw, dt)
    rows = d.loss(s, t, y, reduction="none", backend="cuda")
    assert rows.dtype == np.float32
    np.testing.assert_allclose(rows, d.loss(s, t, y, reduction="none", backend="cpu"), rtol=1e-6, atol=1e-9)
    # the float64 reference of the same 16-bit values
    ref_rows, keep = response_rows(s.astype(np.float64), t.astype(np.float64), y, d.hard_label_weight, 0.6,
                                   kind, getattr(soft, "temperature", 1.0), 0.3)
    assert got == pytest.approx(ref_rows.sum() / keep.sum(), rel=1e-5)


@sim
@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_half_precision_mixed_formats_and_device_arrays(half):
    from numba import cuda

    dt = _half(half)
    s32, t32, y = make_batch(4, 33, np.float32, seed=22)
    s = s32.astype(dt)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5)
    # a float32 teacher beside the half student, and a float32 gradient buffer
    want, gw = d.loss_and_grad(s, t32, y, backend="cpu")
    got, gg = d.loss_and_grad(s, t32, y, backend="cuda")
    assert got == pytest.approx(want, rel=1e-6)
    _within_ulp(gg, gw, dt)
    g32 = np.empty(s.shape, np.float32)
    _, g_cpu = d.loss_and_grad(s, t32, y, backend="cpu", grad_out=np.empty(s.shape, np.float32))
    out, g = d.loss_and_grad(s, t32, y, backend="cuda", grad_out=g32)
    assert g is g32 and rel_err(g32, g_cpu) < 1e-6
    # softmax keeps the format
    sm = fd.softmax(s, 1.5, backend="cuda")
    assert sm.dtype == dt
    _within_ulp(sm, fd.softmax(s, 1.5, backend="cpu"), dt)
    if half == "float16":  # numba device arrays of float16 in and out
        ds, dt_ = cuda.to_device(s), cuda.to_device(t32.astype(np.float16))
        loss, dg = d.loss_and_grad(ds, dt_, cuda.to_device(y), backend="cuda")
        assert dg.dtype == np.float16
        w2, gw2 = d.loss_and_grad(s, t32.astype(np.float16), y, backend="cpu")
        assert loss == pytest.approx(w2, rel=1e-6)
        _within_ulp(dg.copy_to_host(), gw2, dt)


# ------------------------------------------------------------------ sparse (top-k) teachers


@sim
@pytest.mark.parametrize("tail", ["renormalize", "support", "bucket"])
@pytest.mark.parametrize("kind", ["kl_divergence", "jsd", "tvd", "reverse_kl"])
@pytest.mark.parametrize("shape", [(5, 9), (3, 70)])
def test_sparse_teacher_matches_the_cpu_backend(kind, tail, shape):
    if kind == "reverse_kl" and tail == "renormalize":
        pytest.skip("refused with tail='renormalize'")
    rows, n = shape
    rng = np.random.default_rng(41)
    s = rng.normal(size=(rows, n)) * 2
    t = rng.normal(size=(rows, n)) * 2
    idx = np.argsort(-t, axis=1)[:, :4].copy()
    idx[0, -1] = -1
    lp = t - np.log(np.exp(t).sum(1, keepdims=True))
    vals = np.take_along_axis(lp, idx, 1).astype(np.float32)
    y = rng.integers(0, n, rows)
    y[1] = IGNORE
    tau = 1.0 if tail == "bucket" else 2.0
    soft = {"kl_divergence": fd.DistilLoss.kl_divergence(tau), "jsd": fd.DistilLoss.jsd(0.3, tau),
            "tvd": fd.DistilLoss.tvd(tau), "reverse_kl": fd.DistilLoss.reverse_kl(tau)}[kind]
    d = fd.ResponseDistiller(soft, 0.4, 0.6)
    teacher = fd.SparseTeacher(idx, vals, tail=tail)
    for dtype in (np.float64, np.float32):
        want, gw = d.loss_and_grad(s.astype(dtype), teacher, y, backend="cpu")
        got, gg = d.loss_and_grad(s.astype(dtype), teacher, y, backend="cuda")
        tol = 1e-10 if dtype == np.float64 else 1e-5
        assert got == pytest.approx(want, rel=tol)
        assert gg.dtype == dtype and rel_err(gg, gw) < tol
        rows_c = d.loss(s.astype(dtype), teacher, y, reduction="none", backend="cuda")
        np.testing.assert_allclose(rows_c, d.loss(s.astype(dtype), teacher, y, reduction="none", backend="cpu"),
                                   rtol=tol, atol=1e-12)


@sim
def test_sparse_teacher_half_student_and_device_arrays():
    from numba import cuda

    dt = np.dtype(np.float16)
    rng = np.random.default_rng(42)
    s = (rng.normal(size=(4, 33)) * 2).astype(dt)
    t = rng.normal(size=(4, 33))
    idx = np.argsort(-t, axis=1)[:, :5].copy()
    vals = np.take_along_axis(t - np.log(np.exp(t).sum(1, keepdims=True)), idx, 1)
    y = rng.integers(0, 33, 4)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5)
    want, gw = d.loss_and_grad(s, fd.SparseTeacher(idx, vals), y, backend="cpu")
    got, gg = d.loss_and_grad(cuda.to_device(s), fd.SparseTeacher(cuda.to_device(idx), cuda.to_device(vals)),
                              cuda.to_device(y), backend="cuda")
    assert got == pytest.approx(want, rel=1e-6)
    _within_ulp(gg.copy_to_host(), gw, dt)


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_top_k_on_the_device_equals_the_cpu(dtype):
    from numba import cuda

    rng = np.random.default_rng(43)
    x = rng.normal(size=(5, 40)).astype(dtype)
    x[0, [3, 9]] = x[0].max() + 1  # a tie: the lower id first
    want = fd.top_k(x, 6, temperature=2.0)
    got = fd.top_k(cuda.to_device(x), 6, temperature=2.0, backend="cuda")
    np.testing.assert_array_equal(got.indices.copy_to_host(), want.indices)
    np.testing.assert_allclose(got.values.copy_to_host(), want.values, rtol=1e-5, atol=1e-6)
    assert list(got.indices.copy_to_host()[0, :2]) == [3, 9]


@sim
def test_sparse_teacher_gradient_in_place():
    from numba import cuda

    rng = np.random.default_rng(44)
    s = rng.normal(size=(4, 30))
    t = rng.normal(size=(4, 30))
    idx = np.argsort(-t, axis=1)[:, :5].copy()
    vals = np.take_along_axis(t - np.log(np.exp(t).sum(1, keepdims=True)), idx, 1)
    y = rng.integers(0, 30, 4)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5)
    teacher = fd.SparseTeacher(idx, vals)
    want, gw = d.loss_and_grad(s, teacher, y, backend="cpu")
    ds = cuda.to_device(s)
    got, g = d.loss_and_grad(ds, teacher, cuda.to_device(y), grad_out=ds, backend="cuda")
    assert got == pytest.approx(want, rel=1e-10)
    assert rel_err(ds.copy_to_host(), gw) < 1e-10


@sim
@pytest.mark.parametrize("tail", ["renormalize", "support", "bucket"])
@pytest.mark.parametrize("kind", ["kl_divergence", "jsd", "reverse_kl"])
def test_sparse_teacher_generation_temperature(kind, tail):
    """Values produced at T_gen (weights exp(v * T_gen / tau)): the float64 reference of
    test_sparse_teacher.py and the CPU backend, losses and gradients."""
    from test_sparse_teacher import reference

    if kind == "reverse_kl" and tail == "renormalize":
        pytest.skip("refused with tail='renormalize'")
    rng = np.random.default_rng(45)
    rows, n, k = 5, 37, 6
    s = rng.normal(size=(rows, n)) * 2
    t = rng.normal(size=(rows, n)) * 2
    idx = np.argsort(-t, axis=1)[:, :k].copy()
    idx[0, -1] = -1
    t_gen = 0.7
    lp = t / t_gen - np.log(np.exp(t / t_gen).sum(1, keepdims=True))
    vals = np.take_along_axis(lp, idx, 1).astype(np.float32)
    y = rng.integers(0, n, rows)
    y[1] = IGNORE
    tau = t_gen if tail == "bucket" else 1.8
    soft = {"kl_divergence": fd.DistilLoss.kl_divergence(tau), "jsd": fd.DistilLoss.jsd(0.3, tau),
            "reverse_kl": fd.DistilLoss.reverse_kl(tau)}[kind]
    d = fd.ResponseDistiller(soft, 0.4, 0.6)
    teacher = fd.SparseTeacher(idx, vals, tail=tail, temperature=t_gen)
    ref, gref = reference(kind, tail, s, idx, vals.astype(np.float64), y, tau, 0.4, 0.6, t_gen=t_gen)
    for dtype in (np.float64, np.float32):
        got, gg = d.loss_and_grad(s.astype(dtype), teacher, y, backend="cuda")
        want, gw = d.loss_and_grad(s.astype(dtype), teacher, y, backend="cpu")
        tol = 1e-10 if dtype == np.float64 else 1e-5
        assert got == pytest.approx(ref, rel=tol) and got == pytest.approx(want, rel=tol)
        assert rel_err(gg, gref) < tol and rel_err(gg, gw) < tol
    if tail == "bucket":
        with pytest.raises(fd.InvalidParameterError, match="loss's temperature equal"):
            fd.ResponseDistiller(fd.DistilLoss.kl_divergence(1.0), 0.4, 0.6).loss(s, teacher, y, backend="cuda")


@sim
def test_sparse_teacher_adversarial_rows_match_the_cpu():
    """Rows that once gave wrong numbers (NaN, +inf and all -inf teacher values; a support whose
    student mass underflows; the bucket's rest bin and the renormalize tail's outside bin of a
    confident student) agree with the CPU backend, itself checked against float64 references in
    test_probe_numbers.py."""
    n = 200
    s = np.full((6, n), -45.0)
    s[:, :4] = 0.0
    s[1, :] = np.linspace(-1.0, 1.0, n)
    s[2, 4:] = -80.0  # 1 - sum_S q is 0 there, and the outside sum falls below REST_FLOOR relative to the maximum
    s[3, :] = np.linspace(0.0, 2.0, n)
    s[3, [5, 6, 7]] = -1e9  # the support masked out in the student
    ids = np.tile(np.arange(4), (6, 1))
    ids[3] = [5, 6, 7, -1]
    lp = np.log(np.tile([0.4, 0.3, 0.1, 0.1], (6, 1)))
    y = np.arange(6) % n
    cases = [
        ("bucket", fd.DistilLoss.kl_divergence(1.0), lp),
        ("renormalize", fd.DistilLoss.jsd(0.5, 1.0), lp),
        ("renormalize", fd.DistilLoss.tvd(1.0), lp),
        ("support", fd.DistilLoss.kl_divergence(1.0), lp),
    ]
    bad = lp.copy()
    bad[4, 1] = np.nan
    bad[5, :] = -np.inf
    cases.append(("renormalize", fd.DistilLoss.kl_divergence(2.0), bad))
    cases.append(("support", fd.DistilLoss.kl_divergence(2.0), bad))
    for dtype in (np.float64, np.float32):
        for tail, soft, vals in cases:
            d = fd.ResponseDistiller(soft, 0.3, 0.7)
            teacher = fd.SparseTeacher(ids, vals, tail=tail)
            want, gw = d.loss_and_grad(s.astype(dtype), teacher, y, reduction="none", backend="cpu")
            got, gg = d.loss_and_grad(s.astype(dtype), teacher, y, reduction="none", backend="cuda")
            tol = 1e-10 if dtype == np.float64 else 1e-5
            np.testing.assert_allclose(got, want, rtol=tol, atol=0)
            np.testing.assert_allclose(gg, gw, rtol=10 * tol, atol=1e-30)
            if vals is bad:
                assert np.isnan(got[4:]).all() and np.isnan(gg[4:]).all()


@sim
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_support_beside_a_huge_student_logit_outside(dtype):
    # tail='support' normalises the student over the support: a student logit of 1e30 outside it does not
    # matter (s_j - max kept none of the support's digits: the loss was 0.666 for 0.332)
    s = np.array([[5.875, -1.46094, 6.09375, -0.0727539, 6.09375, 1e30, -1.40625, 7.78125, -1.5]], dtype)
    idx = np.array([[8, 1, 3, 6]])
    teacher = fd.SparseTeacher(idx, np.array([[1.75516, -7.62445, -6.5336, -0.5602]], dtype), tail="support")
    s_off = s.copy()
    s_off[0, 5] = 0.0
    loss = fd.DistilLoss.jsd(0.3, 1.0)
    got, g = loss.compute_with_grad(s, teacher, reduction="none", backend="cuda")
    want, gw = loss.compute_with_grad(s_off, teacher, reduction="none", backend="cuda")
    cpu, gc = loss.compute_with_grad(s, teacher, reduction="none", backend="cpu")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got, cpu, rtol=1e-5)
    np.testing.assert_allclose(g[:, idx[0]], gw[:, idx[0]], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g, gc, rtol=1e-5, atol=1e-7)


@sim
def test_device_grad_out_overlapping_the_student_is_refused():
    from numba import cuda

    rng = np.random.default_rng(45)
    buf = cuda.to_device(rng.normal(size=(5, 8)))
    t = rng.normal(size=(4, 8))
    with pytest.raises(fd.InvalidParameterError, match="grad_out"):
        fd.DistilLoss.kl_divergence(1.0).compute_with_grad(buf[:4], t, grad_out=buf[1:], backend="cuda")


# ------------------------------------------------------------------ vocabulary shards on the GPU

SHARD_LOSSES = [
    ("kl", lambda: fd.DistilLoss.kl_divergence(2.0)),
    ("kl_t1", lambda: fd.DistilLoss.kl_divergence(1.0)),  # CE sharing the normaliser
    ("reverse_kl", lambda: fd.DistilLoss.reverse_kl(3.0)),
    ("jsd", lambda: fd.DistilLoss.jsd(0.3, 2.0)),
    ("skew_reverse_kl", lambda: fd.DistilLoss.skew_reverse_kl(0.2, 2.0)),
    ("tvd", lambda: fd.DistilLoss.tvd(2.0)),
    ("alpha", lambda: fd.DistilLoss.alpha_divergence(0.3, 2.0)),
    ("mse", lambda: fd.DistilLoss.mse()),
    ("cosine", lambda: fd.DistilLoss.cosine()),
]


def _combine_shards(shards):
    """The shards' rounds side by side, combined with NumPy (what an all-reduce does); the rounds'
    widths per row."""
    widths = []
    for items in zip(*[sh.exchanges() for sh in shards]):
        ops = {op for _, op in items}
        assert len(ops) == 1
        bufs = [np.asarray(b) for b, _ in items]
        widths.append(bufs[0].shape[1])
        combined = np.max(bufs, axis=0) if ops == {"max"} else np.sum(bufs, axis=0)
        for b in (b for b, _ in items):
            b[...] = combined
    return [sh.result() for sh in shards], widths


@sim
@pytest.mark.parametrize("name,make", SHARD_LOSSES)
@pytest.mark.parametrize("cuts,rows", [((0, 9, 23, 40), 5), ((0, 1, 90), 3)])
def test_vocab_shards_on_the_gpu_equal_the_whole_rows(name, make, cuts, rows):
    """Shards run by the GPU kernels (host arrays copied over): every shard's loss and the concatenated
    gradients equal the CPU backend on the whole rows (float64 1e-10), with a masked class, a row
    without mass in the first shard and an ignored row; 2 or 3 rounds of 2, 11 (and 2) numbers."""
    classes = cuts[-1]
    rng = np.random.default_rng(7)
    s = rng.normal(size=(rows, classes)) * 2
    t = rng.normal(size=(rows, classes)) * 2
    y = rng.integers(cuts[1], classes, rows)
    y[1] = IGNORE
    s[:, cuts[1] + 1] = t[:, cuts[1] + 1] = -np.inf
    y[y == cuts[1] + 1] = cuts[1] + 2
    s[2, :cuts[1]] = t[2, :cuts[1]] = -np.inf
    y[0] = 0  # a label in the first shard
    linear = name in ("mse", "cosine")
    if linear:
        s[np.isinf(s)] = 0.5
        t[np.isinf(t)] = -0.5
    d = fd.ResponseDistiller(make(), 0.0 if linear else 0.4, 1.0 if linear else 0.6,
                             label_smoothing=0.0)
    for red in ("mean", "none"):
        want, gw = d.loss_and_grad(s, t, None if linear else y, backend="cpu", reduction=red)
        shards = [d.vocab_shard(np.ascontiguousarray(s[:, a:b]), np.ascontiguousarray(t[:, a:b]),
                                None if linear else y, class_offset=a, classes=classes, backend="cuda", reduction=red)
                  for a, b in zip(cuts, cuts[1:])]
        results, widths = _combine_shards(shards)
        assert widths == ([2, 11, 2] if name in ("jsd", "skew_reverse_kl", "tvd", "alpha") else [2, 11])
        for loss, _ in results:
            np.testing.assert_allclose(loss, want, rtol=1e-10, atol=1e-13)
        got = np.concatenate([g for _, g in results], axis=1)
        assert rel_err(got, gw) < 1e-10


@sim
def test_vocab_shards_on_the_gpu_float32_label_smoothing_and_device_arrays():
    from numba import cuda

    rng = np.random.default_rng(8)
    s = (rng.normal(size=(6, 30)) * 2).astype(np.float32)
    t = (rng.normal(size=(6, 30)) * 2).astype(np.float32)
    y = rng.integers(0, 30, 6)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5, label_smoothing=0.1)
    want, gw = d.loss_and_grad(s, t, y, backend="cpu")
    shards = [d.vocab_shard(cuda.to_device(np.ascontiguousarray(s[:, a:b])), cuda.to_device(np.ascontiguousarray(t[:, a:b])),
                            cuda.to_device(y), class_offset=a, classes=30, backend="cuda")
              for a, b in ((0, 17), (17, 30))]
    for items in zip(*[sh.exchanges() for sh in shards]):  # device buffers: combined on the device's copies
        bufs = [b.copy_to_host() for b, _ in items]
        combined = np.max(bufs, axis=0) if items[0][1] == "max" else np.sum(bufs, axis=0)
        for b, _ in items:
            b.copy_to_device(combined)
    results = [sh.result() for sh in shards]
    for loss, _ in results:
        assert loss == pytest.approx(want, rel=1e-6)
    got = np.concatenate([g.copy_to_host() for _, g in results], axis=1)
    assert rel_err(got, gw) < 1e-5

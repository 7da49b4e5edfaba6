"""A sparse teacher's generation temperature ``T_gen`` (``SparseTeacher(..., temperature=T_gen)``): at loss
temperature tau the support's weights are ``exp(v * T_gen / tau)``, against a float64 autograd reference
written from that definition (every tail and divergence, losses and gradients), its refusals, its
carriage through ``fastdistill.torch`` and the C ABI, and ``top_k``'s teachers."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import fastdistill as fd
from conftest import rel_err
from fastdistill.sparse import SparseTeacher, codes, from_codes
from test_sparse_teacher import SOFT, batch, reference

torch = pytest.importorskip("torch")

# (divergence, tail, loss temperature, generation temperature); "bucket" only where they are equal
CASES = [(kind, tail, tau, t_gen) for tail in ("renormalize", "support", "bucket") for kind in SOFT
         for tau, t_gen in (((0.7, 0.7), (2.0, 2.0)) if tail == "bucket" else ((1.0, 0.7), (2.5, 2.0), (0.8, 3.0)))
         if not (tail == "renormalize" and kind == "reverse_kl")]


@pytest.mark.parametrize("kind,tail,tau,t_gen", CASES, ids=[f"{t}-{k}-T{tau}-G{g}" for k, t, tau, g in CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_tail_and_divergence_against_float64(kind, tail, tau, t_gen, dtype):
    s, idx, vals, y = batch(9, 61, 7, seed=len(kind) + int(tau * 10) + int(t_gen * 7), pad=True)
    s = s.astype(dtype)
    v32 = vals.astype(np.float32)
    teacher = SparseTeacher(idx, v32, tail=tail, temperature=t_gen)
    d = fd.ResponseDistiller(SOFT[kind](tau), 0.3, 0.7)
    loss, grad = d.loss_and_grad(s, teacher, y)
    ref_loss, ref_grad = reference(kind, tail, s.astype(np.float64), idx, v32.astype(np.float64), y, tau, 0.3, 0.7,
                                   t_gen=t_gen)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    assert loss == pytest.approx(ref_loss, rel=tol)
    assert grad.dtype == dtype and rel_err(grad, ref_grad) < tol
    assert d.loss(s, teacher, y) == pytest.approx(loss, rel=1e-12)


@pytest.mark.parametrize("tail", ["renormalize", "support", "bucket"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_temperature_one_keeps_the_numbers_bitwise(tail, dtype):
    s, idx, vals, y = batch(6, 300, 9, seed=3, pad=True)
    s = s.astype(dtype)
    tau = 1.0 if tail == "bucket" else 2.0
    d = fd.ResponseDistiller(fd.DistilLoss.jsd(0.3, tau), 0.4, 0.6)
    rows0 = d.loss(s, SparseTeacher(idx, vals, tail=tail), y, reduction="none")
    l0, g0 = d.loss_and_grad(s, SparseTeacher(idx, vals, tail=tail), y)
    t1 = SparseTeacher(idx, vals, tail=tail, temperature=1.0)
    rows1 = d.loss(s, t1, y, reduction="none")
    l1, g1 = d.loss_and_grad(s, t1, y)
    assert rows1.tobytes() == rows0.tobytes() and l1 == l0
    assert g1.tobytes() == g0.tobytes()
    # the same teacher at tau = T_gen = 1 and at tau = T_gen = 2 over "renormalize": p is the values' own
    # distribution in both (only the student's temperature differs), and every class with T_gen = tau
    # equals the dense teacher of those log-probabilities
    if tail == "renormalize":
        t = np.random.default_rng(5).normal(size=(6, 300))
        lp = t / 2.0 - np.log(np.exp(t / 2.0).sum(1, keepdims=True))
        full = SparseTeacher(np.tile(np.arange(300), (6, 1)), lp, temperature=2.0)
        kl = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.0, 1.0)
        want, gw = kl.loss_and_grad(s.astype(np.float64), t, None)
        got, gg = kl.loss_and_grad(s.astype(np.float64), full, None)
        assert got == pytest.approx(want, rel=1e-10) and rel_err(gg, gw) < 1e-10


def test_refusals():
    s, idx, vals, y = batch(4, 20, 3, seed=1)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(fd.InvalidParameterError, match="SparseTeacher temperature"):
            SparseTeacher(idx, vals, temperature=bad)
    with pytest.raises(fd.InvalidParameterError, match="kind='logits'"):
        SparseTeacher(idx, vals, kind="logits", temperature=2.0)
    SparseTeacher(idx, vals, kind="logits", temperature=1.0)  # (accepted)
    bucket = SparseTeacher(idx, vals, tail="bucket", temperature=2.0)
    for tau in (1.0, 2.5):
        with pytest.raises(fd.InvalidParameterError, match="loss's temperature equal to the teacher's"):
            fd.DistilLoss.kl_divergence(tau).compute(s, bucket)
    fd.DistilLoss.kl_divergence(2.0).compute(s, bucket)  # (tau == T_gen: accepted)
    with pytest.raises(fd.InvalidParameterError, match="loss's temperature equal to the teacher's"):
        fd.DistilLoss.kl_divergence(2.0).compute(s, SparseTeacher(idx, vals, tail="bucket"))
    t = SparseTeacher(idx, vals, temperature=0.7)
    assert t.temperature == 0.7 and "temperature=0.7" in repr(t)
    assert SparseTeacher(idx, vals).temperature == 1.0


def test_codes_carry_the_temperature_exactly():
    _, idx, vals, _ = batch(2, 10, 3, seed=2)
    for t_gen in (1.0, 0.1, 1 / 3, 2.0 ** -30, 7.25e5):
        back = from_codes(idx, vals, codes(SparseTeacher(idx, vals, tail="support", temperature=t_gen)))
        assert back.temperature == t_gen and back.tail == "support" and back.kind == "logprobs"
    assert from_codes(idx, vals, [0, 1]).temperature == 1.0  # (two codes: temperature 1)


@pytest.mark.parametrize("tail", ["renormalize", "support", "bucket"])
def test_torch_op_gives_the_numpy_bits(tail):
    from fastdistill.torch import DistillationLoss, FusedLinearDistillationLoss

    s, idx, vals, y = batch(5, 40, 6, seed=8, pad=True)
    t_gen = 0.7
    tau = t_gen if tail == "bucket" else 1.6
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(tau), 0.5, 0.5)
    v32 = vals.astype(np.float32)
    want, gw = d.loss_and_grad(s.astype(np.float32), SparseTeacher(idx, v32, tail=tail, temperature=t_gen), y)
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    teacher = SparseTeacher(torch.tensor(idx), torch.tensor(v32), tail=tail, temperature=t_gen)
    crit = DistillationLoss(temperature=tau)
    loss = crit(st, teacher, torch.tensor(y))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-6)
    assert rel_err(st.grad.numpy(), gw) < 1e-6
    if tail == "support":  # the same through torch.compile (the codes are traced as constants)
        st.grad = None
        loss2 = torch.compile(lambda a, b, c: crit(a, b, c), fullgraph=True)(st, teacher, torch.tensor(y))
        loss2.backward()
        assert float(loss2.detach()) == pytest.approx(float(want), rel=1e-6)
        assert rel_err(st.grad.numpy(), gw) < 1e-6
    # the fused linear loss carries it as well (its chunks rebuild the teacher from the op's codes)
    rng = np.random.default_rng(9)
    x = torch.tensor(rng.normal(size=(5, 8)), dtype=torch.float64)
    w = torch.tensor(rng.normal(size=(40, 8)), dtype=torch.float64)
    t64 = SparseTeacher(torch.tensor(idx), torch.tensor(vals), tail=tail, temperature=t_gen)
    fused = FusedLinearDistillationLoss(temperature=tau, chunk_size=2)(x, w, t64, labels=torch.tensor(y))
    ref = d.loss((x @ w.T).numpy(), SparseTeacher(idx, vals, tail=tail, temperature=t_gen), y)
    assert float(fused) == pytest.approx(float(ref), rel=1e-10)


def test_sparse_op_with_a_temperature_passes_opcheck():
    from fastdistill.torch import _describe

    s, idx, vals, y = batch(4, 20, 3, seed=12)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5)
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    args = (st, torch.tensor(idx), torch.tensor(vals, dtype=torch.float32), torch.tensor(y),
            _describe(d, "mean", None, True), None, codes(SparseTeacher(idx, vals, temperature=0.7)))
    torch.library.opcheck(torch.ops.fastdistill.sparse_response, args)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_k_teacher_carries_its_temperature(dtype):
    rng = np.random.default_rng(21)
    t = rng.normal(scale=3.0, size=(5, 50)).astype(dtype)
    s = rng.normal(scale=2.0, size=(5, 50)).astype(dtype)
    for tau in (1.0, 2.0, 0.6):
        top = fd.top_k(t, 50, temperature=tau)
        assert top.temperature == tau and f"temperature={tau!r}" in repr(top)
        # every class at the loss's temperature: the dense teacher softmax(t / tau)
        kl = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(tau), 0.0, 1.0)
        want, gw = kl.loss_and_grad(s, t, None)
        got, gg = kl.loss_and_grad(s, top, None)
        tol = 1e-5 if dtype == np.float32 else 1e-10
        assert got == pytest.approx(want, rel=tol) and rel_err(gg, gw) < tol
        # bucket at tau = T_gen accepted, at another refused
        b = SparseTeacher(top.indices[:, :8], top.values[:, :8], tail="bucket", temperature=top.temperature)
        assert np.isfinite(kl.loss(s, b, None))


def test_c_abi_teacher_temperature():
    capi = pytest.importorskip("fastdistill.capi")
    syms = capi.symbols(jobs=1)
    vp, i32, i64, dbl = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_double
    fn = ctypes.CFUNCTYPE(i32, vp, vp, vp, i64, vp, i64, i64, i32, dbl, dbl, dbl, dbl, dbl, i64, i32, dbl, i32,
                          vp, vp, i32)(syms["fd_response_sparse_f32"])
    s, idx, vals, y = batch(6, 30, 5, seed=4, pad=True)
    s = np.ascontiguousarray(s, np.float32)
    idx = np.ascontiguousarray(idx, np.int64)
    v32 = np.ascontiguousarray(vals, np.float32)
    y = np.ascontiguousarray(y, np.int64)

    def call(tail, T, t_gen):
        loss = np.zeros(1)
        g = np.zeros_like(s)
        st = fn(s.ctypes.data, idx.ctypes.data, v32.ctypes.data, 5, y.ctypes.data, 6, 30, capi.FD_KL, T, 0.3, 0.7,
                0.0, 0.0, -100, tail, t_gen, capi.FD_MEAN, loss.ctypes.data, g.ctypes.data, 0)
        return st, loss[0], g

    for tail, name in ((capi.FD_TAIL_RENORMALIZE, "renormalize"), (capi.FD_TAIL_SUPPORT, "support"),
                       (capi.FD_TAIL_BUCKET, "bucket")):
        T, t_gen = (0.7, 0.7) if name == "bucket" else (1.5, 0.7)
        st, loss, g = call(tail, T, t_gen)
        assert st == capi.FD_OK, capi.status_message(st)
        d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(T), 0.3, 0.7)
        want, gw = d.loss_and_grad(s, SparseTeacher(idx, v32, tail=name, temperature=t_gen), y)
        assert loss == pytest.approx(want, rel=1e-12)
        assert g.tobytes() == gw.tobytes()
    assert call(capi.FD_TAIL_BUCKET, 1.0, 0.7)[0] == capi.FD_BAD_PARAM
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        assert call(capi.FD_TAIL_SUPPORT, 1.0, bad)[0] == capi.FD_BAD_PARAM


def test_store_keeps_the_temperature(tmp_path):
    pytest.importorskip("pyarrow")
    from fastdistill import teachers

    rng = np.random.default_rng(6)
    t = rng.normal(scale=2.0, size=(2, 12, 30)).astype(np.float32)
    tops = [fd.top_k(t[i], 5, temperature=2.0) for i in range(2)]
    teachers.save(tmp_path / "store", tops)
    store = teachers.load(tmp_path / "store")
    assert store.meta["temperature"] == 2.0
    back = store[1]
    assert back.temperature == 2.0
    np.testing.assert_array_equal(np.asarray(back.indices), tops[1].indices)
    s = rng.normal(size=(12, 30)).astype(np.float32)
    kl = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.0, 1.0)
    assert kl.loss(s, back, None) == pytest.approx(
        kl.loss(s, SparseTeacher(tops[1].indices, np.asarray(back.values), temperature=2.0), None), rel=1e-12)

"""float16 and bfloat16 logits read natively: results against float64 references computed from the
same 16-bit values, gradients within one unit in the last place of their format, mixed formats, the
edge cases of the dense kernels, no temporary of the logits' size, and the PyTorch layer."""
from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest

import fastdistill as fd
from conftest import IGNORE, make_batch, rel_err
from reference import cross_entropy, divergence, log_softmax, response_rows, torch_response

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALVES = [BF16, F16]
MANTISSA = {BF16: 7, F16: 10, np.dtype(np.float32): 23}  # explicit mantissa bits
MIN_EXP = {BF16: -126, F16: -14, np.dtype(np.float32): -126}  # exponent of the smallest normal


def ids(dt):
    return np.dtype(dt).name


def ulp(x, dtype):
    """One unit in the last place of ``dtype`` at the float64 values ``x`` (subnormals included)."""
    dtype = np.dtype(dtype)
    e = np.floor(np.log2(np.maximum(np.abs(x), 1e-300)))
    return 2.0 ** (np.maximum(e, MIN_EXP[dtype]) - MANTISSA[dtype])


def kl_ce_grad(s, t, y, tau, hard_w, soft_w):
    """Analytic float64 gradient of ``mean(hard_w * CE + soft_w * tau^2 * KL)`` and, elementwise, the
    magnitude of the terms it is computed from (what float32 arithmetic rounds)."""
    s = s.astype(np.float64)
    t = t.astype(np.float64)
    keep = y != IGNORE
    n = max(int(keep.sum()), 1)
    q1 = np.exp(log_softmax(s))
    qt = np.exp(log_softmax(s / tau))
    pt = np.exp(log_softmax(t / tau))
    onehot = np.zeros_like(s)
    onehot[np.arange(len(y))[keep], y[keep]] = 1.0
    g = hard_w * (q1 - onehot) + soft_w * tau * (qt - pt)
    terms = hard_w * (q1 + onehot) + soft_w * tau * (qt + pt)
    return np.where(keep[:, None], g, 0.0) / n, np.where(keep[:, None], terms, 0.0) / n


def assert_within_ulp(got, ref, terms, dtype):
    """Each element within one ulp of ``dtype`` of the float64 reference, plus float32 rounding of the
    terms it is a difference of (a few units of 2**-24 of their magnitude)."""
    got = np.asarray(got).astype(np.float64)
    err = np.abs(got - ref)
    bound = ulp(ref, dtype) + 8 * 2.0**-24 * terms
    bad = err > bound
    assert not bad.any(), (f"{bad.sum()} elements beyond 1 ulp: worst error/ulp "
                           f"{np.max(err / ulp(ref, dtype)):.2f} at {np.unravel_index(np.argmax(err - bound), err.shape)}")


# ------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
@pytest.mark.parametrize("shape", [(37, 211), (3, 5000), (1, 2 * 16384 + 77)], ids=["rows", "wide", "split-row"])
@pytest.mark.parametrize("tau", [1.0, 2.0, 3.0])
def test_kl_with_cross_entropy_within_one_ulp(dtype, shape, tau):
    s32, t32, y = make_batch(*shape, np.float32, seed=shape[1] + int(tau), mask=True, ignore=shape[0] > 1)
    s, t = s32.astype(dtype), t32.astype(dtype)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(tau), 0.4, 0.6)
    loss, grad = d.loss_and_grad(s, t, y)
    assert grad.dtype == dtype and grad.shape == s.shape
    rows, keep = response_rows(s.astype(np.float64), t.astype(np.float64), y, 0.4, 0.6, "kl_divergence", tau)
    ref = rows.sum() / keep.sum()
    assert abs(loss - ref) <= 1e-5 * abs(ref)
    g_ref, terms = kl_ce_grad(s, t, y, tau, 0.4, 0.6)
    assert_within_ulp(grad, g_ref, terms, dtype)
    assert d.loss(s, t, y) == loss  # the forward-only kernels: the same loss


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_confident_label_gradient_is_rounded_once(dtype):
    """Liger-Kernel issue 1432: a bfloat16 gradient 4-23% off because softmax was rounded to bfloat16
    before the one-hot was subtracted. Confident rows (the label's probability near 1) make that
    rounding visible: q - 1 loses the digits q had."""
    rng = np.random.default_rng(1432)
    rows, n = 64, 500
    y = rng.integers(0, n, rows)
    s = rng.normal(size=(rows, n))
    s[np.arange(rows), y] = rng.uniform(7.0, 11.0, rows)  # p(label) from ~0.9 to ~0.999
    s = s.astype(dtype)
    t = s.copy()
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(1.0), 1.0, 0.0)  # CE alone
    _, grad = d.loss_and_grad(s, t, y)
    g_ref, terms = kl_ce_grad(s, t, y, 1.0, 1.0, 0.0)
    assert_within_ulp(grad, g_ref, terms, dtype)
    at = grad[np.arange(rows), y].astype(np.float64)
    want = g_ref[np.arange(rows), y]
    # rounding softmax to the format first would leave the label's element off by up to ~25%
    assert np.max(np.abs(at - want) / np.abs(want)) < 2.0 ** -MANTISSA[dtype]
    naive = (np.exp(log_softmax(s.astype(np.float64))).astype(dtype).astype(np.float64) - 1.0) / rows
    assert np.max(np.abs(naive[np.arange(rows), y] - want) / np.abs(want)) > 4 * 2.0 ** -MANTISSA[dtype]


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
@pytest.mark.parametrize("kind,param", [("reverse_kl", None), ("jsd", 0.3), ("skew_kl", 0.2),
                                        ("skew_reverse_kl", 0.2), ("tvd", None), ("mse", None),
                                        ("cosine", None)])
def test_every_soft_loss_against_float64(dtype, kind, param, torch):
    s32, t32, y = make_batch(19, 73, np.float32, seed=hash(kind) % 1000, mask=kind not in ("mse", "cosine"))
    s, t = s32.astype(dtype), t32.astype(dtype)
    make = getattr(fd.DistilLoss, kind)
    soft = make(param, 2.0) if param is not None else (make() if kind in ("mse", "cosine") else make(2.0))
    tau = getattr(soft, "temperature", 1.0)
    hard_w = 0.0 if kind in ("mse", "cosine") else 0.3
    d = fd.ResponseDistiller(soft, hard_w, 0.7)
    loss, grad = d.loss_and_grad(s, t, y)
    ref_loss, ref_grad = torch_response(s.astype(np.float64), t.astype(np.float64), y, hard_w, 0.7, kind, tau,
                                        param if param is not None else 0.5)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    # one ulp of the format at each element, plus float32 arithmetic relative to the batch's largest
    scale = np.max(np.abs(ref_grad))
    err = np.abs(grad.astype(np.float64) - ref_grad)
    assert np.all(err <= ulp(ref_grad, dtype) + 1e-6 * scale), np.max(err / ulp(ref_grad, dtype))
    rows = d.loss(s, t, y, reduction="none")
    assert rows.dtype == np.float32  # the contract: per-row results of half inputs in float32


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_softmax_keeps_the_format(dtype):
    x32, _, _ = make_batch(9, 300, np.float32, seed=4)
    x = x32.astype(dtype)
    for log, f in ((False, fd.softmax), (True, fd.log_softmax)):
        out = f(x, 1.5)
        assert out.dtype == dtype and out.shape == x.shape
        ref = log_softmax(x.astype(np.float64) / 1.5)
        ref = ref if log else np.exp(ref)
        fin = np.isfinite(ref)
        err = np.abs(out.astype(np.float64)[fin] - ref[fin])
        assert np.all(err <= ulp(ref[fin], dtype) + 1e-6 * np.abs(ref[fin]).max())
        assert np.array_equal(np.isneginf(out.astype(np.float64)), np.isneginf(ref)) if log else True


# ------------------------------------------------------------------ mixed formats and buffers


@pytest.mark.parametrize("s_dt,t_dt", [(BF16, np.float32), (F16, np.float32), (np.float32, BF16),
                                       (np.float32, F16), (BF16, F16), (F16, BF16), (BF16, np.float64)],
                         ids=lambda d: np.dtype(d).name)
def test_student_and_teacher_formats_may_differ(s_dt, t_dt):
    s32, t32, y = make_batch(23, 97, np.float32, seed=8)
    s, t = s32.astype(s_dt), t32.astype(t_dt)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5)
    loss, grad = d.loss_and_grad(s, t, y)
    assert grad.dtype == np.dtype(s_dt)
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    rows, keep = response_rows(s64, t64, y, 0.5, 0.5, "kl_divergence", 2.0)
    assert abs(loss - rows.sum() / keep.sum()) <= 1e-5 * abs(rows.sum() / keep.sum())
    g_ref, terms = kl_ce_grad(s, t, y, 2.0, 0.5, 0.5)
    assert_within_ulp(grad, g_ref, terms, s_dt if np.dtype(s_dt) in HALVES else np.float32)


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_float32_grad_out_for_a_half_student(dtype):
    s32, t32, y = make_batch(15, 64, np.float32, seed=9)
    s, t = s32.astype(dtype), t32.astype(dtype)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(3.0), 0.5, 0.5)
    g = np.full(s.shape, np.nan, np.float32)
    loss, grad = d.loss_and_grad(s, t, y, grad_out=g)
    assert grad is g
    g_ref, terms = kl_ce_grad(s, t, y, 3.0, 0.5, 0.5)
    assert_within_ulp(g, g_ref, terms, np.float32)  # float32 precision, not the student's
    # the same numbers as the half gradient before its rounding
    _, gh = d.loss_and_grad(s, t, y)
    np.testing.assert_array_equal(gh, g.astype(dtype))
    with pytest.raises(TypeError, match=f"grad_out dtype float64 differs from student dtype {dtype.name}"):
        d.loss_and_grad(s, t, y, grad_out=np.empty(s.shape))
    other = F16 if dtype == BF16 else BF16
    with pytest.raises(TypeError, match="grad_out dtype"):
        d.loss_and_grad(s, t, y, grad_out=np.empty(s.shape, other))


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_in_place_gradient_and_leading_dims(dtype):
    s32, t32, y = make_batch(12, 40, np.float32, seed=10)
    s, t = s32.astype(dtype).reshape(3, 4, 40), t32.astype(dtype).reshape(3, 4, 40)
    d = fd.ResponseDistiller(fd.DistilLoss.jsd(0.5, 2.0), 0.5, 0.5)
    loss, grad = d.loss_and_grad(s, t, y.reshape(3, 4))
    rows = d.loss(s, t, y.reshape(3, 4), reduction="none")
    assert rows.shape == (3, 4) and rows.dtype == np.float32 and grad.shape == (3, 4, 40)
    work = s.copy()
    loss2, g2 = d.loss_and_grad(work, t, y.reshape(3, 4), grad_out=work)
    assert g2 is work and loss2 == loss
    np.testing.assert_array_equal(work.view(np.uint16), grad.view(np.uint16))


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_edge_cases(dtype, tmp_path):
    kl = fd.DistilLoss.kl_divergence(1.0)
    # one class: no divergence, a zero gradient
    one = np.ones((4, 1), dtype)
    loss, g = kl.compute_with_grad(one, one)
    assert loss == 0.0 and not g.astype(np.float32).any()
    # -inf logits are masked classes (never NaN), a NaN propagates, an all -inf row is NaN
    s = np.array([[0.0, -np.inf, 1.0], [np.nan, 0.0, 1.0], [-np.inf, -np.inf, -np.inf]]).astype(dtype)
    t = np.array([[1.0, -np.inf, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 2.0]]).astype(dtype)
    rows, g = kl.compute_with_grad(s, t, reduction="none")
    ref = divergence("kl_divergence", s[:1].astype(np.float64), t[:1].astype(np.float64))
    assert rows[0] == pytest.approx(ref[0], rel=1e-5) and np.isnan(rows[1]) and np.isnan(rows[2])
    g = g.astype(np.float32)
    assert g[0, 1] == 0.0 and np.isfinite(g[0]).all() and np.isnan(g[2]).all()
    # huge logits (bfloat16 reaches 3e38, float16 65504)
    big = np.array([[np.finfo(np.float16).max, 0.0, -np.finfo(np.float16).max]]).astype(dtype)
    loss, g = kl.compute_with_grad(big, big[:, ::-1].copy())
    assert np.isfinite(loss) and loss > 0 and np.isfinite(g.astype(np.float32)).all()
    # ignored rows: zero loss and gradient; every row ignored: 0 and a zero gradient
    s32, t32, y = make_batch(8, 30, np.float32, seed=11)
    hs, ht = s32.astype(dtype), t32.astype(dtype)
    y[:] = IGNORE
    loss, g = fd.ResponseDistiller.balanced().loss_and_grad(hs, ht, y)
    assert loss == 0.0 and not g.astype(np.float32).any()
    # read-only and memory-mapped inputs, never modified
    y = np.arange(8) % 30
    ref_loss, ref_g = fd.ResponseDistiller.balanced().loss_and_grad(hs, ht, y)
    path = tmp_path / "s.npy"
    np.save(path, hs.view(np.uint16))
    mm = np.load(path, mmap_mode="r").view(dtype)
    ro = ht.copy()
    ro.setflags(write=False)
    before = (mm.copy(), ro.copy())
    loss, g = fd.ResponseDistiller.balanced().loss_and_grad(mm, ro, y)
    assert loss == ref_loss and np.array_equal(g.view(np.uint16), ref_g.view(np.uint16))
    assert np.array_equal(mm.view(np.uint16), before[0].view(np.uint16))
    assert np.array_equal(ro.view(np.uint16), before[1].view(np.uint16))


def test_other_dtypes_are_refused_naming_the_argument():
    s = np.zeros((2, 3), np.float32)
    accepted = "float32, float64, float16 or bfloat16"
    for bad in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(np.complex64), np.dtype(np.int16),
                np.dtype(np.float32).newbyteorder()):
        with pytest.raises(TypeError, match=f"teacher must hold {accepted} logits, got dtype {re.escape(str(bad))}"):
            fd.kl_divergence(s, np.zeros((2, 3), bad))
        with pytest.raises(TypeError, match=f"student must hold {accepted} logits, got dtype {re.escape(str(bad))}"):
            fd.kl_divergence(np.zeros((2, 3), bad), s)


# ------------------------------------------------------------------ memory


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_no_temporary_of_the_logits_size(dtype):
    s32, t32, y = make_batch(256, 4096, np.float32, seed=12, mask=False)
    s, t = s32.astype(dtype), t32.astype(dtype)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5)
    g = np.empty_like(s)
    d.loss_and_grad(s, t, y, grad_out=g)  # compiled and cached before measuring
    d.loss(s, t, y)
    for call in (lambda: d.loss(s, t, y), lambda: d.loss_and_grad(s, t, y, grad_out=g)):
        tracemalloc.start()
        call()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 0.1 * s.nbytes, (peak, s.nbytes)
    # (a teacher in a format without kernels beside the student is converted: that copy is traced)
    tracemalloc.start()
    d.loss(s, t.astype(F16 if dtype == BF16 else BF16), y)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak >= 2 * t.nbytes


# ------------------------------------------------------------------ vocabulary shards


def test_bfloat16_vocab_shards_equal_the_whole_row():
    s32, t32, y = make_batch(6, 90, np.float32, seed=13)
    s, t = s32.astype(BF16), t32.astype(BF16)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5)
    whole, g_whole = d.loss_and_grad(s, t, y)
    bounds = [(0, 40), (40, 90)]
    shards = [d.vocab_shard(s[:, a:b].copy(), t[:, a:b].copy(), y, class_offset=a, classes=90) for a, b in bounds]
    its = [sh.exchanges() for sh in shards]
    for pair in zip(*its):  # each round combined across the shards, as an all-reduce would
        bufs = [b for b, _ in pair]
        op = pair[0][1]
        combined = np.maximum.reduce(bufs) if op == "max" else np.add.reduce(bufs)
        for b in bufs:
            b[...] = combined
    outs = [sh.result() for sh in shards]
    for (a, b), (loss, g) in zip(bounds, outs):
        assert loss == pytest.approx(whole, rel=1e-6)  # (float32 block sums over other column ranges)
        assert g.dtype == BF16
        gw = g_whole[:, a:b].astype(np.float64)
        assert np.all(np.abs(g.astype(np.float64) - gw) <= ulp(gw, BF16))


# ------------------------------------------------------------------ PyTorch


@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
def test_torch_half_tensors(torch, tdtype):
    from fastdistill.torch import DistillationLoss

    dt = getattr(torch, tdtype)
    s32, t32, y = make_batch(33, 120, np.float32, seed=14)
    s = torch.from_numpy(s32).to(dt).requires_grad_(True)
    t = torch.from_numpy(t32).to(dt)
    lab = torch.from_numpy(y)
    loss = DistillationLoss(temperature=2.0)(s, t, lab)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad.dtype == dt
    sh = s.detach().float().numpy().astype(BF16 if tdtype == "bfloat16" else F16)
    th = t.float().numpy().astype(sh.dtype)
    g_ref, terms = kl_ce_grad(sh, th, y, 2.0, 0.5, 0.5)
    assert_within_ulp(s.grad.float().numpy(), g_ref, terms, sh.dtype)
    rows, keep = response_rows(sh.astype(np.float64), th.astype(np.float64), y, 0.5, 0.5, "kl_divergence", 2.0)
    assert float(loss.detach()) == pytest.approx(rows.sum() / keep.sum(), rel=1e-5)
    # the NumPy API takes the tensors as they are; the gradient in the tensor's format
    _, g = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5).loss_and_grad(s.detach(), t, lab)
    g = torch.as_tensor(g) if not isinstance(g, torch.Tensor) else g
    assert torch.equal(g.to(dt), s.grad)

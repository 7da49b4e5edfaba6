"""``fastdistill.torch.FusedLinearDistillationLoss``: the value and the gradients of ``DistillationLoss``
on the full logits, chunk by chunk."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fastdistill.torch import DistillationLoss, FusedLinearDistillationLoss  # noqa: E402

IGNORE = -100


def _setup(rows=37, hidden=16, classes=53, dtype=torch.float64, seed=0, bias=True, teacher_hidden=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g, dtype=dtype, requires_grad=True)
    w = (torch.randn(classes, hidden, generator=g, dtype=dtype) * 0.3).requires_grad_(True)
    b = (torch.randn(classes, generator=g, dtype=dtype) * 0.1).requires_grad_(True) if bias else None
    tx = torch.randn(rows, 24, generator=g, dtype=dtype)
    tw = torch.randn(classes, 24, generator=g, dtype=dtype) * 0.3
    tb = torch.randn(classes, generator=g, dtype=dtype) * 0.1
    y = torch.randint(0, classes, (rows,), generator=g)
    y[::5] = IGNORE
    return x, w, b, tx, tw, tb, y


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 8, 1024])
@pytest.mark.parametrize("soft", [dict(soft_loss="kl_divergence", temperature=2.0),
                                  dict(soft_loss="jsd", temperature=1.5, beta=0.3)])
def test_value_and_gradients_equal_the_full_logits(dtype, tol, chunk, soft):
    x, w, b, tx, tw, tb, y = _setup(dtype=dtype)
    fused = FusedLinearDistillationLoss(hard_label_weight=0.4, soft_label_weight=0.6, chunk_size=chunk, **soft)
    loss = fused(x, w, tx, tw, y, b, tb)
    loss.backward()
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    ref_crit = DistillationLoss(hard_label_weight=0.4, soft_label_weight=0.6, **soft)
    ref = ref_crit(x @ w.t() + b, (tx @ tw.t() + tb).detach(), y)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=tol)
    for a, r in zip(got, (x.grad, w.grad, b.grad)):
        assert torch.allclose(a, r, rtol=tol, atol=tol * float(r.abs().max())), float((a - r).abs().max())


def test_teacher_logits_no_bias_upstream_scale_and_all_ignored():
    x, w, _, tx, tw, tb, y = _setup(bias=False)
    t_logits = tx @ tw.t() + tb
    fused = FusedLinearDistillationLoss(temperature=3.0, chunk_size=10)
    loss = 2.5 * fused(x, w, t_logits, labels=y)
    loss.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = 2.5 * DistillationLoss(temperature=3.0)(x @ w.t(), t_logits, y)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    assert torch.allclose(gx, x.grad, rtol=1e-10, atol=1e-14) and torch.allclose(gw, w.grad, rtol=1e-10, atol=1e-14)
    x.grad = w.grad = None
    none = fused(x, w, t_logits, labels=torch.full_like(y, IGNORE))
    none.backward()
    assert float(none.detach()) == 0.0 and not x.grad.any() and not w.grad.any()


def test_bfloat16_and_compile():
    x, w, b, tx, tw, tb, y = _setup(dtype=torch.float32)
    fused = FusedLinearDistillationLoss(temperature=2.0, chunk_size=16)
    xb, wb, bb = (t.detach().to(torch.bfloat16).requires_grad_(True) for t in (x, w, b))
    loss = fused(xb, wb, tx, tw, y, bb, tb)
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    ref = DistillationLoss(temperature=2.0)((xb.detach().float() @ wb.detach().float().t() + bb.detach().float()),
                                            tx @ tw.t() + tb, y)
    assert float(loss.detach()) == pytest.approx(float(ref), rel=2e-2)
    # the gradients: float64 on the same bfloat16 values, within bfloat16's precision
    xr, wr, br = (t.detach().double().requires_grad_(True) for t in (xb, wb, bb))
    DistillationLoss(temperature=2.0)(xr @ wr.t() + br, (tx @ tw.t() + tb).double(), y).backward()
    for got, want in ((xb.grad, xr.grad), (wb.grad, wr.grad), (bb.grad, br.grad)):
        assert float((got.double() - want).norm() / want.norm()) < 2e-2
    compiled = torch.compile(lambda *a: fused(*a), fullgraph=True)
    x.grad = None
    out = compiled(x, w, tx, tw, y, b, tb)
    out.backward()
    eager = fused(x.detach(), w.detach(), tx, tw, y, b.detach(), tb)
    assert float(out.detach()) == pytest.approx(float(eager), rel=1e-6)
    assert x.grad is not None and x.grad.shape == x.shape


def test_float16_gradients_survive_a_large_batch_and_a_grad_scaler():
    # 4096 rows: each logit's gradient of the mean is ~1e-5 / classes, below float16's smallest normal;
    # the fused head keeps them in float32 until backward has applied the scaler's factor
    x, w, b, tx, tw, tb, y = _setup(rows=4096, classes=40, dtype=torch.float32, seed=3)
    xh, wh, bh = (t.detach().to(torch.float16).requires_grad_(True) for t in (x, w, b))
    fused = FusedLinearDistillationLoss(temperature=2.0, chunk_size=512)
    loss = fused(xh, wh, tx.half(), tw.half(), y, bh, tb.half())
    (loss * 65536.0).backward()
    assert xh.grad.dtype == torch.float16 and wh.grad.dtype == torch.float16 and bh.grad.dtype == torch.float16
    # the reference: float64 on the same float16 values
    xr, wr, br = (t.detach().double().requires_grad_(True) for t in (xh, wh, bh))
    t_logits = (tx.half().double() @ tw.half().double().t() + tb.half().double())
    ref = DistillationLoss(temperature=2.0)(xr @ wr.t() + br, t_logits, y)
    (ref * 65536.0).backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=5e-3)
    for got, want in ((xh.grad, xr.grad), (wh.grad, wr.grad), (bh.grad, br.grad)):
        err = (got.double() - want).norm() / want.norm()
        assert err < 5e-3, err
    assert int((xh.grad[y != IGNORE] == 0).sum()) == 0  # no counted row's gradient flushed to zero


def test_bad_shapes_and_parameters():
    x, w, b, tx, tw, tb, y = _setup()
    import fastdistill as fd

    with pytest.raises(fd.DimensionMismatchError, match="student_weight must be"):
        FusedLinearDistillationLoss()(x, w[:, :5], tx, tw, y)
    with pytest.raises(fd.InvalidParameterError, match="chunk_size"):
        FusedLinearDistillationLoss(chunk_size=0)
    with pytest.raises(TypeError, match="unknown soft-loss parameters"):
        FusedLinearDistillationLoss(gamma=1.0)


def test_sparse_teacher():
    import numpy as np

    import fastdistill as fd

    x, w, b, tx, tw, tb, y = _setup()
    t_logits = (tx @ tw.t() + tb).numpy()
    top = fd.top_k(t_logits, 6)
    teacher = fd.SparseTeacher(torch.as_tensor(np.asarray(top.indices)), torch.as_tensor(np.asarray(top.values)),
                               tail="support")
    fused = FusedLinearDistillationLoss(temperature=2.0, chunk_size=7)
    loss = fused(x, w, teacher, labels=y, student_bias=b)
    loss.backward()
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    ref = DistillationLoss(temperature=2.0)(x @ w.t() + b, teacher, y)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    for a, r in zip(got, (x.grad, w.grad, b.grad)):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-12)
    with pytest.raises(fd.InvalidParameterError, match="SparseTeacher is the teacher itself"):
        fused(x, w, teacher, tw, y)


def test_read_only_numpy_teacher_and_labels_taken_as_they_are():
    """A memory-mapped teacher store's arrays are read-only: the fused head and DistillationLoss take them
    without a copy and without PyTorch's warning about writing to them (they are never written)."""
    import warnings

    import numpy as np

    import fastdistill as fd

    x, w, b, tx, tw, tb, y = _setup()
    top = fd.top_k((tx @ tw.t() + tb).numpy(), 6)
    idx, vals, lab = np.array(top.indices), np.array(top.values), y.numpy().copy()
    for a in (idx, vals, lab):
        a.flags.writeable = False
    want = FusedLinearDistillationLoss(temperature=2.0, chunk_size=7)(
        x, w, fd.SparseTeacher(torch.as_tensor(idx.copy()), torch.as_tensor(vals.copy())), labels=y, student_bias=b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = FusedLinearDistillationLoss(temperature=2.0, chunk_size=7)(
            x, w, fd.SparseTeacher(idx, vals), labels=lab, student_bias=b)
        ref = DistillationLoss(temperature=2.0)(x @ w.t() + b, fd.SparseTeacher(idx, vals), lab)
    assert float(got) == float(want)
    assert float(ref) == pytest.approx(float(want), rel=1e-10)

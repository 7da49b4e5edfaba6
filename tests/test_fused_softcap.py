"""``FusedLinearDistillationLoss``'s logit transforms (Cohere's ``logit_scale``, Gemma-2's
``final_logit_softcapping``): value and gradients against a float64 PyTorch-autograd reference over the
full transformed logits, written from the models' formulas (``scale · z``, then ``c · tanh(· / c)``)."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastdistill as fd  # noqa: E402
from fastdistill.torch import FusedLinearDistillationLoss  # noqa: E402

IGNORE = -100


def _setup(rows=41, hidden=16, classes=67, dtype=torch.float64, seed=0, spread=3.0):
    # weights large enough that the logits reach the caps' saturating range (|z| ~ 10-20)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(classes, hidden, generator=g, dtype=torch.float64) * spread
    b = torch.randn(classes, generator=g, dtype=torch.float64)
    tx = torch.randn(rows, 24, generator=g, dtype=torch.float64)
    tw = torch.randn(classes, 24, generator=g, dtype=torch.float64) * spread
    y = torch.randint(0, classes, (rows,), generator=g)
    y[::5] = IGNORE
    cast = [t.to(dtype) for t in (x, w, b, tx, tw)]
    return (*cast, y)


def _emit(z, scale, cap):
    z = z * scale
    return z if cap is None else cap * torch.tanh(z / cap)


def _reference(x, w, b, tx, tw, y, *, s_cap, s_scale, t_cap, t_scale, tau, hard_w, soft_w, teacher_logits=None):
    """(loss, grads of x, w, b) in float64 by autograd over the full logits, from the same values."""
    xr, wr, br = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    s = _emit(xr @ wr.t() + br, s_scale, s_cap)
    if teacher_logits is None:
        t = _emit(tx.double() @ tw.double().t(), t_scale, t_cap)
    else:
        t = teacher_logits.double()
    keep = y != IGNORE
    lp = F.log_softmax(t / tau, -1)
    lq = F.log_softmax(s / tau, -1)
    soft = tau * tau * (lp.exp() * (lp - lq)).sum(-1)
    hard = F.cross_entropy(s, torch.where(keep, y, 0), reduction="none")
    rows = torch.where(keep, hard_w * hard + soft_w * soft, torch.zeros_like(soft))
    loss = rows.sum() / int(keep.sum())
    loss.backward()
    return float(loss.detach()), (xr.grad, wr.grad, br.grad)


TRANSFORMS = {
    "gemma2": dict(student_softcap=30.0, teacher_softcap=30.0),
    "gemma2-tight": dict(student_softcap=5.0, teacher_softcap=8.0),
    "cohere": dict(student_logit_scale=0.0625, teacher_logit_scale=0.125),
    "both": dict(student_softcap=4.0, student_logit_scale=1.5, teacher_softcap=6.0, teacher_logit_scale=0.5),
}


def _ref_kw(tr):
    return dict(s_cap=tr.get("student_softcap"), s_scale=tr.get("student_logit_scale", 1.0),
                t_cap=tr.get("teacher_softcap"), t_scale=tr.get("teacher_logit_scale", 1.0))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 8, 1024])
def test_value_and_gradients_equal_the_full_transformed_logits(name, dtype, tol, chunk):
    tr = TRANSFORMS[name]
    x, w, b, tx, tw, y = _setup(dtype=dtype)
    x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    fused = FusedLinearDistillationLoss(temperature=2.0, hard_label_weight=0.3, soft_label_weight=0.7,
                                        chunk_size=chunk, **tr)
    loss = fused(x, w, tx, tw, y, b)
    loss.backward()
    want, grads = _reference(x, w, b, tx, tw, y, tau=2.0, hard_w=0.3, soft_w=0.7, **_ref_kw(tr))
    assert loss.dtype == dtype
    assert float(loss.detach()) == pytest.approx(want, rel=tol)
    for got, r in zip((x.grad, w.grad, b.grad), grads):
        assert got.dtype == dtype
        err = float((got.double() - r).abs().max())
        assert err <= tol * float(r.abs().max()), (name, err)


def test_the_transform_changes_the_objective():
    # a cap that binds gives another loss and gradient than the raw head (the test above would pass for
    # an implementation that ignored the transforms only if the reference ignored them too)
    x, w, b, tx, tw, y = _setup()
    x.requires_grad_(True)
    raw = FusedLinearDistillationLoss(temperature=1.0)(x, w, tx, tw, y, b)
    capped = FusedLinearDistillationLoss(temperature=1.0, student_softcap=5.0, teacher_softcap=5.0)(x, w, tx, tw, y, b)
    assert abs(float(raw.detach()) - float(capped.detach())) > 0.1 * abs(float(raw.detach()))


@pytest.mark.parametrize("name", ["gemma2-tight", "cohere", "both"])
def test_bfloat16(name):
    tr = TRANSFORMS[name]
    x, w, b, tx, tw, y = _setup(dtype=torch.bfloat16, rows=64)
    x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    fused = FusedLinearDistillationLoss(temperature=2.0, hard_label_weight=0.3, soft_label_weight=0.7, chunk_size=16,
                                        **tr)
    loss = fused(x, w, tx, tw, y, b)
    loss.backward()
    assert loss.dtype == torch.float32
    # the reference: float64 on the same bfloat16 values
    want, grads = _reference(x, w, b, tx, tw, y, tau=2.0, hard_w=0.3, soft_w=0.7, **_ref_kw(tr))
    assert float(loss.detach()) == pytest.approx(want, rel=2e-3)
    for got, r in zip((x.grad, w.grad, b.grad), grads):
        assert got.dtype == torch.bfloat16
        err = float((got.double() - r).norm() / r.norm())
        assert err < 1.5e-2, (name, err)


def test_student_transform_with_teacher_logits_and_all_rows_ignored():
    x, w, b, tx, tw, y = _setup()
    x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    t_logits = 7.0 * torch.tanh(tx @ tw.t() / 7.0)  # the teacher's final logits, as its model emitted them
    fused = FusedLinearDistillationLoss(temperature=1.5, chunk_size=9, student_softcap=6.0, student_logit_scale=0.8)
    loss = fused(x, w, t_logits, labels=y, student_bias=b)
    loss.backward()
    want, grads = _reference(x, w, b, tx, tw, y, s_cap=6.0, s_scale=0.8, t_cap=None, t_scale=1.0, tau=1.5,
                             hard_w=0.5, soft_w=0.5, teacher_logits=t_logits)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-10)
    for got, r in zip((x.grad, w.grad, b.grad), grads):
        assert torch.allclose(got, r, rtol=1e-10, atol=1e-12 * float(r.abs().max()))
    x.grad = w.grad = b.grad = None
    none = fused(x, w, t_logits, labels=torch.full_like(y, IGNORE), student_bias=b)
    none.backward()
    assert float(none.detach()) == 0.0 and not x.grad.any() and not w.grad.any() and not b.grad.any()


def test_sparse_teacher_with_a_student_transform():
    import numpy as np

    x, w, b, tx, tw, y = _setup()
    x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    t_logits = (tx @ tw.t()).numpy()
    top = fd.top_k(t_logits, 8)
    teacher = fd.SparseTeacher(torch.as_tensor(np.asarray(top.indices)), torch.as_tensor(np.asarray(top.values)))
    fused = FusedLinearDistillationLoss(temperature=1.0, chunk_size=6, student_softcap=5.0, student_logit_scale=1.2)
    loss = fused(x, w, teacher, labels=y, student_bias=b)
    loss.backward()
    # the reference: the renormalised top-k teacher against the full transformed student row
    xr, wr, br = (t.detach().requires_grad_(True) for t in (x, w, b))
    s = _emit(xr @ wr.t() + br, 1.2, 5.0)
    idx = torch.as_tensor(np.asarray(top.indices)).long()
    lp = torch.log_softmax(torch.as_tensor(np.asarray(top.values), dtype=torch.float64), -1)
    lq = torch.log_softmax(s, -1).gather(1, idx)
    keep = y != IGNORE
    soft = (lp.exp() * (lp - lq)).sum(-1)
    hard = F.cross_entropy(s, torch.where(keep, y, 0), reduction="none")
    ref = torch.where(keep, 0.5 * hard + 0.5 * soft, torch.zeros_like(soft)).sum() / int(keep.sum())
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    for got, r in zip((x.grad, w.grad, b.grad), (xr.grad, wr.grad, br.grad)):
        assert torch.allclose(got, r, rtol=1e-10, atol=1e-12 * float(r.abs().max()))


def test_teacher_transforms_need_a_teacher_head():
    import numpy as np

    x, w, b, tx, tw, y = _setup()
    top = fd.top_k((tx @ tw.t()).numpy(), 4)
    teacher = fd.SparseTeacher(torch.as_tensor(np.asarray(top.indices)), torch.as_tensor(np.asarray(top.values)))
    for kw in (dict(teacher_softcap=30.0), dict(teacher_logit_scale=0.5)):
        fused = FusedLinearDistillationLoss(**kw)
        with pytest.raises(fd.InvalidParameterError, match="teacher head"):
            fused(x, w, teacher, labels=y)
        with pytest.raises(fd.InvalidParameterError, match="teacher head"):
            fused(x, w, tx @ tw.t(), labels=y)


@pytest.mark.parametrize("kw,match", [
    (dict(student_softcap=0.0), "student_softcap must be finite and > 0"),
    (dict(teacher_softcap=-1.0), "teacher_softcap must be finite and > 0"),
    (dict(student_softcap=math.inf), "student_softcap"),
    (dict(teacher_softcap=math.nan), "teacher_softcap"),
    (dict(student_softcap="big"), "student_softcap must be a real number"),
    (dict(student_logit_scale=math.nan), "student_logit_scale must be finite"),
    (dict(teacher_logit_scale=-math.inf), "teacher_logit_scale must be finite"),
    (dict(teacher_logit_scale=None), "teacher_logit_scale must be a real number"),
])
def test_bad_transform_parameters(kw, match):
    with pytest.raises(fd.InvalidParameterError, match=match):
        FusedLinearDistillationLoss(**kw)
    # an attribute set later is checked when the loss runs
    fused = FusedLinearDistillationLoss()
    key = next(iter(kw))
    setattr(fused, key, kw[key])
    x, w, b, tx, tw, y = _setup()
    with pytest.raises(fd.InvalidParameterError, match=match):
        fused(x, w, tx, tw, y)


def test_compiles_with_a_transform():
    x, w, b, tx, tw, y = _setup(dtype=torch.float32)
    x.requires_grad_(True)
    fused = FusedLinearDistillationLoss(temperature=2.0, chunk_size=16, student_softcap=5.0, teacher_logit_scale=0.5)
    compiled = torch.compile(lambda *a: fused(*a), fullgraph=True)
    out = compiled(x, w, tx, tw, y, b)
    out.backward()
    gx = x.grad.clone()
    x.grad = None
    eager = fused(x, w, tx, tw, y, b)
    eager.backward()
    assert float(out.detach()) == pytest.approx(float(eager.detach()), rel=1e-6)
    assert torch.allclose(gx, x.grad, rtol=1e-5, atol=1e-7)

"""Refusals and values of ``fastdistill.torch`` at the edges: the fused linear head's labels, teacher rows,
hidden sizes and biases; TRL's ``generalized_jsd_loss`` reductions; an ``ignore_index`` beyond float64's
integers; ``num_items`` tensors and labels on another device. Values are checked against float64
references written from the definitions (PyTorch autograd), never against the code under test."""
from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import fastdistill as fd  # noqa: E402
from fastdistill.torch import DistillationLoss, FusedLinearDistillationLoss, generalized_jsd_loss  # noqa: E402

IGNORE = -100
H, HT, C = 4, 5, 6  # student hidden size, teacher hidden size, classes


def _g(seed):
    return torch.Generator().manual_seed(seed)


def kd_reference(s, t, y, hard_w, soft_w, tau, ignore_index=IGNORE):
    """The mean over counted rows of ``hard_w * CE(s, y) + soft_w * tau**2 * KL(softmax(t/tau) || softmax(s/tau))``
    (float64, from the definition)."""
    s, t = s.reshape(-1, s.shape[-1]).double(), t.reshape(-1, t.shape[-1]).double()
    lp_t = torch.log_softmax(t / tau, -1)
    lp_s = torch.log_softmax(s / tau, -1)
    soft = (lp_t.exp() * (lp_t - lp_s)).sum(-1) * tau ** 2
    if y is None:
        return (soft_w * soft).sum() / soft.shape[0]
    y = y.reshape(-1)
    keep = y != ignore_index
    ce = -torch.log_softmax(s, -1)[keep, y[keep]]
    rows = hard_w * ce + soft_w * soft[keep]
    return rows.sum() / max(int(keep.sum()), 1)


def _head(rows_shape=(3,), seed=0):
    g = _g(seed)
    x = torch.randn(*rows_shape, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = (0.5 * torch.randn(C, H, generator=g, dtype=torch.float64)).requires_grad_(True)
    return x, w


# ------------------------------------------------------------------ 8: labels of the fused head


def test_fused_labels_longer_than_the_rows_are_refused_as_distillation_loss_refuses_them():
    x, w = _head()
    g = _g(1)
    t = torch.randn(3, C, generator=g, dtype=torch.float64)
    y_long = torch.tensor([1, 2, 3, 4, 5])
    fused = FusedLinearDistillationLoss(temperature=2.0)
    with pytest.raises(fd.DimensionMismatchError, match=r"labels.*expected 3 labels.*got 5") as e:
        fused(x, w, t, labels=y_long)
    assert (e.value.expected, e.value.got) == (3, 5)
    with pytest.raises(fd.DimensionMismatchError) as d:  # the same refusal as on the full logits
        DistillationLoss(temperature=2.0)(x @ w.t(), t, y_long)
    assert (d.value.expected, d.value.got) == (3, 5)
    with pytest.raises(fd.DimensionMismatchError, match=r"expected 3 labels.*got 2"):
        fused(x, w, t, labels=torch.tensor([1, 2]))
    with pytest.raises(fd.DimensionMismatchError, match=r"expected 6 labels.*got 6 \(labels shape \(3, 2\)\)"):
        fused(*_head((2, 3)), t.repeat(2, 1).reshape(2, 3, C), labels=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer"):
        fused(x, w, t, labels=torch.zeros(3))
    # the right labels: the value of the definition (2.80-like values, not the sum over 5 labels)
    y = torch.tensor([1, IGNORE, 4])
    loss = fused(x, w, t, labels=y)
    ref = kd_reference(x @ w.t(), t, y, 0.5, 0.5, 2.0)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)


# ------------------------------------------------------------------ 9: teacher rows of the fused head


def _sparse(rows_shape, k=2, seed=2):
    g = _g(seed)
    idx = torch.stack([torch.randperm(C, generator=g)[:k] for _ in range(int(torch.tensor(rows_shape).prod()))])
    vals = torch.log_softmax(torch.randn(idx.shape, generator=g, dtype=torch.float64), -1)
    return fd.SparseTeacher(idx.reshape(*rows_shape, k), vals.reshape(*rows_shape, k))


@pytest.mark.parametrize("case", ["logits_more_rows", "logits_fewer_rows", "logits_unshifted_3d", "logits_flat_3d",
                                  "hidden_more_rows", "hidden_fewer_rows", "hidden_other_leading_dims",
                                  "sparse_more_rows", "sparse_unshifted_3d"])
def test_fused_teacher_rows_must_pair_with_the_student_rows(case):
    g = _g(3)
    soft_only = FusedLinearDistillationLoss(temperature=2.0, hard_label_weight=0.0, soft_label_weight=1.0)
    student_3d = case.endswith("3d") or case == "hidden_other_leading_dims"
    x, w = _head((2, 3) if student_3d else (3,))
    tw = None
    expect = fd.TeacherStudentMismatchError
    if case == "logits_more_rows":
        teacher = torch.randn(5, C, generator=g, dtype=torch.float64)
    elif case == "logits_fewer_rows":
        teacher = torch.randn(2, C, generator=g, dtype=torch.float64)
    elif case == "logits_unshifted_3d":  # a (2, 4, V) teacher beside a shifted (2, 3, H) student
        teacher = torch.randn(2, 4, C, generator=g, dtype=torch.float64)
    elif case == "logits_flat_3d":  # the same rows, other leading dims: refused as DistillationLoss refuses it
        teacher = torch.randn(6, C, generator=g, dtype=torch.float64)
    elif case.startswith("hidden"):
        shape = {"hidden_more_rows": (5,), "hidden_fewer_rows": (2,), "hidden_other_leading_dims": (3, 2)}[case]
        teacher = torch.randn(*shape, HT, generator=g, dtype=torch.float64)
        tw = torch.randn(C, HT, generator=g, dtype=torch.float64)
    else:
        teacher = _sparse((5,) if case == "sparse_more_rows" else (2, 4))
        expect = fd.DimensionMismatchError
    with pytest.raises(expect) as e:
        soft_only(x, w, teacher, tw)
    msg = str(e.value)
    assert "teacher" in msg.lower() and str(tuple(x.shape[:-1])) in msg, msg
    if expect is fd.TeacherStudentMismatchError:
        assert e.value.teacher != e.value.student
    else:
        assert e.value.expected == x.shape[:-1].numel() and e.value.got != e.value.expected


def test_fused_3d_rows_that_pair_give_the_definition():
    g = _g(4)
    x, w = _head((2, 3))
    t = torch.randn(2, 3, C, generator=g, dtype=torch.float64)
    th = torch.randn(2, 3, HT, generator=g, dtype=torch.float64)
    tw = torch.randn(C, HT, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, 2, IGNORE], [0, 5, 3]])
    kept = [a.clone() for a in (x, w, t, th, tw, y)]
    fused = FusedLinearDistillationLoss(temperature=1.5, chunk_size=4)
    for teacher, weight, t_logits in ((t, None, t), (th, tw, th @ tw.t())):
        loss = fused(x, w, teacher, weight, y)
        loss.backward()
        gx, gw = x.grad.clone(), w.grad.clone()
        x.grad = w.grad = None
        xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        ref = kd_reference(xr @ wr.t(), t_logits, y, 0.5, 0.5, 1.5)
        ref.backward()
        assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
        assert torch.allclose(gx, xr.grad, rtol=1e-10, atol=1e-13)
        assert torch.allclose(gw, wr.grad, rtol=1e-10, atol=1e-13)
    for a, b in zip((x, w, t, th, tw, y), kept):  # no input modified
        assert torch.equal(a.detach(), b.detach())


# ------------------------------------------------------------------ 16: hidden sizes and biases of the fused head


def test_fused_teacher_hidden_size_and_weight_are_checked():
    g = _g(5)
    x, w = _head()
    fused = FusedLinearDistillationLoss(hard_label_weight=0.0, soft_label_weight=1.0)
    tw = torch.randn(C, HT, generator=g, dtype=torch.float64)
    with pytest.raises(fd.DimensionMismatchError, match=rf"teacher_weight must be \(classes, {HT + 1}\).*"
                                                        rf"teacher_input of hidden size {HT + 1}.*\({C}, {HT}\)") as e:
        fused(x, w, torch.randn(3, HT + 1, generator=g, dtype=torch.float64), tw)
    assert (e.value.expected, e.value.got) == (HT + 1, HT)
    with pytest.raises(fd.DimensionMismatchError, match="teacher_weight must be"):
        fused(x, w, torch.randn(3, HT, generator=g, dtype=torch.float64), tw[0])
    with pytest.raises(fd.TeacherStudentMismatchError, match=rf"teacher_weight has {C + 1} classes.*student_weight "
                                                             rf"has {C}") as m:
        fused(x, w, torch.randn(3, HT, generator=g, dtype=torch.float64),
              torch.randn(C + 1, HT, generator=g, dtype=torch.float64))
    assert (m.value.teacher, m.value.student) == (C + 1, C)


@pytest.mark.parametrize("shape", [(C + 1,), (C - 1,), (1, C), (C, 1), ()])
def test_fused_bias_shapes_are_checked(shape):
    g = _g(6)
    x, w = _head()
    fused = FusedLinearDistillationLoss(hard_label_weight=0.0, soft_label_weight=1.0)
    t = torch.randn(3, C, generator=g, dtype=torch.float64)
    bad = torch.randn(shape, generator=g, dtype=torch.float64)
    numel = bad.numel()
    got_shape = re.escape(str(tuple(shape)))
    with pytest.raises(fd.DimensionMismatchError, match=rf"student_bias must be \({C},\).*got shape {got_shape}") as e:
        fused(x, w, t, student_bias=bad)
    assert (e.value.expected, e.value.got) == (C, numel)
    th = torch.randn(3, HT, generator=g, dtype=torch.float64)
    tw = torch.randn(C, HT, generator=g, dtype=torch.float64)
    with pytest.raises(fd.DimensionMismatchError, match=rf"teacher_bias must be \({C},\)") as e:
        fused(x, w, th, tw, teacher_bias=bad)
    assert (e.value.expected, e.value.got) == (C, numel)


def test_fused_teacher_bias_without_teacher_weight_is_refused():
    # it used to be dropped without a word: the teacher's logits lacked it
    g = _g(7)
    x, w = _head()
    t = torch.randn(3, C, generator=g, dtype=torch.float64)
    with pytest.raises(fd.InvalidParameterError, match="teacher_bias"):
        FusedLinearDistillationLoss(hard_label_weight=0.0, soft_label_weight=1.0)(
            x, w, t, teacher_bias=torch.randn(C, generator=g, dtype=torch.float64))


def test_fused_biases_of_the_right_shape_give_the_definition():
    g = _g(8)
    x, w = _head()
    b = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    th = torch.randn(3, HT, generator=g, dtype=torch.float64)
    tw = torch.randn(C, HT, generator=g, dtype=torch.float64)
    tb = torch.randn(C, generator=g, dtype=torch.float64)
    y = torch.tensor([2, 0, IGNORE])
    loss = FusedLinearDistillationLoss(temperature=2.0, chunk_size=2)(x, w, th, tw, y, b, tb)
    loss.backward()
    xr, wr, br = (a.detach().clone().requires_grad_(True) for a in (x, w, b))
    ref = kd_reference(xr @ wr.t() + br, th @ tw.t() + tb, y, 0.5, 0.5, 2.0)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    for got, want in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------ 16: num_items tensors, labels' device


def _dense(seed=9):
    g = _g(seed)
    s = torch.randn(3, C, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, C, generator=g, dtype=torch.float64)
    return s, t, torch.tensor([1, 2, 3])


@pytest.mark.parametrize("path", ["dense", "sparse", "fused", "jsd"])
def test_num_items_tensor_of_two_elements_is_refused(path):
    s, t, y = _dense()
    two = torch.tensor([2.0, 3.0])
    with pytest.raises(fd.InvalidParameterError, match=r"num_items.*one number.*2 elements") as e:
        if path == "dense":
            DistillationLoss()(s, t, y, num_items=two)
        elif path == "sparse":
            DistillationLoss()(s, _sparse((3,)), y, num_items=two)
        elif path == "fused":
            x, w = _head()
            FusedLinearDistillationLoss()(x, w, t, labels=y, num_items=two)
        else:
            generalized_jsd_loss(s, t, y, num_items_in_batch=two)
    assert "(2,)" in str(e.value)


def test_num_items_tensor_with_another_reduction_or_not_positive_is_refused():
    s, t, y = _dense()
    with pytest.raises(fd.InvalidParameterError, match="num_items only applies to reduction='mean'"):
        DistillationLoss(reduction="sum")(s, t, y, num_items=torch.tensor(4.0))
    x, w = _head()
    with pytest.raises(fd.InvalidParameterError, match="num_items must be > 0"):  # it gave 0 and a zero gradient
        FusedLinearDistillationLoss()(x, w, t, labels=y, num_items=torch.tensor(0.0))
    # a 1-element tensor: the sum over rows divided by it
    loss = FusedLinearDistillationLoss()(x, w, t, labels=y, num_items=torch.tensor([4.0]))
    ref = kd_reference(x @ w.t(), t, y, 0.5, 0.5, 1.0)  # the mean over 3 counted rows
    assert float(loss.detach()) == pytest.approx(float(ref.detach()) * 3 / 4, rel=1e-12)


@pytest.mark.parametrize("path", ["dense", "sparse", "fused", "fused_teacher", "fused_weight"])
def test_inputs_on_another_device_are_refused_with_a_type_error(path):
    s, t, y = _dense()
    meta_y = torch.empty(3, dtype=torch.long, device="meta")
    x, w = _head()
    with pytest.raises(TypeError) as e:
        if path == "dense":
            DistillationLoss()(s, t, meta_y)
        elif path == "sparse":
            DistillationLoss()(s, _sparse((3,)), meta_y)
        elif path == "fused":
            FusedLinearDistillationLoss()(x, w, t, labels=meta_y)
        elif path == "fused_teacher":
            FusedLinearDistillationLoss()(x, w, t.to("meta"), labels=y)
        else:
            FusedLinearDistillationLoss()(x, w, torch.randn(3, HT, dtype=torch.float64),
                                          torch.randn(C, HT, dtype=torch.float64, device="meta"), y)
    msg = str(e.value)
    assert "meta" in msg and "cpu" in msg, msg
    assert {"dense": "labels", "sparse": "labels", "fused": "labels", "fused_teacher": "teacher_input",
            "fused_weight": "teacher_weight"}[path] in msg


# ------------------------------------------------------------------ 16: ignore_index exactly


BIG = -(2 ** 53) - 1  # no float64 holds it: -(2**53) is the nearest


@pytest.mark.parametrize("path", ["dense", "fused"])
def test_ignore_index_beyond_float64_integers_is_carried_exactly(path):
    s, t, _ = _dense()
    y = torch.tensor([1, BIG, 4])
    y_np = y.numpy()
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5, ignore_index=BIG)
    ref = kd_reference(s, t, y, 0.5, 0.5, 2.0, ignore_index=BIG)
    assert d.loss(s.detach().numpy(), t.numpy(), y_np) == pytest.approx(float(ref.detach()), rel=1e-12)  # the NumPy API
    if path == "dense":
        crit = DistillationLoss(temperature=2.0, ignore_index=BIG)
        loss = crit(s, t, y)
        loss.backward()
        sr = s.detach().clone().requires_grad_(True)
        ref = kd_reference(sr, t, y, 0.5, 0.5, 2.0, ignore_index=BIG)
        ref.backward()
        assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
        assert torch.allclose(s.grad, sr.grad, rtol=1e-10, atol=1e-13)
        with pytest.raises(fd.LabelOutOfRangeError, match=str(-(2 ** 53))):  # as the NumPy API: not the same int
            crit(s, t, torch.tensor([1, -(2 ** 53), 4]))
    else:
        x, w = _head()
        fused = FusedLinearDistillationLoss(temperature=2.0, ignore_index=BIG)
        loss = fused(x, w, t, labels=y)
        ref = kd_reference(x @ w.t(), t, y, 0.5, 0.5, 2.0, ignore_index=BIG)
        assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
        with pytest.raises(fd.LabelOutOfRangeError, match=str(-(2 ** 53))):
            fused(x, w, t, labels=torch.tensor([1, -(2 ** 53), 4]))


@pytest.mark.parametrize("ignore_index", [-100, 0, 2 ** 62 + 1, -(2 ** 63), 2 ** 63 - 1])
def test_ignore_index_round_trips_through_the_call_description(ignore_index):
    from fastdistill.torch import _decode, _describe

    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(), 0.5, 0.5, ignore_index=ignore_index)
    call = _describe(d, "mean", None, True)
    assert all(isinstance(v, float) for v in call)
    assert _decode(call)[0].ignore_index == ignore_index


# ------------------------------------------------------------------ 10: TRL's generalized_jsd_loss


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                             reduction="batchmean", num_items_in_batch=None):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (trl/experimental/gkd/gkd_trainer.py), copied."""
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]),
            dim=0,
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        jsd_sum = jsd.sum()
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(jsd_sum.device)
        return jsd_sum / num_items_in_batch
    if reduction == "batchmean":
        denom = mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1)
        return jsd.sum() / denom
    elif reduction == "sum":
        return jsd.sum()
    elif reduction == "mean":
        return jsd.mean()
    else:
        return jsd


def _jsd_batch(lead, n=200, seed=11):
    g = _g(seed)
    s = 2 * torch.randn(*lead, n, generator=g, dtype=torch.float64)
    t = 2 * torch.randn(*lead, n, generator=g, dtype=torch.float64)
    y = torch.randint(0, n, lead, generator=g)
    y.view(-1)[1::3] = IGNORE
    return s, t, y


def _compare_jsd(lead, labelled, reduction, beta, num_items=None, dtype=torch.float64, rtol=1e-10):
    s, t, y = _jsd_batch(lead)
    labels = y if labelled else None
    tau = 2.0 if beta == 0.5 else 1.0
    ref_s = s.clone().requires_grad_(True)
    ref = trl_generalized_jsd_loss(ref_s, t, labels, beta, tau, reduction, num_items)
    a = s.to(dtype).requires_grad_(True)
    kept = (a.detach().clone(), t.clone(), y.clone())
    got = generalized_jsd_loss(a, t.to(dtype), labels, beta=beta, temperature=tau, reduction=reduction,
                               num_items_in_batch=num_items)
    assert got.shape == ref.shape
    upstream = torch.rand(ref.shape, generator=_g(1), dtype=torch.float64) + 0.5
    (ref * upstream).sum().backward()
    (got * upstream.to(got.dtype)).sum().backward()
    assert torch.allclose(got.double(), ref.detach(), rtol=rtol, atol=rtol * 1e-3), (got, ref)
    assert torch.allclose(a.grad.double(), ref_s.grad, rtol=rtol * 10, atol=rtol * 1e-3 * float(ref_s.grad.abs().max()))
    for x, k in zip((a.detach(), t, y), kept):
        assert torch.equal(x, k)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("lead", [(2, 5), (7,)], ids=["3d", "2d"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_equals_trl(lead, labelled, reduction, beta):
    _compare_jsd(lead, labelled, reduction, beta)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_generalized_jsd_equals_trl_for_one_row_and_float32(reduction):
    _compare_jsd((), False, reduction, 0.5)  # 1-D logits: TRL divides batchmean by the classes (size(0))
    _compare_jsd((2, 5), False, reduction, 0.5, dtype=torch.float32, rtol=1e-5)


@pytest.mark.parametrize("num_items", [9, 9.5, "tensor"])
@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_generalized_jsd_num_items_in_batch_equals_trl(num_items, labelled, reduction):
    n = torch.tensor(9) if num_items == "tensor" else num_items
    _compare_jsd((2, 5), labelled, reduction, 0.5, num_items=n)


def test_generalized_jsd_batchmean_divides_by_size_0():
    # without labels, TRL divides the sum by size(0): the batch for 3-D logits, the rows for 2-D ones
    for lead in ((2, 5), (7,)):
        s, t, _ = _jsd_batch(lead)
        total = trl_generalized_jsd_loss(s, t, reduction="sum")
        got = generalized_jsd_loss(s, t)
        assert float(got) == pytest.approx(float(total) / lead[0], rel=1e-10)


def _trl_gkd():
    pytest.importorskip("trl")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        try:
            from trl import GKDTrainer
        except ImportError:
            pytest.skip("this trl has no GKDTrainer")
    return GKDTrainer


@pytest.mark.parametrize("lead", [(2, 5), (7,)], ids=["3d", "2d"])
def test_generalized_jsd_equals_trl_itself(lead):
    gkd = _trl_gkd()
    s, t, y = _jsd_batch(lead)
    for kwargs in ({}, {"labels": y}, {"reduction": "sum"}, {"reduction": "mean"}, {"labels": y, "reduction": "mean"},
                   {"beta": 0.2, "temperature": 2.0}, {"labels": y, "num_items_in_batch": 9}):
        ref_s = s.clone().requires_grad_(True)
        ref = gkd.generalized_jsd_loss(ref_s, t, **kwargs)
        ref.backward()
        a = s.clone().requires_grad_(True)
        got = generalized_jsd_loss(a, t, **kwargs)
        got.backward()
        assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-10), kwargs
        assert torch.allclose(a.grad, ref_s.grad, rtol=1e-9, atol=1e-14), kwargs


# ------------------------------------------------------------------ the checks under torch.compile


def test_fused_checks_trace_under_compile_with_dynamic_shapes(monkeypatch):
    # the checks read shapes, dtypes and devices only: nothing torch.compile cannot trace (a NumPy dtype
    # made while tracing, for the labels' dtype, broke fullgraph compilation)
    import fastdistill._arrays as A

    monkeypatch.setattr(A, "_TORCH_NP", {})
    torch._dynamo.reset()
    fused = FusedLinearDistillationLoss(temperature=2.0, chunk_size=4)
    compiled = torch.compile(lambda *a: fused(*a), fullgraph=True, dynamic=True)
    for rows in (6, 9):
        g = _g(rows)
        x = torch.randn(rows, 8, generator=g, requires_grad=True)
        w = torch.randn(10, 8, generator=g, requires_grad=True)
        b = torch.randn(10, generator=g, requires_grad=True)
        tx, tw, tb = torch.randn(rows, 5, generator=g), torch.randn(10, 5, generator=g), torch.randn(10, generator=g)
        y = torch.randint(0, 10, (rows,), generator=g)
        y[1] = IGNORE
        loss = compiled(x, w, tx, tw, y, b, tb)
        loss.backward()
        xr, wr, br = (a.detach().double().requires_grad_(True) for a in (x, w, b))
        ref = kd_reference(xr @ wr.t() + br, tx.double() @ tw.double().t() + tb.double(), y, 0.5, 0.5, 2.0)
        ref.backward()
        assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
        for got, want in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
            assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(fd.DimensionMismatchError, match="expected 6 labels"):
        compiled(x[:6], w, tx[:6], tw, y, b, tb)

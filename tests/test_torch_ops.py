"""fastdistill.torch as torch.library custom ops: opcheck, torch.compile(fullgraph=True) of a training
step, the backward without host synchronisation, ``t2_scale`` and ``vocab_mismatch`` through PyTorch,
and the TRL drop-in ``generalized_jsd_loss`` (against a float64 transcription of TRL's formula, and
against TRL itself when it is installed)."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import fastdistill as fd  # noqa: E402
from fastdistill.torch import DistillationLoss, generalized_jsd_loss, kl_divergence, response_loss  # noqa: E402

IGNORE = -100
OP = torch.ops.fastdistill.response.default


def _batch(rows=6, n=11, dtype=torch.float32, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(rows, n, generator=g, dtype=torch.float64)).to(dtype)
    t = (2 * torch.randn(rows, n, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, n, (rows,), generator=g)
    y[1] = IGNORE
    if shape is not None:
        s, t, y = s.reshape(*shape, n), t.reshape(*shape, n), y.reshape(shape)
    return s, t, y


def _args(distiller, s, t, y, reduction="mean", num_items=None, num_items_tensor=None, want_grad=True):
    from fastdistill.torch import _describe

    return (s, t, y, _describe(distiller, reduction, num_items, want_grad), num_items_tensor, "")


# ------------------------------------------------------------------ opcheck


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["balanced", "jsd_no_labels", "combined_f64", "num_items_tensor", "truncate"])
def test_opcheck(case, reduction):
    s, t, y = _batch()
    extra = {}
    if case == "balanced":
        d = fd.ResponseDistiller.balanced()
    elif case == "jsd_no_labels":
        d, y = fd.ResponseDistiller(fd.DistilLoss.jsd(0.3, 2.0), 0.0, 1.0), None
    elif case == "combined_f64":
        s, t, y = _batch(dtype=torch.float64, shape=(2, 3))
        d = fd.ResponseDistiller(fd.DistilLoss.combined(0.5, 1.0, 2.0), 0.2, 0.8, label_smoothing=0.1)
    elif case == "num_items_tensor":
        d = fd.ResponseDistiller(fd.DistilLoss.reverse_kl(3.0, t2_scale=False), 0.5, 0.5)
        if reduction == "mean":
            extra = {"num_items_tensor": torch.tensor(40)}
    else:
        d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5, vocab_mismatch="truncate")
        t = torch.cat([t, torch.randn(t.shape[0], 3, dtype=t.dtype)], dim=-1)
    s.requires_grad_(True)
    torch.library.opcheck(OP, _args(d, s, t, y, reduction, **extra))
    # the loss alone (no gradient asked): inputs that do not require grad
    torch.library.opcheck(OP, _args(d, s.detach(), t, y, reduction, want_grad=False, **extra))


# ------------------------------------------------------------------ torch.compile


class _Student(torch.nn.Module):
    def __init__(self, d_in=8, vocab=17):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(d_in, 16)
        self.head = torch.nn.Linear(16, vocab)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def _forward(model, criterion, x, teacher_logits, labels):
    return criterion(model(x), teacher_logits, labels)


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("soft", ["kl_divergence", "jsd"])
def test_fullgraph_compile_matches_eager(soft):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 8, generator=g)
    teacher = 3 * torch.randn(2, 5, 17, generator=g)
    labels = torch.randint(0, 17, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = IGNORE
    criterion = DistillationLoss(temperature=2.0, hard_label_weight=0.3, soft_label_weight=0.7, soft_loss=soft)

    model = _Student()
    eager_loss = _forward(model, criterion, x, teacher, labels)
    eager_loss.backward()
    eager = _grads(model)
    model.zero_grad(set_to_none=True)
    compiled_forward = torch.compile(_forward, fullgraph=True)  # fails on any graph break
    compiled_loss = compiled_forward(model, criterion, x, teacher, labels)
    compiled_loss.backward()
    compiled = _grads(model)
    compiled_loss = compiled_loss.detach()
    eager_loss = eager_loss.detach()

    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-6, atol=1e-7)
    for k in eager:
        assert torch.allclose(compiled[k], eager[k], rtol=1e-5, atol=1e-7), k
    # and against PyTorch's own composition of the same loss (float64)
    model.zero_grad(set_to_none=True)
    logits = model(x).double()
    ref = _composition(logits, teacher.double(), labels, soft, 2.0, 0.3, 0.7)
    ref.backward()
    assert compiled_loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for k, p in model.named_parameters():
        assert torch.allclose(compiled[k], p.grad.float(), rtol=1e-4, atol=1e-6), k


def _composition(s, t, y, soft, tau, hard_w, soft_w):
    """Per-token CE + tau**2-scaled divergence from PyTorch ops, mean over counted tokens."""
    s2, t2, y2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), y.reshape(-1)
    lq, lp = F.log_softmax(s2 / tau, -1), F.log_softmax(t2 / tau, -1)
    if soft == "kl_divergence":
        div = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([lp + math.log(0.5), lq + math.log(0.5)]), 0)
        div = 0.5 * F.kl_div(lm, lp, log_target=True, reduction="none").sum(-1) + \
            0.5 * F.kl_div(lm, lq, log_target=True, reduction="none").sum(-1)
    keep = y2 != IGNORE
    ce = F.cross_entropy(s2, torch.where(keep, y2, 0), reduction="none")
    rows = torch.where(keep, hard_w * ce + soft_w * tau * tau * div, torch.zeros_like(ce))
    return rows.sum() / keep.sum()


def test_backward_graph_has_no_host_synchronisation():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    criterion = DistillationLoss(temperature=2.0)
    s, t, y = _batch()
    s.requires_grad_(True)
    loss = torch.compile(lambda a, b, c: 3.0 * criterion(a, b, c), backend=backend, fullgraph=True)(s, t, y)
    loss.backward()
    ops = {str(n.target) for n in graphs["backward"].graph.nodes if n.op == "call_function"}
    assert not any("local_scalar_dense" in o or "item" in o for o in ops), ops
    fwd_ops = {str(n.target) for n in graphs["forward"].graph.nodes if n.op == "call_function"}
    assert any("fastdistill.response" in o for o in fwd_ops), fwd_ops
    expected = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5).loss_and_grad(
        s.detach().numpy(), t.numpy(), y.numpy())[1]
    assert torch.allclose(s.grad, 3.0 * torch.from_numpy(expected), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ eager backward


def test_eager_backward_in_place_only_when_the_graph_is_freed():
    criterion = DistillationLoss(temperature=2.0)
    s, t, y = _batch()
    s.requires_grad_(True)
    _, base = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5).loss_and_grad(
        s.detach().numpy(), t.numpy(), y.numpy())
    base = torch.from_numpy(base)

    criterion(s, t, y).backward()  # upstream 1.0: the saved gradient as is
    assert torch.equal(s.grad, base)
    # a kept graph: every pass scales the saved gradient afresh (gradcheck relies on it)
    s.grad = None
    loss = criterion(s, t, y)
    (2.5 * loss).backward(retain_graph=True)
    assert torch.allclose(s.grad, 2.5 * base, rtol=1e-6)
    (2.5 * loss).backward(retain_graph=True)
    assert torch.allclose(s.grad, 5.0 * base, rtol=1e-6)
    (0.5 * loss).backward()  # the last pass may scale the buffer in place
    assert torch.allclose(s.grad, 5.5 * base, rtol=1e-6)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    # a leaf that is not the student: the in-place product must not leak into other gradients
    w = torch.full((1, 11), 2.0, requires_grad=True)
    (3.0 * criterion(s.detach() * w, t, y)).backward()
    _, at_sw = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5).loss_and_grad(
        (s.detach() * 2.0).numpy(), t.numpy(), y.numpy())
    expected = 3.0 * (torch.from_numpy(at_sw) * s.detach()).sum(0, keepdim=True)
    assert torch.allclose(w.grad, expected, rtol=1e-5, atol=1e-7)


def test_per_row_upstream_and_half_student():
    s, t, y = _batch(shape=(2, 3))
    w = torch.linspace(0.5, 2.0, 6).reshape(2, 3)
    criterion = DistillationLoss(temperature=3.0, reduction="none")
    s.requires_grad_(True)
    (criterion(s, t, y) * w).sum().backward()
    _, rows_grad = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(3.0), 0.5, 0.5).loss_and_grad(
        s.detach().numpy(), t.numpy(), y.numpy(), reduction="none")
    assert torch.allclose(s.grad, torch.from_numpy(rows_grad) * w.unsqueeze(-1), rtol=1e-6, atol=1e-9)

    h = s.detach().to(torch.bfloat16).requires_grad_(True)
    loss = DistillationLoss(temperature=3.0)(h, t, y)
    assert loss.dtype == torch.float32
    (4.0 * loss).backward()
    assert h.grad.dtype == torch.bfloat16
    _, g32 = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(3.0), 0.5, 0.5).loss_and_grad(
        h.detach().float().numpy(), t.numpy(), y.numpy())
    assert torch.equal(h.grad, (4.0 * torch.from_numpy(g32)).to(torch.bfloat16))  # rounded once


def test_eager_calls_resolve_the_distiller_once(monkeypatch):
    """The eager path neither describes the distiller as numbers nor computes its terms or its kernel
    variant again on every call; reassigning one of its attributes is seen by the next call."""
    import fastdistill._dispatch as dispatch
    import fastdistill.torch as fdt

    s, t, y = _batch()
    criterion = DistillationLoss(temperature=2.0, hard_label_weight=0.3, soft_label_weight=0.7)
    leaf = s.clone().requires_grad_(True)
    criterion(leaf, t, y).backward()  # (the first call resolves)
    first = leaf.grad.clone()
    counted = {"terms": 0, "resolve": 0}
    terms, resolve = fd.ResponseDistiller.terms, dispatch.resolve

    def counting_terms(self):  # type: ignore[no-untyped-def]
        counted["terms"] += 1
        return terms(self)

    def counting_resolve(*args):  # type: ignore[no-untyped-def]
        counted["resolve"] += 1
        return resolve(*args)

    def no_describe(*args):  # type: ignore[no-untyped-def]
        raise AssertionError("the eager path described the call as numbers")

    monkeypatch.setattr(fd.ResponseDistiller, "terms", counting_terms)
    monkeypatch.setattr(dispatch, "resolve", counting_resolve)
    monkeypatch.setattr(fdt, "_describe", no_describe)
    for _ in range(3):
        leaf.grad = None
        loss = criterion(leaf, t, y)
        loss.backward()
        assert torch.equal(leaf.grad, first)
        with torch.no_grad():
            assert torch.equal(criterion(s, t, y), loss.detach())
    assert counted == {"terms": 0, "resolve": 0}

    criterion.distiller.hard_label_weight = 0.0  # (an attribute of the distiller object, reassigned)
    want = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.0, 0.7).loss(s.numpy(), t.numpy(), y.numpy())
    with torch.no_grad():
        assert float(criterion(s, t, y)) == pytest.approx(want, rel=1e-6)


def test_errors_come_through_the_op():
    s, t, y = _batch()
    with pytest.raises(fd.TeacherStudentMismatchError):
        DistillationLoss()(s, t[:, :5], y)
    with pytest.raises(TypeError, match="student is a tensor on device 'meta'"):
        DistillationLoss()(s.to("meta"), t, y)
    with pytest.raises(fd.LabelOutOfRangeError):
        DistillationLoss()(s, t, torch.full_like(y, 11))
    with pytest.raises(fd.InvalidParameterError, match="num_items must be > 0"):
        DistillationLoss()(s, t, y, num_items=torch.tensor(0))


# ------------------------------------------------------------------ t2_scale, vocab_mismatch


@pytest.mark.parametrize("soft", ["kl_divergence", "reverse_kl", "jsd", "skew_kl", "tvd"])
def test_t2_scale_in_the_module(soft):
    s, t, y = _batch(dtype=torch.float64)
    on = DistillationLoss(temperature=4.0, soft_loss=soft, hard_label_weight=0.0, soft_label_weight=1.0)
    off = DistillationLoss(temperature=4.0, soft_loss=soft, hard_label_weight=0.0, soft_label_weight=1.0,
                           t2_scale=False)
    assert on.t2_scale is True and off.t2_scale is False
    factor = 1.0 if soft == "tvd" else 16.0
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    la, lb = on(a, t, y), off(b, t, y)
    la.backward()
    lb.backward()
    assert lb.item() == pytest.approx(la.item() / factor, rel=1e-12)
    assert torch.allclose(b.grad, a.grad / factor, rtol=1e-10, atol=1e-14)
    off.t2_scale = True  # an attribute like the others
    assert off(s, t, y).item() == pytest.approx(la.item(), rel=1e-12)
    assert kl_divergence(s, t, 4.0, t2_scale=False).item() == pytest.approx(
        F.kl_div(F.log_softmax(s / 4, -1), F.log_softmax(t / 4, -1), log_target=True, reduction="batchmean").item(),
        rel=1e-12)
    with pytest.raises(fd.InvalidParameterError, match="t2_scale=True disagrees"):
        DistillationLoss(soft_loss=fd.DistilLoss.kl_divergence(2.0, t2_scale=False), t2_scale=True)


def test_vocab_mismatch_truncate_in_the_module():
    s, t, y = _batch(rows=8, n=12, dtype=torch.float64)
    t_wide = torch.cat([t, 5 * torch.randn(8, 4, dtype=torch.float64)], dim=-1)
    s_wide = torch.cat([s, 5 * torch.randn(8, 3, dtype=torch.float64)], dim=-1)
    crit = DistillationLoss(temperature=2.0, vocab_mismatch="truncate")
    assert crit.vocab_mismatch == "truncate"
    ref_s = s.clone().requires_grad_(True)
    ref = DistillationLoss(temperature=2.0)(ref_s, t, y)
    ref.backward()
    for student, teacher in ((s, t_wide), (s_wide, t)):
        a = student.clone().requires_grad_(True)
        loss = crit(a, teacher, y)
        loss.backward()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
        assert torch.equal(a.grad[:, :12], ref_s.grad)
        assert (a.grad[:, 12:] == 0).all()
    assert response_loss(s_wide, t, y, temperature=2.0, vocab_mismatch="truncate").item() == pytest.approx(
        ref.item(), rel=1e-12)
    with pytest.raises(fd.TeacherStudentMismatchError):
        DistillationLoss(temperature=2.0)(s, t_wide, y)


# ------------------------------------------------------------------ TRL's generalized_jsd_loss


def trl_generalized_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                        reduction="batchmean", num_items_in_batch=None):
    """TRL's GKDTrainer.generalized_jsd_loss, transcribed (float64 in the tests)."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture = torch.logsumexp(torch.stack([student_log_probs + torch.log1p(-b), teacher_log_probs + torch.log(b)]),
                                  dim=0)
        jsd = b * F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True) + \
            (1 - b) * F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
    mask = None
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "batchmean":
        return jsd.sum() / mask.sum().clamp_min(1) if mask is not None else jsd.sum() / max(jsd.size(0), 1)
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def _trl_batch(shape=(2, 5), n=13, seed=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(*shape, n, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(*shape, n, generator=g, dtype=torch.float64)
    y = torch.randint(0, n, shape, generator=g)
    y.view(-1)[::3] = IGNORE
    return s.to(dtype), t.to(dtype), y


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("shape", [(2, 5), (7,)])
def test_generalized_jsd_matches_trl(reduction, beta, with_labels, shape):
    s, t, y = _trl_batch(shape)
    labels = y if with_labels else None
    tau = 2.0 if beta == 0.5 else 1.0
    ref_s = s.double().requires_grad_(True)
    ref = trl_generalized_jsd(ref_s, t.double(), labels, beta, tau, reduction)
    a = s.clone().requires_grad_(True)
    got = generalized_jsd_loss(a, t, labels, beta=beta, temperature=tau, reduction=reduction)
    assert got.shape == ref.shape
    upstream = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    (ref * upstream).sum().backward()
    (got * upstream.float()).sum().backward()
    assert torch.allclose(got.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    assert torch.allclose(a.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("num_items", [9, "tensor"])
def test_generalized_jsd_num_items_in_batch(num_items):
    s, t, y = _trl_batch((3, 4))
    n_items = torch.tensor(9) if num_items == "tensor" else num_items
    ref_s = s.double().requires_grad_(True)
    ref = trl_generalized_jsd(ref_s, t.double(), y, 0.5, 1.0, num_items_in_batch=n_items)
    ref.backward()
    a = s.clone().requires_grad_(True)
    got = generalized_jsd_loss(a, t, y, num_items_in_batch=n_items)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(a.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-7)


def test_generalized_jsd_every_token_ignored():
    s, t, y = _trl_batch((2, 3))
    y[:] = IGNORE
    assert generalized_jsd_loss(s, t, y).item() == 0.0  # batchmean: the sum over nothing, divided by 1
    assert math.isnan(generalized_jsd_loss(s, t, y, reduction="mean").item())  # TRL: the mean of nothing
    with pytest.raises(fd.InvalidParameterError, match="reduction must be one of"):
        generalized_jsd_loss(s, t, y, reduction="batch")


def test_generalized_jsd_against_trl_itself():
    trl = pytest.importorskip("trl")
    # (TRL 1.x moved the GKD trainer to trl.experimental.gkd; older releases export it at the top level)
    GKDTrainer = getattr(trl, "GKDTrainer", None) or pytest.importorskip("trl.experimental.gkd").GKDTrainer
    s, t, y = _trl_batch((2, 6), n=32)
    for kwargs in ({}, {"labels": y}, {"labels": y, "beta": 0.2, "temperature": 2.0}, {"reduction": "sum"}):
        ref_s = s.clone().requires_grad_(True)
        ref = GKDTrainer.generalized_jsd_loss(ref_s, t, **kwargs)
        ref.backward()
        a = s.clone().requires_grad_(True)
        got = generalized_jsd_loss(a, t, **kwargs)
        got.backward()
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)
        assert torch.allclose(a.grad, ref_s.grad, rtol=1e-4, atol=1e-6)


def test_eager_path_and_op_agree_and_fake_tensors_trace():
    from torch._subclasses.fake_tensor import FakeTensorMode

    s, t, y = _batch(shape=(2, 3))
    d = fd.ResponseDistiller(fd.DistilLoss.jsd(0.4, 2.0), 0.3, 0.7)
    crit = DistillationLoss(soft_loss=d.soft_loss, hard_label_weight=0.3, soft_label_weight=0.7)
    a = s.clone().requires_grad_(True)
    crit(a, t, y).backward()
    b = s.clone().requires_grad_(True)
    loss, _ = OP(*_args(d, b, t, y))
    loss.backward()
    assert torch.equal(a.grad, b.grad)
    with FakeTensorMode() as mode:  # shapes only (as in meta-device initialisation or export)
        fs, ft, fy = mode.from_tensor(s), mode.from_tensor(t), mode.from_tensor(y)
        rows = DistillationLoss(reduction="none")(fs.requires_grad_(True), ft, fy)
        assert rows.shape == (2, 3) and rows.dtype == torch.float32

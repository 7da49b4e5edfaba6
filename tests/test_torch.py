"""fastdistill.torch against PyTorch's own compositions (float64 references built from torch ops)."""
from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import fastdistill  # noqa: E402
from fastdistill import DistilLoss, InvalidParameterError, TeacherStudentMismatchError  # noqa: E402
from fastdistill.torch import DistillationLoss, feature_loss, kl_divergence, response_loss  # noqa: E402

IGNORE = -100
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# PyTorch's kl_div returns NaN for a class masked (-inf) in both student and teacher, so the reference
# replaces -inf by this value: exp(MASK / tau) underflows to exactly 0 in float64, the masked limit.
MASK = -1e6


# ------------------------------------------------------------------ references


def soft_rows(kind, s, t, tau=1.0, beta=0.5, alpha=0.1):
    """Per-row soft loss from PyTorch ops (s, t: float64 (rows, classes))."""
    t2 = tau * tau
    lq = F.log_softmax(s / tau, dim=-1)
    lp = F.log_softmax(t / tau, dim=-1)

    def kl(log_a, log_b):  # KL(a || b) per row, from log-probabilities
        return F.kl_div(log_b, log_a, log_target=True, reduction="none").sum(-1)

    def log_mix(w_p, w_q):  # log(w_p * p + w_q * q)
        return torch.logsumexp(torch.stack([lp + torch.log(torch.tensor(w_p, dtype=s.dtype)),
                                            lq + torch.log(torch.tensor(w_q, dtype=s.dtype))]), dim=0)

    if kind == "kl_divergence":
        return t2 * kl(lp, lq)
    if kind == "reverse_kl":
        return t2 * kl(lq, lp)
    if kind == "jsd":  # TRL's generalized_jsd_loss (times tau**2)
        if beta == 0.0:
            return t2 * kl(lp, lq)
        if beta == 1.0:
            return t2 * kl(lq, lp)
        lm = log_mix(beta, 1.0 - beta)
        return t2 * (beta * kl(lp, lm) + (1.0 - beta) * kl(lq, lm))
    if kind == "skew_kl":
        return t2 * kl(lp, log_mix(alpha, 1.0 - alpha))
    if kind == "skew_reverse_kl":
        return t2 * kl(lq, log_mix(1.0 - alpha, alpha))
    if kind == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    if kind == "alpha_divergence":  # Amari's, from its definition
        return t2 * (1.0 - torch.exp(alpha * lp + (1.0 - alpha) * lq).sum(-1)) / (alpha * (1.0 - alpha))
    if kind == "mse":
        return F.mse_loss(s, t, reduction="none").mean(-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1)
    raise AssertionError(kind)


def ref_loss(s, t, y=None, *, kind="kl_divergence", tau=1.0, hw=0.5, sw=0.5, ignore_index=IGNORE,
             smoothing=0.0, reduction="mean", beta=0.5, alpha=0.1, num_items=None):
    """The reference loss; differentiable with respect to ``s`` (any float tensor, computed in float64).

    Rows whose label is ``ignore_index`` are excluded from both the sum and the divisor (PyTorch's
    ``kl_div(..., "batchmean")`` would divide by every row).
    """
    n = s.shape[-1]
    s64 = s.double()
    t64 = t.detach().double()
    s2 = s64.masked_fill(torch.isneginf(s64), MASK).reshape(-1, n)
    t2 = t64.masked_fill(torch.isneginf(t64), MASK).reshape(-1, n)
    rows = sw * soft_rows(kind, s2, t2, tau, beta, alpha)
    if y is not None:
        y1 = y.reshape(-1).long()
        if hw != 0.0:
            ce = F.cross_entropy(s64.reshape(-1, n), y1, ignore_index=ignore_index,
                                 label_smoothing=smoothing, reduction="none")
            rows = rows + hw * ce
        keep = y1 != ignore_index
        rows = torch.where(keep, rows, torch.zeros_like(rows))
        counted = int(keep.sum())
    else:
        counted = rows.shape[0]
    if reduction == "none":
        return rows.reshape(s.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    div = num_items if num_items is not None else counted
    return rows.sum() / div if div else rows.sum() * 0.0


def rel_err(got, ref):
    got = got.detach().double()
    ref = ref.detach().double()
    scale = max(ref.abs().max().item(), 1e-30)
    return (got - ref).abs().max().item() / scale


def batch(rows, n, dtype=torch.float32, seed=0, *, mask=False, ignore=True, shape=None, scale=2.0):
    """Student/teacher logits and labels; masked (-inf) classes shared by both, never a label."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, n, generator=g, dtype=torch.float64) * scale
    t = torch.randn(rows, n, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, n, (rows,), generator=g)
    if mask:
        m = torch.rand(rows, n, generator=g) < 0.2
        m[torch.arange(rows), y] = False
        s[m] = float("-inf")
        t[m] = float("-inf")
    if ignore:
        y[torch.rand(rows, generator=g) < 0.25] = IGNORE
        y[0] = 0 if n > 0 else y[0]
    shape = shape or (rows,)
    return s.to(dtype).reshape(*shape, n), t.to(dtype).reshape(*shape, n), y.reshape(shape)


def check(got_loss, got_grad, s, t, y=None, dtype=torch.float32, upstream=None, **kw):
    """Compare a loss value and the student's gradient with the reference."""
    s_ref = s.detach().double().requires_grad_()
    ref = ref_loss(s_ref, t, y, **kw)
    ref.backward(upstream.double() if upstream is not None else None)
    tol = TOL[dtype]
    assert rel_err(got_loss, ref) < tol, (got_loss, ref)
    assert got_grad is not None and got_grad.dtype == s.dtype and got_grad.shape == s.shape
    assert torch.isfinite(got_grad).all()
    assert rel_err(got_grad, s_ref.grad) < tol


# ------------------------------------------------------------------ CE + KL, the classic KD loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("mask", [False, True])
def test_ce_plus_kl_matches_torch_composition(dtype, tau, mask):
    s, t, y = batch(64, 37, dtype, seed=1, mask=mask)
    s.requires_grad_()
    loss = DistillationLoss(temperature=tau, hard_label_weight=0.3, soft_label_weight=0.7)(s, t, y)
    assert loss.grad_fn is not None and loss.dtype == dtype and loss.shape == ()
    loss.backward()
    check(loss, s.grad, s, t, y, dtype, tau=tau, hw=0.3, sw=0.7)
    if mask:  # masked classes get exactly zero gradient
        assert (s.grad[torch.isneginf(s)] == 0).all()


def test_reference_matches_pytorch_batchmean_without_ignored_rows():
    # the reference is PyTorch's composition: CE + tau^2 kl_div(batchmean) when no row is ignored
    s, t, y = batch(16, 9, torch.float64, seed=2, ignore=False)
    tau = 3.0
    direct = 0.5 * F.cross_entropy(s, y) + 0.5 * tau**2 * F.kl_div(
        F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True, reduction="batchmean")
    assert rel_err(ref_loss(s, t, y, tau=tau), direct) < 1e-14
    got = DistillationLoss(temperature=tau)(s, t, y)
    assert rel_err(got, direct) < 1e-10


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing(smoothing):
    s, t, y = batch(40, 21, seed=3)
    s.requires_grad_()
    loss = response_loss(s, t, y, temperature=2.0, label_smoothing=smoothing)
    loss.backward()
    check(loss, s.grad, s, t, y, tau=2.0, smoothing=smoothing)


def test_custom_ignore_index_and_int32_labels():
    s, t, y = batch(30, 11, seed=4, ignore=False)
    y[::3] = 7  # 7 is a valid class, used as the ignore value here
    s.requires_grad_()
    loss = DistillationLoss(temperature=2.0, ignore_index=7)(s, t, y.to(torch.int32))
    loss.backward()
    check(loss, s.grad, s, t, y, tau=2.0, ignore_index=7)


def test_all_rows_ignored_gives_zero_and_zero_grad():
    s, t, y = batch(8, 5, seed=5)
    y[:] = IGNORE
    s.requires_grad_()
    loss = DistillationLoss(temperature=2.0)(s, t, y)
    loss.backward()
    assert loss.item() == 0.0
    assert (s.grad == 0).all()


def test_num_items_divides_the_sum():
    s, t, y = batch(20, 13, seed=6)
    s.requires_grad_()
    loss = DistillationLoss(temperature=2.0)(s, t, y, num_items=50)
    loss.backward()
    check(loss, s.grad, s, t, y, tau=2.0, num_items=50)


# ------------------------------------------------------------------ other soft losses


SOFT_CASES = [
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.3}),
    ("tvd", {}),
    ("alpha_divergence", {"alpha": 0.3}),
]


@pytest.mark.parametrize("kind,extra", SOFT_CASES, ids=[f"{k}-{v}" for k, v in SOFT_CASES])
@pytest.mark.parametrize("mask", [False, True])
def test_soft_losses_match_torch(kind, extra, mask):
    s, t, y = batch(48, 29, seed=7, mask=mask)
    s.requires_grad_()
    crit = DistillationLoss(temperature=2.0, hard_label_weight=0.25, soft_label_weight=0.75,
                            soft_loss=kind, **extra)
    loss = crit(s, t, y)
    loss.backward()
    check(loss, s.grad, s, t, y, kind=kind, tau=2.0, hw=0.25, sw=0.75, **extra)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_raw_logit_losses(kind):
    s, t, _ = batch(24, 17, seed=8, ignore=False)
    s.requires_grad_()
    loss = response_loss(s, t, soft_loss=kind, hard_label_weight=0.0, soft_label_weight=1.0)
    loss.backward()
    check(loss, s.grad, s, t, None, kind=kind, hw=0.0, sw=1.0)


def test_distil_loss_object_as_soft_loss():
    s, t, y = batch(16, 10, seed=9)
    s.requires_grad_()
    loss = DistillationLoss(soft_loss=DistilLoss.jsd(beta=0.3, temperature=3.0))(s, t, y)
    loss.backward()
    check(loss, s.grad, s, t, y, kind="jsd", beta=0.3, tau=3.0)


# ------------------------------------------------------------------ reductions and shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reduction_none_with_vector_upstream_gradient(dtype):
    s, t, y = batch(32, 19, dtype, seed=10, mask=True)
    s.requires_grad_()
    rows = DistillationLoss(temperature=4.0, reduction="none")(s, t, y)
    assert rows.shape == (32,) and rows.grad_fn is not None
    assert (rows[y == IGNORE] == 0).all()
    v = torch.randn(32, generator=torch.Generator().manual_seed(0), dtype=dtype)
    rows.backward(v)
    check(rows, s.grad, s, t, y, dtype, upstream=v, tau=4.0, reduction="none")


def test_reduction_sum():
    s, t, y = batch(32, 19, seed=11)
    s.requires_grad_()
    loss = DistillationLoss(temperature=2.0, reduction="sum")(s, t, y)
    loss.backward()
    check(loss, s.grad, s, t, y, tau=2.0, reduction="sum")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batch_time_vocab_inputs(reduction):
    s, t, y = batch(3 * 5, 23, seed=12, shape=(3, 5), mask=True)
    assert s.shape == (3, 5, 23) and y.shape == (3, 5)
    s.requires_grad_()
    out = DistillationLoss(temperature=2.0, soft_loss="reverse_kl", reduction=reduction)(s, t, y)
    assert out.shape == ((3, 5) if reduction == "none" else ())
    up = torch.linspace(0.5, 2.0, 15).reshape(3, 5) if reduction == "none" else None
    out.backward(up)
    check(out, s.grad, s, t, y, upstream=up, kind="reverse_kl", tau=2.0, reduction=reduction)


def test_single_row():
    s, t, y = batch(1, 12, seed=13, ignore=False)
    s1 = s[0].clone().requires_grad_()
    loss = DistillationLoss(temperature=2.0)(s1, t[0], y[0])
    loss.backward()
    check(loss, s1.grad, s1, t[0], y[0], tau=2.0)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(14)
    base = (torch.randn(31, 40, generator=g) * 2).requires_grad_()  # (classes, rows)
    s = base.t()  # (40, 31), non-contiguous
    t_big = torch.randn(40, 62, generator=g) * 2
    t = t_big[:, ::2]  # non-contiguous
    y_big = torch.randint(0, 31, (80,), generator=g, dtype=torch.int32)
    y_big[::5] = IGNORE
    y = y_big[::2]
    assert not s.is_contiguous() and not t.is_contiguous() and not y.is_contiguous()
    loss = DistillationLoss(temperature=3.0)(s, t, y)
    loss.backward()
    assert base.grad.shape == base.shape
    check(loss, base.grad.t(), s.detach(), t, y, tau=3.0)


# ------------------------------------------------------------------ half precision


@pytest.mark.parametrize("dtype,gtol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_inputs(dtype, gtol):
    s, t, y = batch(64, 50, dtype, seed=15, mask=True)
    s.requires_grad_()
    loss = DistillationLoss(temperature=2.0)(s, t, y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad.dtype == dtype and s.grad.shape == s.shape
    s_ref = s.detach().double().requires_grad_()  # the exact values of the half inputs
    ref = ref_loss(s_ref, t, y, tau=2.0)
    ref.backward()
    assert rel_err(loss, ref) < 1e-5  # computed in float32 from exactly upcast values
    assert rel_err(s.grad, s_ref.grad) < gtol  # rounding of the gradient to half precision


def test_fp16_upstream_scale_is_applied_before_rounding():
    # a GradScaler-style scale: tiny per-element gradients (1/rows) must survive the fp16 cast
    s, t, y = batch(4096, 8, torch.float16, seed=16, ignore=False)
    s.requires_grad_()
    loss = DistillationLoss(temperature=2.0)(s, t, y)
    (loss * 65536.0).backward()
    s_ref = s.detach().double().requires_grad_()
    (ref_loss(s_ref, t, y, tau=2.0) * 65536.0).backward()
    assert rel_err(s.grad, s_ref.grad) < 2e-3


def test_mixed_teacher_dtype():
    s, t, y = batch(16, 10, seed=17)
    s.requires_grad_()
    loss = DistillationLoss(temperature=2.0)(s, t.to(torch.bfloat16), y)
    loss.backward()
    check(loss, s.grad, s, t.to(torch.bfloat16), y, tau=2.0)


# ------------------------------------------------------------------ autograd behaviour


GRADCHECK_CASES = [
    dict(temperature=2.0),
    dict(temperature=1.0, label_smoothing=0.2),
    dict(temperature=3.0, soft_loss="jsd", beta=0.3),
    dict(temperature=2.0, soft_loss="skew_reverse_kl", alpha=0.2, reduction="none"),
    dict(temperature=1.5, soft_loss="reverse_kl", reduction="sum"),
]


@pytest.mark.parametrize("cfg", GRADCHECK_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gradcheck(cfg):
    s, t, y = batch(6, 7, torch.float64, seed=18)
    s.requires_grad_()
    crit = DistillationLoss(**cfg)
    assert torch.autograd.gradcheck(lambda x: crit(x, t, y), (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_functional_forms():
    s, t, _ = batch(5, 6, torch.float64, seed=19, ignore=False)
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: kl_divergence(x, t, 2.0), (s,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda x: feature_loss(x, t, loss="cosine", reduction="none"), (s,),
                                    eps=1e-6, atol=1e-7)


def test_upstream_scalar_and_retain_graph():
    s, t, y = batch(20, 9, seed=20)
    s.requires_grad_()
    loss = DistillationLoss(temperature=2.0)(s, t, y)
    loss.backward(retain_graph=True)
    g1 = s.grad.clone()
    loss.backward(retain_graph=True)  # the saved gradient must not have been modified
    assert torch.equal(s.grad, 2 * g1)
    s.grad = None
    (3.0 * loss).backward()
    assert rel_err(s.grad, 3 * g1) < 1e-6


def test_gradient_flows_through_a_graph():
    s, t, y = batch(12, 8, seed=21)
    w = torch.linspace(0.5, 1.5, 8, requires_grad=True)
    loss = DistillationLoss(temperature=2.0)(s * w, t, y)
    loss.backward()
    w_ref = w.detach().double().requires_grad_()
    ref_loss(s.double() * w_ref, t, y, tau=2.0).backward()
    assert rel_err(w.grad, w_ref.grad) < 1e-5


def test_student_without_grad():
    s, t, y = batch(16, 10, seed=22)
    crit = DistillationLoss(temperature=2.0)
    loss = crit(s, t, y)
    assert loss.grad_fn is None and not loss.requires_grad
    assert rel_err(loss, ref_loss(s, t, y, tau=2.0)) < 1e-5
    s.requires_grad_()
    with torch.no_grad():
        loss2 = crit(s, t, y)
    assert loss2.grad_fn is None
    assert loss2.item() == loss.item()
    rows = crit.__class__(temperature=2.0, reduction="none")(s.detach(), t, y)
    assert rel_err(rows, ref_loss(s.detach(), t, y, tau=2.0, reduction="none")) < 1e-5


def test_teacher_gets_no_gradient():
    s, t, y = batch(16, 10, seed=23)
    s.requires_grad_()
    t.requires_grad_()
    loss = DistillationLoss(temperature=2.0)(s, t, y)
    loss.backward()
    assert t.grad is None
    check(loss, s.grad, s, t, y, tau=2.0)


def test_no_double_backward():
    s, t, y = batch(4, 5, torch.float64, seed=24)
    s.requires_grad_()
    loss = DistillationLoss(temperature=2.0)(s, t, y)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


# ------------------------------------------------------------------ functional forms


def test_kl_divergence_functional():
    s, t, _ = batch(20, 15, seed=25, ignore=False)
    s.requires_grad_()
    tau = 4.0
    loss = kl_divergence(s, t, tau)
    loss.backward()
    s_ref = s.detach().double().requires_grad_()
    ref = tau**2 * F.kl_div(F.log_softmax(s_ref / tau, -1), F.log_softmax(t.double() / tau, -1),
                            log_target=True, reduction="batchmean")
    ref.backward()
    assert rel_err(loss, ref) < 1e-5 and rel_err(s.grad, s_ref.grad) < 1e-5
    rows = kl_divergence(s.detach(), t, tau, reduction="none")
    assert rows.shape == (20,)


def test_feature_loss_mse_is_f_mse_loss():
    g = torch.Generator().manual_seed(26)
    s = torch.randn(4, 6, 32, generator=g, requires_grad=True)
    t = torch.randn(4, 6, 32, generator=g)
    loss = feature_loss(s, t)
    loss.backward()
    s_ref = s.detach().double().requires_grad_()
    ref = F.mse_loss(s_ref, t.double())
    ref.backward()
    assert rel_err(loss, ref) < 1e-5 and rel_err(s.grad, s_ref.grad) < 1e-5


def test_feature_loss_cosine():
    g = torch.Generator().manual_seed(27)
    s = torch.randn(10, 16, generator=g, requires_grad=True)
    t = torch.randn(10, 16, generator=g)
    loss = feature_loss(s, t, loss="cosine", reduction="sum")
    loss.backward()
    s_ref = s.detach().double().requires_grad_()
    ref = (1 - F.cosine_similarity(s_ref, t.double(), dim=-1)).sum()
    ref.backward()
    assert rel_err(loss, ref) < 1e-5 and rel_err(s.grad, s_ref.grad) < 1e-5


def test_functional_equals_module():
    s, t, y = batch(16, 10, seed=28)
    kw = dict(temperature=3.0, hard_label_weight=0.2, soft_label_weight=0.8, soft_loss="tvd")
    assert response_loss(s, t, y, **kw).item() == DistillationLoss(**kw)(s, t, y).item()


# ------------------------------------------------------------------ training


def test_tiny_student_trains_and_matches_reference_training():
    g = torch.Generator().manual_seed(29)
    x = torch.randn(256, 20, generator=g, dtype=torch.float64)
    teacher = torch.nn.Linear(20, 10).double()
    with torch.no_grad():
        teacher.weight.copy_(torch.randn(10, 20, generator=g, dtype=torch.float64))
        teacher.bias.zero_()
        t_logits = teacher(x)
    y = t_logits.argmax(-1)
    student = torch.nn.Linear(20, 10).double()
    ref_student = torch.nn.Linear(20, 10).double()
    ref_student.load_state_dict(student.state_dict())
    crit = DistillationLoss(temperature=2.0, hard_label_weight=0.5, soft_label_weight=0.5)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_student.parameters(), lr=0.1)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = crit(student(x), t_logits, y)
        loss.backward()
        opt.step()
        ref_opt.zero_grad()
        ref_loss(ref_student(x), t_logits, y, tau=2.0).backward()
        ref_opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
    assert rel_err(student.weight, ref_student.weight) < 1e-9


# ------------------------------------------------------------------ parameters and errors


def test_parameters_can_change_between_steps():
    s, t, y = batch(16, 10, seed=30)
    crit = DistillationLoss(temperature=4.0)
    crit.temperature = 2.0
    crit.hard_label_weight = 0.1
    assert crit.temperature == 2.0 and crit.hard_label_weight == 0.1
    assert rel_err(crit(s, t, y), ref_loss(s, t, y, tau=2.0, hw=0.1)) < 1e-5
    crit2 = DistillationLoss(soft_loss=DistilLoss.reverse_kl(4.0))
    crit2.temperature = 1.5
    assert crit2.soft_loss == DistilLoss.reverse_kl(1.5)
    assert "reverse_kl" in repr(crit2)


def test_errors():
    s, t, y = batch(8, 6, seed=31)
    with pytest.raises(InvalidParameterError, match="soft_loss"):
        DistillationLoss(soft_loss="kl")
    with pytest.raises(InvalidParameterError, match="temperature"):
        DistillationLoss(temperature=0.0)
    with pytest.raises(InvalidParameterError, match="temperature"):
        DistillationLoss(temperature=2.0, soft_loss=DistilLoss.kl_divergence(4.0))
    with pytest.raises(InvalidParameterError, match="reduction"):
        DistillationLoss(reduction="batchmean")
    with pytest.raises(InvalidParameterError, match="beta"):
        DistillationLoss(soft_loss="jsd", beta=1.5)
    crit = DistillationLoss(temperature=2.0)
    with pytest.raises(TeacherStudentMismatchError):
        crit(s, t[:, :5], y)
    with pytest.raises(InvalidParameterError, match="labels"):
        crit(s, t)  # hard_label_weight != 0 needs labels
    with pytest.raises(TypeError, match="labels"):
        crit(s, t, y.float())
    with pytest.raises(TypeError, match="dtype"):
        crit(s.long(), t, y)
    with pytest.raises(TypeError, match="torch.Tensor"):
        crit(s.numpy(), t, y)
    with pytest.raises(fastdistill.LabelOutOfRangeError):
        crit(s, t, torch.full((8,), 6))


def test_import_fastdistill_does_not_import_torch():
    code = "import sys, fastdistill; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_tensors_match_cpu(reduction):
    s, t, y = batch(64, 1000, seed=32, mask=True)
    crit = DistillationLoss(temperature=4.0, reduction=reduction)
    s_cpu = s.clone().requires_grad_()
    s_gpu = s.cuda().requires_grad_()
    up = torch.linspace(0.5, 1.5, 64) if reduction == "none" else None
    out_cpu = crit(s_cpu, t, y)
    out_gpu = crit(s_gpu, t.cuda(), y.cuda())
    assert out_gpu.device.type == "cuda"
    out_cpu.backward(up)
    out_gpu.backward(up.cuda() if up is not None else None)
    assert s_gpu.grad.device.type == "cuda" and s_gpu.grad.dtype == torch.float32
    assert rel_err(out_gpu.cpu(), out_cpu) < 1e-5
    assert rel_err(s_gpu.grad.cpu(), s_cpu.grad) < 1e-5

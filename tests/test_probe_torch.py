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

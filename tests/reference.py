"""Independent float64 references (NumPy; PyTorch autograd for gradients when installed).

Written from the formulas in the API contract, not from the kernels: probabilities are formed
explicitly, the JSD mixture as a probability mixture, masked (-inf) classes contribute 0 where the
probability is 0.
"""
from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))


def _xlogy_ratio(a: np.ndarray, la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """sum a * (la - lb) over classes, with 0 where a == 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(a > 0, a * (la - lb), 0.0).sum(-1)


def divergence(kind: str, s: np.ndarray, t: np.ndarray, tau: float = 1.0, param: float = 0.5) -> np.ndarray:
    """Per-row soft loss (already tau**2-scaled where the contract says so)."""
    s = np.asarray(s, np.float64)
    t = np.asarray(t, np.float64)
    lp = log_softmax(t / tau)
    lq = log_softmax(s / tau)
    p, q = np.exp(lp), np.exp(lq)
    t2 = tau * tau
    if kind == "kl_divergence":
        return t2 * _xlogy_ratio(p, lp, lq)
    if kind == "reverse_kl":
        return t2 * _xlogy_ratio(q, lq, lp)
    if kind in ("jsd", "skew_kl", "skew_reverse_kl"):
        if kind == "jsd":
            b = param
            if b == 0.0:
                return t2 * _xlogy_ratio(p, lp, lq)
            if b == 1.0:
                return t2 * _xlogy_ratio(q, lq, lp)
            m = b * p + (1 - b) * q
            with np.errstate(divide="ignore"):
                lm = np.log(m)
            return t2 * (b * _xlogy_ratio(p, lp, lm) + (1 - b) * _xlogy_ratio(q, lq, lm))
        a = param
        m = a * p + (1 - a) * q if kind == "skew_kl" else (1 - a) * p + a * q
        with np.errstate(divide="ignore"):
            lm = np.log(m)
        return t2 * (_xlogy_ratio(p, lp, lm) if kind == "skew_kl" else _xlogy_ratio(q, lq, lm))
    if kind == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if kind == "alpha_divergence":
        a = param
        if a == 0.0:
            return t2 * _xlogy_ratio(q, lq, lp)
        if a == 1.0:
            return t2 * _xlogy_ratio(p, lp, lq)
        # sum p^a q^(1 - a), from the logs (a class of no mass on either side adds exp(-inf) = 0)
        return t2 * (1.0 - np.exp(a * lp + (1 - a) * lq).sum(-1)) / (a * (1 - a))
    if kind == "mse":
        return ((t - s) ** 2).mean(-1)
    if kind == "cosine":
        ns = np.linalg.norm(s, axis=-1)
        nt = np.linalg.norm(t, axis=-1)
        den = ns * nt
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, 1.0 - (s * t).sum(-1) / np.where(den > 0, den, 1.0), 1.0)
    raise ValueError(kind)


def cross_entropy(s: np.ndarray, y: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """Per-row CE (PyTorch's label-smoothing formula); y must be valid indices."""
    lq = log_softmax(s)
    n = s.shape[-1]
    nll = -np.take_along_axis(lq, y[..., None], axis=-1)[..., 0]
    if eps == 0.0:
        return nll
    return (1 - eps) * nll - eps / n * lq.sum(-1)


def response_rows(s, t, y, hard_w, soft_w, kind, tau, param=0.5, eps=0.0, ignore_index=-100):
    """Per-row response loss, 0 for ignored rows; also the counted mask."""
    soft = divergence(kind, s, t, tau, param)
    if y is None:
        return soft_w * soft, np.ones(soft.shape, bool)
    y = np.asarray(y)
    keep = y != ignore_index
    yy = np.where(keep, y, 0)
    hard = cross_entropy(s, yy, eps) if hard_w != 0 else 0.0
    rows = np.where(keep, hard_w * hard + soft_w * soft, 0.0)
    return rows, keep


def reduce(rows: np.ndarray, keep: np.ndarray, reduction: str, num_items=None):
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return float(total)
    div = num_items if num_items is not None else keep.sum()
    return float(total / div) if div else 0.0


def numeric_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of a scalar function of a float64 array."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f(x)
        x[i] = old - h
        fm = f(x)
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


def torch_response(s, t, y, hard_w, soft_w, kind, tau, param=0.5, eps=0.0, ignore_index=-100,
                   reduction="mean", num_items=None):
    """(loss, grad) by PyTorch autograd in float64, from PyTorch's own ops."""
    import torch
    import torch.nn.functional as F

    st = torch.tensor(np.asarray(s, np.float64), requires_grad=True)
    tt = torch.tensor(np.asarray(t, np.float64))
    lp = F.log_softmax(tt / tau, -1)
    lq = F.log_softmax(st / tau, -1)
    p, q = lp.exp(), lq.exp()
    t2 = tau * tau

    def kl(a, la, lb):
        # select before multiplying: 0 * (-inf - -inf) would leak NaN into the gradient
        return (a * torch.where(a > 0, la - lb, torch.zeros_like(a))).sum(-1)

    # mixtures: finite stand-ins for log 0 keep autograd free of NaN (their terms are selected away)
    lps = torch.where(p > 0, lp, torch.full_like(lp, -1e30))
    lqs = torch.where(q > 0, lq, torch.full_like(lq, -1e30))
    if kind == "kl_divergence":
        soft = t2 * kl(p, lp, lq)
    elif kind == "reverse_kl":
        soft = t2 * kl(q, lq, lp)
    elif kind == "jsd":
        b = param
        if b == 0:
            soft = t2 * kl(p, lp, lq)
        elif b == 1:
            soft = t2 * kl(q, lq, lp)
        else:
            lm = torch.logsumexp(torch.stack([lps + np.log(b), lqs + np.log(1 - b)]), 0)
            soft = t2 * (b * kl(p, lp, lm) + (1 - b) * kl(q, lq, lm))
    elif kind in ("skew_kl", "skew_reverse_kl"):
        a = param
        m = a * p + (1 - a) * q if kind == "skew_kl" else (1 - a) * p + a * q
        lm = torch.log(torch.where(m > 0, m, torch.ones_like(m)))
        soft = t2 * (kl(p, lp, lm) if kind == "skew_kl" else kl(q, lq, lm))
    elif kind == "tvd":
        soft = 0.5 * (p - q).abs().sum(-1)
    elif kind == "alpha_divergence":
        a = param
        if a == 0:
            soft = t2 * kl(q, lq, lp)
        elif a == 1:
            soft = t2 * kl(p, lp, lq)
        else:
            soft = t2 * (1 - torch.exp(a * lps + (1 - a) * lqs).sum(-1)) / (a * (1 - a))
    elif kind == "mse":
        soft = ((tt - st) ** 2).mean(-1)
    elif kind == "cosine":
        soft = 1 - F.cosine_similarity(st, tt, dim=-1, eps=0.0)
    else:
        raise ValueError(kind)
    if y is None:
        rows = soft_w * soft
        count = rows.shape[0]
    else:
        yt = torch.tensor(np.asarray(y, np.int64))
        keep = yt != ignore_index
        hard = F.cross_entropy(st, torch.where(keep, yt, 0), reduction="none", label_smoothing=eps)
        rows = torch.where(keep, hard_w * hard + soft_w * soft, torch.zeros_like(soft))
        count = int(keep.sum())
    if reduction == "none":
        total = rows.sum()
        out = rows.detach().numpy()
    elif reduction == "sum":
        total = rows.sum()
        out = float(total.detach())
    else:
        div = num_items if num_items is not None else count
        total = rows.sum() / div if div else rows.sum() * 0
        out = float(total.detach())
    total.backward()
    return out, st.grad.numpy()

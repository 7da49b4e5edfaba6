"""The one table of kernel variants (``fastdistill._spec.reachable``): every variant in it is compiled and
checked against a float64 reference here, the façade resolves only variants of it, and input flags
(read-only, memory-mapped) never compile a variant of their own.

``conftest.py`` also checks, when the session ends, that no call of the whole suite compiled a CPU
driver or softmax signature outside the expected ones.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastdistill as fd
from conftest import IGNORE, TOL, make_batch, rel_err
from fastdistill import _spec
from fastdistill._spec import (
    CE_NONE,
    CE_OWN,
    CE_SHARED,
    DIV_FORWARD_KL,
    DIV_MIXTURE,
    DIV_NONE,
    DIV_REVERSE_KL,
    DIV_TVD,
    FLOAT32,
    reachable,
    resolve,
)
from reference import cross_entropy, divergence, response_rows

VARIANTS = reachable()
# every variant whose student, teacher and gradient share a storage; of the mixed storages (a float32
# teacher beside a half-precision student, a float32 gradient buffer, ...) the forward KL with its own
# cross-entropy normaliser and the mixture, which between them read every input in every pass
TESTED = tuple(v for v in VARIANTS if not (v.teacher or v.grad)
               or (v.div, v.ce, v.lin, v.pw, v.math) in ((DIV_FORWARD_KL, CE_OWN, False, 0, "float32"),
                                                         (DIV_MIXTURE, CE_NONE, False, 0, "float32")))
# the gradient's rounding to its storage, relative
ROUNDING = {"float32": 0.0, "float64": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def _np_dtype(name):
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(name)


def _loss_for(v: _spec.Variant):
    """(a public loss object that runs variant ``v``, with labels?, its reference description)."""
    # temperature: 1 shares the CE normaliser, 2 and 4 are the power trick, 40 float64 math, else 3
    if v.ce == CE_SHARED:
        tau = 1.0
    elif v.pw:
        tau = float(v.pw)
    elif v.math == "float64" and v.dtype != "float64":
        tau = 40.0
    else:
        tau = 3.0
    hard_w = 0.4 if v.ce != CE_NONE else 0.0
    if v.div == DIV_NONE:
        soft = fd.DistilLoss.mse() if v.lin else fd.DistilLoss.kl_divergence(tau)
        soft_w = 0.6 if v.lin else 0.0  # a zero soft weight leaves the hard-label term alone
        kind, param = ("mse" if v.lin else None), None
    elif v.div == DIV_FORWARD_KL:
        soft = fd.DistilLoss.combined(1.0, 0.3, tau) if v.lin else fd.DistilLoss.kl_divergence(tau)
        soft_w, kind, param = 0.6, ("combined" if v.lin else "kl_divergence"), None
    elif v.div == DIV_REVERSE_KL:
        soft, soft_w, kind, param = fd.DistilLoss.reverse_kl(tau), 0.6, "reverse_kl", None
    elif v.div == DIV_MIXTURE:
        soft, soft_w, kind, param = fd.DistilLoss.jsd(0.3, tau), 0.6, "jsd", 0.3
    elif v.div == DIV_TVD:
        soft, soft_w, kind, param = fd.DistilLoss.tvd(tau), 0.6, "tvd", None
    else:
        soft, soft_w, kind, param = fd.DistilLoss.alpha_divergence(0.3, tau), 0.6, "alpha_divergence", 0.3
    d = fd.ResponseDistiller(soft, hard_w, soft_w, ignore_index=IGNORE, label_smoothing=0.1 if hard_w else 0.0)
    return d, v.ce != CE_NONE, (kind, tau, hard_w, soft_w, param)


def _reference(s, t, y, desc):
    kind, tau, hard_w, soft_w, param = desc
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    eps = 0.1 if hard_w else 0.0
    if kind == "combined":
        rows, keep = response_rows(s64, t64, y, hard_w, soft_w, "kl_divergence", tau, eps=eps, ignore_index=IGNORE)
        rows = rows + np.where(keep, soft_w * 0.3 * divergence("mse", s64, t64), 0.0)
    elif kind is None:  # no soft term: the hard-label term alone, or nothing at all
        if y is None:
            return np.zeros(s.shape[0]), np.ones(s.shape[0], bool)
        keep = y != IGNORE
        rows = np.where(keep, hard_w * cross_entropy(s64, np.where(keep, y, 0), eps), 0.0)
    else:
        rows, keep = response_rows(s64, t64, y, hard_w, soft_w, kind, tau, param if param is not None else 0.5,
                                   eps=eps, ignore_index=IGNORE)
    return rows, keep


@pytest.mark.parametrize("shape", [(5, 37), (1, 2 * 16384 + 7)], ids=["rows", "split-row"])
@pytest.mark.parametrize("v", TESTED, ids=[v.name for v in TESTED])
def test_every_variant_against_float64(v, shape):
    """Each variant of the table (of the mixed storages, two), by the public API, on the row path and on
    a row split across threads."""
    if shape[0] == 1 and fd.get_num_threads() < 2:
        pytest.skip("the split-row path needs two threads")
    d, labels, desc = _loss_for(v)
    s_store, t_store, g_store = v.storage()
    dtype = _np_dtype(s_store).type
    lin = v.lin
    # -inf logits mask classes of the softmax losses (not of MSE/cosine, nor under label smoothing)
    s, t, y = make_batch(*shape, dtype, seed=VARIANTS.index(v), mask=not lin and not labels, ignore=shape[0] > 1)
    t = t.astype(_np_dtype(t_store))
    y = y if labels else None
    assert resolve(d.terms(), labels, *v.storage()) == v  # this call runs the variant under test
    g_out = np.empty(s.shape, _np_dtype(g_store)) if g_store != s_store else None
    loss, grad = d.loss_and_grad(s, t, y, reduction="sum", grad_out=g_out)
    rows, keep = _reference(s, t, y, desc)
    precise = np.float64 if s_store == "float64" else np.float32  # (half precision: float32 arithmetic)
    tol = TOL[precise] * (4 if v.math != ("float64" if s_store == "float64" else "float32") else 2)
    assert loss == pytest.approx(rows.sum(), rel=tol, abs=1e-9)
    got_rows = d.loss(s, t, y, reduction="none")
    assert rel_err(got_rows, rows) < tol or np.max(np.abs(rows)) < 1e-12
    assert grad.dtype == _np_dtype(g_store) and grad.shape == s.shape
    if shape[0] > 1:
        # the gradient against finite differences of the float64 reference on a few elements
        def f(x):
            r, _ = _reference(x, t.astype(np.float64), y, desc)
            return r.sum()

        idx = [(0, 0), (1, 5), (4, 36), (2, 17)]
        s64 = s.astype(np.float64)
        for i in idx:
            if not np.isfinite(s64[i]):
                continue
            h = 1e-6 * max(1.0, abs(s64[i]))
            e = np.zeros_like(s64)
            e[i] = h
            fd_grad = (f(s64 + e) - f(s64 - e)) / (2 * h)
            rel = (1e-4 if precise == np.float32 else 1e-6) + ROUNDING[g_store]
            assert float(grad[i]) == pytest.approx(fd_grad, rel=rel, abs=1e-5), (i, v)
        if not keep.all():
            assert np.all(grad[~keep] == 0.0)


def test_the_table_is_what_resolve_returns():
    """resolve() over a grid of every loss kind, weight, temperature, label state and dtype returns only
    variants of the table, and every variant of the table is returned for some public loss."""
    seen = set()
    kinds = [fd.DistilLoss.kl_divergence, fd.DistilLoss.reverse_kl, lambda tau: fd.DistilLoss.jsd(0.5, tau),
             lambda tau: fd.DistilLoss.jsd(0.0, tau), lambda tau: fd.DistilLoss.jsd(1.0, tau),
             lambda tau: fd.DistilLoss.skew_kl(0.1, tau), lambda tau: fd.DistilLoss.skew_reverse_kl(0.1, tau),
             fd.DistilLoss.tvd, lambda tau: fd.DistilLoss.alpha_divergence(0.3, tau), lambda tau: fd.DistilLoss.mse(),
             lambda tau: fd.DistilLoss.cosine(),
             lambda tau: fd.DistilLoss.combined(0.5, 0.5, tau)]
    for make, tau, hard_w, soft_w, labels, dtype in itertools.product(
            kinds, [0.5, 1.0, 2.0, 3.0, 4.0, 32.0, 33.0, 1e4], [0.0, 0.5], [0.0, 1.0], [False, True],
            _spec.STORAGE_TRIPLES):
        terms = fd.ResponseDistiller(make(tau), hard_w, soft_w).terms()
        v = resolve(terms, labels, *dtype)
        assert v in _spec.REACHABLE, v
        seen.add(v)
    assert seen == set(VARIANTS)
    assert resolve(fd.DistilLoss.kl_divergence(33.0).terms(), False, FLOAT32).math == "float64"
    assert resolve(fd.DistilLoss.kl_divergence(32.0).terms(), False, FLOAT32).math == "float32"


def test_a_variant_outside_the_table_is_refused():
    from fastdistill.cpu import _kernels as K

    bad = _spec.Variant(DIV_TVD, CE_OWN, True, 0, "float32", "float32")  # TVD with an MSE term: no loss has it
    assert bad not in _spec.REACHABLE
    with pytest.raises(RuntimeError, match="not in fastdistill._spec.reachable"):
        K.worker(bad)


@pytest.mark.parametrize("how", ["setflags", "mmap"])
def test_read_only_inputs_use_the_same_compiled_code(how, tmp_path):
    """Read-only and memory-mapped logits and labels: correct results, no new compile, inputs untouched
    (a read-only student failed with a TypingError, a read-only teacher compiled a variant of its own)."""
    from fastdistill.cpu import _kernels as K

    s, t, y = make_batch(16, 50, np.float32, seed=3)
    d = fd.ResponseDistiller.balanced()
    want_loss, want_grad = d.loss_and_grad(s, t, y)  # compiled here for writable arrays
    drive_sigs = len(K.drive.signatures)
    if how == "setflags":
        rs, rt, ry = s.copy(), t.copy(), y.copy()
        for a in (rs, rt, ry):
            a.setflags(write=False)
    else:
        for name, a in (("s", s), ("t", t), ("y", y)):
            np.save(tmp_path / f"{name}.npy", a)
        rs, rt, ry = (np.load(tmp_path / f"{n}.npy", mmap_mode="r") for n in ("s", "t", "y"))
    loss, grad = d.loss_and_grad(rs, rt, ry)
    assert loss == want_loss and np.array_equal(grad, want_grad)
    assert d.loss(rs, rt, ry) == pytest.approx(want_loss, rel=1e-7)
    rows = d.loss(rs, t, ry, reduction="none")
    assert rows.shape == (16,)
    assert fd.DistilLoss.kl_divergence(2.0).compute(rs, rt) == pytest.approx(
        fd.DistilLoss.kl_divergence(2.0).compute(s, t), rel=1e-7)
    assert np.array_equal(fd.softmax(rs), fd.softmax(s))
    assert len(K.drive.signatures) == drive_sigs  # no new signature of the driver
    assert np.array_equal(np.asarray(rs), s)

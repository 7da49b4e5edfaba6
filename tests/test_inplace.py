"""A gradient written over the student (``grad_out`` is the student) gives the same bits as one written
into a fresh buffer, on every storage and every CPU kernel family (dense rows, split rows, sparse
teachers, vocabulary shards), and runs the in-place kernels (which write through the student's own
pointer, so that LLVM's run-time overlap check does not send their loops to the scalar fallback).

Small shapes and one loss per family: each storage compiles its in-place worker here."""
from __future__ import annotations

import numpy as np
import pytest

import fastdistill as fd
from fastdistill import SparseTeacher

from conftest import make_batch

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
STORAGES = [np.float32, np.float64, np.float16, BF16]


def distiller():
    # CE + KL at temperature 2: the cross-entropy's power variant, as in the benchmarks
    return fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5)


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def assert_same(fresh, inplace, student):
    """``fresh`` = (loss, grad) into a new buffer; ``inplace`` = (loss, grad) with ``grad_out=student``."""
    (l1, g1), (l2, g2) = fresh, inplace
    assert g2 is student
    assert bits(np.asarray(l1)).tobytes() == bits(np.asarray(l2)).tobytes()
    assert np.array_equal(bits(g1), bits(student))


def both(run, s0):
    """``run(s, grad_out)`` into a fresh buffer and over a copy of ``s0`` itself."""
    s = s0.copy()
    fresh = run(s, np.empty_like(s))
    assert np.array_equal(bits(s), bits(s0))  # (the student untouched)
    return fresh, run(s, s), s


@pytest.mark.parametrize("dtype", STORAGES, ids=lambda d: np.dtype(d).name)
def test_dense_rows(dtype):
    s0, t, y = make_batch(7, 300, np.float64, seed=3)  # masked classes, ignored rows
    s0, t = s0.astype(dtype), t.astype(dtype)
    d = distiller()
    fresh, inplace, s = both(lambda s, g: d.loss_and_grad(s, t, y, grad_out=g), s0)
    assert_same(fresh, inplace, s)
    rows = both(lambda s, g: d.loss_and_grad(s, t, y, grad_out=g, reduction="none"), s0)
    assert_same(*rows)


def test_dense_uses_in_place_worker():
    from fastdistill import cpu

    s0, t, y = make_batch(4, 64, np.float32, seed=1)
    s = s0.copy()
    distiller().loss_and_grad(s, t, y, grad_out=s)
    assert any(key[1] for key in cpu._ADDRESSES)
    assert cpu.in_place(s, s) and not cpu.in_place(s, s.copy()) and not cpu.in_place(s[1:], s[:-1])


def test_dense_split_rows():
    # one long row: its passes split into column chunks across threads
    s0, t, y = make_batch(1, 40000, np.float32, seed=5, ignore=False)
    d = distiller()
    fresh, inplace, s = both(lambda s, g: d.loss_and_grad(s, t, y, grad_out=g), s0)
    assert_same(fresh, inplace, s)


def test_truncated_vocabulary():
    s0, t, y = make_batch(5, 300, np.float32, seed=7)
    t = t[:, :250].copy()
    y = np.where(y >= 250, 3, y)
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5, vocab_mismatch="truncate")
    fresh, inplace, s = both(lambda s, g: d.loss_and_grad(s, t, y, grad_out=g), s0)
    assert_same(fresh, inplace, s)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_sparse_teacher(dtype):
    # float32: the gradient from the statistics' exponentials; float64: the dense write from the logits
    s0, t, y = make_batch(6, 500, np.float64, seed=11, mask=False)
    idx = np.argsort(-t, axis=1)[:, :16].copy()
    vals = np.take_along_axis(t, idx, 1)
    teacher = SparseTeacher(idx, vals, kind="logits")
    d = distiller()
    fresh, inplace, s = both(lambda s, g: d.loss_and_grad(s, teacher, y, grad_out=g), s0.astype(dtype))
    assert_same(fresh, inplace, s)


def test_vocab_shards():
    s0, t, y = make_batch(6, 400, np.float32, seed=13, mask=False)
    d = distiller()
    cut = 150

    # each shard's student columns as a contiguous array of their own, as a shard process holds them
    def own(s, g):
        parts = [np.ascontiguousarray(s[:, lo:hi]) for lo, hi in ((0, cut), (cut, 400))]
        outs = [p if g is s else np.empty_like(p) for p in parts]
        shards = [d.vocab_shard(p, t[:, lo:hi].copy(), y, class_offset=lo, classes=400, grad_out=o)
                  for p, o, (lo, hi) in zip(parts, outs, ((0, cut), (cut, 400)))]
        gens = [sh.exchanges() for sh in shards]
        for items in zip(*gens):
            op = items[0][1]
            total = items[0][0].copy()
            for b, _ in items[1:]:
                total = np.maximum(total, b) if op == "max" else total + b
            for b, _ in items:
                b[...] = total
        loss = [sh.result()[0] for sh in shards][0]
        return loss, np.concatenate(outs, axis=1)

    s = s0.copy()
    l1, g1 = own(s, None)
    l2, g2 = own(s, s)
    assert l1 == l2
    assert np.array_equal(bits(g1), bits(g2))

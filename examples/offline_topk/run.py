"""Offline distillation from a stored top-k teacher.

    python examples/offline_topk/run.py [--classes 1000] [--k 20] [--quick]

1. A teacher (softmax regression on 64 features) is trained on a synthetic 1000-class task.
2. It scores the training inputs once; ``fd.top_k`` keeps per row the 20 largest classes and their exact
   log-probabilities, stored as ``.npy`` files: int32 ids and float16 values (what an inference server
   returns, at a fraction of the dense logits' bytes).
3. A smaller student (it sees 24 of the 64 features) is trained three ways from the same initial weights,
   with labels for only 10% of the rows: hard labels alone; distilled from the dense teacher logits;
   distilled from the memory-mapped top-k files (``fd.SparseTeacher``, tail "renormalize"). Losses and
   gradients with respect to the logits come from fastdistill; the linear layer's are two matmuls.
4. The store route (with the ``teachers`` extra, pyarrow): the same top-k saved with
   ``fastdistill.teachers.save``, opened memory-mapped with ``fastdistill.teachers.load`` (``store[0]`` a
   ``SparseTeacher`` of views, its temperature the one ``fd.top_k`` used), and a fourth student trained
   from it.

It prints the bytes per training row of each teacher format (the store's measured on disk: k * (4 + 2)
and a few hundred bytes of headers) and the students' test accuracy. ``fastdistill demo lm`` runs the
same route on a language model; ``bench/teacher_store_step.py`` times a step fed from a store.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import fastdistill as fd

IGNORE = -100


def make_task(rng, classes, rows, dim=64):  # type: ignore[no-untyped-def]
    """Gaussian class clusters in ``dim`` dimensions (labels drawn from a noisy linear teacher)."""
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, rows)
    x = centers[y] + rng.normal(scale=1.6, size=(rows, dim)).astype(np.float32)
    return x.astype(np.float32), y


def train(x, target, labels, loss, epochs, lr, rng, w0=None):  # type: ignore[no-untyped-def]
    """Softmax regression ``x @ w + b`` trained with Adam; ``loss.loss_and_grad(logits, target, labels)``
    gives the gradient with respect to the logits (``target``: an array, a ``SparseTeacher`` or None,
    sliced per batch)."""
    dim, classes = x.shape[1], (w0[0].shape[1] if w0 is not None else int(labels.max()) + 1)
    w = w0[0].copy() if w0 is not None else np.zeros((dim, classes), np.float32)
    b = w0[1].copy() if w0 is not None else np.zeros(classes, np.float32)
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    step = 0
    g = None
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x), 256):
            sel = np.sort(order[i:i + 256])
            logits = x[sel] @ w + b
            if g is None or g.shape != logits.shape:
                g = np.empty_like(logits)
            if isinstance(target, fd.SparseTeacher):
                t = fd.SparseTeacher(np.asarray(target.indices[sel]), np.asarray(target.values[sel]), tail=target.tail,
                                     temperature=target.temperature)
            else:
                t = logits if target is None else target[sel]
            loss.loss_and_grad(logits, t, labels[sel], grad_out=g)
            step += 1
            for k, grad in enumerate((x[sel].T @ g, g.sum(0))):
                m[k] = 0.9 * m[k] + 0.1 * grad
                v[k] = 0.999 * v[k] + 0.001 * grad * grad
                upd = lr * (m[k] / (1 - 0.9 ** step)) / (np.sqrt(v[k] / (1 - 0.999 ** step)) + 1e-8)
                (w if k == 0 else b)[...] -= upd
    return w, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--rows", type=int, default=40000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="a small run (seconds), for the tests")
    ap.add_argument("--out", default=None, help="keep the .npy files in this folder (default: a temporary one)")
    args = ap.parse_args()
    if args.quick:
        args.classes, args.rows, args.epochs = 200, 6000, 4
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    x, y = make_task(rng, args.classes, args.rows + 10000)
    x_train, y_train, x_test, y_test = x[:args.rows], y[:args.rows], x[args.rows:], y[args.rows:]
    ce = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(1.0), 1.0, 0.0)
    teacher = train(x_train, None, y_train, ce, args.epochs, 0.01, rng)
    t_logits = x_train @ teacher[0] + teacher[1]
    acc_teacher = float(((x_test @ teacher[0] + teacher[1]).argmax(1) == y_test).mean())

    # score once, keep the top k, store them; train from the memory-mapped files
    top = fd.top_k(t_logits, args.k)
    tmp = tempfile.TemporaryDirectory(prefix="fastdistill-topk-") if args.out is None else None
    folder = args.out if tmp is None else tmp.name
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "indices.npy"), np.asarray(top.indices, np.int32))
    np.save(os.path.join(folder, "values.npy"), np.asarray(top.values, np.float16))
    stored = fd.SparseTeacher(np.load(os.path.join(folder, "indices.npy"), mmap_mode="r"),
                              np.load(os.path.join(folder, "values.npy"), mmap_mode="r"))
    mass = float(np.exp(np.asarray(stored.values, np.float64)).sum(1).mean())
    store = None
    try:  # the store route: one sequence of args.rows rows, memory-mapped back
        from fastdistill import teachers

        teachers.save(os.path.join(folder, "store"), [top], meta={"vocab_size": args.classes, "source": "example"})
        store = teachers.load(os.path.join(folder, "store"))
    except ImportError:  # (without the "teachers" extra)
        print("(no teacher store: pip install 'fastdistill[teachers]')")

    # the student sees 24 of the 64 features; labels for 10% of the rows
    xs_train, xs_test = x_train[:, :24].copy(), x_test[:, :24].copy()
    few = y_train.copy()
    few[rng.random(len(few)) >= 0.1] = IGNORE
    w0 = (rng.normal(scale=0.01, size=(24, args.classes)).astype(np.float32), np.zeros(args.classes, np.float32))
    kd = _SoftEverywhere(fd.DistilLoss.kl_divergence(2.0), hard_w=0.3, soft_w=0.7)
    results = {}
    routes = [("hard labels (10%)", None, ce), ("dense teacher", t_logits, kd),
              (f"top-{args.k} teacher (stored)", stored, kd)]
    if store is not None:
        routes.append((f"top-{args.k} from a teacher store", store[0], kd))
    for name, target, loss in routes:
        w, b = train(xs_train, target, few, loss, args.epochs, 0.01, rng, w0)
        results[name] = float(((xs_test @ w + b).argmax(1) == y_test).mean())
    dense_bytes = args.classes * 4
    sparse_bytes = args.k * (4 + 2)
    print(f"{args.rows} training rows, {args.classes} classes; teacher test accuracy {acc_teacher:.3f}")
    print(f"teacher storage per row: dense float32 logits {dense_bytes} B; top-{args.k} int32 ids + float16 "
          f"log-probabilities {sparse_bytes} B ({100 * sparse_bytes / dense_bytes:.1f}%), holding "
          f"{100 * mass:.1f}% of the teacher's probability on average")
    if store is not None:  # measured: the shard files (one Arrow IPC stream per append)
        size = sum(os.path.getsize(f) for f in store.files)
        print(f"teacher store: {len(store)} sequence, {store.num_tokens} rows, {size} B on disk "
              f"({size / store.num_tokens:.2f} B a row; meta {store.meta})")
    for name, acc in results.items():
        print(f"  student, {name:28s} test accuracy {acc:.3f}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    del stored, store, routes  # (the memory maps, before their temporary folder goes)
    if tmp is not None:
        tmp.cleanup()


class _SoftEverywhere:
    """The soft term on every row (most have no label), the hard-label term on the labelled ones: two
    fused calls (the soft loss without labels, the cross-entropy with them), their gradients summed,
    both as means over all the batch's rows."""

    def __init__(self, soft: fd.DistilLoss, hard_w: float, soft_w: float) -> None:
        self.soft = fd.ResponseDistiller(soft, 0.0, soft_w)
        self.hard = fd.ResponseDistiller(soft, hard_w, 0.0)

    def loss_and_grad(self, logits, target, labels, grad_out):  # type: ignore[no-untyped-def]
        rows = len(labels)
        a, _ = self.soft.loss_and_grad(logits, target, grad_out=grad_out)
        b, g_hard = self.hard.loss_and_grad(logits, logits, labels, num_items=rows)
        grad_out += g_hard
        return a + b, grad_out


if __name__ == "__main__":
    main()

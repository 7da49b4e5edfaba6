"""Sparse (top-k) teachers and ``fd.top_k`` on the CPU, side by side in one process.

    python bench/sparse_teacher.py [--rows 1024] [--classes 128256] [--k 64] [--repeats 5]

Forward+gradient of ``0.5 * CE + 0.5 * T^2 * KL`` (T = 2, tail "renormalize") with a top-k teacher
against: the memory floor of the call (read the student once, write the gradient once: the bench's
``rw1`` kernel; and ``rw1_stream``, the same with streaming stores, as the kernel writes a gradient
this large), and the same loss in PyTorch eager as DistillKit writes it (``log_softmax`` of the
student, ``gather`` at the teacher's ids, ``softmax`` of the teacher's values, autograd). ``top_k`` with
the same k against the read floor (``read1``) and ``torch.topk`` + ``torch.log_softmax``. Best of
``--repeats`` calls after a warm-up; ratios within this run.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import fastdistill as fd
from fastdistill import bench as B


def best_of(fns, repeats):  # type: ignore[no-untyped-def]
    """{name: best time in ms} of ``repeats`` rounds, each calling every function once in turn: a drift
    in the machine's speed (a shared VM's) then reaches every entry alike and leaves the ratios be."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) * 1e3 for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=128256)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows, n, k, tau = args.rows, args.classes, args.k, 2.0
    rng = np.random.default_rng(0)
    s = rng.standard_normal((rows, n), dtype=np.float32) * np.float32(2.0)
    t = rng.standard_normal((rows, n), dtype=np.float32) * np.float32(2.0)
    y = rng.integers(0, n, rows)
    teacher = fd.top_k(t, k)  # int32 ids, float32 log-probabilities
    d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(tau), 0.5, 0.5)
    g = np.empty_like(s)
    floors = B.floor_kernels()
    flat_s, flat_g = s.reshape(-1), g.reshape(-1)
    partial = np.empty((flat_s.size + B.BLOCK - 1) // B.BLOCK, dtype=np.float32)
    fns = {
        "fastdistill fwd+grad": lambda: d.loss_and_grad(s, teacher, y, grad_out=g),
        "fastdistill fwd": lambda: d.loss(s, teacher, y),
        "floor r+w (student, gradient)": lambda: floors["rw1"](flat_s, flat_g),
        "floor r+w, streaming stores": lambda: floors["rw1_stream"](flat_s, flat_g),
        "fd.top_k": lambda: fd.top_k(t, k),
        "floor read (logits)": lambda: floors["read1"](t.reshape(-1), partial),
    }
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(fd.get_num_threads())
        st = torch.from_numpy(s)
        ids = torch.from_numpy(np.asarray(teacher.indices)).long()
        vals = torch.from_numpy(np.asarray(teacher.values))
        lab = torch.from_numpy(y)
        tt = torch.from_numpy(t)

        def torch_loss() -> None:
            x = st.detach().requires_grad_(True)
            lq = F.log_softmax(x / tau, dim=-1).gather(1, ids)
            p = F.softmax(vals / tau, dim=-1)
            kl = (p * (torch.log(p) - lq)).sum(-1).mean() * tau * tau
            loss = 0.5 * F.cross_entropy(x, lab) + 0.5 * kl
            loss.backward()

        def torch_topk() -> None:
            v, i = torch.topk(tt, k, dim=-1)
            (v - torch.logsumexp(tt, dim=-1, keepdim=True))

        fns["torch gather+log_softmax+autograd"] = torch_loss
        fns["torch.topk + logsumexp"] = torch_topk
    res = best_of(fns, args.repeats)
    print(f"{B.cpu_model()}, {fd.get_num_threads()} threads; {rows}x{n} float32, k={k}; best of {args.repeats} (ms)")
    for name, ms in res.items():
        print(f"  {name:38s} {ms:9.2f}")
    f = res["fastdistill fwd+grad"]
    print(f"  sparse fwd+grad / floor r+w: {f / res['floor r+w (student, gradient)']:.2f}x")
    print(f"  sparse fwd+grad / floor r+w with streaming stores: {f / res['floor r+w, streaming stores']:.2f}x")
    print(f"  top_k / read floor: {res['fd.top_k'] / res['floor read (logits)']:.2f}x")
    if torch is not None:
        print(f"  torch composition / fastdistill: {res['torch gather+log_softmax+autograd'] / f:.2f}x")
        print(f"  torch.topk+logsumexp / fd.top_k: {res['torch.topk + logsumexp'] / res['fd.top_k']:.2f}x")


if __name__ == "__main__":
    main()

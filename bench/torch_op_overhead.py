"""Per-call cost of ``fastdistill.torch.DistillationLoss`` on small CPU tensors (64 x 1000 by default):
forward alone (no grad), and forward + backward, best of several rounds of many calls.

Run it with two checkouts side by side to compare two versions of the op layer, e.g.::

    PYTHONPATH=/path/to/old python bench/torch_op_overhead.py
    PYTHONPATH=.             python bench/torch_op_overhead.py

It prints one JSON line: microseconds per call, and the same for the fused NumPy call underneath
(``ResponseDistiller.loss_and_grad`` on the tensors' NumPy views), so the layer's own share is the
difference.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import fastdistill as fd
from fastdistill.torch import DistillationLoss


def best_us(fn, calls: int, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(args.rows, args.classes, generator=g)
    t = torch.randn(args.rows, args.classes, generator=g)
    y = torch.randint(0, args.classes, (args.rows,), generator=g)
    y[::10] = -100
    crit = DistillationLoss(temperature=4.0)
    leaf = s.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            crit(s, t, y)

    def forward_backward():
        leaf.grad = None
        crit(leaf, t, y).backward()

    d = fd.ResponseDistiller.balanced()
    sn, tn, yn = s.numpy(), t.numpy(), y.numpy()
    buf = np.empty_like(sn)
    out = {
        "shape": f"{args.rows}x{args.classes}",
        "forward_us": best_us(forward, args.calls, args.rounds),
        "forward_backward_us": best_us(forward_backward, args.calls, args.rounds),
        "numpy_loss_us": best_us(lambda: d.loss(sn, tn, yn), args.calls, args.rounds),
        "numpy_loss_and_grad_us": best_us(lambda: d.loss_and_grad(sn, tn, yn, grad_out=buf), args.calls, args.rounds),
        "torch": torch.__version__,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

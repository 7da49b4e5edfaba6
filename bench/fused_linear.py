"""``FusedLinearDistillationLoss`` against the PyTorch composition: time and peak memory, each in a
fresh subprocess (the peak resident memory of two calls above the resident memory before them, after a
warm-up call; Linux).

    python bench/fused_linear.py [--rows 8192] [--hidden 1024] [--classes 32000] [--dtype float32]

``--alternate ROUNDS`` also runs ``fused``, ``torch``, ``matmuls`` and ``kernel`` in one process, one after
the other, ROUNDS times, and prints the best of each (time only): the fair ratio on a shared machine.

Implementations: ``fused`` (chunk_size 1024), ``torch`` (logits = x @ W.T for both models, then
DistillationLoss and ``.backward()``: the logits and their gradient exist in full), ``matmuls`` (the
fused loss's chunk matmuls alone, as it runs them: student and teacher logits into two reused chunk
buffers, grad_input, grad_weight, no loss),
``kernel`` (fastdistill's loss-and-gradient kernel alone on ready logits, chunk by chunk: its time only;
the ready logits' memory is the setup's), and,
where PyTorch has it, ``F.linear_cross_entropy`` (the hard-label part only).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CODE = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
from fastdistill.torch import DistillationLoss, FusedLinearDistillationLoss
from fastdistill._torch_linear import _accumulate
impls, rows, hidden, classes, dtype = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rounds = int(sys.argv[6]) if len(sys.argv) > 6 else 0  # > 0: the implementations alternate in this process
dt = getattr(torch, dtype)
torch.manual_seed(0)
x = torch.randn(rows, hidden, dtype=dt, requires_grad=True)
w = (torch.randn(classes, hidden, dtype=dt) * 0.02).requires_grad_(True)
tx = torch.randn(rows, hidden, dtype=dt)
tw = torch.randn(classes, hidden, dtype=dt) * 0.02
y = torch.randint(0, classes, (rows,))
fused = FusedLinearDistillationLoss(temperature=2.0, chunk_size=1024)
crit = DistillationLoss(temperature=2.0)
def run(impl):
    x.grad = w.grad = None
    if impl == "fused":
        fused(x, w, tx, tw, y).backward()
    elif impl == "torch":
        crit(x @ w.t(), (tx @ tw.t()).detach(), y).backward()
    elif impl == "matmuls":  # the fused head's own: chunk buffers reused, grad_input written in place
        with torch.no_grad():
            gw = torch.zeros(w.shape, dtype=torch.float32)
            gi = torch.empty(x.shape, dtype=x.dtype)
            s = torch.empty((min(rows, 1024), classes), dtype=dt)
            t = torch.empty((min(rows, 1024), classes), dtype=dt)
            for lo in range(0, rows, 1024):
                sc = torch.mm(x[lo:lo + 1024], w.t(), out=s[:min(rows, lo + 1024) - lo])
                torch.mm(tx[lo:lo + 1024], tw.t(), out=t[:min(rows, lo + 1024) - lo])
                torch.mm(sc, w, out=gi[lo:lo + 1024])
                _accumulate(gw, sc, x[lo:lo + 1024])  # (the fused head's own accumulation)
    elif impl == "kernel":  # fastdistill's loss-and-gradient kernel alone, chunk by chunk, on ready logits
        for lo in range(0, rows, 1024):
            s, t = ready[0][lo:lo + 1024], ready[1][lo:lo + 1024]
            fused.distiller.loss_and_grad(_as_backend_input(s), _as_backend_input(t),
                                          _as_backend_input(y[lo:lo + 1024]), grad_out=_as_backend_input(s),
                                          num_items=rows)
    else:
        F.linear_cross_entropy(x, w, y).backward()
if "kernel" in impls:
    from fastdistill._torch_ops import _as_backend_input
    with torch.no_grad():
        ready = (x @ w.t(), tx @ tw.t())
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
if rounds:
    for impl in impls:
        run(impl)  # warm-up (compiles the kernels)
    best = {impl: float("inf") for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            t0 = time.perf_counter(); run(impl); best[impl] = min(best[impl], time.perf_counter() - t0)
    print(json.dumps({"alternate": best}))
    sys.exit(0)
impl = impls[0]
run(impl)  # warm-up (compiles the kernels)
x.grad = w.grad = None
open("/proc/self/clear_refs", "w").write("5")  # (Linux: the resident high-water mark restarts here)
base = status("VmRSS:")
t0 = time.perf_counter(); run(impl); t = time.perf_counter() - t0
t0 = time.perf_counter(); run(impl); t = min(t, time.perf_counter() - t0)
print(json.dumps({"impl": impl, "seconds": t, "extra_kb": status("VmHWM:") - base}))
"""


IMPLS = ("fused", "matmuls", "kernel", "torch", "linear_cross_entropy")


def measure(impl: str, rows: int, hidden: int, classes: int, dtype: str) -> dict | None:
    r = subprocess.run([sys.executable, "-c", CODE, impl, str(rows), str(hidden), str(classes), dtype],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", help="append the results as one JSON line to this file")
    ap.add_argument("--impl", action="append", choices=IMPLS, help="only these implementations (repeatable)")
    ap.add_argument("--alternate", type=int, default=0, metavar="ROUNDS",
                    help="also time fused, torch, matmuls and kernel in one process, alternating, best of ROUNDS "
                         "(fair ratios when other jobs share the machine)")
    args = ap.parse_args()
    shape = (args.rows, args.hidden, args.classes, args.dtype)
    logits_mb = args.rows * args.classes * (2 if args.dtype == "bfloat16" else 4) / 2**20
    print(f"{args.rows}x{args.hidden}x{args.classes} {args.dtype}: one model's logits {logits_mb:.0f} MiB")
    res = {}
    for impl in args.impl or IMPLS:
        m = measure(impl, *shape)
        if m is None:
            print(f"  {impl:22s} not available")
            continue
        res[impl] = m
        print(f"  {impl:22s} {m['seconds'] * 1e3:9.1f} ms   extra peak memory {m['extra_kb'] / 1024:8.0f} MiB")
    if "fused" in res and "matmuls" in res:
        print(f"  fused / chunk matmuls: {res['fused']['seconds'] / res['matmuls']['seconds']:.2f}x")
        if "kernel" in res:
            both = res["matmuls"]["seconds"] + res["kernel"]["seconds"]
            print(f"  fused / (chunk matmuls + loss kernel): {res['fused']['seconds'] / both:.2f}x")
    if "fused" in res and "torch" in res:
        print(f"  torch / fused extra peak memory: {res['torch']['extra_kb'] / max(1, res['fused']['extra_kb']):.1f}x")
    if args.alternate:
        order = ("fused", "torch", "matmuls", "kernel")
        r = subprocess.run([sys.executable, "-c", CODE, ",".join(order), *map(str, shape), str(args.alternate)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(r.stderr[-3000:])
        alt = json.loads(r.stdout.strip().splitlines()[-1])["alternate"]
        res["alternate"] = alt
        print(f"  one process, alternating, best of {args.alternate}: "
              + ", ".join(f"{k} {alt[k] * 1e3:.1f} ms" for k in order))
        print(f"    fused / (matmuls + kernel): {alt['fused'] / (alt['matmuls'] + alt['kernel']):.2f}x, "
              f"fused / torch: {alt['fused'] / alt['torch']:.2f}x")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"rows": args.rows, "hidden": args.hidden, "classes": args.classes,
                                "dtype": args.dtype, "results": res}) + "\n")


if __name__ == "__main__":
    main()

"""A training step fed from a memory-mapped teacher store vs the same step fed from in-memory arrays.

    python bench/teacher_store_step.py [--vocab 8192] [--hidden 256] [--k 64] [--tokens 1024] [--batch 4]
                                       [--repeats 7] [--steps 3] [--mode both]

The step: a small student (token embedding, one GELU layer, a layer norm, the tied embedding as the
output head) runs forward on ``batch`` sequences of ``tokens`` tokens, ``FusedLinearDistillationLoss``
(KL at T = 1 and cross-entropy, half each) takes its hidden states and head against a sparse teacher
(``SparseTeacher``, the teacher's top-``k`` log-probabilities), and the loss runs backward (no optimizer
step, so both routes see the same weights and must give the same loss bit for bit; the script checks).

The teacher rows come from a store written with ``fastdistill.teachers.save`` (int32 ids, float16
values; a top-``k`` of random low-rank logits through ``fd.top_k``) and are read two ways, side by side,
the order alternating from repeat to repeat:

- **store**: ``fastdistill.teachers.load(...)[i]``, the views of the mapped shard (opened anew for every
  timed block, so its pages are mapped afresh and each step reads sequences no earlier step read);
- **memory**: the same sequences copied beforehand into ordinary NumPy arrays (float16 values too).

Two ways of forming a batch's teacher:

- ``view``: one sequence of ``batch * tokens`` tokens per step, its arrays given to the loss as they
  are (the kernels read the mapped pages themselves; no copy anywhere);
- ``gather``: ``batch`` sequences of ``tokens`` tokens, concatenated into the batch's arrays (one
  ``numpy.concatenate`` per array: the copy a data loader makes).

Printed per route: the median and the best seconds a step, the minor and major page faults a step,
and the ratio store / memory of the medians and of the bests. The file is in the page cache (it was
just written): what a training run that re-reads a store sees; a cold read from disk adds the disk's
time. ``--json`` also writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np


def _faults() -> tuple[int, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_majflt


def _teacher_rows(n: int, vocab: int, k: int, rng: np.random.Generator, pool: int = 4096) -> tuple:
    """``n`` rows of a teacher's top-``k`` (int32 ids, float32 log-probabilities): ``pool`` distinct rows
    from ``fd.top_k`` over random low-rank logits, drawn at random (a full top-k of every row would
    take longer than the benchmark)."""
    import fastdistill as fd

    basis = rng.normal(size=(32, vocab)).astype(np.float32)
    logits = (rng.normal(size=(pool, 32)).astype(np.float32) @ basis) * 1.5
    t = fd.top_k(logits, k)
    pick = rng.integers(0, pool, n)
    return np.asarray(t.indices, np.int32)[pick], np.asarray(t.values, np.float32)[pick]


def _student(vocab: int, hidden: int, seed: int):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class Student(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, hidden)
            self.mix = nn.Linear(hidden, hidden)
            self.ln = nn.LayerNorm(hidden)
            nn.init.normal_(self.embed.weight, std=0.02)

        def hidden(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            return self.ln(h + torch.nn.functional.gelu(self.mix(h)))

    torch.manual_seed(seed)
    return Student()


def run(args: argparse.Namespace) -> dict:
    import torch

    import fastdistill as fd
    import fastdistill.teachers as T
    from fastdistill.torch import FusedLinearDistillationLoss

    if args.threads:
        torch.set_num_threads(args.threads)
        fd.set_num_threads(args.threads)
    # the store's views are read-only; the loss only reads them (torch warns once about such arrays)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    rng = np.random.default_rng(0)
    modes = ("view", "gather") if args.mode == "both" else (args.mode,)
    # sequences: one per (mode, repeat, route, step, batch item), none read twice, and a warm-up's
    seq_tokens = {"view": args.batch * args.tokens, "gather": args.tokens}
    per_seq = {"view": 1, "gather": args.batch}
    plan: dict[str, int] = {m: (args.repeats * 2 * args.steps + 2) * per_seq[m] for m in modes}
    tmp = tempfile.TemporaryDirectory(prefix="fastdistill-store-step-")
    t0 = time.perf_counter()
    first: dict[str, int] = {}
    seq_count = 0
    for m in modes:
        n = plan[m] * seq_tokens[m]
        ids, vals = _teacher_rows(n, args.vocab, args.k, rng)
        tl = seq_tokens[m]
        seqs = [fd.SparseTeacher(ids[i:i + tl], vals[i:i + tl]) for i in range(0, n, tl)]
        first[m] = seq_count
        seq_count = T.save(os.path.join(tmp.name, "store"), seqs, meta={"vocab_size": args.vocab})
        del ids, vals, seqs
    build_s = time.perf_counter() - t0
    path = os.path.join(tmp.name, "store")
    store = T.load(path)
    size = sum(os.path.getsize(f) for f in store.files)
    # the memory route: every sequence copied into ordinary arrays (the same float16 values)
    memory = [(np.array(t.indices), np.array(t.values)) for t in store]
    del store
    tokens_store = int(sum(a.shape[0] for a, _ in memory))

    student = _student(args.vocab, args.hidden, 0)
    loss_fn = FusedLinearDistillationLoss("kl_divergence", temperature=1.0, hard_label_weight=0.5,
                                          soft_label_weight=0.5, chunk_size=args.chunk_size)
    xs = torch.randint(0, args.vocab, (args.batch * args.tokens + 1,), generator=torch.Generator().manual_seed(1))
    x, y = xs[:-1], xs[1:]

    def step(ind: np.ndarray, val: np.ndarray) -> float:
        teacher = fd.SparseTeacher(ind, val)
        h = student.hidden(x)
        loss = loss_fn(h, student.embed.weight, teacher, labels=y)
        loss.backward()
        student.zero_grad(set_to_none=True)
        return float(loss.detach())

    def teacher_of(m: str, source: object, seq0: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch's teacher arrays from sequences ``seq0 ...`` of ``source`` (a store or the list)."""
        if m == "view":
            t = source[seq0]  # type: ignore[index]
            return (t.indices, t.values) if not isinstance(t, tuple) else t
        parts = [source[seq0 + b] for b in range(args.batch)]  # type: ignore[index]
        parts = [(p.indices, p.values) if not isinstance(p, tuple) else p for p in parts]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    results: dict[str, dict] = {}
    for m in modes:
        base = first[m]
        nxt = [base]

        def take() -> int:
            s = nxt[0]
            nxt[0] += per_seq[m]
            return s

        # warm-up: the kernels, the allocator, one step of each route
        s0 = take()
        step(*teacher_of(m, T.load(path), s0))
        s1 = take()
        step(*teacher_of(m, memory, s1))
        times: dict[str, list[float]] = {"store": [], "memory": []}
        faults: dict[str, list[tuple[int, int]]] = {"store": [], "memory": []}
        for r in range(args.repeats):
            order = ("store", "memory") if r % 2 == 0 else ("memory", "store")
            block = [take() for _ in range(args.steps)]
            losses: dict[str, list[float]] = {}
            for route in order:
                src = T.load(path) if route == "store" else memory  # a fresh mapping per block
                got = []
                for s in block:
                    f0 = _faults()
                    c0 = time.perf_counter()
                    got.append(step(*teacher_of(m, src, s)))
                    times[route].append(time.perf_counter() - c0)
                    f1 = _faults()
                    faults[route].append((f1[0] - f0[0], f1[1] - f0[1]))
                losses[route] = got
                del src
            if losses["store"] != losses["memory"]:
                raise AssertionError(f"the routes' losses differ: {losses}")
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        results[m] = {
            "median_s": med, "best_s": best,
            "ratio_median": med["store"] / med["memory"], "ratio_best": best["store"] / best["memory"],
            "minor_faults_per_step": {k: statistics.mean(f[0] for f in v) for k, v in faults.items()},
            "major_faults_per_step": {k: statistics.mean(f[1] for f in v) for k, v in faults.items()},
            "tokens_per_step": args.batch * args.tokens,
            "teacher_bytes_per_step": args.batch * args.tokens * args.k * 6,
            "steps_per_route": len(times["store"]),
        }
    tmp.cleanup()
    return {"modes": results, "store_bytes": size, "store_tokens": tokens_store,
            "store_bytes_per_token": size / tokens_store, "build_s": build_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--chunk-size", type=int, default=1024, help="the fused loss's rows of logits at a time")
    ap.add_argument("--repeats", type=int, default=7, help="timed blocks per route (alternating)")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--mode", choices=("view", "gather", "both"), default="both")
    ap.add_argument("--threads", type=int, default=None, help="PyTorch and fastdistill threads")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    for name in ("vocab", "hidden", "k", "tokens", "batch", "chunk_size", "repeats", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.k > args.vocab:
        ap.error("--k must be at most --vocab")
    res = run(args)
    import torch

    print(f"teacher store step, vocab {args.vocab}, hidden {args.hidden}, k {args.k}, {args.batch} x {args.tokens} "
          f"tokens a step, {args.repeats} x {args.steps} steps a route (python {sys.version.split()[0]}, torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs)")
    print(f"store: {res['store_tokens']} tokens, {res['store_bytes'] / 1e6:.1f} MB, "
          f"{res['store_bytes_per_token']:.1f} bytes a token (k * 6 = {args.k * 6}); built in {res['build_s']:.1f} s")
    print("mode    | route  | median s/step | best s/step | minor faults/step | major faults/step")
    for m, r in res["modes"].items():
        for route in ("memory", "store"):
            print(f"{m:7s} | {route:6s} | {r['median_s'][route]:13.4f} | {r['best_s'][route]:11.4f} | "
                  f"{r['minor_faults_per_step'][route]:17.0f} | {r['major_faults_per_step'][route]:17.0f}")
    for m, r in res["modes"].items():
        print(f"{m}: store / memory = {r['ratio_median']:.3f} (medians), {r['ratio_best']:.3f} (bests); "
              f"{r['teacher_bytes_per_step'] / 1e6:.2f} MB of teacher rows a step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

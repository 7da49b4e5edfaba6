"""Vocabulary-parallel loss over torch.distributed (gloo, spawned CPU processes): the time of one
shard's whole computation against the single-process kernel on the same columns plus the all-reduces.

    python bench/vocab_parallel.py [--rows 1024] [--classes 128256] [--ranks 2] [--repeats 10]

Each rank runs one Numba thread (the ranks share the machine's cores). Per rank it prints, best of the
repeats: the sharded ``loss_and_grad`` (steps + all-reduces), the split of its time, the unsharded
kernel on this rank's columns alone, and the ratio sharded / (kernel + all-reduces).
"""
from __future__ import annotations

import argparse
import socket
import time


def _rank(rank, world, port, args, queue):  # type: ignore[no-untyped-def]
    import numpy as np
    import torch
    import torch.distributed as dist

    import fastdistill as fd

    fd.set_num_threads(1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    base, extra = divmod(args.classes, world)
    lo = rank * base + min(rank, extra)
    hi = lo + base + (1 if rank < extra else 0)
    rng = np.random.default_rng(rank)
    s = (rng.normal(size=(args.rows, hi - lo)) * 3).astype(np.float32)
    t = (rng.normal(size=(args.rows, hi - lo)) * 3).astype(np.float32)
    labels = np.random.default_rng(99).integers(0, args.classes, size=args.rows)
    labels[::10] = -100
    d = fd.ResponseDistiller.balanced()
    g = np.empty_like(s)
    # the unsharded kernel on this rank's columns, with the same rows counted (labels folded into them)
    local_labels = np.where(labels == -100, -100, labels % (hi - lo))
    best = {"sharded": 1e9, "steps": 1e9, "comm": 1e9, "kernel": 1e9}
    for i in range(args.repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        comm = 0.0
        shard = d.vocab_shard(s, t, labels, class_offset=lo, classes=args.classes, grad_out=g)
        for buf, op in shard.exchanges():
            a = time.perf_counter()
            dist.all_reduce(torch.from_numpy(buf), op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            comm += time.perf_counter() - a
        shard.result()
        total = time.perf_counter() - t0
        dist.barrier()
        a = time.perf_counter()
        d.loss_and_grad(s, t, local_labels, grad_out=g)
        kernel = time.perf_counter() - a
        if i:  # the first round compiles / loads the kernels
            best["sharded"] = min(best["sharded"], total)
            best["comm"] = min(best["comm"], comm)
            best["steps"] = min(best["steps"], total - comm)
            best["kernel"] = min(best["kernel"], kernel)
    queue.put((rank, hi - lo, best))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--classes", type=int, default=128256)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, args.ranks, port, args, queue)) for r in range(args.ranks)]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join()
    print(f"{args.rows} rows x {args.classes} classes over {args.ranks} gloo ranks (1 Numba thread each), "
          f"float32, balanced loss (0.5 CE + 0.5 KL T=4); best of {args.repeats}, ms")
    print("| rank | columns | sharded loss_and_grad | of which kernel steps | of which all-reduces | "
          "kernel on these columns alone | sharded / (kernel + all-reduces) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for rank, width, b in results:
        ms = {k: v * 1e3 for k, v in b.items()}
        print(f"| {rank} | {width} | {ms['sharded']:.2f} | {ms['steps']:.2f} | {ms['comm']:.2f} | {ms['kernel']:.2f} | "
              f"{ms['sharded'] / (ms['kernel'] + ms['comm']):.2f}x |")


if __name__ == "__main__":
    main()

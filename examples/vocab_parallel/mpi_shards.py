"""The framework-agnostic sharded API with mpi4py: each MPI rank holds a contiguous shard of the classes
of the same rows (NumPy arrays), combines the shards' row statistics with ``Allreduce``, and gets the
loss of the whole rows and the gradient of its own columns.

    mpiexec -n 3 python examples/vocab_parallel/mpi_shards.py

Rank 0 prints the loss, the bytes each rank exchanged, and the largest difference from the unsharded
computation of the same batch.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

import fastdistill as fd

ROWS, VOCAB = 512, 32_000


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(0)  # the same batch everywhere; each rank keeps its columns
    student = rng.normal(size=(ROWS, VOCAB)).astype(np.float32) * 3
    teacher = rng.normal(size=(ROWS, VOCAB)).astype(np.float32) * 3
    labels = rng.integers(0, VOCAB, size=ROWS)
    labels[::10] = -100
    base, extra = divmod(VOCAB, world)
    lo = rank * base + min(rank, extra)
    hi = lo + base + (1 if rank < extra else 0)

    distiller = fd.ResponseDistiller(fd.DistilLoss.jsd(beta=0.5, temperature=2.0), 0.5, 0.5)
    shard = distiller.vocab_shard(student[:, lo:hi], teacher[:, lo:hi], labels, class_offset=lo, classes=VOCAB)
    sent = 0
    for buf, op in shard.exchanges():
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX if op == "max" else MPI.SUM)
        sent += buf.nbytes
    loss, grad = shard.result()

    full_loss, full_grad = distiller.loss_and_grad(student, teacher, labels)
    err = comm.reduce(float(np.abs(grad - full_grad[:, lo:hi]).max()), op=MPI.MAX, root=0)
    if rank == 0:
        print(f"{world} ranks, {ROWS} rows x {VOCAB} classes: loss {loss:.7f} (unsharded {full_loss:.7f}); "
              f"{sent} bytes all-reduced per rank ({sent / ROWS:.0f} per row, {shard.rounds} rounds); "
              f"largest gradient difference {err:.2e}")


if __name__ == "__main__":
    main()

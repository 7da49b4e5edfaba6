"""Vocabulary-parallel distillation over torch.distributed: each rank holds a contiguous shard of the
student's and the teacher's output layers (the classes split as in Megatron's tensor parallelism), and
``DistillationLoss(vocab_parallel_group=...)`` computes the loss of the whole rows and each shard's
gradient from a few all-reduced numbers per row.

    torchrun --nproc-per-node 2 examples/vocab_parallel/train.py    # 2 ranks (gloo, CPU)
    python examples/vocab_parallel/train.py                         # 1 process, the whole vocabulary

Both print the same losses, step by step (float64 model; the shards' sums differ only in their order).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from fastdistill.torch import DistillationLoss

VOCAB, D_IN, D_HID, ROWS, STEPS = 1003, 32, 64, 256, 8


def shard_bounds(vocab: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous columns (the first ``vocab % world`` ranks one wider)."""
    base, extra = divmod(vocab, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class ToShards(torch.autograd.Function):
    """Identity forward; backward sums the input's gradient over the ranks (each shard's head sees the
    same hidden states and contributes its part of their gradient)."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[no-untyped-def, override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        if ctx.group is not None:
            grad = grad.clone()
            dist.all_reduce(grad, group=ctx.group)
        return grad, None


def main() -> None:
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    else:
        rank, world, group = 0, 1, None
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)  # every rank draws the same full model and data, then keeps its shard
    lo, hi = shard_bounds(VOCAB, world, rank)
    teacher_body = torch.randn(D_IN, D_HID, generator=g) / D_IN**0.5
    teacher_head = torch.randn(VOCAB, D_HID, generator=g)[lo:hi]
    body = torch.nn.Parameter(torch.randn(D_IN, D_HID, generator=g) / D_IN**0.5)
    head = torch.nn.Parameter(0.1 * torch.randn(VOCAB, D_HID, generator=g)[lo:hi].clone())
    x = torch.randn(ROWS, D_IN, generator=g)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=g)
    labels[::7] = -100  # e.g. padding
    criterion = DistillationLoss(temperature=2.0, hard_label_weight=0.3, soft_label_weight=0.7,
                                 vocab_parallel_group=group)
    optimizer = torch.optim.SGD([body, head], lr=0.5)
    for step in range(STEPS):
        with torch.no_grad():
            teacher_logits = torch.tanh(x @ teacher_body) @ teacher_head.T  # this rank's columns
        hidden = ToShards.apply(torch.tanh(x @ body), group)
        loss = criterion(hidden @ head.T, teacher_logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.10f}  ({world} rank{'s' if world > 1 else ''}, "
                  f"rank 0 holds classes [{lo}, {hi}) of {VOCAB})")
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

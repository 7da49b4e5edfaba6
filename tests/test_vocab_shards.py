"""Losses over a vocabulary split across shards (``ResponseDistiller.vocab_shard``): the shards' results,
combined in-process and over real ``torch.distributed`` process groups (gloo, spawned processes),
equal the unsharded computation (its own float64 reference and the kernels on the whole rows); and
``num_items="global"`` under data parallelism (DDP)."""
from __future__ import annotations

import os
import socket
import sys

import numpy as np
import pytest

import fastdistill as fd

from reference import response_rows

IGNORE = -100

LOSSES = [
    ("kl_divergence", lambda: fd.DistilLoss.kl_divergence(2.0), {}),
    ("kl_divergence", lambda: fd.DistilLoss.kl_divergence(4.0), {}),  # the power variant
    ("kl_divergence", lambda: fd.DistilLoss.kl_divergence(1.0), {}),  # CE sharing the normaliser
    ("reverse_kl", lambda: fd.DistilLoss.reverse_kl(3.0), {}),
    ("jsd", lambda: fd.DistilLoss.jsd(0.3, 2.0), {"param": 0.3}),
    ("skew_kl", lambda: fd.DistilLoss.skew_kl(0.2, 2.0), {"param": 0.2}),
    ("skew_reverse_kl", lambda: fd.DistilLoss.skew_reverse_kl(0.2, 2.0), {"param": 0.2}),
    ("tvd", lambda: fd.DistilLoss.tvd(2.0), {}),
    ("alpha_divergence", lambda: fd.DistilLoss.alpha_divergence(0.3, 2.0), {"param": 0.3}),
    ("mse", lambda: fd.DistilLoss.mse(), {}),
    ("cosine", lambda: fd.DistilLoss.cosine(), {}),
]


def combine_in_process(shards):
    """Run the shards' rounds side by side, combining each with NumPy (what an all-reduce does)."""
    gens = [sh.exchanges() for sh in shards]
    for items in zip(*gens):
        ops = {op for _, op in items}
        assert len(ops) == 1
        bufs = [b for b, _ in items]
        combined = np.max(bufs, axis=0) if ops == {"max"} else np.sum(bufs, axis=0)
        for b in bufs:
            b[...] = combined
    return [sh.result() for sh in shards]


def _batch(rows, classes, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    s = (rng.normal(size=(rows, classes)) * 2).astype(dtype)
    t = (rng.normal(size=(rows, classes)) * 2).astype(dtype)
    y = rng.integers(0, classes, size=rows)
    y[::4] = IGNORE
    return s, t, y


@pytest.mark.parametrize("kind,make,extra", LOSSES)
@pytest.mark.parametrize("cuts", [(0, 13, 31, 50), (0, 1, 50), (0, 25, 50)])
def test_shards_equal_the_whole_rows(kind, make, extra, cuts):
    s, t, y = _batch(11, 50)
    soft = make()
    hard_w = 0.0 if kind in ("mse", "cosine") else 0.4
    d = fd.ResponseDistiller(soft, hard_w, 0.6, label_smoothing=0.1 if hard_w else 0.0)
    ref_rows, keep = response_rows(s, t, y, hard_w, 0.6, kind, soft.temperature, extra.get("param", 0.5),
                                   eps=0.1 if hard_w else 0.0)
    whole_loss, whole_grad = d.loss_and_grad(s, t, y)
    assert whole_loss == pytest.approx(ref_rows[keep].sum() / keep.sum(), rel=1e-10)
    shards = [d.vocab_shard(s[:, a:b], t[:, a:b], y, class_offset=a, classes=50) for a, b in zip(cuts, cuts[1:])]
    assert shards[0].rounds == (3 if kind in ("jsd", "skew_kl", "skew_reverse_kl", "tvd", "alpha_divergence") else 2)
    results = combine_in_process(shards)
    for loss, _ in results:
        assert loss == pytest.approx(whole_loss, rel=1e-12, abs=1e-15)
    grad = np.concatenate([g for _, g in results], axis=1)
    np.testing.assert_allclose(grad, whole_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_num_items_float32_and_no_labels(reduction):
    s, t, y = _batch(7, 40, np.float32, seed=3)
    d = fd.ResponseDistiller.balanced()
    kw = {"num_items": 100.0} if reduction == "mean" else {}
    whole = d.loss_and_grad(s, t, y, reduction=reduction, **kw)
    cuts = (0, 17, 40)
    results = combine_in_process([d.vocab_shard(s[:, a:b], t[:, a:b], y, class_offset=a, classes=40,
                                                 reduction=reduction, **kw) for a, b in zip(cuts, cuts[1:])])
    np.testing.assert_allclose(results[0][0], whole[0], rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([g for _, g in results], axis=1), whole[1], rtol=1e-5, atol=1e-6)  # float32 sums in another order
    pure = fd.ResponseDistiller.pure_kl(3.0)
    loss, _ = pure.loss_and_grad(s, t)
    res = combine_in_process([pure.vocab_shard(s[:, a:b], t[:, a:b], class_offset=a, classes=40, want_grad=False)
                              for a, b in zip(cuts, cuts[1:])])
    assert res[0][0] == pytest.approx(loss, rel=1e-6) and res[0][1] is None


def test_long_shards_leading_dims_and_grad_out():
    # shards wider than a chunk (their rows are processed in column chunks), (B, T, V) inputs
    s, t, y = _batch(6, 40_000, seed=5)
    d = fd.ResponseDistiller(fd.DistilLoss.jsd(0.5, 2.0), 0.5, 0.5)
    whole_loss, whole_grad = d.loss_and_grad(s, t, y)
    cuts = (0, 17_001, 40_000)
    bufs = [np.empty((2, 3, b - a)) for a, b in zip(cuts, cuts[1:])]
    shards = [d.vocab_shard(s[:, a:b].reshape(2, 3, -1), t[:, a:b].reshape(2, 3, -1), y.reshape(2, 3),
                            class_offset=a, classes=40_000, grad_out=buf) for (a, b), buf in zip(zip(cuts, cuts[1:]), bufs)]
    results = combine_in_process(shards)
    assert results[0][0] == pytest.approx(whole_loss, rel=1e-12)
    assert results[0][1] is bufs[0]
    np.testing.assert_allclose(np.concatenate(bufs, axis=-1).reshape(6, -1), whole_grad, rtol=1e-10, atol=1e-15)


def test_bad_shards_are_refused():
    s, t, y = _batch(4, 30)
    d = fd.ResponseDistiller.balanced()
    with pytest.raises(fd.DimensionMismatchError, match=r"columns \[20, 35\) do not lie in the 30 classes"):
        d.vocab_shard(s[:, :15], t[:, :15], y, class_offset=20, classes=30)
    with pytest.raises(fd.LabelOutOfRangeError, match="out of range for 30 classes"):
        d.vocab_shard(s[:, :15], t[:, :15], np.full(4, 30), class_offset=0, classes=30)
    with pytest.raises(fd.TeacherStudentMismatchError):
        d.vocab_shard(s[:, :15], t[:, :14], y, class_offset=0, classes=30)
    sh = d.vocab_shard(s[:, :15], t[:, :15], y, class_offset=0, classes=30)
    with pytest.raises(fd.InvalidParameterError, match="needs all 2 exchanges combined first"):
        sh.result()


# ------------------------------------------------------------------ real process groups


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(target, world, cuts):
    """``target(rank, world, port, cuts, queue)`` in ``world`` spawned processes: {rank: what it put}."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, cuts, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=240) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def _rank_main(rank, world, port, cuts, queue):  # runs in a spawned process
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s, t, y = _batch(10, cuts[-1], seed=11)
        a, b = cuts[rank], cuts[rank + 1]
        out = {}
        for name, soft in (("kl", fd.DistilLoss.kl_divergence(2.0)), ("jsd", fd.DistilLoss.jsd(0.5, 2.0))):
            d = fd.ResponseDistiller(soft, 0.5, 0.5)
            shard = d.vocab_shard(s[:, a:b], t[:, a:b], y, class_offset=a, classes=cuts[-1])
            for buf, op in shard.exchanges():
                dist.all_reduce(torch.from_numpy(buf), op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            out[name] = shard.result()
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cuts", [(0, 23, 64), (0, 5, 40, 64)])
def test_torch_distributed_gloo_ranks(cuts):
    pytest.importorskip("torch")
    world = len(cuts) - 1
    results = _run_ranks(_rank_main, world, cuts)
    s, t, y = _batch(10, cuts[-1], seed=11)
    for name, soft in (("kl", fd.DistilLoss.kl_divergence(2.0)), ("jsd", fd.DistilLoss.jsd(0.5, 2.0))):
        loss, grad = fd.ResponseDistiller(soft, 0.5, 0.5).loss_and_grad(s, t, y)
        for r in range(world):
            assert results[r][name][0] == pytest.approx(loss, rel=1e-10)
            np.testing.assert_allclose(results[r][name][1], grad[:, cuts[r]:cuts[r + 1]], rtol=1e-10, atol=1e-15)


def _module_rank_main(rank, world, port, cuts, queue):  # runs in a spawned process
    import torch
    import torch.distributed as dist

    from fastdistill.torch import DistillationLoss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s, t, y = _batch(12, cuts[-1], seed=13)
        a, b = cuts[rank], cuts[rank + 1]
        out = {}
        for soft in ("kl_divergence", "jsd", "tvd"):
            crit = DistillationLoss(temperature=2.0, soft_loss=soft, label_smoothing=0.05,
                                    vocab_parallel_group=dist.group.WORLD)
            x = torch.tensor(s[:, a:b].reshape(3, 4, -1), requires_grad=True)
            loss = crit(x, torch.tensor(t[:, a:b].reshape(3, 4, -1)), torch.tensor(y.reshape(3, 4)))
            (2.0 * loss).backward()
            out[soft] = (loss.item(), x.grad.reshape(12, -1).numpy().copy())
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cuts", [(0, 30, 57), (0, 9, 33, 57)])
def test_distillation_loss_over_a_vocab_parallel_group(cuts):
    torch = pytest.importorskip("torch")
    from fastdistill.torch import DistillationLoss

    world = len(cuts) - 1
    results = _run_ranks(_module_rank_main, world, cuts)
    s, t, y = _batch(12, cuts[-1], seed=13)
    for soft in ("kl_divergence", "jsd", "tvd"):
        x = torch.tensor(s, requires_grad=True)
        loss = DistillationLoss(temperature=2.0, soft_loss=soft, label_smoothing=0.05)(x, torch.tensor(t), torch.tensor(y))
        (2.0 * loss).backward()
        for r in range(world):
            got_loss, got_grad = results[r][soft]
            assert got_loss == pytest.approx(loss.item(), rel=1e-10)
            np.testing.assert_allclose(got_grad, x.grad.numpy()[:, cuts[r]:cuts[r + 1]], rtol=1e-10, atol=1e-15)


def test_shard_inputs_must_be_float_arrays():
    d = fd.ResponseDistiller.balanced()
    with pytest.raises(TypeError, match="student must hold float32, float64, float16 or bfloat16 logits, got dtype int32"):
        d.vocab_shard(np.zeros((2, 3), np.int32), np.zeros((2, 3)), None, class_offset=0, classes=3)


@pytest.mark.parametrize("shift", [0.0, -1000.0])  # -1000: a masked shard's reference (0) far above the maxima
@pytest.mark.parametrize("kind,make,extra", [LOSSES[0], LOSSES[2], LOSSES[3], LOSSES[4], LOSSES[7]])
def test_masked_classes_and_a_shard_masked_whole(kind, make, extra, shift):
    s, t, y = _batch(8, 40, seed=21)
    s += shift
    t += shift
    rng = np.random.default_rng(2)
    mask = rng.random((8, 40)) < 0.2
    mask[:, 10:20] = True  # the middle shard masked whole in every row
    mask[np.arange(8), np.where(y >= 0, y, 0)] = False  # (a label's class is never masked)
    s[mask] = -np.inf
    t[mask] = -np.inf
    d = fd.ResponseDistiller(make(), 0.4, 0.6)
    whole_loss, whole_grad = d.loss_and_grad(s, t, y)
    assert np.isfinite(whole_loss)
    cuts = (0, 10, 20, 40)
    results = combine_in_process([d.vocab_shard(s[:, a:b], t[:, a:b], y, class_offset=a, classes=40)
                                  for a, b in zip(cuts, cuts[1:])])
    assert results[0][0] == pytest.approx(whole_loss, rel=1e-12)
    grad = np.concatenate([g for _, g in results], axis=1)
    np.testing.assert_allclose(grad, whole_grad, rtol=1e-10, atol=1e-14)
    assert (grad[mask] == 0).all()


def _compiled_rank_main(rank, world, port, cuts, queue):  # runs in a spawned process
    import torch
    import torch.distributed as dist

    from fastdistill.torch import DistillationLoss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s, t, y = _batch(6, cuts[-1], seed=17)
        a, b = cuts[rank], cuts[rank + 1]
        crit = DistillationLoss(temperature=2.0, vocab_parallel_group=dist.group.WORLD)
        w = torch.ones(b - a, dtype=torch.float64, requires_grad=True)
        step = torch.compile(lambda x, tt, yy: crit(x * w, tt, yy), fullgraph=True)
        loss = step(torch.tensor(s[:, a:b]), torch.tensor(t[:, a:b]), torch.tensor(y))
        loss.backward()
        queue.put((rank, (loss.item(), w.grad.numpy().copy())))
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_under_torch_compile():
    torch = pytest.importorskip("torch")
    from fastdistill.torch import DistillationLoss

    cuts = (0, 11, 29)
    results = _run_ranks(_compiled_rank_main, 2, cuts)
    s, t, y = _batch(6, 29, seed=17)
    w = torch.ones(29, dtype=torch.float64, requires_grad=True)
    loss = DistillationLoss(temperature=2.0)(torch.tensor(s) * w, torch.tensor(t), torch.tensor(y))
    loss.backward()
    for r in range(2):
        assert results[r][0] == pytest.approx(loss.item(), rel=1e-10)
        np.testing.assert_allclose(results[r][1], w.grad.numpy()[cuts[r]:cuts[r + 1]], rtol=1e-9, atol=1e-13)


# ------------------------------------------------------------------ data parallelism


def _ddp_rank_main(rank, world, port, cuts, queue):  # runs in a spawned process; cuts: row ranges here
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from fastdistill.torch import DistillationLoss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, t, y = _ddp_batch()
        torch.manual_seed(0)
        model = DistributedDataParallel(torch.nn.Linear(6, 9).double())
        a, b = cuts[rank], cuts[rank + 1]
        crit = DistillationLoss(temperature=2.0)
        loss = crit(model(x[a:b]), t[a:b], y[a:b], num_items="global")
        (world * loss).backward()  # DDP averages the ranks' gradients
        total = loss.detach().clone()
        dist.all_reduce(total)
        queue.put((rank, (total.item(), model.module.weight.grad.numpy().copy())))
    finally:
        dist.destroy_process_group()


def _ddp_batch():
    import torch

    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    t = 2 * torch.randn(10, 9, generator=g, dtype=torch.float64)
    y = torch.randint(0, 9, (10,), generator=g)
    y[[1, 2, 7]] = IGNORE  # the ranks count different numbers of rows
    return x, t, y


def test_num_items_global_under_ddp():
    torch = pytest.importorskip("torch")
    from fastdistill.torch import DistillationLoss

    results = _run_ranks(_ddp_rank_main, 2, (0, 4, 10))
    x, t, y = _ddp_batch()
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 9).double()
    loss = DistillationLoss(temperature=2.0)(model(x), t, y)  # the mean over every counted row
    loss.backward()
    for r in range(2):
        total, grad = results[r]
        assert total == pytest.approx(loss.item(), rel=1e-12)  # the ranks' parts add up to the global mean
        np.testing.assert_allclose(grad, model.weight.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_num_items_global_needs_a_process_group():
    pytest.importorskip("torch")
    from fastdistill.torch import DistillationLoss

    x, t, y = _ddp_batch()
    with pytest.raises(fd.InvalidParameterError, match="needs an initialised torch.distributed process group"):
        DistillationLoss()(x, t, y, num_items="global")
    with pytest.raises(fd.InvalidParameterError, match="num_items must be a number, a tensor or 'global'"):
        DistillationLoss()(x, t, y, num_items="local")

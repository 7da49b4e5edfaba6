"""Vocabulary shards that do not tile the row, or whose rounds are used out of order, are refused.

Shards that overlap, leave a gap, carry a wrong or swapped ``class_offset`` or disagree on ``classes``
used to give a wrong loss without an error; so did rounds read back before they were combined
(``list(shard.exchanges())``, never combining, ``result()`` before the last round was combined). Each
round's buffer now carries a few check entries after its rows (``fastdistill._shard_check``) that the
step reading the combined buffer compares with those of the whole row, on every shard: the NumPy API
on the CPU, on the GPU (CUDA simulator), over torch.distributed (gloo), and the C ABI
(``fd_vocab_shard_f64`` through ctypes). Correct shards still equal an independent float64 reference.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastdistill as fd
from fastdistill import _shard_check as SC
from reference import response_rows

IGNORE = -100
HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
IN_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" and os.environ.get("NUMBA_FASTDISTILL_ALLOW_SIM") == "1"
sim = pytest.mark.skipif(not IN_SIM, reason="runs inside the simulator subprocess (test_simulator_cases)")
not_sim = pytest.mark.skipif(IN_SIM, reason="the CPU cases run in the ordinary process")


def _batch(rows, classes, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(rows, classes)) * 2
    t = rng.normal(size=(rows, classes)) * 2
    y = rng.integers(0, classes, size=rows)
    y[::3] = IGNORE
    return s, t, y


def _reference(s, t, y, kind="kl_divergence", T=2.0, hard_w=0.5, soft_w=0.5, param=0.5):
    rows, keep = response_rows(s, t, y, hard_w, soft_w, kind, T, param)
    return rows[keep].sum() / keep.sum()


def _distiller(kind="kl"):
    soft = fd.DistilLoss.kl_divergence(2.0) if kind == "kl" else fd.DistilLoss.jsd(0.5, 2.0)
    return fd.ResponseDistiller(soft, 0.5, 0.5)


def _combine(items):
    """What an all-reduce does to one round's buffers (in place)."""
    bufs = [np.asarray(b) for b, _ in items]
    op = items[0][1]
    assert all(o == op for _, o in items)
    both = np.max(bufs, axis=0) if op == "max" else np.sum(bufs, axis=0)
    for b in bufs:
        b[...] = both


def _drive(shards, combine=_combine):
    """Every shard's rounds side by side, each round combined across the shards; a shard whose step
    raises is left there. Returns ([result or the exception] per shard, the round each one raised in)."""
    gens = [sh.exchanges() for sh in shards]
    out: list = [None] * len(shards)
    where: list = [None] * len(shards)
    items = [next(g) for g in gens]
    rnd = 1
    while True:
        combine(items)
        rnd += 1
        nxt = []
        for i, g in enumerate(gens):
            try:
                nxt.append(next(g))
            except StopIteration:
                nxt.append(None)
            except fd.FastDistillError as e:
                out[i], where[i] = e, rnd
                nxt.append(None)
        if any(x is None for x in nxt):
            break
        items = nxt
    for i, sh in enumerate(shards):
        if out[i] is None:
            try:
                out[i] = sh.result()
            except fd.FastDistillError as e:
                out[i], where[i] = e, "result"
    return out, where


def _shards(d, s, t, y, spec, **kw):
    """``spec``: (first column of the data, last column, class_offset claimed, classes claimed) per shard."""
    return [d.vocab_shard(np.ascontiguousarray(s[:, a:b]), np.ascontiguousarray(t[:, a:b]), y, class_offset=off,
                          classes=n, **kw) for a, b, off, n in spec]


# ------------------------------------------------------------------ issue 11: shards that do not tile


# (data columns, claimed offset, claimed classes) of each shard of a 50-class row; the round whose
# combined check fails; DimensionMismatchError's (expected, got)
BAD_TILINGS = {
    "overlap": ([(0, 30, 0, 50), (25, 50, 25, 50)], "sum", (50, 55)),
    "gap": ([(0, 20, 0, 50), (25, 50, 25, 50)], "sum", (50, 45)),
    # ranks that swapped their offsets: [20, 40) and [0, 30)
    "offsets swapped": ([(0, 20, 20, 50), (20, 50, 0, 50)], "max", (50, 40)),
    "offset one too high": ([(0, 20, 1, 50), (20, 50, 20, 50)], "max", (0, 1)),
    "offset one too low": ([(0, 20, 0, 50), (20, 50, 19, 50)], "max", (50, 49)),
    "classes disagree": ([(0, 20, 0, 50), (20, 50, 20, 51)], "max", None),
    "five shards matching the moments": ([(0, 1, 0, 9), (1, 4, 2, 9), (4, 6, 2, 9), (6, 8, 7, 9), (8, 9, 7, 9)],
                                         "sum", None),
}
# (shards whose columns are given in another order but still tile the row, e.g. [0, 20) claiming
# [30, 50) and [20, 50) claiming [0, 30), are a correct sharding of a permuted vocabulary: no check on
# the shards' places can tell them apart.)


@not_sim
@pytest.mark.parametrize("case", list(BAD_TILINGS))
def test_shards_that_do_not_tile_the_row_are_refused_on_every_shard(case):
    spec, rnd, eg = BAD_TILINGS[case]
    classes = 9 if "five" in case else 50
    s, t, y = _batch(7, classes, seed=1)
    d = _distiller()
    out, where = _drive(_shards(d, s, t, y, spec))
    for e, w in zip(out, where):  # every shard: the same error, from the step reading the bad round
        assert isinstance(e, fd.DimensionMismatchError) and not isinstance(e, fd.LabelOutOfRangeError), e
        assert f"round {1 if rnd == 'max' else 2} of 2" in str(e)
        assert w == (2 if rnd == "max" else "result")
        assert type(e) is type(out[0])
    for e, (a, b, off, n) in zip(out, spec):
        assert f"[{off}, {off + b - a})" in str(e)  # each names its own columns
    if case != "classes disagree":
        assert len({(e.expected, e.got) for e in out}) == 1
    if eg is not None:
        assert (out[0].expected, out[0].got) == eg
    if case == "classes disagree":
        assert "classes=50" in str(out[0]) and "51" in str(out[0])
        assert (out[0].expected, out[1].expected) == (50, 51)  # each shard's own against the other's
    if case == "overlap":
        assert "add up to 55" in str(out[0]) and "columns [0, 30)" in str(out[0])
        assert "columns [25, 50)" in str(out[1])


@not_sim
def test_shards_that_tile_the_row_equal_the_float64_reference():
    s, t, y = _batch(7, 50, seed=2)
    want = _reference(s, t, y)
    for cuts in ((0, 50), (0, 20, 50), (0, 1, 2, 30, 49, 50)):
        d = _distiller()
        out, where = _drive(_shards(d, s, t, y, [(a, b, a, 50) for a, b in zip(cuts, cuts[1:])]))
        assert where == [None] * (len(cuts) - 1)
        for loss, _ in out:
            assert loss == pytest.approx(want, rel=1e-12)
    # the jsd's three rounds, against its float64 reference
    want = _reference(s, t, y, kind="jsd")
    out, _ = _drive(_shards(_distiller("jsd"), s, t, y, [(0, 17, 0, 50), (17, 50, 17, 50)]))
    assert [loss for loss, _ in out] == pytest.approx([want, want], rel=1e-12)


@not_sim
def test_round_layout():
    s, t, y = _batch(4, 50, seed=3)
    sh = _distiller("jsd").vocab_shard(s[:, 10:30], t[:, 10:30], y, class_offset=10, classes=50)
    gen = sh.exchanges()
    buf, op = next(gen)
    assert op == "max" and buf.shape == (4 + 3, 2) and buf.flags.c_contiguous and buf.dtype == np.float64
    # end, -offset; offset, -end; classes, -classes
    np.testing.assert_array_equal(buf[4:], [[30.0, -10.0], [10.0, -30.0], [50.0, -50.0]])
    # the sums round: width, sum of ids, sum of squared ids, the boundaries' hash; 0 after them
    ids = np.arange(10, 30, dtype=np.float64)
    h = float(SC.boundary_hash(30) - SC.boundary_hash(10))
    d_whole = _distiller("jsd").vocab_shard(s, t, y, class_offset=0, classes=50)
    gen_w = d_whole.exchanges()
    next(gen_w)
    bw2, op2 = next(gen_w)
    assert op2 == "sum" and bw2.shape == (5, 12)
    all_ids = np.arange(50, dtype=np.float64)
    np.testing.assert_array_equal(bw2[4], [50, all_ids.sum(), (all_ids ** 2).sum(),
                                           float(SC.boundary_hash(50) - SC.boundary_hash(0))] + [0.0] * 8)
    bw3, op3 = next(gen_w)
    assert op3 == "sum" and bw3.shape == (5, 2)
    np.testing.assert_array_equal(bw3[4], [50, 0])
    loss, _ = d_whole.result()
    assert loss == pytest.approx(_reference(s, t, y, kind="jsd"), rel=1e-12)
    assert SC.entries(SC.ROUND_SUM, 10, 20, 50).tolist() == [20, ids.sum(), (ids ** 2).sum(), h]


@not_sim
def test_check_entry_bounds_and_the_hash_are_exact_integers():
    n = SC.SQUARES_EXACT
    assert (n - 1) * n * (2 * n - 1) // 6 < 2 ** 53 <= n * (n + 1) * (2 * n + 1) // 6
    n = SC.IDS_EXACT
    assert n * (n - 1) // 2 < 2 ** 53 <= (n + 1) * n // 2
    # past the squares' bound the entry is 0 on every shard and not compared; the rest still is
    e = SC.entries(SC.ROUND_SUM, 100_000, 250_000, SC.SQUARES_EXACT + 1)
    assert e[2] == 0.0 and e[0] == 250_000 and e[1] == sum(range(100_000, 350_000))
    assert SC.combined_ok(SC.ROUND_SUM, SC.entries(SC.ROUND_SUM, 0, 400_000, 400_000), 400_000)
    mask = (1 << 64) - 1

    def splitmix(x):  # the same finaliser in Python integers
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return (z ^ (z >> 31)) >> 38

    for x in (0, 1, 2, 9, 50, 128_256, 2 ** 26, 2 ** 40 + 3):
        assert SC.boundary_hash(x) == splitmix(x) < 2 ** 26


# ------------------------------------------------------------------ issue 12: rounds out of order


@not_sim
@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_taking_every_round_before_combining_is_refused(kind):
    s, t, y = _batch(6, 40, seed=4)
    d = _distiller(kind)
    for a, b in ((0, 15), (15, 40)):
        sh = d.vocab_shard(s[:, a:b], t[:, a:b], y, class_offset=a, classes=40)
        with pytest.raises(fd.InvalidParameterError, match=r"round 1 of \d \('max'\) was not combined"):
            list(sh.exchanges())


@not_sim
def test_never_combining_is_refused_on_every_shard():
    s, t, y = _batch(6, 40, seed=5)
    d = _distiller()
    errors = []
    for a, b in ((0, 15), (15, 40)):
        sh = d.vocab_shard(s[:, a:b], t[:, a:b], y, class_offset=a, classes=40)
        with pytest.raises(fd.InvalidParameterError) as ei:
            for _ in sh.exchanges():
                pass
            sh.result()
        errors.append(str(ei.value))
    assert f"columns [0, 15) of 40" in errors[0] and "columns [15, 40) of 40" in errors[1]


@not_sim
@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_result_before_the_last_round_was_combined_is_refused(kind):
    s, t, y = _batch(6, 40, seed=6)
    d = _distiller(kind)
    shards = [d.vocab_shard(s[:, a:b], t[:, a:b], y, class_offset=a, classes=40) for a, b in ((0, 15), (15, 40))]
    gens = [sh.exchanges() for sh in shards]
    rounds = shards[0].rounds
    for _ in range(rounds - 1):  # every round but the last combined
        _combine([next(g) for g in gens])
    last = [next(g) for g in gens]  # the last one taken, not combined
    for sh in shards:
        with pytest.raises(fd.InvalidParameterError, match=rf"round {rounds} of {rounds} \('sum'\) was not combined"):
            sh.result()
    # taken but not all: the count says so
    sh = d.vocab_shard(s[:, :15], t[:, :15], y, class_offset=0, classes=40)
    g = sh.exchanges()
    next(g)
    with pytest.raises(fd.InvalidParameterError, match=f"needs all {rounds} exchanges combined first"):
        sh.result()
    assert last  # (kept alive)


@not_sim
def test_a_round_combined_twice_is_refused():
    s, t, y = _batch(6, 40, seed=7)
    d = _distiller()

    def twice(items):
        _combine(items)
        if items[0][1] == "sum":
            _combine(items)

    out, where = _drive([d.vocab_shard(s[:, a:b], t[:, a:b], y, class_offset=a, classes=40)
                         for a, b in ((0, 15), (15, 40))], combine=twice)
    for e in out:
        assert isinstance(e, fd.DimensionMismatchError) and (e.expected, e.got) == (40, 80)
        assert "combined more than once" in str(e)


@not_sim
def test_one_shard_holding_the_whole_row_needs_no_combining():
    s, t, y = _batch(6, 40, seed=8)
    sh = _distiller("jsd").vocab_shard(s, t, y, class_offset=0, classes=40)
    assert len(list(sh.exchanges())) == 3  # combining one shard is the identity
    assert sh.result()[0] == pytest.approx(_reference(s, t, y, kind="jsd"), rel=1e-12)


# ------------------------------------------------------------------ torch.distributed (gloo)


def _gloo_rank(rank, world, port, specs, queue):  # runs in a spawned process
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {}
        for name, spec in specs.items():
            s, t, y = _batch(5, 50, seed=9)
            a, b, off, n = spec[rank]
            sh = _distiller().vocab_shard(np.ascontiguousarray(s[:, a:b]), np.ascontiguousarray(t[:, a:b]), y,
                                          class_offset=off, classes=n)
            try:
                for buf, op in sh.exchanges():
                    dist.all_reduce(torch.from_numpy(buf), op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
                out[name] = ("ok", sh.result()[0])
            except fd.FastDistillError as e:
                out[name] = (type(e).__name__, str(e))
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


@not_sim
def test_torch_distributed_ranks_refuse_a_bad_tiling_together():
    pytest.importorskip("torch")
    from test_vocab_shards import _run_ranks

    specs = {"good": [(0, 23, 0, 50), (23, 50, 23, 50)],
             "overlap": [(0, 23, 0, 50), (23, 50, 22, 50)],  # rank 1 one column early: [22, 49)
             "classes": [(0, 23, 0, 50), (23, 50, 23, 51)]}
    results = _run_ranks(_gloo_rank, 2, specs)
    s, t, y = _batch(5, 50, seed=9)
    want = _reference(s, t, y)
    for r in range(2):
        assert results[r]["good"][0] == "ok" and results[r]["good"][1] == pytest.approx(want, rel=1e-12)
        assert results[r]["overlap"][0] == "DimensionMismatchError" and "round 1 of 2" in results[r]["overlap"][1]
        err, msg = results[r]["classes"]
        assert err == "DimensionMismatchError" and "disagree on classes" in msg


# ------------------------------------------------------------------ the C ABI


_SHARD_FN = ctypes.CFUNCTYPE(
    ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32, ctypes.c_double, ctypes.c_double,
    ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p,
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)


@pytest.fixture(scope="module")
def c_shard():
    from fastdistill import capi

    return _SHARD_FN(capi.symbols("f64")["fd_vocab_shard_f64"])


def _c_drive(fn, s, t, y, spec, kind, combine=True):
    """fd_vocab_shard_f64 per shard, each step's request combined across the shards (when ``combine``):
    (statuses of the last step, the step, losses, requests seen)."""
    from fastdistill import capi

    rows = s.shape[0]
    parts = [(np.ascontiguousarray(s[:, a:b]), np.ascontiguousarray(t[:, a:b]), off, n) for a, b, off, n in spec]
    works = [np.full(rows * capi.FD_SHARD_WORK, np.nan) for _ in parts]
    reqs = [np.zeros(2, dtype=np.int64) for _ in parts]
    losses = [np.full(1, -7.0) for _ in parts]
    grads = [np.full_like(p[0], -7.0) for p in parts]
    seen = []
    for step in range(5):
        sts = [fn(step, ps.ctypes.data, pt.ctypes.data, y.ctypes.data, rows, ps.shape[1], off, n, kind, 2.0, 0.5,
                  0.5, 0.5, 0.0, IGNORE, capi.FD_MEAN, w.ctypes.data, q.ctypes.data, lo.ctypes.data, g.ctypes.data, 0)
               for (ps, pt, off, n), w, q, lo, g in zip(parts, works, reqs, losses, grads)]
        if any(st != capi.FD_OK for st in sts):
            return sts, step, losses, seen
        count, op = reqs[0]
        if op == capi.FD_SHARD_DONE:
            return sts, step, losses, seen
        seen.append((int(count), int(op)))
        if combine:
            both = (np.maximum.reduce if op == capi.FD_SHARD_MAX else np.add.reduce)([w[:count] for w in works])
            for w in works:
                w[:count] = both
    raise AssertionError("no FD_SHARD_DONE")


@not_sim
@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_c_shards_refuse_what_the_numpy_api_refuses(c_shard, kind):
    from fastdistill import capi

    s, t, y = _batch(7, 50, seed=10)
    y = y.astype(np.int64)
    code = capi.FD_KL if kind == "kl" else capi.FD_JSD
    want = _reference(s, t, y, "kl_divergence" if kind == "kl" else "jsd")
    sts, step, losses, seen = _c_drive(c_shard, s, t, y, [(0, 20, 0, 50), (20, 50, 20, 50)], code)
    assert sts == [capi.FD_OK] * 2 and all(lo[0] == pytest.approx(want, rel=1e-12) for lo in losses)
    # a few doubles per row and a fixed few per round: 6 (max), 4 (sum), 1 (the second sums)
    assert seen == [(7 * 2 + 6, capi.FD_SHARD_MAX), (7 * 12 + 4, capi.FD_SHARD_SUM)] + (
        [(7 * 2 + 1, capi.FD_SHARD_SUM)] if kind == "jsd" else [])
    for case, (spec, rnd, _) in BAD_TILINGS.items():
        if "five" in case:
            continue
        sts, step, losses, _ = _c_drive(c_shard, s, t, y, spec, code)
        assert sts == [capi.FD_BAD_SHAPE] * 2, case  # every shard, at the step reading the bad round
        assert step == (1 if rnd == "max" else 2), case
        assert all(lo[0] == -7.0 for lo in losses)  # nothing written
    s9, t9, y9 = _batch(7, 9, seed=11)
    y9 = np.where(y9 == IGNORE, IGNORE, y9 % 9).astype(np.int64)
    sts, step, _, _ = _c_drive(c_shard, s9, t9, y9, BAD_TILINGS["five shards matching the moments"][0], code)
    assert sts == [capi.FD_BAD_SHAPE] * 5 and step == 2
    # never combined: refused at the step after the first round
    sts, step, _, _ = _c_drive(c_shard, s, t, y, [(0, 20, 0, 50), (20, 50, 20, 50)], code, combine=False)
    assert sts == [capi.FD_BAD_SHAPE] * 2 and step == 1
    # one shard of the whole row: nothing to combine
    sts, _, losses, _ = _c_drive(c_shard, s, t, y, [(0, 50, 0, 50)], code, combine=False)
    assert sts == [capi.FD_OK] and losses[0][0] == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------ the GPU (CUDA simulator)


@not_sim
def test_simulator_cases():
    import importlib.util

    if importlib.util.find_spec("numba_cuda") is None and importlib.util.find_spec("numba.cuda") is None:
        pytest.skip("numba-cuda is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "NUMBA_FASTDISTILL_ALLOW_SIM")}
    env.update({"NUMBA_ENABLE_CUDASIM": "1", "NUMBA_FASTDISTILL_ALLOW_SIM": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE.parent), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(HERE)], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


@sim
@pytest.mark.parametrize("case", ["overlap", "gap", "offset one too high", "classes disagree"])
def test_gpu_shards_that_do_not_tile_are_refused(case):
    spec, rnd, eg = BAD_TILINGS[case]
    s, t, y = _batch(5, 50, seed=12)
    out, where = _drive(_shards(_distiller(), s, t, y, spec, backend="cuda"))
    for e, w in zip(out, where):
        assert isinstance(e, fd.DimensionMismatchError), e
        assert f"round {1 if rnd == 'max' else 2} of 2" in str(e)
        assert w == (2 if rnd == "max" else "result")
    if eg is not None:
        assert (out[0].expected, out[0].got) == eg


@sim
@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_gpu_shards_of_device_arrays_check_every_round(kind):
    from numba import cuda

    s, t, y = _batch(5, 40, seed=13)
    d = _distiller(kind)
    want = _reference(s, t, y, "kl_divergence" if kind == "kl" else "jsd")

    def dev_shards(spec):
        return [d.vocab_shard(cuda.to_device(np.ascontiguousarray(s[:, a:b])),
                              cuda.to_device(np.ascontiguousarray(t[:, a:b])), cuda.to_device(y), class_offset=off,
                              classes=n, backend="cuda") for a, b, off, n in spec]

    def on_device(items):  # device buffers: combined through host copies
        bufs = [b.copy_to_host() for b, _ in items]
        both = np.max(bufs, axis=0) if items[0][1] == "max" else np.sum(bufs, axis=0)
        for b, _ in items:
            b.copy_to_device(both)

    good = [(0, 15, 0, 40), (15, 40, 15, 40)]
    out, where = _drive(dev_shards(good), combine=on_device)
    assert where == [None, None] and all(loss == pytest.approx(want, rel=1e-10) for loss, _ in out)
    # every round taken before any was combined, then all combined: round 1 was read uncombined
    shards = dev_shards(good)
    rounds = [list(sh.exchanges()) for sh in shards]
    for items in zip(*rounds):
        on_device(list(items))
    for sh in shards:
        with pytest.raises(fd.InvalidParameterError, match=r"round 1 of \d \('max'\) was not combined"):
            sh.result()
    # the last round not combined
    shards = dev_shards(good)
    gens = [sh.exchanges() for sh in shards]
    for _ in range(shards[0].rounds - 1):
        on_device([next(g) for g in gens])
    [next(g) for g in gens]
    for sh in shards:
        with pytest.raises(fd.InvalidParameterError, match="was not combined"):
            sh.result()
    # an overlap, combined on the device
    out, where = _drive(dev_shards([(0, 20, 0, 40), (15, 40, 15, 40)]), combine=on_device)
    assert all(isinstance(e, fd.DimensionMismatchError) and (e.expected, e.got) == (40, 45) for e in out)
    assert where == ["result", "result"]


@sim
def test_gpu_round_layout_host_arrays():
    s, t, y = _batch(4, 30, seed=14)
    sh = _distiller("jsd").vocab_shard(s, t, y, class_offset=0, classes=30, backend="cuda")
    shapes = [np.asarray(b).shape for b, _ in sh.exchanges()]
    assert shapes == [(4 + 3, 2), (4 + 1, 11), (4 + 1, 2)]
    assert sh.result()[0] == pytest.approx(_reference(s, t, y, kind="jsd"), rel=1e-10)

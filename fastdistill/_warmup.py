"""Compile kernel variants before a job needs them: ``fastdistill.warmup(...)`` and ``fastdistill warmup``.

A kernel variant compiles in about a second on a cold cache and loads from Numba's on-disk cache in
milliseconds afterwards. A job that will call a handful of losses can pay that up front (at install
time, in a container build, before a training loop starts timing); ``jobs > 1`` compiles in that many
processes side by side, writing the same on-disk cache the job then loads from.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from ._spec import STORAGES, Variant, reachable, resolve

DTYPES = STORAGES


class Compiled(NamedTuple):
    """One variant compiled (or loaded from the cache) and the seconds it took."""

    variant: Variant
    seconds: float


def variants_for(losses: Iterable[Any] = (), dtypes: Sequence[str] = DTYPES) -> list[Variant]:
    """The kernel variants that ``losses`` (``DistilLoss`` or ``ResponseDistiller`` objects) run on student
    and teacher logits of one of ``dtypes``, with and without labels where that changes the variant;
    every such variant of the table when ``losses`` is empty."""
    from .distillers import ResponseDistiller
    from .losses import DistilLoss

    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtypes must be among {DTYPES}, got {d!r}")
    losses = list(losses)
    if not losses:
        return [v for v in reachable() if v.dtype in dtypes and not (v.teacher or v.grad)]
    out: dict[Variant, None] = {}
    for loss in losses:
        if isinstance(loss, DistilLoss):
            cases = [(loss.terms(), False)]
        elif isinstance(loss, ResponseDistiller):
            terms = loss.terms()
            cases = [(terms, True)] if loss.hard_label_weight != 0.0 else [(terms, False), (terms, True)]
        else:
            raise TypeError(f"losses must be DistilLoss or ResponseDistiller objects, got {type(loss).__name__}")
        for terms, labels in cases:
            for d in dtypes:
                out[resolve(terms, labels, d)] = None
    return list(out)


def _compile(variants: Sequence[Variant], in_place: bool = False) -> list[Compiled]:
    """Each variant's worker (``in_place``: and its in-place worker), with the seconds both took."""
    from .cpu import _kernels as K

    done = []
    for v in variants:
        t0 = time.perf_counter()
        K.worker(v)
        if in_place:
            K.worker(v, True)
        done.append(Compiled(v, time.perf_counter() - t0))
    return done


def _compile_in_child(indices: Sequence[int], in_place: bool = False) -> list[tuple[int, float]]:
    """(A child process.) Compile the variants at ``indices`` of ``reachable()``, cache writes serialised."""
    _serialise_cache_writes()
    table = reachable()
    return [(table.index(c.variant), c.seconds) for c in _compile([table[i] for i in indices], in_place)]


def _serialise_cache_writes() -> None:
    """Make Numba's on-disk cache safe for processes compiling side by side.

    A function's cache is one index file (key -> data file) plus its data files; Numba reads the index,
    picks a free data-file name and writes both without a lock, so two processes adding entries to the
    same function's cache at once can lose an entry, or give two keys the same data file. An exclusive
    ``flock`` around each save serialises them (only the processes of one warm-up take it).
    """
    import fcntl

    from numba.core import caching

    save = caching.IndexDataCacheFile.save
    if getattr(save, "_fastdistill_locked", False):
        return

    def locked_save(self, key, data):  # type: ignore[no-untyped-def]
        os.makedirs(self._cache_path, exist_ok=True)
        with open(os.path.join(self._cache_path, ".fastdistill-warmup.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return save(self, key, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    locked_save._fastdistill_locked = True  # type: ignore[attr-defined]
    caching.IndexDataCacheFile.save = locked_save


def can_spawn() -> bool:
    """Whether compile processes can be started (an interpreter embedded in a C host may have no
    ``python`` executable to start, and ``flock`` must exist)."""
    exe = os.path.basename(sys.executable or "")
    return exe.startswith("python") and os.name == "posix"


def warmup(*losses: Any, dtypes: Sequence[str] = DTYPES, jobs: int = 1, drivers: bool = True,
           progress: Callable[[int, int, Compiled], None] | None = None, in_place: bool = False) -> list[Compiled]:
    """Compile the kernel variants ``losses`` run on ``dtypes`` (all variants of the table when no loss is
    given), and the parallel drivers, into Numba's on-disk cache; return what was compiled.

    ``jobs``: compile processes side by side (1: in this process); ``progress(done, total, compiled)`` is
    called after each variant. ``in_place``: also each variant's in-place worker, the one a call whose
    gradient is written over the student runs (``grad_out=student``, and every chunk of
    ``FusedLinearDistillationLoss``); otherwise it compiles on the first such call.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    if not isinstance(in_place, bool):
        raise TypeError(f"in_place must be a bool, got {type(in_place).__name__}")
    todo = variants_for(losses, dtypes)
    results: list[Compiled] = []

    def report(c: Compiled) -> None:
        results.append(c)
        if progress is not None:
            progress(len(results), len(todo), c)

    if drivers:
        _compile_drivers(dtypes)
    if jobs > 1 and len(todo) > 1 and can_spawn():
        import concurrent.futures as cf
        import multiprocessing as mp

        table = reachable()
        idx = [table.index(v) for v in todo]
        parts = [idx[k::jobs] for k in range(jobs)]
        # in small pieces, so that progress comes as they finish
        pieces = [p[i:i + 4] for p in parts for i in range(0, len(p), 4)]
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            for fut in cf.as_completed([pool.submit(_compile_in_child, p, in_place) for p in pieces]):
                for i, seconds in fut.result():
                    report(Compiled(table[i], seconds))
        _compile(todo, in_place)  # load what the processes compiled (from the cache: milliseconds each)
    else:
        for v in todo:
            for c in _compile([v], in_place):
                report(c)
    return results


def _compile_drivers(dtypes: Sequence[str]) -> None:
    """The parallel driver and the softmax kernels, for each dtype (one compile each)."""
    import numpy as np

    from . import cpu
    from ._spec import Terms

    from ._storage import BITS

    for d in dtypes:
        x = np.zeros((2, 3), dtype=BITS.get(d, d))  # (16-bit floats as the kernels see them: their bits)
        v = resolve(Terms(), False, d)
        cpu.response(v, x, x, None, Terms().pack(), -100, 1.0, False)
        cpu.softmax(x, 1.0, False)
        cpu.softmax(x, 1.0, True)


def main(argv: Sequence[str] | None = None) -> int:
    """``fastdistill warmup``: compile kernel variants into the on-disk cache, with progress."""
    import argparse

    from .losses import SOFT_LOSSES

    ap = argparse.ArgumentParser(prog="fastdistill warmup", description=(
        "Compile fastdistill's kernel variants into Numba's on-disk cache, so that a later job loads them "
        "in milliseconds instead of compiling them on its first call."))
    ap.add_argument("--dtype", choices=DTYPES + ("all",), default="all", help="logits dtype (default: all)")
    ap.add_argument("--loss", action="append", default=[], metavar="KIND",
                    help=f"only the variants of this soft loss (repeatable): {', '.join(SOFT_LOSSES)}; default: "
                         "every variant")
    ap.add_argument("--temperature", type=float, default=1.0, help="temperature of --loss (default 1)")
    ap.add_argument("--hard-label-weight", type=float, default=0.0,
                    help="weight of the hard-label term next to --loss (default 0)")
    ap.add_argument("--jobs", type=int, default=1, help="compile processes side by side (default 1)")
    ap.add_argument("--capi", action="store_true", help="also the C ABI's entry points")
    ap.add_argument("--in-place", action="store_true",
                    help="also the in-place workers (a gradient written over the student: grad_out=student, the "
                         "fused linear head's chunks, the C ABI's grad == student)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    dtypes = DTYPES if args.dtype == "all" else (args.dtype,)
    losses: list[Any] = []
    try:
        if args.loss:
            from .distillers import ResponseDistiller
            from .losses import soft_loss_by_name

            losses = [ResponseDistiller(soft_loss_by_name(k, args.temperature), args.hard_label_weight, 1.0)
                      for k in args.loss]
    except ValueError as exc:
        print(f"fastdistill warmup: {exc}", file=sys.stderr)
        return 2

    def progress(done: int, total: int, c: Compiled) -> None:
        if not args.quiet:
            print(f"[{done}/{total}] {c.variant.name}: {c.seconds:.1f} s", flush=True)

    t0 = time.perf_counter()
    try:
        done = warmup(*losses, dtypes=dtypes, jobs=args.jobs, progress=progress, in_place=args.in_place)
    except (ValueError, TypeError) as exc:
        print(f"fastdistill warmup: {exc}", file=sys.stderr)
        return 2
    if args.capi:
        from . import capi

        capi.symbols(jobs=1, in_place=args.in_place)
    print(f"{len(done)} kernel variant{'s' if len(done) != 1 else ''} ready in {time.perf_counter() - t0:.1f} s"
          + (" (and the C ABI)" if args.capi else ""))
    return 0

"""C ABI: the CPU kernels as C-callable functions, and the header that declares them.

Native code calls fastdistill through plain function pointers. A process that embeds (or already
runs) Python imports this module, calls :func:`symbols` once -- which compiles the entry points on
first use, or loads them from Numba's on-disk cache -- and hands the addresses to C. The functions
never touch Python objects: they can be called from any thread, without holding the GIL, for as long
as the interpreter that compiled them is alive. Their prototypes, the status codes and the loss-kind
enum are in ``fastdistill.h`` (:func:`header_path`).

Every entry point returns an ``int32`` status, ``FD_OK`` (0) on success; on failure it writes nothing
to its outputs (except ``FD_INTERNAL_ERROR``, after which they are unspecified).
"""
from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from typing import Sequence

from .._spec import LOSS_CODES, LOSS_ENUM

ABI_VERSION = 5  # 2: the float16 and bfloat16 entry points, the sparse-teacher entry points; 3: vocab shards;
# 4: the vocab shards' check entries (FD_SHARD_WORK 31 -> 35, a few more doubles per exchange); 5: a
# two-pass divergence's row statistics are its two sums (FD_SHARD_WORK 35 -> 32)

# status codes (fastdistill.h: enum fd_status)
FD_OK = 0
FD_NULL_POINTER = 1
FD_EMPTY_INPUT = 2
FD_BAD_SHAPE = 3
FD_LABEL_OUT_OF_RANGE = 4
FD_MISSING_LABELS = 5
FD_BAD_PARAM = 6
FD_BAD_KIND = 7
FD_BAD_REDUCTION = 8
FD_OVERLAP = 9
FD_INTERNAL_ERROR = 10
FD_BAD_INDEX = 11

# tails of a sparse teacher (enum fd_tail): the names of fastdistill.sparse.TAILS, in order
FD_TAIL_RENORMALIZE = 0
FD_TAIL_SUPPORT = 1
FD_TAIL_BUCKET = 2

# what a vocabulary shard's caller does after a step (enum fd_shard_op), and its work buffer's size
FD_SHARD_MAX = 0  # combine request[0] doubles at the start of work with an element-wise max
FD_SHARD_SUM = 1  # ... with an element-wise sum
FD_SHARD_DONE = 2  # nothing: the loss and the shard's gradient are written
FD_SHARD_WORK = 32  # doubles per row of the work buffer (12 exchanged + 16 row statistics + 4 check entries)

# loss kinds (enum fd_loss_kind): FD_KL, FD_REVERSE_KL, ..., the library's own table (_spec.LOSS_KINDS)
globals().update(LOSS_ENUM)
FD_MSE: int  # (the ones this package's code names)
FD_COSINE: int
FD_CE_ONLY: int
FD_COMBINED: int

# reductions (enum fd_reduction)
FD_MEAN = 0
FD_SUM = 1
FD_NONE = 2

STATUS_MESSAGES = {
    FD_OK: "success",
    FD_NULL_POINTER: "a required pointer is NULL",
    FD_EMPTY_INPUT: "empty input: rows or n is 0",
    FD_BAD_SHAPE: "bad shape: rows or n is negative, or rows*n is too large",
    FD_LABEL_OUT_OF_RANGE: "a label is < 0 (and not ignore_index) or >= n",
    FD_MISSING_LABELS: "labels is NULL but hard_weight is not 0",
    FD_BAD_PARAM: "bad parameter: temperature not finite or <= 0, a weight not finite, beta/alpha outside "
    "[0, 1], label_smoothing outside [0, 1), or nthreads outside [0, pool size]",
    FD_BAD_KIND: "unknown loss kind",
    FD_BAD_REDUCTION: "unknown reduction",
    FD_OVERLAP: "an output buffer overlaps an input (only grad == student and out == x are allowed)",
    FD_INTERNAL_ERROR: "internal error (for example out of memory); outputs are unspecified",
    FD_BAD_INDEX: "a sparse teacher's class id is < -1 or >= n, or repeated in a row",
}

STATUS_NAMES = {
    FD_OK: "FD_OK",
    FD_NULL_POINTER: "FD_NULL_POINTER",
    FD_EMPTY_INPUT: "FD_EMPTY_INPUT",
    FD_BAD_SHAPE: "FD_BAD_SHAPE",
    FD_LABEL_OUT_OF_RANGE: "FD_LABEL_OUT_OF_RANGE",
    FD_MISSING_LABELS: "FD_MISSING_LABELS",
    FD_BAD_PARAM: "FD_BAD_PARAM",
    FD_BAD_KIND: "FD_BAD_KIND",
    FD_BAD_REDUCTION: "FD_BAD_REDUCTION",
    FD_OVERLAP: "FD_OVERLAP",
    FD_INTERNAL_ERROR: "FD_INTERNAL_ERROR",
    FD_BAD_INDEX: "FD_BAD_INDEX",
}

# the names and codes of the library's own table (fastdistill._spec.LOSS_CODES): the same numbers
LOSS_KINDS = dict(LOSS_CODES)

REDUCTIONS = {"mean": FD_MEAN, "sum": FD_SUM, "none": FD_NONE}

# every exported function, in the header's order
SYMBOL_NAMES = (
    "fd_abi_version",
    "fd_softmax_f32", "fd_log_softmax_f32", "fd_response_f32", "fd_mse_f32", "fd_cosine_f32",
    "fd_softmax_f64", "fd_log_softmax_f64", "fd_response_f64", "fd_mse_f64", "fd_cosine_f64",
    "fd_softmax_f16", "fd_log_softmax_f16", "fd_response_f16", "fd_mse_f16", "fd_cosine_f16",
    "fd_softmax_bf16", "fd_log_softmax_bf16", "fd_response_bf16", "fd_mse_bf16", "fd_cosine_bf16",
    "fd_response_sparse_f32", "fd_response_sparse_f64", "fd_response_sparse_f16", "fd_response_sparse_bf16",
    "fd_vocab_shard_f32", "fd_vocab_shard_f64", "fd_vocab_shard_f16", "fd_vocab_shard_bf16",
)

PRECISIONS = ("f32", "f64", "f16", "bf16")

_SYMBOLS: dict[str, int] = {}
_IN_PLACE: set[str] = set()  # the precisions whose in-place workers are built


def include_dir() -> str:
    """The directory holding ``fastdistill.h`` (pass it to the C compiler with ``-I``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "include")


def header_path() -> str:
    """Absolute path of ``fastdistill.h``."""
    return os.path.join(include_dir(), "fastdistill.h")


def symbols(precision: str | None = None, jobs: int | None = None, in_place: bool = False) -> dict[str, int]:
    """``{C name: function address}`` of the entry points (``fastdistill.h`` has their prototypes).

    ``precision``: ``"f32"``, ``"f64"``, ``"f16"`` or ``"bf16"`` for that precision's entry points only (plus
    ``fd_abi_version``), ``None`` for all. The first call compiles them and the kernel variant each
    entry point can run -- about a minute on a cold Numba cache, a second or two once the cache is
    warm -- and the addresses stay valid for the life of the process. ``jobs``: processes compiling
    the variants side by side on a cold cache (default: up to 4, the machine's cores; 1 in an
    interpreter embedded without a ``python`` executable to start).

    ``in_place``: also compile each variant's in-place worker, which the entry points run when the
    gradient buffer is the student itself (``grad == student``): such a call then runs as fast as one into
    a separate buffer, with its bits. Without it an in-place call runs the vector loops' scalar fallback
    (their run-time overlap check fails when the two pointers are equal): 3-8x slower, and an element
    may round 1 ulp apart (the scalar loop contracts its multiply-adds differently). It doubles the compile
    on a cold cache; the addresses returned are the same either way (the table the entry points read is
    filled in place), so it may be asked for in a later call.
    """
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    if not isinstance(in_place, bool):
        raise TypeError(f"in_place must be a bool, got {type(in_place).__name__}")
    wanted = PRECISIONS if precision is None else (precision,)
    from .._warmup import can_spawn, warmup
    from . import _cfuncs

    if jobs is None:
        jobs = min(4, os.cpu_count() or 1) if can_spawn() else 1
    missing = [p for p in wanted if f"fd_response_{p}" not in _cfuncs.CFUNCS or (in_place and p not in _IN_PLACE)]
    if missing and jobs > 1:
        warmup(dtypes=[_cfuncs.DTYPES[p] for p in missing], jobs=jobs, in_place=in_place)
    for p in wanted:
        _cfuncs.build(p, in_place)
        if in_place:
            _IN_PLACE.add(p)
    for name, cf in _cfuncs.CFUNCS.items():
        if name not in _SYMBOLS:
            _SYMBOLS[name] = int(cf.address)
    return {name: _SYMBOLS[name] for name in SYMBOL_NAMES
            if name == "fd_abi_version" or name.endswith(tuple("_" + p for p in wanted))}


def status_message(code: int) -> str:
    """A one-line description of a status code returned by an entry point."""
    code = int(code)
    if code in STATUS_MESSAGES:
        return f"{STATUS_NAMES[code]}: {STATUS_MESSAGES[code]}"
    return f"unknown status code {code}"


def embed_flags() -> tuple[list[str], list[str]]:
    """``(cflags, ldflags)`` to build a C program that embeds this Python and includes ``fastdistill.h``.

    The ``python3-config --cflags --embed`` / ``--ldflags --embed`` equivalent computed with
    :mod:`sysconfig` (which also works inside a virtual environment, where ``python3-config`` is absent).
    """
    v = sysconfig.get_config_var
    cflags = [f"-I{sysconfig.get_path('include')}"]
    plat = sysconfig.get_path("platinclude")
    if plat and plat != sysconfig.get_path("include"):
        cflags.append(f"-I{plat}")
    cflags.append(f"-I{include_dir()}")
    libdir = v("LIBDIR") or ""
    ldflags = []
    if v("Py_ENABLE_SHARED"):
        ldflags += [f"-L{libdir}", f"-Wl,-rpath,{libdir}"]
    else:
        ldflags += [f"-L{v('LIBPL') or libdir}"]
        ldflags += (v("LINKFORSHARED") or "").split()
    ldflags.append(f"-lpython{v('LDVERSION') or sysconfig.get_python_version()}")
    for flag in ((v("LIBS") or "") + " " + (v("SYSLIBS") or "")).split():
        if flag not in ldflags:
            ldflags.append(flag)
    return cflags, ldflags


def main(argv: Sequence[str] | None = None) -> int:
    """``fastdistill capi``: print the header path and the entry points' addresses."""
    parser = argparse.ArgumentParser(
        prog="fastdistill capi",
        description="The C ABI: header location, entry point addresses, flags to build a C host.",
    )
    parser.add_argument("--header", action="store_true", help="print only the path of fastdistill.h")
    parser.add_argument("--include", action="store_true", help="print only the include directory")
    parser.add_argument("--cflags", action="store_true",
                        help="print compiler flags for a C program embedding this Python")
    parser.add_argument("--ldflags", action="store_true",
                        help="print linker flags for a C program embedding this Python")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.header or args.include or args.cflags or args.ldflags:
        cflags, ldflags = embed_flags()
        if args.header:
            print(header_path())
        if args.include:
            print(include_dir())
        if args.cflags:
            print(" ".join(cflags))
        if args.ldflags:
            print(" ".join(ldflags))
        return 0
    print(f"header: {header_path()}")
    print(f"abi version: {ABI_VERSION}")
    for name, addr in symbols().items():
        print(f"{name} 0x{addr:x}")
    return 0

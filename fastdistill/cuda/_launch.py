"""Launch geometry and the launch path of the CUDA kernels.

Rows of at most ``small_n`` classes get ``group`` threads each (a warp), several rows per block of
``block_small`` threads; longer rows get a whole block (``block_mid`` threads up to ``large_n`` classes,
``block_large`` beyond). ``max_grid`` caps the grid (blocks walk rows grid-stride). Batches of at most
``fused_rows`` rows and ``fused_elements`` logits run the *fused* loss kernel: it counts the labels in
every block (8 KB at most, from L2) and reduces the row losses in the block that finishes last, so the
call is one launch instead of three (label count, loss, sum); for such batches the launches cost more
than the work. Larger batches keep the lean kernel between the two small ones. The simulator uses tiny
blocks (its threads are Python threads); tests may edit these dicts.
"""
from __future__ import annotations

from typing import Any

from ._device import FAST, fast, plain, simulated

GPU_LAUNCH = {"small_n": 2048, "group": 32, "block_small": 256, "block_mid": 256, "large_n": 16384,
              "block_large": 256, "max_grid": 65535, "fused_rows": 1024, "fused_elements": 1 << 22}
SIM_LAUNCH = {"small_n": 16, "group": 4, "block_small": 8, "block_mid": 8, "large_n": 64,
              "block_large": 16, "max_grid": 4, "fused_rows": 4, "fused_elements": 1 << 30}


def config() -> dict:
    """The geometry in use: the simulator's or the GPU's."""
    return SIM_LAUNCH if simulated() else GPU_LAUNCH


def fused(rows: int, n: int) -> bool:
    """Whether a ``rows x n`` batch runs the fused (one-launch) loss kernel."""
    cfg = config()
    return rows <= cfg["fused_rows"] and rows * n <= cfg["fused_elements"]


def geometry(rows: int, n: int) -> tuple[int, int, int]:
    """(grid, block, threads per row) for a ``rows x n`` problem."""
    cfg = config()
    if n <= cfg["small_n"]:
        block = cfg["block_small"]
        g = min(cfg["group"], block)
    else:
        block = cfg["block_mid"] if n <= cfg["large_n"] else cfg["block_large"]
        g = block
    per_block = block // g
    grid = max(1, min((rows + per_block - 1) // per_block, cfg["max_grid"]))
    return grid, block, g


_SPECIALISED: dict = {}


def launch(disp: Any, grid: int, block: int, stream: Any, args: tuple) -> None:
    """Launch the dispatcher ``disp`` on ``args``: its specialised kernel for these argument types,
    cached after the first launch (numba's dispatcher resolves the types on every call), else the
    dispatcher itself."""
    if simulated():
        disp[grid, block, stream](*args)
        return
    if fast():
        key = (disp, tuple(getattr(a, "_numba_type_", None) or type(a) for a in args))
        k = _SPECIALISED.get(key)
        try:
            if k is None:
                disp[grid, block, stream](*args)  # compiles (or loads from the cache) and launches
                k = disp.overloads.get(tuple(disp.typeof_pyval(a) for a in args))
                if k is not None:
                    _SPECIALISED[key] = k
            else:
                k.launch(args, (grid, 1, 1), (block, 1, 1), stream, 0)
            return
        except Exception:  # noqa: BLE001 - the fast path is an optimisation: fall back for good
            FAST["on"] = False
    disp[grid, block, stream](*[plain(a) for a in args])

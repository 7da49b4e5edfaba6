import numpy as np
import pytest

IGNORE = -100


def make_batch(rows, n, dtype, seed=0, *, mask=True, big=False, ignore=True, scale=2.0):
    """Random student/teacher logits and labels: masked (-inf) classes shared by both, optional +-1e4
    logits, some ignored rows. Labels never point at a masked class."""
    rng = np.random.default_rng(seed)
    s = rng.normal(scale=scale, size=(rows, n))
    t = rng.normal(scale=scale, size=(rows, n))
    y = rng.integers(0, n, size=rows)
    if mask and n >= 3:
        m = rng.random((rows, n)) < 0.15
        m[np.arange(rows), y] = False
        s[m] = -np.inf
        t[m] = -np.inf
    if big and n >= 3:
        b = (rng.random((rows, n)) < 0.02) & np.isfinite(s)
        b[np.arange(rows), y] = False
        s[b] = rng.choice([-1e4, 1e4], size=b.sum())
        t[b] = rng.choice([-1e4, 1e4], size=b.sum())
    if ignore and rows >= 3:
        y[rng.random(rows) < 0.25] = IGNORE
    return s.astype(dtype), t.astype(dtype), y


def rel_err(got, ref):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    scale = max(np.max(np.abs(ref)), 1e-30)
    return float(np.max(np.abs(got - ref)) / scale)


TOL = {np.float32: 1e-5, np.float64: 1e-10}


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def stray_signatures() -> list[str]:
    """Compiled signatures of the CPU drivers and softmax kernels other than the ones the façade and the
    C ABI use (one driver for every storage, one softmax per storage; read-only inputs arrive as
    writable-typed aliases): each would be a compile of its own."""
    import sys

    K = sys.modules.get("fastdistill.cpu._kernels")
    if K is None:
        return []
    from numba import types as T

    def arr(dt, nd, ro):
        return T.Array(dt, nd, "C", readonly=ro)

    layout = T.UniTuple(T.int64, 8)  # the drivers see the logits' addresses: one signature for every storage
    f64 = arr(T.float64, 1, False)
    out = [
        (T.int64, layout, arr(T.int64, 1, False), T.boolean, T.int64, f64, T.float64, T.boolean, f64, T.int64,
         T.boolean),
        (T.int64, T.int64, layout, arr(T.int64, 1, False), T.boolean, T.int64, f64, T.float64, T.boolean, f64,
         arr(T.float64, 2, False), arr(T.float64, 2, False), T.int64),
    ]
    for dt in (T.float32, T.float64, T.int16, T.uint16):  # (16-bit floats as their bits)
        out.append((arr(dt, 2, False), T.float64, arr(dt, 2, False)))
    allowed = set(out)
    stray = [f"{K.drive.py_func.__name__}{sig}" for sig in K.drive.signatures if sig not in allowed]
    stray += [f"{K.drive_shard.py_func.__name__}{sig}" for sig in K.drive_shard.signatures if sig not in allowed]
    for kernel in K._SOFTMAX.values():
        stray += [f"softmax{sig}" for sig in kernel.signatures if sig not in allowed]
    return stray


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when any call compiled a CPU kernel signature outside the variant table's."""
    stray = stray_signatures()
    if stray:
        print("\nCompiled outside the kernel variant table:\n  " + "\n  ".join(stray))
        session.exitstatus = 1


# The files that take longest, started first: `make test` runs two pytest-xdist processes a file each
# (`--dist loadfile --no-loadscope-reorder`), and a long file taken last would run alone at the end. Without
# the flag xdist sorts files by their number of tests, which put the sm_90 compile of every CUDA kernel
# (two tests, the longest file) last.
LONGEST_FIRST = ("test_cuda_compile.py", "test_capi.py", "test_cuda_sim.py", "test_fuzz.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's own order kept

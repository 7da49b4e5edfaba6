"""The scalar building blocks of the CPU kernels: the vectorizable exponential and the integer keys of the
max pass, against NumPy."""
import numpy as np
import pytest

numba = pytest.importorskip("numba")
from fastdistill.cpu._math import abs_bits, fexp, fexp2, fexp2_term, from_okey, okey, prefetch, wide_vectors  # noqa: E402


@numba.njit
def _exps_all(x):
    """(fexp(x), fexp2(x), fexp2_term(x)) elementwise."""
    e = np.empty_like(x)
    e2 = np.empty_like(x)
    e3 = np.empty_like(x)
    for i in range(x.size):
        e[i] = fexp(x[i])
        e2[i] = fexp2(x[i])
        e3[i] = fexp2_term(x[i])
    return e, e2, e3


def _fexp_all(x):
    return _exps_all(x)[0]


def _fexp2_all(x):
    return _exps_all(x)[1]


@numba.njit
def _keys(x):
    k = np.empty(x.size, dtype=np.int64)
    back = np.empty_like(x)
    ab = np.empty(x.size, dtype=np.int64)
    for i in range(x.size):
        k[i] = okey(x[i])
        back[i] = from_okey(okey(x[i]), x[i])
        ab[i] = abs_bits(x[i])
    return k, back, ab


def test_fexp_float32_accuracy_and_cut():
    x = np.linspace(-87.0, 0.0, 200001, dtype=np.float32)
    got = _fexp_all(x).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    rel = np.abs(got - ref) / ref
    assert np.max(rel[x > -80.0]) < 3e-7  # the float32 result itself rounds by up to 6e-8
    assert np.max(rel) < 1e-6  # near -87 the result approaches float32's subnormal range
    low = np.array([-87.4, -100.0, -1e30, -np.inf], dtype=np.float32)
    assert np.all(_fexp_all(low) == 0.0)


def test_fexp2_float32_accuracy_and_cut():
    t = np.concatenate([np.linspace(-126.0, 0.0, 400001, dtype=np.float32)[1:],
                        np.array([-0.5, -0.49999997, -1.5, -125.5, -125.99999], dtype=np.float32)])
    got = _fexp2_all(t).astype(np.float64)
    ref = np.exp2(t.astype(np.float64))
    rel = np.abs(got - ref) / ref
    assert np.max(rel[t > -125.0]) < 3e-7  # the fit's 2.1e-7 and the float32 rounding of the result
    assert np.max(rel) < 1e-6  # near -126 the result approaches float32's subnormal range
    assert _fexp2_all(np.zeros(1, np.float32))[0] == 1.0
    low = np.array([-126.0, -127.0, -1e30, -np.inf, np.nan], dtype=np.float32)
    assert np.all(_fexp2_all(low) == 0.0)
    # the term of a sum: the same above -126, at most 2**-126 at and below it (NaN too), never 0
    _, e2, e3 = _exps_all(t)
    np.testing.assert_array_equal(e3, e2)
    term_low = _exps_all(low)[2].astype(np.float64)
    assert np.all((term_low > 0.0) & (term_low <= 2.0**-126))
    t64 = np.array([-1074.0, -30.25, -1.0, 0.0])
    np.testing.assert_allclose(_fexp2_all(t64), np.exp2(t64), rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ordered_keys_sort_like_floats(dtype):
    fi = np.finfo(dtype)
    x = np.array([-np.inf, fi.min, -1e3, -1.0, -fi.tiny, -fi.smallest_subnormal, -0.0, 0.0,
                  fi.smallest_subnormal, fi.tiny, 1.0, 1e3, fi.max, np.inf], dtype=dtype)
    k, back, _ = _keys(x)
    assert np.all(np.diff(k) >= 0) and np.all(np.diff(k)[np.diff(x) > 0] > 0)
    np.testing.assert_array_equal(back.view(np.uint8), x.view(np.uint8))  # exact round trip, -0.0 too
    rng = np.random.default_rng(0)
    y = (rng.standard_normal(1000) * 10.0 ** rng.integers(-30, 30, 1000)).astype(dtype)
    k, _, _ = _keys(y)
    assert y[np.argmax(k)] == y.max() and y[np.argmin(k)] == y.min()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_abs_bits_flag_nan_only(dtype):
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -1.0, np.finfo(dtype).max], dtype=dtype)
    _, _, ab = _keys(x)
    _, _, inf_bits = _keys(np.array([np.inf], dtype=dtype))
    np.testing.assert_array_equal(ab > inf_bits[0], [True, True, False, False, False, False, False])


@numba.njit
def _sum_prefetching(x, ahead):
    total = 0.0
    for j in range(x.size):
        prefetch(x, j + ahead)  # far past the end of x: a hint, never a load
        total += x[j]
    return total


def test_prefetch_past_the_end_changes_nothing():
    x = np.arange(1000, dtype=np.float32)
    for ahead in (0, 1000, 1 << 20, 1 << 40):
        assert _sum_prefetching(x, ahead) == 499500.0
    view = np.arange(12, dtype=np.float64).reshape(3, 4)[2]  # the last row: "next row" is past the matrix
    assert _sum_prefetching(view, 4) == 8.0 + 9.0 + 10.0 + 11.0


def test_wide_vectors_marks_only_its_own_function():
    @numba.njit
    def marked(x):
        wide_vectors()
        return x.sum()

    @numba.njit
    def plain(x):
        return x.sum()

    x = np.arange(10, dtype=np.float32)
    assert marked(x) == plain(x) == 45.0
    attr = '"prefer-vector-width"="512"'
    assert attr in marked.inspect_llvm(marked.signatures[0])
    assert attr not in plain.inspect_llvm(plain.signatures[0])

"""Each divergence's formulas (``fastdistill._formulas``), run as plain Python against the float64
references of ``tests/reference.py``: no compile, milliseconds per case. The kernels compile these very
functions (tests/test_divergences.py and the others check them compiled, through every front door)."""
import math
import types

import numpy as np
import pytest

from fastdistill import _formulas as F
from fastdistill._spec import DIV_NONE, DIVERGENCES, LOSS_CODES, soft_terms
from reference import divergence, log_softmax, numeric_grad

# (loss kind, its parameter: beta for jsd, alpha for the skew KLs)
CASES = [
    ("kl_divergence", None), ("reverse_kl", None), ("tvd", None),
    ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9), ("skew_kl", 0.1), ("skew_kl", 1.0), ("skew_reverse_kl", 0.1),
    ("skew_reverse_kl", 1.0), ("alpha_divergence", 0.3), ("alpha_divergence", 0.5), ("alpha_divergence", 0.8),
]


def _terms(kind, param, tau):
    """(formula module, its constants, div_w) of a loss kind, from the mapping the library runs."""
    beta = param if kind == "jsd" else 0.5
    alpha = param if param is not None and kind != "jsd" else 0.1
    div, div_w, _, _, lam, c_p, c_q = soft_terms(LOSS_CODES[kind], tau, 1.0, 0.0, beta, alpha, True)
    m = F.FORMULAS[div]
    return m, m.constants(lam, c_p, c_q), div_w


def _row(m, k, s, t, tau):
    """(sum of the terms, the gradient by s) of one row, from the module's bins in plain Python."""
    lp = log_softmax(np.asarray(t, np.float64) / tau)
    lq = log_softmax(np.asarray(s, np.float64) / tau)
    d = 0.0
    hs = []
    for a, b in zip(lp, lq):
        term, h = m.bin(float(a), float(b), math.exp(a), math.exp(b), k)
        d += term
        hs.append(h)
    q = np.exp(lq)
    h = np.array(hs)
    return d, (h - q * h.sum()) / tau


@pytest.mark.parametrize("kind,param", CASES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("seed", range(4))
def test_a_rows_terms_sum_to_the_divergence_and_give_its_gradient(kind, param, tau, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    s = rng.normal(0, 3, n)
    t = rng.normal(0, 3, n)
    m, k, div_w = _terms(kind, param, tau)
    d, g = _row(m, k, s, t, tau)
    want = divergence(kind, s[None], t[None], tau, param if param is not None else 0.5)[0]
    assert div_w * d == pytest.approx(want, rel=1e-12, abs=1e-14)
    num = numeric_grad(lambda x: divergence(kind, x[None], t[None], tau, param if param is not None else 0.5)[0], s)
    np.testing.assert_allclose(div_w * g, num, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind,param", CASES)
def test_classes_of_no_mass_add_their_limits(kind, param):
    """Classes the teacher, the student or both give no mass (-inf logits): each term's limit, never NaN,
    and no gradient where the student has no mass. (The divergence is infinite where one side has mass
    the other lacks in its log's argument: those masks are left out for the KLs that have one.)"""
    s = np.array([1.0, -np.inf, 0.5, 2.0, -np.inf])
    t = np.array([0.3, 1.0, -np.inf, 2.0, -np.inf])
    m, k, div_w = _terms(kind, param, 1.0)
    if m.CODE == 1:  # forward KL: p > 0 = q is infinite
        s[1] = 0.0
    if m.CODE == 2:  # reverse KL: q > 0 = p is infinite
        t[2] = 0.0
    d, g = _row(m, k, s, t, 1.0)
    want = divergence(kind, s[None], t[None], 1.0, param if param is not None else 0.5)[0]
    assert np.isfinite(d) and np.all(np.isfinite(g))
    assert div_w * d == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert np.all(g[s == -np.inf] == 0.0)


@pytest.mark.parametrize("kind,param", [("tvd", None), ("alpha_divergence", 1e-6), ("alpha_divergence", 0.3),
                                        ("alpha_divergence", 0.5), ("alpha_divergence", 0.9)])
def test_the_terms_are_never_negative(kind, param):
    """Divergences whose every term is >= 0 (a row's sum never cancels; a KL term p log(p / q) is negative
    where q > p, only a row's sum is not)."""
    rng = np.random.default_rng(5)
    m, k, _ = _terms(kind, param, 1.0)
    for _ in range(500):
        lp, lq = rng.uniform(-30, 0, 2)
        assert m.bin(lp, lq, math.exp(lp), math.exp(lq), k)[0] >= 0.0


def test_the_table_covers_every_divergence_code_once():
    assert sorted(F.FORMULAS) == [d for d in DIVERGENCES if d != DIV_NONE]
    for code, m in F.FORMULAS.items():
        assert m.CODE == code
        assert isinstance(m.TWO_PASS, bool)
        assert len(m.constants(0.3, 0.3, 0.7)) == F.N_CONSTANTS


def test_a_module_missing_a_piece_or_a_taken_code_stops_the_import():
    """A divergence without its bin is an error when the table is built, not another divergence's bin."""
    incomplete = types.ModuleType("incomplete")
    incomplete.CODE, incomplete.NAME, incomplete.TWO_PASS = 5, "incomplete", True
    incomplete.constants = lambda lam, cp, cq: (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ImportError, match=r"incomplete lacks \['bin'\]"):
        F._table((*F.MODULES, incomplete))
    incomplete.bin = lambda lp, lq, p, q, k: (0.0, 0.0)
    incomplete.CODE = 1
    with pytest.raises(ImportError, match="code 1 is taken"):
        F._table((*F.MODULES, incomplete))
    incomplete.CODE = 9
    with pytest.raises(ImportError, match="codes must be 1"):
        F._table((*F.MODULES, incomplete))


def test_the_run_time_dispatch_calls_the_codes_module():
    """The chain the sparse kernels compile, run as plain Python: each code reaches its own module,
    DIV_NONE the given value, an unknown code NaN."""
    plain = lambda f: f  # noqa: E731
    bin_of = F.run_time_dispatch(plain, "bin", 5, (0.0, 0.0))
    consts = F.run_time_dispatch(plain, "constants", 3, (0.0, 0.0, 0.0, 0.0))
    lp, lq = math.log(0.3), math.log(0.6)
    for code, m in F.FORMULAS.items():
        k = consts(code, 0.25, 0.5, 0.5)
        assert k == m.constants(0.25, 0.5, 0.5)
        assert bin_of(code, lp, lq, 0.3, 0.6, k) == m.bin(lp, lq, 0.3, 0.6, k)
    assert bin_of(DIV_NONE, lp, lq, 0.3, 0.6, k) == (0.0, 0.0)
    assert all(math.isnan(x) for x in bin_of(len(F.FORMULAS) + 1, lp, lq, 0.3, 0.6, k))



@pytest.mark.parametrize("kind", ["kl_divergence", "reverse_kl"])
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_a_one_pass_divergence_from_its_sums_with_either_backends_shift(kind, tau):
    """``row_value`` from the first pass's sums, the cross term taken relative to the maxima (the CPU's:
    no shift) or of raw differences (CUDA's: shifted by the maxima), against the reference."""
    rng = np.random.default_rng(3)
    s, t = rng.normal(0, 4, 50), rng.normal(0, 4, 50) + 7.0
    a, b = (t, s) if kind == "kl_divergence" else (s, t)  # (the distribution the sum is weighted by first)
    ma, mb = a.max(), b.max()
    wa = np.exp((a - ma) / tau)
    sums = (np.exp((t - t.max()) / tau).sum(), np.exp((s - s.max()) / tau).sum())
    m = F.FORMULAS[F.forward_kl.CODE if kind == "kl_divergence" else F.reverse_kl.CODE]
    want = divergence(kind, s[None], t[None], tau)[0] / tau**2
    relative = m.row_value(1 / tau, *sums, float((wa * ((a - ma) - (b - mb))).sum()), 0.0)
    raw = m.row_value(1 / tau, *sums, float((wa * (a - b)).sum()), (ma - mb) / tau)
    assert relative == pytest.approx(want, rel=1e-12) and raw == pytest.approx(want, rel=1e-10)


def _alpha_exact(a, lp, lq):
    """Amari's alpha-divergence of one row to 40 digits (mpmath), from its definition, summed as
    ``sum (a p + (1 - a) q - p^a q^(1-a)) / (a (1 - a))``: the same number for distributions, and not
    amplifying the float64 rounding of the inputs' own sums (1 - sum p is ~1e-16, which 1 / (a (1 - a))
    would make 1e-4 at a = 1e-12)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(60):
        a = mpmath.mpf(a)
        total = mpmath.fsum(a * mpmath.exp(x) + (1 - a) * mpmath.exp(y) - mpmath.exp(a * x + (1 - a) * y)
                            for x, y in zip((mpmath.mpf(v) for v in lp), (mpmath.mpf(v) for v in lq)))
        return float(total / (a * (1 - a)))


@pytest.mark.parametrize("a", [1e-12, 1e-6, 1e-3, 0.3, 0.5, 0.7, 1 - 1e-3, 1 - 1e-6])
@pytest.mark.parametrize("spread", [0.01, 3.0, 30.0])
def test_alpha_divergence_keeps_its_digits_near_its_limits(a, spread):
    """The form through expm1 keeps full precision where 1 - sum p^a q^(1-a) cancels: alpha near 0 or 1,
    or p near q (the plain form loses about log10(1 / (a (1 - a))) digits more)."""
    rng = np.random.default_rng(int(spread * 10))
    lp = log_softmax(rng.normal(0, spread, 40))
    lq = log_softmax(rng.normal(0, spread, 40))
    m = F.FORMULAS[F.alpha.CODE]
    k = m.constants(a, 0.0, 0.0)
    got = math.fsum(m.bin(float(x), float(y), math.exp(x), math.exp(y), k)[0] for x, y in zip(lp, lq))
    assert got == pytest.approx(_alpha_exact(a, lp, lq), rel=1e-12)


def test_alpha_divergence_tends_to_the_kls_at_its_ends():
    """alpha -> 0 is KL(q || p), alpha -> 1 KL(p || q), and soft_terms maps the ends to those losses."""
    rng = np.random.default_rng(11)
    s, t = rng.normal(0, 2, 30), rng.normal(0, 2, 30)
    m = F.FORMULAS[F.alpha.CODE]
    for a, kind in ((1e-9, "reverse_kl"), (1 - 1e-9, "kl_divergence")):
        d, _ = _row(m, m.constants(a, 0.0, 0.0), s, t, 1.0)
        assert d == pytest.approx(divergence(kind, s[None], t[None])[0], rel=1e-7)
    for a, div in ((0.0, F.reverse_kl.CODE), (1.0, F.forward_kl.CODE), (0.5, F.alpha.CODE)):
        assert soft_terms(LOSS_CODES["alpha_divergence"], 2.0, 1.0, 0.0, 0.5, a, True)[0] == div


def test_alpha_divergence_at_one_half_is_four_squared_hellinger_distances():
    rng = np.random.default_rng(12)
    s, t = rng.normal(0, 2, 30), rng.normal(0, 2, 30)
    p, q = np.exp(log_softmax(t)), np.exp(log_softmax(s))
    m = F.FORMULAS[F.alpha.CODE]
    d, _ = _row(m, m.constants(0.5, 0.0, 0.0), s, t, 1.0)
    assert d == pytest.approx(4 * 0.5 * ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(), rel=1e-12)


def test_alpha_divergence_of_extreme_bins_is_finite():
    """A teacher's bin of no mass against the student's and the reverse (p or q 0, and subnormal):
    the exact limits, no overflow of expm1."""
    m = F.FORMULAS[F.alpha.CODE]
    for a in (0.2, 0.8):
        k = m.constants(a, 0.0, 0.0)
        assert m.bin(math.log(0.5), -math.inf, 0.5, 0.0, k) == (0.5 / (1 - a), 0.0)
        assert m.bin(-math.inf, math.log(0.5), 0.0, 0.5, k) == (0.5 / a, 0.5 / a)
        lp, lq = math.log(0.7), -745.0  # q = 5e-324
        d, h = m.bin(lp, lq, 0.7, math.exp(lq), k)
        assert d == pytest.approx(0.7 / (1 - a), rel=1e-12) and math.isfinite(h)
        d, h = m.bin(lq, lp, math.exp(lq), 0.7, k)
        assert d == pytest.approx(0.7 / a, rel=1e-12) and h == pytest.approx(0.7 / a, rel=1e-12)

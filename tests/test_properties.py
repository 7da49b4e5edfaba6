"""Properties that hold for any input (hypothesis): shift invariance, non-negativity, bounds, references."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import fastdistill as fd
from reference import divergence

shapes = st.tuples(st.integers(1, 6), st.integers(1, 40))
logit = st.floats(-30, 30, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def pairs(draw):
    shape = draw(shapes)
    s = draw(arrays(np.float64, shape, elements=logit))
    t = draw(arrays(np.float64, shape, elements=logit))
    return s, t


KINDS = [
    (fd.DistilLoss.kl_divergence(2.0), "kl_divergence", None),
    (fd.DistilLoss.reverse_kl(2.0), "reverse_kl", None),
    (fd.DistilLoss.jsd(0.3, 2.0), "jsd", 0.3),
    (fd.DistilLoss.skew_kl(0.2, 2.0), "skew_kl", 0.2),
    (fd.DistilLoss.tvd(2.0), "tvd", None),
]


@settings(max_examples=60, deadline=None)
@given(pairs(), st.floats(-50, 50), st.sampled_from(range(len(KINDS))))
def test_divergences_nonnegative_shift_invariant_and_match_reference(pair, shift, k):
    s, t = pair
    loss, kind, param = KINDS[k]
    rows = loss.compute(s, t, reduction="none")
    ref = divergence(kind, s, t, 2.0, 0.5 if param is None else param)
    np.testing.assert_allclose(rows, ref, rtol=1e-9, atol=1e-11)
    assert np.all(rows >= -1e-12)
    if kind == "tvd":
        assert np.all(rows <= 1 + 1e-12)
    # softmax-based losses ignore a constant added to a row
    np.testing.assert_allclose(loss.compute(s + shift, t - shift, reduction="none"), rows, rtol=1e-7, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(pairs())
def test_kl_gradient_rows_sum_to_zero_and_vanish_at_the_teacher(pair):
    s, t = pair
    _, g = fd.DistilLoss.kl_divergence(3.0).compute_with_grad(s, t, reduction="sum")
    np.testing.assert_allclose(g.sum(-1), 0.0, atol=1e-9)
    _, g0 = fd.DistilLoss.kl_divergence(3.0).compute_with_grad(t, t, reduction="sum")
    np.testing.assert_allclose(g0, 0.0, atol=1e-12)

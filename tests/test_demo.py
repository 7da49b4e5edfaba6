"""``fastdistill demo``: structure of the output, held-out accuracy, determinism, the KD objective."""
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402

from fastdistill import demo  # noqa: E402

FAST = dict(epochs=3, repeats=2)


def _run(**kw):
    out = io.StringIO()
    res = demo.run(demo.Config(**{**FAST, **kw}), out=out)
    return res, out.getvalue()


@pytest.fixture(scope="module")
def result():
    return _run()


def test_output_structure(result):
    _, text = result
    for needle in ("setting  few labels", "teacher  64-128-128-10", "students 64-16-10",
                   "held-out test accuracy", "student, no KD", "student, KD", "KD - no KD", "verdict:"):
        assert needle in text, needle
    # piped output: one progress line per epoch here (3 epochs), for the teacher and for the students
    assert text.count("epoch 1/3") == 2 and text.count("epoch 3/3") == 2
    table = [ln for ln in text.splitlines() if ln.startswith("  teacher ") or ln.startswith("  student,")]
    assert len(table) == 3
    for ln in table:
        acc = float(ln.split()[-5])  # "... <acc>  <calls> calls: <ms> ms"
        assert 0.0 <= acc <= 1.0


def test_held_out_split_and_accuracy(result):
    res, _ = result
    digits = load_digits()
    n = len(digits.target)
    train, test = res["train_idx"], res["test_idx"]
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == n and len(np.union1d(train, test)) == n
    assert len(test) == round(0.3 * n)
    labelled = res["labelled_idx"]
    assert len(labelled) == 100 and np.all(np.isin(labelled, train))
    y_test = digits.target[test]
    np.testing.assert_array_equal(res["y_test"], y_test)
    for key in ("teacher", "no_kd", "kd"):
        pred = res["pred"][key]
        assert pred.shape == (len(test),)
        acc = res["acc"][key]
        assert isinstance(acc, float) and 0.0 <= acc <= 1.0
        assert acc == pytest.approx(np.mean(pred == y_test), abs=0)
        assert res["history"][key]["test_acc"][-1] == pytest.approx(acc, abs=0)
    # a trained teacher on digits is far above chance (10 %)
    assert res["acc"]["teacher"] > 0.8
    assert res["kernel_calls"]["kd"] == 2 * res["kernel_calls"]["no_kd"] > 0
    assert all(s > 0 for s in res["kernel_seconds"].values())
    assert len(res["repeats"]) == 2
    np.testing.assert_allclose(res["diff_pp"][0], 100 * (res["acc"]["kd"] - res["acc"]["no_kd"]))


def test_deterministic_for_a_seed(result):
    res, text = result
    again, text2 = _run()
    for key in ("teacher", "no_kd", "kd"):
        np.testing.assert_array_equal(again["pred"][key], res["pred"][key])
        assert again["history"][key]["loss"] == res["history"][key]["loss"]
    assert again["repeats"] == res["repeats"]

    def numbers(t):  # the printed output, timings cut off (the table keeps its accuracy column)
        return [re.split(r"\d+ calls:|first call|\d+(?:\.\d+)? m?s\b", ln)[0] for ln in t.splitlines()]

    assert numbers(text) == numbers(text2)
    other, _ = _run(seed=1, repeats=1, quiet=True)
    assert not np.array_equal(other["test_idx"], res["test_idx"])


def test_alpha_one_makes_the_students_identical():
    # hard weight 1, soft weight 0: the KD student's objective is exactly the no-KD student's
    res, _ = _run(alpha=1.0, repeats=1, quiet=True)
    np.testing.assert_array_equal(res["pred"]["kd"], res["pred"]["no_kd"])
    assert res["diff_pp"] == [0.0]
    assert res["verdict"].startswith("no clear difference")


def _np_kd(s, t, y, alpha, tau, ignore=-100):
    """float64 NumPy reference of the demo's KD objective and its gradient."""
    s = s.astype(np.float64)
    t = t.astype(np.float64)

    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lab = y != ignore
    ls1 = log_softmax(s)
    ce = -ls1[lab, y[lab]]
    g_ce = np.exp(ls1)
    g_ce[lab, y[lab]] -= 1.0
    g_ce[~lab] = 0.0
    n_lab = max(int(lab.sum()), 1)
    lp, lq = log_softmax(t / tau), log_softmax(s / tau)
    kl = tau * tau * (np.exp(lp) * (lp - lq)).sum(axis=1)
    g_kl = tau * (np.exp(lq) - np.exp(lp))
    rows = s.shape[0]
    loss = alpha * ce.sum() / n_lab + (1 - alpha) * kl.sum() / rows
    grad = alpha * g_ce / n_lab + (1 - alpha) * g_kl / rows
    return loss, grad


@pytest.mark.parametrize("alpha,tau", [(0.5, 4.0), (0.2, 2.0), (1.0, 4.0), (0.0, 3.0)])
def test_kd_objective_matches_numpy(alpha, tau):
    rng = np.random.default_rng(3)
    s = rng.normal(scale=3, size=(40, 10)).astype(np.float32)
    t = rng.normal(scale=3, size=(40, 10)).astype(np.float32)
    y = rng.integers(0, 10, size=40)
    y[rng.random(40) < 0.7] = demo.IGNORE  # most rows unlabelled, as in the demo's batches
    hard, soft = demo.kd_distillers(alpha, tau)
    loss, grad = demo.kd_loss_and_grad(hard, soft, s, t, y, demo.Clock())
    ref_loss, ref_grad = _np_kd(s, t, y, alpha, tau)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_kd_objective_without_labelled_rows():
    rng = np.random.default_rng(4)
    s = rng.normal(size=(8, 10)).astype(np.float32)
    t = rng.normal(size=(8, 10)).astype(np.float32)
    y = np.full(8, demo.IGNORE)
    hard, soft = demo.kd_distillers(0.5, 4.0)
    loss, grad = demo.kd_loss_and_grad(hard, soft, s, t, y, demo.Clock())
    ref_loss, ref_grad = _np_kd(s, t, y, 0.5, 4.0)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_mlp_backward_matches_finite_differences():
    rng = np.random.default_rng(5)
    m = demo.MLP((6, 5, 4, 3), rng)
    m.params = [p.astype(np.float64) for p in m.params]
    x = rng.normal(size=(7, 6))
    r = rng.normal(size=(7, 3))  # loss = sum(logits * r), so d loss / d logits = r
    logits, acts = m.forward(x)
    grads = m.backward(acts, r)
    eps = 1e-6
    for p, g in zip(m.params, grads):
        flat = p.reshape(-1)
        for i in range(0, flat.size, max(1, flat.size // 7)):
            old = flat[i]
            flat[i] = old + eps
            up = np.sum(m.logits(x) * r)
            flat[i] = old - eps
            down = np.sum(m.logits(x) * r)
            flat[i] = old
            assert g.reshape(-1)[i] == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-7)


def test_verdict_rule():
    assert demo.verdict([6.0, 7.0, 5.5, 6.5])[0] == "distillation helps in this setting"
    assert demo.verdict([-6.0, -7.0, -5.5])[0] == "distillation hurts in this setting"
    assert demo.verdict([1.0, -1.0, 0.4, -0.2])[0] == "no clear difference in this setting"
    assert demo.verdict([0.2, 0.3, 0.25])[0] == "no clear difference in this setting"  # tiny, if consistent
    word, mean, se = demo.verdict([2.0, 4.0])
    assert mean == pytest.approx(3.0) and se == pytest.approx(np.std([2.0, 4.0], ddof=1) / np.sqrt(2))
    assert "one seed" in demo.verdict([3.0])[0]


def test_main_quiet_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    assert demo.main(["--epochs", "2", "--repeats", "1", "--quiet", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "epoch 1/2" not in text and "setting" not in text and "verdict:" in text and str(png) in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_all_labels(capsys):
    assert demo.main(["--epochs", "1", "--repeats", "1", "--labelled", "all", "-q", "--seed", "2"]) == 0
    text = capsys.readouterr().out
    assert "student, no KD     1,210    1258" in text


def test_main_errors(capsys, monkeypatch):
    assert demo.main(["--labelled", "100000", "--epochs", "1"]) == 2
    assert "--labelled must be between 1 and 1258" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--alpha", "1.5"])
    with pytest.raises(SystemExit):
        demo.main(["--temperature", "0"])
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    assert demo.main(["--epochs", "1"]) == 2
    assert "pip install 'fastdistill[demo]'" in capsys.readouterr().err


def test_main_without_matplotlib(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert demo.main(["--epochs", "1", "--plot", str(tmp_path / "x.png")]) == 2
    assert "matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cuda_backend_unavailable(capsys):
    import fastdistill

    if "cuda" in fastdistill.available_backends():
        pytest.skip("a GPU is available")
    assert demo.main(["--backend", "cuda", "--epochs", "1"]) == 2
    assert "cuda" in capsys.readouterr().err


def test_command_line():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "fastdistill", "demo", "--epochs", "1", "--repeats", "1", "-q"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "held-out test accuracy" in p.stdout and "verdict:" in p.stdout

"""``fastdistill bench``: the command line (--quick, --json, --plot), its baselines and its floors.

The timings themselves are not asserted (they depend on the machine); what is asserted is that the
report has the promised structure, that its ratios are the ratios of its times, and that every baseline
and floor computes what it claims, against independent float64 references.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fastdistill import bench as B
from fastdistill import cli

TAU, HARD_W, SOFT_W, IGNORE = 4.0, 0.5, 0.5, -100


def reference_loss_grad(s, t, y, kl_over_all_rows=False):  # type: ignore[no-untyped-def]
    """float64 ``0.5*CE + 0.5*tau^2*KL`` mean over counted rows, and its gradient.

    ``kl_over_all_rows``: PyTorch's ``batchmean`` KL divides by every row and counts ignored rows.
    """
    s = s.astype(np.float64)
    t = t.astype(np.float64)
    rows, n = s.shape
    counted = y != IGNORE
    n_counted = counted.sum()

    def log_softmax(x):  # type: ignore[no-untyped-def]
        m = x.max(axis=1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))

    lp1 = log_softmax(s)
    lq = log_softmax(s / TAU)
    lp = log_softmax(t / TAU)
    p = np.exp(lp)
    kl_rows = TAU**2 * (p * (lp - lq)).sum(axis=1)
    ce_rows = np.where(counted, -lp1[np.arange(rows), np.where(counted, y, 0)], 0.0)
    if kl_over_all_rows:
        return HARD_W * ce_rows.sum() / n_counted + SOFT_W * kl_rows.sum() / rows, None
    loss = (HARD_W * ce_rows + SOFT_W * kl_rows)[counted].sum() / n_counted
    onehot = np.zeros_like(s)
    onehot[np.arange(rows), np.where(counted, y, 0)] = 1.0
    g = HARD_W * (np.exp(lp1) - onehot) + SOFT_W * TAU * (np.exp(lq) - p)
    g *= (counted / n_counted)[:, None]
    return loss, g


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["bench", "--quick", "--json", str(out)])
    assert rc == 0
    return json.loads(out.read_text()), buf.getvalue()


def test_quick_json_structure(quick_report: tuple[dict, str]) -> None:
    report, _ = quick_report
    import fastdistill

    assert report["fastdistill_version"] == fastdistill.__version__
    m = report["machine"]
    assert m["cpu"] == B.cpu_model() and m["cpu"]
    assert m["threads"] == fastdistill.get_num_threads()
    assert report["config"]["quick"] is True
    assert report["config"]["shapes"] == [list(s) for s in B.QUICK_SHAPES]
    seen = {(tuple(e["shape"]), e["op"]) for e in report["results"]}
    assert seen == {(s, op) for s in B.QUICK_SHAPES for op in B.OPS}
    for e in report["results"]:
        t = e["times_ms"]
        assert set(t) == {"fastdistill", "fastdistill_f32", "numpy", "torch", "floor_read", "floor_rw"}
        assert t["fastdistill_f32"] is None  # (timed for 16-bit dtypes only)
        for name in ("fastdistill", "numpy", "floor_read", "floor_rw"):
            assert t[name] > 0 and e["samples"][name] >= B.TIMING_QUICK[2]
            assert e["min_ms"][name] <= t[name]
        assert e["speedup"]["numpy"] == pytest.approx(t["numpy"] / t["fastdistill"])
        assert e["x_floor"]["read"] == pytest.approx(t["fastdistill"] / t["floor_read"])
        assert e["x_floor"]["rw"] == pytest.approx(t["fastdistill"] / t["floor_rw"])
        if t["torch"] is not None:
            assert e["speedup"]["torch"] == pytest.approx(t["torch"] / t["fastdistill"])
        assert e["check"]["ok"], e["check"]
        assert e["bytes_per_array"] == e["shape"][0] * e["shape"][1] * 4
    if m["threads"] > 1:
        assert [s["op"] for s in report["scaling"]] == ["forward", "forward+grad"]
        for s in report["scaling"]:
            assert s["shape"] == list(B.QUICK_SCALING)
            assert s["speedup"] == pytest.approx(s["ms_1_thread"] / s["ms_all_threads"])


def test_quick_table_names_machine_and_shapes(quick_report: tuple[dict, str]) -> None:
    report, text = quick_report
    assert report["machine"]["cpu"] in text
    n = report["machine"]["threads"]
    assert f"{n} thread" in text
    for s in B.QUICK_SHAPES:
        assert B.shape_name(s) in text
    assert "forward+grad" in text and "softmax" in text and "MISMATCH" not in text


def test_torch_in_report_when_installed(quick_report: tuple[dict, str]) -> None:
    torch = pytest.importorskip("torch")
    report, _ = quick_report
    assert report["machine"]["torch"] == torch.__version__
    assert all(e["times_ms"]["torch"] > 0 for e in report["results"])


def test_shapes_threads_no_torch(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r.json"
    rc = B.main(["--quick", "--shapes", "8x64,3x50", "--no-torch", "--threads", "1", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["shapes"] == [[8, 64], [3, 50]]
    assert report["machine"]["threads"] == 1 and report["machine"]["torch"] is None
    assert all(e["times_ms"]["torch"] is None and e["speedup"]["torch"] is None for e in report["results"])
    assert report["scaling"] == []  # one thread: nothing to compare
    assert "1 thread" in capsys.readouterr().out


def test_plot_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    png = tmp_path / "chart.png"
    rc = B.main(["--quick", "--shapes", "8x64", "--no-torch", "--scaling", "none", "--plot", str(png)])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    png = tmp_path / "chart.png"
    rc = B.main(["--quick", "--shapes", "8x64", "--no-torch", "--scaling", "none", "--plot", str(png)])
    assert rc == 0
    assert not png.exists()
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pip install" in err


@pytest.mark.parametrize("argv", [["--shapes", "16384by1000"], ["--shapes", "0x10"], ["--threads", "0"],
                                  ["--threads", "100000"], ["--scaling", "1x"]])
def test_bad_arguments(argv, capsys) -> None:  # type: ignore[no-untyped-def]
    try:
        rc = B.main(["--quick", *argv])
    except SystemExit as exc:  # argparse usage error
        rc = exc.code
    assert rc == 2
    assert capsys.readouterr().err


def test_parse_shapes() -> None:
    assert B.parse_shapes("16384x1000, 64x1000") == [(16384, 1000), (64, 1000)]
    assert B.parse_shape("1X262144") == (1, 262144)


def test_import_is_light() -> None:
    code = ("import sys, fastdistill.bench; "
            "print(sorted(m for m in ('torch', 'numba', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- the baselines and floors are right


def test_case_inputs() -> None:
    c = B.Case((200, 37))
    assert c.student.dtype == np.float32 and c.student.flags.c_contiguous and c.teacher.shape == (200, 37)
    ignored = c.labels == IGNORE
    assert ignored.sum() == 20
    assert ((c.labels[~ignored] >= 0) & (c.labels[~ignored] < 37)).all()
    assert (B.Case((1, 5000)).labels != IGNORE).all()  # a single row always counts
    again = B.Case((200, 37))
    np.testing.assert_array_equal(again.student, c.student)  # deterministic inputs


def test_numpy_baseline_matches_float64_reference() -> None:
    c = B.Case((50, 300))
    ref_loss, ref_g = reference_loss_grad(c.student, c.teacher, c.labels)
    loss, g = B.numpy_response(c.student, c.teacher, c.labels, True, np.empty_like(c.student))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(g, ref_g, rtol=1e-4, atol=1e-7)
    assert g.dtype == np.float32
    loss_only, none = B.numpy_response(c.student, c.teacher, c.labels, False)
    assert none is None and loss_only == pytest.approx(ref_loss, rel=1e-5)
    x = c.student.astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(B.numpy_softmax(c.student), e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_fastdistill_call_matches_float64_reference() -> None:
    c = B.Case((40, 500))
    ref_loss, ref_g = reference_loss_grad(c.student, c.teacher, c.labels)
    assert B.fastdistill_call(c, "forward")() == pytest.approx(ref_loss, rel=1e-5)
    loss, g = B.fastdistill_call(c, "forward+grad")()
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert g is c.grad  # the preallocated buffer is used
    np.testing.assert_allclose(g, ref_g, rtol=1e-4, atol=1e-7)


def test_torch_baseline_matches_its_formula() -> None:
    torch = pytest.importorskip("torch")
    c = B.Case((30, 200))
    ref_loss, _ = reference_loss_grad(c.student, c.teacher, c.labels, kl_over_all_rows=True)
    assert B.torch_call(c, "forward", torch)() == pytest.approx(ref_loss, rel=1e-5)
    loss, g = B.torch_call(c, "forward+grad", torch)()
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert tuple(g.shape) == c.shape
    sm = B.torch_call(c, "softmax", torch)().numpy()
    x = c.student.astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(sm, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(3, 7), (64, 1000), (1, 40000)])
def test_floors_read_and_write_everything(shape) -> None:  # type: ignore[no-untyped-def]
    c = B.Case(shape)
    s64 = c.student.astype(np.float64)
    t64 = c.teacher.astype(np.float64)
    scale = np.abs(s64).sum() + np.abs(t64).sum()
    loss_floors = B.floor_calls(c, "forward+grad")
    assert float(loss_floors["floor_read"]()) == pytest.approx(s64.sum() + t64.sum(), abs=1e-5 * scale)
    c.out.fill(np.nan)
    loss_floors["floor_rw"]()
    np.testing.assert_array_equal(c.out, c.student - c.teacher)
    sm_floors = B.floor_calls(c, "softmax")
    assert float(sm_floors["floor_read"]()) == pytest.approx(s64.sum(), abs=1e-5 * np.abs(s64).sum())
    c.out.fill(np.nan)
    sm_floors["floor_rw"]()
    np.testing.assert_array_equal(c.out, c.student * np.float32(0.5))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtype(tmp_path, capsys, dtype) -> None:  # type: ignore[no-untyped-def]
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    out = tmp_path / "r.json"
    rc = B.main(["--quick", "--shapes", "8x300", "--no-torch", "--scaling", "none", "--dtype", dtype,
                 "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["dtype"] == dtype
    for e in report["results"]:
        assert e["bytes_per_array"] == 8 * 300 * 2  # the logits are stored in 16 bits
        t = e["times_ms"]
        assert t["fastdistill_f32"] > 0  # the same values in float32, side by side
        assert e["speedup"]["float32"] == pytest.approx(t["fastdistill_f32"] / t["fastdistill"])
        assert e["check"]["ok"], e["check"]
    text = capsys.readouterr().out
    assert f"{dtype} logits" in text and "vs float32" in text


def test_streaming_floor_writes_what_the_plain_floor_writes():
    """``rw1_stream`` (streaming stores from a staging block) against ``rw1``, for outputs whose lines
    start anywhere and sizes that are not a multiple of a block."""
    k = B.floor_kernels()
    rng = np.random.default_rng(3)
    for n in (5, B.BLOCK + 37, 3 * B.BLOCK):
        a = rng.standard_normal(n).astype(np.float32)
        for off in (0, 1, 7):
            buf = np.full(n + off + 1, 9.0, dtype=np.float32)
            out = buf[off:off + n]
            k["rw1_stream"](a, out)
            np.testing.assert_array_equal(out, a * np.float32(0.5))
            assert np.all(buf[:off] == 9.0) and buf[-1] == 9.0

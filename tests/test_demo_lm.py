"""``fastdistill demo lm``: the corpus split, the KD objective against PyTorch on full logits, the
offline route (the teacher's top-k captured into a store, the rows a batch reads, the store's views
reaching the loss without a copy), the output of a quick run, the command line."""
from __future__ import annotations

import io
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

import numpy as np  # noqa: E402

import fastdistill as fd  # noqa: E402
from fastdistill import demo, demo_lm  # noqa: E402
from fastdistill.errors import InvalidParameterError  # noqa: E402
from fastdistill.torch import FusedLinearDistillationLoss  # noqa: E402


def test_held_out_text_is_a_tenth_and_never_trained_on():
    train, held = demo_lm.corpus()
    n_train, n_held = sum(map(len, train)), sum(map(len, held))
    assert 0.07 < n_held / (n_train + n_held) < 0.13
    joined = "\n".join(train)
    # no held-out paragraph is in the training text (topics quote each other: "Private name mangling"
    # is in two of them)
    paragraphs = [p for h in held for p in h.split("\n\n") if len(p) > 40]
    assert len(paragraphs) > 100 and not any(p in joined for p in paragraphs)


def test_kd_objective_equals_the_composition_on_full_logits():
    GPT = demo_lm._gpt_class()
    torch.manual_seed(0)
    teacher, student = GPT(50, 8, 16, 1, 2), GPT(50, 8, 8, 1, 2)
    x = torch.randint(0, 50, (3, 8))
    y = torch.randint(0, 50, (3, 8))
    tau, alpha = 2.0, 0.3
    fused = FusedLinearDistillationLoss("kl_divergence", temperature=tau, hard_label_weight=alpha,
                                        soft_label_weight=1 - alpha, chunk_size=5)
    got = demo_lm.kd_loss(fused, teacher)(student, x, y)
    got.backward()
    g_got = student.embed.weight.grad.clone()
    student.zero_grad()
    s = student.logits(x).reshape(-1, 50).double()
    with torch.no_grad():
        t = teacher.logits(x).reshape(-1, 50).double()
    ce = torch.nn.functional.cross_entropy(s, y.reshape(-1))
    kl = (torch.softmax(t / tau, -1) * (torch.log_softmax(t / tau, -1) - torch.log_softmax(s / tau, -1))).sum(-1)
    want = alpha * ce + (1 - alpha) * tau**2 * kl.mean()
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert torch.allclose(g_got, student.embed.weight.grad, rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("pyarrow")
    out = io.StringIO()
    store = tmp_path_factory.mktemp("demo_lm") / "teacher_store"
    res = demo_lm.run(demo_lm.LMConfig.quick(), out=out, store=store)
    return res, out.getvalue(), store


def test_quick_run_reports_perplexities_time_and_memory(quick):
    res, text, _ = quick
    for needle in ("corpus   pydoc_data.topics", "byte-level BPE", "teacher  GPT", "students GPT",
                   "FusedLinearDistillationLoss(chunk_size=64)", "held-out perplexity", "student, no KD",
                   "student, KD", "student, KD from the stored top-16", "teacher store:", "peak memory",
                   "verdict:", "offline:"):
        assert needle in text, needle
    assert text.count("step 20/20") == 3 and text.count("step 30/30") == 1
    vocab = res["vocab"]
    assert vocab == 512
    for key in ("teacher", "no_kd", "kd", "kd_store"):
        r = res[key]
        # trained: below the uniform guess's perplexity (the vocabulary size), above 1
        assert 1.0 < r["perplexity"] < vocab, (key, r)
        assert r["seconds"] > 0 and r["peak_mib"] > 0
    assert res["kd_gain"] == pytest.approx(res["no_kd"]["perplexity"] - res["kd"]["perplexity"])
    assert res["verdict"].startswith("distillation helps" if res["kd_gain"] > 0 else "distillation does not help")
    assert res["logits_mib"]["chunk"] < res["logits_mib"]["full"]


def test_quick_run_writes_the_store_it_trains_from(quick):
    from fastdistill import teachers

    res, text, path = quick
    n, k, vocab = res["train_tokens"], 16, res["vocab"]
    st = res["store"]
    assert st["tokens"] == n and st["k"] == k and st["path"] == str(path) and st["kept"]
    store = teachers.load(path, verify=True)  # kept (--store), whole (the CRCs)
    assert len(store) == 1 and store.lengths.tolist() == [n] and store.k == k and store.kind == "logprobs"
    assert store.meta["vocab_size"] == vocab and store.meta["context"] == 32 and store.temperature == 1.0
    t = store[0]
    assert t.shape == (n, k) and t.indices.dtype == np.int32 and t.values.dtype == np.float16
    # k * (4 + 2) bytes a position and the shard's headers, nothing more
    assert n * k * 6 <= st["bytes"] <= n * k * 6 + 4096
    assert st["bytes"] == sum(f.stat().st_size for f in store.files)
    assert f"{st['bytes_per_token']:.1f} bytes a position (k * (2 + 4) = 96)" in text
    # every row a distribution's top k: distinct ids in range, decreasing log-probabilities, mass <= 1
    ids, vals = np.asarray(t.indices), np.asarray(t.values, np.float64)
    assert ids.min() >= 0 and ids.max() < vocab
    srt = np.sort(ids, axis=1)
    assert (srt[:, 1:] != srt[:, :-1]).all()
    assert (np.diff(vals, axis=1) <= 0).all() and (vals <= 0).all()
    mass = np.exp(vals).sum(1)
    assert (mass <= 1.01).all() and mass.mean() > 0.1
    r = res["kd_store"]
    assert math.isfinite(r["perplexity"]) and 1.0 < r["perplexity"] < vocab
    assert res["kd_store_gain"] == pytest.approx(res["no_kd"]["perplexity"] - r["perplexity"])
    assert res["verdict_store"].startswith("distillation from the stored top-k " +
                                           ("helps" if res["kd_store_gain"] > 0 else "does not help"))


@pytest.mark.parametrize("n,context", [(53, 8), (8, 8), (9, 8), (100, 7), (64, 16), (30, 1)])
def test_score_windows_cover_every_position_once_with_half_a_context_before_it(n, context):
    seen = np.zeros(n, int)
    for w, kept in demo_lm._score_windows(n, context):
        assert 0 <= w <= kept <= w + context <= n
        seen[kept:w + context] += 1
        if w > 0:  # positions after the first window: at least context // 2 tokens before them
            assert kept - w >= context // 2
    assert (seen == 1).all()


def _window_of(p, n, context):
    """The start of the window that scores position ``p`` (written out from the documented rule)."""
    half = context // 2
    if p < context:
        return 0
    w = half * ((p - context) // half + 1)  # the first start, half a context apart, whose window reaches p
    return min(w, n - context)


def test_capture_rows_are_the_teachers_top_k_at_each_position(tmp_path):
    pytest.importorskip("pyarrow")
    from fastdistill import teachers

    GPT = demo_lm._gpt_class()
    torch.manual_seed(0)
    teacher = GPT(40, 8, 16, 1, 2)
    ids = torch.randint(0, 40, (53,))
    info = demo_lm.capture(teacher, ids, 8, 5, tmp_path / "s", windows_per_chunk=3)
    assert info["tokens"] == 53 and info["k"] == 5 and teacher.training  # (left as it was)
    t = teachers.load(tmp_path / "s")[0]
    assert t.shape == (53, 5)
    teacher.eval()
    for p in range(53):
        w = _window_of(p, 53, 8)
        with torch.no_grad():
            logits = teacher.logits(ids[w:w + 8][None])[0, p - w].numpy()
        want = fd.top_k(logits[None], 5)
        assert np.array_equal(t.indices[p], np.asarray(want.indices)[0]), p
        np.testing.assert_allclose(np.asarray(t.values[p], np.float32), np.asarray(want.values)[0], rtol=1e-3,
                                   atol=1e-3)


def test_capture_refuses_bad_arguments_naming_them(tmp_path):
    GPT = demo_lm._gpt_class()
    torch.manual_seed(0)
    teacher = GPT(40, 8, 16, 1, 2)
    ids = torch.randint(0, 40, (20,))
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cases = [(dict(teacher=object()), "teacher"), (dict(ids=ids.float()), "ids"), (dict(ids=ids[None]), "ids"),
             (dict(ids=ids.tolist()), "ids"), (dict(ids=ids[:5]), "ids"), (dict(ids=ids + 40), "ids"),
             (dict(context=0), "context"), (dict(context=2.0), "context"), (dict(k=0), "k"), (dict(k=41), "k"),
             (dict(k=True), "k"), (dict(windows_per_chunk=0), "windows_per_chunk"), (dict(meta=[1]), "meta"),
             (dict(path=full), "path"), (dict(path=3.5), "path")]
    for over, name in cases:
        kw = dict(teacher=teacher, ids=ids, context=8, k=4, path=tmp_path / "s")
        kw.update(over)
        with pytest.raises(InvalidParameterError, match=f"^{name} "):
            demo_lm.capture(**kw)
    assert not (tmp_path / "s").exists()


def _one_sequence_store(path, n=50, k=3, temperature=1.0):
    from fastdistill import teachers

    rng = np.random.default_rng(0)
    ind = np.stack([rng.choice(30, k, replace=False) for _ in range(n)]).astype(np.int32)
    val = np.sort(np.log(rng.dirichlet(np.ones(30), n)[:, :k]), axis=1)[:, ::-1].astype(np.float32)
    teachers.save(path, fd.SparseTeacher(ind, val, temperature=temperature), meta={"vocab_size": 30})
    return teachers.load(path, tail="support")[0]


def test_window_rows_reads_each_windows_rows_in_their_stored_dtype(tmp_path):
    pytest.importorskip("pyarrow")
    rows = _one_sequence_store(tmp_path / "s", temperature=2.0)
    starts = torch.tensor([0, 7, 47, 7])
    got = demo_lm.window_rows(rows, starts, 3)
    assert got.shape == (12, 3) and got.indices.dtype == torch.int32 and got.values.dtype == torch.float16
    for b, s in enumerate(starts.tolist()):
        assert np.array_equal(got.indices[3 * b:3 * b + 3].numpy(), rows.indices[s:s + 3])
        assert np.array_equal(got.values[3 * b:3 * b + 3].numpy(), rows.values[s:s + 3])
    assert got.kind == rows.kind and got.tail == "support" and got.temperature == 2.0
    assert demo_lm.window_rows(rows, np.array([10], np.int64), 40).shape == (40, 3)  # up to the last row
    cases = [((np.zeros((5, 2)), starts, 3), "rows"),
             ((fd.SparseTeacher(np.zeros((2, 5, 3), np.int32), np.zeros((2, 5, 3), np.float32)), starts, 3), "rows"),
             ((rows, starts, 0), "length"), ((rows, starts, 2.5), "length"),
             ((rows, starts.float(), 3), "start"), ((rows, starts[None], 3), "start"),
             ((rows, torch.tensor([-1]), 3), "start"), ((rows, torch.tensor([48]), 3), "start")]
    for args, name in cases:
        with pytest.raises(InvalidParameterError, match=f"^{name} "):
            demo_lm.window_rows(*args)


def test_store_views_reach_the_fused_loss_without_a_copy(tmp_path):
    """What the offline step (and ``bench/teacher_store_step.py``'s ``view`` route) gives the loss: the
    store's arrays, read-only views of the mapped shard, become tensors over the same memory (the
    float16 values are not converted), and the loss and gradients equal those from in-memory copies."""
    pytest.importorskip("pyarrow")
    import warnings

    rows = _one_sequence_store(tmp_path / "s")
    assert not rows.values.flags.owndata and not rows.values.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "The given NumPy array is not writable"
        for a in (rows.indices, rows.values):
            ta = torch.as_tensor(a)
            assert ta.data_ptr() == a.ctypes.data and ta.dtype == (torch.int32 if a is rows.indices else torch.float16)
        torch.manual_seed(0)
        h, w = torch.randn(50, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
        y = torch.randint(0, 30, (50,))
        fused = FusedLinearDistillationLoss("kl_divergence", hard_label_weight=0.5, soft_label_weight=0.5,
                                            chunk_size=16)
        mapped = fused(h, w, rows, labels=y)
        g_mapped = torch.autograd.grad(mapped, (h, w))
        copy = fd.SparseTeacher(np.array(rows.indices), np.array(rows.values), tail=rows.tail)
        in_memory = fused(h, w, copy, labels=y)
        g_memory = torch.autograd.grad(in_memory, (h, w))
    assert float(mapped.detach()) == float(in_memory.detach())
    assert all(torch.equal(a, b) for a, b in zip(g_mapped, g_memory))


def test_perplexity_of_an_untrained_model_is_near_the_vocabulary_size():
    GPT = demo_lm._gpt_class()
    torch.manual_seed(0)
    model = GPT(300, 16, 16, 1, 2)
    ids = torch.randint(0, 300, (1000,))
    ppl = demo_lm.perplexity(model, ids, 16)
    assert 250 < ppl < 360 and math.isfinite(ppl)


def test_command_line(capsys):
    assert demo.main(["lm", "--quick", "--quiet", "--student-steps", "3", "--teacher-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "verdict:" in out and "step 1/" not in out  # --quiet: the results only
    with pytest.raises(SystemExit):
        demo.main(["lm", "--alpha", "2"])
    with pytest.raises(SystemExit):
        demo.main(["lm", "--student-steps", "0"])
    with pytest.raises(SystemExit):
        demo.main(["lm", "--quick", "--top-k", "513"])  # above the quick vocabulary
    with pytest.raises(SystemExit):
        demo.main(["lm", "--top-k", "0"])


def test_without_pyarrow_the_offline_route_is_left_out(monkeypatch):
    import dataclasses
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    out = io.StringIO()
    cfg = dataclasses.replace(demo_lm.LMConfig.quick(), teacher_steps=2, student_steps=2)
    res = demo_lm.run(cfg, out=out)
    text = out.getvalue()
    assert "no teacher store (the offline route needs pyarrow" in text
    assert "kd_store" not in res and "store" not in res and "offline:" not in text
    assert text.count("step 2/2") == 3 and "verdict:" in text


def test_command_line_store_option(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    from fastdistill import teachers

    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(SystemExit):
        demo.main(["lm", "--quick", "--store", str(full)])  # never appended to
    capsys.readouterr()
    path = tmp_path / "kept"
    assert demo.main(["lm", "--quick", "--quiet", "--student-steps", "2", "--teacher-steps", "2", "--top-k", "4",
                      "--store", str(path)]) == 0
    out = capsys.readouterr().out
    assert "student, KD from the stored top-4" in out and "offline:" in out
    store = teachers.load(path)
    assert store.k == 4 and len(store) == 1

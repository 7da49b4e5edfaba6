"""``fastdistill demo lm``: the corpus split, the KD objective against PyTorch on full logits, the
output of a quick run, the command line."""
from __future__ import annotations

import io
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from fastdistill import demo, demo_lm  # noqa: E402
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
def quick():
    out = io.StringIO()
    res = demo_lm.run(demo_lm.LMConfig.quick(), out=out)
    return res, out.getvalue()


def test_quick_run_reports_perplexities_time_and_memory(quick):
    res, text = quick
    for needle in ("corpus   pydoc_data.topics", "byte-level BPE", "teacher  GPT", "students GPT",
                   "FusedLinearDistillationLoss(chunk_size=64)", "held-out perplexity", "student, no KD",
                   "student, KD", "peak memory", "verdict:"):
        assert needle in text, needle
    assert text.count("step 20/20") == 2 and text.count("step 30/30") == 1
    vocab = res["vocab"]
    assert vocab == 512
    for key in ("teacher", "no_kd", "kd"):
        r = res[key]
        # trained: below the uniform guess's perplexity (the vocabulary size), above 1
        assert 1.0 < r["perplexity"] < vocab, (key, r)
        assert r["seconds"] > 0 and r["peak_mib"] > 0
    assert res["kd_gain"] == pytest.approx(res["no_kd"]["perplexity"] - res["kd"]["perplexity"])
    assert res["verdict"].startswith("distillation helps" if res["kd_gain"] > 0 else "distillation does not help")
    assert res["logits_mib"]["chunk"] < res["logits_mib"]["full"]


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

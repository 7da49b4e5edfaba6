"""``fastdistill teacher capture`` against a stand-in server on 127.0.0.1 (threaded http.server, a free
port, a bounded number of requests, stops by itself) answering in vLLM's and SGLang's documented formats,
faults included: a refused connection, HTTP 500 then success, an answer slower than the timeout, malformed
JSON, another engine's server, and a client killed in the middle followed by a resume."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("httpx")
pytest.importorskip("pyarrow")
pytest.importorskip("tqdm")

import fastdistill.teachers as T  # noqa: E402
from fastdistill.cli import main  # noqa: E402
from fastdistill.teachers import CaptureError  # noqa: E402
from fastdistill.teachers._stub import StubServer, TinyTeacher  # noqa: E402

K = 6
FAST = {"retries": 2, "backoff": 0.01, "progress": False}


def _input(tmp_path: Path, n: int = 12, seed: int = 0, name: str = "in.jsonl") -> tuple[Path, list[list[int]]]:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, 97, int(rng.integers(1, 30))).tolist() for _ in range(n)]
    p = tmp_path / name
    lines = [json.dumps(s) if i % 3 else json.dumps({"input_ids": s}) for i, s in enumerate(seqs)]
    p.write_text("\n".join(lines[:4]) + "\n\n" + "\n".join(lines[4:]) + "\n")  # a blank line is skipped
    return p, seqs


def _expect_store(out: Path, seqs: list[list[int]], k: int = K) -> None:
    store = T.load(out)
    tiny = TinyTeacher()
    assert len(store) == len(seqs) and store.k == k
    for i, toks in enumerate(seqs):
        ei, ev = tiny.expected(toks, k)
        t = store[i]
        assert t.shape == (len(toks), k)  # exactly k slots per row
        np.testing.assert_array_equal(np.asarray(t.indices), ei)
        np.testing.assert_allclose(np.asarray(t.values, np.float32), ev.astype(np.float16).astype(np.float32))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("decoder", ["msgspec", "json"])
@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_capture_matches_the_teacher(tmp_path, monkeypatch, engine, decoder):
    if decoder == "json":  # without msgspec: the standard library's json and the readers' generic paths
        from fastdistill.teachers import _capture

        monkeypatch.setattr(_capture, "_msgspec", lambda: None)
    else:
        pytest.importorskip("msgspec")
    inp, seqs = _input(tmp_path)
    out = tmp_path / "store"
    with StubServer(engine) as stub:
        res = T.capture(stub.url, engine, inp, K, out, concurrency=3, shard_sequences=5, **FAST,
                        meta={"tokenizer": "tiny"})
    assert (res.sequences, res.captured, res.resumed_from) == (12, 12, 0)
    assert res.tokens == sum(map(len, seqs))
    _expect_store(out, seqs)
    meta = T.load(out).meta
    assert meta["source"] == engine and meta["model"] == "stub-teacher" and meta["k"] == K
    assert meta["temperature"] == 1.0 and meta["tokenizer"] == "tiny"
    assert len(list(out.glob("shard-*.arrow"))) == 3  # 5 + 5 + 2
    body = stub.bodies[0]
    if engine == "vllm":
        assert body["prompt_logprobs"] == K and body["echo"] is True and body["max_tokens"] == 1
        assert body["model"] == "stub-teacher" and isinstance(body["prompt"], list)
    else:
        assert body["return_logprob"] is True and body["top_logprobs_num"] == K
        assert body["logprob_start_len"] == 0 and body["sampling_params"]["max_new_tokens"] == 1
        assert isinstance(body["input_ids"], list)
    assert sorted(tuple(b["prompt" if engine == "vllm" else "input_ids"]) for b in stub.bodies) == sorted(map(tuple, seqs))


def test_capture_retries_http_500_then_succeeds(tmp_path):
    inp, seqs = _input(tmp_path, n=4)
    with StubServer("vllm", faults=["500", "503", "500"]) as stub:
        res = T.capture(stub.url + "/v1", "vllm", inp, K, tmp_path / "s", concurrency=1, retries=3,  # a base URL
                        backoff=0.01, progress=False)
    assert res.requests == 1 + 4 + 3  # the model list, the sequences, the retried failures
    _expect_store(tmp_path / "s", seqs)


def test_capture_retries_an_answer_slower_than_the_timeout(tmp_path):
    inp, seqs = _input(tmp_path, n=3)
    with StubServer("sglang", faults=["slow"], slow_s=3.0) as stub:
        res = T.capture(stub.url, "sglang", inp, K, tmp_path / "s", concurrency=1, timeout=0.6, **FAST)
    assert res.requests >= 1 + 3 + 1  # the slow answer was given up and asked again (a loaded machine may add one)
    _expect_store(tmp_path / "s", seqs)
    with StubServer("sglang", faults=["slow"] * 3, slow_s=0.6) as stub:
        with pytest.raises(CaptureError, match=r"after 2 tries; last: no answer within 0.2 s"):
            T.capture(stub.url, "sglang", inp, K, tmp_path / "t", concurrency=1, timeout=0.2, retries=1,
                      backoff=0.01, progress=False)


def _cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(["teacher", "capture", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_capture_refused_connection_is_a_clear_error(tmp_path, capsys):
    inp, _ = _input(tmp_path, n=2)
    url = f"http://127.0.0.1:{_free_port()}"
    rc, err = _cli(capsys, "--server", url, "--engine", "vllm", "--input", str(inp), "--k", "4",
                   "--out", str(tmp_path / "s"), "--retries", "1", "--backoff", "0.01", "--quiet")
    assert rc == 1
    assert "error: GET /v1/models: no answer from" in err and "after 2 tries" in err
    assert "cannot reach the server (ConnectError" in err


@pytest.mark.parametrize("fault,engine,message", [
    ("malformed", "vllm", "sequence 0: the server's answer is not vLLM's /v1/completions JSON"),
    ("malformed", "sglang", "sequence 0: the server's answer is not SGLang's /generate JSON"),
    ("html", "vllm", "not vLLM's /v1/completions JSON"),
    ("400", "vllm", "answered HTTP 400 to POST /v1/completions: Requested prompt logprobs of 64"),
])
def test_capture_unexpected_answers_are_clear_errors(tmp_path, capsys, fault, engine, message):
    inp, seqs = _input(tmp_path, n=3)
    out = tmp_path / "s"
    with StubServer(engine, faults=[fault]) as stub:
        rc, err = _cli(capsys, "--server", stub.url, "--engine", engine, "--input", str(inp), "--k", str(K),
                       "--out", str(out), "--concurrency", "1", "--retries", "2", "--backoff", "0.01", "--quiet")
    assert rc == 1 and message in err
    assert stub.requests == 2  # not retried: the server answered, with something else
    assert not (out / "fastdistill-teachers.json").exists()  # nothing was scored


def test_capture_against_the_other_engine_is_a_clear_error(tmp_path, capsys):
    inp, _ = _input(tmp_path, n=2)
    with StubServer("sglang") as stub:
        rc, err = _cli(capsys, "--server", stub.url, "--engine", "vllm", "--input", str(inp), "--k", "4",
                       "--out", str(tmp_path / "s"), "--quiet")
    assert rc == 1 and "answered HTTP 404 to GET /v1/models" in err
    with StubServer("vllm") as stub:
        rc, err = _cli(capsys, "--server", stub.url, "--engine", "sglang", "--input", str(inp), "--k", "4",
                       "--out", str(tmp_path / "s"), "--quiet")
    assert rc == 1 and "answered HTTP 404 to GET /get_model_info" in err


def test_capture_input_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2, 3]\n[4, -5]\n")
    with StubServer("vllm") as stub:
        rc, err = _cli(capsys, "--server", stub.url, "--engine", "vllm", "--input", str(bad), "--k", "4",
                       "--out", str(tmp_path / "s"), "--quiet")
        assert rc == 1 and f"{bad}, line 2: expected a non-empty JSON list of token ids" in err
        rc, err = _cli(capsys, "--server", stub.url, "--engine", "vllm", "--input", str(tmp_path / "none"),
                       "--k", "4", "--out", str(tmp_path / "s"), "--quiet")
        assert rc == 1 and "is not a file" in err
        assert stub.requests == 0  # every line is checked before the first request


def test_capture_progress_bar(tmp_path, capsys):
    inp, seqs = _input(tmp_path, n=3)
    with StubServer("vllm") as stub:
        assert main(["teacher", "capture", "--server", stub.url, "--engine", "vllm", "--input", str(inp),
                     "--k", str(K), "--out", str(tmp_path / "s")]) == 0
    cap = capsys.readouterr()
    assert "capture: 100%" in cap.err and "3/3" in cap.err
    assert "3 sequences; this run captured 3" in cap.out


def _wait_for(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_capture_killed_then_resumed_equals_an_uninterrupted_run(tmp_path):
    """A capture process killed (SIGKILL) after two shards, then the same command again: the store holds
    every sequence once, in input order, as an uninterrupted run's."""
    inp, seqs = _input(tmp_path, n=16, seed=4)
    out = tmp_path / "killed"
    # the server answers 8 sequences, then holds the next requests: the client has written 2 shards of 3
    # and holds 2 more sequences in memory when it is killed
    with StubServer("vllm", hold_after=8, max_requests=200, lifetime=60) as stub:
        cmd = [sys.executable, "-m", "fastdistill", "teacher", "capture", "--server", stub.url, "--engine", "vllm",
               "--input", str(inp), "--k", str(K), "--out", str(out), "--concurrency", "2",
               "--shard-sequences", "3", "--quiet"]
        with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
            try:
                manifest = out / "fastdistill-teachers.json"
                _wait_for(lambda: proc.poll() is not None or (manifest.exists() and stub.posts > 8
                                                               and len(T.load(out)) == 6), "two shards")
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
            err = proc.stderr.read().decode()
        assert len(T.load(out)) == 6, err
        stub.release.set()
        res = T.capture(stub.url, "vllm", inp, K, out, concurrency=3, shard_sequences=3, **FAST)
        assert (res.resumed_from, res.captured, res.sequences) == (6, 10, 16)
        T.capture(stub.url, "vllm", inp, K, tmp_path / "whole", concurrency=3, shard_sequences=3, **FAST)
        again = T.capture(stub.url, "vllm", inp, K, out, **FAST)  # complete: nothing to do
        assert again.captured == 0 and again.sequences == 16
    _expect_store(out, seqs)
    a, b = T.load(out), T.load(tmp_path / "whole")
    assert a.meta == b.meta and len(a) == len(b)
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i].indices, b[i].indices)
        np.testing.assert_array_equal(a[i].values, b[i].values)


def test_capture_sigterm_keeps_whole_shards(tmp_path):
    inp, seqs = _input(tmp_path, n=12, seed=5)
    out = tmp_path / "s"
    with StubServer("sglang", hold_after=5, lifetime=60) as stub:  # 5 answers, then the 6th is held
        cmd = [sys.executable, "-m", "fastdistill", "teacher", "capture", "--server", stub.url, "--engine",
               "sglang", "--input", str(inp), "--k", str(K), "--out", str(out), "--concurrency", "1",
               "--shard-sequences", "100", "--quiet"]
        with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
            try:
                _wait_for(lambda: proc.poll() is not None or stub.posts > 5, "the held request")
                time.sleep(0.1)
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(timeout=20)
            finally:
                if proc.poll() is None:
                    proc.kill()
            err = proc.stderr.read().decode()
        assert rc == 143 and "Traceback" not in err and "run the same command again to resume" in err, err
        assert len(T.load(out)) == 5  # what had come back was written although no shard was full
        stub.release.set()
        T.capture(stub.url, "sglang", inp, K, out, **FAST)
    _expect_store(out, seqs)


def test_resume_refuses_another_input_or_other_options(tmp_path):
    inp, seqs = _input(tmp_path, n=4)
    other, _ = _input(tmp_path, n=4, seed=9, name="other.jsonl")
    out = tmp_path / "s"
    with StubServer("vllm") as stub:
        T.capture(stub.url, "vllm", inp, K, out, shard_sequences=2, **FAST)
        with pytest.raises(CaptureError, match="is not the one the store .* was captured from"):
            T.capture(stub.url, "vllm", other, K, out, **FAST)
        with pytest.raises(CaptureError, match="captured with k=6, this run asks for 4"):
            T.capture(stub.url, "vllm", inp, 4, out, **FAST)
        with pytest.raises(CaptureError, match="captured with source='vllm', this run asks for 'sglang'"):
            T.capture(stub.url, "sglang", inp, K, out, **FAST)
        short = tmp_path / "short.jsonl"
        short.write_text(json.dumps(seqs[0]) + "\n")
        with pytest.raises(CaptureError, match="holds 4 sequences but the input"):
            T.capture(stub.url, "vllm", short, K, out, **FAST)
    with StubServer("vllm", model="another-teacher") as stub:  # the server now serves another model
        with pytest.raises(CaptureError, match="captured with model='stub-teacher', this run has 'another-teacher'"):
            T.capture(stub.url, "vllm", inp, K, out, **FAST)
    assert stub.requests == 1  # found before any sequence was sent
    (tmp_path / "file").write_text("x")
    with pytest.raises(T.TeacherStoreError, match="is a file"):
        T.capture("http://127.0.0.1:9", "vllm", inp, K, tmp_path / "file", **FAST)

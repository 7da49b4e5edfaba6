"""A stand-in teacher server for tests and benchmarks: it answers vLLM's ``/v1/completions`` and SGLang's
``/generate`` in their documented JSON formats, from a small deterministic teacher model (or from
pre-built answers), on 127.0.0.1 only.

It serves a bounded number of requests and stops by itself after ``lifetime`` seconds. Faults can be
queued: each request takes the next one (``"500"``, ``"503"``, ``"400"``, ``"slow"`` (answers after
``slow_s`` seconds), ``"malformed"`` (truncated JSON), ``"html"``, ``"drop"`` (closes the connection)).

The payload builders (:func:`vllm_prompt_logprobs`, :func:`vllm_response`, :func:`sglang_response`,
:func:`flat_logprobs`) follow the engines' sources: vLLM's prompt log-probabilities list ``None`` for
the first prompt token, then per position the prompt token itself (with its rank) followed by the top-k
(ranks 1..k), merged into a dict (``vllm/logprobs.py``: ``append_logprobs_for_next_position``); the
OpenAI-compatible server serialises them under ``choices[i].prompt_logprobs`` with string ids.
SGLang's ``meta_info.input_top_logprobs`` holds ``None`` for the first position, then lists of
``[logprob, token_id, text]`` (``text`` null unless ``return_text_in_logprobs``).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np


class TinyTeacher:
    """A deterministic causal "teacher": the logits after ``prefix`` depend on its last token and its
    length (so a distribution read one position off is a different distribution)."""

    def __init__(self, vocab: int = 97, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.w = rng.normal(scale=2.5, size=(vocab, vocab))
        self.u = rng.normal(scale=1.5, size=(7, vocab))

    def log_probs(self, prefix: list[int]) -> np.ndarray:
        """``log_softmax`` of the logits for the token after ``prefix`` (float64)."""
        z = self.w[prefix[-1] % self.vocab] + self.u[len(prefix) % 7]
        z = z - z.max()
        return z - np.log(np.exp(z).sum())

    def top(self, lp: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` most likely ids, by decreasing log-probability, ties by the lower id."""
        order = np.lexsort((np.arange(lp.size), -lp))
        return order[:k]

    def expected(self, tokens: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The reference teacher of ``tokens``: row ``i`` is the top-``k`` of the distribution after
        ``tokens[:i + 1]`` (a causal LM's logits at position ``i``); the last row is empty."""
        T = len(tokens)
        idx = np.full((T, k), -1, np.int32)
        val = np.full((T, k), -np.inf, np.float32)
        for i in range(T - 1):
            lp = self.log_probs(tokens[: i + 1])
            top = self.top(lp, k)
            idx[i] = top
            val[i] = lp[top]
        return idx, val


def _rank(lp: np.ndarray, t: int) -> int:
    return int((lp > lp[t]).sum()) + 1


def vllm_prompt_logprobs(teacher: TinyTeacher, tokens: list[int], k: int) -> list:
    """``RequestOutput.prompt_logprobs`` as the OpenAI-compatible server serialises it: ``None``, then per
    position ``{str(id): {"logprob", "rank", "decoded_token"}}``, the prompt token first."""
    out: list = [None]
    for j in range(1, len(tokens)):
        lp = teacher.log_probs(tokens[:j])
        t = tokens[j]
        d = {str(t): {"logprob": float(lp[t]), "rank": _rank(lp, t), "decoded_token": f"<{t}>"}}
        for r, i in enumerate(teacher.top(lp, k), 1):
            d[str(int(i))] = {"logprob": float(lp[i]), "rank": r, "decoded_token": f"<{int(i)}>"}
        out.append(d)
    return out


@dataclass
class FlatLogprobs:
    """The fields of ``vllm.logprobs.FlatLogprobs`` (a stand-in: the reader duck-types them)."""

    start_indices: list = field(default_factory=list)
    end_indices: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    ranks: list = field(default_factory=list)
    decoded_tokens: list = field(default_factory=list)

    def append_fast(self, token_ids: list, logprobs: list, ranks: list, decoded: list) -> None:
        self.start_indices.append(len(self.logprobs))
        for t, v, r, d in zip(token_ids, logprobs, ranks, decoded):
            self.token_ids.append(t)
            self.logprobs.append(v)
            self.ranks.append(r)
            self.decoded_tokens.append(d)
        self.end_indices.append(len(self.logprobs))


def flat_logprobs(teacher: TinyTeacher, tokens: list[int], k: int) -> FlatLogprobs:
    """vLLM's FlatLogprobs for the prompt: an empty first position, then per position the prompt token
    and the top-k, flattened without merging (the prompt token is listed twice when in the top-k)."""
    fl = FlatLogprobs()
    fl.append_fast([], [], [], [])  # create_prompt_logprobs appends None
    for j in range(1, len(tokens)):
        lp = teacher.log_probs(tokens[:j])
        top = [int(i) for i in teacher.top(lp, k)]
        ids = [tokens[j]] + top
        fl.append_fast(ids, [float(lp[i]) for i in ids], [_rank(lp, tokens[j])] + list(range(1, k + 1)),
                       [f"<{i}>" for i in ids])
    return fl


def vllm_response(teacher: TinyTeacher, tokens: list[int], k: int, model: str = "stub-teacher") -> dict:
    """The body of vLLM's ``/v1/completions`` answer to ``prompt`` = ``tokens``, ``prompt_logprobs`` = k,
    ``echo``, ``max_tokens`` 1."""
    nxt = int(teacher.top(teacher.log_probs(tokens), 1)[0])
    return {
        "id": "cmpl-stub", "object": "text_completion", "created": 0, "model": model,
        "choices": [{
            "index": 0, "text": "".join(f"<{t}>" for t in tokens + [nxt]), "logprobs": None,
            "finish_reason": "length", "stop_reason": None, "prompt_logprobs": vllm_prompt_logprobs(teacher, tokens, k),
        }],
        "usage": {"prompt_tokens": len(tokens), "total_tokens": len(tokens) + 1, "completion_tokens": 1},
    }


def sglang_response(teacher: TinyTeacher, tokens: list[int], k: int) -> dict:
    """The body of SGLang's ``/generate`` answer to ``input_ids`` = ``tokens``, ``return_logprob``,
    ``top_logprobs_num`` = k, ``logprob_start_len`` 0, ``max_new_tokens`` 1."""
    itl: list = [[None, tokens[0], None]]
    itop: list = [None]
    for j in range(1, len(tokens)):
        lp = teacher.log_probs(tokens[:j])
        itl.append([float(lp[tokens[j]]), tokens[j], None])
        itop.append([[float(lp[i]), int(i), None] for i in teacher.top(lp, k)])
    lp = teacher.log_probs(tokens)
    top = teacher.top(lp, k)
    nxt = int(top[0])
    return {
        "text": f"<{nxt}>", "output_ids": [nxt],
        "meta_info": {
            "id": "stub", "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": len(tokens),
            "completion_tokens": 1, "cached_tokens": 0, "e2e_latency": 0.001,
            "input_token_logprobs": itl, "output_token_logprobs": [[float(lp[nxt]), nxt, None]],
            "input_top_logprobs": itop, "output_top_logprobs": [[[float(lp[i]), int(i), None] for i in top]],
        },
    }


class StubServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) answering as ``engine`` ("vllm" or "sglang").

    ``answer``: a function ``(tokens, k) -> bytes`` replacing the built-in teacher (pre-built payloads);
    ``faults``: a list of fault names taken one per POST request; ``delay``: seconds before every POST
    answer; ``max_requests``: the server stops after serving this many; ``lifetime``: it stops after this
    many seconds whatever happens. ``hold_after``: POST requests after that many wait until
    ``release`` is set (or the server stops): a client is then stopped at a known point."""

    def __init__(self, engine: str, *, teacher: TinyTeacher | None = None, model: str = "stub-teacher",
                 answer: Callable[[list[int], int], bytes] | None = None, faults: list[str] | None = None,
                 delay: float = 0.0, slow_s: float = 2.0, max_requests: int = 500, lifetime: float = 60.0,
                 hold_after: int | None = None) -> None:
        if engine not in ("vllm", "sglang"):
            raise ValueError(engine)
        self.engine = engine
        self.teacher = teacher or TinyTeacher()
        self.model = model
        self.answer = answer
        self.faults = list(faults or [])
        self.delay = delay
        self.slow_s = slow_s
        self.max_requests = max_requests
        self.lifetime = lifetime
        self.requests = 0
        self.posts = 0
        self.hold_after = hold_after
        self.release = threading.Event()
        self.bodies: list[dict] = []
        self.keep_bodies = answer is None
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def _next_fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            self.posts += 1
            n, posts = self.requests, self.posts
            fault = self.faults.pop(0) if self.faults else None
        if n >= self.max_requests:
            threading.Thread(target=self.stop, daemon=True).start()
        if self.hold_after is not None and posts > self.hold_after:
            self.release.wait(self.lifetime)
        return fault

    def _payload(self, req: dict) -> bytes:
        if self.engine == "vllm":
            tokens, k = req["prompt"], int(req["prompt_logprobs"])
        else:
            tokens, k = req["input_ids"], int(req["top_logprobs_num"])
        if self.answer is not None:
            return self.answer(tokens, k)
        if self.engine == "vllm":
            return json.dumps(vllm_response(self.teacher, tokens, k, self.model)).encode()
        return json.dumps(sglang_response(self.teacher, tokens, k)).encode()

    def start(self) -> "StubServer":
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self) -> None:  # noqa: N802
                stub._next_fault_get()
                if stub.engine == "vllm" and self.path == "/v1/models":
                    body = {"object": "list", "data": [{"id": stub.model, "object": "model", "owned_by": "vllm",
                                                        "max_model_len": 4096}]}
                elif stub.engine == "sglang" and self.path == "/get_model_info":
                    body = {"model_path": stub.model, "tokenizer_path": stub.model, "is_generation": True}
                else:
                    self._send(404, b'{"detail":"Not Found"}')
                    return
                self._send(200, json.dumps(body).encode())

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(n)
                fault = stub._next_fault()
                want = "/v1/completions" if stub.engine == "vllm" else "/generate"
                if self.path != want:
                    self._send(404, b'{"detail":"Not Found"}')
                    return
                if stub.delay:
                    time.sleep(stub.delay)
                if fault == "drop":
                    self.close_connection = True
                    try:
                        self.connection.shutdown(2)
                    except OSError:
                        pass
                    return
                if fault in ("500", "503"):
                    self._send(int(fault), b'{"object":"error","message":"stub fault","type":"InternalServerError"}')
                    return
                if fault == "400":
                    self._send(400, b'{"object":"error","message":"Requested prompt logprobs of 64, which is '
                               b'greater than max allowed: 20","type":"BadRequestError","code":400}')
                    return
                if fault == "malformed":
                    self._send(200, b'{"choices": [{"index": 0, "prompt_logprobs": [null, {"12": {"logpr')
                    return
                if fault == "html":
                    self._send(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
                    return
                if fault == "slow":
                    time.sleep(stub.slow_s)
                try:
                    req = json.loads(raw)
                    if stub.keep_bodies:
                        with stub._lock:
                            stub.bodies.append(req)
                    body = stub._payload(req)
                except (ValueError, KeyError, TypeError) as e:
                    self._send(400, json.dumps({"object": "error", "message": f"bad request: {e}"}).encode())
                    return
                self._send(200, body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def _next_fault_get(self) -> None:
        with self._lock:
            self.requests += 1
            n = self.requests
        if n >= self.max_requests:
            threading.Thread(target=self.stop, daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            if self._stopped or self._httpd is None:
                return
            self._stopped = True
        self.release.set()
        if self._timer is not None:
            self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "StubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

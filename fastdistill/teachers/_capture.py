"""Capture a teacher store from a running vLLM or SGLang server (``fastdistill teacher capture``).

Each input line (a JSON list of token ids, or an object with ``input_ids``) is one request:

- vLLM (OpenAI-compatible server): ``POST /v1/completions`` with ``prompt`` = the token ids,
  ``prompt_logprobs`` = k, ``echo``, ``max_tokens`` 1; the answer's ``choices[0].prompt_logprobs`` is
  read by :func:`~fastdistill.teachers.from_vllm`;
- SGLang: ``POST /generate`` with ``input_ids``, ``return_logprob``, ``top_logprobs_num`` = k,
  ``logprob_start_len`` 0, ``max_new_tokens`` 1; the answer's ``meta_info`` is read by
  :func:`~fastdistill.teachers.from_sglang`.

Requests run concurrently (``concurrency`` at a time, HTTP keep-alive), failed ones are retried with
exponential backoff (connection errors, timeouts, HTTP 408/429/5xx), and the results are appended to
the store in input order, a shard every ``shard_sequences`` sequences (or ``shard_mb`` MiB). A run that
stops -- an error, Ctrl-C, SIGTERM, or a kill -- leaves whole shards only; running the same command
again resumes after the last stored sequence, after checking that the input's first sequences are the
ones stored (a SHA-256 of each shard's token ids is in the manifest). HTTP: httpx; progress: tqdm; JSON
answers are decoded by msgspec into typed structures when it is installed (the standard library's
``json`` otherwise).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ..sparse import SparseTeacher
from ._errors import CaptureError, TeacherFormatError, TeacherStoreError
from ._readers import from_sglang, from_vllm

ENGINES = ("vllm", "sglang")
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_BACKOFF = 30.0


class CaptureInterrupted(CaptureError):
    """The run was interrupted (Ctrl-C, SIGTERM); ``sequences`` are in the store (a rerun resumes)."""

    def __init__(self, sequences: int, how: str) -> None:
        self.sequences = sequences
        self.how = how
        super().__init__(f"{how}: the store holds {sequences} sequences; run the same command again to resume")


@dataclass
class CaptureResult:
    """What a capture run did: ``sequences`` in the store now, ``captured`` by this run (``resumed_from``
    were there before), ``tokens`` captured by this run, wall ``seconds``, ``requests`` sent (retries
    included)."""

    sequences: int
    captured: int
    resumed_from: int
    tokens: int
    seconds: float
    requests: int


# ------------------------------------------------------------------------------------------------ input


def _parse_line(line: str, lineno: int, path: Any) -> list[int]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CaptureError(f"{path}, line {lineno}: not JSON ({e.msg})")
    if isinstance(obj, dict):
        for key in ("input_ids", "prompt_token_ids", "tokens"):
            if key in obj:
                obj = obj[key]
                break
        else:
            raise CaptureError(f"{path}, line {lineno}: an object without 'input_ids'")
    if not isinstance(obj, list) or not obj or not all(
        type(t) is int and 0 <= t <= 2**31 - 1 for t in obj
    ):
        raise CaptureError(
            f"{path}, line {lineno}: expected a non-empty JSON list of token ids (integers >= 0)"
        )
    return obj


def _read_input(path: Any) -> Iterator[tuple[int, list[int]]]:
    """``(sequence number, token ids)`` of each non-blank line."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise CaptureError(f"cannot read the input {path}: {e.strerror or e}")
    with f:
        n = 0
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield n, _parse_line(line, lineno, path)
                n += 1


def _count_lines(path: Any) -> int:
    """The number of sequences of the input, every line checked (before any request is sent)."""
    n = 0
    for _ in _read_input(path):
        n += 1
    return n


def _digest_update(h: Any, tokens: list[int]) -> None:
    h.update(len(tokens).to_bytes(8, "little"))
    h.update(np.asarray(tokens, "<i8").tobytes())


# ------------------------------------------------------------------------------------------------ engines


def _msgspec() -> Any:
    try:
        import msgspec
    except ImportError:  # pragma: no cover - the extra installs it
        return None
    return msgspec


class _Engine:
    name = ""
    path = ""

    def __init__(self, k: int, temperature: float, model: str | None) -> None:
        self.k = k
        self.temperature = temperature
        self.model = model
        self.ms = _msgspec()
        self.encode = self.ms.json.encode if self.ms is not None else (lambda o: json.dumps(o).encode())

    async def preflight(self, get: Any) -> dict:
        return {}

    def body(self, tokens: list[int]) -> bytes:
        raise NotImplementedError

    def parse(self, content: bytes, tokens: list[int]) -> SparseTeacher:
        raise NotImplementedError

    def _decode_any(self, content: bytes) -> Any:
        try:
            return json.loads(content)
        except (ValueError, UnicodeDecodeError) as e:
            raise CaptureError(f"the server's answer is not JSON ({e}): {_snippet(content)}")


class _VLLM(_Engine):
    name = "vllm"
    path = "/v1/completions"

    def __init__(self, k: int, temperature: float, model: str | None) -> None:
        super().__init__(k, temperature, model)
        ms = self.ms
        if ms is not None:
            lp = ms.defstruct("LP", [("logprob", float)], gc=False)
            choice = ms.defstruct("Choice", [("prompt_logprobs", Optional[list[Optional[dict[int, lp]]]], None)],
                                  gc=False)
            self.decoder = ms.json.Decoder(ms.defstruct("Resp", [("choices", list[choice])], gc=False))

    async def preflight(self, get: Any) -> dict:
        content = await get("/v1/models")
        obj = self._decode_any(content)
        try:
            ids = [m["id"] for m in obj["data"]]
        except (TypeError, KeyError):
            raise CaptureError(
                f"GET /v1/models did not answer like vLLM's OpenAI-compatible server: {_snippet(content)}"
            )
        if self.model is None:
            if not ids:
                raise CaptureError("GET /v1/models lists no model; name one with --model")
            self.model = ids[0]
        return {"model": self.model}

    def body(self, tokens: list[int]) -> bytes:
        return self.encode({
            "model": self.model, "prompt": tokens, "max_tokens": 1, "prompt_logprobs": self.k,
            "echo": True, "temperature": self.temperature, "n": 1, "stream": False,
        })

    def parse(self, content: bytes, tokens: list[int]) -> SparseTeacher:
        if self.ms is not None:
            try:
                resp = self.decoder.decode(content)
            except self.ms.DecodeError as e:
                raise CaptureError(
                    f"the server's answer is not vLLM's /v1/completions JSON ({e}): {_snippet(content)}"
                )
            if len(resp.choices) != 1:
                raise CaptureError(f"the server's answer has {len(resp.choices)} choices, expected 1")
            pl = resp.choices[0].prompt_logprobs
        else:
            obj = self._decode_any(content)
            try:
                (choice,) = obj["choices"]
                pl = choice.get("prompt_logprobs")
            except (TypeError, KeyError, ValueError, AttributeError):
                raise CaptureError(f"the server's answer is not vLLM's /v1/completions JSON: {_snippet(content)}")
        if pl is None:
            raise CaptureError(
                "the server's answer has no choices[0].prompt_logprobs: is it a vLLM server (--engine vllm)?"
            )
        return from_vllm(pl, k=self.k, prompt_token_ids=tokens)


class _SGLang(_Engine):
    name = "sglang"
    path = "/generate"

    def __init__(self, k: int, temperature: float, model: str | None) -> None:
        super().__init__(k, temperature, model)
        ms = self.ms
        if ms is not None:
            meta = ms.defstruct("Meta", [
                ("input_top_logprobs", Optional[list[Optional[list[tuple[float, int, Any]]]]], None),
                ("prompt_tokens", Optional[int], None),
                ("input_token_logprobs", Optional[list[tuple[Any, int, Any]]], None),
            ], gc=False)
            self.decoder = ms.json.Decoder(ms.defstruct("Resp", [("meta_info", meta)], gc=False))

    async def preflight(self, get: Any) -> dict:
        content = await get("/get_model_info")
        obj = self._decode_any(content)
        if not isinstance(obj, dict) or "model_path" not in obj:
            raise CaptureError(f"GET /get_model_info did not answer like an SGLang server: {_snippet(content)}")
        if self.model is None:
            self.model = str(obj["model_path"])
        return {"model": self.model}

    def body(self, tokens: list[int]) -> bytes:
        return self.encode({
            "input_ids": tokens,
            "sampling_params": {"max_new_tokens": 1, "temperature": self.temperature},
            "return_logprob": True, "top_logprobs_num": self.k, "logprob_start_len": 0,
            "return_text_in_logprobs": False, "stream": False,
        })

    def parse(self, content: bytes, tokens: list[int]) -> SparseTeacher:
        if self.ms is not None:
            try:
                m = self.decoder.decode(content).meta_info
            except self.ms.DecodeError as e:
                raise CaptureError(f"the server's answer is not SGLang's /generate JSON ({e}): {_snippet(content)}")
            mi = {"input_top_logprobs": m.input_top_logprobs, "prompt_tokens": m.prompt_tokens,
                  "input_token_logprobs": m.input_token_logprobs}
        else:
            obj = self._decode_any(content)
            mi = obj.get("meta_info") if isinstance(obj, dict) else None
            if not isinstance(mi, dict):
                raise CaptureError(f"the server's answer is not SGLang's /generate JSON: {_snippet(content)}")
        if mi.get("input_top_logprobs") is None:
            raise CaptureError(
                "the server's answer has no meta_info.input_top_logprobs: is it an SGLang server "
                "(--engine sglang)?"
            )
        return from_sglang(mi, k=self.k, prompt_token_ids=tokens)


def _snippet(content: bytes, n: int = 200) -> str:
    text = content[:n].decode("utf-8", "replace")
    return repr(text + ("..." if len(content) > n else ""))


def _error_message(content: bytes) -> str:
    try:
        obj = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return _snippet(content)
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            for key in ("message", "detail", "msg"):
                if key in err:
                    return str(err[key])
        if isinstance(err, str):
            return err
    return _snippet(content)


# ------------------------------------------------------------------------------------------------ the run


def capture(
    server: str,
    engine: str,
    input: Any,  # noqa: A002 - the CLI's name
    k: int,
    out: Any,
    *,
    model: str | None = None,
    concurrency: int = 8,
    retries: int = 5,
    timeout: float = 300.0,
    backoff: float = 0.5,
    temperature: float = 1.0,
    shard_sequences: int = 256,
    shard_mb: float = 64.0,
    meta: dict | None = None,
    progress: bool = True,
    handle_sigterm: bool = False,
) -> CaptureResult:
    """Score the token sequences of ``input`` with the ``engine`` server at ``server`` into the teacher
    store ``out``; returns a :class:`CaptureResult`. The command ``fastdistill teacher capture`` calls it.

    ``input``: JSON lines, one sequence per non-blank line (a list of token ids, or an object with
    ``input_ids``); every line is checked before the first request. ``engine``: ``"vllm"`` (an
    OpenAI-compatible vLLM server: ``POST /v1/completions``; ``model`` defaults to the first of
    ``GET /v1/models``) or ``"sglang"`` (``POST /generate``). ``k``: log-probabilities per position (the
    store's rows have exactly ``k`` slots). ``out``: the store (a directory); if it holds sequences
    already, the run resumes after them, once the input's first sequences are checked to be the stored
    ones and ``k``, ``engine``, ``temperature`` (and ``model`` when given) to be the store's.

    ``concurrency`` requests in flight; a failed one (connection error, no answer for ``timeout``
    seconds, HTTP 408/425/429/5xx) is retried ``retries`` times, after ``backoff`` seconds doubled on
    each retry (at most 30, with jitter); any other answer that is not the engine's format is an error
    at once. Results are appended in input order, a shard every ``shard_sequences`` sequences or
    ``shard_mb`` MiB (the unit of resuming). ``temperature`` is sent with each request and recorded as
    the store's ``temperature``; ``meta`` adds to the store's meta (``tokenizer``, ``vocab_size``, ...).
    ``progress``: a tqdm bar on stderr. ``handle_sigterm``: SIGTERM stops the run as Ctrl-C does (whole
    shards kept); the command line sets it (asyncio leaves the default handler behind afterwards).

    Every failure raises :class:`CaptureError` (``TeacherStoreError`` when ``out`` is not a store);
    an interrupted run raises :class:`CaptureInterrupted` after writing what came back in order.
    """
    if engine not in ENGINES:
        raise CaptureError(f"--engine must be one of {ENGINES}, got {engine!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CaptureError(f"--k must be a positive integer, got {k!r}")
    if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0 or shard_sequences < 1 or shard_mb <= 0:
        raise CaptureError("--concurrency, --shard-sequences, --shard-mb and --timeout must be positive, "
                           "--retries and --backoff not negative")
    if not (temperature > 0 and np.isfinite(temperature)):
        raise CaptureError(f"--temperature must be finite and > 0, got {temperature}")
    if not server.startswith(("http://", "https://")):
        raise CaptureError(f"--server must be an http:// or https:// URL, got {server!r}")
    try:
        import httpx
    except ImportError:
        raise CaptureError("the capture needs httpx, tqdm and pyarrow: pip install 'fastdistill[teachers]'")
    from . import _store

    eng = (_VLLM if engine == "vllm" else _SGLang)(k, float(temperature), model)
    if not Path(input).is_file():
        raise CaptureError(f"the input {input} is not a file")
    man = _store.read_manifest(out)
    done = 0
    if man is not None:
        done = _check_resume(man, out, input, engine, k, float(temperature), model)
    total = _count_lines(input)
    if done > total:
        raise CaptureError(f"the store {out} holds {done} sequences but the input has only {total}")
    base = server.rstrip("/")
    if engine == "vllm" and base.endswith("/v1"):  # the OpenAI client's base URL
        base = base[:-3]
    run = _Run(eng, base, input, out, k, done, total, concurrency=concurrency, retries=retries,
               timeout=timeout, backoff=backoff, shard_sequences=shard_sequences,
               shard_bytes=int(shard_mb * 2**20), meta=dict(meta or {}), progress=progress, httpx=httpx,
               handle_sigterm=handle_sigterm, stored_meta=man["meta"] if man is not None else None)
    t0 = time.perf_counter()
    try:
        asyncio.run(run.main())
    except asyncio.CancelledError:
        if run.terminated:
            raise CaptureInterrupted(run.written, "SIGTERM")
        raise
    except KeyboardInterrupt:
        raise CaptureInterrupted(run.written, "interrupted")
    finally:
        run.close_progress()
    return CaptureResult(sequences=run.written, captured=run.written - done, resumed_from=done,
                         tokens=run.tokens, seconds=time.perf_counter() - t0, requests=run.requests)


def _check_resume(man: dict, out: Any, input: Any, engine: str, k: int, temperature: float,  # noqa: A002
                  model: str | None) -> int:
    meta = man["meta"]
    want = {"k": k, "source": engine, "temperature": temperature, "kind": "logprobs"}
    if model is not None:
        want["model"] = model
    for key, v in want.items():
        if key in meta and meta[key] != v:
            raise CaptureError(
                f"the store {out} was captured with {key}={meta[key]!r}, this run asks for {v!r}: use another "
                "--out, or the same options to resume"
            )
    if meta.get("k") != k:
        raise CaptureError(f"the store {out} has k={meta.get('k')!r}, this run asks for {k}")
    shards = man["shards"]
    done = sum(s["sequences"] for s in shards)
    src = _read_input(input)
    stored_lengths = None
    pos = 0
    for s in shards:
        h = hashlib.sha256()
        lens = []
        for _ in range(s["sequences"]):
            item = next(src, None)
            if item is None:
                raise CaptureError(f"the store {out} holds {done} sequences but the input {input} has fewer")
            _digest_update(h, item[1])
            lens.append(len(item[1]))
        if "input_sha256" in s:
            same = h.hexdigest() == s["input_sha256"]
        else:  # a shard written by save(): its lengths at least
            if stored_lengths is None:
                from ._store import load

                stored_lengths = load(out).lengths
            same = stored_lengths[pos:pos + len(lens)].tolist() == lens
        if not same:
            raise CaptureError(
                f"the input {input} is not the one the store {out} was captured from (the token ids of the "
                f"sequences in {s['file']} differ): use another --out"
            )
        pos += s["sequences"]
    return done


class _Run:
    def __init__(self, eng: _Engine, server: str, input: Any, out: Any, k: int, done: int, total: int, *,  # noqa: A002
                 concurrency: int, retries: int, timeout: float, backoff: float, shard_sequences: int,
                 shard_bytes: int, meta: dict, progress: bool, httpx: Any, handle_sigterm: bool = False,
                 stored_meta: dict | None = None) -> None:
        self.eng, self.server, self.input, self.out, self.k = eng, server, input, out, k
        self.written = done
        self.total = total
        self.concurrency, self.retries, self.timeout, self.backoff = concurrency, retries, timeout, backoff
        self.shard_sequences, self.shard_bytes = shard_sequences, shard_bytes
        self.meta = meta
        self.progress = progress
        self.httpx = httpx
        self.tokens = 0
        self.requests = 0
        self.buffer: list[tuple[list[int], SparseTeacher]] = []
        self.buffer_bytes = 0
        self.bar: Any = None
        self.terminated = False
        self.handle_sigterm = handle_sigterm
        self.stored_meta = stored_meta

    # -- HTTP
    async def _request(self, client: Any, method: str, path: str, body: bytes | None, what: str) -> bytes:
        httpx = self.httpx
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(MAX_BACKOFF, self.backoff * 2 ** (attempt - 1)) * (1 + 0.25 * random.random())
                await asyncio.sleep(delay)
            self.requests += 1
            try:
                if method == "GET":
                    r = await client.get(path)
                else:
                    r = await client.post(path, content=body, headers={"content-type": "application/json"})
            except httpx.TimeoutException:
                last = f"no answer within {self.timeout:g} s (--timeout)"
                continue
            except httpx.TransportError as e:
                last = f"cannot reach the server ({type(e).__name__}: {e})"
                continue
            if r.status_code == 200:
                return r.content
            if r.status_code in RETRY_STATUS:
                last = f"HTTP {r.status_code}: {_error_message(r.content)}"
                continue
            raise CaptureError(
                f"{what}: the server at {self.server} answered HTTP {r.status_code} to {method} {path}: "
                f"{_error_message(r.content)}"
            )
        raise CaptureError(
            f"{what}: no answer from {self.server}{path} after {self.retries + 1} tries; last: {last}"
        )

    async def _score(self, client: Any, i: int, tokens: list[int]) -> SparseTeacher:
        what = f"sequence {i}"
        content = await self._request(client, "POST", self.eng.path, self.eng.body(tokens), what)
        try:
            teacher = self.eng.parse(content, tokens)
        except (TeacherFormatError, CaptureError) as e:
            raise CaptureError(f"{what}: {e}")
        if teacher.shape[0] != len(tokens):
            raise CaptureError(f"{what}: the server scored {teacher.shape[0]} positions for {len(tokens)} tokens")
        return teacher

    # -- the store
    def _flush(self) -> None:
        if not self.buffer:
            return
        from . import _store

        h = hashlib.sha256()
        for toks, _ in self.buffer:
            _digest_update(h, toks)
        try:
            n = _store.save(self.out, [t for _, t in self.buffer], meta=self._store_meta(),
                            shard_info={"input_sha256": h.hexdigest()})
        except TeacherStoreError as e:
            raise CaptureError(f"cannot write the store {self.out}: {e}")
        except OSError as e:
            raise CaptureError(f"cannot write the store {self.out}: {e}")
        assert n == self.written + len(self.buffer)
        self.written = n
        self.buffer = []
        self.buffer_bytes = 0

    def _store_meta(self) -> dict:
        meta = {**self.meta, "k": self.k, "kind": "logprobs", "source": self.eng.name,
                "temperature": self.eng.temperature}
        if self.eng.model is not None:
            meta["model"] = self.eng.model
        return meta

    def _check_stored_meta(self) -> None:
        """Before the first request of a resumed run: the meta this run would write agrees with the
        store's (the server may now serve another model)."""
        if not self.stored_meta:
            return
        for key, v in self._store_meta().items():
            if key in self.stored_meta and self.stored_meta[key] != v:
                raise CaptureError(
                    f"the store {self.out} was captured with {key}={self.stored_meta[key]!r}, this run has "
                    f"{v!r}: use another --out, or the same server, model and options to resume"
                )

    def _terminate(self, task: Any) -> None:
        self.terminated = True
        if task is not None:
            task.cancel()

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    async def main(self) -> None:
        httpx = self.httpx
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.written, unit="seq", desc="capture",
                            dynamic_ncols=True, file=sys.stderr)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        tmo = httpx.Timeout(self.timeout, connect=min(self.timeout, 30.0))
        if self.handle_sigterm:
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._terminate, asyncio.current_task())
            except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover - not the main thread
                pass
        async with httpx.AsyncClient(base_url=self.server, timeout=tmo, limits=limits, trust_env=False) as client:
            async def get(path: str) -> bytes:
                return await self._request(client, "GET", path, None, f"GET {path}")

            self.meta.update({k_: v for k_, v in (await self.eng.preflight(get)).items()
                              if k_ not in self.meta})
            self._check_stored_meta()
            await self._loop(client)

    async def _loop(self, client: Any) -> None:
        src = _read_input(self.input)
        for _ in range(self.written):  # resumed: skip what the store holds
            next(src)
        pending: dict[asyncio.Future, tuple[int, list[int]]] = {}
        results: dict[int, tuple[list[int], SparseTeacher]] = {}
        next_in = next_out = self.written
        window = 4 * self.concurrency  # sequences launched but not yet in the buffer: bounds memory
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.concurrency and next_in - next_out < window:
                    item = next(src, None)
                    if item is None:
                        exhausted = True
                        break
                    i, toks = item
                    pending[asyncio.ensure_future(self._score(client, i, toks))] = (i, toks)
                    next_in = i + 1
                if not pending:
                    break
                finished, _ = await asyncio.wait(list(pending), return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    i, toks = pending.pop(task)
                    results[i] = (toks, task.result())
                while next_out in results:
                    toks, teacher = results.pop(next_out)
                    self.buffer.append((toks, teacher))
                    self.buffer_bytes += len(toks) * self.k * 6
                    self.tokens += len(toks)
                    next_out += 1
                    if self.bar is not None:
                        self.bar.update(1)
                    if len(self.buffer) >= self.shard_sequences or self.buffer_bytes >= self.shard_bytes:
                        self._flush()  # a shard of exactly shard_sequences (or shard_mb)
            self._flush()
        except BaseException:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            try:  # keep what is done, in input order, so that a rerun resumes after it
                self._flush()
            except CaptureError:
                pass
            raise


def main_capture(args: Any) -> int:
    """The ``fastdistill teacher capture`` command on parsed arguments."""
    meta: dict = {}
    for item in args.meta or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CaptureError(f"--meta takes KEY=VALUE, got {item!r}")
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    if args.tokenizer is not None:
        meta["tokenizer"] = args.tokenizer
    if args.vocab_size is not None:
        meta["vocab_size"] = args.vocab_size
    res = capture(args.server, args.engine, args.input, args.k, args.out, model=args.model,
                  concurrency=args.concurrency, retries=args.retries, timeout=args.timeout, backoff=args.backoff,
                  temperature=args.temperature, shard_sequences=args.shard_sequences, shard_mb=args.shard_mb,
                  meta=meta, progress=not args.quiet, handle_sigterm=True)
    note = f" (resumed after {res.resumed_from})" if res.resumed_from else ""
    print(f"{args.out}: {res.sequences} sequences; this run captured {res.captured}{note}, {res.tokens} tokens "
          f"in {res.seconds:.1f} s ({res.requests} requests)", file=sys.stderr if args.quiet else sys.stdout)
    return 0


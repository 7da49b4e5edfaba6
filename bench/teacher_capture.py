"""The capture client's own CPU time per scored position (``fastdistill teacher capture``).

    python bench/teacher_capture.py [--k 64] [--tokens 1024] [--distinct 8] [--repeat 4] [--concurrency 4]

A stand-in server in another process answers every request with a pre-built payload shaped as the
engine emits it (vLLM: ``choices[0].prompt_logprobs``, per position ``{"id": {"logprob", "rank",
"decoded_token"}}`` holding the top-k and the prompt token; SGLang: ``meta_info.input_top_logprobs``,
per position ``[[logprob, id, null], ...]``), with ids drawn from a 151,936-token vocabulary (5- and
6-digit ids, as a real model's). The payloads are built before the clock starts; the server's work
runs in its own process, so this process's CPU time (user + system, ``resource.getrusage``) is the
client's: HTTP, JSON decoding, the readers (validation, ranking, padding), float16 conversion and the
store's writes. Also printed: the JSON decoding and the reader alone, in-process, per position.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time

import numpy as np

VOCAB = 151936


def _sequences(distinct: int, tokens: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, tokens).tolist() for _ in range(distinct)]


def _payload(engine: str, tokens: list[int], k: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    T = len(tokens)
    if engine == "vllm":
        pl: list = [None]
        for j in range(1, T):
            ids = rng.choice(VOCAB, k, replace=False)
            lp = np.minimum(np.sort(rng.normal(-7.0, 3.0, k))[::-1] - 0.05, -1e-4)
            d = {}
            t = tokens[j]
            if t not in set(ids.tolist()):
                d[str(t)] = {"logprob": float(lp[-1] - 2.0), "rank": k + 17, "decoded_token": f" tok{t}"}
            for r, (i, v) in enumerate(zip(ids.tolist(), lp.tolist()), 1):
                d[str(i)] = {"logprob": v, "rank": r, "decoded_token": f" w{i}"}
            pl.append(d)
        body = {"id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "bench",
                "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length",
                             "stop_reason": None, "prompt_logprobs": pl}],
                "usage": {"prompt_tokens": T, "total_tokens": T + 1, "completion_tokens": 1}}
    else:
        top: list = [None]
        itl: list = [[None, tokens[0], None]]
        for j in range(1, T):
            ids = rng.choice(VOCAB, k, replace=False)
            lp = np.minimum(np.sort(rng.normal(-7.0, 3.0, k))[::-1] - 0.05, -1e-4)
            top.append([[v, i, None] for i, v in zip(ids.tolist(), lp.tolist())])
            itl.append([-9.5, tokens[j], None])
        body = {"text": "x", "output_ids": [1], "meta_info": {
            "id": "bench", "prompt_tokens": T, "completion_tokens": 1, "input_token_logprobs": itl,
            "output_token_logprobs": [[-0.1, 1, None]], "input_top_logprobs": top,
            "output_top_logprobs": [top[1]]}}
    return json.dumps(body).encode()


def _serve(engine: str, k: int, distinct: int, tokens: int, q: "mp.Queue") -> None:
    from fastdistill.teachers._stub import StubServer

    seqs = _sequences(distinct, tokens)
    payloads = {tuple(s): _payload(engine, s, k, i) for i, s in enumerate(seqs)}
    stub = StubServer(engine, answer=lambda toks, kk: payloads[tuple(toks)], model="bench",
                      max_requests=100000, lifetime=600).start()
    q.put(stub.url)
    q.get()  # until told to stop
    stub.stop()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(engine: str, args: argparse.Namespace) -> dict:
    import fastdistill.teachers as T
    from fastdistill.teachers._capture import _SGLang, _VLLM

    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(engine, args.k, args.distinct, args.tokens, q), daemon=True)
    proc.start()
    url = q.get(timeout=600)
    seqs = _sequences(args.distinct, args.tokens)
    with tempfile.TemporaryDirectory() as d:
        inp = os.path.join(d, "in.jsonl")
        with open(inp, "w") as f:
            for _ in range(args.repeat):
                for s in seqs:
                    f.write(json.dumps(s) + "\n")
        # warm-up: imports, first connections, the readers' first calls
        T.capture(url, engine, inp, args.k, os.path.join(d, "warm"), concurrency=args.concurrency, progress=False)
        out = os.path.join(d, "store")
        c0, w0 = _cpu(), time.perf_counter()
        res = T.capture(url, engine, inp, args.k, out, concurrency=args.concurrency, progress=False)
        cpu, wall = _cpu() - c0, time.perf_counter() - w0
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".arrow"))
    q.put("stop")
    proc.join(timeout=30)
    positions = res.tokens
    # the decoder and the reader alone, on one payload, in this process
    payload = _payload(engine, seqs[0], args.k, 0)
    eng = (_VLLM if engine == "vllm" else _SGLang)(args.k, 1.0, "bench")
    reps = 5
    t0 = time.process_time()
    for _ in range(reps):
        eng.parse(payload, seqs[0])
    parse_us = (time.process_time() - t0) / reps / args.tokens * 1e6
    if eng.ms is not None:
        t0 = time.process_time()
        for _ in range(reps):
            eng.decoder.decode(payload)
        decode_us = (time.process_time() - t0) / reps / args.tokens * 1e6
    else:
        decode_us = float("nan")
    return {"engine": engine, "k": args.k, "positions": positions, "sequences": res.captured,
            "cpu_s": cpu, "wall_s": wall, "cpu_us_per_position": cpu / positions * 1e6,
            "decode_us_per_position": decode_us, "decode_and_read_us_per_position": parse_us,
            "payload_bytes_per_position": len(payload) / args.tokens,
            "store_bytes_per_token": size / positions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("vllm", "sglang", "both"), default="both")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--distinct", type=int, default=8, help="distinct sequences (payloads held by the server)")
    ap.add_argument("--repeat", type=int, default=4, help="times the input lists each sequence")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    engines = ("vllm", "sglang") if args.engine == "both" else (args.engine,)
    rows = [run(e, args) for e in engines]
    print(f"capture client, k={args.k}, {args.tokens} tokens a sequence, {args.distinct * args.repeat} "
          f"sequences, concurrency {args.concurrency} (python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    print("engine  | client CPU us/position | decode us/pos | decode+read us/pos | payload B/pos | store B/token | wall s")
    for r in rows:
        print(f"{r['engine']:7s} | {r['cpu_us_per_position']:22.1f} | {r['decode_us_per_position']:13.1f} | "
              f"{r['decode_and_read_us_per_position']:18.1f} | {r['payload_bytes_per_position']:13.0f} | "
              f"{r['store_bytes_per_token']:13.1f} | {r['wall_s']:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

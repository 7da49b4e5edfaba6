"""``fastdistill teacher``: ``capture`` (score token sequences with a vLLM or SGLang server into a teacher
store) and ``info`` (what a store holds)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from ..errors import FastDistillError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fastdistill teacher",
        description="Teacher signals: capture a teacher store from an inference server, or describe one.",
    )
    sub = ap.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    c = sub.add_parser(
        "capture",
        help="score token sequences with a running vLLM or SGLang server into a teacher store",
        description="Score token sequences (JSON lines of token ids) with a running vLLM (OpenAI-compatible "
        "/v1/completions, prompt_logprobs) or SGLang (/generate, return_logprob) server and append their "
        "top-k log-probabilities to a teacher store. Requests run concurrently and are retried with backoff; "
        "running the same command again resumes after the last stored sequence.",
    )
    c.add_argument("--server", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    c.add_argument("--engine", required=True, choices=("vllm", "sglang"))
    c.add_argument("--input", required=True, metavar="TOKENS",
                   help="JSON lines: one sequence per line, a list of token ids (or an object with input_ids)")
    c.add_argument("--k", required=True, type=int, help="log-probabilities kept per position")
    c.add_argument("--out", required=True, metavar="STORE", help="the teacher store (a directory)")
    c.add_argument("--model", default=None,
                   help="the model name sent to vLLM (default: the first of GET /v1/models)")
    c.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    c.add_argument("--retries", type=int, default=5, help="retries of a failed request (default 5)")
    c.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for an answer (default 300)")
    c.add_argument("--backoff", type=float, default=0.5,
                   help="first retry delay in seconds, doubled on each retry up to 30 (default 0.5)")
    c.add_argument("--temperature", type=float, default=1.0,
                   help="the sampling temperature sent and recorded as the store's temperature (default 1)")
    c.add_argument("--shard-sequences", type=int, default=256,
                   help="sequences per shard: the unit of resuming (default 256)")
    c.add_argument("--shard-mb", type=float, default=64.0, help="a shard is written at this size too (default 64)")
    c.add_argument("--tokenizer", default=None, help="the tokenizer's name, recorded in the store's meta")
    c.add_argument("--vocab-size", type=int, default=None, help="the vocabulary size, recorded in the meta")
    c.add_argument("--meta", action="append", metavar="KEY=VALUE",
                   help="more meta (VALUE read as JSON when it is JSON); repeatable")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="print a teacher store's meta, sequences and tokens as JSON")
    i.add_argument("store", metavar="STORE")
    i.add_argument("--verify", action="store_true", help="check every shard's CRC-32 too")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.action == "capture":
            from ._capture import main_capture

            return main_capture(args)
        from ._store import load

        store = load(args.store, verify=args.verify)
        lengths = store.lengths
        info = {"path": str(store.path), "sequences": len(store), "tokens": store.num_tokens,
                "shards": len(store.files), "bytes": sum(f.stat().st_size for f in store.files),
                "max_length": int(lengths.max()) if lengths.size else 0, "meta": store.meta}
        print(json.dumps(info, indent=1, sort_keys=True))
        return 0
    except ImportError as e:
        print(f"fastdistill teacher {args.action}: error: {e} (pip install 'fastdistill[teachers]')",
              file=sys.stderr)
        return 1
    except FastDistillError as e:
        from ._capture import CaptureInterrupted

        print(f"fastdistill teacher {args.action}: {'' if isinstance(e, CaptureInterrupted) else 'error: '}{e}",
              file=sys.stderr)
        if isinstance(e, CaptureInterrupted):
            return 143 if e.how == "SIGTERM" else 130
        return 1

"""The ``fastdistill`` command line: ``bench``, ``demo``, ``capi``, ``warmup``, ``teacher``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

COMMANDS = {
    "bench": ("fastdistill.bench", "time the kernels side by side with NumPy, PyTorch and memory floors"),
    "demo": ("fastdistill.demo", "distill a teacher into a student on real data, with and without KD "
             "('demo lm': a GPT student through the fused linear head)"),
    "capi": ("fastdistill.capi", "print the C header path and the C entry points' addresses"),
    "warmup": ("fastdistill._warmup", "compile kernel variants ahead of a job (into the on-disk cache)"),
    "teacher": ("fastdistill.teachers._cli", "capture a teacher store from a vLLM or SGLang server "
                "('teacher capture'), or describe one ('teacher info')"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="fastdistill",
        description="Fast knowledge-distillation losses and gradients (Numba CPU/CUDA kernels).",
        epilog="Run 'fastdistill COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("command", nargs="?", choices=sorted(COMMANDS),
                        help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    args, rest = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    if args.version:
        from ._version import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    import importlib

    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

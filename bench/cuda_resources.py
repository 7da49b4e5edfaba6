"""Compile every CUDA kernel variant for a GPU architecture on any machine (no GPU needed) and print
ptxas' resource report: registers against the variant's cap, spills, stack, shared memory.

    python bench/cuda_resources.py              # sm_90 (H100/H200), Markdown table
    python bench/cuda_resources.py --cc 8.0     # A100
    python bench/cuda_resources.py --json

Needs numba-cuda and NVIDIA's compiler libraries as wheels: pip install nvidia-nvvm nvidia-cuda-nvrtc
nvidia-nvjitlink (the ``dev`` extra has them). Exit status 3 when they are missing.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.pop("NUMBA_ENABLE_CUDASIM", None)  # the real compiler, not the simulator

from fastdistill.cuda._offline import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

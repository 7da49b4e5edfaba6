"""The numeric description of a response loss, shared by every backend.

Every loss of the library (KL and its relatives, cross-entropy, MSE, cosine, and their weighted sums) is
one *response loss*: per row,

    hard_w * CE_eps(s, y) + div_w * D(s, t) + mse_w * MSE(s, t) + cos_w * COS(s, t)

where ``D`` is one divergence of the softmax distributions ``p = softmax(t/tau)``,
``q = softmax(s/tau)``. ``div_w`` already carries the tau**2 factor where the loss has it. Backends
receive a :class:`Terms` and never see ``DistilLoss`` objects; the C ABI and the CUDA kernels receive
the same numbers as the packed array :func:`Terms.pack` returns.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

# divergence kinds (compile-time constants of the kernels)
DIV_NONE = 0
DIV_FORWARD_KL = 1  # KL(p || q)
DIV_REVERSE_KL = 2  # KL(q || p)
DIV_MIXTURE = 3  # c_p * KL(p || m) + c_q * KL(q || m),  m = lam * p + (1 - lam) * q
DIV_TVD = 4  # 0.5 * sum |p - q|

# layout of the packed float64 parameter array
P_TAU, P_HARD_W, P_DIV_W, P_MSE_W, P_COS_W, P_LAM, P_CP, P_CQ, P_SMOOTH = range(9)
N_PARAMS = 9


class Terms(NamedTuple):
    """Weights and parameters of one response loss."""

    div: int = DIV_NONE
    tau: float = 1.0
    hard_w: float = 0.0
    div_w: float = 0.0
    mse_w: float = 0.0
    cos_w: float = 0.0
    lam: float = 0.0
    c_p: float = 0.0
    c_q: float = 0.0
    smoothing: float = 0.0

    def pack(self) -> np.ndarray:
        """The float64 parameter array the kernels read (indices ``P_*``)."""
        p = np.zeros(N_PARAMS, dtype=np.float64)
        p[P_TAU] = self.tau
        p[P_HARD_W] = self.hard_w
        p[P_DIV_W] = self.div_w
        p[P_MSE_W] = self.mse_w
        p[P_COS_W] = self.cos_w
        p[P_LAM] = self.lam
        p[P_CP] = self.c_p
        p[P_CQ] = self.c_q
        p[P_SMOOTH] = self.smoothing
        return p

    @property
    def div_kind(self) -> int:
        """The divergence the kernels must evaluate (``DIV_NONE`` when its weight is 0)."""
        return self.div if self.div_w != 0.0 else DIV_NONE

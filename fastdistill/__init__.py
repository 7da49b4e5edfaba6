"""fastdistill: knowledge-distillation losses and their gradients, fused and fast.

Fused Numba kernels on the CPU (and NVIDIA GPUs with the ``cuda`` extra) compute distillation losses
(KL with temperature, reverse KL, generalized JSD, skew KL, TVD, MSE, cosine, cross-entropy with
ignore_index and label smoothing) and their gradients in one or two streaming passes over the logits.
Argument order is always ``(student, teacher, labels)``.
"""
from __future__ import annotations

from ._version import __version__
from .distillers import FeatureDistiller, ResponseDistiller
from .errors import (
    BackendUnavailableError,
    DimensionMismatchError,
    EmptyInputError,
    FastDistillError,
    InvalidParameterError,
    LabelOutOfRangeError,
    TeacherStudentMismatchError,
)
from .functional import (
    available_backends,
    cosine_distance,
    cross_entropy,
    get_num_threads,
    kl_divergence,
    log_softmax,
    mse,
    set_num_threads,
    softmax,
    top_k,
)
from ._warmup import warmup
from .losses import DistilLoss
from .sparse import SparseTeacher, SparseTeacherIndexError


__all__ = [
    "__version__",
    "DistilLoss",
    "ResponseDistiller",
    "FeatureDistiller",
    "SparseTeacher",
    "top_k",
    "softmax",
    "log_softmax",
    "kl_divergence",
    "cross_entropy",
    "mse",
    "cosine_distance",
    "set_num_threads",
    "get_num_threads",
    "available_backends",
    "warmup",
    "FastDistillError",
    "EmptyInputError",
    "TeacherStudentMismatchError",
    "DimensionMismatchError",
    "LabelOutOfRangeError",
    "InvalidParameterError",
    "BackendUnavailableError",
    "SparseTeacherIndexError",
]

/*
 * fastdistill.h -- the C ABI of fastdistill: knowledge-distillation losses, their gradients and the
 * row-wise softmax, computed by the library's Numba CPU kernels.
 *
 * The functions live in a Python process: import fastdistill, call fastdistill.capi.symbols() (a dict
 * {name: address}; the first call compiles the entry points or loads them from Numba's cache) and cast
 * each address to the matching *_fn type below. The functions touch no Python object: call them from
 * any thread, without holding the GIL, concurrently, for as long as the interpreter is alive.
 *
 * Conventions of every entry point
 *   - Arrays are dense, row-major (C order): `rows` rows of `n` values. Logits are float32 (`_f32`),
 *     float64 (`_f64`), IEEE half precision (`_f16`) or bfloat16 (`_bf16`); the 16-bit formats are
 *     passed as their bits (`uint16_t`), read and computed in float32 (float64 row totals, as float32
 *     inputs), and their gradients and softmax outputs are rounded once, to nearest even.
 *   - Argument order is (student, teacher, labels).
 *   - `nthreads`: threads for this call, 0 = the calling thread's current Numba setting (by default
 *     the whole pool); 1..pool size is honoured for this call only. Anything else is FD_BAD_PARAM.
 *   - The return value is a status (enum fd_status): FD_OK (0) on success. On any other status
 *     nothing has been written to the outputs, except after FD_INTERNAL_ERROR (unspecified).
 *   - Inputs are never modified, except `student` when the caller passes it as `grad`.
 *   - Logits of -inf are masked classes in the softmax-based terms (probability 0, gradient 0);
 *     NaN logits propagate to the loss. MSE and cosine take the logits at face value.
 *
 * Everything here is the C view of the Python API: fd_response_* with a loss kind equals
 *   fastdistill.ResponseDistiller(DistilLoss.<kind>(...), hard_weight, soft_weight,
 *                                 ignore_index=..., label_smoothing=...).loss_and_grad(...)
 */
#ifndef FASTDISTILL_H
#define FASTDISTILL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FD_ABI_VERSION 5

/* Status codes returned by every entry point. */
enum fd_status {
    FD_OK = 0,                 /* success */
    FD_NULL_POINTER = 1,       /* a required pointer is NULL */
    FD_EMPTY_INPUT = 2,        /* rows == 0 or n == 0 */
    FD_BAD_SHAPE = 3,          /* rows or n negative, or rows * n too large */
    FD_LABEL_OUT_OF_RANGE = 4, /* a label is < 0 or >= n, and != ignore_index */
    FD_MISSING_LABELS = 5,     /* labels == NULL while hard_weight != 0 */
    FD_BAD_PARAM = 6,          /* temperature not finite, <= 0 or > 1e4; a weight not finite; beta/alpha
                                  outside [0, 1]; label_smoothing outside [0, 1); nthreads outside
                                  [0, pool size]; a bucket tail's log-probability above 0 */
    FD_BAD_KIND = 7,           /* unknown loss kind */
    FD_BAD_REDUCTION = 8,      /* unknown reduction */
    FD_OVERLAP = 9,            /* an output overlaps an input (only grad == student, out == x allowed) */
    FD_INTERNAL_ERROR = 10,    /* unexpected failure (e.g. out of memory); outputs unspecified */
    FD_BAD_INDEX = 11          /* a sparse teacher's class id is < -1 or >= n, or repeated in a row */
};

/* What a sparse (top-k) teacher's divergence compares (fastdistill.SparseTeacher's tail). */
enum fd_tail {
    FD_TAIL_RENORMALIZE = 0, /* p = w / sum_S w on the support, 0 elsewhere, against the full q */
    FD_TAIL_SUPPORT = 1,     /* p and q both renormalised over the support */
    FD_TAIL_BUCKET = 2       /* k + 1 bins: exp(v) and the rest; needs temperature 1 */
};

/* What the caller of fd_vocab_shard_* does after a step: combine request[0] doubles at the start of
 * `work` across the shards, in place, element-wise (FD_SHARD_MAX: maximum, FD_SHARD_SUM: sum), then call
 * the next step; FD_SHARD_DONE: the loss and this shard's gradient are written. */
enum fd_shard_op {
    FD_SHARD_MAX = 0,
    FD_SHARD_SUM = 1,
    FD_SHARD_DONE = 2
};

/* doubles per row of fd_vocab_shard_*'s work buffer (the exchanged numbers, the row statistics, and 4
 * per row that cover a round's check entries) */
#define FD_SHARD_WORK 32

/* Soft (teacher-matching) loss of fd_response_*: p = softmax(teacher / T), q = softmax(student / T). */
enum fd_loss_kind {
    FD_KL = 0,              /* T^2 * KL(p || q)                              DistilLoss.kl_divergence(T) */
    FD_REVERSE_KL = 1,      /* T^2 * KL(q || p)                              DistilLoss.reverse_kl(T) */
    FD_JSD = 2,             /* T^2 * generalized JSD, param = beta in [0,1]  DistilLoss.jsd(beta, T) */
    FD_SKEW_KL = 3,         /* T^2 * KL(p || a p + (1-a) q), param = alpha   DistilLoss.skew_kl(alpha, T) */
    FD_SKEW_REVERSE_KL = 4, /* T^2 * KL(q || (1-a) p + a q), param = alpha   DistilLoss.skew_reverse_kl(alpha, T) */
    FD_TVD = 5,             /* 0.5 * sum |p - q| (no T^2)                    DistilLoss.tvd(T) */
    FD_MSE = 6,             /* mean over classes of (t - s)^2, raw logits    DistilLoss.mse() */
    FD_COSINE = 7,          /* 1 - cos(s, t), raw logits; zero norm -> 1     DistilLoss.cosine() */
    FD_CE_ONLY = 8,         /* no soft term: hard_weight * CE only (soft_weight ignored) */
    FD_COMBINED = 9,        /* T^2 * KL + param * MSE                        DistilLoss.combined(1, param, T) */
    FD_ALPHA = 10           /* T^2 * (1 - sum p^a q^(1-a)) / (a (1-a)), param = a in [0,1]
                                                                             DistilLoss.alpha_divergence(a, T) */
};

/* How row losses are reduced. */
enum fd_reduction {
    FD_MEAN = 0, /* sum over counted rows / number of counted rows (0 and a zero gradient if none) */
    FD_SUM = 1,  /* sum over rows */
    FD_NONE = 2  /* one loss per row (0 for ignored rows); the gradient is that of the sum */
};

/* Row-wise softmax / log-softmax of x / temperature into out (out may be x itself).
 * FD_BAD_PARAM: temperature not finite or <= 0. */
typedef int32_t (*fd_softmax_f32_fn)(const float *x, int64_t rows, int64_t n, double temperature,
                                     float *out, int32_t nthreads);
typedef int32_t (*fd_softmax_f64_fn)(const double *x, int64_t rows, int64_t n, double temperature,
                                     double *out, int32_t nthreads);
/* (the _f16 and _bf16 entry points: 16-bit values as uint16_t) */
typedef int32_t (*fd_softmax_h16_fn)(const uint16_t *x, int64_t rows, int64_t n, double temperature,
                                     uint16_t *out, int32_t nthreads);

/* Response loss, per row:
 *     hard_weight * CE_eps(student, label) + soft_weight * soft(student, teacher)
 * with CE at temperature 1 (PyTorch's cross_entropy, label_smoothing eps) and soft() the loss_kind.
 *
 *   student, teacher  rows x n logits
 *   labels            rows int64 labels, or NULL (then no hard term and every row counts; hard_weight
 *                     must be 0). A row whose label == ignore_index counts nowhere: loss 0, gradient
 *                     0, not in the mean's divisor.
 *   loss_kind         enum fd_loss_kind
 *   temperature       T > 0 (ignored by FD_MSE, FD_COSINE, FD_CE_ONLY)
 *   hard_weight, soft_weight   finite
 *   param             beta (FD_JSD), alpha (FD_SKEW_KL, FD_SKEW_REVERSE_KL), in [0, 1];
 *                     the MSE weight (FD_COMBINED), finite; ignored otherwise
 *   label_smoothing   in [0, 1)
 *   ignore_index      e.g. -100
 *   reduction         enum fd_reduction
 *   loss_out          1 double (FD_MEAN, FD_SUM) or rows doubles (FD_NONE)
 *   grad              NULL (loss only) or rows x n: the gradient of the reduced loss with respect to
 *                     the student logits; it may be the student array itself (in-place update:
 *                     the speed and the bits of a separate buffer once fastdistill.capi.symbols(
 *                     in_place=True) has built the in-place workers; without them the slower scalar
 *                     loop, which may round an element 1 ulp apart)
 *   nthreads          0 = default
 *
 * Checks, in this order: shape (FD_BAD_SHAPE, FD_EMPTY_INPUT), pointers (FD_NULL_POINTER,
 * FD_OVERLAP), labels (FD_LABEL_OUT_OF_RANGE), then FD_BAD_KIND, FD_BAD_REDUCTION, FD_BAD_PARAM,
 * FD_MISSING_LABELS, nthreads (FD_BAD_PARAM). */
typedef int32_t (*fd_response_f32_fn)(const float *student, const float *teacher, const int64_t *labels,
                                      int64_t rows, int64_t n, int32_t loss_kind, double temperature,
                                      double hard_weight, double soft_weight, double param,
                                      double label_smoothing, int64_t ignore_index, int32_t reduction,
                                      double *loss_out, float *grad, int32_t nthreads);
typedef int32_t (*fd_response_f64_fn)(const double *student, const double *teacher, const int64_t *labels,
                                      int64_t rows, int64_t n, int32_t loss_kind, double temperature,
                                      double hard_weight, double soft_weight, double param,
                                      double label_smoothing, int64_t ignore_index, int32_t reduction,
                                      double *loss_out, double *grad, int32_t nthreads);
typedef int32_t (*fd_response_h16_fn)(const uint16_t *student, const uint16_t *teacher, const int64_t *labels,
                                      int64_t rows, int64_t n, int32_t loss_kind, double temperature,
                                      double hard_weight, double soft_weight, double param,
                                      double label_smoothing, int64_t ignore_index, int32_t reduction,
                                      double *loss_out, uint16_t *grad, int32_t nthreads);

/* MSE (fd_mse_*) and cosine distance (fd_cosine_*): fd_response_* with that kind, no labels, weight 1.
 * loss_out, grad and nthreads as above. */
typedef int32_t (*fd_linear_f32_fn)(const float *student, const float *teacher, int64_t rows, int64_t n,
                                    int32_t reduction, double *loss_out, float *grad, int32_t nthreads);
typedef int32_t (*fd_linear_f64_fn)(const double *student, const double *teacher, int64_t rows, int64_t n,
                                    int32_t reduction, double *loss_out, double *grad, int32_t nthreads);
typedef int32_t (*fd_linear_h16_fn)(const uint16_t *student, const uint16_t *teacher, int64_t rows, int64_t n,
                                    int32_t reduction, double *loss_out, uint16_t *grad, int32_t nthreads);

/* Response loss with a sparse (top-k) teacher: `indices` rows x k class ids (-1: an unused slot, no id
 * twice in a row), `values` rows x k float32 log-probabilities of the teacher at those ids, produced at
 * temperature `teacher_temperature` (T_gen; 1 for plain log-probabilities): at loss temperature T the
 * weights are exp(value * T_gen / T). `tail` enum fd_tail. The other arguments as fd_response_*; the
 * gradient is dense.
 * loss_kind: FD_KL, FD_REVERSE_KL, FD_JSD, FD_SKEW_KL, FD_SKEW_REVERSE_KL, FD_TVD or FD_CE_ONLY (MSE,
 * cosine and combined need dense logits: FD_BAD_KIND). FD_BAD_INDEX for a bad id; FD_BAD_PARAM also for
 * k < 1, an unknown tail, a teacher_temperature that is not finite and > 0, FD_TAIL_BUCKET with
 * T != teacher_temperature, and a divergence that is infinite with
 * FD_TAIL_RENORMALIZE (reverse KL, jsd with beta = 1, skew reverse KL with alpha = 0). */
typedef int32_t (*fd_response_sparse_f32_fn)(const float *student, const int64_t *indices, const float *values,
                                             int64_t k, const int64_t *labels, int64_t rows, int64_t n,
                                             int32_t loss_kind, double temperature, double hard_weight,
                                             double soft_weight, double param, double label_smoothing,
                                             int64_t ignore_index, int32_t tail, double teacher_temperature,
                                             int32_t reduction, double *loss_out, float *grad, int32_t nthreads);
typedef int32_t (*fd_response_sparse_f64_fn)(const double *student, const int64_t *indices, const float *values,
                                             int64_t k, const int64_t *labels, int64_t rows, int64_t n,
                                             int32_t loss_kind, double temperature, double hard_weight,
                                             double soft_weight, double param, double label_smoothing,
                                             int64_t ignore_index, int32_t tail, double teacher_temperature,
                                             int32_t reduction, double *loss_out, double *grad, int32_t nthreads);
typedef int32_t (*fd_response_sparse_h16_fn)(const uint16_t *student, const int64_t *indices, const float *values,
                                             int64_t k, const int64_t *labels, int64_t rows, int64_t n,
                                             int32_t loss_kind, double temperature, double hard_weight,
                                             double soft_weight, double param, double label_smoothing,
                                             int64_t ignore_index, int32_t tail, double teacher_temperature,
                                             int32_t reduction, double *loss_out, uint16_t *grad, int32_t nthreads);

/* Response loss over a vocabulary split across processes (tensor parallelism): this process holds the
 * columns [class_offset, class_offset + n) of rows x classes logits of the student and the teacher (the
 * same rows in every shard), `labels` are global class ids. The loss is computed in steps; between two
 * steps every shard combines the numbers the step asked for with its own communication (MPI_Allreduce,
 * NCCL, ...), in the same order on every shard:
 *
 *     int64_t req[2];                         // req[0]: how many doubles, req[1]: enum fd_shard_op
 *     for (int32_t step = 0;; ++step) {
 *         st = fd_vocab_shard_f32(step, s, t, labels, rows, n, class_offset, classes, ..., work, req, loss, grad, 0);
 *         if (st != FD_OK || req[1] == FD_SHARD_DONE) break;
 *         MPI_Allreduce(MPI_IN_PLACE, work, req[0], MPI_DOUBLE, req[1] == FD_SHARD_MAX ? MPI_MAX : MPI_SUM, comm);
 *     }
 *
 * Two exchanges (3 for FD_JSD, FD_SKEW_KL, FD_SKEW_REVERSE_KL and FD_TVD with soft_weight != 0): 2
 * doubles per row and 6 more (max), 12 per row and 4 more (sum), then 5 per row and 1 more (sum); never
 * rows x classes. The few after the rows are the round's check entries (the shard's place in the row,
 * as fastdistill.sharded's): the step that reads a combined round returns FD_BAD_SHAPE, on every shard,
 * when they show shards that do not tile [0, classes) (a gap, an overlap, a wrong class_offset, shards
 * disagreeing on classes) or a round that was not combined (or combined twice). Then every shard holds
 * the same loss (loss_out as in fd_response_*) and the gradient of its own columns (grad: rows x n, or
 * NULL), equal to fd_response_* on the whole rows. `work`: rows * FD_SHARD_WORK doubles owned by the
 * caller, kept between the steps of one loss (the row statistics live there). The other arguments as
 * fd_response_*; FD_LABEL_OUT_OF_RANGE against `classes`; FD_BAD_SHAPE also when the columns do not lie
 * in [0, classes) or the shards do not tile it;
 * FD_BAD_PARAM also for a step outside [0, 3] or past the last. */
typedef int32_t (*fd_vocab_shard_f32_fn)(int32_t step, const float *student, const float *teacher,
                                         const int64_t *labels, int64_t rows, int64_t n, int64_t class_offset,
                                         int64_t classes, int32_t loss_kind, double temperature, double hard_weight,
                                         double soft_weight, double param, double label_smoothing,
                                         int64_t ignore_index, int32_t reduction, double *work, int64_t *request,
                                         double *loss_out, float *grad, int32_t nthreads);
typedef int32_t (*fd_vocab_shard_f64_fn)(int32_t step, const double *student, const double *teacher,
                                         const int64_t *labels, int64_t rows, int64_t n, int64_t class_offset,
                                         int64_t classes, int32_t loss_kind, double temperature, double hard_weight,
                                         double soft_weight, double param, double label_smoothing,
                                         int64_t ignore_index, int32_t reduction, double *work, int64_t *request,
                                         double *loss_out, double *grad, int32_t nthreads);
typedef int32_t (*fd_vocab_shard_h16_fn)(int32_t step, const uint16_t *student, const uint16_t *teacher,
                                         const int64_t *labels, int64_t rows, int64_t n, int64_t class_offset,
                                         int64_t classes, int32_t loss_kind, double temperature, double hard_weight,
                                         double soft_weight, double param, double label_smoothing,
                                         int64_t ignore_index, int32_t reduction, double *work, int64_t *request,
                                         double *loss_out, uint16_t *grad, int32_t nthreads);

/* Returns FD_ABI_VERSION of the library that compiled the entry points. */
typedef int32_t (*fd_abi_version_fn)(void);

/* All entry points; the comment is the key in fastdistill.capi.symbols(). */
typedef struct fd_api {
    fd_abi_version_fn abi_version;  /* "fd_abi_version" */
    fd_softmax_f32_fn softmax_f32;  /* "fd_softmax_f32" */
    fd_softmax_f32_fn log_softmax_f32; /* "fd_log_softmax_f32" */
    fd_response_f32_fn response_f32;   /* "fd_response_f32" */
    fd_linear_f32_fn mse_f32;       /* "fd_mse_f32" */
    fd_linear_f32_fn cosine_f32;    /* "fd_cosine_f32" */
    fd_softmax_f64_fn softmax_f64;  /* "fd_softmax_f64" */
    fd_softmax_f64_fn log_softmax_f64; /* "fd_log_softmax_f64" */
    fd_response_f64_fn response_f64;   /* "fd_response_f64" */
    fd_linear_f64_fn mse_f64;       /* "fd_mse_f64" */
    fd_linear_f64_fn cosine_f64;    /* "fd_cosine_f64" */
    fd_softmax_h16_fn softmax_f16;  /* "fd_softmax_f16" */
    fd_softmax_h16_fn log_softmax_f16; /* "fd_log_softmax_f16" */
    fd_response_h16_fn response_f16;   /* "fd_response_f16" */
    fd_linear_h16_fn mse_f16;       /* "fd_mse_f16" */
    fd_linear_h16_fn cosine_f16;    /* "fd_cosine_f16" */
    fd_softmax_h16_fn softmax_bf16;  /* "fd_softmax_bf16" */
    fd_softmax_h16_fn log_softmax_bf16; /* "fd_log_softmax_bf16" */
    fd_response_h16_fn response_bf16;   /* "fd_response_bf16" */
    fd_linear_h16_fn mse_bf16;       /* "fd_mse_bf16" */
    fd_linear_h16_fn cosine_bf16;    /* "fd_cosine_bf16" */
    fd_response_sparse_f32_fn response_sparse_f32;  /* "fd_response_sparse_f32" */
    fd_response_sparse_f64_fn response_sparse_f64;  /* "fd_response_sparse_f64" */
    fd_response_sparse_h16_fn response_sparse_f16;  /* "fd_response_sparse_f16" */
    fd_response_sparse_h16_fn response_sparse_bf16; /* "fd_response_sparse_bf16" */
    fd_vocab_shard_f32_fn vocab_shard_f32;  /* "fd_vocab_shard_f32" */
    fd_vocab_shard_f64_fn vocab_shard_f64;  /* "fd_vocab_shard_f64" */
    fd_vocab_shard_h16_fn vocab_shard_f16;  /* "fd_vocab_shard_f16" */
    fd_vocab_shard_h16_fn vocab_shard_bf16; /* "fd_vocab_shard_bf16" */
} fd_api;

/* A short text for a status code. */
static inline const char *fd_status_string(int32_t status)
{
    switch (status) {
    case FD_OK: return "FD_OK: success";
    case FD_NULL_POINTER: return "FD_NULL_POINTER: a required pointer is NULL";
    case FD_EMPTY_INPUT: return "FD_EMPTY_INPUT: rows or n is 0";
    case FD_BAD_SHAPE: return "FD_BAD_SHAPE: rows or n is negative, or rows*n is too large";
    case FD_LABEL_OUT_OF_RANGE: return "FD_LABEL_OUT_OF_RANGE: a label is < 0 or >= n (and not ignore_index)";
    case FD_MISSING_LABELS: return "FD_MISSING_LABELS: labels is NULL but hard_weight is not 0";
    case FD_BAD_PARAM: return "FD_BAD_PARAM: bad temperature, weight, beta/alpha, label_smoothing or nthreads";
    case FD_BAD_KIND: return "FD_BAD_KIND: unknown loss kind";
    case FD_BAD_REDUCTION: return "FD_BAD_REDUCTION: unknown reduction";
    case FD_OVERLAP: return "FD_OVERLAP: an output buffer overlaps an input";
    case FD_INTERNAL_ERROR: return "FD_INTERNAL_ERROR: internal error (e.g. out of memory)";
    case FD_BAD_INDEX: return "FD_BAD_INDEX: a sparse teacher's class id is out of range or repeated";
    default: return "unknown fastdistill status";
    }
}

#ifdef __cplusplus
}
#endif

#endif /* FASTDISTILL_H */

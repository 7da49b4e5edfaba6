"""The C ABI: entry points called from C (a shared library built here with the system compiler)
against the Python API and float64 references, status codes for bad input, calls from four C
threads at once, and the example C host program."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import fastdistill as fd
from conftest import IGNORE, TOL, make_batch, rel_err
from fastdistill import _spec, capi
from reference import cross_entropy, divergence, log_softmax, reduce, torch_response

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "c_host")

HARNESS = r"""
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include "fastdistill.h"

static fd_api api;

/* Fill the table from the addresses, in the order of fastdistill.capi.SYMBOL_NAMES. */
int32_t h_load(const uint64_t *a)
{
    api.abi_version = (fd_abi_version_fn)(uintptr_t)a[0];
    api.softmax_f32 = (fd_softmax_f32_fn)(uintptr_t)a[1];
    api.log_softmax_f32 = (fd_softmax_f32_fn)(uintptr_t)a[2];
    api.response_f32 = (fd_response_f32_fn)(uintptr_t)a[3];
    api.mse_f32 = (fd_linear_f32_fn)(uintptr_t)a[4];
    api.cosine_f32 = (fd_linear_f32_fn)(uintptr_t)a[5];
    api.softmax_f64 = (fd_softmax_f64_fn)(uintptr_t)a[6];
    api.log_softmax_f64 = (fd_softmax_f64_fn)(uintptr_t)a[7];
    api.response_f64 = (fd_response_f64_fn)(uintptr_t)a[8];
    api.mse_f64 = (fd_linear_f64_fn)(uintptr_t)a[9];
    api.cosine_f64 = (fd_linear_f64_fn)(uintptr_t)a[10];
    api.softmax_f16 = (fd_softmax_h16_fn)(uintptr_t)a[11];
    api.log_softmax_f16 = (fd_softmax_h16_fn)(uintptr_t)a[12];
    api.response_f16 = (fd_response_h16_fn)(uintptr_t)a[13];
    api.mse_f16 = (fd_linear_h16_fn)(uintptr_t)a[14];
    api.cosine_f16 = (fd_linear_h16_fn)(uintptr_t)a[15];
    api.softmax_bf16 = (fd_softmax_h16_fn)(uintptr_t)a[16];
    api.log_softmax_bf16 = (fd_softmax_h16_fn)(uintptr_t)a[17];
    api.response_bf16 = (fd_response_h16_fn)(uintptr_t)a[18];
    api.mse_bf16 = (fd_linear_h16_fn)(uintptr_t)a[19];
    api.cosine_bf16 = (fd_linear_h16_fn)(uintptr_t)a[20];
    api.response_sparse_f32 = (fd_response_sparse_f32_fn)(uintptr_t)a[21];
    api.response_sparse_f64 = (fd_response_sparse_f64_fn)(uintptr_t)a[22];
    api.response_sparse_f16 = (fd_response_sparse_h16_fn)(uintptr_t)a[23];
    api.response_sparse_bf16 = (fd_response_sparse_h16_fn)(uintptr_t)a[24];
    api.vocab_shard_f32 = (fd_vocab_shard_f32_fn)(uintptr_t)a[25];
    api.vocab_shard_f64 = (fd_vocab_shard_f64_fn)(uintptr_t)a[26];
    api.vocab_shard_f16 = (fd_vocab_shard_h16_fn)(uintptr_t)a[27];
    api.vocab_shard_bf16 = (fd_vocab_shard_h16_fn)(uintptr_t)a[28];
    return api.abi_version();
}

int32_t h_vocab_shard(int prec, int32_t step, const void *s, const void *t, const int64_t *labels, int64_t rows,
                      int64_t n, int64_t offset, int64_t classes, int32_t kind, double temperature, double hard_w,
                      double soft_w, double param, double smoothing, int64_t ignore_index, int32_t reduction,
                      double *work, int64_t *request, double *loss, void *grad, int32_t nthreads)
{
    if (prec == 2 || prec == 3)
        return (prec == 2 ? api.vocab_shard_f16 : api.vocab_shard_bf16)(
            step, (const uint16_t *)s, (const uint16_t *)t, labels, rows, n, offset, classes, kind, temperature,
            hard_w, soft_w, param, smoothing, ignore_index, reduction, work, request, loss, (uint16_t *)grad,
            nthreads);
    if (prec == 1)
        return api.vocab_shard_f64(step, (const double *)s, (const double *)t, labels, rows, n, offset, classes,
                                   kind, temperature, hard_w, soft_w, param, smoothing, ignore_index, reduction,
                                   work, request, loss, (double *)grad, nthreads);
    return api.vocab_shard_f32(step, (const float *)s, (const float *)t, labels, rows, n, offset, classes, kind,
                               temperature, hard_w, soft_w, param, smoothing, ignore_index, reduction, work,
                               request, loss, (float *)grad, nthreads);
}

int32_t h_response_sparse(int prec, const void *s, const int64_t *idx, const float *vals, int64_t k,
                          const int64_t *labels, int64_t rows, int64_t n, int32_t kind, double temperature,
                          double hard_w, double soft_w, double param, double smoothing, int64_t ignore_index,
                          int32_t tail, double t_gen, int32_t reduction, double *loss, void *grad, int32_t nthreads)
{
    if (prec == 1)
        return api.response_sparse_f64((const double *)s, idx, vals, k, labels, rows, n, kind, temperature, hard_w,
                                       soft_w, param, smoothing, ignore_index, tail, t_gen, reduction, loss,
                                       (double *)grad, nthreads);
    if (prec == 2 || prec == 3)
        return (prec == 2 ? api.response_sparse_f16 : api.response_sparse_bf16)(
            (const uint16_t *)s, idx, vals, k, labels, rows, n, kind, temperature, hard_w, soft_w, param, smoothing,
            ignore_index, tail, t_gen, reduction, loss, (uint16_t *)grad, nthreads);
    return api.response_sparse_f32((const float *)s, idx, vals, k, labels, rows, n, kind, temperature, hard_w,
                                   soft_w, param, smoothing, ignore_index, tail, t_gen, reduction, loss, (float *)grad,
                                   nthreads);
}

/* prec: 0 float32, 1 float64, 2 float16, 3 bfloat16 */
int32_t h_softmax(int prec, int log, const void *x, int64_t rows, int64_t n, double temperature, void *out,
                  int32_t nthreads)
{
    if (prec == 2)
        return (log ? api.log_softmax_f16 : api.softmax_f16)((const uint16_t *)x, rows, n, temperature,
                                                             (uint16_t *)out, nthreads);
    if (prec == 3)
        return (log ? api.log_softmax_bf16 : api.softmax_bf16)((const uint16_t *)x, rows, n, temperature,
                                                               (uint16_t *)out, nthreads);
    if (prec == 1)
        return (log ? api.log_softmax_f64 : api.softmax_f64)((const double *)x, rows, n, temperature,
                                                             (double *)out, nthreads);
    return (log ? api.log_softmax_f32 : api.softmax_f32)((const float *)x, rows, n, temperature,
                                                         (float *)out, nthreads);
}

int32_t h_response(int prec, const void *s, const void *t, const int64_t *labels, int64_t rows, int64_t n,
                   int32_t kind, double temperature, double hard_w, double soft_w, double param,
                   double smoothing, int64_t ignore_index, int32_t reduction, double *loss, void *grad,
                   int32_t nthreads)
{
    if (prec == 2 || prec == 3)
        return (prec == 2 ? api.response_f16 : api.response_bf16)(
            (const uint16_t *)s, (const uint16_t *)t, labels, rows, n, kind, temperature, hard_w, soft_w, param,
            smoothing, ignore_index, reduction, loss, (uint16_t *)grad, nthreads);
    if (prec == 1)
        return api.response_f64((const double *)s, (const double *)t, labels, rows, n, kind, temperature,
                                hard_w, soft_w, param, smoothing, ignore_index, reduction, loss,
                                (double *)grad, nthreads);
    return api.response_f32((const float *)s, (const float *)t, labels, rows, n, kind, temperature, hard_w,
                            soft_w, param, smoothing, ignore_index, reduction, loss, (float *)grad, nthreads);
}

int32_t h_linear(int prec, int cosine, const void *s, const void *t, int64_t rows, int64_t n, int32_t reduction,
                 double *loss, void *grad, int32_t nthreads)
{
    if (prec == 2)
        return (cosine ? api.cosine_f16 : api.mse_f16)((const uint16_t *)s, (const uint16_t *)t, rows, n,
                                                       reduction, loss, (uint16_t *)grad, nthreads);
    if (prec == 3)
        return (cosine ? api.cosine_bf16 : api.mse_bf16)((const uint16_t *)s, (const uint16_t *)t, rows, n,
                                                         reduction, loss, (uint16_t *)grad, nthreads);
    if (prec == 1)
        return (cosine ? api.cosine_f64 : api.mse_f64)((const double *)s, (const double *)t, rows, n,
                                                       reduction, loss, (double *)grad, nthreads);
    return (cosine ? api.cosine_f32 : api.mse_f32)((const float *)s, (const float *)t, rows, n, reduction,
                                                   loss, (float *)grad, nthreads);
}

/* Threads: thread k computes the loss and gradient of its own block of rows, `repeats` times. */
typedef struct {
    const float *s, *t;
    const int64_t *labels;
    int64_t rows, n;
    int32_t nthreads, repeats;
    double *loss;
    float *grad;
    int32_t status;
    pthread_barrier_t *barrier;
} job;

static void *worker(void *arg)
{
    job *j = (job *)arg;
    pthread_barrier_wait(j->barrier);
    j->status = FD_INTERNAL_ERROR;
    for (int32_t i = 0; i < j->repeats; i++) {
        j->status = api.response_f32(j->s, j->t, j->labels, j->rows, j->n, FD_KL, 2.0, 0.5, 0.5, 0.0, 0.1,
                                     -100, FD_MEAN, j->loss, j->grad, j->nthreads);
        if (j->status != FD_OK)
            break;
    }
    return NULL;
}

int32_t h_threads(int32_t nthr, const float *s, const float *t, const int64_t *labels, int64_t rows, int64_t n,
                  int32_t nthreads, int32_t repeats, double *loss, float *grad, int32_t *status)
{
    pthread_t tid[16];
    job jobs[16];
    pthread_barrier_t barrier;
    if (nthr > 16)
        return -1;
    pthread_barrier_init(&barrier, NULL, (unsigned)nthr);
    for (int32_t k = 0; k < nthr; k++) {
        job j = {s + k * rows * n, t + k * rows * n, labels + k * rows, rows, n, nthreads, repeats,
                 loss + k, grad + k * rows * n, FD_INTERNAL_ERROR, &barrier};
        jobs[k] = j;
        if (pthread_create(&tid[k], NULL, worker, &jobs[k]) != 0)
            return -2;
    }
    for (int32_t k = 0; k < nthr; k++) {
        pthread_join(tid[k], NULL);
        status[k] = jobs[k].status;
    }
    pthread_barrier_destroy(&barrier);
    return 0;
}
"""

# kind name -> (C kind, DistilLoss for a given (param, temperature), whether -inf masks are meaningful)
KINDS = {
    "kl_divergence": (capi.FD_KL, lambda p, T: fd.DistilLoss.kl_divergence(T), True),
    "reverse_kl": (capi.FD_REVERSE_KL, lambda p, T: fd.DistilLoss.reverse_kl(T), True),
    "jsd": (capi.FD_JSD, lambda p, T: fd.DistilLoss.jsd(p, T), True),
    "skew_kl": (capi.FD_SKEW_KL, lambda p, T: fd.DistilLoss.skew_kl(p, T), True),
    "skew_reverse_kl": (capi.FD_SKEW_REVERSE_KL, lambda p, T: fd.DistilLoss.skew_reverse_kl(p, T), True),
    "tvd": (capi.FD_TVD, lambda p, T: fd.DistilLoss.tvd(T), True),
    "mse": (capi.FD_MSE, lambda p, T: fd.DistilLoss.mse(), False),
    "cosine": (capi.FD_COSINE, lambda p, T: fd.DistilLoss.cosine(), False),
    "ce_only": (capi.FD_CE_ONLY, None, True),
    "combined": (capi.FD_COMBINED, lambda p, T: fd.DistilLoss.combined(1.0, p, T), False),
    "alpha_divergence": (capi.FD_ALPHA, lambda p, T: fd.DistilLoss.alpha_divergence(p, T), True),
}
RED = capi.REDUCTIONS
PREC = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}  # the harness's precision codes
# C entry point vs Python API with other thread counts or buffers: a few ulps
SAME = {np.float32: 1e-6, np.float64: 1e-13}


def find_cc() -> str | None:
    for cand in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if cand:
            exe = shutil.which(cand.split()[0])
            if exe:
                return exe
    return None


@pytest.fixture(scope="module")
def cc():
    exe = find_cc()
    if exe is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH: the C ABI tests need one")
    return exe


@pytest.fixture(scope="module")
def lib(cc, tmp_path_factory):
    """The C harness, built as a shared library, loaded and given the entry points' addresses."""
    d = tmp_path_factory.mktemp("capi")
    src = d / "harness.c"
    src.write_text(HARNESS)
    so = d / "libharness.so"
    cmd = [cc, "-std=c99", "-O1", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", f"-I{capi.include_dir()}",
           str(src), "-o", str(so), "-pthread"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    h = ctypes.CDLL(str(so))  # a CDLL call releases the GIL, as a native caller would not hold it
    vp, i32, i64, dbl = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_double
    h.h_load.argtypes = [vp]
    h.h_load.restype = i32
    h.h_softmax.argtypes = [ctypes.c_int, ctypes.c_int, vp, i64, i64, dbl, vp, i32]
    h.h_softmax.restype = i32
    h.h_response.argtypes = [ctypes.c_int, vp, vp, vp, i64, i64, i32, dbl, dbl, dbl, dbl, dbl, i64, i32, vp, vp, i32]
    h.h_response.restype = i32
    h.h_linear.argtypes = [ctypes.c_int, ctypes.c_int, vp, vp, i64, i64, i32, vp, vp, i32]
    h.h_linear.restype = i32
    h.h_threads.argtypes = [i32, vp, vp, vp, i64, i64, i32, i32, vp, vp, vp]
    h.h_threads.restype = i32
    h.h_response_sparse.argtypes = [ctypes.c_int, vp, vp, vp, i64, vp, i64, i64, i32, dbl, dbl, dbl, dbl, dbl, i64,
                                    i32, dbl, i32, vp, vp, i32]
    h.h_response_sparse.restype = i32
    h.h_vocab_shard.argtypes = [ctypes.c_int, i32, vp, vp, vp, i64, i64, i64, i64, i32, dbl, dbl, dbl, dbl, dbl, i64,
                                i32, vp, vp, vp, vp, i32]
    h.h_vocab_shard.restype = i32
    syms = capi.symbols()
    addrs = np.array([syms[name] for name in capi.SYMBOL_NAMES], dtype=np.uint64)
    assert h.h_load(addrs.ctypes.data) == capi.ABI_VERSION
    return h


def ptr(a):
    return None if a is None else a.ctypes.data


def c_response(lib, s, t, y, kind, T=1.0, hard_w=0.0, soft_w=1.0, param=0.0, eps=0.0, ignore_index=IGNORE,
               reduction="mean", grad=True, nthreads=0):
    """(status, loss or per-row losses, grad or None) through the C harness."""
    rows, n = s.shape
    loss = np.full(rows if reduction == "none" else 1, -7.0)
    g = np.full_like(s, -7.0) if grad is True else grad
    st = lib.h_response(PREC[s.dtype.name], ptr(s), ptr(t), ptr(y), rows, n, kind, T, hard_w, soft_w, param, eps,
                        ignore_index, RED.get(reduction, reduction), ptr(loss), ptr(g), nthreads)
    return st, (loss if reduction == "none" else loss[0]), g


def py_response(name, s, t, y, T, hard_w, soft_w, param, eps, reduction, ignore_index=IGNORE):
    """The same loss through the Python API."""
    if name == "ce_only":
        # no soft term: ResponseDistiller with any soft loss at soft weight 0
        d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(), hard_w, 0.0, ignore_index=ignore_index,
                                 label_smoothing=eps)
    else:
        d = fd.ResponseDistiller(KINDS[name][1](param, T), hard_w, soft_w, ignore_index=ignore_index,
                                 label_smoothing=eps)
    return d.loss_and_grad(s, t, y, reduction=reduction)


def ref_rows(name, s, t, y, T, hard_w, soft_w, param, eps, ignore_index=IGNORE):
    """Independent float64 row losses (NumPy) and the counted-row mask."""
    s64 = s.astype(np.float64)
    t64 = t.astype(np.float64)
    if name == "ce_only":
        soft = np.zeros(s.shape[0])
    elif name == "combined":
        soft = divergence("kl_divergence", s64, t64, T) + param * divergence("mse", s64, t64)
    else:
        soft = divergence(name, s64, t64, T, param)
    if y is None:
        return soft_w * soft, np.ones(s.shape[0], bool)
    keep = y != ignore_index
    hard = cross_entropy(s64, np.where(keep, y, 0), eps) if hard_w != 0 else 0.0
    return np.where(keep, hard_w * hard + soft_w * soft, 0.0), keep


# ------------------------------------------------------------------ header and constants


def header_enums() -> dict[str, int]:
    text = open(capi.header_path()).read()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"\b(FD_[A-Z0-9_]+)\s*=\s*(-?\d+)", text)}


def test_header_matches_python_constants():
    enums = header_enums()
    expected = {name: getattr(capi, name) for name in enums}
    assert enums == expected
    assert set(capi.STATUS_NAMES.values()) <= set(enums)
    assert set(capi.STATUS_NAMES) == set(capi.STATUS_MESSAGES)
    assert set(capi.LOSS_KINDS.values()) == set(range(len(capi.LOSS_KINDS)))
    text = open(capi.header_path()).read()
    assert re.search(r"#define FD_ABI_VERSION (\d+)", text).group(1) == str(capi.ABI_VERSION)
    # a shard's work buffer: the widest exchange (the first round of sums), then the CPU row statistics
    from fastdistill.cpu import _kernels as K

    assert re.search(r"#define FD_SHARD_WORK (\d+)", text).group(1) == str(capi.FD_SHARD_WORK)
    from fastdistill import _shard_check as SC

    # (and the sums round's check entries after its rows, once per row: the widest exchange is rows * 12 + 4
    # doubles; the maxima's rows * 2 + 6 is no wider for rows >= 1)
    assert capi.FD_SHARD_WORK == (K.S_DSUM - K.N_MAX) + K.N_STATS + SC.N_CHECK_SUM
    assert 2 + SC.N_CHECK_MAX <= (K.S_DSUM - K.N_MAX) + SC.N_CHECK_SUM
    # the fd_api table lists every symbol, in SYMBOL_NAMES order
    assert re.findall(r'/\* "(fd_\w+)" \*/', text) == list(capi.SYMBOL_NAMES)


def test_header_path_and_package_data():
    assert os.path.isfile(capi.header_path())
    assert os.path.dirname(capi.header_path()) == capi.include_dir()


@pytest.mark.parametrize("lang", ["c", "c++"])
def test_header_compiles_strictly(cc, tmp_path, lang):
    compiler = cc if lang == "c" else shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / ("t.c" if lang == "c" else "t.cpp")
    src.write_text('#include "fastdistill.h"\nstatic fd_api api;\nint main(void) { (void)api;\n'
                   "return fd_status_string(FD_OK)[0] == 'F' ? 0 : 1; }\n")
    std = ["-std=c99", "-pedantic"] if lang == "c" else ["-std=c++11"]
    res = subprocess.run([compiler, *std, "-Wall", "-Wextra", "-Werror", f"-I{capi.include_dir()}", str(src),
                          "-o", str(tmp_path / "t")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert subprocess.run([str(tmp_path / "t")]).returncode == 0


def test_status_message():
    assert capi.status_message(0).startswith("FD_OK")
    assert "label" in capi.status_message(capi.FD_LABEL_OUT_OF_RANGE)
    assert capi.status_message(99) == "unknown status code 99"


def test_symbols():
    syms = capi.symbols()
    assert tuple(syms) == capi.SYMBOL_NAMES
    assert all(isinstance(a, int) and a > 0 for a in syms.values())
    assert set(capi.symbols("f32")) == {"fd_abi_version"} | {k for k in syms if k.endswith("_f32")}
    assert set(capi.symbols("f16")) == {"fd_abi_version"} | {k for k in syms if k.endswith("_f16")}
    assert set(capi.symbols("bf16")) == {"fd_abi_version"} | {k for k in syms if k.endswith("_bf16")}
    with pytest.raises(ValueError):
        capi.symbols("f8")
    abi = ctypes.CFUNCTYPE(ctypes.c_int32)(syms["fd_abi_version"])
    assert abi() == capi.ABI_VERSION


def test_cli(capsys):
    from fastdistill import cli

    assert cli.main(["capi"]) == 0
    out = capsys.readouterr().out
    assert capi.header_path() in out
    for name, addr in capi.symbols().items():
        assert f"{name} 0x{addr:x}" in out
    assert cli.main(["capi", "--cflags"]) == 0
    out = capsys.readouterr().out
    assert f"-I{capi.include_dir()}" in out and f"-I{sysconfig.get_path('include')}" in out


# ------------------------------------------------------------------ loss kind -> terms (one mapping)


@pytest.mark.parametrize("name", sorted(KINDS))
@pytest.mark.parametrize("param", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0, 3.0, 4.0, 40.0])  # shared CE normaliser, powers, float64 math
@pytest.mark.parametrize("has_labels", [False, True])
def test_loss_terms_and_variant_match_the_python_api(name, param, T, has_labels):
    """The compiled mapping the entry points use gives DistilLoss.terms()'s numbers, and the dispatch
    picks the variant the Python API resolves (the one table of fastdistill._spec)."""
    from fastdistill._spec import Terms, resolve
    from fastdistill.capi import _cfuncs

    kind = KINDS[name][0]
    hard_w, soft_w, eps = 0.3, 0.7, 0.05
    if name == "ce_only":
        terms = Terms(hard_w=hard_w, smoothing=eps)
    else:
        terms = KINDS[name][1](param, T).terms(soft_w, hard_w=hard_w, smoothing=eps)
    P = np.full(len(terms.pack()), np.nan)
    div = _cfuncs.loss_terms(kind, T, hard_w, soft_w, param, eps, P)
    assert div == terms.div
    np.testing.assert_array_equal(P, terms.pack())
    for code, dtype in enumerate(_spec.STORAGES):
        idx, two_pass = _cfuncs.kernel_variant(div, P, has_labels, code)
        want = resolve(terms, has_labels, dtype)
        assert _cfuncs.VARIANTS[idx] == want
        assert two_pass == want.two_pass
    assert _cfuncs.loss_terms(42, T, hard_w, soft_w, param, eps, P) == -1


# ------------------------------------------------------------------ results against the Python API


CASES = [
    # name, T, hard_w, soft_w, param, eps
    ("kl_divergence", 2.0, 0.5, 0.5, 0.0, 0.0),  # tau 2 with CE: the power path
    ("kl_divergence", 4.0, 0.5, 0.5, 0.0, 0.0),  # tau 4 with CE: the power path
    ("kl_divergence", 40.0, 0.5, 0.5, 0.0, 0.0),  # float64 arithmetic for float32 logits
    ("kl_divergence", 1.0, 0.3, 0.7, 0.0, 0.1),  # tau 1: CE shares the divergence's normaliser
    ("reverse_kl", 1.5, 0.4, 1.0, 0.0, 0.0),
    ("jsd", 2.0, 0.5, 0.5, 0.3, 0.0),
    ("jsd", 1.0, 0.0, 1.0, 1.0, 0.0),
    ("skew_kl", 1.0, 0.2, 0.8, 0.1, 0.05),
    ("skew_reverse_kl", 3.0, 0.5, 0.5, 0.1, 0.0),
    ("tvd", 2.0, 0.5, 1.0, 0.0, 0.0),
    ("mse", 1.0, 0.0, 0.5, 0.0, 0.0),
    ("cosine", 1.0, 0.25, 1.0, 0.0, 0.0),
    ("ce_only", 1.0, 1.0, 0.0, 0.0, 0.1),
    ("combined", 2.0, 0.0, 1.0, 0.5, 0.0),
    ("alpha_divergence", 2.0, 0.5, 0.5, 0.3, 0.0),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("labels", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-T{c[1]}")
def test_response_matches_python_api(lib, case, reduction, labels, dtype):
    name, T, hard_w, soft_w, param, eps = case
    if not labels:
        hard_w = 0.0
        if name == "ce_only":
            pytest.skip("CE alone needs labels")
    masked = KINDS[name][2] and eps == 0.0  # label smoothing over a -inf logit is an infinite loss
    s, t, y = make_batch(13, 37, dtype, seed=CASES.index(case), mask=masked)
    y = y.astype(np.int64) if labels else None
    st, loss, grad = c_response(lib, s, t, y, KINDS[name][0], T, hard_w, soft_w, param, eps, reduction=reduction)
    assert st == capi.FD_OK, capi.status_message(st)
    py_loss, py_grad = py_response(name, s, t, y, T, hard_w, soft_w, param, eps, reduction)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    # the same kernel variant as the Python API (its worker, through the same driver): the same bits,
    # also where the Python API takes the power path (tau 2 and 4 with a hard-label term); the reduced
    # loss up to the order of the sum of the row losses (NumPy sums pairwise)
    np.testing.assert_array_equal(grad, py_grad)
    if reduction == "none":  # (the Python API returns the rows in the input's precision)
        np.testing.assert_array_equal(loss.astype(py_loss.dtype), py_loss)
    else:
        assert loss == pytest.approx(py_loss, rel=1e-15 if dtype == np.float64 else 1e-7)
    # and the float64 references
    rows, keep = ref_rows(name, s, t, y, T, hard_w, soft_w, param, eps)
    ref = reduce(rows, keep, reduction)
    assert rel_err(loss, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["kl_divergence", "jsd", "skew_reverse_kl", "tvd", "cosine"])
def test_response_grad_against_torch(lib, torch, name, dtype):
    s, t, y = make_batch(9, 21, dtype, seed=5, mask=False)  # label smoothing: no -inf logits
    y = y.astype(np.int64)
    T, param = 2.0, 0.4
    st, loss, grad = c_response(lib, s, t, y, KINDS[name][0], T, 0.3, 0.7, param, 0.1)
    assert st == capi.FD_OK
    ref_loss, ref_grad = torch_response(s, t, y, 0.3, 0.7, name, T, param, 0.1)
    assert rel_err(loss, ref_loss) < TOL[dtype]
    assert rel_err(grad, ref_grad) < 2 * TOL[dtype]


def test_custom_ignore_index_and_all_ignored(lib):
    s, t, y = make_batch(6, 11, np.float32, seed=3)
    y = np.where(y == IGNORE, -1, y).astype(np.int64)
    y[0] = -1
    st, loss, grad = c_response(lib, s, t, y, capi.FD_KL, 2.0, 0.5, 0.5, ignore_index=-1)
    assert st == capi.FD_OK
    py_loss, py_grad = py_response("kl_divergence", s, t, y, 2.0, 0.5, 0.5, 0.0, 0.0, "mean", ignore_index=-1)
    assert rel_err(loss, py_loss) < SAME[np.float32] and rel_err(grad, py_grad) < SAME[np.float32]
    assert not grad[0].any()
    # an ignore_index at or above the classes is a label like any other ignore_index (PyTorch accepts it)
    n_big = s.shape[1] + 5
    y_big = np.where(y == -1, n_big, y)
    st, loss_big, grad_big = c_response(lib, s, t, y_big, capi.FD_KL, 2.0, 0.5, 0.5, ignore_index=n_big)
    assert st == capi.FD_OK and loss_big == loss and np.array_equal(grad_big, grad)
    # every row ignored: mean is 0 with a zero gradient, never NaN
    y[:] = IGNORE
    st, loss, grad = c_response(lib, s, t, y, capi.FD_KL, 2.0, 0.5, 0.5)
    assert st == capi.FD_OK and loss == 0.0 and not grad.any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loss_only_and_grad_in_place(lib, dtype):
    s, t, y = make_batch(10, 30, dtype, seed=8)
    y = y.astype(np.int64)
    st, loss_only, g = c_response(lib, s, t, y, capi.FD_JSD, 2.0, 0.5, 0.5, 0.3, grad=None)
    assert st == capi.FD_OK and g is None
    _, ref_loss, ref_grad = c_response(lib, s, t, y, capi.FD_JSD, 2.0, 0.5, 0.5, 0.3)
    assert loss_only == ref_loss
    work = s.copy()
    st, loss, g = c_response(lib, work, t, y, capi.FD_JSD, 2.0, 0.5, 0.5, 0.3, grad=work)
    assert st == capi.FD_OK and loss == ref_loss
    assert rel_err(work, ref_grad) < SAME[dtype]  # in place: the vectorised loop may take another path


@pytest.mark.parametrize("nthreads", [0, 1, 2])
def test_wide_rows_and_nthreads(lib, nthreads):
    """A row wider than two column chunks (split across threads when rows < threads)."""
    import numba

    if nthreads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("thread pool smaller than the case")
    s, t, y = make_batch(1, 40000, np.float32, seed=11)
    y = y.astype(np.int64)
    before = numba.get_num_threads()
    st, loss, grad = c_response(lib, s, t, y, capi.FD_KL, 4.0, 0.5, 0.5, nthreads=nthreads)
    assert st == capi.FD_OK
    assert numba.get_num_threads() == before  # the calling thread's setting is restored
    rows, keep = ref_rows("kl_divergence", s, t, y, 4.0, 0.5, 0.5, 0.0, 0.0)
    assert rel_err(loss, reduce(rows, keep, "mean")) < TOL[np.float32]
    py_loss, py_grad = py_response("kl_divergence", s, t, y, 4.0, 0.5, 0.5, 0.0, 0.0, "mean")
    assert rel_err(loss, py_loss) < 1e-6 and rel_err(grad, py_grad) < 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("log", [False, True])
def test_softmax(lib, dtype, log):
    x, _, _ = make_batch(7, 19, dtype, seed=2)  # with -inf entries
    out = np.full_like(x, np.nan)
    assert lib.h_softmax(dtype == np.float64, log, ptr(x), 7, 19, 3.0, ptr(out), 0) == capi.FD_OK
    py = (fd.log_softmax if log else fd.softmax)(x, 3.0)
    assert rel_err(out[np.isfinite(py)], py[np.isfinite(py)]) < SAME[dtype]
    assert np.array_equal(np.isfinite(out), np.isfinite(py))
    ref = log_softmax(x / 3.0)
    if log:
        fin = np.isfinite(ref)
        assert np.array_equal(fin, np.isfinite(out))
        assert rel_err(out[fin], ref[fin]) < TOL[dtype]
    else:
        assert rel_err(out, np.exp(ref)) < TOL[dtype]
    # in place
    y = x.copy()
    assert lib.h_softmax(dtype == np.float64, log, ptr(y), 7, 19, 3.0, ptr(y), 1) == capi.FD_OK
    np.testing.assert_array_equal(y, out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_cosine_entries(lib, dtype, cosine, reduction):
    s, t, _ = make_batch(12, 25, dtype, seed=4, mask=False)
    s[3] = 0.0  # a zero-norm row: cosine distance 1, no gradient
    rows = 12
    loss = np.full(rows if reduction == "none" else 1, -7.0)
    g = np.full_like(s, -7.0)
    st = lib.h_linear(dtype == np.float64, cosine, ptr(s), ptr(t), rows, 25, RED[reduction], ptr(loss), ptr(g), 0)
    assert st == capi.FD_OK
    d = fd.DistilLoss.cosine() if cosine else fd.DistilLoss.mse()
    py_loss, py_grad = d.compute_with_grad(s, t, reduction=reduction)
    assert rel_err(g, py_grad) < SAME[dtype]
    got = loss if reduction == "none" else loss[0]
    assert rel_err(got, py_loss) < SAME[dtype]
    f = fd.cosine_distance if cosine else fd.mse
    assert rel_err(got, f(s, t, reduction=reduction)) < SAME[dtype]
    ref = divergence("cosine" if cosine else "mse", s, t)
    ref = ref if reduction == "none" else (ref.mean() if reduction == "mean" else ref.sum())
    assert rel_err(loss if reduction == "none" else loss[0], ref) < TOL[dtype]
    # loss only
    st = lib.h_linear(dtype == np.float64, cosine, ptr(s), ptr(t), rows, 25, RED[reduction], ptr(loss), None, 0)
    assert st == capi.FD_OK


# ------------------------------------------------------------------ bad input -> status codes


def bad_cases():
    """(description, keyword changes to a valid fd_response call, expected status)."""
    return [
        ("rows 0", dict(rows=0), capi.FD_EMPTY_INPUT),
        ("n 0", dict(n=0), capi.FD_EMPTY_INPUT),
        ("rows < 0", dict(rows=-2), capi.FD_BAD_SHAPE),
        ("n < 0", dict(n=-1), capi.FD_BAD_SHAPE),
        ("rows*n overflows", dict(rows=1 << 40, n=1 << 40), capi.FD_BAD_SHAPE),
        ("student NULL", dict(s=None), capi.FD_NULL_POINTER),
        ("teacher NULL", dict(t=None), capi.FD_NULL_POINTER),
        ("loss NULL", dict(loss=None), capi.FD_NULL_POINTER),
        ("grad is teacher", dict(grad="t"), capi.FD_OVERLAP),
        ("grad overlaps student", dict(grad="s+1"), capi.FD_OVERLAP),
        ("grad overlaps loss", dict(grad="loss"), capi.FD_OVERLAP),
        ("label >= n", dict(label=(2, 8)), capi.FD_LABEL_OUT_OF_RANGE),
        ("label < 0", dict(label=(0, -3)), capi.FD_LABEL_OUT_OF_RANGE),
        ("label >= n, ignore_index beside it", dict(label=(1, 9), ignore_index=10), capi.FD_LABEL_OUT_OF_RANGE),
        ("kind -1", dict(kind=-1), capi.FD_BAD_KIND),
        (f"kind {len(capi.LOSS_KINDS)}", dict(kind=len(capi.LOSS_KINDS)), capi.FD_BAD_KIND),  # (past the last)
        ("reduction 3", dict(reduction=3), capi.FD_BAD_REDUCTION),
        ("T 0", dict(T=0.0), capi.FD_BAD_PARAM),
        ("T -1", dict(T=-1.0), capi.FD_BAD_PARAM),
        ("T nan", dict(T=float("nan")), capi.FD_BAD_PARAM),
        ("T inf", dict(T=float("inf")), capi.FD_BAD_PARAM),
        ("T above 1e4", dict(T=1.0001e4), capi.FD_BAD_PARAM),
        ("hard_w nan", dict(hard_w=float("nan")), capi.FD_BAD_PARAM),
        ("soft_w inf", dict(soft_w=float("inf")), capi.FD_BAD_PARAM),
        ("beta > 1", dict(kind=capi.FD_JSD, param=1.5), capi.FD_BAD_PARAM),
        ("alpha < 0", dict(kind=capi.FD_SKEW_KL, param=-0.1), capi.FD_BAD_PARAM),
        ("alpha-divergence's alpha > 1", dict(kind=capi.FD_ALPHA, param=1.5), capi.FD_BAD_PARAM),
        ("alpha nan", dict(kind=capi.FD_SKEW_REVERSE_KL, param=float("nan")), capi.FD_BAD_PARAM),
        ("mse weight inf", dict(kind=capi.FD_COMBINED, param=float("inf")), capi.FD_BAD_PARAM),
        ("smoothing 1", dict(eps=1.0), capi.FD_BAD_PARAM),
        ("smoothing < 0", dict(eps=-0.1), capi.FD_BAD_PARAM),
        ("labels NULL, hard_w 0.5", dict(y=None), capi.FD_MISSING_LABELS),
        ("nthreads -1", dict(nthreads=-1), capi.FD_BAD_PARAM),
        ("nthreads > pool", dict(nthreads=10_000), capi.FD_BAD_PARAM),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("desc,change,expected", bad_cases(), ids=[c[0] for c in bad_cases()])
def test_bad_input_status(lib, dtype, desc, change, expected):
    rows, n = 4, 8
    s, t, y = make_batch(rows, n, dtype, seed=1, mask=False, ignore=False)
    y = y.astype(np.int64)
    loss = np.full(rows, -7.0)
    grad = np.full_like(s, -7.0)
    a = dict(s=s, t=t, y=y, rows=rows, n=n, kind=capi.FD_KL, T=2.0, hard_w=0.5, soft_w=0.5, param=0.0, eps=0.0,
             ignore_index=IGNORE, reduction=capi.FD_MEAN, loss=loss, grad=grad, nthreads=0)
    a.update(change)
    if "label" in change:
        i, v = change["label"]
        y[i] = v
    addr = {"t": t.ctypes.data, "s+1": s.ctypes.data + s.itemsize, "loss": loss.ctypes.data}
    g = addr[a["grad"]] if isinstance(a["grad"], str) else ptr(a["grad"])
    st = lib.h_response(dtype == np.float64, ptr(a["s"]), ptr(a["t"]), ptr(a["y"]), a["rows"], a["n"], a["kind"],
                        a["T"], a["hard_w"], a["soft_w"], a["param"], a["eps"], a["ignore_index"], a["reduction"],
                        ptr(a["loss"]), g, a["nthreads"])
    assert st == expected, f"{desc}: got {capi.status_message(st)}"
    assert (loss == -7.0).all() and (grad == -7.0).all(), "a failed call wrote to its outputs"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bad_input_softmax_and_linear(lib, dtype):
    f64 = dtype == np.float64
    x = np.ones((3, 5), dtype)
    out = np.full_like(x, -7.0)
    sm = lib.h_softmax
    assert sm(f64, 0, ptr(x), 0, 5, 1.0, ptr(out), 0) == capi.FD_EMPTY_INPUT
    assert sm(f64, 0, ptr(x), 3, -5, 1.0, ptr(out), 0) == capi.FD_BAD_SHAPE
    assert sm(f64, 1, None, 3, 5, 1.0, ptr(out), 0) == capi.FD_NULL_POINTER
    assert sm(f64, 0, ptr(x), 3, 5, 1.0, None, 0) == capi.FD_NULL_POINTER
    assert sm(f64, 0, ptr(x), 3, 5, 1.0, x.ctypes.data + x.itemsize, 0) == capi.FD_OVERLAP
    assert sm(f64, 1, ptr(x), 3, 5, 0.0, ptr(out), 0) == capi.FD_BAD_PARAM
    assert sm(f64, 0, ptr(x), 3, 5, float("nan"), ptr(out), 0) == capi.FD_BAD_PARAM
    assert sm(f64, 0, ptr(x), 3, 5, 1.0, ptr(out), 10_000) == capi.FD_BAD_PARAM
    assert (out == -7.0).all()
    loss = np.full(3, -7.0)
    for cos in (0, 1):
        lin = lib.h_linear
        assert lin(f64, cos, ptr(x), ptr(x), 3, 0, capi.FD_MEAN, ptr(loss), None, 0) == capi.FD_EMPTY_INPUT
        assert lin(f64, cos, ptr(x), None, 3, 5, capi.FD_MEAN, ptr(loss), None, 0) == capi.FD_NULL_POINTER
        assert lin(f64, cos, ptr(x), ptr(x), 3, 5, capi.FD_MEAN, None, None, 0) == capi.FD_NULL_POINTER
        assert lin(f64, cos, ptr(x), ptr(x), 3, 5, 7, ptr(loss), None, 0) == capi.FD_BAD_REDUCTION
        assert lin(f64, cos, ptr(x), ptr(x), 3, 5, capi.FD_MEAN, ptr(loss), ptr(x), 0) == capi.FD_OVERLAP
        assert lin(f64, cos, ptr(x), ptr(x), 3, 5, capi.FD_MEAN, ptr(loss), None, -1) == capi.FD_BAD_PARAM
    assert (loss == -7.0).all()


# ------------------------------------------------------------------ concurrency


def test_four_c_threads_at_once(lib):
    import numba

    nthr, rows, n = 4, 64, 300
    s = np.empty((nthr, rows, n), np.float32)
    t = np.empty_like(s)
    y = np.empty((nthr, rows), np.int64)
    for k in range(nthr):
        s[k], t[k], y[k] = make_batch(rows, n, np.float32, seed=100 + k, mask=False)
    loss = np.full(nthr, np.nan)
    grad = np.full_like(s, np.nan)
    status = np.full(nthr, -1, np.int32)
    pool = numba.config.NUMBA_NUM_THREADS
    for nthreads in (0, 1, min(2, pool)):
        assert lib.h_threads(nthr, ptr(s), ptr(t), ptr(y), rows, n, nthreads, 20, ptr(loss), ptr(grad),
                             ptr(status)) == 0
        assert (status == capi.FD_OK).all(), [capi.status_message(c) for c in status]
        # a thread-safe threading layer is in use (workqueue would abort on concurrent entry)
        assert numba.threading_layer() != "workqueue"
        d = fd.ResponseDistiller(fd.DistilLoss.kl_divergence(2.0), 0.5, 0.5, label_smoothing=0.1)
        for k in range(nthr):
            py_loss, py_grad = d.loss_and_grad(s[k], t[k], y[k])
            assert rel_err(loss[k], py_loss) < SAME[np.float32]
            assert rel_err(grad[k], py_grad) < SAME[np.float32]
            rows_ref, keep = ref_rows("kl_divergence", s[k], t[k], y[k], 2.0, 0.5, 0.5, 0.0, 0.1)
            assert rel_err(loss[k], reduce(rows_ref, keep, "mean")) < TOL[np.float32]


# ------------------------------------------------------------------ the example C host


def example_inputs(rows=8, n=32):
    """The logits and labels examples/c_host/main.c generates (same LCG)."""
    state = 12345
    vals = []
    for _ in range(2 * rows * n):
        state = (state * 1664525 + 1013904223) & 0xFFFFFFFF
        vals.append(((state >> 16) % 2001 - 1000) / 256.0)
    v = np.array(vals, np.float32)
    s = v[: rows * n].reshape(rows, n)
    t = v[rows * n:].reshape(rows, n)
    y = np.array([(r * 7) % n for r in range(rows)], np.int64)
    y[3] = IGNORE
    return s, t, y


def test_example_c_host(cc, tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    if not os.path.isfile(os.path.join(sysconfig.get_path("include"), "Python.h")):
        pytest.skip("Python.h is missing: no headers to embed this Python")
    ldflags = capi.embed_flags()[1]
    libdirs = [f[2:] for f in ldflags if f.startswith("-L")]
    ld = f"python{sysconfig.get_config_var('LDVERSION')}"
    if not any(os.path.exists(os.path.join(d, f"lib{ld}{ext}")) for d in libdirs for ext in (".so", ".a", ".dylib")):
        pytest.skip(f"lib{ld} is missing: this Python cannot be embedded")
    res = subprocess.run([make, "-C", EXAMPLE, "run", f"PYTHON={sys.executable}", f"OUT={tmp_path}", f"CC={cc}"],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    loss = float(re.search(r"^loss = (\S+)$", out, re.M).group(1))
    loss2 = float(re.search(r"^loss after one step \(lr 1.0\) = (\S+)$", out, re.M).group(1))
    s, t, y = example_inputs()
    d = fd.ResponseDistiller.balanced()
    py_loss, py_grad = d.loss_and_grad(s, t, y)
    assert rel_err(loss, py_loss) < SAME[np.float32]
    norm = float(re.search(r"^gradient norm = (\S+)$", out, re.M).group(1))
    assert norm == pytest.approx(float(np.sqrt((py_grad.astype(np.float64) ** 2).sum())), rel=1e-6)
    assert rel_err(loss2, d.loss(s - py_grad, t, y)) < 1e-5
    assert loss2 < loss
    rows_ref, keep = ref_rows("kl_divergence", s, t, y, 4.0, 0.5, 0.5, 0.0, 0.0)
    assert rel_err(loss, reduce(rows_ref, keep, "mean")) < TOL[np.float32]
    assert "temperature -1 -> FD_BAD_PARAM" in out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_internal_failure_is_not_ok(lib, dtype, capfd):
    """An allocation that fails inside an entry point (8 TiB of row losses) reports FD_INTERNAL_ERROR."""
    rows = 1 << 40
    buf = np.zeros(4)  # the loss first, the (never read) logits after it, so nothing overlaps
    x = buf.ctypes.data + 8
    st = lib.h_response(dtype == np.float64, x, x, None, rows, 1, capi.FD_MSE, 1.0, 0.0, 1.0, 0.0,
                        0.0, IGNORE, capi.FD_MEAN, buf.ctypes.data, None, 0)
    assert st == capi.FD_INTERNAL_ERROR
    assert not buf.any()


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("name,T", [("kl_divergence", 2.0), ("jsd", 1.0), ("reverse_kl", 3.0), ("mse", 1.0)])
def test_half_precision_entry_points(lib, half, name, T):
    """The _f16 and _bf16 entry points: the Python API's kernels on the same bits (identical results),
    within the contract's accuracy of a float64 reference of the same half values."""
    dt = np.float16 if half == "float16" else pytest.importorskip("ml_dtypes").bfloat16
    s32, t32, y = make_batch(11, 29, np.float32, seed=7, mask=name != "mse")
    s, t = s32.astype(dt), t32.astype(dt)
    y = y.astype(np.int64)
    hard_w = 0.0 if name == "mse" else 0.4
    st, loss, grad = c_response(lib, s, t, y, KINDS[name][0], T, hard_w, 0.6, 0.3, 0.0)
    assert st == capi.FD_OK, capi.status_message(st)
    assert grad.dtype == dt
    py_loss, py_grad = py_response(name, s, t, y, T, hard_w, 0.6, 0.3, 0.0, "mean")
    np.testing.assert_array_equal(grad.view(np.uint16), py_grad.view(np.uint16))
    assert loss == pytest.approx(py_loss, rel=1e-12)
    rows, keep = ref_rows(name, s.astype(np.float64), t.astype(np.float64), y, T, hard_w, 0.6, 0.3, 0.0)
    assert rel_err(loss, reduce(rows, keep, "mean")) < 1e-5
    # softmax: the input's format, rounded once from float32
    out = np.empty_like(s)
    assert lib.h_softmax(PREC[half], 0, ptr(s), 11, 29, T, ptr(out), 0) == capi.FD_OK
    ref = np.exp(log_softmax(s.astype(np.float64) / T))
    np.testing.assert_array_equal(out.view(np.uint16), fd.softmax(s, T).view(np.uint16))
    assert np.all(np.abs(out.astype(np.float64) - ref) <= np.abs(np.spacing(ref.astype(dt))).astype(np.float64))


@pytest.mark.parametrize("prec", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("tail", ["renormalize", "support", "bucket"])
def test_sparse_teacher_entry_points(lib, prec, tail):
    """fd_response_sparse_*: the Python API's kernel on the same inputs (identical results), and the
    statuses of bad ids, kinds and tails."""
    dt = pytest.importorskip("ml_dtypes").bfloat16 if prec == "bfloat16" else np.dtype(prec).type
    rng = np.random.default_rng(31)
    rows, n, k = 7, 40, 5
    s = (rng.normal(size=(rows, n)) * 2).astype(dt)
    t = rng.normal(size=(rows, n)) * 2
    idx = np.ascontiguousarray(np.argsort(-t, axis=1)[:, :k], dtype=np.int64)
    lp = t - np.log(np.exp(t).sum(1, keepdims=True))
    vals = np.ascontiguousarray(np.take_along_axis(lp, idx, 1), dtype=np.float32)
    idx[0, -1] = -1
    y = rng.integers(0, n, rows).astype(np.int64)
    y[2] = IGNORE
    tau = 1.0 if tail == "bucket" else 2.0
    code = {"renormalize": capi.FD_TAIL_RENORMALIZE, "support": capi.FD_TAIL_SUPPORT, "bucket": capi.FD_TAIL_BUCKET}

    def call(kind=capi.FD_JSD, T=tau, tl=code[tail], ids=idx, param=0.3, red="mean", t_gen=1.0):
        loss = np.full(rows if red == "none" else 1, -7.0)
        g = np.full_like(s, -7.0)
        st = lib.h_response_sparse(PREC[np.dtype(dt).name], ptr(s), ptr(ids), ptr(vals), k, ptr(y), rows, n, kind, T,
                                   0.4, 0.6, param, 0.0, IGNORE, tl, t_gen, RED[red], ptr(loss), ptr(g), 0)
        return st, loss, g

    st, loss, g = call()
    assert st == capi.FD_OK, capi.status_message(st)
    d = fd.ResponseDistiller(fd.DistilLoss.jsd(0.3, tau), 0.4, 0.6)
    want, gw = d.loss_and_grad(s, fd.SparseTeacher(idx, vals, tail=tail), y)
    assert loss[0] == pytest.approx(want, rel=1e-12)
    np.testing.assert_array_equal(g.view(np.uint8), gw.view(np.uint8))
    # values produced at another temperature (T_gen): the Python API's teacher of that temperature
    t_gen = 0.7
    tau_g = t_gen if tail == "bucket" else tau
    st, loss, g = call(T=tau_g, t_gen=t_gen)
    assert st == capi.FD_OK, capi.status_message(st)
    want, gw = fd.ResponseDistiller(fd.DistilLoss.jsd(0.3, tau_g), 0.4, 0.6).loss_and_grad(
        s, fd.SparseTeacher(idx, vals, tail=tail, temperature=t_gen), y)
    assert loss[0] == pytest.approx(want, rel=1e-12)
    np.testing.assert_array_equal(g.view(np.uint8), gw.view(np.uint8))
    for bad in (0.0, -0.5, float("nan"), float("inf")):
        assert call(t_gen=bad)[0] == capi.FD_BAD_PARAM
    dup = idx.copy()
    dup[3, 1] = dup[3, 0]
    assert call(ids=dup)[0] == capi.FD_BAD_INDEX
    big = idx.copy()
    big[4, 0] = n
    assert call(ids=big)[0] == capi.FD_BAD_INDEX
    assert call(kind=capi.FD_MSE)[0] == capi.FD_BAD_KIND
    assert call(tl=7)[0] == capi.FD_BAD_PARAM
    if tail == "bucket":
        assert call(T=2.0)[0] == capi.FD_BAD_PARAM
        assert call(T=1.0, t_gen=2.0)[0] == capi.FD_BAD_PARAM
        assert call(T=2.0, t_gen=2.0)[0] == capi.FD_OK
        vals[5, 2] = 0.25  # a log-probability above 0
        assert call()[0] == capi.FD_BAD_PARAM
        vals[5, 2] = -0.25
    if tail == "renormalize":
        assert call(kind=capi.FD_REVERSE_KL)[0] == capi.FD_BAD_PARAM
        assert call(kind=capi.FD_JSD, param=1.0)[0] == capi.FD_BAD_PARAM
        assert call(kind=capi.FD_SKEW_REVERSE_KL, param=0.0)[0] == capi.FD_BAD_PARAM
        assert call(kind=capi.FD_ALPHA, param=0.0)[0] == capi.FD_BAD_PARAM  # (the reverse KL, its limit)
        assert call(kind=capi.FD_ALPHA, param=0.3)[0] == capi.FD_OK  # (finite: q_out / alpha off the support)


def c_vocab_shards(lib, s, t, y, bounds, kind, T, hard_w, soft_w, param, eps=0.0, reduction="mean",
                   ignore_index=IGNORE, in_place=False):
    """fd_vocab_shard_* on the column ranges ``bounds`` of (s, t), combining each step's request across
    the shards here (as an all-reduce would): (statuses, losses, gradients, rounds); ``in_place``: each
    shard's gradient written over its copy of the student."""
    rows, classes = s.shape
    parts = [(np.ascontiguousarray(s[:, a:b]), np.ascontiguousarray(t[:, a:b]), a) for a, b in zip(bounds, bounds[1:])]
    works = [np.full(rows * capi.FD_SHARD_WORK, np.nan) for _ in parts]
    reqs = [np.zeros(2, dtype=np.int64) for _ in parts]
    losses = [np.full(rows if reduction == "none" else 1, -7.0) for _ in parts]
    grads = [p[0] if in_place else np.full_like(p[0], -7.0) for p in parts]
    statuses, rounds = [], 0
    for step in range(5):
        statuses = [lib.h_vocab_shard(PREC[s.dtype.name], step, ptr(ps), ptr(pt), ptr(y), rows, ps.shape[1], a,
                                      classes, kind, T, hard_w, soft_w, param, eps, ignore_index, RED[reduction],
                                      ptr(w), ptr(q), ptr(lo), ptr(g), 0)
                    for (ps, pt, a), w, q, lo, g in zip(parts, works, reqs, losses, grads)]
        if any(st != capi.FD_OK for st in statuses):
            break
        count, op = reqs[0]
        assert all(list(q) == [count, op] for q in reqs)  # every shard asks for the same exchange
        if op == capi.FD_SHARD_DONE:
            break
        rounds += 1
        assert count in (2 * rows + 6, 12 * rows + 4, 2 * rows + 1)  # a few numbers per row (and a few check
        # entries), never rows x classes
        combine = np.maximum.reduce if op == capi.FD_SHARD_MAX else np.add.reduce
        both = combine([w[:count] for w in works])
        for w in works:
            w[:count] = both
    return statuses, losses, grads, rounds


@pytest.mark.parametrize("prec", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("name,param", [("kl_divergence", 0.0), ("jsd", 0.3), ("tvd", 0.0), ("reverse_kl", 0.0),
                                        ("ce_only", 0.0)])
def test_vocab_shard_entry_points_equal_the_whole_rows(lib, prec, name, param):
    """fd_vocab_shard_* over 3 uneven shards: every shard's loss and the concatenated gradients equal
    fd_response_* on the whole rows (float64 1e-10; 16-bit: the same float32 arithmetic); 2 exchanges,
    3 for the mixtures and TVD."""
    dt = pytest.importorskip("ml_dtypes").bfloat16 if prec == "bfloat16" else np.dtype(prec).type
    s64, t64, y = make_batch(9, 50, np.float64, seed=41, mask=False)
    y = y.astype(np.int64) % 40 + 10  # labels in the second and third shards ...
    y[y == 20] = 21
    y[1] = IGNORE
    y[4] = 3  # ... and one in the first
    s64[:, 20] = t64[:, 20] = -np.inf  # a masked class
    s64[5, :7] = t64[5, :7] = -np.inf  # a row without mass in the first shard
    s, t = s64.astype(dt), t64.astype(dt)
    kind = capi.FD_CE_ONLY if name == "ce_only" else KINDS[name][0]
    hard_w = 1.0 if name == "ce_only" else 0.4
    for red in ("mean", "none"):
        # (no label smoothing: it is infinite with masked classes)
        sts, losses, grads, rounds = c_vocab_shards(lib, s, t, y, [0, 7, 31, 50], kind, 2.0, hard_w, 0.6, param,
                                                   reduction=red)
        assert sts == [capi.FD_OK] * 3, [capi.status_message(x) for x in sts]
        assert rounds == (3 if name in ("jsd", "tvd") else 2)
        st, want, gw = c_response(lib, s, t, y, kind, 2.0, hard_w, 0.6, param, 0.0, reduction=red)
        assert st == capi.FD_OK
        tol = 1e-10 if prec == "float64" else 1e-5
        for lo in losses:
            assert rel_err(lo if red == "none" else lo[0], want) < tol
        got = np.concatenate(grads, axis=1)
        if prec == "bfloat16":  # rounded once from float32 sums formed in another order: within 1 ulp
            diff = np.abs(got.astype(np.float64) - gw.astype(np.float64))
            assert np.all(diff <= np.abs(np.spacing(gw.astype(np.float32))) * 65536 + 1e-30)
        else:
            assert rel_err(got, gw) < tol


def test_vocab_shard_statuses(lib):
    s, t, y = make_batch(4, 12, np.float64, seed=42)
    y = y.astype(np.int64)
    y[0] = 11  # a global id beyond the shard's width: fine
    a, b = np.ascontiguousarray(s[:, :6]), np.ascontiguousarray(t[:, :6])
    work = np.zeros(4 * capi.FD_SHARD_WORK)
    req = np.zeros(2, dtype=np.int64)
    loss, g = np.zeros(1), np.zeros_like(a)

    def call(step=0, offset=0, classes=12, labels=y, w=work, q=req, kind=capi.FD_KL, grad=g, T=2.0):
        return lib.h_vocab_shard(1, step, ptr(a), ptr(b), ptr(labels), 4, 6, offset, classes, kind, T, 0.5, 0.5, 0.0,
                                 0.0, IGNORE, RED["mean"], ptr(w), ptr(q), ptr(loss), ptr(grad), 0)

    assert call() == capi.FD_OK and list(req) == [8 + 6, capi.FD_SHARD_MAX]
    assert call(step=4) == capi.FD_BAD_PARAM
    assert call(step=-1) == capi.FD_BAD_PARAM
    assert call(step=3) == capi.FD_BAD_PARAM  # KL has 2 exchanges: step 3 is past the last
    assert call(offset=7) == capi.FD_BAD_SHAPE  # columns [7, 13) are not in the 12 classes
    assert call(offset=-1) == capi.FD_BAD_SHAPE
    assert call(classes=5) == capi.FD_BAD_SHAPE
    big = y.copy()
    big[2] = 12
    assert call(labels=big) == capi.FD_LABEL_OUT_OF_RANGE
    assert call(w=None) == capi.FD_NULL_POINTER
    assert call(q=None) == capi.FD_NULL_POINTER
    assert call(labels=None) == capi.FD_MISSING_LABELS
    assert call(kind=42) == capi.FD_BAD_KIND
    assert call(T=0.0) == capi.FD_BAD_PARAM
    overlap = np.zeros(4 * capi.FD_SHARD_WORK + 24)
    assert lib.h_vocab_shard(1, 0, ptr(a), ptr(b), ptr(y), 4, 6, 0, 12, capi.FD_KL, 2.0, 0.5, 0.5, 0.0, 0.0, IGNORE,
                             RED["mean"], ptr(overlap), ptr(req), ptr(loss), overlap[8:].ctypes.data, 0) == capi.FD_OVERLAP


def test_vocab_shard_entry_points_with_label_smoothing(lib):
    s, t, y = make_batch(6, 33, np.float64, seed=43, mask=False)
    y = y.astype(np.int64)
    sts, losses, grads, _ = c_vocab_shards(lib, s, t, y, [0, 16, 33], capi.FD_SKEW_KL, 1.5, 0.3, 0.7, 0.2, eps=0.1)
    assert sts == [capi.FD_OK] * 2
    st, want, gw = c_response(lib, s, t, y, capi.FD_SKEW_KL, 1.5, 0.3, 0.7, 0.2, 0.1)
    assert st == capi.FD_OK and all(rel_err(lo[0], want) < 1e-10 for lo in losses)
    assert rel_err(np.concatenate(grads, axis=1), gw) < 1e-10


@pytest.mark.parametrize("prec", ["float32", "bfloat16"])
def test_grad_in_place_runs_its_own_worker_with_the_same_bits(lib, prec):
    """grad == student after ``symbols(in_place=True)``: the entry points run the variant's in-place worker
    (no run-time overlap check: the vector loops), with the same loss and the same gradient bits as into a
    separate buffer; dense, vocabulary shards and a sparse teacher."""
    from fastdistill.capi import _cfuncs

    dt = pytest.importorskip("ml_dtypes").bfloat16 if prec == "bfloat16" else np.dtype(prec).type
    s64, t64, y = make_batch(6, 700, np.float64, seed=57)  # rows wider than the vector loops' unrolling
    s, t, y = s64.astype(dt), t64.astype(dt), y.astype(np.int64)
    d = fd.ResponseDistiller(fd.DistilLoss.jsd(0.3, 2.0), 0.5, 0.5)
    v = _spec.resolve(d.terms(), True, prec)
    # this variant's in-place worker only (what symbols(in_place=True) builds for every variant)
    _cfuncs.build_workers(prec, True, [v])
    assert _cfuncs._WORKERS[_cfuncs._N_VARIANTS + _cfuncs.VARIANTS.index(v)] != 0
    st, want, gw = c_response(lib, s, t, y, capi.FD_JSD, 2.0, 0.5, 0.5, 0.3)
    assert st == capi.FD_OK
    work = s.copy()
    st, loss, _ = c_response(lib, work, t, y, capi.FD_JSD, 2.0, 0.5, 0.5, 0.3, grad=work)
    assert st == capi.FD_OK and loss == want
    np.testing.assert_array_equal(work.view(np.uint8), gw.view(np.uint8))
    # shards: every shard's gradient over its own student
    fresh = c_vocab_shards(lib, s, t, y, [0, 250, 700], capi.FD_JSD, 2.0, 0.5, 0.5, 0.3)
    over = c_vocab_shards(lib, s, t, y, [0, 250, 700], capi.FD_JSD, 2.0, 0.5, 0.5, 0.3, in_place=True)
    assert over[0] == [capi.FD_OK] * 2 and fresh[0] == over[0]
    for a, b in zip(fresh[1] + fresh[2], over[1] + over[2]):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    # a sparse teacher: its dense write through the student's pointer
    k = 8
    idx = np.ascontiguousarray(np.argsort(-t64, axis=1)[:, :k], dtype=np.int64)
    lp = t64 - np.log(np.exp(t64).sum(1, keepdims=True))
    vals = np.ascontiguousarray(np.take_along_axis(lp, idx, 1), dtype=np.float32)

    def sparse(g):
        loss = np.zeros(1)
        st = lib.h_response_sparse(PREC[np.dtype(dt).name], ptr(work), ptr(idx), ptr(vals), k, ptr(y), 6, 700,
                                   capi.FD_KL, 2.0, 0.5, 0.5, 0.0, 0.0, IGNORE, capi.FD_TAIL_BUCKET, 2.0,
                                   RED["mean"], ptr(loss), ptr(g), 0)
        assert st == capi.FD_OK, capi.status_message(st)
        return loss[0]

    work = s.copy()
    g = np.empty_like(work)
    want = sparse(g)
    assert sparse(work) == want
    np.testing.assert_array_equal(work.view(np.uint8), g.view(np.uint8))


def test_symbols_in_place_argument():
    with pytest.raises(TypeError, match="in_place must be a bool, got int"):
        capi.symbols("f32", in_place=1)

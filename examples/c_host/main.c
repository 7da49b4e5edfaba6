/*
 * A C program that embeds Python, loads fastdistill's C entry points and computes a distillation
 * loss and its gradient through them, then takes one gradient step and computes the loss again.
 *
 *   make run                          (see the Makefile; PYTHON= picks the interpreter)
 *   FASTDISTILL_PYTHON=/path/to/venv/bin/python ./c_host
 *
 * FASTDISTILL_PYTHON names the Python whose environment has fastdistill installed (a virtual
 * environment's interpreter works: its site-packages are used). Without it, the Python this program
 * was linked against is used as is.
 */
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "fastdistill.h"

#define ROWS 8
#define N 32
#define IGNORE_INDEX (-100)

/* Deterministic logits: k / 256 with |k| <= 1000, exact in float32 (a test recomputes them). */
static uint32_t lcg_state = 12345u;
static float next_logit(void)
{
    lcg_state = lcg_state * 1664525u + 1013904223u;
    return (float)((int)((lcg_state >> 16) % 2001u) - 1000) / 256.0f;
}

/* The address of one entry point from the {name: address} dict of fastdistill.capi.symbols(). */
static void *lookup(PyObject *symbols, const char *name)
{
    PyObject *addr = PyDict_GetItemString(symbols, name); /* borrowed */
    if (addr == NULL) {
        fprintf(stderr, "fastdistill.capi.symbols() has no %s\n", name);
        return NULL;
    }
    return PyLong_AsVoidPtr(addr);
}

static int init_python(void)
{
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    const char *python = getenv("FASTDISTILL_PYTHON");
    if (python != NULL && python[0] != '\0') {
        PyStatus st = PyConfig_SetBytesString(&config, &config.program_name, python);
        if (PyStatus_Exception(st)) {
            PyConfig_Clear(&config);
            return -1;
        }
    }
    PyStatus st = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    return PyStatus_Exception(st) ? -1 : 0;
}

int main(void)
{
    if (init_python() != 0) {
        fprintf(stderr, "could not start Python\n");
        return 1;
    }
    /* 1. Import fastdistill and get the entry points (compiled, or loaded from Numba's cache). */
    PyObject *capi = PyImport_ImportModule("fastdistill.capi");
    PyObject *symbols = capi ? PyObject_CallMethod(capi, "symbols", NULL) : NULL;
    if (symbols == NULL) {
        PyErr_Print();
        fprintf(stderr, "is fastdistill installed for this Python? set FASTDISTILL_PYTHON\n");
        return 1;
    }
    fd_abi_version_fn abi_version = (fd_abi_version_fn)lookup(symbols, "fd_abi_version");
    fd_response_f32_fn response = (fd_response_f32_fn)lookup(symbols, "fd_response_f32");
    fd_softmax_f32_fn softmax = (fd_softmax_f32_fn)lookup(symbols, "fd_softmax_f32");
    Py_DECREF(symbols);
    Py_DECREF(capi);
    if (abi_version == NULL || response == NULL || softmax == NULL) {
        return 1;
    }
    if (abi_version() != FD_ABI_VERSION) {
        fprintf(stderr, "ABI version %d, this program was built for %d\n", (int)abi_version(), FD_ABI_VERSION);
        return 1;
    }

    /* 2. From here on no Python object is touched: let other threads have the interpreter. */
    PyThreadState *saved = PyEval_SaveThread();

    static float student[ROWS * N], teacher[ROWS * N], grad[ROWS * N], probs[ROWS * N];
    int64_t labels[ROWS];
    for (int i = 0; i < ROWS * N; i++) student[i] = next_logit();
    for (int i = 0; i < ROWS * N; i++) teacher[i] = next_logit();
    for (int r = 0; r < ROWS; r++) labels[r] = (r * 7) % N;
    labels[3] = IGNORE_INDEX; /* this row counts nowhere */

    /* 0.5 * CE(student, label) + 0.5 * T^2 * KL(softmax(teacher/T) || softmax(student/T)), T = 4,
     * averaged over the counted rows -- ResponseDistiller.balanced() in Python. */
    double loss = 0.0;
    int32_t st = response(student, teacher, labels, ROWS, N, FD_KL, 4.0, 0.5, 0.5, 0.0, 0.0, IGNORE_INDEX,
                          FD_MEAN, &loss, grad, 0);
    if (st != FD_OK) {
        fprintf(stderr, "fd_response_f32: %s\n", fd_status_string(st));
        return 1;
    }
    double norm = 0.0;
    for (int i = 0; i < ROWS * N; i++) norm += (double)grad[i] * grad[i];
    printf("loss = %.17g\n", loss);
    printf("gradient norm = %.9g\n", sqrt(norm));

    /* One SGD step on the student logits, then the loss again. */
    for (int i = 0; i < ROWS * N; i++) student[i] -= 1.0f * grad[i];
    double loss2 = 0.0;
    st = response(student, teacher, labels, ROWS, N, FD_KL, 4.0, 0.5, 0.5, 0.0, 0.0, IGNORE_INDEX, FD_MEAN,
                  &loss2, NULL, 0);
    if (st != FD_OK) {
        fprintf(stderr, "fd_response_f32: %s\n", fd_status_string(st));
        return 1;
    }
    printf("loss after one step (lr 1.0) = %.17g\n", loss2);

    /* The teacher's probability of each row's label at temperature 4. */
    st = softmax(teacher, ROWS, N, 4.0, probs, 0);
    if (st != FD_OK) {
        fprintf(stderr, "fd_softmax_f32: %s\n", fd_status_string(st));
        return 1;
    }
    printf("teacher p(label | T=4), row 0 = %.6f\n", probs[labels[0]]);

    /* A bad call returns a status, never a crash. */
    st = response(student, teacher, labels, ROWS, N, FD_KL, -1.0, 0.5, 0.5, 0.0, 0.0, IGNORE_INDEX, FD_MEAN,
                  &loss2, NULL, 0);
    printf("temperature -1 -> %s\n", fd_status_string(st));

    PyEval_RestoreThread(saved);
    return Py_FinalizeEx() < 0 ? 1 : 0;
}

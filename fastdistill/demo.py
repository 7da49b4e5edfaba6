"""``fastdistill demo``: distil a NumPy MLP teacher into a small student on scikit-learn's digits.

The setting is the one where distillation earns its keep in practice: labels are scarce, unlabelled
inputs are not. A teacher trained on the full labelled training split is given; the student may use only
``--labelled`` of those labels, plus the teacher's soft targets on *all* training inputs (the transfer
set, most of it unlabelled). Two students with the same architecture, the same initial weights and the
same labelled mini-batches are trained:

* **no KD** - cross-entropy on the labelled rows only;
* **KD** - ``alpha * CE(labelled rows) + (1 - alpha) * T**2 * KL(teacher || student)`` on every row.

Both losses and their gradients with respect to the student's logits come from fastdistill
(:class:`~fastdistill.ResponseDistiller`); everything else (forward, backward, Adam) is plain NumPy, so
the demo behaves the same with or without PyTorch. Accuracy is measured on a held-out test split that
is never used for training or for choosing anything (no early stopping: the last epoch is reported).
The KD - no KD difference is then measured over a few seeds and a verdict is computed from the numbers.

Use :func:`run` for the numbers (a dict) and :func:`main` for the command line.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any, Sequence

import numpy as np

from . import (
    BackendUnavailableError,
    DistilLoss,
    ResponseDistiller,
    __version__,
    get_num_threads,
    set_num_threads,
)

IGNORE = -100
DTYPE = np.float32
# A difference smaller than this (in accuracy points) is not called a win or a loss: on 540 test
# images it is fewer than three images.
MIN_EFFECT_PP = 0.5

INSTALL_HINT = "pip install 'fastdistill[demo]'"
PLOT_HINT = "pip install 'fastdistill[plot]'  (or: pip install matplotlib)"


@dataclass
class Config:
    """Everything that determines a run (all of it is printed)."""

    backend: str = "cpu"
    seed: int = 0
    epochs: int = 30
    temperature: float = 4.0  # the preset of ResponseDistiller.balanced()
    alpha: float = 0.5  # hard-label weight; the soft weight is 1 - alpha (also balanced()'s 0.5)
    labelled: int | None = 100  # None: every training label
    repeats: int = 5
    threads: int = 1
    plot: str | None = None
    quiet: bool = False
    test_fraction: float = 0.3
    batch: int = 64  # transfer-set rows per step (the teacher's batch too)
    labelled_batch: int = 32  # labelled rows per student step
    lr: float = 3e-3
    teacher_hidden: tuple[int, ...] = (128, 128)
    student_hidden: tuple[int, ...] = (16,)


# ---------------------------------------------------------------- data


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1797 images, shipped inside the package), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(DTYPE), d.target.astype(np.int64)


def split(n: int, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint ``(train, test)`` index arrays, sorted."""
    perm = rng.permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# ---------------------------------------------------------------- NumPy MLP + Adam


class MLP:
    """ReLU multilayer perceptron: ``forward`` keeps what ``backward`` needs."""

    def __init__(self, sizes: Sequence[int], rng: np.random.Generator) -> None:
        self.sizes = tuple(sizes)
        self.params: list[np.ndarray] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            w = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=(fan_in, fan_out)).astype(DTYPE)  # He init
            self.params += [w, np.zeros(fan_out, dtype=DTYPE)]

    def copy(self) -> MLP:
        other = MLP.__new__(MLP)
        other.sizes = self.sizes
        other.params = [p.copy() for p in self.params]
        return other

    @property
    def n_params(self) -> int:
        return int(sum(p.size for p in self.params))

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        acts = [x]
        h = x
        n_layers = len(self.params) // 2
        for i in range(n_layers):
            h = h @ self.params[2 * i] + self.params[2 * i + 1]
            if i < n_layers - 1:
                h = np.maximum(h, 0.0)
                acts.append(h)
        return h, acts

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)[0]

    def backward(self, acts: list[np.ndarray], dlogits: np.ndarray) -> list[np.ndarray]:
        """Gradients of the parameters, given d loss / d logits."""
        grads: list[np.ndarray] = [np.empty(0)] * len(self.params)
        g = dlogits
        for i in range(len(self.params) // 2 - 1, -1, -1):
            a = acts[i]
            grads[2 * i] = a.T @ g
            grads[2 * i + 1] = g.sum(axis=0)
            if i > 0:
                g = (g @ self.params[2 * i].T) * (a > 0)
        return grads


class Adam:
    def __init__(self, params: list[np.ndarray], lr: float, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-8) -> None:
        self.params, self.lr, self.b1, self.b2, self.eps = params, lr, b1, b2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * (g * g)
            p -= (self.lr / c1) * m / (np.sqrt(v / c2) + self.eps)


# ---------------------------------------------------------------- timing of the fastdistill calls


@dataclass
class Clock:
    """Wall time spent inside fastdistill calls (and how many calls)."""

    seconds: float = 0.0
    calls: int = 0

    def loss_and_grad(self, distiller: ResponseDistiller, s: np.ndarray, t: np.ndarray, labels: Any,
                      backend: str) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        loss, grad = distiller.loss_and_grad(s, t, labels, backend=backend)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return float(loss), grad


# ---------------------------------------------------------------- progress


class Progress:
    """One line per epoch (or step): rewritten in place on a terminal, every k-th one when piped."""

    def __init__(self, out: IO[str], quiet: bool) -> None:
        self.out = out
        self.quiet = quiet
        isatty = getattr(out, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(text, file=self.out, flush=True)

    def epoch(self, epoch: int, epochs: int, text: str, unit: str = "epoch") -> None:
        if self.quiet:
            return
        line = f"  {unit} {epoch:>{len(str(epochs))}}/{epochs}  {text}"
        if self.tty:
            self.out.write("\r" + line + ("\n" if epoch == epochs else ""))
            self.out.flush()
        else:
            stride = max(1, math.ceil(epochs / 10))
            if epoch % stride == 0 or epoch == epochs or epoch == 1:
                print(line, file=self.out, flush=True)


# ---------------------------------------------------------------- training


def accuracy(model: MLP, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(model.logits(x), axis=1) == y))


def train_teacher(cfg: Config, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  rng: np.random.Generator, clock: Clock, prog: Progress) -> tuple[MLP, dict[str, list[float]]]:
    """The teacher: cross-entropy (fastdistill's fused kernel) on every training label."""
    model = MLP((x.shape[1], *cfg.teacher_hidden, 10), rng)
    opt = Adam(model.params, cfg.lr)
    # hard weight 1, soft weight 0: pure cross-entropy; the "teacher" argument is not read by the kernel
    ce = ResponseDistiller(DistilLoss.kl_divergence(cfg.temperature), 1.0, 0.0, ignore_index=IGNORE)
    hist: dict[str, list[float]] = {"loss": [], "test_acc": []}
    n = x.shape[0]
    for epoch in range(1, cfg.epochs + 1):
        perm = rng.permutation(n)
        total = 0.0
        for start in range(0, n, cfg.batch):
            idx = perm[start:start + cfg.batch]
            logits, acts = model.forward(x[idx])
            loss, dlogits = clock.loss_and_grad(ce, logits, logits, y[idx], cfg.backend)
            opt.step(model.backward(acts, dlogits))
            total += loss * len(idx)
        hist["loss"].append(total / n)
        hist["test_acc"].append(accuracy(model, x_test, y_test))
        prog.epoch(epoch, cfg.epochs, f"loss {total / n:.4f}  train acc {accuracy(model, x, y):.4f}")
    return model, hist


@dataclass
class StudentRun:
    no_kd: MLP
    kd: MLP
    labelled_idx: np.ndarray  # positions in the training split
    clock_no_kd: Clock = field(default_factory=Clock)
    clock_kd: Clock = field(default_factory=Clock)
    hist_no_kd: dict[str, list[float]] = field(default_factory=lambda: {"loss": [], "test_acc": []})
    hist_kd: dict[str, list[float]] = field(default_factory=lambda: {"loss": [], "test_acc": []})


def kd_distillers(alpha: float, temperature: float) -> tuple[ResponseDistiller, ResponseDistiller]:
    """The two halves of the KD objective: ``alpha * CE`` and ``(1 - alpha) * T**2 * KL``."""
    kl = DistilLoss.kl_divergence(temperature)
    return (ResponseDistiller(kl, alpha, 0.0, ignore_index=IGNORE),
            ResponseDistiller(kl, 0.0, 1.0 - alpha, ignore_index=IGNORE))


def kd_loss_and_grad(hard: ResponseDistiller, soft: ResponseDistiller, logits: np.ndarray, teacher: np.ndarray,
                     labels: np.ndarray, clock: Clock, backend: str = "cpu") -> tuple[float, np.ndarray]:
    """The KD objective of one batch and its gradient with respect to the student's logits.

    For a batch B whose labelled rows are L (the others carry ``ignore_index``) the objective is

        J = alpha * (1/|L|) sum_{i in L} CE_i  +  (1 - alpha) * (1/|B|) sum_{i in B} T^2 KL_i ,

    i.e. the labels are used where they exist and the teacher everywhere. One ResponseDistiller call
    with both weights cannot express this: rows whose label is ``ignore_index`` count nowhere, so the
    unlabelled rows would lose their soft term too, and its "mean" would divide both terms by |L|.
    Hence two calls on the same logits:

    1. ``hard`` (weight alpha, soft weight 0) with the labels: a mean over the |L| counted rows, and a
       zero gradient on the unlabelled rows;
    2. ``soft`` (hard weight 0, weight 1 - alpha) without labels: a mean over all |B| rows.

    J is the sum of the two losses and dJ/dlogits the sum of the two gradients (differentiation is
    linear); the caller backpropagates it once through the student. A term whose weight is 0 is skipped.
    If the batch has no labelled row, call 1 returns 0 and a zero gradient (fastdistill's rule).
    """
    loss = 0.0
    grad = None
    if hard.hard_label_weight != 0.0:
        loss, grad = clock.loss_and_grad(hard, logits, teacher, labels, backend)
    if soft.soft_label_weight != 0.0:
        l2, g2 = clock.loss_and_grad(soft, logits, teacher, None, backend)
        loss += l2
        grad = g2 if grad is None else grad + g2
    return loss, (np.zeros_like(logits) if grad is None else grad)


def train_students(cfg: Config, x: np.ndarray, y: np.ndarray, t_logits: np.ndarray, x_test: np.ndarray,
                   y_test: np.ndarray, seq: np.random.SeedSequence, prog: Progress) -> StudentRun:
    """Two identical students in lockstep: hard labels only, and hard labels + the teacher's soft targets.

    Every step draws one batch: ``labelled_batch`` rows of the labelled subset and ``batch`` rows of the
    transfer set (every training input). A row carries its label if the student may see it, else
    ``ignore_index``. Both students start from the same weights and see the same batches; the no-KD
    student learns from the labelled rows only (fastdistill skips the ``ignore_index`` rows), the KD
    student also from the teacher's logits on every row.
    """
    r_subset, r_init, r_lab, r_tr = (np.random.default_rng(s) for s in seq.spawn(4))
    n = x.shape[0]
    n_lab = n if cfg.labelled is None else cfg.labelled
    labelled = np.sort(r_subset.choice(n, size=n_lab, replace=False))
    y_seen = np.full(n, IGNORE, dtype=np.int64)  # the labels the students may use
    y_seen[labelled] = y[labelled]
    base = MLP((x.shape[1], *cfg.student_hidden, 10), r_init)
    run = StudentRun(no_kd=base.copy(), kd=base.copy(), labelled_idx=labelled)
    opt_a, opt_b = Adam(run.no_kd.params, cfg.lr), Adam(run.kd.params, cfg.lr)

    # Student (a): hard labels only, i.e. cross-entropy (weight 1) over the rows that have a label.
    hard_only = ResponseDistiller(DistilLoss.kl_divergence(cfg.temperature), 1.0, 0.0, ignore_index=IGNORE)
    # Student (b): see kd_loss_and_grad.
    hard, soft = kd_distillers(cfg.alpha, cfg.temperature)

    lb = min(cfg.labelled_batch, n_lab)
    steps = math.ceil(n / cfg.batch)  # an epoch is one pass over the transfer set
    lab_order = r_lab.permutation(labelled)
    lab_pos = 0
    for epoch in range(1, cfg.epochs + 1):
        tr_order = r_tr.permutation(n)
        tot_a = tot_b = 0.0
        for k in range(steps):
            # labelled rows: walk through a shuffled copy of the labelled subset, reshuffle when used up
            if lab_pos + lb > n_lab:
                lab_order, lab_pos = r_lab.permutation(labelled), 0
            rows = np.concatenate([lab_order[lab_pos:lab_pos + lb], tr_order[k * cfg.batch:(k + 1) * cfg.batch]])
            lab_pos += lb
            xb, yb, tb = x[rows], y_seen[rows], t_logits[rows]

            logits, acts = run.no_kd.forward(xb)
            loss_a, g = run.clock_no_kd.loss_and_grad(hard_only, logits, logits, yb, cfg.backend)
            opt_a.step(run.no_kd.backward(acts, g))

            logits, acts = run.kd.forward(xb)
            loss_b, g = kd_loss_and_grad(hard, soft, logits, tb, yb, run.clock_kd, cfg.backend)
            opt_b.step(run.kd.backward(acts, g))
            tot_a += loss_a
            tot_b += loss_b
        run.hist_no_kd["loss"].append(tot_a / steps)
        run.hist_kd["loss"].append(tot_b / steps)
        run.hist_no_kd["test_acc"].append(accuracy(run.no_kd, x_test, y_test))
        run.hist_kd["test_acc"].append(accuracy(run.kd, x_test, y_test))
        prog.epoch(epoch, cfg.epochs, f"no-KD loss {tot_a / steps:.4f}  |  KD loss {tot_b / steps:.4f}")
    return run


def warm_up(cfg: Config) -> float:
    """Call each kernel variant the demo uses once on a tiny batch; returns the seconds it took.

    Numba compiles a kernel on its first use in a process tree and caches it on disk, so this is
    ~10-30 s once per install and a fraction of a second afterwards (loading from the cache).
    """
    s = np.zeros((2, 10), dtype=DTYPE)
    lab = np.array([0, IGNORE], dtype=np.int64)
    t0 = time.perf_counter()
    ResponseDistiller(DistilLoss.kl_divergence(cfg.temperature), 1.0, 0.0).loss_and_grad(
        s, s, lab, backend=cfg.backend)
    ResponseDistiller(DistilLoss.kl_divergence(cfg.temperature), 0.0, 1.0).loss_and_grad(
        s, s, None, backend=cfg.backend)
    return time.perf_counter() - t0


def verdict(diffs_pp: Sequence[float]) -> tuple[str, float, float]:
    """``(verdict, mean, standard error)`` of the KD - no KD differences (accuracy points).

    "helps"/"hurts" needs the mean beyond two standard errors *and* beyond MIN_EFFECT_PP; one run
    only gets a tentative verdict from the size of the difference.
    """
    d = np.asarray(diffs_pp, dtype=np.float64)
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    if d.size == 1:
        if abs(mean) < MIN_EFFECT_PP:
            return "no clear difference (one seed; use --repeats 5 for a verdict)", mean, se
        word = "helped" if mean > 0 else "hurt"
        return f"distillation {word} in this one run (one seed; use --repeats 5 for a verdict)", mean, se
    if mean > max(2 * se, MIN_EFFECT_PP):
        return "distillation helps in this setting", mean, se
    if mean < -max(2 * se, MIN_EFFECT_PP):
        return "distillation hurts in this setting", mean, se
    return "no clear difference in this setting", mean, se


# ---------------------------------------------------------------- the run


def run(cfg: Config, out: IO[str] | None = None) -> dict[str, Any]:
    """Run the demo and return its numbers.

    Keys: ``train_idx``/``test_idx`` (indices into ``load_digits()``), ``labelled_idx`` (indices into
    ``load_digits()`` of the student's labels), ``y_test``, ``pred`` (held-out predictions of
    ``teacher``, ``no_kd``, ``kd``), ``acc`` (held-out accuracies), ``history`` (per-epoch training loss
    and held-out accuracy), ``kernel_seconds``/``kernel_calls`` per model, ``first_call_seconds``,
    ``repeats`` (list of ``(acc_no_kd, acc_kd)``), ``diff_pp``, ``verdict``, ``mean_diff_pp``, ``se_pp``.
    Raises ImportError without scikit-learn and BackendUnavailableError for an unusable backend.
    """
    out = sys.stdout if out is None else out
    import numba

    before = get_num_threads()
    set_num_threads(min(cfg.threads, numba.config.NUMBA_NUM_THREADS))
    try:
        with _single_threaded_blas():
            return _run(cfg, out)
    finally:
        set_num_threads(before)


def _single_threaded_blas() -> Any:
    """Keep NumPy's BLAS on one thread while the demo runs.

    The matrices here are tiny (at most 96 x 128), so BLAS threads buy nothing; worse, OpenBLAS threads
    keep spinning after each product and fight Numba's thread pool for the cores, which made every
    fastdistill call several times slower on a 2-core machine. threadpoolctl comes with scikit-learn.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn depends on it
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _run(cfg: Config, out: IO[str]) -> dict[str, Any]:
    prog = Progress(out, cfg.quiet)
    t_start = time.perf_counter()
    x_all, y_all = load_digits_data()
    first_call = warm_up(cfg)

    root = np.random.SeedSequence(cfg.seed)
    r_split, r_teacher = (np.random.default_rng(s) for s in root.spawn(2))
    train_idx, test_idx = split(len(y_all), cfg.test_fraction, r_split)
    x, y = x_all[train_idx], y_all[train_idx]
    x_test, y_test = x_all[test_idx], y_all[test_idx]
    n_lab = len(train_idx) if cfg.labelled is None else cfg.labelled
    if not 1 <= n_lab <= len(train_idx):
        raise ValueError(f"--labelled must be between 1 and {len(train_idx)} (the training split), got {n_lab}")

    t_sizes = "-".join(map(str, (64, *cfg.teacher_hidden, 10)))
    s_sizes = "-".join(map(str, (64, *cfg.student_hidden, 10)))
    a, t = cfg.alpha, cfg.temperature
    prog.say(f"fastdistill {__version__} demo: distil an MLP teacher into a small MLP student "
             f"(scikit-learn digits)")
    prog.say(f"data     {len(y_all)} images of 8x8 pixels, 10 classes: {len(train_idx)} train / "
             f"{len(test_idx)} held-out test (split by seed {cfg.seed})")
    if n_lab < len(train_idx):
        prog.say(f"setting  few labels: the students see {n_lab} of the {len(train_idx)} training labels; "
                 f"the KD student also gets the teacher's")
        prog.say(f"         soft targets on all {len(train_idx)} training images (the transfer set, "
                 f"{len(train_idx) - n_lab} of them unlabelled for the student)")
    else:
        prog.say(f"setting  all labels: both students see all {len(train_idx)} training labels; the KD "
                 f"student also matches the teacher's soft targets")
    prog.say(f"loss     no KD: CE(labelled rows)   KD: {a:g}*CE(labelled rows) + {1 - a:g}*T^2*KL(all rows), "
             f"T={t:g}")
    where = cfg.backend if cfg.backend == "cuda" else f"{cfg.backend} ({_plural(get_num_threads(), 'thread')})"
    prog.say(f"backend  {where}; first call of the 2 kernels used "
             f"(JIT compile or disk-cache load): {first_call:.2f} s")

    teacher_clock = Clock()
    prog.say(f"teacher  {t_sizes} MLP, all {len(train_idx)} labels, Adam lr {cfg.lr:g}, batch {cfg.batch}")
    teacher, hist_t = train_teacher(cfg, x, y, x_test, y_test, r_teacher, teacher_clock, prog)
    t_logits = teacher.logits(x)  # the teacher's soft targets come from these (at temperature T)

    prog.say(f"students {s_sizes} MLP, same initial weights and batches: {min(cfg.labelled_batch, n_lab)} "
             f"labelled + {cfg.batch} transfer-set rows per step")
    runs: list[StudentRun] = []
    repeats: list[tuple[float, float]] = []
    for r in range(cfg.repeats):
        sub = Progress(out, quiet=cfg.quiet or r > 0)
        sr = train_students(cfg, x, y, t_logits, x_test, y_test, np.random.SeedSequence((cfg.seed, r)), sub)
        runs.append(sr)
        repeats.append((accuracy(sr.no_kd, x_test, y_test), accuracy(sr.kd, x_test, y_test)))
    main_run = runs[0]

    pred = {
        "teacher": np.argmax(teacher.logits(x_test), axis=1),
        "no_kd": np.argmax(main_run.no_kd.logits(x_test), axis=1),
        "kd": np.argmax(main_run.kd.logits(x_test), axis=1),
    }
    acc = {k: float(np.mean(v == y_test)) for k, v in pred.items()}
    diffs = [100.0 * (kd - no) for no, kd in repeats]
    word, mean, se = verdict(diffs)
    res: dict[str, Any] = {
        "config": cfg,
        "train_idx": train_idx,
        "test_idx": test_idx,
        "labelled_idx": train_idx[main_run.labelled_idx],
        "y_test": y_test,
        "pred": pred,
        "acc": acc,
        "history": {"teacher": hist_t, "no_kd": main_run.hist_no_kd, "kd": main_run.hist_kd},
        "kernel_seconds": {"teacher": teacher_clock.seconds, "no_kd": main_run.clock_no_kd.seconds,
                           "kd": main_run.clock_kd.seconds},
        "kernel_calls": {"teacher": teacher_clock.calls, "no_kd": main_run.clock_no_kd.calls,
                         "kd": main_run.clock_kd.calls},
        "first_call_seconds": first_call,
        "repeats": repeats,
        "diff_pp": diffs,
        "verdict": word,
        "mean_diff_pp": mean,
        "se_pp": se,
        "params": {"teacher": teacher.n_params, "student": main_run.kd.n_params},
    }

    # ---- the report (printed even with --quiet)
    p = lambda s="": print(s, file=out)  # noqa: E731
    p()
    p(f"held-out test accuracy ({len(test_idx)} images never used for training or model selection; "
      f"last epoch, seed {cfg.seed})")
    p(f"  {'model':<16}{'params':>8}{'labels':>8}  {'test acc':>8}  {'fastdistill calls: time':>24}")
    rows_ = (("teacher", "teacher", teacher.n_params, str(len(train_idx))),
             ("student, no KD", "no_kd", main_run.no_kd.n_params, str(n_lab)),
             ("student, KD", "kd", main_run.kd.n_params, str(n_lab)))
    for label, key, n_params, labels in rows_:
        calls, secs = res["kernel_calls"][key], res["kernel_seconds"][key]
        p(f"  {label:<16}{n_params:>8,}{labels:>8}  {acc[key]:>8.4f}  "
          f"{calls:>7} calls: {1e3 * secs:>7.1f} ms")
    kernel_total = sum(res["kernel_seconds"].values())
    p(f"  time in fastdistill loss+gradient calls: {1e3 * kernel_total:.1f} ms "
      f"({1e6 * kernel_total / max(1, sum(res['kernel_calls'].values())):.0f} us per call); "
      f"first call (compile/cache load): {first_call:.2f} s")
    p()
    varies = "student init and batch order" if n_lab == len(train_idx) else \
        "labelled subset, student init and batch order"
    p(f"KD - no KD, held-out accuracy, {_plural(len(diffs), 'seed')} ({varies} vary; teacher fixed):")
    p("  " + "  ".join(f"{d:+.1f}" for d in diffs) + " points")
    if len(diffs) > 1:
        p(f"  mean {mean:+.2f} points, standard error {se:.2f}, KD better in "
          f"{sum(d > 0 for d in diffs)}/{len(diffs)}, worse in {sum(d < 0 for d in diffs)}/{len(diffs)}")
    p(f"verdict: {word}")
    res["seconds"] = time.perf_counter() - t_start
    p(f"total {res['seconds']:.1f} s")
    if cfg.plot:
        plot(res, cfg.plot)
        p(f"learning curves written to {cfg.plot}")
    return res


def plot(res: dict[str, Any], path: str) -> None:
    """Training loss and held-out accuracy per epoch (the latter only displayed, never used to choose)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_l, ax_a = fig.subplots(1, 2)
    names = {"teacher": "teacher", "no_kd": "student, no KD", "kd": "student, KD"}
    for key, label in names.items():
        h = res["history"][key]
        ep = np.arange(1, len(h["loss"]) + 1)
        ax_l.plot(ep, h["loss"], label=label)
        ax_a.plot(ep, h["test_acc"], label=label)
    ax_l.set(xlabel="epoch", ylabel="training objective", yscale="log", title="training loss (own objective)")
    ax_a.set(xlabel="epoch", ylabel="accuracy", title="held-out accuracy (display only)")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------- command line


def _labelled(text: str) -> int | None:
    if text.lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of labels or 'all', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def parse_args(argv: Sequence[str]) -> Config:
    d = Config()
    ap = argparse.ArgumentParser(
        prog="fastdistill demo",
        description="Distil a NumPy MLP teacher into a small student on scikit-learn's digits, with and "
                    "without knowledge distillation, using fastdistill's fused loss+gradient kernels.",
        epilog="'fastdistill demo lm' is the language-model demo: a GPT teacher distilled into a smaller "
               "student through FusedLinearDistillationLoss (needs PyTorch; see 'fastdistill demo lm --help').",
    )
    ap.add_argument("--backend", choices=("cpu", "cuda", "auto"), default=d.backend,
                    help="where the loss kernels run (auto: the library's rule, NumPy inputs run on the CPU; "
                         "cuda copies each batch to the GPU). Default: %(default)s")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the split, the weights and the batches "
                    "(default: %(default)s)")
    ap.add_argument("--epochs", type=_positive_int, default=d.epochs, help="epochs (default: %(default)s)")
    ap.add_argument("--temperature", "-T", type=float, default=d.temperature,
                    help="distillation temperature T (default: %(default)s)")
    ap.add_argument("--alpha", type=float, default=d.alpha,
                    help="hard-label weight; the soft (KL) weight is 1 - alpha (default: %(default)s)")
    ap.add_argument("--labelled", type=_labelled, default=d.labelled, metavar="N",
                    help="labelled training examples the students get, or 'all' (default: %(default)s)")
    ap.add_argument("--repeats", type=_positive_int, default=d.repeats,
                    help="seeds over which the KD - no KD difference is measured (default: %(default)s)")
    ap.add_argument("--threads", type=_positive_int, default=d.threads,
                    help="CPU threads of the loss kernels (default: %(default)s: a batch here is 96 x 10 "
                         "logits, too small for a parallel launch to pay off)")
    ap.add_argument("--plot", metavar="OUT.png", default=None, help="write learning curves (needs matplotlib)")
    ap.add_argument("--quiet", "-q", action="store_true", help="only print the results")
    a = ap.parse_args(list(argv))
    if not (math.isfinite(a.temperature) and a.temperature > 0):
        ap.error(f"--temperature must be finite and > 0, got {a.temperature}")
    if not 0.0 <= a.alpha <= 1.0:
        ap.error(f"--alpha must be in [0, 1], got {a.alpha}")
    return Config(backend=a.backend, seed=a.seed, epochs=a.epochs, temperature=a.temperature, alpha=a.alpha,
                  labelled=a.labelled, repeats=a.repeats, threads=a.threads, plot=a.plot, quiet=a.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm"]:  # `fastdistill demo lm`: the language-model demo (PyTorch, tokenizers)
        from . import demo_lm

        return demo_lm.main(argv[1:])
    cfg = parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print(f"fastdistill demo needs scikit-learn for its data set: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if cfg.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"--plot needs matplotlib: {PLOT_HINT}", file=sys.stderr)
            return 2
    try:
        run(cfg)
    except BackendUnavailableError as exc:
        print(f"fastdistill demo: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"fastdistill demo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

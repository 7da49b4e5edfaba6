"""``fastdistill demo lm``: distil a small GPT teacher into a smaller GPT student through
:class:`~fastdistill.torch.FusedLinearDistillationLoss`, on text that ships with Python.

The corpus is the standard library's documentation topics (``pydoc_data.topics``: the text behind
``help("if")``, about 0.5 MB); the last tenth of each topic (from a paragraph boundary) is held out and
never trained on. A byte-level BPE tokenizer (the ``tokenizers`` library) is trained on the training
text alone; a GPT-style teacher (pre-norm blocks, causal attention, tied
embeddings) is trained on them with cross-entropy; then three students of the same smaller architecture,
with the same initial weights and the same batches, are trained for the same number of steps:

* **no KD** - cross-entropy on the next token (plain PyTorch);
* **KD** - ``alpha * CE + (1 - alpha) * T**2 * KL(teacher || student)`` from the two models' last hidden
  states and output weights through ``FusedLinearDistillationLoss``: the logits exist ``chunk_size`` rows
  at a time, never for the whole batch, and the gradients of the student's hidden states and output
  weight come from the fused loss;
* **KD from a teacher store** (the offline route) - the same objective against the teacher's top-k
  log-probabilities captured once: after the teacher is trained, it scores the training text in
  overlapping windows, :func:`fastdistill.top_k` keeps each position's ``top_k`` largest (a few windows'
  logits at a time), and :func:`fastdistill.teachers.save` writes them to a teacher store; the student
  is trained from the store opened memory-mapped (:func:`fastdistill.teachers.load`), each batch reading
  only its windows' rows, as a :class:`~fastdistill.SparseTeacher` given to the same fused loss. No
  teacher runs while it trains.

The held-out perplexity (exp of the mean next-token cross-entropy over non-overlapping windows of the
held-out text, computed with PyTorch) of the four models is reported with each phase's time and peak
resident memory, and the store's bytes a position; the verdicts are computed from the numbers. Without
pyarrow the offline route is left out. ``--quick`` runs tiny models for a few steps (seconds; for tests).

Use :func:`run` for the numbers (a dict) and :func:`main` for the command line.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import IO, Any, Sequence

from .demo import Progress, _positive_int

INSTALL_HINT = "pip install 'fastdistill[demo]' torch  (the demo needs PyTorch and tokenizers)"
END = "<|endoftext|>"
HELD_OUT = 0.1  # the share of each topic's text held out


@dataclass(frozen=True)
class LMConfig:
    """Everything that determines a run (all of it is printed)."""

    seed: int = 0
    vocab: int = 2048
    context: int = 64
    batch: int = 16
    teacher_width: int = 128
    teacher_layers: int = 4
    teacher_steps: int = 1500
    student_width: int = 64
    student_layers: int = 1
    student_steps: int = 800
    heads: int = 4
    lr: float = 3e-3
    temperature: float = 1.0
    alpha: float = 0.5  # hard-label weight; the soft weight is 1 - alpha
    chunk_size: int = 256
    top_k: int = 64  # the teacher store's entries per position
    threads: int | None = None

    @classmethod
    def quick(cls) -> "LMConfig":
        return cls(vocab=512, context=32, batch=8, teacher_width=32, teacher_layers=1, teacher_steps=30,
                   student_width=16, student_layers=1, student_steps=20, heads=2, chunk_size=64, top_k=16)


# ---------------------------------------------------------------- data


def corpus() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of the standard library's documentation topics: the last tenth
    of each topic, cut at a paragraph boundary, is held out (the topics' sizes differ too much for a split
    by whole topics to hold out a tenth of the text), less its paragraphs that the training text has."""
    from pydoc_data.topics import topics

    train, held = [], []
    for name in sorted(topics):
        text = topics[name]
        cut = text.rfind("\n\n", 0, int(len(text) * (1 - HELD_OUT)))
        if cut <= 0:  # a topic of one paragraph: all of it for training
            train.append(text)
            continue
        train.append(text[:cut])
        held.append(text[cut + 2:])
    # topics quote each other (a grammar rule, a note): held-out paragraphs found in the training text
    # are dropped, so the held-out text is unseen
    seen = "\n\n".join(train)
    held = ["\n\n".join(p for p in h.split("\n\n") if p.strip() and p not in seen) for h in held]
    return train, [h for h in held if h]


def train_tokenizer(texts: list[str], vocab: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (no text outside them: held-out topics unseen)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[END], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode(tok: Any, texts: list[str]) -> Any:
    """One stream of token ids: the texts separated by the end-of-text token."""
    import torch

    end = tok.token_to_id(END)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(end)
    return torch.tensor(ids, dtype=torch.int64)


# ---------------------------------------------------------------- model


def _gpt_class() -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                       for z in self.qkv(self.ln1(x)).split(c, dim=2))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        """Token + position embeddings, pre-norm blocks, a final norm; the output weight is the token
        embedding (tied), so the logits are ``hidden(ids) @ embed.weight.T``."""

        def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.pos = nn.Parameter(torch.zeros(context, width))
            self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
            self.ln = nn.LayerNorm(width)
            nn.init.normal_(self.embed.weight, std=0.02)
            nn.init.normal_(self.pos, std=0.02)

        @property
        def head_weight(self) -> torch.Tensor:
            return self.embed.weight

        def hidden(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids) + self.pos[: ids.shape[1]]
            for blk in self.blocks:
                x = blk(x)
            return self.ln(x)

        def logits(self, ids: torch.Tensor) -> torch.Tensor:
            return self.hidden(ids) @ self.head_weight.t()

    return GPT


def perplexity(model: Any, ids: Any, context: int) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of ``ids`` (PyTorch only)."""
    import torch
    import torch.nn.functional as F

    n = (len(ids) - 1) // context
    x = ids[: n * context].view(n, context)
    y = ids[1: n * context + 1].view(n, context)
    total = 0.0
    model.eval()
    with torch.no_grad():
        for lo in range(0, n, 64):
            logits = model.logits(x[lo:lo + 64]).double()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[lo:lo + 64].reshape(-1),
                                           reduction="sum"))
    model.train()
    return math.exp(total / (n * context))


# ---------------------------------------------------------------- measuring


def _reset_peak() -> None:
    """Restart the resident high-water mark (Linux); elsewhere the process peak is reported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


# ---------------------------------------------------------------- training


def batches(ids: Any, cfg: LMConfig, steps: int, seed: int) -> Any:
    """``steps`` batches of random windows ``(inputs, next tokens, starts)``, the same for every model of
    a seed: window ``b`` is ``ids[starts[b]:starts[b] + context]``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(ids) - cfg.context - 1, (cfg.batch,), generator=g)
        x = torch.stack([ids[s:s + cfg.context] for s in start.tolist()])
        y = torch.stack([ids[s + 1:s + cfg.context + 1] for s in start.tolist()])
        yield x, y, start


def kd_loss(fused: Any, teacher: Any) -> Any:
    """The KD objective of a student: ``fused`` (a FusedLinearDistillationLoss) from the student's and
    the (frozen) teacher's last hidden states and tied output weights; no logits of the whole batch."""
    import torch

    def loss(model: Any, x: Any, y: Any, start: Any = None) -> Any:
        with torch.no_grad():
            t_hidden = teacher.hidden(x)
        h = model.hidden(x)
        return fused(h.reshape(-1, h.shape[-1]), model.head_weight, t_hidden.reshape(-1, t_hidden.shape[-1]),
                     teacher.head_weight, y.reshape(-1))

    return loss


# ---------------------------------------------------------------- the offline route: a teacher store


def _score_windows(n: int, context: int) -> list[tuple[int, int]]:
    """The teacher's windows over a stream of ``n`` tokens: ``(start, first kept position)`` each. The
    windows are ``context`` tokens long, ``context // 2`` apart (the last one ends at ``n``); each keeps
    the positions the previous one did not reach, so every position after the first window is scored
    with at least ``context // 2`` tokens before it, and exactly once."""
    stride = max(1, context // 2)
    starts = list(range(0, n - context + 1, stride))
    if starts[-1] != n - context:
        starts.append(n - context)
    out, done = [], 0
    for w in starts:
        out.append((w, done))
        done = w + context
    return out


def capture(teacher: Any, ids: Any, context: int, k: int, path: Any, *, windows_per_chunk: int = 32,
            meta: dict | None = None) -> dict[str, Any]:
    """Score the token stream ``ids`` with ``teacher`` once and write the top ``k`` of every position to
    a new teacher store at ``path`` (:func:`fastdistill.teachers.save`), as one sequence of ``len(ids)``
    rows. Row ``p`` is the teacher's distribution over the token that follows position ``p`` (aligned
    with a causal LM's logits at ``p``: the usual shift), as :func:`fastdistill.top_k` gives it (the
    ``k`` largest log-probabilities at temperature 1, int32 ids, stored as float16). The teacher reads
    windows of ``context`` tokens ``context // 2`` apart, so each position after the first window sees at
    least ``context // 2`` tokens before it. The logits exist ``windows_per_chunk`` windows at a time.

    ``teacher``: a model of :func:`_gpt_class` (``hidden(ids)``, ``head_weight``), frozen; ``meta``:
    more of the store's metadata. Returns the tokens, the store's bytes (its shard files), the bytes a
    token and the seconds taken. Needs pyarrow (``pip install 'fastdistill[teachers]'``)."""
    import numpy as np
    import torch

    from . import teachers
    from .errors import InvalidParameterError
    from .functional import top_k
    from .sparse import SparseTeacher

    if not (callable(getattr(teacher, "hidden", None)) and isinstance(getattr(teacher, "head_weight", None),
                                                                       torch.Tensor)):
        raise InvalidParameterError(f"teacher must be a model with hidden(ids) and head_weight, got "
                                    f"{type(teacher).__name__}")
    if not (isinstance(ids, torch.Tensor) and ids.ndim == 1 and not ids.dtype.is_floating_point
            and not ids.dtype.is_complex and ids.dtype != torch.bool):
        raise InvalidParameterError(f"ids must be a 1-D integer tensor of token ids, got "
                                    f"{getattr(ids, 'dtype', type(ids).__name__)} of shape "
                                    f"{tuple(getattr(ids, 'shape', ()))}")
    vocab = int(teacher.head_weight.shape[0])
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise InvalidParameterError(f"context must be a positive integer, got {context!r}")
    if len(ids) < context:
        raise InvalidParameterError(f"ids must hold at least context = {context} tokens, got {len(ids)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise InvalidParameterError(f"k must be an integer in [1, {vocab}] (the teacher's vocabulary), got {k!r}")
    if isinstance(windows_per_chunk, bool) or not isinstance(windows_per_chunk, int) or windows_per_chunk < 1:
        raise InvalidParameterError(f"windows_per_chunk must be a positive integer, got {windows_per_chunk!r}")
    if meta is not None and not isinstance(meta, dict):
        raise InvalidParameterError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        root = os.fspath(path)
    except TypeError:
        raise InvalidParameterError(f"path must be a path, got {type(path).__name__}") from None
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise InvalidParameterError(f"path {root!r} exists and is not an empty directory: the store is written "
                                    "new, never appended to")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise InvalidParameterError(f"ids must be token ids in [0, {vocab}), got {lo if lo < 0 else hi}")
    t0 = time.perf_counter()
    wins = _score_windows(len(ids), context)
    got_i, got_v = [], []
    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        for c in range(0, len(wins), windows_per_chunk):
            part = wins[c:c + windows_per_chunk]
            x = torch.stack([ids[w:w + context] for w, _ in part])
            h = teacher.hidden(x)
            keep = torch.cat([h[j, kept - w:] for j, (w, kept) in enumerate(part)])
            logits = (keep @ teacher.head_weight.t()).float().numpy()
            t = top_k(logits, k)
            got_i.append(np.asarray(t.indices, np.int32))
            got_v.append(np.asarray(t.values, np.float32))
    teacher.train(was_training)
    ind, val = np.concatenate(got_i), np.concatenate(got_v)
    assert ind.shape == (len(ids), k)
    store_meta = {"vocab_size": vocab, "source": "fastdistill demo lm", "context": context, **(meta or {})}
    teachers.save(root, SparseTeacher(ind, val, kind="logprobs"), meta=store_meta)
    size = sum(os.path.getsize(f) for f in teachers.load(root).files)
    return dict(path=root, tokens=len(ids), k=k, bytes=size, bytes_per_token=size / len(ids),
                seconds=time.perf_counter() - t0)


def window_rows(rows: Any, start: Any, length: int) -> Any:
    """The rows of the windows ``[start[b], start[b] + length)`` of a stream's teacher ``rows`` (a
    ``SparseTeacher`` of shape ``(tokens, k)``, e.g. a teacher store's sequence: views of the mapped
    file), window after window, as a ``SparseTeacher`` of shape ``(len(start) * length, k)`` of CPU
    tensors. One gather per array (``numpy.take``): the batch's rows only are read from the mapped
    file, without a loop over rows, the values kept in their stored dtype (float16 stays float16)."""
    import numpy as np
    import torch

    from .errors import InvalidParameterError
    from .sparse import SparseTeacher

    if not isinstance(rows, SparseTeacher) or len(rows.shape) != 2:
        raise InvalidParameterError(f"rows must be a 2-D SparseTeacher (tokens, k), got {type(rows).__name__}"
                                    + (f" of shape {rows.shape}" if isinstance(rows, SparseTeacher) else ""))
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise InvalidParameterError(f"length must be a positive integer, got {length!r}")
    st = np.asarray(start.numpy() if isinstance(start, torch.Tensor) else start)
    if st.ndim != 1 or st.dtype.kind not in "iu":
        raise InvalidParameterError(f"start must be a 1-D array of integer row numbers, got {st.dtype} of shape "
                                    f"{st.shape}")
    n = rows.shape[0]
    if st.size and (int(st.min()) < 0 or int(st.max()) + length > n):
        bad = int(st.min()) if int(st.min()) < 0 else int(st.max())
        raise InvalidParameterError(f"start {bad} with length {length} is outside the {n} rows")
    r = (st.astype(np.int64)[:, None] + np.arange(length, dtype=np.int64)).reshape(-1)
    ind = np.take(np.asarray(rows.indices), r, axis=0)
    val = np.take(np.asarray(rows.values), r, axis=0)
    return SparseTeacher(torch.from_numpy(ind), torch.from_numpy(val), kind=rows.kind, tail=rows.tail,
                         temperature=rows.temperature)


def store_kd_loss(fused: Any, rows: Any) -> Any:
    """The KD objective of a student trained offline: ``fused`` (a FusedLinearDistillationLoss) from the
    student's last hidden states and tied output weight against the stored teacher ``rows`` of the
    training stream (:func:`window_rows` reads each batch's rows); no teacher runs."""
    def loss(model: Any, x: Any, y: Any, start: Any) -> Any:
        t = window_rows(rows, start, x.shape[1])
        h = model.hidden(x)
        return fused(h.reshape(-1, h.shape[-1]), model.head_weight, t, labels=y.reshape(-1))

    return loss


def train(model: Any, ids: Any, cfg: LMConfig, steps: int, loss_fn: Any, prog: Progress, seed: int) -> float:
    """Adam with a cosine schedule; returns the seconds spent."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    t0 = time.perf_counter()
    ema = None
    for step, (x, y, start) in enumerate(batches(ids, cfg, steps, seed), 1):
        loss = loss_fn(model, x, y, start)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        v = float(loss.detach())
        ema = v if ema is None else 0.9 * ema + 0.1 * v
        prog.epoch(step, steps, f"loss {ema:.3f}  {time.perf_counter() - t0:5.1f} s", unit="step")
    return time.perf_counter() - t0


def run(cfg: LMConfig, out: IO[str] | None = None, quiet: bool = False, store: Any = None) -> dict[str, Any]:
    """Train the tokenizer, the teacher and the three students (the offline one when pyarrow is
    installed); the numbers as a dict. ``store``: where to write the teacher store (a new or empty
    directory, kept); by default a temporary directory, removed at the end."""
    import torch
    import torch.nn.functional as F

    from .torch import FusedLinearDistillationLoss

    out = sys.stdout if out is None else out
    prog = Progress(out, quiet)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    train_text, held_text = corpus()
    tok = train_tokenizer(train_text, cfg.vocab)
    vocab = tok.get_vocab_size()
    train_ids, held_ids = encode(tok, train_text), encode(tok, held_text)
    t_tok = time.perf_counter() - t0
    prog.say(f"corpus   pydoc_data.topics, {len(train_text)} topics: {sum(map(len, train_text)) / 1e3:.0f} k "
             f"characters for training, the last tenth of each ({sum(map(len, held_text)) / 1e3:.0f} k) held out")
    prog.say(f"tokens   byte-level BPE, {vocab} ids, trained on the training text in {t_tok:.1f} s: "
             f"{len(train_ids)} training / {len(held_ids)} held-out tokens")
    GPT = _gpt_class()

    def make(width: int, layers: int, seed: int) -> Any:
        torch.manual_seed(seed)
        return GPT(vocab, cfg.context, width, layers, cfg.heads)

    def params(m: Any) -> int:
        return sum(p.numel() for p in m.parameters())

    def ce(model: Any, x: Any, y: Any, start: Any = None) -> Any:
        logits = model.logits(x)
        return F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))

    res: dict[str, Any] = {"config": asdict(cfg), "vocab": vocab, "train_tokens": len(train_ids),
                           "held_out_tokens": len(held_ids)}
    teacher = make(cfg.teacher_width, cfg.teacher_layers, cfg.seed)
    prog.say(f"teacher  GPT {cfg.teacher_layers} x {cfg.teacher_width} wide ({params(teacher) / 1e6:.2f} M "
             f"parameters), {cfg.teacher_steps} steps of {cfg.batch} x {cfg.context} tokens, cross-entropy")
    _reset_peak()
    sec = train(teacher, train_ids, cfg, cfg.teacher_steps, ce, prog, cfg.seed + 1)
    res["teacher"] = dict(perplexity=perplexity(teacher, held_ids, cfg.context), seconds=sec, peak_mib=_peak_mib(),
                          parameters=params(teacher))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    fused = FusedLinearDistillationLoss("kl_divergence", temperature=cfg.temperature, hard_label_weight=cfg.alpha,
                                        soft_label_weight=1.0 - cfg.alpha, chunk_size=cfg.chunk_size)

    kd = kd_loss(fused, teacher)
    tmp = None
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        prog.say("store    no teacher store (the offline route needs pyarrow: pip install 'fastdistill[teachers]')")
        store_path = None
    else:
        if store is None:
            tmp = tempfile.TemporaryDirectory(prefix="fastdistill-demo-lm-", ignore_cleanup_errors=True)
            store_path = os.path.join(tmp.name, "teacher_store")
        else:
            store_path = os.fspath(store)
    try:
        if store_path is not None:
            _reset_peak()
            # a few windows at a time: about 4 M logits (16 MB) per chunk
            info = capture(teacher, train_ids, cfg.context, cfg.top_k, store_path, meta={"tokenizer": "demo BPE"},
                           windows_per_chunk=max(1, (1 << 22) // (cfg.context * vocab)))
            info["peak_mib"] = _peak_mib()
            info["kept"] = tmp is None
            res["store"] = info
            prog.say(f"store    the teacher's top-{cfg.top_k} log-probabilities of the {info['tokens']} training "
                     f"positions (windows of {cfg.context} tokens, {max(1, cfg.context // 2)} apart), written by "
                     f"fastdistill.teachers.save in {info['seconds']:.1f} s: {info['bytes'] / 1e6:.1f} MB"
                     + (f" at {store_path}" if tmp is None else ""))
        probe = make(cfg.student_width, cfg.student_layers, cfg.seed + 2)
        prog.say(f"students GPT {cfg.student_layers} x {cfg.student_width} wide ({params(probe) / 1e6:.2f} M "
                 f"parameters), same initial weights and batches, {cfg.student_steps} steps each")
        prog.say(f"         KD: {cfg.alpha:g} * CE + {1 - cfg.alpha:g} * T^2 * KL, T = {cfg.temperature:g}, "
                 f"FusedLinearDistillationLoss(chunk_size={cfg.chunk_size}) from the hidden states")
        if store_path is not None:
            prog.say(f"         KD from the store: the same loss against the stored top-{cfg.top_k} (a "
                     f"SparseTeacher, tail 'renormalize'), read memory-mapped batch by batch; no teacher runs")
        routes: list[tuple[str, str, Any]] = [("no_kd", "no KD", ce), ("kd", "KD", kd)]
        rows = None
        if store_path is not None:
            from . import teachers

            rows = teachers.load(store_path)[0]  # the training stream's rows: views of the mapped file
            routes.append(("kd_store", f"KD from the stored top-{cfg.top_k}", store_kd_loss(fused, rows)))
        for name, label, fn in routes:
            student = make(cfg.student_width, cfg.student_layers, cfg.seed + 2)
            prog.say(f"student, {label}")
            _reset_peak()
            sec = train(student, train_ids, cfg, cfg.student_steps, fn, prog, cfg.seed + 3)
            res[name] = dict(perplexity=perplexity(student, held_ids, cfg.context), seconds=sec,
                             peak_mib=_peak_mib(), parameters=params(student))
        routes.clear()
        fn = rows = None  # (the store's memory maps, before their directory goes)
    finally:
        if tmp is not None:
            tmp.cleanup()
    n_rows = cfg.batch * cfg.context
    res["logits_mib"] = dict(full=2 * n_rows * vocab * 4 / 2**20,
                             chunk=2 * min(n_rows, cfg.chunk_size) * vocab * 4 / 2**20)
    gain = res["no_kd"]["perplexity"] - res["kd"]["perplexity"]
    res["kd_gain"] = gain
    res["verdict"] = ("distillation helps" if gain > 0 else "distillation does not help") + \
        f" (held-out perplexity {res['kd']['perplexity']:.2f} with KD vs {res['no_kd']['perplexity']:.2f} without)"
    if "kd_store" in res:
        sg = res["no_kd"]["perplexity"] - res["kd_store"]["perplexity"]
        res["kd_store_gain"] = sg
        res["verdict_store"] = (
            ("distillation from the stored top-k helps" if sg > 0 else "distillation from the stored top-k does "
             "not help") + f" ({res['kd_store']['perplexity']:.2f} vs {res['no_kd']['perplexity']:.2f} without; "
            f"{res['kd']['perplexity']:.2f} online)")

    def show(text: str = "") -> None:  # the results, printed also with --quiet
        print(text, file=out, flush=True)

    show()
    show(f"held-out perplexity ({len(held_ids)} unseen tokens; lower is better)")
    table = [("teacher", "teacher"), ("no_kd", "student, no KD"), ("kd", "student, KD"),
             ("kd_store", f"student, KD from the stored top-{cfg.top_k}")]
    width = max(len(label) for key, label in table if key in res)
    for key, label in table:
        if key in res:
            r = res[key]
            show(f"  {label:{width}s} {r['perplexity']:8.2f}   {r['seconds']:6.1f} s   peak memory "
                 f"{r['peak_mib']:6.0f} MiB")
    show(f"  logits per step: both models' in full would be {res['logits_mib']['full']:.1f} MiB; the fused loss "
         f"holds {res['logits_mib']['chunk']:.1f} MiB at a time")
    if "store" in res:
        st = res["store"]
        show(f"  teacher store: {st['tokens']} positions x top-{st['k']}, {st['bytes'] / 1e6:.1f} MB, "
             f"{st['bytes_per_token']:.1f} bytes a position (k * (2 + 4) = {st['k'] * 6}); dense float32 logits "
             f"would take {vocab * 4} bytes a position; captured in {st['seconds']:.1f} s")
    show(f"verdict: {res['verdict']}")
    if "verdict_store" in res:
        show(f"offline: {res['verdict_store']}")
    res["seconds"] = time.perf_counter() - t0
    return res


def parse_args(argv: Sequence[str]) -> tuple[LMConfig, bool, str | None]:
    d = LMConfig()
    ap = argparse.ArgumentParser(prog="fastdistill demo lm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, a few steps (seconds; for tests)")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the weights and the batches "
                    "(default: %(default)s)")
    ap.add_argument("--teacher-steps", type=_positive_int, help=f"(default: {d.teacher_steps})")
    ap.add_argument("--student-steps", type=_positive_int, help=f"each student's (default: {d.student_steps})")
    ap.add_argument("--temperature", "-T", type=float, help=f"distillation temperature (default: {d.temperature})")
    ap.add_argument("--alpha", type=float, help=f"hard-label weight; the soft (KL) weight is 1 - alpha "
                    f"(default: {d.alpha})")
    ap.add_argument("--chunk-size", type=_positive_int, help=f"rows of logits at a time (default: {d.chunk_size})")
    ap.add_argument("--top-k", type=_positive_int, help=f"entries per position in the teacher store (default: "
                    f"{d.top_k}; --quick: {LMConfig.quick().top_k})")
    ap.add_argument("--store", metavar="DIR", help="write the teacher store here (a new or empty directory) and "
                    "keep it (default: a temporary directory, removed at the end)")
    ap.add_argument("--threads", type=_positive_int, help="PyTorch threads (default: PyTorch's)")
    ap.add_argument("--quiet", "-q", action="store_true", help="only print the results")
    a = ap.parse_args(list(argv))
    if a.temperature is not None and not (math.isfinite(a.temperature) and a.temperature > 0):
        ap.error(f"--temperature must be finite and > 0, got {a.temperature}")
    if a.alpha is not None and not 0.0 <= a.alpha <= 1.0:
        ap.error(f"--alpha must be in [0, 1], got {a.alpha}")
    if a.store is not None and os.path.exists(a.store) and (not os.path.isdir(a.store) or os.listdir(a.store)):
        ap.error(f"--store {a.store} exists and is not an empty directory")
    cfg = LMConfig.quick() if a.quick else d
    if a.top_k is not None and a.top_k > cfg.vocab:
        ap.error(f"--top-k must be at most the vocabulary's {cfg.vocab} ids, got {a.top_k}")
    over = {k: v for k, v in dict(seed=a.seed, teacher_steps=a.teacher_steps, student_steps=a.student_steps,
                                   temperature=a.temperature, alpha=a.alpha, chunk_size=a.chunk_size,
                                   top_k=a.top_k, threads=a.threads).items() if v is not None}
    return replace(cfg, **over), a.quiet, a.store


def main(argv: Sequence[str] | None = None) -> int:
    cfg, quiet, store = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        print(f"fastdistill demo lm: {e.name} is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(cfg, quiet=quiet, store=store)
    return 0

"""``fastdistill demo lm``: distil a small GPT teacher into a smaller GPT student through
:class:`~fastdistill.torch.FusedLinearDistillationLoss`, on text that ships with Python.

The corpus is the standard library's documentation topics (``pydoc_data.topics``: the text behind
``help("if")``, about 0.5 MB); the last tenth of each topic (from a paragraph boundary) is held out and
never trained on. A byte-level BPE tokenizer (the ``tokenizers`` library) is trained on the training
text alone; a GPT-style teacher (pre-norm blocks, causal attention, tied
embeddings) is trained on them with cross-entropy; then two students of the same smaller architecture,
with the same initial weights and the same batches, are trained for the same number of steps:

* **no KD** - cross-entropy on the next token (plain PyTorch);
* **KD** - ``alpha * CE + (1 - alpha) * T**2 * KL(teacher || student)`` from the two models' last hidden
  states and output weights through ``FusedLinearDistillationLoss``: the logits exist ``chunk_size`` rows
  at a time, never for the whole batch, and the gradients of the student's hidden states and output
  weight come from the fused loss.

The held-out perplexity (exp of the mean next-token cross-entropy over non-overlapping windows of the
held-out text, computed with PyTorch) of the three models is reported with each phase's time and peak
resident memory, and the verdict is computed from the numbers. ``--quick`` runs tiny models for a few
steps (seconds; for tests).

Use :func:`run` for the numbers (a dict) and :func:`main` for the command line.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import sys
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
    threads: int | None = None

    @classmethod
    def quick(cls) -> "LMConfig":
        return cls(vocab=512, context=32, batch=8, teacher_width=32, teacher_layers=1, teacher_steps=30,
                   student_width=16, student_layers=1, student_steps=20, heads=2, chunk_size=64)


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
    """``steps`` batches of random windows (inputs, next tokens), the same for every model of a seed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(ids) - cfg.context - 1, (cfg.batch,), generator=g)
        x = torch.stack([ids[s:s + cfg.context] for s in start.tolist()])
        y = torch.stack([ids[s + 1:s + cfg.context + 1] for s in start.tolist()])
        yield x, y


def kd_loss(fused: Any, teacher: Any) -> Any:
    """The KD objective of a student: ``fused`` (a FusedLinearDistillationLoss) from the student's and
    the (frozen) teacher's last hidden states and tied output weights; no logits of the whole batch."""
    import torch

    def loss(model: Any, x: Any, y: Any) -> Any:
        with torch.no_grad():
            t_hidden = teacher.hidden(x)
        h = model.hidden(x)
        return fused(h.reshape(-1, h.shape[-1]), model.head_weight, t_hidden.reshape(-1, t_hidden.shape[-1]),
                     teacher.head_weight, y.reshape(-1))

    return loss


def train(model: Any, ids: Any, cfg: LMConfig, steps: int, loss_fn: Any, prog: Progress, seed: int) -> float:
    """Adam with a cosine schedule; returns the seconds spent."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    t0 = time.perf_counter()
    ema = None
    for step, (x, y) in enumerate(batches(ids, cfg, steps, seed), 1):
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        v = float(loss.detach())
        ema = v if ema is None else 0.9 * ema + 0.1 * v
        prog.epoch(step, steps, f"loss {ema:.3f}  {time.perf_counter() - t0:5.1f} s", unit="step")
    return time.perf_counter() - t0


def run(cfg: LMConfig, out: IO[str] | None = None, quiet: bool = False) -> dict[str, Any]:
    """Train the tokenizer, the teacher and the two students; the numbers as a dict."""
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

    def ce(model: Any, x: Any, y: Any) -> Any:
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
    probe = make(cfg.student_width, cfg.student_layers, cfg.seed + 2)
    prog.say(f"students GPT {cfg.student_layers} x {cfg.student_width} wide ({params(probe) / 1e6:.2f} M "
             f"parameters), same initial weights and batches, {cfg.student_steps} steps each")
    prog.say(f"         KD: {cfg.alpha:g} * CE + {1 - cfg.alpha:g} * T^2 * KL, T = {cfg.temperature:g}, "
             f"FusedLinearDistillationLoss(chunk_size={cfg.chunk_size}) from the hidden states")
    for name, fn in (("no_kd", ce), ("kd", kd)):
        student = make(cfg.student_width, cfg.student_layers, cfg.seed + 2)
        prog.say(f"student, {'no KD' if name == 'no_kd' else 'KD'}")
        _reset_peak()
        sec = train(student, train_ids, cfg, cfg.student_steps, fn, prog, cfg.seed + 3)
        res[name] = dict(perplexity=perplexity(student, held_ids, cfg.context), seconds=sec, peak_mib=_peak_mib(),
                         parameters=params(student))
    rows = cfg.batch * cfg.context
    res["logits_mib"] = dict(full=2 * rows * vocab * 4 / 2**20, chunk=2 * min(rows, cfg.chunk_size) * vocab * 4 / 2**20)
    gain = res["no_kd"]["perplexity"] - res["kd"]["perplexity"]
    res["kd_gain"] = gain
    res["verdict"] = ("distillation helps" if gain > 0 else "distillation does not help") + \
        f" (held-out perplexity {res['kd']['perplexity']:.2f} with KD vs {res['no_kd']['perplexity']:.2f} without)"
    def show(text: str = "") -> None:  # the results, printed also with --quiet
        print(text, file=out, flush=True)

    show()
    show(f"held-out perplexity ({len(held_ids)} unseen tokens; lower is better)")
    for key, label in (("teacher", "teacher"), ("no_kd", "student, no KD"), ("kd", "student, KD")):
        r = res[key]
        show(f"  {label:15s} {r['perplexity']:8.2f}   {r['seconds']:6.1f} s   peak memory {r['peak_mib']:6.0f} MiB")
    show(f"  logits per step: both models' in full would be {res['logits_mib']['full']:.1f} MiB; the fused loss "
             f"holds {res['logits_mib']['chunk']:.1f} MiB at a time")
    show(f"verdict: {res['verdict']}")
    res["seconds"] = time.perf_counter() - t0
    return res


def parse_args(argv: Sequence[str]) -> tuple[LMConfig, bool]:
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
    ap.add_argument("--threads", type=_positive_int, help="PyTorch threads (default: PyTorch's)")
    ap.add_argument("--quiet", "-q", action="store_true", help="only print the results")
    a = ap.parse_args(list(argv))
    if a.temperature is not None and not (math.isfinite(a.temperature) and a.temperature > 0):
        ap.error(f"--temperature must be finite and > 0, got {a.temperature}")
    if a.alpha is not None and not 0.0 <= a.alpha <= 1.0:
        ap.error(f"--alpha must be in [0, 1], got {a.alpha}")
    cfg = LMConfig.quick() if a.quick else d
    over = {k: v for k, v in dict(seed=a.seed, teacher_steps=a.teacher_steps, student_steps=a.student_steps,
                                   temperature=a.temperature, alpha=a.alpha, chunk_size=a.chunk_size,
                                   threads=a.threads).items() if v is not None}
    return replace(cfg, **over), a.quiet


def main(argv: Sequence[str] | None = None) -> int:
    cfg, quiet = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        print(f"fastdistill demo lm: {e.name} is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(cfg, quiet=quiet)
    return 0

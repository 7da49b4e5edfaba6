"""Distil a Llama-architecture teacher into a smaller Llama student with ``fastdistill.hf.DistillationTrainer``,
online and from a captured teacher store, beside a student trained without distillation.

Everything is local: the text is the standard library's documentation topics (the corpus of
``fastdistill demo lm``, its last tenth held out), the byte-level BPE tokenizer is trained on the training
text, the models are built from ``LlamaConfig``s. Steps:

1. the teacher (``LlamaForCausalLM``) trained with a plain ``transformers.Trainer`` (cross-entropy);
2. a teacher store: the teacher's top-k log-probabilities of every training window, written with
   ``fastdistill.teachers.save`` (row ``t`` of a window: the teacher's distribution over token ``t + 1``);
3. three students, the same initial weights, batches and steps:
   * **no KD**: ``transformers.Trainer``, cross-entropy;
   * **KD online**: ``DistillationTrainer(model=student, teacher_model=teacher, ...)``;
   * **KD from the store**: ``DistillationTrainer(model=student, data_collator=TeacherCollator(store))``;
4. held-out perplexity of the four models (non-overlapping windows of the held-out text).

    python examples/hf_trainer/run.py [--quick] [--steps 400] [--json out.json]

``--quick``: tiny models, a few steps (seconds; the test suite runs it).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Config:
    vocab: int = 2048
    seq: int = 128
    teacher_hidden: int = 128
    teacher_layers: int = 2
    student_hidden: int = 64
    student_layers: int = 1
    teacher_steps: int = 400
    steps: int = 300
    batch: int = 8
    lr: float = 2e-3
    k: int = 32
    temperature: float = 1.0
    hard_label_weight: float = 0.5
    soft_label_weight: float = 0.5
    threads: int = 2
    max_windows: int = 0  # training windows used (0: all)


QUICK = Config(vocab=512, seq=32, teacher_hidden=32, teacher_layers=1, student_hidden=16, student_layers=1,
               teacher_steps=4, steps=3, batch=4, k=8, max_windows=64)


def llama(cfg: Config, hidden: int, layers: int, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    c = transformers.LlamaConfig(vocab_size=cfg.vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=hidden // 4, max_position_embeddings=cfg.seq, tie_word_embeddings=True,
                                 pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(c)


def windows(ids, seq: int) -> list[dict]:
    """Non-overlapping windows of ``seq`` tokens as dataset rows."""
    n = (len(ids) // seq) * seq
    return [{"input_ids": ids[i:i + seq].tolist()} for i in range(0, n, seq)]


def perplexity(model, rows: list[dict]) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(rows), 32):
            ids = torch.tensor([r["input_ids"] for r in rows[lo:lo + 32]])
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def capture(teacher, rows: list[dict], k: int, path: Path) -> None:
    """The teacher's top-k log-probabilities of each row, one store sequence per row (row order)."""
    import torch

    import fastdistill as fd
    from fastdistill import teachers

    teacher.eval()
    with torch.no_grad():
        for lo in range(0, len(rows), 64):
            ids = torch.tensor([r["input_ids"] for r in rows[lo:lo + 64]])
            logits = teacher(input_ids=ids).logits.float().numpy()
            seqs = [fd.top_k(logits[i], k) for i in range(len(ids))]
            teachers.save(path, seqs, meta={"k": k, "source": "examples/hf_trainer", "tokenizer": "local-bpe"})


def run(cfg: Config, quiet: bool = False) -> dict:
    import torch
    import transformers
    import datasets

    from fastdistill import teachers
    from fastdistill.demo_lm import corpus, encode, train_tokenizer
    from fastdistill.hf import DistillationTrainer, TeacherCollator

    torch.set_num_threads(cfg.threads)
    transformers.logging.set_verbosity_error()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    train_text, held_text = corpus()
    tok = train_tokenizer(train_text, cfg.vocab)
    train_rows = windows(encode(tok, train_text), cfg.seq)
    held_rows = windows(encode(tok, held_text), cfg.seq)
    if cfg.max_windows:
        train_rows, held_rows = train_rows[:cfg.max_windows], held_rows[:max(1, cfg.max_windows // 4)]
    ds = datasets.Dataset.from_list([dict(r, teacher_index=i) for i, r in enumerate(train_rows)])
    out = tempfile.mkdtemp(prefix="fastdistill-hf-example-")
    say(f"{len(train_rows)} training windows of {cfg.seq} tokens, {len(held_rows)} held out; vocabulary {cfg.vocab}")

    def args(steps: int, lr: float) -> transformers.TrainingArguments:
        return transformers.TrainingArguments(
            output_dir=out, report_to=[], use_cpu=True, save_strategy="no", max_steps=steps,
            per_device_train_batch_size=cfg.batch, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0,
            weight_decay=0.0, logging_steps=max(1, steps // 6), disable_tqdm=True, seed=0)

    def lm_collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "labels": ids.clone()}

    results: dict = {"config": asdict(cfg)}
    t0 = time.perf_counter()
    teacher = llama(cfg, cfg.teacher_hidden, cfg.teacher_layers, seed=0)
    transformers.Trainer(model=teacher, args=args(cfg.teacher_steps, cfg.lr), train_dataset=ds.remove_columns(
        "teacher_index"), data_collator=lm_collate).train()
    results["teacher"] = {"perplexity": perplexity(teacher, held_rows), "seconds": time.perf_counter() - t0}
    say(f"teacher: held-out perplexity {results['teacher']['perplexity']:.2f} ({results['teacher']['seconds']:.0f} s)")

    t0 = time.perf_counter()
    store_path = Path(out) / "teacher_store"
    capture(teacher, train_rows, cfg.k, store_path)
    store = teachers.load(store_path)
    results["capture"] = {"seconds": time.perf_counter() - t0, "sequences": len(store)}

    def student_run(name: str, make) -> None:
        student = llama(cfg, cfg.student_hidden, cfg.student_layers, seed=1)
        t = time.perf_counter()
        make(student).train()
        results[name] = {"perplexity": perplexity(student, held_rows), "seconds": time.perf_counter() - t}
        say(f"{name}: held-out perplexity {results[name]['perplexity']:.2f} ({results[name]['seconds']:.0f} s)")

    kd = dict(temperature=cfg.temperature, hard_label_weight=cfg.hard_label_weight,
              soft_label_weight=cfg.soft_label_weight)
    student_run("no KD", lambda s: transformers.Trainer(model=s, args=args(cfg.steps, cfg.lr),
                                                         train_dataset=ds.remove_columns("teacher_index"),
                                                         data_collator=lm_collate))
    student_run("KD online", lambda s: DistillationTrainer(model=s, teacher_model=teacher,
                                                           args=args(cfg.steps, cfg.lr), train_dataset=ds, **kd))
    student_run("KD from the store", lambda s: DistillationTrainer(model=s, args=args(cfg.steps, cfg.lr),
                                                                   train_dataset=ds,
                                                                   data_collator=TeacherCollator(store), **kd))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--teacher-steps", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    cfg = QUICK if a.quick else Config()
    if a.steps is not None:
        cfg = replace(cfg, steps=a.steps)
    if a.teacher_steps is not None:
        cfg = replace(cfg, teacher_steps=a.teacher_steps)
    res = run(cfg)
    print("| model | held-out perplexity | training time (s) |")
    print("|---|---|---|")
    for name in ("teacher", "no KD", "KD online", "KD from the store"):
        print(f"| {name} | {res[name]['perplexity']:.2f} | {res[name]['seconds']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

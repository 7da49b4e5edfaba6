"""A distillation training step at a Llama-3-sized vocabulary (128256) with small hidden sizes: fastdistill's
``fastdistill.hf.DistillationTrainer`` against TRL's ``DistillationTrainer`` and a plain full-logit KD
step, the same models and batch, each in a fresh subprocess, in one run.

    python bench/hf_trainer.py [--tokens 4096] [--seq 1024] [--vocab 128256] [--student-hidden 64]
                               [--teacher-hidden 128] [--chunk-size 512] [--steps 3] [--out result.json]

The step is the loss's forward and backward through both models (the teacher under no_grad), not the
optimizer (the same for all three). The objective is forward KL(teacher || student) at temperature 1
without a temperature-squared factor over the completion tokens, the mean over them: TRL's
``beta=0.0, temperature=1.0``; fastdistill's ``loss="kl_divergence", t2_scale=False, temperature=1.0``,
``hard_label_weight=0``; the full-logit step ``F.kl_div`` of the two ``log_softmax``es of the models'
full logits. Each row of the batch is one prompt token and ``seq - 1`` completion tokens. TRL is
driven through its trainer's own loss method (``_compute_loss``) on a batch already generated (its
on-policy generation is not timed); activation checkpointing is off for all three (TRL's default turns
it on; the backbones here are small beside the heads).

Peak memory: the largest resident set sampled every millisecond during the measured steps, above the
resident set before them (after a warm-up step; Linux ``/proc/self/statm``). Time: the median step.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CODE = r"""
import json, os, statistics, sys, threading, time
import torch
import torch.nn.functional as F
import transformers
cfg = json.loads(sys.argv[2])
impl = sys.argv[1]
torch.set_num_threads(cfg["threads"])
transformers.logging.set_verbosity_error()
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page

def llama(hidden, layers, seed):
    torch.manual_seed(seed)
    c = transformers.LlamaConfig(vocab_size=cfg["vocab"], hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=hidden // 4, max_position_embeddings=cfg["seq"], pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(c)

student = llama(cfg["student_hidden"], 2, 1)
teacher = llama(cfg["teacher_hidden"], 2, 2).eval().requires_grad_(False)
B, L = cfg["tokens"] // cfg["seq"], cfg["seq"]
g = torch.Generator().manual_seed(3)
ids = torch.randint(3, cfg["vocab"], (B, L), generator=g)
mask = torch.ones_like(ids)
labels = ids.clone()
labels[:, 0] = -100  # the prompt token: not trained on
out_dir = "/tmp/fastdistill-bench-hf"

if impl == "fastdistill":
    from fastdistill.hf import DistillationTrainer
    args = transformers.TrainingArguments(output_dir=out_dir, report_to=[], use_cpu=True, save_strategy="no")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, loss="kl_divergence",
                                  temperature=1.0, t2_scale=False, chunk_size=cfg["chunk_size"])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    def loss_fn():
        return trainer.compute_loss(student, batch)
elif impl == "trl":
    import datasets, tokenizers
    from tokenizers.models import WordLevel
    from trl import DistillationConfig, DistillationTrainer
    tok = tokenizers.Tokenizer(WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="a"))
    ptok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")
    args = DistillationConfig(output_dir=out_dir, report_to=[], use_cpu=True, save_strategy="no", bf16=False,
                              gradient_checkpointing=False, beta=0.0, temperature=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=ptok,
                                  train_dataset=datasets.Dataset.from_list([{"prompt": "a"}] * 4))
    inputs = {"prompt_ids": ids[:, :1], "prompt_mask": mask[:, :1], "completion_ids": ids[:, 1:],
              "completion_mask": mask[:, 1:]}
    def loss_fn():
        return trainer._compute_loss(student, inputs, None)[0]
else:  # the full logits of both models, then the divergence
    keep = labels[:, 1:] != -100
    def loss_fn():
        s = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
        per = F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), log_target=True,
                       reduction="none").sum(-1)
        return (per * keep).sum() / keep.sum()

def step():
    student.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return float(loss.detach())

loss = step()  # warm-up (kernel compilation, allocator)
base = rss()
peak = [base]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
th = threading.Thread(target=sample, daemon=True)
th.start()
times = []
for _ in range(cfg["steps"]):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
stop.set()
th.join()
print(json.dumps({"impl": impl, "loss": loss, "step_s": statistics.median(times), "times": times,
                  "peak_mib": (peak[0] - base) / 2**20, "rss_before_mib": base / 2**20}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--student-hidden", type=int, default=64)
    ap.add_argument("--teacher-hidden", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impls", default="fastdistill,trl,full")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    cfg = dict(tokens=a.tokens, seq=a.seq, vocab=a.vocab, student_hidden=a.student_hidden,
               teacher_hidden=a.teacher_hidden, chunk_size=a.chunk_size, steps=a.steps, threads=a.threads)
    results = []
    for impl in a.impls.split(","):
        p = subprocess.run([sys.executable, "-c", CODE, impl, json.dumps(cfg)], capture_output=True, text=True)
        if p.returncode != 0:
            print(f"{impl}: failed\n{p.stderr[-3000:]}", file=sys.stderr)
            results.append({"impl": impl, "error": p.stderr[-3000:]})
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        results.append(r)
    print(f"vocab {a.vocab}, {a.tokens} tokens ({a.tokens // a.seq} x {a.seq}), student hidden {a.student_hidden}, "
          f"teacher hidden {a.teacher_hidden}, float32, {a.threads} threads, fastdistill chunk_size {a.chunk_size}")
    print("| step | loss | time per step (s) | peak memory above the step's start (MiB) |")
    print("|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['impl']} | failed | | |")
        else:
            print(f"| {r['impl']} | {r['loss']:.8f} | {r['step_s']:.2f} | {r['peak_mib']:.0f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": cfg, "results": results}, f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

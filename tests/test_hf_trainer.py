"""``fastdistill.hf``: the DistillationTrainer's loss and gradients against a float64 full-logit reference
(the models' own forward, their logit transforms included), gradient accumulation, the offline teacher
store route, PEFT students, evaluation and the logged parts. Tiny models built from configs."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torch.nn.functional as F  # noqa: E402

import fastdistill as fd  # noqa: E402
from fastdistill.hf import DistillationTrainer, TeacherCollator, _shifted_labels, logit_transform  # noqa: E402

IGNORE = -100
VOCAB = 160


def _config(arch, hidden, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    if arch == "llama":
        return transformers.LlamaConfig(**common, **extra)
    if arch == "gemma2":  # Gemma-2 ties its embeddings; a cap that binds at these logits
        return transformers.Gemma2Config(**common, final_logit_softcapping=extra.pop("cap", 3.0), **extra)
    if arch == "cohere":  # Cohere ties its embeddings and scales its logits
        return transformers.CohereConfig(**common, logit_scale=extra.pop("scale", 0.25), **extra)
    raise ValueError(arch)


def _model(arch, hidden, seed, dtype=torch.float32, **extra):
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(_config(arch, hidden, **extra))
    with torch.no_grad():  # logits of a few units (random init gives ~0.1), where the transforms matter
        m.get_output_embeddings().weight.mul_(40.0)
    return m.to(dtype)


def _rows(n, seed, lo=4, hi=14, prompt=True):
    g = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ids = g.integers(3, VOCAB, int(g.integers(lo, hi))).tolist()
        labels = list(ids)
        if prompt:  # a prompt of a few tokens is not trained on (uneven counted tokens per row)
            for j in range(int(g.integers(0, len(ids) // 2 + 1))):
                labels[j] = IGNORE
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                disable_tqdm=True, dataloader_num_workers=0, seed=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _reference(student, batch, *, teacher=None, sparse=None, tau, hard_w, soft_w, loss="kl_divergence"):
    """(loss, {name: grad}) in float64 by autograd over the full logits of float64 copies of the models
    (their forward applies their own logit transforms)."""
    s64 = copy.deepcopy(student).double()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ls = s64(input_ids=ids, attention_mask=mask).logits
    y = _shifted_labels(batch)
    keep = y != IGNORE
    lq = F.log_softmax(ls / tau, -1)
    if sparse is None:
        t64 = copy.deepcopy(teacher).double()
        with torch.no_grad():
            lt = t64(input_ids=ids, attention_mask=mask).logits
        lp = F.log_softmax(lt / tau, -1)
        if loss == "kl_divergence":
            soft = tau * tau * (lp.exp() * (lp - lq)).sum(-1)
        else:  # reverse_kl
            soft = tau * tau * (lq.exp() * (lq - lp)).sum(-1)
    else:  # the renormalised support of a top-k teacher (its log-probabilities at T_gen = 1)
        idx = torch.as_tensor(sparse.indices).long()
        val = torch.as_tensor(sparse.values).double()
        valid = idx >= 0
        lw = torch.where(valid, val / tau, torch.full_like(val, -1e30))  # finite: padding rows have no slot
        lp = lw - torch.logsumexp(lw, -1, keepdim=True)
        lq_s = lq.gather(-1, idx.clamp(min=0))
        p = lp.exp()
        soft = tau * tau * torch.where(valid, p * (lp - lq_s), torch.zeros_like(p)).sum(-1)
        soft = torch.where(keep, soft, torch.zeros_like(soft))
    hard = F.cross_entropy(ls.transpose(1, 2), torch.where(keep, y, 0), reduction="none")
    rows = torch.where(keep, hard_w * hard + soft_w * soft, torch.zeros_like(soft))
    ref = rows.sum() / int(keep.sum())
    ref.backward()
    grads = {n: p.grad for n, p in s64.named_parameters() if p.grad is not None}
    return float(ref.detach()), grads


def _check_grads(student, grads, tol):
    named = dict(student.named_parameters())
    assert grads
    for name, want in grads.items():
        got = named[name].grad
        assert got is not None, name
        assert got.dtype == named[name].dtype
        if tol < 1e-3:  # float32: each element against the tensor's largest
            err = float((got.double() - want).abs().max()) / max(float(want.abs().max()), 1e-30)
        else:  # bfloat16: relative error of the whole tensor
            err = float((got.double() - want).norm()) / max(float(want.norm()), 1e-30)
        assert err < tol, (name, err)


CASES = [("llama", torch.float32, 1e-5, 2e-4), ("gemma2", torch.float32, 1e-5, 2e-4),
         ("cohere", torch.float32, 1e-5, 2e-4), ("llama", torch.bfloat16, 2e-2, 5e-2),
         ("gemma2", torch.bfloat16, 2e-2, 5e-2), ("cohere", torch.bfloat16, 2e-2, 5e-2)]


@pytest.mark.parametrize("arch,dtype,loss_tol,grad_tol", CASES)
def test_online_loss_and_gradients_equal_the_full_logits(tmp_path, arch, dtype, loss_tol, grad_tol):
    student = _model(arch, 32, seed=1, dtype=dtype)
    # the teacher wider than the student, its own transform values
    teacher = _model(arch, 48, seed=2, dtype=dtype, **({"cap": 5.0} if arch == "gemma2" else
                                                       {"scale": 0.125} if arch == "cohere" else {}))
    s_scale, s_cap = logit_transform(student)
    assert (s_scale, s_cap) == {"llama": (1.0, None), "gemma2": (1.0, 3.0), "cohere": (0.25, None)}[arch]
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), temperature=2.0,
                                  hard_label_weight=0.3, soft_label_weight=0.7, chunk_size=16)
    batch = TeacherCollator()(_rows(3, seed=3))
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    want, grads = _reference(student, batch, teacher=teacher, tau=2.0, hard_w=0.3, soft_w=0.7)
    assert float(loss.detach()) == pytest.approx(want, rel=loss_tol)
    _check_grads(student, grads, grad_tol)
    assert not any(p.grad is not None for p in teacher.parameters())


def test_the_transforms_are_the_models_own(tmp_path):
    # the same weights with the cap removed give another loss: the trainer reads it from the config
    student = _model("gemma2", 32, seed=1)
    teacher = _model("gemma2", 48, seed=2)
    batch = TeacherCollator()(_rows(2, seed=3))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path))
    with torch.no_grad():
        capped = float(trainer.compute_loss(student, batch))
        student.config.final_logit_softcapping = None
        teacher.config.final_logit_softcapping = None
        raw = float(trainer.compute_loss(student, batch))
    assert abs(capped - raw) > 0.05 * raw


def test_reverse_kl_and_tied_llama_embeddings(tmp_path):
    student = _model("llama", 32, seed=4, tie_word_embeddings=True)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    teacher = _model("llama", 48, seed=5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), loss="reverse_kl",
                                  temperature=1.5, chunk_size=7)
    batch = TeacherCollator()(_rows(4, seed=6))
    trainer.compute_loss(student, batch).backward()
    want, grads = _reference(student, batch, teacher=teacher, tau=1.5, hard_w=0.0, soft_w=1.0, loss="reverse_kl")
    _check_grads(student, grads, 2e-4)


def _store(tmp_path, teacher, rows, k=8):
    """A teacher store of the teacher's top-k log-probabilities, row t of a sequence over token t + 1."""
    from fastdistill import teachers

    seqs = []
    with torch.no_grad():
        for r in rows:
            logits = teacher(input_ids=torch.tensor([r["input_ids"]])).logits[0].double().numpy()
            seqs.append(fd.top_k(logits, k))
    path = tmp_path / "store"
    teachers.save(path, seqs, meta={"vocab_size": VOCAB, "k": k, "source": "test"})
    return teachers.load(path)


@pytest.mark.parametrize("arch,dtype,loss_tol,grad_tol", [CASES[0], CASES[1], CASES[4]])
def test_offline_through_a_teacher_store(tmp_path, arch, dtype, loss_tol, grad_tol):
    student = _model(arch, 32, seed=1, dtype=dtype)
    teacher = _model(arch, 48, seed=2)
    rows = _rows(4, seed=7)
    store = _store(tmp_path, teacher, rows)
    data = [dict(r, teacher_index=i) for i, r in enumerate(rows)]
    collator = TeacherCollator(store)
    batch = collator(data[1:])
    assert batch["teacher"].indices.shape[:2] == batch["input_ids"].shape
    assert int((batch["teacher"].indices[batch["attention_mask"] == 0] != -1).sum()) == 0
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), data_collator=collator, temperature=1.0,
                                  hard_label_weight=0.25, soft_label_weight=0.75, chunk_size=8)
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    want, grads = _reference(student, batch, sparse=batch["teacher"], tau=1.0, hard_w=0.25, soft_w=0.75)
    assert float(loss.detach()) == pytest.approx(want, rel=loss_tol)
    _check_grads(student, grads, grad_tol)


def test_offline_training_keeps_the_teacher_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    student = _model("llama", 32, seed=1)
    teacher = _model("llama", 48, seed=2)
    rows = _rows(8, seed=8)
    store = _store(tmp_path, teacher, rows)
    ds = datasets.Dataset.from_list([dict(r, teacher_index=i) for i, r in enumerate(rows)])
    before = copy.deepcopy(student.state_dict())
    trainer = DistillationTrainer(model=student, args=_args(tmp_path, max_steps=2, per_device_train_batch_size=4,
                                                            learning_rate=1e-2, logging_steps=1),
                                  train_dataset=ds, data_collator=TeacherCollator(store))
    out = trainer.train()
    assert np.isfinite(out.training_loss)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(h["soft_loss"] == pytest.approx(h["loss"], rel=1e-5) for h in logged)


def test_teacher_collator_refuses_a_short_store_sequence_and_a_missing_column(tmp_path):
    teacher = _model("llama", 48, seed=2)
    rows = _rows(2, seed=9)
    store = _store(tmp_path, teacher, rows)
    longer = dict(input_ids=rows[0]["input_ids"] + [5, 6, 7], teacher_index=0)
    with pytest.raises(fd.DimensionMismatchError, match="teacher row each"):
        TeacherCollator(store)([longer])
    with pytest.raises(KeyError, match="teacher_index"):
        TeacherCollator(store)([rows[0]])


def _sgd_update(tmp_path, rows, batch, accum, seed=11):
    datasets = pytest.importorskip("datasets")
    student = _model("llama", 32, seed=seed)
    teacher = _model("llama", 48, seed=seed + 1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    args = _args(tmp_path, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                 learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                 warmup_steps=0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, temperature=2.0,
                                  hard_label_weight=0.4, soft_label_weight=0.6,
                                  train_dataset=datasets.Dataset.from_list(rows))
    out = trainer.train()
    after = student.state_dict()
    return {k: v - before[k] for k, v in after.items()}, out.training_loss, after


def test_gradient_accumulation_gives_the_whole_batch(tmp_path):
    rows = _rows(16, seed=12, lo=3, hi=20)
    counted = [sum(1 for v in r["labels"][1:] if v != IGNORE) for r in rows]
    assert len(set(counted)) > 4  # uneven numbers of counted tokens per row and per micro-batch
    acc, loss_acc, _ = _sgd_update(tmp_path, rows, batch=4, accum=4)
    one, loss_one, weights = _sgd_update(tmp_path, rows, batch=16, accum=1)
    assert loss_acc == pytest.approx(loss_one, rel=1e-6)
    moved = 0
    for k in one:
        d = float((acc[k] - one[k]).norm())
        n = float(one[k].norm())
        # an update is read as (weight after - weight before) in float32: each side's new weight is rounded
        # to within half an ulp of its size (a layer norm's weights near 1 moved by 1e-3 keep ~4 digits of
        # the update), so the bound is the gradients' 1e-6 plus the weights' own rounding
        rounding = 2.0 ** -24 * float(weights[k].float().norm())
        if n > 0:
            moved += 1
            assert d <= 1e-6 * n + rounding, (k, d / n, rounding / n)
    assert moved > 5


def test_peft_lora_student(tmp_path):
    peft = pytest.importorskip("peft")
    datasets = pytest.importorskip("datasets")
    base = _model("llama", 32, seed=1)
    teacher = _model("llama", 48, seed=2)
    rows = _rows(8, seed=13)
    batch = TeacherCollator()(rows[:4])
    want, _ = _reference(base, batch, teacher=teacher, tau=1.0, hard_w=0.0, soft_w=1.0)
    student = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        lora_dropout=0.0, task_type="CAUSAL_LM"))
    frozen = {k: v.clone() for k, v in student.named_parameters() if not v.requires_grad}
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=_args(tmp_path, max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2),
                                  train_dataset=datasets.Dataset.from_list(rows))
    with torch.no_grad():  # LoRA's B starts at zero: the base model's loss
        assert float(trainer.compute_loss(student, batch)) == pytest.approx(want, rel=1e-5)
    trainer.train()
    named = dict(student.named_parameters())
    assert all(torch.equal(named[k], v) for k, v in frozen.items())
    assert any(float(p.detach().abs().max()) > 0 for k, p in named.items() if "lora_B" in k)
    with torch.no_grad():
        assert float(trainer.compute_loss(student, batch)) < want


def test_evaluate_returns_the_same_loss_and_the_parts(tmp_path):
    datasets = pytest.importorskip("datasets")
    student = _model("cohere", 32, seed=1)
    teacher = _model("cohere", 48, seed=2)
    rows = _rows(6, seed=14)
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=_args(tmp_path, per_device_eval_batch_size=6), temperature=2.0,
                                  hard_label_weight=0.5, soft_label_weight=0.5,
                                  eval_dataset=datasets.Dataset.from_list(rows))
    metrics = trainer.evaluate()
    batch = TeacherCollator()(rows)
    want, _ = _reference(student, batch, teacher=teacher, tau=2.0, hard_w=0.5, soft_w=0.5)
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-5)
    assert 0.5 * metrics["eval_hard_loss"] + 0.5 * metrics["eval_soft_loss"] == pytest.approx(want, rel=1e-5)
    # the hard part alone: the student's cross-entropy on the counted positions
    hard, _ = _reference(student, batch, teacher=teacher, tau=2.0, hard_w=1.0, soft_w=0.0)
    assert metrics["eval_hard_loss"] == pytest.approx(hard, rel=1e-5)


def test_logged_parts_add_up_to_the_loss(tmp_path):
    datasets = pytest.importorskip("datasets")
    student = _model("gemma2", 32, seed=1)
    teacher = _model("gemma2", 48, seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=_args(tmp_path, max_steps=4, per_device_train_batch_size=2,
                                             gradient_accumulation_steps=2, logging_steps=2, learning_rate=1e-3),
                                  hard_label_weight=0.2, soft_label_weight=0.8,
                                  train_dataset=datasets.Dataset.from_list(_rows(16, seed=15)))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for h in logged:
        assert 0.2 * h["hard_loss"] + 0.8 * h["soft_loss"] == pytest.approx(h["loss"], rel=1e-4)


def _trl_trainer(tmp_path, student, teacher, beta, temperature):
    """TRL's DistillationTrainer on the models (a word-level tokenizer built here: nothing downloaded)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel

    tok = tokenizers.Tokenizer(WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="a"))
    ptok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")
    args = trl.DistillationConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, save_strategy="no",
                                  bf16=False, gradient_checkpointing=False, beta=beta, temperature=temperature)
    return trl.DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=ptok,
                                   train_dataset=datasets.Dataset.from_list([{"prompt": "a"}] * 2))


# TRL's beta selects the divergence, without a temperature-squared factor: 0 forward KL, 1 reverse KL,
# between them the generalised JSD with mixture beta * p_teacher + (1 - beta) * p_student
TRL_MAP = [(0.0, dict(loss="kl_divergence")), (1.0, dict(loss="reverse_kl")), (0.3, dict(loss="jsd", beta=0.3))]


@pytest.mark.parametrize("trl_beta,ours", TRL_MAP)
@pytest.mark.parametrize("arch", ["gemma2", "cohere"])
def test_loss_and_gradients_equal_trls_where_the_objective_is_the_same(tmp_path, trl_beta, ours, arch):
    student = _model(arch, 32, seed=1)
    teacher = _model(arch, 48, seed=2)
    # prompts (not trained on) and completions, the completions right-padded
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, VOCAB, (3, 4), generator=g)
    completion = torch.randint(3, VOCAB, (3, 9), generator=g)
    c_mask = torch.ones_like(completion)
    c_mask[1, 6:] = 0
    c_mask[2, 3:] = 0
    trl_t = _trl_trainer(tmp_path, student, teacher, trl_beta, 2.0)
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
              "completion_mask": c_mask}
    want = trl_t._compute_loss(student, inputs, None)[0]
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    ids = torch.cat([prompt, completion], 1)
    labels = ids.clone()
    labels[:, :prompt.shape[1]] = IGNORE
    labels[:, prompt.shape[1]:][c_mask == 0] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.cat([torch.ones_like(prompt), c_mask], 1), "labels": labels}
    ours_t = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), temperature=2.0,
                                 t2_scale=False, chunk_size=8, **ours)
    loss = ours_t.compute_loss(student, batch)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    named = dict(student.named_parameters())
    for name, w in want_grads.items():
        err = float((named[name].grad - w).abs().max()) / max(float(w.abs().max()), 1e-30)
        assert err < 1e-4, (name, err)


def test_the_example_quick_run():
    pytest.importorskip("datasets")
    pytest.importorskip("tokenizers")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer" / "run.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_example", path)
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = mod  # (its dataclass looks its module up)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    res = mod.run(mod.QUICK, quiet=True)
    for name in ("teacher", "no KD", "KD online", "KD from the store"):
        assert np.isfinite(res[name]["perplexity"]) and res[name]["perplexity"] > 1.0
    assert res["capture"]["sequences"] == 64


def test_a_bfloat16_student_and_a_float32_teacher(tmp_path):
    # the teacher stays in its own dtype: its chunks' logits in float32 beside the student's bfloat16
    student = _model("gemma2", 32, seed=1, dtype=torch.bfloat16)
    teacher = _model("gemma2", 48, seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), temperature=2.0)
    assert next(teacher.parameters()).dtype == torch.float32
    batch = TeacherCollator()(_rows(3, seed=3))
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    want, grads = _reference(student, batch, teacher=teacher, tau=2.0, hard_w=0.0, soft_w=1.0)
    assert float(loss.detach()) == pytest.approx(want, rel=2e-2)
    _check_grads(student, grads, 5e-2)

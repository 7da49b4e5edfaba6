"""Hugging Face ``transformers`` integration: a :class:`DistillationTrainer` whose loss runs through
:class:`fastdistill.torch.FusedLinearDistillationLoss`, and :class:`TeacherCollator`, which pads token
rows and attaches their teacher from a teacher store.

The loss is taken from each model's last hidden states and output embedding, ``chunk_size`` rows of
logits at a time: neither model's ``(tokens, vocabulary)`` logits exist at once. Both models are asked
for their hidden states with ``logits_to_keep=1`` (one row of logits per sequence), and each model's
own logit transforms (Cohere's ``logit_scale``, Granite's ``logits_scaling``, Gemma-2's
``final_logit_softcapping``) are read from its config and applied per chunk.

Needs ``pip install 'fastdistill[hf]'`` (``transformers``; ``peft`` for LoRA students).
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import transformers

from . import _validate as V
from ._torch_linear import _transform_
from .sparse import SparseTeacher
from .torch import FusedLinearDistillationLoss

__all__ = ["DistillationTrainer", "TeacherCollator", "logit_transform"]

IGNORE_INDEX = -100


# ------------------------------------------------------------------ models


def _unwrap(model: Any) -> Any:
    """The ``PreTrainedModel`` inside a PEFT wrapper (its LoRA layers in place), or ``model``."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__name__.startswith("Peft"):
        return get_base()
    return model


def logit_transform(model: Any) -> tuple[float, Optional[float]]:
    """``(logit_scale, softcap)`` of the logits ``model`` emits from its head's output: Cohere's
    ``logit_scale`` (multiplied), Granite's ``logits_scaling`` (divided by), then Gemma-2's
    ``final_logit_softcapping`` (``c · tanh(· / c)``), as their ``forward`` applies them."""
    config = _unwrap(model).config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = 1.0 / float(config.logits_scaling)
    cap = getattr(config, "final_logit_softcapping", None)
    return (1.0 if scale is None else float(scale)), (None if cap is None else float(cap))


def _head(model: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The output projection's weight (tied to the input embedding where the model ties them: the same
    parameter, so its gradient reaches both uses) and bias."""
    head = _unwrap(model).get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(_unwrap(model)).__name__} has no output embeddings (get_output_embeddings() is None): "
                        "the distillation loss needs a language-model head")
    if hasattr(head, "base_layer") or hasattr(head, "modules_to_save"):
        # a LoRA adapter or a trainable copy on the head: its effective weight is not head.weight
        raise NotImplementedError(
            "the output embedding is wrapped by an adapter (LoRA target or modules_to_save): the fused loss reads the "
            "head's weight; leave the head out of the adapter's target modules")
    weight = head.weight
    bias = getattr(head, "bias", None)
    return weight, bias


def _accepts(model: Any, name: str) -> bool:
    try:
        params = inspect.signature(_unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _last_hidden_state(model: Any, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       inner: Any = None) -> torch.Tensor:
    """``(B, L, H)``: the hidden states the model's head reads. Called through ``model`` as given (its
    wrappers and hooks run: PEFT, a data-parallel wrapper) with ``logits_to_keep=1`` where the model
    (``inner``: ``model`` without a data-parallel wrapper) takes it, so that one row of logits per
    sequence is formed, not ``L``; otherwise through its backbone."""
    inner = model if inner is None else inner
    kw: dict = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if _accepts(inner, "logits_to_keep"):
        out = model(**kw, logits_to_keep=1, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-1]
    backbone = _unwrap(inner).base_model
    if backbone is _unwrap(inner):  # no separate backbone: fall back to the model's own outputs
        raise TypeError(f"{type(backbone).__name__} takes no logits_to_keep and has no backbone to call for its hidden "
                        "states")
    return backbone(**kw, return_dict=True).last_hidden_state


# ------------------------------------------------------------------ batches


def _shifted_labels(batch: Mapping[str, Any], ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(B, L)``: the label of position ``t`` is the token at ``t + 1`` (the causal shift), ``ignore_index``
    at the last position, where ``labels`` (or, without them, ``attention_mask``) excludes the next token,
    and on padding."""
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"].clone()
        mask = batch.get("attention_mask")
        if mask is not None:
            labels[mask == 0] = ignore_index
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


def _pad_rows(rows: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


class TeacherCollator:
    """Collates dataset rows holding ``input_ids`` (optionally ``labels``, ``attention_mask``) and, with a
    teacher store, the integer index of each row's sequence in it (``column``): pads them on the right
    (``input_ids`` with ``pad_token_id``, ``labels`` with -100, ``attention_mask`` with 0; ``labels``
    default to the ``input_ids``, -100 on padding) and adds ``teacher``: a ``SparseTeacher`` of tensors
    ``(B, L, k)`` row-aligned with the padded batch (row ``t`` of a sequence is the teacher's
    distribution over the token after position ``t``, as the store holds it), ``-1`` slots on padding.

    ``store``: a :class:`fastdistill.teachers.TeacherStore` (``fastdistill.teachers.load``) or ``None``
    (padding only). A sequence needs at least ``len(input_ids) - 1`` teacher rows (one per predicted
    token); rows beyond ``len(input_ids)`` are dropped. ``pad_to_multiple_of`` rounds the padded length up.
    """

    def __init__(self, store: Any = None, *, column: str = "teacher_index", pad_token_id: int = 0,
                 pad_to_multiple_of: Optional[int] = None) -> None:
        self.store = store
        self.column = column
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise V.EmptyInputError("TeacherCollator got no rows")
        ids = [list(map(int, r["input_ids"])) for r in rows]
        length = max(len(i) for i in ids)
        if self.pad_to_multiple_of:
            m = int(self.pad_to_multiple_of)
            length = -(-length // m) * m
        batch: dict[str, Any] = {"input_ids": _pad_rows(ids, self.pad_token_id, length)}
        if all(r.get("attention_mask") is not None for r in rows):
            batch["attention_mask"] = _pad_rows([r["attention_mask"] for r in rows], 0, length)
        else:
            batch["attention_mask"] = _pad_rows([[1] * len(i) for i in ids], 0, length)
        if all(r.get("labels") is not None for r in rows):
            batch["labels"] = _pad_rows([r["labels"] for r in rows], IGNORE_INDEX, length)
        else:
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = IGNORE_INDEX
            batch["labels"] = labels
        if self.store is not None:
            batch["teacher"] = self._teacher(rows, ids, length)
        return batch

    def _teacher(self, rows: Sequence[Mapping[str, Any]], ids: list[list[int]], length: int) -> SparseTeacher:
        seqs = []
        for b, r in enumerate(rows):
            if self.column not in r:
                raise KeyError(f"dataset row {b} has no {self.column!r} column (the index of its sequence in the teacher "
                               "store); keep it with remove_unused_columns=False or the trainer's default")
            seqs.append(self.store[int(r[self.column])])
        k = max(int(s.indices.shape[-1]) for s in seqs)
        first = seqs[0]
        idx = torch.full((len(rows), length, k), -1, dtype=torch.int32)
        val = torch.zeros((len(rows), length, k), dtype=torch.float32)
        for b, (s, tok) in enumerate(zip(seqs, ids)):
            n = int(s.indices.shape[0])
            need = len(tok) - 1
            if n < need:
                raise V.DimensionMismatchError(
                    expected=need, got=n,
                    message=f"teacher store sequence {int(rows[b][self.column])} has {n} rows but batch row {b} has "
                    f"{len(tok)} tokens: {need} predicted tokens need a teacher row each")
            n = min(n, len(tok))
            kk = int(s.indices.shape[-1])
            # (copies: the store's arrays are read-only views of the mapped files)
            idx[b, :n, :kk] = torch.from_numpy(np.array(s.indices[:n], dtype=np.int32))
            val[b, :n, :kk] = torch.from_numpy(np.array(s.values[:n], dtype=np.float32))
        return SparseTeacher(idx, val, kind=first.kind, tail=first.tail, temperature=first.temperature)


# ------------------------------------------------------------------ the trainer


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that distils ``teacher_model`` (online) or the ``teacher`` of each batch
    (offline: a ``SparseTeacher``, e.g. from :class:`TeacherCollator`) into ``model``.

    The loss of each batch is ``hard_label_weight · CE + soft_label_weight · soft`` over the counted
    positions (those whose next token is a label other than -100: the causal shift), divided by
    ``num_items_in_batch`` (the whole accumulated batch's count: gradient accumulation gives the loss
    and gradients of the whole batch) or, without it, by the batch's own count. ``loss``,
    ``temperature``, ``beta``, ``alpha``, ``t2_scale``: the soft loss, as ``fastdistill.torch`` names
    them. Logged: ``soft_loss`` and ``hard_loss`` (where its weight is not 0; with both weights not 0,
    the hard part costs a loss-only pass of the student's head).
    """

    # the loss is divided by the accumulated batch's count already: the Trainer must not divide it again
    loss_is_scaled_for_ga = True

    def __init__(self, model: Any = None, teacher_model: Any = None, args: Any = None, *,
                 loss: Any = "kl_divergence", temperature: float = 1.0, hard_label_weight: float = 0.0,
                 soft_label_weight: float = 1.0, chunk_size: int = 1024, beta: Optional[float] = None,
                 alpha: Optional[float] = None, t2_scale: Optional[bool] = None, **kwargs: Any) -> None:
        soft_params = {k: v for k, v in dict(beta=beta, alpha=alpha, t2_scale=t2_scale).items() if v is not None}
        self.fused = FusedLinearDistillationLoss(loss, temperature, hard_label_weight, soft_label_weight,
                                                 ignore_index=IGNORE_INDEX, chunk_size=chunk_size, **soft_params)
        self.teacher_model = teacher_model
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = TeacherCollator(None, pad_token_id=_pad_id(kwargs.get("processing_class"), model))
        super().__init__(model=model, args=args, **kwargs)
        # transformers < 4.50 decided "already scaled" from this flag instead of loss_is_scaled_for_ga
        self.model_accepts_loss_kwargs = True
        if teacher_model is not None:
            teacher_model.eval()
            teacher_model.requires_grad_(False)
            if getattr(teacher_model, "hf_device_map", None) is None:
                teacher_model.to(self.args.device)
        self._parts: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
        self._parts_step = 0

    # the dataset's teacher column and labels pass through to the collator
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        extra = ["input_ids", "attention_mask", "labels", "teacher"]
        column = getattr(self.data_collator, "column", None)
        if column:
            extra.append(column)
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        """The counted positions of the accumulated micro-batches (the causal shift's), summed over
        processes where the Trainer averages tokens across devices."""
        n = sum(int((_shifted_labels(b) != IGNORE_INDEX).sum()) for b in batch_samples)
        count = torch.tensor(n, device=device)
        if getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        fused = self.fused
        labels = _shifted_labels(inputs).to(inputs["input_ids"].device)
        inner = self.accelerator.unwrap_model(model)  # (a data-parallel wrapper has no head or config)
        hidden = _last_hidden_state(model, inputs["input_ids"], inputs.get("attention_mask"), inner)
        weight, bias = _head(inner)
        fused.student_logit_scale, fused.student_softcap = logit_transform(inner)
        if self.teacher_model is not None:
            with torch.no_grad():
                t_hidden = _last_hidden_state(self.teacher_model, inputs["input_ids"].to(self._teacher_device()),
                                              _maybe_to(inputs.get("attention_mask"), self._teacher_device()))
            t_weight, t_bias = _head(self.teacher_model)
            fused.teacher_logit_scale, fused.teacher_softcap = logit_transform(self.teacher_model)
            teacher: Any = t_hidden.to(hidden.device)
            t_weight = t_weight.to(hidden.device)
            t_bias = None if t_bias is None else t_bias.to(hidden.device)
        else:
            teacher = inputs.get("teacher")
            if teacher is None:
                raise ValueError("no teacher: pass teacher_model, or a data collator that adds 'teacher' to each batch "
                                 "(fastdistill.hf.TeacherCollator(store))")
            teacher = _sparse_to(teacher, hidden.device)
            t_weight = t_bias = None
            fused.teacher_logit_scale, fused.teacher_softcap = 1.0, None
        n_items = num_items_in_batch
        if n_items is None:  # the batch's own mean (evaluation, or a loop that does not count)
            n_items = (labels != IGNORE_INDEX).sum()
        elif isinstance(n_items, torch.Tensor):
            n_items = n_items.to(hidden.device)
        loss = fused(hidden, weight, teacher, t_weight, labels.to(hidden.device), bias, t_bias, num_items=n_items)
        self._record_parts(model, loss, hidden, weight, bias, labels, n_items)
        if (num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False)
                and self.args.world_size > 1):
            # each process's sum over the count of all processes; DDP averages the gradients over the
            # processes, which this factor undoes (the Trainer's own rule for a count across devices)
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def _teacher_device(self) -> torch.device:
        return next(self.teacher_model.parameters()).device

    def _record_parts(self, model: Any, loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], labels: torch.Tensor, n_items: Any) -> None:
        """The soft and hard parts of this micro-batch's loss, scaled as the loss is, summed until logged."""
        d = self.fused.distiller
        hw, sw = d.hard_label_weight, d.soft_label_weight
        total = float(loss.detach())
        if hw == 0.0:
            parts = {"soft_loss": total / sw if sw else 0.0}
        elif sw == 0.0:
            parts = {"hard_loss": total / hw}
        else:
            hard = _cross_entropy(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), labels,
                                  self.fused, n_items)
            parts = {"hard_loss": hard, "soft_loss": (total - hw * hard) / sw}
        mode = "train" if model.training else "eval"
        acc = self._parts[mode]
        rows = 1.0 if mode == "train" else float(labels.shape[0])  # eval: weighted as the Trainer weighs eval_loss
        for k, v in parts.items():
            acc[k] = acc.get(k, 0.0) + v * rows
        if mode == "eval":
            acc["_rows"] = acc.get("_rows", 0.0) + rows

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if any(k.startswith("eval_") for k in logs):
            acc = self._parts["eval"]
            rows = acc.pop("_rows", 0.0)
            for k, v in acc.items():
                logs[f"eval_{k}"] = v / rows if rows else 0.0
            self._parts["eval"] = {}
        elif "loss" in logs:
            steps = self.state.global_step - self._parts_step
            for k, v in self._parts["train"].items():
                logs[k] = v / steps if steps else v
            self._parts["train"] = {}
            self._parts_step = self.state.global_step
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Optional[list[str]] = None) -> tuple[Any, Any, Any]:
        # the same loss as training, whether or not the batch names labels (the base class returns no
        # loss without them); no logits are formed to return
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def _cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                   fused: FusedLinearDistillationLoss, n_items: Any) -> float:
    """The hard-label part alone (for the logs): cross-entropy of the student's transformed logits,
    chunk by chunk, summed over the counted positions and divided as the loss is."""
    x = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(x.device)
    keep = y != IGNORE_INDEX
    x, y = x[keep], y[keep]
    scale, cap = fused.student_logit_scale, fused.student_softcap
    total = 0.0
    with torch.no_grad():
        for lo in range(0, x.shape[0], fused.chunk_size):
            z = (x[lo:lo + fused.chunk_size] @ weight.t()).float()
            if bias is not None:
                z += bias.float()
            _transform_(z, scale, cap or 0.0, None)  # (the fused head's own transform, in float32)
            total += float(torch.nn.functional.cross_entropy(z, y[lo:lo + fused.chunk_size], reduction="sum"))
    n = float(n_items)
    return total / n if n else 0.0


def _maybe_to(x: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    return None if x is None else x.to(device)


def _sparse_to(t: SparseTeacher, device: torch.device) -> SparseTeacher:
    idx, val = torch.as_tensor(t.indices), torch.as_tensor(t.values)
    if idx.device == device and val.device == device:
        return t
    return SparseTeacher(idx.to(device), val.to(device), kind=t.kind, tail=t.tail, temperature=t.temperature)


def _pad_id(processing_class: Any, model: Any) -> int:
    for src in (processing_class, getattr(_unwrap(model), "config", None) if model is not None else None):
        pid = getattr(src, "pad_token_id", None)
        if isinstance(pid, int) and pid >= 0:
            return pid
    return 0

"""Adapter fine-tuning with transformers' ``Trainer`` (so accelerate/FSDP/DeepSpeed work unchanged).

Only parameters with ``requires_grad`` (the LoRA A/B matrices) are optimised, with AdamW (lr 2e-4 by
default, as in the paper). ``distill=True`` replaces the label loss by the temperature-scaled KL
divergence from a dense teacher's next-token distribution on every attended token; it needs no labels.
The teacher is either a model held in memory (``teacher_topk = 0``: full logits, :func:`distill_loss`)
or its top-k distributions cached on disk (``teacher_topk = k``: :mod:`losa.finetune.teacher`,
:func:`topk_distill_loss`). A non-finite loss stops training with a :class:`LosaError`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from losa.errors import LosaError
from losa.finetune.config import FinetuneConfig, check_environment
from losa.finetune.data import TEACHER_KEYS, Collator
from losa.utils.dist import world_size

if TYPE_CHECKING:  # pragma: no cover
    from losa.finetune.teacher import TeacherTopK


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor | None,
                 temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """``T² · KL(p_teacher ‖ p_student)`` at temperature T over the attended tokens.

    Args:
        student_logits: ``[batch, seq, vocab]``.
        teacher_logits: ``[batch, seq, vocab]``.
        attention_mask: ``[batch, seq]`` (1 = attended) or None (every token counts).
        temperature: the distillation temperature T.
        reduction: ``"mean"`` over the attended tokens or their ``"sum"``.
    Returns:
        A scalar float32 tensor.
    Raises:
        LosaError: an unknown ``reduction``.
    """
    _check_reduction(reduction)
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1)  # [b, seq]
    return _reduce(kl, attention_mask, t, reduction)


def topk_distill_loss(student_logits: torch.Tensor, teacher_indices: torch.Tensor, teacher_logprobs: torch.Tensor,
                      attention_mask: torch.Tensor | None, temperature: float = 1.0,
                      reduction: str = "mean") -> torch.Tensor:
    """``T² · KL(p ‖ q)`` restricted to the teacher's cached top-k support, over the attended tokens.

    Per token, with the k cached ids ``i`` and their teacher log-probabilities ``ℓ_i``:
    ``p_i = softmax_i(ℓ / T)`` (the teacher renormalised over the k ids, at temperature T) and
    ``log q_i = log_softmax(s / T)_i`` (the student's log-softmax over the *full* vocabulary, gathered
    at the k ids, **not** renormalised over them); the loss is ``T² Σ_i p_i (log p_i − log q_i)``.

    Because q is not renormalised, ``Σ_i p_i log(p_i / q_i) = KL(p ‖ q|_S) − log q(S) ≥ 0``: the student is
    also pulled to put its mass on the support S (probability it gives to tokens outside the teacher's
    top-k is penalised through ``−log q(S)``), which a renormalised q would leave free. With
    ``k = vocabulary size`` it equals :func:`distill_loss`. The reduction is the same as there: mean (or
    sum) over the attended tokens.

    Args:
        student_logits: ``[batch, seq, vocab]``.
        teacher_indices: ``[batch, seq, k]`` int64 token ids of the teacher's top k.
        teacher_logprobs: ``[batch, seq, k]`` their teacher log-probabilities at any temperature-1
            normalisation (a per-position constant cancels in the renormalisation).
        attention_mask: ``[batch, seq]`` (1 = attended) or None (every token counts).
        temperature: the distillation temperature T.
        reduction: ``"mean"`` over the attended tokens or their ``"sum"``.
    Returns:
        A scalar float32 tensor.
    Raises:
        LosaError: an unknown ``reduction``; indices and log-probabilities of different shapes.
    """
    _check_reduction(reduction)
    if teacher_indices.shape != teacher_logprobs.shape or teacher_indices.shape[:2] != student_logits.shape[:2]:
        raise LosaError(f"teacher top-k ids {list(teacher_indices.shape)} and log-probabilities "
                        f"{list(teacher_logprobs.shape)} must both be [batch, seq, k] with the student's "
                        f"[batch, seq] = {list(student_logits.shape[:2])}; recompute the teacher cache")
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, teacher_indices.long())  # [b, seq, k]
    log_p = F.log_softmax(teacher_logprobs.float() / t, dim=-1)  # renormalised over the k ids
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [b, seq]
    return _reduce(kl, attention_mask, t, reduction)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise LosaError(f"unknown distillation loss reduction {reduction!r}; use 'mean' or 'sum'")


def _reduce(kl: torch.Tensor, attention_mask: torch.Tensor | None, t: float, reduction: str) -> torch.Tensor:
    """``T²`` × the sum or the mean of the per-token ``kl`` ``[b, seq]`` over the attended tokens."""
    if attention_mask is not None:
        w = attention_mask.to(kl.dtype)
        total, count = (kl * w).sum(), w.sum().clamp(min=1)
    else:
        total, count = kl.sum(), kl.new_tensor(float(kl.numel()))
    return total * (t * t) if reduction == "sum" else total / count * (t * t)


def _unused_parameters_possible(model: nn.Module) -> bool:
    """Whether a forward of ``model`` may leave trainable parameters without a gradient, which data-parallel
    training must be told (else it is told for nothing, and warns on every rank): an adapter at rank 0 (its
    forward skips it), or routed experts (an expert no token of the batch reaches is skipped)."""
    from losa.lora.layer import SparseLoRALinear
    from losa.models.experts import UnfusedExperts

    return any((isinstance(m, SparseLoRALinear) and not m.merged and m.rank == 0 and m.lora_A.requires_grad)
               or (isinstance(m, UnfusedExperts) and any(p.requires_grad for p in m.parameters()))
               for m in model.modules())


class _LosaTrainer(Trainer):
    """Trainer with the distillation loss and a non-finite-loss stop.

    Both losses are per-token means over the whole accumulated batch (all micro-batches of one
    optimizer step), as the transformers Trainer normalises its label loss with
    ``num_items_in_batch``: the label loss is left to the Trainer/model; the distillation loss divides
    its per-token KL sum by the number of attended tokens of the accumulated batch, counted in
    :meth:`get_batch_samples`, so ``batch b × accumulation k`` trains and logs like ``batch b·k``.
    """

    def __init__(self, *args: Any, teacher: nn.Module | None = None, cached_teacher: bool = False,
                 temperature: float = 1.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.teacher = teacher
        self.cached_teacher = cached_teacher  # the batches carry teacher_indices / teacher_logprobs
        self.distill = cached_teacher or teacher is not None
        self.temperature = temperature

    @property
    def loss_is_scaled_for_ga(self) -> bool | None:  # type: ignore[override]
        """The distillation loss is normalised over the accumulated batch; the label loss: Trainer's rule."""
        return True if self.distill else None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step and the number of loss items they hold together.

        For distillation the items are the attended tokens (every attended position is a KL term),
        summed over processes when the Trainer averages tokens across devices.
        """
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.distill:
            num_items = _distill_items(batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                num_items = self.accelerator.gather(num_items).sum()
        return batch_samples, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.distill:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
        else:
            fwd = {k: v for k, v in inputs.items() if k not in ("labels", *TEACHER_KEYS)}
            mask = inputs.get("attention_mask")
            if self.cached_teacher:
                def kd(student_logits: torch.Tensor, reduction: str) -> torch.Tensor:
                    return topk_distill_loss(student_logits, inputs["teacher_indices"], inputs["teacher_logprobs"],
                                             mask, self.temperature, reduction)
            else:
                device = fwd["input_ids"].device
                if next(self.teacher.parameters()).device != device:
                    self.teacher.to(device)
                with torch.no_grad():
                    t_logits = self.teacher(**fwd).logits

                def kd(student_logits: torch.Tensor, reduction: str) -> torch.Tensor:
                    return distill_loss(student_logits, t_logits, mask, self.temperature, reduction)
            outputs = model(**fwd)
            if num_items_in_batch is None or not model.training:  # evaluation: this batch's own mean
                loss = kd(outputs.logits, "mean")
            else:
                loss = kd(outputs.logits, "sum") / num_items_in_batch
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    loss = loss * self.accelerator.num_processes  # DDP averages the gradients over processes
            out = (loss, outputs) if return_outputs else loss
        if not torch.isfinite(loss.detach()).all():
            raise LosaError(f"fine-tuning loss became {loss.item()} at step {self.state.global_step}; lower the "
                            "learning rate, use float32/bf16 instead of float16, or check the data")
        return out


def _distill_items(batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Number of KL terms in ``batches``: attended tokens (all tokens without an attention mask)."""
    n = sum(int(b["attention_mask"].sum()) if b.get("attention_mask") is not None else b["input_ids"].numel()
            for b in batches)
    return torch.tensor(n)


class _LossRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kw):  # noqa: D102
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class _ProgressBar(TrainerCallback):
    """One labelled bar over the optimiser steps with the last loss beside it (the Trainer's own bar has no label
    and prints every step's log dict on stdout); drawn by the main process only."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kw):  # noqa: D102
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kw):  # noqa: D102
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):  # noqa: D102
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    def on_train_end(self, args, state, control, **kw):  # noqa: D102
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing on or off, through transformers' current API when it has one."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def finetune(model: nn.Module, examples: Sequence[dict[str, Any]], config: FinetuneConfig, pad_id: int,
             teacher: nn.Module | None = None, optimizer_state: dict | None = None,
             progress: bool = True, teacher_cache: TeacherTopK | None = None,
             desc: str = "fine-tuning") -> dict[str, Any]:
    """Train the trainable parameters of ``model`` on tokenized ``examples`` with transformers' Trainer.

    The loss of each optimizer step is the per-token mean over all its micro-batches (label loss over
    the target tokens, distillation loss over the attended tokens), so gradients and logged losses do
    not depend on how ``batch_size × grad_accum`` is split.

    Args:
        model: a causal LM whose trainable parameters are the adapters.
        examples: ``{"input_ids", "labels"}`` dicts (see :func:`losa.finetune.data.tokenize_records`);
            with a ``teacher_cache`` each also carries its ``"teacher_index"`` into the cache.
        config: the fine-tuning hyper-parameters.
        pad_id: padding token id for the collator.
        teacher: the dense model for ``config.distill`` with ``teacher_topk = 0``.
        optimizer_state: an AdamW state dict to resume from.
        progress: show a progress bar over the optimiser steps, labelled ``desc``, with the last loss; False:
            none (the losses are still recorded and returned; warnings and errors still go to the log). The
            Trainer's per-step log dicts are never printed.
        teacher_cache: the dense model's cached top-k distributions for ``config.distill`` with
            ``teacher_topk = k > 0`` (:meth:`losa.finetune.teacher.TeacherTopK.compute`).
        desc: the progress bar's label.
    Returns:
        ``losses`` (one per optimizer step), ``steps``, ``train_loss``, ``tokens`` and ``optimizer_state``.
    Raises:
        LosaError: no examples; no trainable parameters; distillation without a teacher (or without the
            teacher cache, or a cache of another k, or examples without their cache index); bf16 on a
            GPU without it; --fsdp without GPUs; --deepspeed without the package; a non-finite loss.
    """
    if not examples:
        raise LosaError("no fine-tuning examples for this step; add data or lower the number of steps")
    if not any(p.requires_grad for p in model.parameters()):
        raise LosaError("model has no trainable parameters; attach adapters with losa.lora.add_sparse_lora first")
    cached = config.distill and config.teacher_topk > 0
    if config.distill and not cached and teacher is None:
        raise LosaError("distill=True needs the dense teacher model")
    if cached:
        if teacher_cache is None:
            raise LosaError("distill with teacher_topk > 0 needs the cached teacher targets; pass teacher_cache= "
                            "(losa.finetune.teacher.TeacherTopK.compute) or set teacher_topk 0")
        if teacher_cache.k != config.teacher_topk:
            raise LosaError(f"the teacher cache {teacher_cache.path} holds the top {teacher_cache.k}, the config asks "
                            f"for teacher_topk {config.teacher_topk}; recompute the cache or use the same k")
        if any("teacher_index" not in e for e in examples):
            raise LosaError("with a teacher cache every example needs its 'teacher_index' into the cache; number "
                            "the examples the cache was computed on")
    check_environment(config)
    use_cuda = torch.cuda.is_available()
    bf16 = bf16_available() if config.bf16 is None else config.bf16
    if config.gradient_checkpointing:
        _checkpointing(model, True)
    recorder = _LossRecorder()
    with tempfile.TemporaryDirectory(prefix="losa-ft-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, learning_rate=config.lr, num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
            weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
            lr_scheduler_type=config.lr_scheduler, optim="adamw_torch", max_grad_norm=config.max_grad_norm,
            logging_steps=1, save_strategy="no", report_to="none", remove_unused_columns=False,
            seed=config.seed, data_seed=config.seed, bf16=bf16, use_cpu=not use_cuda, disable_tqdm=True,
            dataloader_num_workers=0, ddp_find_unused_parameters=world_size() > 1 and _unused_parameters_possible(model),
            fsdp=config.fsdp, fsdp_config=config.fsdp_config, deepspeed=config.deepspeed,
        )
        trainer = _LosaTrainer(model=model, args=args, train_dataset=list(examples),
                               data_collator=Collator(pad_id, teacher_cache if cached else None),
                               callbacks=[recorder, *([_ProgressBar(desc)] if progress else [])],
                               teacher=None if cached or not config.distill else teacher,
                               cached_teacher=cached, temperature=config.temperature)
        trainer.remove_callback(PrinterCallback)  # without its bar (disable_tqdm) it prints each step's log dict
        if optimizer_state is not None:
            trainer.create_optimizer()
            trainer.optimizer.load_state_dict(optimizer_state)
        was_training = model.training
        try:
            result = trainer.train()
        finally:
            if config.gradient_checkpointing:
                _checkpointing(model, False)
            model.train(was_training)
        opt_state = trainer.optimizer.state_dict() if trainer.optimizer is not None else {}
    tokens = sum(len(e["input_ids"]) for e in examples) * config.epochs
    return {"losses": recorder.losses, "steps": int(result.global_step), "train_loss": float(result.training_loss),
            "tokens": int(tokens), "optimizer_state": opt_state}

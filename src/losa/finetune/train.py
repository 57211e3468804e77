"""Adapter fine-tuning with transformers' ``Trainer`` (so accelerate/FSDP/DeepSpeed work unchanged).

Only parameters with ``requires_grad`` (the LoRA A/B matrices) are optimised, with AdamW (lr 2e-4 by
default, as in the paper). ``distill=True`` replaces the label loss by the temperature-scaled KL
divergence from a dense teacher's next-token distribution on every attended token; it needs no labels.
A non-finite loss stops training with a :class:`LosaError`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from losa.errors import LosaError
from losa.finetune.config import FinetuneConfig
from losa.finetune.data import Collator
from losa.utils.dist import world_size


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor | None,
                 temperature: float = 1.0) -> torch.Tensor:
    """Mean over attended tokens of ``T² · KL(p_teacher ‖ p_student)`` at temperature T."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1)  # [b, seq]
    if attention_mask is not None:
        w = attention_mask.to(kl.dtype)
        return (kl * w).sum() / w.sum().clamp(min=1) * t * t
    return kl.mean() * t * t


class _LosaTrainer(Trainer):
    def __init__(self, *args: Any, teacher: nn.Module | None = None, temperature: float = 1.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.teacher = teacher
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
        else:
            fwd = {k: v for k, v in inputs.items() if k != "labels"}
            device = fwd["input_ids"].device
            if next(self.teacher.parameters()).device != device:
                self.teacher.to(device)
            with torch.no_grad():
                t_logits = self.teacher(**fwd).logits
            outputs = model(**fwd)
            loss = distill_loss(outputs.logits, t_logits, inputs.get("attention_mask"), self.temperature)
            out = (loss, outputs) if return_outputs else loss
        if not torch.isfinite(loss.detach()).all():
            raise LosaError(f"fine-tuning loss became {loss.item()} at step {self.state.global_step}; lower the "
                            "learning rate, use float32/bf16 instead of float16, or check the data")
        return out


class _LossRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kw):  # noqa: D102
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def finetune(model: nn.Module, examples: Sequence[dict[str, list[int]]], config: FinetuneConfig, pad_id: int,
             teacher: nn.Module | None = None, optimizer_state: dict | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Train the trainable parameters of ``model`` on tokenized ``examples``; returns the per-step losses,
    the number of optimizer steps, tokens seen and the optimizer's final state dict."""
    if not examples:
        raise LosaError("no fine-tuning examples for this step; add data or lower the number of steps")
    if not any(p.requires_grad for p in model.parameters()):
        raise LosaError("model has no trainable parameters; attach adapters with losa.lora.add_sparse_lora first")
    if config.distill and teacher is None:
        raise LosaError("distill=True needs the dense teacher model")
    use_cuda = torch.cuda.is_available()
    if config.fsdp and not use_cuda:
        raise LosaError("--fsdp needs GPUs: accelerate shards only across GPU processes, and on the CPU the Trainer "
                        "would silently fall back to plain data parallelism; drop --fsdp here")
    if config.deepspeed:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise LosaError("--deepspeed needs the deepspeed package: pip install deepspeed (on a CUDA machine)")
    bf16 = bf16_available() if config.bf16 is None else config.bf16
    if bf16 and not bf16_available() and use_cuda:
        raise LosaError("bf16 requested but this GPU does not support it; drop --bf16")
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    recorder = _LossRecorder()
    with tempfile.TemporaryDirectory(prefix="losa-ft-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, learning_rate=config.lr, num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
            weight_decay=config.weight_decay, warmup_steps=config.warmup_steps,
            lr_scheduler_type=config.lr_scheduler, optim="adamw_torch", max_grad_norm=config.max_grad_norm,
            logging_steps=1, save_strategy="no", report_to="none", remove_unused_columns=False,
            seed=config.seed, data_seed=config.seed, bf16=bf16, use_cpu=not use_cuda, disable_tqdm=not progress,
            dataloader_num_workers=0, ddp_find_unused_parameters=world_size() > 1 or None,
            fsdp=config.fsdp, fsdp_config=config.fsdp_config, deepspeed=config.deepspeed,
        )
        trainer = _LosaTrainer(model=model, args=args, train_dataset=list(examples), data_collator=Collator(pad_id),
                               callbacks=[recorder], teacher=teacher, temperature=config.temperature)
        if optimizer_state is not None:
            trainer.create_optimizer()
            trainer.optimizer.load_state_dict(optimizer_state)
        was_training = model.training
        try:
            result = trainer.train()
        finally:
            if config.gradient_checkpointing:
                model.gradient_checkpointing_disable()
            model.train(was_training)
        opt_state = trainer.optimizer.state_dict() if trainer.optimizer is not None else {}
    tokens = sum(len(e["input_ids"]) for e in examples) * config.epochs
    return {"losses": recorder.losses, "steps": int(result.global_step), "train_loss": float(result.training_loss),
            "tokens": int(tokens), "optimizer_state": opt_state}

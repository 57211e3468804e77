"""FinetuneConfig: the adapter fine-tuning hyper-parameters (kept apart from the Trainer code so that
importing a recipe does not import transformers' Trainer)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from losa.errors import LosaError, option
from losa.utils.config import LosaConfig

#: transformers schedules that need what losa does not pass (an eval strategy or ``lr_scheduler_kwargs``)
_SCHEDULERS_NEEDING_MORE = ("reduce_lr_on_plateau", "greedy", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                            "warmup_stable_decay")


def lr_schedulers() -> list[str]:
    """The ``lr_scheduler`` names losa can use: transformers' ``SchedulerType`` values that need no more
    arguments than a warm-up and the number of training steps."""
    from transformers.trainer_utils import SchedulerType

    return [s.value for s in SchedulerType if s.value not in _SCHEDULERS_NEEDING_MORE]


class FinetuneConfig(LosaConfig):
    """Hyper-parameters of the adapter fine-tuning (transformers Trainer, AdamW)."""

    lr: float = Field(2e-4, gt=0, description="AdamW learning rate")
    epochs: float = Field(1.0, gt=0, description="passes over each step's data slice")
    batch_size: int = Field(4, ge=1, description="examples per device and optimizer micro-step")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    prompt_format: Literal["auto", "alpaca", "chat", "plain"] = Field(
        "auto", description="how instruction records become text: the Alpaca template, the tokenizer's chat "
                            "template (user turn, assistant turn), plain (instruction, input and output joined), "
                            "or auto (chat when the tokenizer has a chat template, else alpaca); the loss is on the "
                            "response only")
    max_length: int = Field(256, ge=8, description="longest example in tokens (longer ones are cut)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="learning-rate warm-up steps")
    lr_scheduler: str = Field("linear", description="transformers learning-rate schedule: linear, cosine, "
                                                    "cosine_with_restarts, polynomial, constant, "
                                                    "constant_with_warmup or inverse_sqrt")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less memory)")
    bf16: bool | None = Field(None, description="bf16 autocast (default: when CUDA supports it)")
    distill: bool = Field(False, description="train on the KL divergence to the dense model's next-token "
                                             "distribution (no labels needed)")
    temperature: float = Field(1.0, gt=0, description="distillation temperature")
    teacher_topk: int = Field(0, ge=0, description="distillation from a cache of the dense model's top-k next-token "
                                                   "distributions, computed once before pruning and stored in the "
                                                   "run directory (no second model in memory; about 8·k bytes per "
                                                   "token on disk); 0 keeps a full dense copy as the teacher")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0: no clipping)")
    seed: int = Field(0, description="fine-tuning seed (data order, adapter dropout)")
    fsdp: str = Field("", description="sharded data-parallel training, passed to the transformers Trainer "
                                      "(e.g. 'full_shard auto_wrap'; run under torchrun / accelerate launch)")
    fsdp_config: str | None = Field(None, description="JSON file of FSDP options for the Trainer (e.g. "
                                                      "transformer_layer_cls_to_wrap)")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON config for the Trainer (ZeRO-2/3; needs the "
                                                    "deepspeed package)")

    @field_validator("lr_scheduler")
    @classmethod
    def _lr_scheduler(cls, v: str) -> str:
        names = lr_schedulers()
        if v not in names:
            why = ("needs an eval strategy or scheduler arguments that losa does not pass"
                   if v in _SCHEDULERS_NEEDING_MORE else "is not a transformers learning-rate schedule")
            raise ValueError(f"lr_scheduler {v!r} {why}; choose one of {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _teacher_topk(self) -> FinetuneConfig:
        if self.teacher_topk > 0 and not self.distill:
            raise ValueError(f"teacher_topk {self.teacher_topk} only applies to distillation; add "
                             f"{option('distill=True', '--distill')} or drop {option('teacher_topk')}")
        if self.fsdp_config is not None:
            flag = option("fsdp_config")
            if not self.fsdp:
                raise ValueError(f"{flag} has no effect without {option('fsdp')}: the FSDP options configure FSDP; add "
                                 f"{option('fsdp')} 'full_shard auto_wrap' or drop {flag}")
            if not Path(self.fsdp_config).is_file():
                raise ValueError(f"{flag} {self.fsdp_config}: no such file; give the JSON file of FSDP options")
        return self


def check_environment(config: FinetuneConfig) -> None:
    """Fail at once when this machine cannot fine-tune with ``config`` (cheap: no model, no data), so a
    run stops before its calibration and pruning rather than at its first fine-tune.

    Raises:
        LosaError: ``fsdp`` without GPUs; ``deepspeed`` without the package; ``bf16`` on a GPU without it.
    """
    import importlib.util

    import torch

    use_cuda = torch.cuda.is_available()
    if config.fsdp and not use_cuda:
        raise LosaError(f"{option('fsdp')} needs GPUs: accelerate shards only across GPU processes, and on the "
                        "CPU the Trainer would silently fall back to plain data parallelism; drop "
                        f"{option('fsdp')} here")
    if config.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise LosaError(f"{option('deepspeed')} needs the deepspeed package: pip install deepspeed (on a CUDA "
                        "machine)")
    if config.bf16 and use_cuda and not torch.cuda.is_bf16_supported():
        raise LosaError(f"bf16 requested but this GPU does not support it; drop {option('bf16=True', '--bf16')}")

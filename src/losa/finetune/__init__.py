"""Adapter fine-tuning: instruction / plain-text data and a transformers-Trainer loop.

The Trainer-based loop (``finetune``, ``distill_loss``) is imported on first use: transformers'
Trainer pulls in PEFT and more (about 100 MB), which pruning alone never needs.
"""

from losa.finetune.config import FinetuneConfig
from losa.finetune.data import (
    Collator,
    format_record,
    load_records,
    resolve_prompt_format,
    split_for_steps,
    tokenize_records,
)
from losa.utils.lazy import lazy_attributes

__all__ = ["Collator", "FinetuneConfig", "TeacherTopK", "distill_loss", "finetune", "format_record",
           "load_records", "resolve_prompt_format", "split_for_steps", "tokenize_records", "topk_distill_loss"]


__getattr__, __dir__ = lazy_attributes(__name__, {"finetune": "losa.finetune.train",
                                                  "distill_loss": "losa.finetune.train",
                                                  "topk_distill_loss": "losa.finetune.train",
                                                  "TeacherTopK": "losa.finetune.teacher"})

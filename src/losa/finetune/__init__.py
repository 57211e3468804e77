"""Adapter fine-tuning: instruction / plain-text data and a transformers-Trainer loop.

The Trainer-based loop (``finetune``, ``distill_loss``) is imported on first use: transformers'
Trainer pulls in PEFT and more (about 100 MB), which pruning alone never needs.
"""

from typing import Any

from losa.finetune.config import FinetuneConfig
from losa.finetune.data import Collator, format_record, load_records, split_for_steps, tokenize_records

__all__ = ["Collator", "FinetuneConfig", "distill_loss", "finetune", "format_record", "load_records",
           "split_for_steps", "tokenize_records"]


def __getattr__(name: str) -> Any:
    if name in ("finetune", "distill_loss"):
        from losa.finetune import train

        return getattr(train, name)
    raise AttributeError(f"module 'losa.finetune' has no attribute {name!r}")

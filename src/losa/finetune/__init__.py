"""Adapter fine-tuning: instruction / plain-text data and a transformers-Trainer loop."""

from losa.finetune.data import Collator, format_record, load_records, split_for_steps, tokenize_records
from losa.finetune.train import FinetuneConfig, distill_loss, finetune

__all__ = ["Collator", "FinetuneConfig", "distill_loss", "finetune", "format_record", "load_records",
           "split_for_steps", "tokenize_records"]

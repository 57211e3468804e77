"""Fine-tuning data: Alpaca-format instructions (loss on the response only) or plain text.

Sources: a local ``.json`` (array) / ``.jsonl`` file, a directory of them, or (only when no such
path exists) a Hugging Face hub dataset name. A record with ``instruction`` (and optional ``input``)
and ``output`` is an instruction example; a record with ``text`` is plain text (loss on all tokens).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from losa.errors import LosaError

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE = -100


def _read_file(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LosaError(f"{path} is not valid JSON/JSONL ({e.msg} at line {e.lineno}); fix the file") from None
    if isinstance(data, dict):
        data = data.get("data", data.get("train"))
    if not isinstance(data, list):
        raise LosaError(f"{path} must hold a JSON array of records (or {{'data': [...]}}); fix the file")
    return data


def load_records(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Records from a local file/directory, else from the HF hub (``datasets.load_dataset``)."""
    p = Path(source).expanduser()
    if p.is_file():
        return _read_file(p)
    if p.is_dir():
        files = sorted([*p.glob("*.json"), *p.glob("*.jsonl")])
        if not files:
            raise LosaError(f"no .json/.jsonl files in {p}; point --finetune-data at a file or directory of them")
        return [r for f in files for r in _read_file(f)]
    if p.suffix in (".json", ".jsonl") or "/" not in str(source):
        raise LosaError(f"fine-tuning data {source} not found; give a .json/.jsonl path or a hub dataset 'org/name'")
    try:
        import datasets

        return list(datasets.load_dataset(str(source), split=split))
    except Exception as e:  # noqa: BLE001 - any hub/network failure is the user's to fix
        raise LosaError(f"could not load hub dataset {source!r} ({type(e).__name__}); "
                        "use a local .json/.jsonl file when offline") from None


def format_record(rec: dict[str, Any]) -> tuple[str, str]:
    """(prompt, response): the loss is taken on ``response`` only; plain text has an empty prompt."""
    if "instruction" in rec and "output" in rec:
        inp = str(rec.get("input") or "").strip()
        tmpl = PROMPT_WITH_INPUT if inp else PROMPT_NO_INPUT
        return tmpl.format(instruction=str(rec["instruction"]).strip(), input=inp), str(rec["output"])
    if "text" in rec:
        return "", str(rec["text"])
    raise LosaError(f"record with keys {sorted(rec)} is neither Alpaca (instruction/input/output) nor plain text "
                    "(text); convert the data to one of these formats")


def tokenize_records(records: Sequence[dict[str, Any]], tokenizer, max_length: int = 512) -> list[dict[str, list[int]]]:
    """Token ids and labels per record; prompt tokens are labelled -100. Empty responses are dropped."""
    eos = tokenizer.eos_token_id
    out = []
    for rec in records:
        prompt, response = format_record(rec)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (bos + p_ids + r_ids)[:max_length]
        labels = ([IGNORE] * (len(bos) + len(p_ids)) + r_ids)[:max_length]
        if any(lab != IGNORE for lab in labels[1:]):
            out.append({"input_ids": ids, "labels": labels})
    return out


def split_for_steps(examples: Sequence[Any], steps: int, seed: int = 0, min_per_step: int = 1) -> list[list[Any]]:
    """Shuffle once (seeded) and cut into ``steps`` contiguous slices of near-equal size."""
    if steps < 1:
        raise LosaError(f"number of steps must be ≥ 1, got {steps}")
    if len(examples) < steps * min_per_step:
        raise LosaError(f"fine-tuning set has {len(examples)} usable examples, too few for {steps} steps × "
                        f"{min_per_step} per step; add data or lower steps/batch size")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    bounds = [round(i * len(order) / steps) for i in range(steps + 1)]
    return [[examples[j] for j in order[bounds[i]:bounds[i + 1]]] for i in range(steps)]


class Collator:
    """Right-pads ``input_ids`` (pad id) and ``labels`` (-100); builds the attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        attn = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            attn[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}

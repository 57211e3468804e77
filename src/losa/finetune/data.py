"""Fine-tuning data: instruction examples (loss on the response only) or plain text.

Sources: a local ``.json`` (array) / ``.jsonl`` file, a directory of them, or (only when no such
path exists) a Hugging Face hub dataset name. A record with ``instruction`` (and optional ``input``)
and ``output`` is an instruction example; a record with ``text`` is plain text (loss on all tokens).

Instruction examples are rendered in one of three prompt formats (``FinetuneConfig.prompt_format``):

- ``alpaca``: the Alpaca template (Taori et al., 2023), BOS + prompt + response + EOS;
- ``chat``: the tokenizer's chat template (``tokenizer.apply_chat_template``), instruction (and input)
  as the user turn and output as the assistant turn; the template supplies BOS and the end-of-turn
  tokens, which belong to the response;
- ``plain``: BOS + instruction, input and output joined by blank lines + EOS, no template;

``auto`` is ``chat`` when the tokenizer has a chat template, else ``alpaca``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from losa.errors import LosaError, option

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
PromptFormat = Literal["auto", "alpaca", "chat", "plain"]
PROMPT_FORMATS: tuple[str, ...] = ("auto", "alpaca", "chat", "plain")


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


def check_records_source(source: str | Path) -> list[Path] | None:
    """Check a fine-tuning data source without reading it, so that a wrong path fails before any work.

    Args:
        source: a ``.json``/``.jsonl`` file, a directory of them, or a hub dataset name ``org/name``.
    Returns:
        The local files to read, or None for a hub dataset (checked when it is loaded).
    Raises:
        LosaError: a directory without ``.json``/``.jsonl`` files; a path that does not exist and is not a hub
            dataset name ``org/name`` (a ``.json``/``.jsonl`` name, a name starting with ``/``, ``.`` or ``~``, or
            not exactly one ``/``).
    """
    p = Path(source).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted([*p.glob("*.json"), *p.glob("*.jsonl")])
        if not files:
            raise LosaError(f"no .json/.jsonl files in {p}; point {option('finetune_data')} at a file or directory "
                            "of them")
        return files
    text = str(source)
    local = text.startswith(("/", ".", "~")) or text.count("/") != 1  # a hub dataset is exactly 'org/name'
    if p.suffix in (".json", ".jsonl") or local:
        raise LosaError(f"fine-tuning data {source} not found; give a .json/.jsonl path or a hub dataset 'org/name'")
    return None


def load_records(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Records from a local file/directory, else from the HF hub (``datasets.load_dataset``).

    Args:
        source: a ``.json``/``.jsonl`` file (an array, or ``{"data": [...]}``), a directory of them, or a hub
            dataset name ``org/name`` (used only when no such local path exists).
        split: the hub dataset's split.
    Returns:
        The records (dicts) in file order.
    Raises:
        LosaError: what :func:`check_records_source` raises; a file that is not valid JSON/JSONL or holds no
            array; a hub dataset that cannot be loaded.
    """
    files = check_records_source(source)
    if files is not None:
        return [r for f in files for r in _read_file(f)]
    try:
        import datasets

        return list(datasets.load_dataset(str(source), split=split))
    except Exception as e:  # noqa: BLE001 - any hub/network failure is the user's to fix
        raise LosaError(f"could not load hub dataset {source!r} ({type(e).__name__}); "
                        "use a local .json/.jsonl file when offline") from None


def resolve_prompt_format(prompt_format: str, tokenizer: Any = None) -> str:
    """The concrete format for ``prompt_format``: ``auto`` becomes ``chat`` or ``alpaca``.

    Args:
        prompt_format: ``auto``, ``alpaca``, ``chat`` or ``plain``.
        tokenizer: the tokenizer (its ``chat_template`` decides ``auto``; ``chat`` needs one).
    Returns:
        ``alpaca``, ``chat`` or ``plain``.
    Raises:
        LosaError: an unknown format, or ``chat`` with a tokenizer that has no chat template.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise LosaError(f"unknown prompt format {prompt_format!r}; use one of {', '.join(PROMPT_FORMATS)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "alpaca"
    if prompt_format == "chat" and not has_template:
        raise LosaError("prompt format 'chat' needs a tokenizer with a chat template, and this one has none; "
                        f"set {option('prompt_format')} to alpaca or plain")
    return prompt_format


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def format_record(rec: dict[str, Any], prompt_format: str = "alpaca", tokenizer: Any = None) -> tuple[str, str]:
    """Split a record into (prompt, response) text; the loss is taken on ``response`` only.

    Args:
        rec: an instruction record (``instruction``, optional ``input``, ``output``) or plain text
            (``text``; its prompt is empty in every format).
        prompt_format: ``alpaca``, ``chat``, ``plain`` or ``auto`` (see the module docstring).
        tokenizer: needed for ``chat`` and ``auto`` (its chat template renders the turns).
    Returns:
        ``(prompt, response)``. For ``chat`` the prompt is the rendered conversation up to the
        assistant's content (template tokens included) and the response is the rest, end-of-turn
        tokens included.
    Raises:
        LosaError: a record in neither format; an unknown format; ``chat`` without a chat template.
    """
    fmt = resolve_prompt_format(prompt_format, tokenizer)
    if "instruction" in rec and "output" in rec:
        instruction, output = str(rec["instruction"]).strip(), str(rec["output"])
        inp = str(rec.get("input") or "").strip()
        if fmt == "alpaca":
            tmpl = PROMPT_WITH_INPUT if inp else PROMPT_NO_INPUT
            return tmpl.format(instruction=instruction, input=inp), output
        user = f"{instruction}\n\n{inp}" if inp else instruction
        if fmt == "plain":
            return user + "\n\n", output
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template([{"role": "user", "content": user},
                                              {"role": "assistant", "content": output}], tokenize=False)
        # templates that render the final assistant turn differently from the generation prompt (e.g. with
        # an empty reasoning block) still share the conversation up to there: that part is the prompt
        cut = _common_prefix(prompt, full)
        return full[:cut], full[cut:]
    if "text" in rec:
        return "", str(rec["text"])
    raise LosaError(f"record with keys {sorted(rec)} is neither Alpaca (instruction/input/output) nor plain text "
                    "(text); convert the data to one of these formats")


def tokenize_records(records: Sequence[dict[str, Any]], tokenizer, max_length: int = 512,
                     prompt_format: str = "auto") -> list[dict[str, list[int]]]:
    """Token ids and labels per record; prompt tokens are labelled -100. Empty responses are dropped.

    Args:
        records: instruction or plain-text records (see :func:`format_record`).
        tokenizer: the model's tokenizer.
        max_length: longest example in tokens (longer ones are cut; ids and labels stay aligned).
        prompt_format: ``auto``, ``alpaca``, ``chat`` or ``plain`` (see the module docstring).
    Returns:
        One ``{"input_ids", "labels"}`` dict per record that keeps at least one target token.
    Raises:
        LosaError: a record in neither format; an unknown format; ``chat`` without a chat template.
    """
    fmt = resolve_prompt_format(prompt_format, tokenizer)
    eos = tokenizer.eos_token_id
    bos_id = getattr(tokenizer, "bos_token_id", None)
    out = []
    for rec in records:
        prompt, response = format_record(rec, fmt, tokenizer)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if fmt == "chat" and "text" not in rec:
            bos = []  # the template writes BOS and the end-of-turn tokens itself
        else:
            bos = [bos_id] if bos_id is not None else []
            r_ids = r_ids + ([eos] if eos is not None else [])
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


#: the batch keys of cached teacher targets (not model inputs)
TEACHER_KEYS = ("teacher_indices", "teacher_logprobs")


class Collator:
    """Right-pads ``input_ids`` (pad id) and ``labels`` (-100); builds the attention mask.

    With a teacher cache (:class:`losa.finetune.teacher.TeacherTopK`) every example carries its
    ``"teacher_index"`` and the batch also holds ``teacher_indices`` (int64) and ``teacher_logprobs``
    (float32), both ``[batch, seq, k]``, zero at padded positions.

    Args:
        pad_id: padding token id.
        teacher: the teacher cache, or None.
    """

    def __init__(self, pad_id: int, teacher: Any = None) -> None:
        self.pad_id = pad_id
        self.teacher = teacher

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Returns ``input_ids``, ``labels``, ``attention_mask`` ``[batch, seq]`` (and the teacher targets).

        Raises:
            LosaError: with a teacher cache, an example without ``teacher_index`` or whose cached length
                differs from its own (the cache belongs to other examples).
        """
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        attn = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            attn[i, :k] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": attn}
        if self.teacher is not None:
            t_ids = torch.zeros((len(batch), n, self.teacher.k), dtype=torch.long)
            t_lp = torch.zeros((len(batch), n, self.teacher.k), dtype=torch.float32)
            for i, b in enumerate(batch):
                if "teacher_index" not in b:
                    raise LosaError("an example has no 'teacher_index' into the teacher cache; number the examples "
                                    "the cache was computed on")
                top, lp = self.teacher.example(int(b["teacher_index"]))
                if top.shape[0] != len(b["input_ids"]):
                    raise LosaError(f"teacher cache entry {b['teacher_index']} covers {top.shape[0]} tokens but the "
                                    f"example has {len(b['input_ids'])}; the cache in {self.teacher.path} belongs to "
                                    "other examples: delete it and rerun")
                t_ids[i, :top.shape[0]], t_lp[i, :top.shape[0]] = top, lp
            out["teacher_indices"], out["teacher_logprobs"] = t_ids, t_lp
        return out

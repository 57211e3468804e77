"""Fine-tuning data formatting, response-only labels, Trainer loop, distillation, NaN handling."""

from __future__ import annotations

import json
import math

import pytest
import torch

from losa.errors import LosaError
from losa.finetune import (
    FinetuneConfig,
    distill_loss,
    finetune,
    format_record,
    load_records,
    split_for_steps,
    tokenize_records,
)
from losa.lora import SparseLoRAConfig, add_sparse_lora, sparse_lora_modules


class CharTokenizer:
    """A deterministic offline tokenizer for tiny models: one token per character."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}


def test_format_record():
    p, r = format_record({"instruction": "Add 2 and 3.", "input": "", "output": "5"})
    assert p.endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:\n") and "### Input" not in p and r == "5"
    p, r = format_record({"instruction": "Translate.", "input": "chat", "output": "cat"})
    assert "### Input:\nchat\n\n### Response:\n" in p
    assert format_record({"text": "hello"}) == ("", "hello")
    with pytest.raises(LosaError, match="neither Alpaca"):
        format_record({"question": "?"})


def test_labels_mask_prompt_tokens_exactly():
    tok = CharTokenizer()
    rec = {"instruction": "Hi", "input": "", "output": "yo"}
    (ex,) = tokenize_records([rec], tok, max_length=1000)
    prompt, _ = format_record(rec)
    n_prompt = 1 + len(prompt)  # bos + one token per char
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == [3 + ord("y") % 120, 3 + ord("o") % 120, 2]
    assert ex["input_ids"][n_prompt:] == ex["labels"][n_prompt:]
    (plain,) = tokenize_records([{"text": "abc"}], tok)
    assert plain["labels"] == [-100, 3 + ord("a") % 120, 3 + ord("b") % 120, 3 + ord("c") % 120, 2]
    # truncation to max_length keeps ids and labels aligned; a record whose response is cut off entirely is dropped
    assert tokenize_records([rec], tok, max_length=10) == []


def test_load_records_local_formats(tmp_path, data_dir):
    recs = load_records(data_dir / "alpaca" / "alpaca_en_demo.json")
    assert len(recs) == 999 and {"instruction", "input", "output"} <= set(recs[0])
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["a", "b"]) + "\n")
    assert [r["text"] for r in load_records(f)] == ["a", "b"]
    with pytest.raises(LosaError, match="not found"):
        load_records(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(LosaError, match="not valid JSON"):
        load_records(bad)


def test_split_for_steps():
    parts = split_for_steps(list(range(10)), 3, seed=1)
    assert [len(p) for p in parts] == [3, 4, 3]
    assert sorted(x for p in parts for x in p) == list(range(10))
    assert parts == split_for_steps(list(range(10)), 3, seed=1)
    with pytest.raises(LosaError, match="too few for 5 steps"):
        split_for_steps(list(range(8)), 5, min_per_step=2)


def test_distill_loss_hand_value():
    # two-class logits: teacher p = [0.5, 0.5], student q = softmax([log 3, 0]) = [0.75, 0.25]
    t = torch.zeros(1, 1, 2)
    s = torch.tensor([[[math.log(3.0), 0.0]]])
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(distill_loss(s, t, None)) == pytest.approx(kl, rel=1e-6)
    assert float(distill_loss(t, t, None)) == pytest.approx(0.0, abs=1e-7)
    # padded positions are ignored
    s2 = torch.cat([s, torch.full((1, 1, 2), 50.0) * torch.tensor([1.0, -1.0])], dim=1)
    assert float(distill_loss(s2, torch.zeros(1, 2, 2), torch.tensor([[1, 0]]))) == pytest.approx(kl, rel=1e-6)


def _data(n=16):
    tok = CharTokenizer()
    recs = [{"text": f"{i % 4} abcabcabcabc"} for i in range(n)]
    return tokenize_records(recs, tok, max_length=64)


def test_finetune_loss_decreases_and_only_adapters_change(tiny_model):
    model = tiny_model("llama", seed=0, layers=2)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_sparse_lora(model, SparseLoRAConfig(r_max=8, rank=8, alpha=16))
    res = finetune(model, _data(), FinetuneConfig(lr=5e-3, epochs=4, batch_size=4), pad_id=0)
    assert res["steps"] == 16 and len(res["losses"]) == 16
    assert sum(res["losses"][-4:]) / 4 < 0.9 * sum(res["losses"][:4]) / 4
    assert res["optimizer_state"]["state"]  # AdamW moments exist
    for q, m in sparse_lora_modules(model).items():
        assert torch.equal(m.base.weight, base[q + ".weight"])
        assert m.lora_B.abs().sum() > 0


def test_finetune_distill_reduces_kl(tiny_model):
    teacher = tiny_model("llama", seed=0, layers=2)
    student = tiny_model("llama", seed=0, layers=2)
    with torch.no_grad():  # perturb the student so there is something to recover
        for p in student.model.layers.parameters():
            p.mul_(0.5)
    add_sparse_lora(student, SparseLoRAConfig(r_max=8, rank=8, alpha=16))
    data = _data(8)
    ids = torch.tensor([data[0]["input_ids"]])

    def kl():
        with torch.no_grad():
            return float(distill_loss(student(ids).logits, teacher(ids).logits, None))

    before = kl()
    finetune(student, data, FinetuneConfig(lr=5e-3, epochs=4, batch_size=4, distill=True), pad_id=0, teacher=teacher)
    assert kl() < 0.7 * before


def test_finetune_nan_raises(tiny_model):
    model = tiny_model("llama", seed=0, layers=1)
    mods = add_sparse_lora(model, SparseLoRAConfig(r_max=4, rank=4))
    with torch.no_grad():
        next(iter(mods.values())).lora_B.fill_(float("nan"))
    with pytest.raises(LosaError, match="loss became nan"):
        finetune(model, _data(4), FinetuneConfig(batch_size=2), pad_id=0)


def test_finetune_errors(tiny_model):
    model = tiny_model("llama", seed=0, layers=1).requires_grad_(False)
    with pytest.raises(LosaError, match="no trainable parameters"):
        finetune(model, _data(4), FinetuneConfig(), pad_id=0)
    with pytest.raises(LosaError, match="no fine-tuning examples"):
        finetune(model, [], FinetuneConfig(), pad_id=0)

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


def _ragged_examples(n=8, seed=0):
    """Examples of different lengths and different numbers of target tokens (prompt prefixes labelled -100),
    so that a per-token mean over the whole batch differs from a mean of per-micro-batch means."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        n_prompt = 1 + (i * 5) % (length - 2)
        out.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return out


def _reference_loss(student, teacher, examples, distill: bool, temperature: float = 1.0) -> torch.Tensor:
    """Per-token mean over ALL examples, written with plain torch (no losa, no Trainer)."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), n, dtype=torch.long)
    labels = torch.full((len(examples), n), -100)
    attn = torch.zeros(len(examples), n, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k], labels[i, :k], attn[i, :k] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    logits = student(input_ids=ids, attention_mask=attn).logits.float()
    if not distill:  # next-token cross-entropy over every labelled target token of the batch
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attn).logits.float()
    p = torch.softmax(t_logits / temperature, -1)
    kl = (p * (p.log() - torch.log_softmax(logits / temperature, -1))).sum(-1)
    return (kl * attn).sum() / attn.sum() * temperature**2


def _one_step(monkeypatch, distill: bool, batch_size: int, grad_accum: int, examples):
    """Run finetune for exactly one optimizer step; return (gradients before the step, logged loss)."""
    from losa.finetune import train as train_mod

    grads: list[dict[str, torch.Tensor]] = []

    class GradRecorder(train_mod._LossRecorder):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    monkeypatch.setattr(train_mod, "_LossRecorder", GradRecorder)
    student, teacher = _student_teacher()
    cfg = FinetuneConfig(lr=1e-3, epochs=1, batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=0.0,
                         distill=distill, temperature=2.0)
    res = finetune(student, examples, cfg, pad_id=0, teacher=teacher if distill else None)
    assert res["steps"] == 1 and len(grads) == 1 and len(res["losses"]) == 1
    return grads[0], res["losses"][0]


def _student_teacher():
    from conftest import make_tiny_model

    teacher = make_tiny_model("llama", seed=0, layers=2)
    student = make_tiny_model("llama", seed=1, layers=2)
    add_sparse_lora(student, SparseLoRAConfig(r_max=4, rank=4, alpha=8))
    with torch.no_grad():  # non-zero B so that A gets a gradient too
        g = torch.Generator().manual_seed(5)
        for m in sparse_lora_modules(student).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return student, teacher


@pytest.mark.parametrize("distill", [False, True], ids=["labels", "distill"])
def test_grad_accumulation_matches_one_big_batch(monkeypatch, distill):
    examples = _ragged_examples(8)
    # independent expectation: the per-token mean over all 8 examples and its gradient, by plain autograd
    student, teacher = _student_teacher()
    student.train()
    ref_loss = _reference_loss(student, teacher, examples, distill, temperature=2.0)
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    ref_grads = dict(zip(params, torch.autograd.grad(ref_loss, list(params.values()))))

    g8, loss8 = _one_step(monkeypatch, distill, batch_size=8, grad_accum=1, examples=examples)
    g4, loss4 = _one_step(monkeypatch, distill, batch_size=4, grad_accum=2, examples=examples)
    g2, loss2 = _one_step(monkeypatch, distill, batch_size=2, grad_accum=4, examples=examples)
    for got_loss in (loss8, loss4, loss2):
        assert got_loss == pytest.approx(ref_loss.item(), rel=1e-4)
    assert set(g8) == set(g4) == set(g2) == set(ref_grads)
    for n, ref in ref_grads.items():
        assert ref.abs().sum() > 0
        for got in (g8, g4, g2):
            torch.testing.assert_close(got[n], ref, rtol=1e-4, atol=1e-7)


# A small Jinja chat template over the word-level tiny tokenizer: "wordN" has id N + 4, <s>=1, </s>=2.
# word100 (id 104) opens a user turn, word101 (id 105) an assistant turn, </s> ends a turn.
TINY_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}word100{% else %}word101"
                      "{% endif %} {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}word101 "
                      "{% endif %}")
REC_INPUT = {"instruction": "word10 word11", "input": "word12", "output": "word13 word14"}
REC_NO_INPUT = {"instruction": "word10 word11", "input": "", "output": "word13 word14"}
REC_TEXT = {"text": "word20 word21"}
RESPONSE = [17, 18, 2]  # word13 word14 </s>
UNK = 3  # every word of the Alpaca template is unknown to the tiny tokenizer


def _tiny_tok(chat: bool):
    from conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    if chat:
        tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def _one(rec, tok, fmt):
    (ex,) = tokenize_records([rec], tok, max_length=1000, prompt_format=fmt)
    assert len(ex["input_ids"]) == len(ex["labels"])
    return ex["input_ids"], ex["labels"]


def test_prompt_format_chat_masks_the_user_turn():
    tok = _tiny_tok(chat=True)
    # <s> word100 word10 word11 \n\n word12 </s> word101 | word13 word14 </s>
    prompt = [1, 104, 14, 15, 16, 2, 105]
    for fmt in ("chat", "auto"):  # auto = chat when the tokenizer has a chat template
        ids, labels = _one(REC_INPUT, tok, fmt)
        assert ids == prompt + RESPONSE
        assert labels == [-100] * len(prompt) + RESPONSE
    ids, labels = _one(REC_NO_INPUT, tok, "chat")
    assert ids == [1, 104, 14, 15, 2, 105] + RESPONSE and labels == [-100] * 6 + RESPONSE
    # plain-text records train on all tokens, whatever the format
    assert _one(REC_TEXT, tok, "chat") == ([1, 24, 25, 2], [-100, 24, 25, 2])


def test_prompt_format_alpaca_and_plain_by_hand():
    for tok in (_tiny_tok(chat=False), _tiny_tok(chat=True)):
        # "Below is an instruction that describes a task. Write a response that appropriately completes the
        # request." = 16 words, "### Instruction:" = 2, then word10 word11, then "### Response:" = 2
        prompt = [1] + [UNK] * 18 + [14, 15] + [UNK] * 2
        ids, labels = _one(REC_NO_INPUT, tok, "alpaca")
        assert ids == prompt + RESPONSE and labels == [-100] * len(prompt) + RESPONSE
        # "Below is an instruction that describes a task, paired with an input that provides further context.
        # Write a response that appropriately completes the request." = 24 words, "### Instruction:",
        # word10 word11, "### Input:", word12, "### Response:"
        prompt = [1] + [UNK] * 26 + [14, 15] + [UNK] * 2 + [16] + [UNK] * 2
        ids, labels = _one(REC_INPUT, tok, "alpaca")
        assert ids == prompt + RESPONSE and labels == [-100] * len(prompt) + RESPONSE
        # plain: instruction, input and output joined, no template; still response-only
        ids, labels = _one(REC_INPUT, tok, "plain")
        assert ids == [1, 14, 15, 16] + RESPONSE and labels == [-100] * 4 + RESPONSE
        for fmt in ("alpaca", "plain"):
            assert _one(REC_TEXT, tok, fmt) == ([1, 24, 25, 2], [-100, 24, 25, 2])
    # auto without a chat template = alpaca
    tok = _tiny_tok(chat=False)
    assert _one(REC_INPUT, tok, "auto") == _one(REC_INPUT, tok, "alpaca")
    with pytest.raises(LosaError, match=r"needs a tokenizer with a chat template.*set prompt_format \(--prompt-format\) "
                                        "to alpaca"):
        tokenize_records([REC_INPUT], tok, prompt_format="chat")
    with pytest.raises(LosaError, match="unknown prompt format"):
        tokenize_records([REC_INPUT], tok, prompt_format="vicuna")


def test_prompt_format_is_a_finetune_field_and_reaches_the_loop(tmp_path, monkeypatch):
    from losa.pipelines.losa import loop

    assert FinetuneConfig().prompt_format == "auto"
    assert FinetuneConfig.model_fields["prompt_format"].description
    seen = {}

    def fake_tokenize(records, tokenizer, max_length=512, prompt_format="auto"):
        seen["fmt"] = prompt_format
        return [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 64

    monkeypatch.setattr(loop, "tokenize_records", fake_tokenize)
    data = tmp_path / "d.json"
    data.write_text(json.dumps([REC_INPUT]))
    from losa.pipelines.losa.config import LoSAConfig

    cfg = LoSAConfig(finetune_data=str(data), finetune=FinetuneConfig(prompt_format="plain"))
    loop.prepare_finetune_examples(_tiny_tok(chat=True), cfg, 0)
    assert seen["fmt"] == "plain"


def test_finetune_without_progress_prints_no_log_lines(tiny_model, capsys):
    """progress=False: no bar and none of the Trainer's per-step loss dicts on stdout; the losses are still kept."""
    model = tiny_model("llama", seed=0, layers=1)
    add_sparse_lora(model, SparseLoRAConfig(r_max=4, rank=4))
    res = finetune(model, _data(8), FinetuneConfig(lr=5e-3, epochs=2, batch_size=4), pad_id=0, progress=False)
    assert res["steps"] == 4 and len(res["losses"]) == 4
    out = capsys.readouterr()
    assert out.out == "" and "loss" not in out.err

"""Distillation from the dense teacher's cached top-k distributions (``FinetuneConfig.teacher_topk``).

Expectations are computed independently of losa's loss code: by hand with :mod:`math` on a few tokens,
from the full-logit KL of the teacher model's own forward, and from uninterrupted runs (resume).
"""

from __future__ import annotations

import copy
import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from losa.cli import main
from losa.errors import LosaError
from losa.finetune import Collator, FinetuneConfig, TeacherTopK, distill_loss, finetune, topk_distill_loss
from losa.lora import SparseLoRAConfig, add_sparse_lora, sparse_lora_modules
from losa.models.linear import get_weight
from losa.models.registry import get_arch, get_decoder_layers, linear_modules
from losa.pipelines.losa import LoSAConfig
from losa.pipelines.losa.loop import LoSARun, run

VOCAB = 128


# ---------------------------------------------------------------------------------------------- the loss
def test_cached_loss_equals_a_hand_computation():
    """Two attended tokens and one padded one; vocabulary 4, k = 2, temperature 2."""
    t = 2.0
    student = [[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0], [9.0, -9.0, 9.0, -9.0]]
    top_ids = [[2, 0], [1, 3], [0, 1]]
    # teacher log-probabilities over the full vocabulary (at T = 1) of its top-2 ids
    top_lp = [[math.log(0.6), math.log(0.3)], [math.log(0.5), math.log(0.2)], [0.0, -5.0]]
    expected = []
    for s, ids, lp in zip(student[:2], top_ids[:2], top_lp[:2]):
        w = [math.exp(x / t) for x in lp]  # teacher at temperature T, renormalised over its 2 ids
        p = [x / sum(w) for x in w]
        z = sum(math.exp(x / t) for x in s)  # student softmax over the FULL vocabulary, not renormalised
        q = [math.exp(s[i] / t) / z for i in ids]
        expected.append(t * t * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)))
    logits = torch.tensor([student])
    ids = torch.tensor([top_ids])
    lp = torch.tensor([top_lp])
    mask = torch.tensor([[1, 1, 0]])
    got = topk_distill_loss(logits, ids, lp, mask, temperature=t)
    assert float(got) == pytest.approx(sum(expected) / 2, rel=1e-6)
    got_sum = topk_distill_loss(logits, ids, lp, mask, temperature=t, reduction="sum")
    assert float(got_sum) == pytest.approx(sum(expected), rel=1e-6)
    # by hand for the first token at T = 1: p = (2/3, 1/3); q = softmax(s) at ids 2, 0
    z = sum(math.exp(x) for x in student[0])
    q2, q0 = math.exp(0.5) / z, math.exp(1.0) / z
    hand = 2 / 3 * math.log((2 / 3) / q2) + 1 / 3 * math.log((1 / 3) / q0)
    got1 = topk_distill_loss(logits[:, :1], ids[:, :1], lp[:, :1], None)
    assert float(got1) == pytest.approx(hand, rel=1e-6)
    with pytest.raises(LosaError, match="unknown distillation loss reduction"):
        topk_distill_loss(logits, ids, lp, mask, reduction="max")
    with pytest.raises(LosaError, match=r"must both be \[batch, seq, k\]"):
        topk_distill_loss(logits, ids, lp[..., :1], mask)


def _examples(n: int = 8, seed: int = 0) -> list[dict[str, list[int]]]:
    """Ragged examples (6 to 27 tokens), prompts labelled -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        n_prompt = 1 + (i * 5) % (length - 2)
        out.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
    return out


def _batch(examples, cache=None):
    items = [{**e, "teacher_index": i} for i, e in enumerate(examples)] if cache is not None else examples
    return Collator(0, cache)(items)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_cache_equals_full_logit_distillation(tmp_path, temperature):
    teacher = make_tiny_model("llama", seed=0, layers=2)
    student = make_tiny_model("llama", seed=1, layers=2)
    with torch.no_grad():  # peaked distributions (a random tiny model's are nearly uniform)
        teacher.lm_head.weight.mul_(20)
        student.lm_head.weight.mul_(20)
    examples = _examples(6)
    cache = TeacherTopK.compute(teacher, examples, tmp_path / "tc", VOCAB, batch_tokens=40, group_tokens=60)
    batch = _batch(examples, cache)
    fwd = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s_logits, t_logits = student(**fwd).logits, teacher(**fwd).logits
    full = distill_loss(s_logits, t_logits, batch["attention_mask"], temperature)
    cached = topk_distill_loss(s_logits, batch["teacher_indices"], batch["teacher_logprobs"], batch["attention_mask"],
                               temperature)
    assert float(full) > 1.0
    assert float(cached) == pytest.approx(float(full), abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gemma2"])
def test_cache_holds_the_models_own_top_k(tmp_path, family):
    """The layer-sequential computation (head after the last layer, several groups and batches) stores what
    the model's plain forward gives: the top-k ids, most likely first, and their full-vocabulary log-probs."""
    model = make_tiny_model(family, seed=0, layers=2)
    if family == "gemma2":
        model.config.final_logit_softcapping = 3.0  # applied after the LM head: must be in the cache
    examples = _examples(7, seed=1)
    k = 5
    cache = TeacherTopK.compute(model, examples, tmp_path / "tc", k, batch_tokens=30, group_tokens=50)
    assert len(cache) == 7 and cache.k == k
    tokens = sum(len(e["input_ids"]) for e in examples)
    assert cache.nbytes == tokens * k * 8 + 8 * 8  # int32 ids + float32 log-probs + int64 offsets
    for i, e in enumerate(examples):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([e["input_ids"]])).logits.float(), -1)[0]
        ids, lp = cache.example(i)
        assert ids.shape == (len(e["input_ids"]), k)
        torch.testing.assert_close(lp, logp.topk(k, -1).values, rtol=0, atol=1e-5)
        torch.testing.assert_close(logp.gather(-1, ids), lp, rtol=0, atol=1e-5)
        assert bool((lp[:, :-1] >= lp[:, 1:]).all())


def test_cache_errors(tmp_path):
    model = make_tiny_model("llama", seed=0, layers=1)
    with pytest.raises(LosaError, match=r"teacher_topk 129 exceeds the vocabulary of 128 tokens; set teacher_topk "
                                        r"\(--teacher-topk\) to 128 or lower"):
        TeacherTopK.compute(model, _examples(2), tmp_path / "tc", VOCAB + 1)
    with pytest.raises(LosaError, match="missing or incomplete"):
        TeacherTopK(tmp_path / "nothing")
    cache = TeacherTopK.compute(model, _examples(2), tmp_path / "tc", 4)
    assert TeacherTopK.matches(tmp_path / "tc", _examples(2), 4)
    assert not TeacherTopK.matches(tmp_path / "tc", _examples(2), 5)
    assert not TeacherTopK.matches(tmp_path / "tc", _examples(2, seed=9), 4)
    other = _examples(3, seed=2)[1:]  # an example of another length at index 1
    with pytest.raises(LosaError, match="belongs to other examples"):
        _batch(other, cache)
    student = make_tiny_model("llama", seed=1, layers=1)
    add_sparse_lora(student, SparseLoRAConfig(r_max=4, rank=4))
    cfg = FinetuneConfig(distill=True, teacher_topk=4, batch_size=2)
    with pytest.raises(LosaError, match="needs the cached teacher targets"):
        finetune(student, _examples(2), cfg, pad_id=0)
    with pytest.raises(LosaError, match="holds the top 4, the config asks for teacher_topk 8"):
        finetune(student, _examples(2), cfg.model_copy(update={"teacher_topk": 8}), pad_id=0, teacher_cache=cache)
    with pytest.raises(LosaError, match="needs its 'teacher_index'"):
        finetune(student, _examples(2), cfg, pad_id=0, teacher_cache=cache)
    with pytest.raises(LosaError, match=r"teacher_topk 4 only applies to distillation; add distill=True \(--distill\) or "
                                        r"drop teacher_topk \(--teacher-topk\)"):
        FinetuneConfig(teacher_topk=4)


def _student():
    student = make_tiny_model("llama", seed=1, layers=2)
    add_sparse_lora(student, SparseLoRAConfig(r_max=4, rank=4, alpha=8))
    with torch.no_grad():  # non-zero B so that A gets a gradient too
        g = torch.Generator().manual_seed(5)
        for m in sparse_lora_modules(student).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return student


def test_cached_loss_is_per_token_over_the_accumulated_batch(monkeypatch, tmp_path):
    """batch 8 = batch 4 × 2 accumulation = batch 2 × 4: the same loss and gradients as the per-token mean of
    the formula over all 8 ragged examples (written here with plain torch)."""
    from losa.finetune import train as train_mod

    teacher = make_tiny_model("llama", seed=0, layers=2)
    examples = _examples(8)
    k, temp = 6, 2.0
    cache = TeacherTopK.compute(teacher, examples, tmp_path / "tc", k)
    indexed = [{**e, "teacher_index": i} for i, e in enumerate(examples)]
    # reference: pad all 8, teacher top-k from its own forward, KL on the support, mean over attended tokens
    student = _student()
    student.train()
    b = _batch(examples)
    logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1)
    top = t_logp.topk(k, -1)
    p = torch.softmax(top.values / temp, -1)
    log_q = torch.log_softmax(logits / temp, -1).gather(-1, top.indices)
    kl = (p * (p.log() - log_q)).sum(-1)
    attn = b["attention_mask"].float()
    ref_loss = (kl * attn).sum() / attn.sum() * temp**2
    params = {n: q for n, q in student.named_parameters() if q.requires_grad}
    ref_grads = dict(zip(params, torch.autograd.grad(ref_loss, list(params.values()))))

    grads: list[dict[str, torch.Tensor]] = []

    class GradRecorder(train_mod._LossRecorder):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads.append({n: q.grad.detach().clone() for n, q in model.named_parameters() if q.requires_grad})

    monkeypatch.setattr(train_mod, "_LossRecorder", GradRecorder)
    for bs, ga in ((8, 1), (4, 2), (2, 4)):
        grads.clear()
        cfg = FinetuneConfig(lr=1e-3, epochs=1, batch_size=bs, grad_accum=ga, max_grad_norm=0.0, distill=True,
                             temperature=temp, teacher_topk=k)
        res = finetune(_student(), indexed, cfg, pad_id=0, teacher_cache=cache)
        assert res["steps"] == 1 and len(grads) == 1
        assert res["losses"][0] == pytest.approx(ref_loss.item(), rel=1e-4)
        for n, ref in ref_grads.items():
            assert ref.abs().sum() > 0
            torch.testing.assert_close(grads[0][n], ref, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- LoSA runs
def _text_data(path: Path, n: int = 32, words: int = 20) -> str:
    path.write_text("\n".join(json.dumps({"text": " ".join(f"word{(i * 7 + j * 3) % 90 + 4}" for j in range(words))})
                              for i in range(n)) + "\n")
    return str(path)


def _cfg(data: str, **kw) -> LoSAConfig:
    base = dict(sparsity=0.6, steps=2, nsamples=4, seqlen=16, recon_nsamples=2, r_max=8, r_min=1, omega_first=4,
                omega_last=6, device="cpu", calib="c4", finetune_data=data,
                finetune={"batch_size": 4, "max_length": 24, "lr": 1e-2, "epochs": 3, "distill": True,
                          "teacher_topk": 8})
    base.update(kw)
    return LoSAConfig(**base)


@pytest.fixture
def calib():
    return torch.randint(4, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


def test_losa_run_with_the_cache_makes_no_teacher_copy(tmp_path, calib, monkeypatch):
    runmod = importlib.import_module("losa.pipelines.losa.loop")
    model = make_tiny_model("llama", seed=0, layers=3)
    n_params = sum(p.numel() for p in model.parameters())
    copied = []
    real_deepcopy = copy.deepcopy

    def spy(obj, *a, **kw):
        if isinstance(obj, torch.nn.Module) and sum(p.numel() for p in obj.parameters()) >= n_params // 2:
            copied.append(type(obj).__name__)
        return real_deepcopy(obj, *a, **kw)

    monkeypatch.setattr(copy, "deepcopy", spy)
    seen = {}
    real_finetune = runmod.finetune

    def spy_finetune(*a, **kw):  # what the Trainer gets: no teacher model, the cache
        seen.setdefault("teacher", []).append(kw.get("teacher"))
        seen.setdefault("cache", []).append(kw.get("teacher_cache"))
        cache_dir = tmp_path / "out" / "teacher_topk"
        seen.setdefault("cache_files", []).append(sorted(p.name for p in cache_dir.iterdir()))
        return real_finetune(*a, **kw)

    monkeypatch.setattr(runmod, "finetune", spy_finetune)
    data = _text_data(tmp_path / "ft.jsonl")
    rep = run(model, make_tiny_tokenizer(), _cfg(data), out_dir=tmp_path / "out", calib_ids=calib, progress=False)
    assert copied == []  # no model-sized deepcopy anywhere in the run (the Trainer included)
    assert seen["teacher"] == [None, None] and all(isinstance(c, TeacherTopK) for c in seen["cache"])
    assert seen["cache_files"][0] == ["indices.npy", "logprobs.npy", "meta.json", "offsets.npy"]
    assert seen["cache"][0].k == 8
    # it trained: the KL to the cached teacher goes down within each step
    for s in rep.steps:
        assert len(s.train_loss) >= 6 and np.mean(s.train_loss[-2:]) < np.mean(s.train_loss[:2])
    # verified sparsity, counted here on the merged weights
    spec = get_arch(model)
    zeros = total = 0
    for layer in get_decoder_layers(model, spec):
        for m in linear_modules(layer, spec).values():
            w = get_weight(m)
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    assert zeros / total == pytest.approx(0.6, abs=0.01)
    assert rep.results.sparsity == pytest.approx(zeros / total, abs=1e-6)
    # the cache is gone with the run; the dense targets too
    assert not (tmp_path / "out" / "teacher_topk").exists()
    assert not (tmp_path / "out" / "dense_targets.npy").exists()
    assert json.loads((tmp_path / "out" / "details.json").read_text())["teacher_topk_s"] > 0


def test_losa_run_holds_no_teacher_and_temporary_runs_clean_up(calib, tmp_path):
    data = _text_data(tmp_path / "ft.jsonl")
    job = LoSARun(make_tiny_model("llama", layers=2), make_tiny_tokenizer(), _cfg(data, steps=1), None,
                  calib_ids=calib, progress=False)
    job.setup()
    assert job.teacher is None and job.teacher_cache is not None
    cache_dir = job.teacher_cache.path
    assert cache_dir.is_dir()
    job.step(1)
    job.finish()
    assert not cache_dir.exists() and not job.out.exists()


def test_resume_with_the_cache_is_bit_identical(tmp_path, calib, monkeypatch):
    data = _text_data(tmp_path / "ft.jsonl")
    tok = make_tiny_tokenizer()
    cfg = _cfg(data, finetune={"batch_size": 4, "max_length": 24, "lr": 5e-3, "epochs": 1, "distill": True,
                               "teacher_topk": 8})
    ref = make_tiny_model("llama", layers=2)
    run(ref, tok, cfg, out_dir=tmp_path / "ref", calib_ids=calib, progress=False)
    # killed after step 1: its state and the cache stay behind
    job = LoSARun(make_tiny_model("llama", layers=2), tok, cfg, tmp_path / "b", calib_ids=calib, progress=False)
    job.setup()
    job.step(1)
    del job
    assert (tmp_path / "b" / "teacher_topk" / "meta.json").is_file()
    calls = []
    real = TeacherTopK.compute.__func__

    def counting(cls, *a, **kw):
        calls.append(1)
        return real(cls, *a, **kw)

    monkeypatch.setattr(TeacherTopK, "compute", classmethod(counting))
    model = make_tiny_model("llama", layers=2)
    rep = run(model, tok, cfg, out_dir=tmp_path / "b", resume=True, calib_ids=calib, progress=False)
    assert calls == []  # the kept cache was read, not recomputed
    assert [s.step for s in rep.steps] == [1, 2]
    for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
    assert not (tmp_path / "b" / "teacher_topk").exists()


def test_teacher_topk_flag(tmp_path, capsys):
    d = tmp_path / "tiny"
    make_tiny_model("llama", layers=2).save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    data = _text_data(tmp_path / "ft.jsonl")
    out = tmp_path / "run"
    rc = main(["run", str(d), "--finetune-data", data, "--distill", "--teacher-topk", "16", "--sparsity", "0.5",
               "--steps", "1", "--nsamples", "4", "--seqlen", "16", "--recon-nsamples", "2", "--max-length", "24",
               "--batch-size", "4", "--calib", "self", "--out", str(out), "--quiet", "--no-save"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["meta"]["config"]["finetune"]["teacher_topk"] == 16
    assert not (out / "teacher_topk").exists()

"""`losa run` / `losa.run()` end to end on tiny models: every option does what it says.

Expectations are independent of the code under test: sparsity is counted on the merged weights, the
exact merge is checked against the adapter model's own logits, allocations against their constraints,
reconstruction errors against HF hidden states, plots against their pixels.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from losa.cli import main
from losa.errors import LosaError
from losa.lora import set_layer_ranks, sparse_lora_modules
from losa.models.linear import get_weight
from losa.models.registry import get_arch, get_decoder_layers, linear_modules
from losa.pipelines.losa import LoSAConfig
from losa.pipelines.losa.loop import LoSARun, run


def _text_data(path: Path, n: int = 32, words: int = 24) -> str:
    path.write_text("\n".join(json.dumps({"text": " ".join(f"word{(i * 7 + j * 3) % 90 + 4}" for j in range(words))})
                              for i in range(n)) + "\n")
    return str(path)


def _cfg(**kw) -> LoSAConfig:
    base = dict(sparsity=0.6, steps=2, nsamples=4, seqlen=16, recon_nsamples=2, r_max=8, r_min=1, omega_first=4,
                omega_last=6, device="cpu", calib="c4", finetune={"batch_size": 4, "max_length": 24, "lr": 1e-2})
    base.update(kw)
    return LoSAConfig(**base)


@pytest.fixture
def calib():
    return torch.randint(4, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def _module_sparsities(model) -> dict[str, float]:
    spec = get_arch(model)
    return {f"{i}.{n}": float((get_weight(m) == 0).float().mean())
            for i, layer in enumerate(get_decoder_layers(model, spec)) for n, m in linear_modules(layer, spec).items()}


def _run_with_merge_check(model, tok, cfg, calib, out=None):
    """Run LoSA step by step; the logits of the adapter model right before the merge must equal the
    merged model's (the exact merge), and are returned with the report."""
    job = LoSARun(model, tok, cfg, out, calib_ids=calib, progress=False)
    job.setup()
    for t in range(1, cfg.steps + 1):
        job.step(t)
    ids = calib[:2]
    with torch.no_grad():
        before = model(ids).logits
    report = job.finish()
    with torch.no_grad():
        after = model(ids).logits
    assert not sparse_lora_modules(model)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    return report


@pytest.mark.parametrize("family,method,pattern", [
    ("llama", "sparsegpt", {"sparsity": 0.6}),
    ("opt", "wanda", {"sparsity": 0.5}),
    ("gpt2", "wanda", {"nm": "2:4"}),
    ("qwen2", "sparsegpt", {"nm": "2:4"}),
])
def test_losa_end_to_end_every_family_and_method(tmp_path, calib, family, method, pattern):
    model = make_tiny_model(family, seed=0, layers=3)
    data = _text_data(tmp_path / "ft.jsonl")
    cfg = _cfg(method=method, finetune_data=data, **pattern)
    rep = _run_with_merge_check(model, make_tiny_tokenizer(), cfg, calib)
    sizes = [sum(get_weight(m).numel() for m in linear_modules(layer, get_arch(model)).values())
             for layer in get_decoder_layers(model)]
    target = 0.5 if "nm" in pattern else pattern["sparsity"]
    layer_t = rep.steps[-1].layer_target_sparsity
    # RMI keeps the parameter-weighted mean at S (the LP's equality constraint), each layer within its band
    assert float(np.dot(layer_t, sizes) / sum(sizes)) == pytest.approx(target, abs=1e-6)
    got = _module_sparsities(model)
    for name, s in got.items():
        layer = int(name.split(".")[0])
        if "nm" in pattern:  # counted directly on the merged weights: every group of 4 keeps at most 2
            w = get_weight(dict(linear_modules(get_decoder_layers(model)[layer], get_arch(model)))[name.split(".", 1)[1]])
            assert int((w != 0).reshape(w.shape[0], -1, 4).sum(-1).max()) <= 2, name
        else:
            in_f = get_weight(dict(linear_modules(get_decoder_layers(model)[layer], get_arch(model)))[name.split(".", 1)[1]]).shape[1]
            assert s >= layer_t[layer] - 1 / in_f - 1e-6, name
    assert rep.steps[-1].train_loss, "fine-tuning ran"


def test_data_free_distillation_through_the_cli(tmp_path, monkeypatch, capsys):
    """`losa run MODEL --distill` without fine-tuning data or a data dir: self-generated text, KL to the dense model."""
    monkeypatch.delenv("LOSA_DATA_DIR", raising=False)
    d = tmp_path / "tiny"
    make_tiny_model("llama", layers=2).save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    out = tmp_path / "run"
    rc = main(["run", str(d), "--distill", "--sparsity", "0.5", "--steps", "2", "--nsamples", "4", "--seqlen", "16",
               "--recon-nsamples", "2", "--max-examples", "32", "--max-length", "16", "--batch-size", "4",
               "--epochs", "3", "--lr", "0.01", "--out", str(out), "--quiet", "--no-save"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["results"]["sparsity"] == pytest.approx(0.5, abs=1e-9)
    losses = [x for s in rep["steps"] for x in s["train_loss"]]
    assert len(losses) >= 8 and np.mean(losses[-3:]) < np.mean(losses[:3])  # the KL to the teacher goes down
    assert json.loads((out / "details.json").read_text())["steps"][0]["finetune_tokens"] > 0


def test_lowering_ranks_between_steps_keeps_the_model_function(calib):
    """The rank change between steps folds the dropped adapter mass into W (set_layer_ranks, used by run)."""
    from losa.lora import SparseLoRAConfig, add_sparse_lora

    model = make_tiny_model("llama", layers=2)
    add_sparse_lora(model, SparseLoRAConfig(r_max=8, rank=8), mask_from_weights=False)
    with torch.no_grad():
        for m in sparse_lora_modules(model).values():
            m.lora_B.normal_(std=0.05)
    with torch.no_grad():
        before = model(calib).logits
        set_layer_ranks(model, [2, 5])
        after = model(calib).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert [m.rank for m in sparse_lora_modules(model).values()][:1] == [2]


def test_progress_bars_in_every_long_phase_and_quiet_turns_them_off(tmp_path, capfd):
    d = tmp_path / "tiny"
    make_tiny_model("llama", layers=2).save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    data = _text_data(tmp_path / "ft.jsonl", n=16)
    argv = ["run", str(d), "--finetune-data", data, "--sparsity", "0.5", "--steps", "1", "--nsamples", "4",
            "--seqlen", "16", "--recon-nsamples", "2", "--calib", "c4", "--data-dir", str(tmp_path / "none"),
            "--batch-size", "4", "--max-length", "24", "--eval", "none", "--no-save"]
    (tmp_path / "none" / "c4").mkdir(parents=True)
    (tmp_path / "none" / "c4" / "c4_train_part0.jsonl").write_text(
        "\n".join(json.dumps({"text": " ".join(f"word{(i + j) % 100 + 4}" for j in range(40))}) for i in range(20)))
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    out, err = capfd.readouterr()
    for phase in ("dense targets", "RMI grams", "pruning", "reconstruction errors"):
        assert phase in err, phase
    # the fine-tuning bar is labelled with the step and shows the loss; the Trainer's own bar (no label) and its
    # per-step log dicts ({'loss': ...} on stdout) are gone
    assert re.search(r"step 1/1: fine-tuning: 100%\|[^\r\n]*, loss=\d+\.\d{4}\]", err), err[-2000:]
    assert not any(re.match(r"^\s*\d+%\|", seg) for seg in re.split(r"[\r\n]", err))
    assert "{'loss'" not in out and "'grad_norm'" not in out and "'loss'" not in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "%|" not in capfd.readouterr().err


def test_resume_needs_state_moves_between_machines_and_checks_the_data(tmp_path, calib):
    data = _text_data(tmp_path / "ft.jsonl")
    tok = make_tiny_tokenizer()
    with pytest.raises(LosaError, match=r"resume \(--resume\): .* holds no finished LoSA step"):
        run(make_tiny_model("llama", layers=2), tok, _cfg(finetune_data=data), out_dir=tmp_path / "empty",
            resume=True, calib_ids=calib, progress=False)
    ref = make_tiny_model("llama", layers=2)
    run(ref, tok, _cfg(finetune_data=data), out_dir=tmp_path / "ref", calib_ids=calib, progress=False)
    # a run whose step 1 finished, continued on "another machine": other device string, data moved elsewhere
    first = make_tiny_model("llama", layers=2)
    job = LoSARun(first, tok, _cfg(finetune_data=data), tmp_path / "moved", calib_ids=calib, progress=False)
    job.setup()
    job.step(1)
    moved = tmp_path / "elsewhere" / "ft.jsonl"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    model = make_tiny_model("llama", layers=2)
    rep = run(model, tok, _cfg(finetune_data=str(moved), device="auto", data_dir=str(tmp_path)),
              out_dir=tmp_path / "moved", resume=True, calib_ids=calib, progress=False)
    assert [s.step for s in rep.steps] == [1, 2]
    for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert not (tmp_path / "moved" / "dense_targets.npy").exists()  # removed when the run ended
    # different data under the same recipe is refused
    other = tmp_path / "other.jsonl"
    _text_data(other, n=33)
    job = LoSARun(make_tiny_model("llama", layers=2), tok, _cfg(finetune_data=data), tmp_path / "c", calib_ids=calib,
                  progress=False)
    job.setup()
    job.step(1)
    with pytest.raises(LosaError, match="finetune data differ"):
        run(make_tiny_model("llama", layers=2), tok, _cfg(finetune_data=str(other)), out_dir=tmp_path / "c",
            resume=True, calib_ids=calib, progress=False)
    with pytest.raises(LosaError, match=r"differs from this run's in sparsity \(saved 0\.6, now 0\.5\)"):
        run(make_tiny_model("llama", layers=2), tok, _cfg(finetune_data=data, sparsity=0.5), out_dir=tmp_path / "c",
            resume=True, calib_ids=calib, progress=False)


def test_eval_every_step_and_report_from_a_real_run(tmp_path, data_dir):
    from PIL import Image

    d = tmp_path / "tiny"
    make_tiny_model("llama", layers=3).save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    data = _text_data(tmp_path / "ft.jsonl")
    out = tmp_path / "run"
    rc = main(["run", str(d), "--finetune-data", data, "--sparsity", "0.6", "--steps", "2", "--nsamples", "4",
               "--seqlen", "16", "--recon-nsamples", "2", "--batch-size", "4", "--max-length", "24",
               "--data-dir", str(data_dir), "--eval-every-step", "--eval-seqlen", "32", "--max-windows", "2",
               "--out", str(out), "--quiet", "--no-save"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert [sorted(s["ppl"]) for s in rep["steps"]] == [["wikitext2"], ["wikitext2"]]
    assert all(np.isfinite(s["ppl"]["wikitext2"]) and s["ppl"]["wikitext2"] > 1 for s in rep["steps"])
    # the last step's perplexity is the final model's (the merge is exact)
    assert rep["results"]["ppl"]["wikitext2"] == pytest.approx(rep["steps"][-1]["ppl"]["wikitext2"], rel=1e-3)
    assert rep["results"]["ppl_settings"] == {"seqlen": 32, "max_windows": 2}  # compare warns when runs differ
    # resumed when finished: nothing to do with the same windows; other windows are evaluated (and recorded)
    argv = ["run", str(d), "--finetune-data", data, "--sparsity", "0.6", "--steps", "2", "--nsamples", "4",
            "--seqlen", "16", "--recon-nsamples", "2", "--batch-size", "4", "--max-length", "24",
            "--data-dir", str(data_dir), "--eval-seqlen", "32", "--out", str(out), "--quiet", "--no-save", "--resume"]
    assert main([*argv, "--max-windows", "2"]) == 0
    assert json.loads((out / "report.json").read_text()) == rep
    assert main([*argv, "--max-windows", "1"]) == 0
    assert json.loads((out / "report.json").read_text())["results"]["ppl_settings"] == {"seqlen": 32, "max_windows": 1}
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(Path(p).stem for p in links) == sorted(
        ["layer_sparsity", "lora_ranks", "cka", "recon_error", "train_loss", "ppl_per_step"])
    for rel in links:
        img = np.asarray(Image.open(out / rel).convert("L"), dtype=float)
        assert img.std() > 10 and (img < 128).mean() > 0.005, rel


def test_a_resume_that_would_measure_the_per_step_perplexity_otherwise_is_refused(tmp_path, calib, data_dir,
                                                                                 monkeypatch):
    """Killed in step 2's evaluation after step 1 was saved with its perplexity: a resume with another window or
    window cap would put two measurements in one per-step curve, so it is refused; the same settings resume."""
    from losa.pipelines.losa.loop import StepEval

    tok, cfg, out = make_tiny_tokenizer(), _cfg(), tmp_path / "run"
    real, calls = StepEval.__call__, {"n": 0}

    def dying(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(StepEval, "__call__", dying)
    first = {"datasets": ["wikitext2"], "seqlen": 32, "max_windows": 2, "data_dir": str(data_dir)}
    with pytest.raises(KeyboardInterrupt):
        run(make_tiny_model("llama", layers=2), tok, cfg, out_dir=out, calib_ids=calib, progress=False,
            step_eval=first)
    monkeypatch.setattr(StepEval, "__call__", real)
    for change, shown in (({"seqlen": 16}, "16 tokens, first 2 windows"),
                          ({"max_windows": 3}, "32 tokens, first 3 windows"),
                          ({"max_windows": None}, "32 tokens, all windows")):
        with pytest.raises(LosaError, match=r"measured on wikitext2, 32 tokens, first 2 windows, but this "
                                            rf"run's per-step evaluation is wikitext2, {shown}; one report would mix"):
            run(make_tiny_model("llama", layers=2), tok, cfg, out_dir=out, resume=True, calib_ids=calib,
                progress=False, step_eval=first | change)
    rep = run(make_tiny_model("llama", layers=2), tok, cfg, out_dir=out, resume=True, calib_ids=calib, progress=False,
              step_eval=first)
    assert [sorted(s.ppl) for s in rep.steps] == [["wikitext2"], ["wikitext2"]]


def test_mixed_nm_that_cannot_move_says_so(calib, tmp_path):
    model = make_tiny_model("llama", layers=4)
    with pytest.warns(UserWarning, match=r"lets no layer move, so this run is uniform 4:8; set nm_max_pairs \(--nm-max-pairs\)"):
        rep = run(model, make_tiny_tokenizer(), _cfg(nm="4:8", mixed_nm=True, steps=1), calib_ids=calib, progress=False)
    assert rep.steps[0].layer_target_sparsity == [0.5] * 4
    rep = run(make_tiny_model("llama", layers=4), make_tiny_tokenizer(),
              _cfg(nm="4:8", mixed_nm=True, steps=1, nm_max_pairs=1), calib_ids=calib, progress=False)
    assert sorted(rep.steps[0].layer_target_sparsity) == [0.375, 0.5, 0.5, 0.625]


def test_channel_reconstruction_error_against_hidden_states(tmp_path, calib):
    from losa.pipelines.losa.recon import DenseTargets, reconstruction_errors

    dense = make_tiny_model("llama", seed=0, layers=3, hidden=32)
    targets = DenseTargets.compute(dense, calib, tmp_path / "t.npy", batch_size=2)
    sparse = make_tiny_model("llama", seed=0, layers=3, hidden=32)
    with torch.no_grad():
        sparse.model.layers[0].mlp.down_proj.weight.mul_(torch.rand(32, 64, generator=torch.Generator().manual_seed(1)) > 0.5)
        hd = dense(calib, output_hidden_states=True).hidden_states
        hs = sparse(calib, output_hidden_states=True).hidden_states
    got = reconstruction_errors(sparse, calib, targets, batch_size=3, definition="channel")
    for i in range(2):  # HF hidden_states[i + 1] is layer i's output (the last one is normed)
        num = (hd[i + 1] - hs[i + 1]).double().square().sum((0, 1))
        den = hd[i + 1].double().square().sum((0, 1))
        assert got[i] == pytest.approx(float((num / den).mean()), rel=0.02)
    glob = reconstruction_errors(sparse, calib, targets, definition="global")
    assert got != pytest.approx(glob)  # the two definitions really differ
    with pytest.raises(LosaError, match="unknown reconstruction error"):
        reconstruction_errors(sparse, calib, targets, definition="rms")
    rep = run(make_tiny_model("llama", layers=2), make_tiny_tokenizer(), _cfg(recon_error="channel", steps=1),
              calib_ids=calib, progress=False)
    assert rep.meta.config["recon_error"] == "channel"


def test_run_refuses_bad_inputs_before_any_work(tmp_path, calib, data_dir, monkeypatch):
    """Each of these used to fail only after step 1's prune and fine-tune, or with a raw traceback."""
    from losa import PruneConfig
    from losa.pipelines.losa.loop import StepEval

    def no_work(self):
        raise AssertionError("the run started working before checking its inputs")

    monkeypatch.setattr(LoSARun, "setup", no_work)
    data = _text_data(tmp_path / "ft.jsonl")
    tok = make_tiny_tokenizer()
    model = make_tiny_model("llama", layers=2)  # max_position_embeddings 256
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cases = [
        (dict(step_eval=StepEval(["nope"], 32, 1, str(data_dir))),
         "step_eval.datasets nope: no such file, and not wikitext2, c4 or ptb"),
        (dict(step_eval=StepEval(["wikitext2"], 4096, 1, str(data_dir))),
         "evaluation window of 4096 tokens exceeds the model's context of 256 positions; set step_eval.seqlen to 256 "
         "or lower"),
        (dict(step_eval=StepEval(["wikitext2"], 32, 0, str(data_dir))), "max_windows must be at least 1, got 0"),
        (dict(tokenizer=None), "losa.run needs a tokenizer for the fine-tuning data"),
        (dict(config=PruneConfig()), "needs a LoSAConfig or a dict of its fields, got PruneConfig"),
        (dict(calib_ids=calib.float()), re.escape("calib_ids must be a 2-D integer tensor [nsamples, seqlen], got "
                                                  "float32 of shape (4, 16)")),
        (dict(calib_ids=calib + 124), re.escape("calib_ids hold token id 251, outside the model's vocabulary [0, 128)")),
    ]
    for kw, msg in cases:
        args = dict(tokenizer=tok, config=_cfg(finetune_data=data), calib_ids=calib, progress=False) | kw
        with pytest.raises(LosaError, match=msg):
            run(model, args.pop("tokenizer"), args.pop("config"), **args)
    assert not sparse_lora_modules(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad, n


def test_run_restores_requires_grad_records_the_calib_ids_used_and_prints_nothing(tmp_path, calib, capsys,
                                                                                  monkeypatch):
    data = _text_data(tmp_path / "ft.jsonl")
    model = make_tiny_model("llama", layers=2)
    model.model.embed_tokens.requires_grad_(False)  # a mix of frozen and trainable parameters
    expected = {n: p.requires_grad for n, p in model.named_parameters()}
    assert set(expected.values()) == {True, False}
    # the config asks for other windows than the user's [4, 16] ids
    cfg = _cfg(finetune_data=data, steps=1, nsamples=64, seqlen=128, recon_nsamples=8, calib="wikitext2")
    rep = run(model, make_tiny_tokenizer(), cfg, out_dir=tmp_path / "run", calib_ids=calib, progress=False)
    assert rep.steps[0].train_loss, "fine-tuning ran"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == expected
    assert capsys.readouterr().out == ""  # no Trainer log dicts without progress
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())["meta"]["config"]
    for recorded in (rep.meta.config, on_disk):
        assert (recorded["calib"], recorded["nsamples"], recorded["seqlen"], recorded["recon_nsamples"]) == (
            "calib_ids", 4, 16, 4)

    # a run that fails after the adapters froze the weights: what is not inside an adapter is restored
    def fail(self, step):
        raise RuntimeError("boom")

    monkeypatch.setattr(LoSARun, "step", fail)
    model = make_tiny_model("llama", layers=2)
    model.model.embed_tokens.requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"):
        run(model, make_tiny_tokenizer(), cfg, calib_ids=calib, progress=False)
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.model.norm.weight.requires_grad and model.model.layers[0].input_layernorm.weight.requires_grad


def _tiny_gemma3_multimodal():
    """A tiny random Gemma3ForConditionalGeneration (what Gemma 3 4B-27B checkpoints are)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    text = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256, sliding_window=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                               image_token_index=127, boi_token_index=125, eoi_token_index=126)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def test_losa_on_a_multimodal_gemma3_checkpoint(tmp_path, calib):
    """Gemma 3's multimodal checkpoints keep the hidden size in text_config: the dense targets read it from there
    (the trial's run failed with an AttributeError there); the decoder layers of the language model end as sparse
    as asked. SparseGPT's one-shot batch sizing read it too (review)."""
    model = _tiny_gemma3_multimodal()
    assert not hasattr(model.config, "hidden_size")  # the case of the trial
    data = _text_data(tmp_path / "ft.jsonl")
    rep = run(model, make_tiny_tokenizer(), _cfg(steps=1, finetune_data=data), out_dir=tmp_path / "run",
              calib_ids=calib, progress=False)
    w = torch.cat([get_weight(m).flatten() for layer in get_decoder_layers(model)
                   for m in linear_modules(layer, get_arch(model)).values()])
    assert float((w == 0).float().mean()) == pytest.approx(0.6, abs=0.01) and rep.results.sparsity == pytest.approx(
        0.6, abs=0.01)


def test_lora_target_modules_and_dropout_reach_the_adapters(tmp_path, calib):
    """LoSAConfig exposes PEFT's target_modules and lora_dropout (the trial found them in SparseLoRAConfig only):
    only the MLP adapters are trained, with the dropout asked; the attention linears are pruned to the same
    targets and come out as the original weights where kept (never adapted); a pattern matching nothing is
    refused before any work."""
    dense = make_tiny_model("llama", seed=0, layers=2)
    model = make_tiny_model("llama", seed=0, layers=2)
    cfg = _cfg(steps=1, finetune_data=_text_data(tmp_path / "ft.jsonl"), lora_target_modules=["mlp.*"],
               lora_dropout=0.25)
    job = LoSARun(model, make_tiny_tokenizer(), cfg, None, calib_ids=calib, progress=False)
    job.setup()
    adapters = sparse_lora_modules(model)
    trained = {q for q, m in adapters.items() if m.lora_A.requires_grad}
    assert trained == {q for q in adapters if ".mlp." in q} and trained
    assert all(isinstance(m.dropout, torch.nn.Dropout) and m.dropout.p == 0.25 for m in adapters.values())
    job.step(1)
    assert all(m.rank == 0 for q, m in adapters.items() if q not in trained)  # rank allocation skips them
    rep = job.finish()
    targets = rep.steps[-1].layer_target_sparsity
    for i, (layer, ref) in enumerate(zip(get_decoder_layers(model), get_decoder_layers(dense))):
        now, was = linear_modules(layer), linear_modules(ref)
        for name in now:
            w, w0 = get_weight(now[name]), get_weight(was[name])
            kept = w != 0
            assert float((~kept).float().mean()) >= targets[i] - 1 / w.shape[1] - 1e-6, name  # pruned alike
            if name.startswith("self_attn."):
                assert torch.equal(w[kept], w0[kept]), name
            else:
                assert not torch.allclose(w[kept], w0[kept]), name
    with pytest.raises(LosaError, match=r"^lora_target_modules \(--lora-target-modules\) attn\.\* matches no linear of "
                                        r"the decoder layers "
                                        r"\(self_attn.q_proj, .*\); use e.g. mlp\.\*$"):
        LoSARun(make_tiny_model("llama", layers=2), make_tiny_tokenizer(), _cfg(steps=1, lora_target_modules=["attn.*"]),
                None, calib_ids=calib, progress=False).setup()


def test_ignore_leaves_linears_dense_through_every_step(tmp_path, calib):
    """LoSAConfig.ignore (shared with PruneConfig): the named linears are never pruned. Without fine-tuning they
    come out as the dense weights bit for bit; with it their adapters train unmasked and merge into weights that
    stay dense; the other linears reach their layer targets, and the final verification passes."""
    ignore = ["mlp.down_proj", "model.layers.1.self_attn.o_proj"]  # a full name too

    def left_dense(key: str) -> bool:  # the patterns above, by hand
        return key.endswith(".mlp.down_proj") or key == "1.self_attn.o_proj"

    dense = _module_sparsities(make_tiny_model("llama", seed=0, layers=2))
    ref = {f"{i}.{n}": get_weight(m).detach().clone() for i, layer in
           enumerate(get_decoder_layers(make_tiny_model("llama", seed=0, layers=2)))
           for n, m in linear_modules(layer).items()}
    for finetune_data in (None, _text_data(tmp_path / "ft.jsonl")):
        model = make_tiny_model("llama", seed=0, layers=2)
        rep = run(model, make_tiny_tokenizer(), _cfg(ignore=ignore, finetune_data=finetune_data), None,
                  calib_ids=calib, progress=False)
        targets = rep.steps[-1].layer_target_sparsity
        got = _module_sparsities(model)
        assert sum(map(left_dense, got)) == 3
        for key, s in got.items():
            w = get_weight(linear_modules(get_decoder_layers(model)[int(key[0])])[key[2:]])
            if left_dense(key):
                assert s == dense[key] == 0.0, key
                if finetune_data is None:
                    assert torch.equal(w, ref[key]), key
            else:
                assert s >= targets[int(key[0])] - 1 / w.shape[1] - 1e-6, key
        assert rep.results.sparsity < 0.6
    with pytest.raises(LosaError, match="ignore pattern 'mlp.dwn' matches no linear"):
        LoSARun(make_tiny_model("llama", layers=2), make_tiny_tokenizer(), _cfg(ignore=["mlp.dwn"]), None,
                calib_ids=calib, progress=False).setup()


def test_mixed_nm_with_a_layer_left_dense_keeps_the_pattern_on_the_rest(calib):
    """Mixed N:M keeps the parameter-weighted mean N over the linears it prunes: with layer 1 left dense entirely,
    layer 0 (the only one pruned) must be exactly 2:4, not made denser to pay for a layer that is never pruned."""
    model = make_tiny_model("llama", seed=0, layers=2)
    rep = run(model, make_tiny_tokenizer(), _cfg(ignore=["1.*"], nm="2:4", mixed_nm=True, nm_max_pairs=-1,
                                                 allocator="owl", steps=1), None, calib_ids=calib, progress=False)
    assert rep.steps[-1].layer_target_sparsity[0] == pytest.approx(0.5)
    for name, m in linear_modules(get_decoder_layers(model)[0]).items():
        w = get_weight(m)
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name


def test_sparsegpt_one_shot_on_a_multimodal_gemma3_checkpoint(calib):
    import losa

    model = _tiny_gemma3_multimodal()
    rep = losa.prune(model, None, {"method": "sparsegpt", "sparsity": 0.5, "device": "cpu"}, calib_ids=calib,
                     progress=False)
    w = torch.cat([get_weight(m).flatten() for layer in get_decoder_layers(model)
                   for m in linear_modules(layer, get_arch(model)).values()])
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-3) and rep.sparsity.overall == pytest.approx(
        0.5, abs=1e-3)

"""Whole models with the sparse runtime: generation, compact checkpoints, SmolLM2-135M, CUDA 2:4, CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer, prune_random

from losa.errors import LosaError
from losa.inference import SparseLinear, load_sparse, save_sparse, sparsify_for_inference
from losa.inference.formats import PAD
from losa.inference.sparsify import sparse_summary
from losa.models.linear import get_weight, is_prunable, set_weight
from losa.models.registry import get_decoder_layers, linear_modules

pytestmark = pytest.mark.usefixtures("no_measured_thresholds")


def dense_weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for i, layer in enumerate(get_decoder_layers(model)):
        for name, mod in layer.named_modules():
            if isinstance(mod, SparseLinear):
                out[f"{i}.{name}"] = mod.to_dense()
            elif is_prunable(mod):
                out[f"{i}.{name}"] = get_weight(mod).detach().clone()
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_generate_matches_dense(family):
    model = make_tiny_model(family, hidden=72)
    prune_random(model, 0.6)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        ref_tokens = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        ref_logits = model(ids).logits
    n_linear = sum(len(linear_modules(layer)) for layer in get_decoder_layers(model))
    summary = sparsify_for_inference(model)
    assert summary["replaced"] == n_linear and summary["kept_dense"] == 0
    assert summary["sparse_bytes"] < 0.5 * summary["dense_bytes"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0), ref_tokens)
    assert sparsify_for_inference(model)["replaced"] == 0  # idempotent


def test_bf16_model_prompt_uses_tiles_where_zero_skipping_is_off(monkeypatch):
    """On a CPU kind without the zero-skipping default (an AMX Xeon, a Zen 5) and nothing measured, no layer of a
    70 % bf16 model takes it, and the prompt still matches the dense bf16 model."""
    from losa.inference import thresholds

    monkeypatch.setattr(thresholds, "_this_cpu_sparse_gemm", lambda: False)
    model = make_tiny_model("llama", hidden=96)
    prune_random(model, 0.7)
    model.to(torch.bfloat16)
    ids = torch.randint(3, 128, (1, 40))
    with torch.no_grad():
        ref = model(ids).logits.float()
    summary = sparsify_for_inference(model, value_dtype="bfloat16")
    assert summary["sparse_prefill_layers"] == 0 and summary["replaced"] > 0
    with torch.no_grad():
        out = model(ids).logits.float()
    torch.testing.assert_close(out, ref, rtol=0.0, atol=0.03 * ref.abs().max().item())


@pytest.mark.parametrize("isa", [None, "avx2"])
def test_bf16_model_computes_like_the_dense_bf16_model(monkeypatch, isa, sparse_gemm_by_default):
    """A model converted to bf16 keeps bf16 activations through the sparse layers (decode and prefill).

    With ``isa="avx2"`` (forced; a CPU without native bf16) the layers widen bf16 inputs to float32 and the
    prompt runs the float32 GEMM; the outputs are still bf16 and match the dense bf16 model as closely.
    """
    from losa.inference.kernel import load_kernel

    if isa is not None:
        if load_kernel() is None or load_kernel().cpu_isa() < 1:
            pytest.skip("needs an x86-64 CPU with AVX2")
        monkeypatch.setenv("LOSA_SPARSE_ISA", isa)
    model = make_tiny_model("llama", hidden=96)
    prune_random(model, 0.7)
    model.to(torch.bfloat16)
    ids = torch.randint(3, 128, (1, 40))  # 40 prompt rows: sparse bf16 GEMM (70 %); then 1-row decode steps
    with torch.no_grad():
        ref = model(ids).logits.float()
        ref_step = model(ids[:, :1]).logits.float()
    summary = sparsify_for_inference(model, value_dtype="bfloat16")
    from losa.inference.kernel import bf16_dot_available
    assert summary["compute"] == ("bf16 products, float32 sums (AVX512-BF16)" if bf16_dot_available() else
                                  "float32 on the widened bf16 inputs (exact products, float32 sums; no AVX512-BF16)")
    if bf16_dot_available():  # every layer is ~70 % sparse: all of them skip zeros in the prompt GEMM
        assert summary["sparse_prefill_layers"] == summary["replaced"] > 0
    else:
        assert summary["sparse_prefill_layers"] == 0
    with torch.no_grad():
        out = model(ids).logits
        step = model(ids[:, :1]).logits
    assert out.dtype == torch.bfloat16
    # bf16 activations are re-rounded after every layer, so compare with a bf16-sized tolerance
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, rtol=0.0, atol=0.03 * scale)
    torch.testing.assert_close(step.float(), ref_step, rtol=0.0, atol=0.03 * scale)
    assert sparsify_for_inference(make_tiny_model("llama"), value_dtype="bfloat16")["compute"] == "float32"


def test_dense_layers_stay_dense_and_bf16_values():
    model = make_tiny_model("llama")
    layers = get_decoder_layers(model)
    prune_random(model, 0.5)
    q = layers[0].self_attn.q_proj
    set_weight(q, torch.randn_like(q.weight))  # one unpruned layer
    summary = sparsify_for_inference(model, value_dtype="bfloat16")
    assert summary["kept_dense"] == 1 and isinstance(layers[0].self_attn.q_proj, torch.nn.Linear)
    k = layers[0].self_attn.k_proj
    assert isinstance(k, SparseLinear) and k.value_dtype == torch.bfloat16 and "bfloat16" in repr(k)
    with pytest.raises(LosaError, match="min_sparsity"):
        sparsify_for_inference(model, min_sparsity=2.0)


@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16"])
def test_compact_checkpoint_roundtrip_and_size(tmp_path, value_dtype):
    from safetensors.torch import save_model

    model = make_tiny_model("llama", layers=2, hidden=128, vocab=64)
    prune_random(model, 0.7)
    save_model(model, str(tmp_path / "dense.safetensors"))
    summary = sparsify_for_inference(model, value_dtype=value_dtype)
    expected = dense_weights(model)
    path = save_sparse(model, tmp_path / "sparse.safetensors")

    fresh = make_tiny_model("llama", layers=2, hidden=128, vocab=64, seed=7)  # different weights
    load_sparse(fresh, path)
    # the loaded layers are counted as sparsifying counted them (the status line of a --compact load)
    assert sparse_summary(fresh) == summary and summary["replaced"] == 7 * 2
    assert summary["dense_bytes"] == sum(w.numel() for w in expected.values()) * 4
    got = dense_weights(fresh)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    ids = torch.randint(3, 64, (1, 6))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)

    # size: decoder linears shrink to (1 - sparsity) x value bytes + 1 bit per weight (+ 8 bytes of row
    # offset per row and PAD values per layer); the rest is unchanged
    linear = sum(w.numel() for w in expected.values())
    rows = sum(w.shape[0] for w in expected.values())
    other = sum(p.numel() for n, p in model.named_parameters()) * 4
    dense_size = (tmp_path / "dense.safetensors").stat().st_size
    vbytes = 4 if value_dtype == "float32" else 2
    predicted = other + linear * (0.3 * vbytes + 1 / 8) + rows * 8 + len(expected) * (PAD * vbytes + 8)
    assert dense_size > other + linear * 4 * 0.99
    assert abs((tmp_path / "sparse.safetensors").stat().st_size - predicted) < 0.03 * predicted


def test_load_sparse_errors(tmp_path):
    model = make_tiny_model("llama")
    with pytest.raises(LosaError, match="no sparse layers"):
        save_sparse(model, tmp_path / "x.safetensors")
    with pytest.raises(LosaError, match="not found"):
        load_sparse(model, tmp_path / "missing.safetensors")
    from safetensors.torch import save_model

    save_model(model, str(tmp_path / "plain.safetensors"))
    with pytest.raises(LosaError, match="not a losa compact checkpoint"):
        load_sparse(model, tmp_path / "plain.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for semi-structured 2:4")
def test_cuda_semi_structured_24(caplog):
    model = make_tiny_model("llama", hidden=128).to(torch.float16)
    for layer in get_decoder_layers(model):
        for mod in linear_modules(layer).values():
            w = get_weight(mod)
            keep = (torch.rand(w.shape[0], w.shape[1] // 4, 4).argsort(-1) < 2).reshape(w.shape)
            set_weight(mod, w * keep)
    model = model.cuda()
    ids = torch.randint(3, 128, (1, 32), device="cuda")
    ref = model(ids).logits
    n_linear = sum(len(linear_modules(layer)) for layer in get_decoder_layers(model))
    auto = sparsify_for_inference(model)  # converts the shapes measured faster on this GPU
    assert auto["device"] == "cuda" and auto["replaced"] + auto["semi_structured_slower"] == n_linear
    rest = sparsify_for_inference(model, semi_structured="always")  # the rest, so that the sparse path runs
    assert auto["replaced"] + rest["replaced"] == n_linear and rest["semi_structured_slower"] == 0
    assert "no 2:4 fp16/bf16 layer found" not in caplog.text  # layers converted by the first call are not missing
    torch.testing.assert_close(model(ids).logits, ref, rtol=2e-2, atol=2e-2)


def test_cli_generate_errors(tmp_path, capsys):
    from losa.cli import main

    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "tiny")
    assert main(["generate", str(tmp_path / "tiny"), "--prompt", "hi", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "tiny"), "--prompt", "hi"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def _tiny_checkpoint(tmp_path):
    import losa

    model = make_tiny_model("llama", seed=4, hidden=64)
    prune_random(model, 0.6)
    losa.save_checkpoint(model, make_tiny_tokenizer(), tmp_path / "m", {"recipe": {}})
    return str(tmp_path / "m")


def test_cli_generate_picks_the_arithmetic_per_cpu(tmp_path, capsys, monkeypatch):
    """``--dtype/--value-dtype/--prefill-dtype auto`` (the defaults): chosen for the (forced) CPU, one line why."""
    from losa.cli import main
    from losa.inference.kernel import load_kernel

    path = _tiny_checkpoint(tmp_path)
    monkeypatch.setenv("LOSA_SPARSE_ISA", "avx2")  # an AVX2-only CPU: float32 model, bf16 values
    assert main(["generate", path, "--prompt", "word5 word17", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().err  # the status lines
    lines = [ln for ln in out.splitlines() if ln.startswith("arithmetic")]
    assert len(lines) == 1 and "AVX2 (forced by LOSA_SPARSE_ISA)" in lines[0]
    assert "float32 model, bfloat16 values, float32 activations" in lines[0] and "no native bf16" in lines[0]
    assert "sparse layers: 14 (bfloat16 values; compute: float32; float32 prefill; " in out
    hint = "`losa bench-runtime` measures them on this CPU"
    if load_kernel() is not None:  # no thresholds measured here (no_measured_thresholds): the hint names the fix
        assert hint in out
        from losa.inference import thresholds

        thresholds.save({"dense_batch_threshold": 8}, "avx2")
        assert main(["generate", path, "--prompt", "word5", "--max-new-tokens", "2"]) == 0
        assert hint not in capsys.readouterr().err
    # explicit flags are kept; a bf16 prompt GEMM without native bf16 is not
    assert main(["generate", path, "--prompt", "word5", "--max-new-tokens", "2", "--dtype", "bf16",
                 "--value-dtype", "float32", "--prefill-dtype", "bfloat16"]) == 0
    line = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("arithmetic")][0]
    assert "bfloat16 model, float32 values" in line and "--prefill-dtype bfloat16 ignored" in line
    assert main(["generate", path, "--prompt", "word5", "--dtype", "int4"]) == 2
    assert "--dtype 'int4' is not supported" in capsys.readouterr().err
    monkeypatch.delenv("LOSA_SPARSE_ISA")
    from losa.inference.kernel import native_bf16

    assert main(["generate", path, "--prompt", "word5", "--max-new-tokens", "2", "--dense"]) == 0
    out = capsys.readouterr().err
    assert ("bfloat16 model" if native_bf16() else "float32 model") in out and "[dense]" in out
    assert "dense layers (--dense: no sparse values)" in out and "values" not in out.split("dense layers")[0]


# ------------------------------------------------------------------ the real SmolLM2-135M

@pytest.mark.slow
def test_smollm2_50pct_sparse_matches_dense(smollm2, data_dir):
    import copy

    model, tok = smollm2
    model = copy.deepcopy(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fast on a shared 2-core machine
    try:
        _check_smollm2(model, tok, data_dir)
    finally:
        torch.set_num_threads(threads)


def _check_smollm2(model, tok, data_dir) -> None:
    import losa
    from losa.eval.ppl import perplexity

    losa.prune(model, tok, losa.PruneConfig(method="wanda", sparsity=0.5, nsamples=4, seqlen=256,
                                            data_dir=str(data_dir)), progress=False)
    prompt = tok("The history of the city", return_tensors="pt").input_ids

    def run() -> tuple[float, torch.Tensor]:
        ppl = perplexity(model, tok, "wikitext2", seqlen=512, max_windows=4, data_dir=data_dir, progress=False)
        with torch.no_grad():
            return ppl, model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)

    ppl_dense, tokens_dense = run()
    summary = sparsify_for_inference(model, value_dtype="float32")
    assert summary["replaced"] == 30 * 7
    ppl_sparse, tokens_sparse = run()
    assert tokens_sparse.shape[1] == prompt.shape[1] + 32
    assert torch.equal(tokens_sparse, tokens_dense)
    assert abs(ppl_sparse / ppl_dense - 1) < 1e-3


def test_sparsify_any_module_not_only_registered_families():
    """A plain nn.Sequential whose linears are pruned is converted (torchao-style one call)."""
    from losa.inference import SparseLinear, sparsify_for_inference

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32),
                              torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        for lin in (net[0], net[2]):  # 60 % of each weight pruned by magnitude, the last layer stays dense
            w = lin.weight
            w.mul_(w.abs() > w.abs().flatten().kthvalue(int(0.6 * w.numel())).values)
    x = torch.randn(5, 64)
    want = net(x)
    summary = sparsify_for_inference(net)
    assert isinstance(net[0], SparseLinear) and isinstance(net[2], SparseLinear)
    assert isinstance(net[4], torch.nn.Linear) and not isinstance(net[4], SparseLinear)
    assert summary["replaced"] == 2 and summary["kept_dense"] == 1
    torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net(x[:1]), want[:1], rtol=1e-5, atol=1e-5)  # the batch-1 kernel path too


def last_line(err: str) -> str:
    """The last line of stderr (loading draws progress bars before an error)."""
    return err.strip().splitlines()[-1]


def test_cli_generate_checks_the_prompt_and_context_first(tmp_path, capsys):
    """As ``losa serve`` does per request: an empty prompt and prompt + --max-new-tokens beyond the context
    are one line (gpt2's learned positions raised IndexError, llama's rotary ones ran silently past 256)."""

    from losa.cli import main

    for family in ("gpt2", "llama"):
        make_tiny_model(family).save_pretrained(tmp_path / family)
        make_tiny_tokenizer().save_pretrained(tmp_path / family)
        path = str(tmp_path / family)
        assert main(["generate", path, "--prompt", "word1 word2", "--max-new-tokens", "300", "--dense"]) == 2
        assert last_line(capsys.readouterr().err) == (
            "error: --prompt (2 tokens) + --max-new-tokens (300) exceeds the model's context of 256 tokens; shorten the "
            "prompt or lower --max-new-tokens")
        assert main(["generate", path, "--prompt", "", "--dense"]) == 2
        assert last_line(capsys.readouterr().err) == "error: --prompt is empty; give some text"
    assert main(["generate", path, "--prompt", "word1", "--max-new-tokens", "255", "--dense"]) == 0  # fits exactly


def test_cli_generate_save_compact_errors(tmp_path, capsys):

    from losa.cli import main

    path = _tiny_checkpoint(tmp_path)
    missing = str(tmp_path / "missing")
    # before loading anything: the fix is a flag, not a Python call
    assert main(["generate", missing, "--prompt", "word5", "--dense", "--save-compact", str(tmp_path / "c")]) == 2
    assert last_line(capsys.readouterr().err) == "error: --save-compact writes the sparse layers; drop --dense"
    assert main(["generate", missing, "--prompt", "word5", "--save-compact", str(tmp_path)]) == 2
    assert last_line(capsys.readouterr().err).startswith(f"error: --save-compact {tmp_path} is a directory")
    make_tiny_model("llama").save_pretrained(tmp_path / "dense")
    make_tiny_tokenizer().save_pretrained(tmp_path / "dense")
    assert main(["generate", path, "--prompt", "word5", "--save-compact", str(tmp_path / "c.bin")]) == 2
    assert last_line(capsys.readouterr().err) == (f"error: --save-compact {tmp_path / 'c.bin'}: the file is written in "
                                                  f"the safetensors format; name it {tmp_path / 'c.safetensors'}")
    assert main(["generate", str(tmp_path / "dense"), "--prompt", "word5", "--save-compact",
                 str(tmp_path / "c.safetensors")]) == 2
    assert "no pruned layer" in capsys.readouterr().err and not (tmp_path / "c.safetensors").exists()
    assert main(["generate", path, "--prompt", "word5", "--max-new-tokens", "1", "--save-compact",
                 str(tmp_path / "c.safetensors")]) == 0
    assert (tmp_path / "c.safetensors").is_file()


def test_cli_compact_writes_the_file_generate_loads(tmp_path, capsys):
    """``losa compact`` writes a pruned checkpoint as a compact file without generating (the new-user trial found
    that only ``generate --save-compact`` did, with a prompt); with float32 values and model its logits are the
    pruned dense model's. An existing file is refused unless ``--overwrite``, in both commands."""
    import losa
    from losa.cli import main
    from losa.export.compact import compact_source_model, stored_dense_dtype, stored_value_dtype
    from losa.inference.arith import choose_arithmetic, detect_isa

    model = make_tiny_model("llama", seed=4, hidden=64)
    prune_random(model, 0.6)
    path = str(tmp_path / "m")  # as losa prune writes it: losa.json names the model it was pruned from
    losa.save_checkpoint(model, make_tiny_tokenizer(), path, {"source_model": "tiny-base", "recipe": {}})
    out = tmp_path / "c.safetensors"
    exact = ["--dtype", "float32", "--value-dtype", "float32"]
    assert main(["compact", path, "--out", str(out), *exact]) == 0
    wrote = last_line(capsys.readouterr().err)
    assert wrote.startswith(f"wrote {out} (") and f"load it with `losa generate tiny-base --compact {out}`" in wrote
    assert compact_source_model(out) == "tiny-base" and stored_dense_dtype(out) == "float32"
    # loaded with --dtype auto: where auto picks a bf16 model (native bf16), a note says the float32 weights round
    auto_bf16 = choose_arithmetic(detect_isa()).dtype == "bfloat16"
    assert main(["generate", path, "--prompt", "word5", "--max-new-tokens", "1", "--compact", str(out)]) == 0
    assert (f"note: {out} stores its other weights in float32; --dtype auto runs a bfloat16 model on this CPU, which "
            "rounds them (--dtype float32 keeps them as stored)" in capsys.readouterr().err) is auto_bf16
    dense, _ = losa.load_model(path)  # the pruned checkpoint, dense layers: the reference
    base = make_tiny_model("llama", seed=9, hidden=64)  # same architecture, other weights: all replaced from the file
    load_sparse(base, out)
    assert sum(isinstance(m, SparseLinear) for m in base.modules()) == 7 * len(base.model.layers)
    ids = torch.randint(0, 128, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(base(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    # a finished file is not replaced silently
    assert main(["compact", path, "--out", str(out), *exact]) == 2
    assert last_line(capsys.readouterr().err) == (f"error: --out {out} already exists; choose another path or pass "
                                                  "--overwrite to replace it")
    assert main(["generate", path, "--prompt", "word5", "--save-compact", str(out)]) == 2
    assert last_line(capsys.readouterr().err) == (f"error: --save-compact {out} already exists; choose another path "
                                                  "or delete it first to replace it")
    assert stored_value_dtype(out) == "float32"
    assert main(["compact", path, "--out", str(out), "--overwrite", "--value-dtype", "bfloat16", "--dtype",
                 "bfloat16"]) == 0
    assert stored_value_dtype(out) == "bfloat16" and stored_dense_dtype(out) == "bfloat16"
    capsys.readouterr()
    # --overwrite never replaces a file of the checkpoint being compacted (the trial lost its model that way)
    weights = tmp_path / "m" / "model.safetensors"
    before = weights.read_bytes()
    assert main(["compact", path, "--out", str(weights), "--overwrite"]) == 2
    assert last_line(capsys.readouterr().err) == (f"error: --out {weights} is a weight file of the checkpoint being compacted "
                                                  f"({path}): replacing it would lose the model; write the compact "
                                                  "file elsewhere")
    assert weights.read_bytes() == before
    other = tmp_path / "m" / "sparse.safetensors"  # another file there (an earlier compact file) may be replaced
    assert main(["compact", path, "--out", str(other), *exact]) == 0
    assert main(["compact", path, "--out", str(other), "--overwrite", *exact]) == 0
    link = tmp_path / "link.safetensors"  # a link to the weights is the weights
    link.symlink_to(weights)
    assert main(["compact", path, "--out", str(link), "--overwrite"]) == 2 and weights.read_bytes() == before
    capsys.readouterr()
    # the file given where a model goes: the one-line hint names --compact (the trial got a hub-lookup error)
    for cmd in (["inspect", str(out)], ["generate", str(out), "--prompt", "word5"], ["eval", "ppl", str(out)],
                ["prune", str(out), "--method", "magnitude", "--no-save"], ["run", str(out), "--out", str(tmp_path / "r")]):
        assert main(cmd) == 2
        assert last_line(capsys.readouterr().err) == (
            f"error: {out} is a losa compact file, not a model: load it into tiny-base with "
            f"`losa generate tiny-base --compact {out}` (or losa serve), or give the pruned checkpoint")
    # and the other way round: a checkpoint directory or a plain safetensors file given to --compact
    assert main(["generate", path, "--prompt", "word5", "--compact", path]) == 2
    assert last_line(capsys.readouterr().err) == (
        f"error: compact checkpoint {path} is a directory (a model checkpoint?): give it as MODEL, or write a compact "
        f"file from it with `losa compact {path} --out FILE`")
    assert main(["generate", path, "--prompt", "word5", "--compact", f"{path}/model.safetensors"]) == 2
    assert last_line(capsys.readouterr().err).endswith(
        "no 'losa_sparse' metadata); write one from the pruned checkpoint with `losa compact CHECKPOINT --out FILE`")
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["inspect", str(tmp_path / "notes.txt")]) == 2
    assert last_line(capsys.readouterr().err) == (f"error: {tmp_path / 'notes.txt'} is a file; give a model directory "
                                                  "with config.json, a .gguf file, a hub id or a built-in alias")
    make_tiny_model("llama").save_pretrained(tmp_path / "dense")
    assert main(["compact", str(tmp_path / "dense"), "--out", str(tmp_path / "d.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "has no pruned layer" in last_line(err) and "note:" not in err  # no 'compacting with dense layers' note
    assert not (tmp_path / "d.safetensors").exists()
    # float32 values of a bf16 model 30 % sparse: 0.7 x 4 bytes + 1 bit per weight > 2 bytes dense
    light = make_tiny_model("llama", seed=4, hidden=64)
    prune_random(light, 0.3)
    light.save_pretrained(tmp_path / "light")
    assert main(["compact", str(tmp_path / "light"), "--out", str(tmp_path / "l.safetensors"), "--dtype", "bfloat16",
                 "--value-dtype", "float32"]) == 0
    assert ("warning: the sparse layers are not smaller than the dense ones; their float32 values are twice the "
            "model's bf16 weights: --value-dtype bfloat16 halves them (exact for a bf16 model)") in capsys.readouterr().err
    assert compact_source_model(tmp_path / "l.safetensors") == str(tmp_path / "light")  # no losa.json: itself


def test_cli_compact_file_keeps_its_stored_value_dtype_and_says_so(tmp_path, capsys, monkeypatch):
    """``--value-dtype`` cannot change a compact file's values: the arithmetic line names the stored dtype and a
    different request is a one-line warning."""
    import losa
    from losa.cli import main
    from losa.export.compact import stored_value_dtype

    monkeypatch.setenv("LOSA_SPARSE_ISA", "avx2")
    path = _tiny_checkpoint(tmp_path)
    model, _ = losa.load_model(path)
    sparsify_for_inference(model, value_dtype="bfloat16")
    save_sparse(model, tmp_path / "c.safetensors")
    assert stored_value_dtype(tmp_path / "c.safetensors") == "bfloat16"
    compact = ["--compact", str(tmp_path / "c.safetensors")]
    capsys.readouterr()  # (the progress bars of the loads above)
    assert main(["generate", path, "--prompt", "word5", "--max-new-tokens", "2", *compact,
                 "--value-dtype", "float32"]) == 0
    out = capsys.readouterr().err.splitlines()  # status lines
    assert out[0] == (f"warning: --value-dtype float32 ignored: {tmp_path / 'c.safetensors'} stores bfloat16 values "
                      "and they are used as stored (to change it, write the file again: losa compact CHECKPOINT "
                      "--out FILE --value-dtype float32)")
    assert "float32 model, bfloat16 values" in out[1] and out[1].startswith("arithmetic")
    # the file set the values' dtype, not a flag; the sparse layers it holds are counted as after sparsifying
    assert f"-- bfloat16 values as stored in {tmp_path / 'c.safetensors'}; auto on this CPU:" in out[1]
    n_linear = 7 * len(model.model.layers)  # q, k, v, o, gate, up, down per layer, all pruned 60 %
    assert [line for line in out if line.startswith("sparse layers:")][0].startswith(
        f"sparse layers: {n_linear} (bfloat16 values; compute: float32; float32 prefill; ")
    for args in ([], ["--value-dtype", "bfloat16"]):
        assert main(["generate", path, "--prompt", "word5", "--max-new-tokens", "2", *compact, *args]) == 0
        err = capsys.readouterr().err
        assert not err.startswith("warning") and "--value-dtype" not in err.splitlines()[0]
    assert main(["generate", path, "--prompt", "word5", *compact, "--dense"]) == 2
    assert last_line(capsys.readouterr().err) == "error: --compact loads sparse layers; drop --dense"
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert main(["generate", path, "--prompt", "word5", "--compact", str(tmp_path / "junk.safetensors")]) == 2
    assert "is not a readable safetensors file" in capsys.readouterr().err

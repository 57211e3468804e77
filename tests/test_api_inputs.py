"""Python API: inputs that used to be silently ignored or misread are refused with one line."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from safetensors.torch import load_file, save_file

import losa
from losa.errors import LosaError
from losa.inference import SparseLinear, sparsify_for_inference
from losa.pipelines.losa.config import LoSAConfig


def _pruned(sparsity=0.5, layers=2):
    model = make_tiny_model("llama", seed=0, layers=layers)
    losa.prune(model, make_tiny_tokenizer(), losa.PruneConfig(method="magnitude", sparsity=sparsity), progress=False)
    return model


def test_save_checkpoint_refuses_sparse_runtime_layers(tmp_path):
    """save_pretrained would write meta/values/row_ptr that load_model then replaced by random weights."""
    model = _pruned()
    sparsify_for_inference(model)
    with pytest.raises(LosaError, match="save them with losa.inference.save_sparse"):
        losa.save_checkpoint(model, None, tmp_path / "ck", {})
    assert not (tmp_path / "ck").exists()
    losa.save_checkpoint(_pruned(), None, tmp_path / "ok", None)  # no manifest entries: fine
    assert (tmp_path / "ok" / "losa.json").is_file()


def test_load_model_refuses_a_checkpoint_that_lacks_weights(tmp_path):
    model = make_tiny_model("llama", seed=0, layers=2)
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(LosaError, match=r"lacks 1 weight\(s\) of the model \(e.g. model.layers.1.mlp.up_proj.weight\); "
                                        r"the checkpoint is incomplete or of another model class than the causal LM "
                                        r"LlamaForCausalLM it was loaded as"):
        losa.load_model(tmp_path / "m")
    sparse = _pruned()
    sparsify_for_inference(sparse)
    sparse.save_pretrained(tmp_path / "s")  # what save_checkpoint now refuses, written directly
    with pytest.raises(LosaError, match="read it with losa.inference.load_sparse"):
        losa.load_model(tmp_path / "s")


def test_load_model_dtype_arguments(tmp_path):
    make_tiny_model("llama", seed=0, layers=1).save_pretrained(tmp_path / "m")
    with pytest.raises(LosaError, match="pass dtype="):
        losa.load_model(tmp_path / "m", torch_dtype=torch.bfloat16)
    with pytest.raises(LosaError, match="torch.int8 is not a floating-point dtype"):
        losa.load_model(tmp_path / "m", dtype=torch.int8)
    model, _ = losa.load_model(tmp_path / "m", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_sparsify_again_converts_the_rest_with_the_same_settings_only():
    model = _pruned()
    layer1 = model.model.layers[1]
    with torch.no_grad():  # keep layer 1 dense for the first call
        for m in layer1.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.add_((m.weight == 0) * 0.5)
    assert sparsify_for_inference(model, value_dtype="bfloat16")["replaced"] == 7
    for bad, msg in ((dict(), r"value_dtype=bfloat16 \(this call: float32\)"),
                     (dict(value_dtype="bfloat16", fmt="nm24"), r"fmt=bitmask \(this call: nm24\)"),
                     (dict(value_dtype="bfloat16", dense_batch_threshold=8), r"dense_batch_threshold=None \(this call: 8\)")):
        with pytest.raises(LosaError, match=f"already sparsified with {msg}; pass the same settings"):
            sparsify_for_inference(model, **bad)
    with torch.no_grad():
        for m in layer1.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(torch.rand_like(m.weight) > 0.6)
    assert sparsify_for_inference(model, value_dtype="bfloat16")["replaced"] == 7
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 14 and {m.value_dtype for m in sparse} == {torch.bfloat16}


def test_negative_dense_batch_threshold_is_refused():
    with pytest.raises(LosaError, match="dense_batch_threshold=-1 must be >= 0"):
        sparsify_for_inference(_pruned(), dense_batch_threshold=-1)


def test_prune_config_sparsity_with_nm_and_wrong_config_type():
    with pytest.raises(LosaError, match=r"invalid config: sparsity \(--sparsity\) has no effect with nm \(--nm\)"):
        losa.PruneConfig(sparsity=0.7, nm="2:4")
    assert losa.PruneConfig(**losa.PruneConfig(nm="2:4").model_dump()).nm == "2:4"  # default listed: fine
    model = make_tiny_model("llama", seed=0, layers=1)
    with pytest.raises(LosaError, match="not LoSAConfig; a LoSAConfig is run by losa.run"):
        losa.prune(model, make_tiny_tokenizer(), LoSAConfig())
    with pytest.raises(LosaError, match="not str"):
        losa.prune(model, make_tiny_tokenizer(), "wanda")


def test_load_sparse_into_any_module_and_bad_files(tmp_path):
    """load_sparse reads what save_sparse wrote for a plain module tree (sparsify_for_inference accepts any
    module); another model's size and a broken file are one line each."""
    from losa.inference import load_sparse, save_sparse

    def net(seed, hidden=64):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(32, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 16))

    model = net(0)
    with torch.no_grad():
        for m in model:
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(torch.rand_like(m.weight) > 0.6)
    x = torch.randn(3, 32)
    want = model(x)  # the dense pruned weights: the sparse layers compute exactly this (float32 values)
    sparsify_for_inference(model)
    save_sparse(model, tmp_path / "m.safetensors")
    loaded = load_sparse(net(1), tmp_path / "m.safetensors")
    assert isinstance(loaded[0], SparseLinear) and isinstance(loaded[2], SparseLinear)
    torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(LosaError, match=r"module '0' is \[64, 32\] in the file but \[48, 32\] in this model"):
        load_sparse(net(1, hidden=48), tmp_path / "m.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(LosaError, match="is not a readable safetensors file"):
        load_sparse(net(1), tmp_path / "bad.safetensors")
    # a file cut short (a copy that stopped): one line, not safetensors' error
    whole = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) - 100])
    with pytest.raises(LosaError, match="cut.safetensors is not a readable safetensors file"):
        load_sparse(net(1), tmp_path / "cut.safetensors")


def test_compact_header_reads_what_save_sparse_wrote(tmp_path):
    """The header, read without tensors, names the sparse modules, the recorded source model and both dtypes as
    save_sparse stored them; any other file (plain safetensors, garbage, a directory, nothing) is not compact."""
    from safetensors.torch import save_file

    from losa.export.compact import compact_header, is_compact_file
    from losa.inference import save_sparse

    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 16))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) > 0.7)
    sparsify_for_inference(model, value_dtype="bfloat16")
    model[1:].to(torch.float16)  # the dense tensors in another dtype than the values
    save_sparse(model, tmp_path / "m.safetensors", source_model="org/base")
    h = compact_header(tmp_path / "m.safetensors")
    assert h is not None and list(h.modules) == ["0"] and h.modules["0"]["shape"] == [64, 32]
    assert (h.source_model, h.value_dtype) == ("org/base", "bfloat16")
    assert h.dense_dtype == "float16"
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    for other in ("plain.safetensors", "junk.safetensors", "missing.safetensors", "."):
        assert compact_header(tmp_path / other) is None and not is_compact_file(tmp_path / other)


def test_sparsity_report_nm_argument_forms():
    from losa.export.verify import sparsity_report

    model = make_tiny_model("llama", seed=0, layers=2)
    losa.prune(model, make_tiny_tokenizer(), losa.PruneConfig(method="magnitude", nm="2:4"), progress=False)
    by_str, by_tuple = sparsity_report(model, "2:4"), sparsity_report(model, (2, 4))
    assert by_str == by_tuple and all(r.nm_ok for r in by_str.modules.values())
    assert not any(r.nm_ok for r in sparsity_report(model, [(1, 4), "1:4"]).modules.values())
    with pytest.raises(LosaError, match="nm lists 3 patterns for 2 decoder layers"):
        sparsity_report(model, [(2, 4)] * 3)
    with pytest.raises(LosaError, match="invalid N:M pattern 4:2"):
        sparsity_report(model, (4, 2))


def test_prune_report_records_the_calibration_ids_used():
    ids = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    rep = losa.prune(make_tiny_model("llama", seed=0, layers=1), make_tiny_tokenizer(),
                     losa.PruneConfig(method="wanda", sparsity=0.5), calib_ids=ids, progress=False)
    assert (rep.recipe["calib"], rep.recipe["nsamples"], rep.recipe["seqlen"]) == ("calib_ids", 3, 16)


def test_run_needs_two_calibration_windows():
    """RMI compares the layers over the windows (CKA needs at least 2): one row fails before any work."""
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(LosaError, match="calib_ids has 1 window\\(s\\); this needs at least 2"):
        losa.run(make_tiny_model("llama", seed=0, layers=1), make_tiny_tokenizer(),
                 LoSAConfig(nsamples=2, seqlen=16, recon_nsamples=1, device="cpu"), calib_ids=ids, progress=False)


def test_a_hub_dataset_name_is_left_to_the_hub():
    from losa.finetune.data import check_records_source

    assert check_records_source("tatsu-lab/alpaca") is None  # exactly 'org/name': loaded from the hub later


def test_run_checks_the_finetune_data_path_before_calibration(monkeypatch, tmp_path):
    """A fine-tuning data path that does not exist fails before the calibration text is read or generated."""
    def boom(*a, **k):
        raise AssertionError("calibration started before the data path was checked")

    monkeypatch.setattr("losa.pipelines.losa.loop.get_calibration", boom)
    with pytest.raises(LosaError, match="fine-tuning data .*nope.jsonl not found"):
        losa.run(make_tiny_model("llama", seed=0, layers=1), make_tiny_tokenizer(),
                 LoSAConfig(finetune_data=str(tmp_path / "nope.jsonl"), device="cpu"), progress=False)


def test_assigning_an_invalid_config_value_is_one_line_and_keeps_the_old_value():
    """Assignments are validated like construction: a LosaError (not pydantic's), the field unchanged."""
    from losa.lora.config import SparseLoRAConfig

    cfg = losa.PruneConfig(sparsity=0.5)
    with pytest.raises(LosaError, match=r"^invalid config: sparsity: sparsity 2.0 is outside \[0, 1\)"):
        cfg.sparsity = 2.0
    assert cfg.sparsity == 0.5
    with pytest.raises(LosaError, match="invalid config: sparsty: unknown option of PruneConfig"):
        cfg.sparsty = 0.6
    cfg.sparsity = 0.6  # a valid value is stored
    assert cfg.sparsity == 0.6 and cfg.non_default_fields() == {"sparsity"}
    lora = SparseLoRAConfig(rank=8, r_max=16)
    with pytest.raises(LosaError, match="rank 20 exceeds capacity r_max=16"):  # a check across fields
        lora.rank = 20
    assert lora.rank == 8 and lora.model_fields_set == {"rank", "r_max"}


def test_a_run_that_raises_leaves_no_adapters_and_prune_says_what_the_model_is(tmp_path):
    """API trial: a losa.run stopped by an error left 210 adapter wrappers behind, which perplexity, save_checkpoint
    and prune then used without a word (prune warned about experts on a dense model). Now the adapters are merged
    (the model is a plain, partly pruned model); prune refuses adapters and a sparsified model by name, and says
    when a model comes out sparser than its target."""
    from losa.inference import sparsify_for_inference
    from losa.lora import SparseLoRAConfig, add_sparse_lora
    from losa.lora.model import sparse_lora_modules

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    model, tok = make_tiny_model("llama", seed=0, layers=2), make_tiny_tokenizer()
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = LoSAConfig(sparsity=0.5, steps=2, nsamples=4, seqlen=16, recon_nsamples=2, r_max=8, r_min=1,
                     omega_first=4, omega_last=4, device="cpu")
    with pytest.warns(UserWarning), pytest.raises(Stop):
        losa.run(model, tok, cfg, calib_ids=ids, progress=False, on_step=stop)
    assert not sparse_lora_modules(model)
    assert all(type(m).__name__ == "Linear" for n, m in model.named_modules() if n.endswith("q_proj"))
    assert 0.3 < losa.sparsity_report(model).overall < 0.5  # pruned to step 1's S_t, adapters merged
    add_sparse_lora(model, SparseLoRAConfig(r_max=4, rank=2))
    with pytest.raises(LosaError, match=r"holds sparse LoRA adapters; merge them with losa.lora.merge_and_unload"):
        losa.prune(model, tok, losa.PruneConfig(method="magnitude"), progress=False)
    dense = make_tiny_model("llama", seed=0, layers=2)
    losa.prune(dense, tok, losa.PruneConfig(method="magnitude", sparsity=0.5), progress=False)
    with pytest.warns(UserWarning, match=r"came out 50.00% sparse, above the 30.00% target: it was already sparser"):
        losa.prune(dense, tok, losa.PruneConfig(method="magnitude", sparsity=0.3), progress=False)
    sparsify_for_inference(dense)
    with pytest.raises(LosaError, match=r"holds sparse runtime layers \(losa.sparsify_for_inference\): prune or "
                                        r"inspect the checkpoint before sparsifying it"):
        losa.sparsity_report(dense)


def test_perplexity_and_step_eval_inputs_are_checked_in_one_line():
    """API trial: swapped arguments and a str / float window reached torch; a dict step_eval an AttributeError."""
    from losa.pipelines.losa import StepEval

    model, tok = make_tiny_model("llama", seed=0, layers=1), make_tiny_tokenizer()
    cases = [((tok, model), {}, r"perplexity takes \(model, tokenizer, ...\), got \(.*, LlamaForCausalLM\)"),
             ((model, tok), {"seqlen": "64"}, "seqlen must be an int number of tokens, got '64'"),
             ((model, tok), {"seqlen": 256.0}, "seqlen must be an int number of tokens, got 256.0"),
             ((model, tok), {"max_windows": 3.5}, "max_windows must be an int or None, got 3.5"),
             ((model, tok), {"max_windows": True}, "max_windows must be an int or None, got True")]
    for args, kw, msg in cases:
        with pytest.raises(LosaError, match=msg):
            losa.perplexity(*args, dataset="none.txt", **kw)
    cfg = LoSAConfig(sparsity=0.5, steps=1, nsamples=2, seqlen=16, recon_nsamples=1, device="cpu")
    with pytest.raises(LosaError, match="step_eval: unknown field"):
        losa.run(model, tok, cfg, step_eval={"dataset": "x"}, progress=False)
    with pytest.raises(LosaError, match="no such file"), pytest.warns(UserWarning):  # a dict is a StepEval
        losa.run(model, tok, cfg, step_eval={"datasets": ["none.txt"], "seqlen": 16}, progress=False)
    assert StepEval(["a.txt"], 16).seqlen == 16


def test_an_unknown_config_key_names_the_field_meant():
    """API trial: 'sparsty: unknown option; ... see --help' told a Python user nothing; lr belongs to finetune."""
    from losa.utils.config import build_config

    cases = [(lambda: losa.PruneConfig(sparsty=0.5), "sparsty: unknown option of PruneConfig; did you mean 'sparsity'?"),
             (lambda: LoSAConfig(lr=1e-3), "lr: unknown option of LoSAConfig; did you mean 'finetune.lr'?"),
             (lambda: LoSAConfig(finetune={"lrr": 1e-3}), "lrr: unknown option of FinetuneConfig; did you mean 'lr'?"),
             (lambda: losa.PruneConfig(xyz=1), "xyz: unknown option of PruneConfig; check the spelling "
                                               "(help(PruneConfig) or --help lists them)"),
             (lambda: build_config(losa.PruneConfig, {"nsample": 8}),  # a YAML recipe's mapping
              "nsample: unknown option of PruneConfig; did you mean 'nsamples'?"),
             (lambda: build_config(losa.PruneConfig, {"method": "sparsegpt", "blocksize": 64}),  # trial: 'spelling'
              "blocksize: unknown option of PruneConfig; it is an option of sparsegpt: give it under 'options' "
              "(options: {blocksize: …})")]
    for make, msg in cases:
        with pytest.raises(LosaError) as e:
            make()
        assert str(e.value) == f"invalid config: {msg}"


def test_nm_as_a_tuple_and_a_compact_file_given_to_load_model(tmp_path):
    """API trial: PruneConfig(nm=(2, 4)) said 'Input should be a valid string' (sparsity_report takes the tuple);
    load_model on a compact file did not name load_sparse."""
    assert losa.PruneConfig(nm=(2, 4)).nm == "2:4"
    with pytest.raises(LosaError, match=r"nm 2.5 is not an N:M pattern; write it as '2:4' \(or \(2, 4\)\)"):
        losa.PruneConfig(nm=2.5)
    (tmp_path / "m.sparse.safetensors").write_bytes(b"x")
    with pytest.raises(LosaError, match=r"is a safetensors file, not a model: a losa compact file loads into its "
                                        r"base model with losa.inference.load_sparse\(model, path\)"):
        losa.load_model(str(tmp_path / "m.sparse.safetensors"))


def test_save_checkpoint_refuses_what_it_could_not_write_back(tmp_path):
    """API trial: a manifest could overwrite the recorded versions / creation time, an unserialisable value was a
    bare TypeError, and a model with adapter wrappers saved a checkpoint load_model could not read."""
    from losa.lora import SparseLoRAConfig, add_sparse_lora

    model, tok = make_tiny_model("llama", seed=0, layers=1), make_tiny_tokenizer()
    for manifest, msg in (({"versions": "mine"}, r"manifest key\(s\) versions are recorded by losa itself"),
                          ({"note": object()}, r"manifest\['note'\] cannot be written to losa.json")):
        with pytest.raises(LosaError, match=msg):
            losa.save_checkpoint(model, tok, tmp_path / "c", manifest)
        assert not (tmp_path / "c").exists()
    add_sparse_lora(model, SparseLoRAConfig(r_max=4, rank=2), mask_from_weights=False)
    with pytest.raises(LosaError, match=r"holds sparse LoRA adapters; merge them with losa.lora.merge_and_unload"):
        losa.save_checkpoint(model, tok, tmp_path / "c")


def test_sparsify_for_inference_of_an_unpruned_model_says_so():
    """API trial: an unpruned model came back unchanged without a word (only replaced: 0 in the summary)."""
    import warnings as w

    model = make_tiny_model("llama", seed=0, layers=1)
    with pytest.warns(UserWarning, match=r"no linear layer is sparse enough to convert \(min_sparsity=0.25\): "
                                         r"nothing was converted; prune the model first"):
        assert sparsify_for_inference(model)["replaced"] == 0
    losa.prune(model, make_tiny_tokenizer(), losa.PruneConfig(method="magnitude", sparsity=0.5), progress=False)
    with w.catch_warnings():
        w.simplefilter("error")
        assert sparsify_for_inference(model)["replaced"] > 0
        assert sparsify_for_inference(model)["replaced"] == 0  # called again: already converted, no warning

"""GGUF loading: a tiny LLaMA written with the ``gguf`` package loads back to identical logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

import losa
from losa.models.loading import load_gguf

gguf = pytest.importorskip("gguf")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF rotary layout -> GGUF interleaved layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, path) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_roundtrip_logits(tmp_path):
    ref = make_tiny_model("llama", seed=3)
    ref.config.tie_word_embeddings = False
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(ref, path)
    model, _tok = load_gguf(path)
    assert not hasattr(model.config, "quantization_config")
    ids = torch.randint(3, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    # the loaded model is a plain model: it trains and saves
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_gguf_missing_file(tmp_path):
    with pytest.raises(losa.LosaError, match="not found"):
        losa.load_model(str(tmp_path / "nope.gguf"))


def test_any_gguf_is_converted_once_keyed_by_its_content(tmp_path, monkeypatch):
    import shutil

    import torch

    from losa.models import loading

    monkeypatch.setenv("LOSA_CACHE_DIR", str(tmp_path / "cache"))
    ref = make_tiny_model("llama", layers=2)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(ref, path)
    calls = []
    real = loading.load_gguf
    monkeypatch.setattr(loading, "load_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    ids = torch.randint(3, 100, (1, 12))
    first, _ = losa.load_model(str(path))
    again, _ = losa.load_model(str(path))
    assert len(calls) == 1  # the second load reads the cached safetensors
    copy = tmp_path / "renamed.gguf"
    shutil.copy(path, copy)
    losa.load_model(str(copy))
    assert len(calls) == 1  # same content, another name: still cached
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first(ids).logits, again(ids).logits, rtol=0, atol=0)
    write_tiny_gguf(make_tiny_model("llama", layers=2, seed=1), path)  # the file changes: converted again
    losa.load_model(str(path))
    assert len(calls) == 2


def test_gguf_conversion_bar_follows_quiet(tmp_path, capsys):
    """``--quiet`` (transformers' progress bars off) also silences the dequantisation bar, which transformers
    draws with plain tqdm (the new-user trial saw it under --quiet); with bars on it is drawn as before."""
    import transformers

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(make_tiny_model("llama", seed=3), path)
    before = transformers.utils.logging.is_progress_bar_enabled()
    try:
        for enabled in (True, False):
            (transformers.utils.logging.enable_progress_bar if enabled
             else transformers.utils.logging.disable_progress_bar)()
            capsys.readouterr()
            load_gguf(path)
            assert ("de-quantizing GGUF tensors" in capsys.readouterr().err) is enabled
    finally:
        (transformers.utils.logging.enable_progress_bar if before else transformers.utils.logging.disable_progress_bar)()

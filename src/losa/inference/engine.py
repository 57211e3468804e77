"""C++ decode engine: a whole decode step of a LLaMA-style model in one call (``csrc/decode_engine.cpp``).

A small model decodes far above its bandwidth floor through Python modules: each token runs hundreds of tiny
operations (norms, rotary, cache writes, attention, seven linears per layer) whose call overhead exceeds
their arithmetic. The engine runs the step in C++ on float32 buffers: the sparse row loops, RMSNorm, RoPE,
the KV-cache write, the decode attention and SwiGLU back to back, then the LM head.

The prompt still runs through the model's own forward (batched GEMMs), its KV cache is copied into the engine's,
and every one-token step afterwards is an engine call: in the engine's own token loop for plain calls
(:mod:`losa.inference.engine_loop`, the tokens of ``generate``), or attached to Hugging Face ``generate``
(:func:`attach`) for calls with other generation options; sampling, stopping criteria and streaming behave as in
``generate`` either way. Supported: one sequence, a
float32 or bfloat16 model of a type in :data:`ENGINE_MODEL_TYPES` (LLaMA-style decoder layers: RMSNorm, rotary
embedding, grouped-query attention, SwiGLU MLP) whose decoder linears are :class:`SparseLinear` or ``nn.Linear``
in the model's dtype and whose LM head is a :class:`~losa.inference.decode.BF16LMHead` or an ``nn.Linear``.
A bf16 model's step computes in float32 and rounds to bf16 wherever the model's modules round (each linear's
output, norms, rotary products, residual sums, ...); its linears take bf16 inputs (the AVX512-BF16 loop where
the CPU has it).
:func:`engine_problem` says why a model is not supported; :class:`~losa.inference.decode.LeanDecoder`
falls back to ``generate``'s own steps then. Measurements: benchmarks/bench_decode.py (mode ``engine``),
benchmarks/results/decode.md and llamacpp.md.

Numbers: the same operations as the model's own forward (the reference of ``tests/test_inference_engine.py``);
sums run in another order, so logits agree to float32 rounding (float32 models) or within bf16 rounding (bf16
models), not bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from losa.errors import LosaError
from losa.inference import kernel as _kernel
from losa.inference.formats import FORMAT_CODES
from losa.inference.sparse_linear import SparseLinear

#: ``config.model_type`` values whose decoder layers the engine computes (LLaMA-style: RMSNorm, RoPE, GQA, SwiGLU)
ENGINE_MODEL_TYPES = ("llama", "mistral", "qwen2")
_PROJ = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
         ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


#: model dtypes the engine decodes (float32 arithmetic; a bf16 model's values are rounded where its modules round)
ENGINE_DTYPES = (torch.float32, torch.bfloat16)


def _linear_problem(name: str, m: Any, dtype: torch.dtype) -> str | None:
    if isinstance(m, SparseLinear):
        return None
    # exactly nn.Linear: a subclass may compute something else in its forward
    if type(m) is nn.Linear and m.weight.dtype == dtype and m.weight.device.type == "cpu":
        return None
    return f"{name} is a {type(m).__name__} (the engine takes SparseLinear or a CPU nn.Linear of the model's dtype)"


#: hooks transformers installs itself to capture hidden states / attentions: they record only when those
#: outputs are asked for, which the engine refuses anyway (:func:`generate_problem`)
_OUTPUT_CAPTURING = "transformers.utils.output_capturing"


def _hooked(model: nn.Module) -> str | None:
    """The first module with forward hooks (or accelerate's hook / an instance-level forward), or None."""
    for name, m in model.named_modules():
        hooks = [h for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
                 if getattr(h, "__module__", None) != _OUTPUT_CAPTURING]
        if hooks or hasattr(m, "_hf_hook") or "forward" in vars(m):
            return name or type(m).__name__
    return None


def engine_problem(model: nn.Module) -> str | None:
    """Why the engine cannot decode ``model``, or None when it can.

    Args:
        model: a causal LM (after :func:`~losa.inference.sparsify.sparsify_for_inference` or dense).

    Returns:
        A short reason ("model type gemma is not LLaMA-style ...") or None.
    """
    from losa.inference.decode import BF16LMHead

    config = getattr(model, "config", None)
    mtype = getattr(config, "model_type", None)
    if mtype not in ENGINE_MODEL_TYPES:
        return f"model type {mtype!r} is not one the engine computes ({', '.join(ENGINE_MODEL_TYPES)})"
    if _kernel.load_kernel() is None:
        return "the compiled kernel is unavailable"
    if getattr(config, "hidden_act", None) not in ("silu", "swish"):
        return f"activation {getattr(config, 'hidden_act', None)!r} is not SiLU"
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or getattr(base, "embed_tokens", None) is None or getattr(base, "norm", None) is None:
        return "the model has no model.layers / embed_tokens / norm"
    emb = base.embed_tokens.weight
    if emb.dtype not in ENGINE_DTYPES or emb.device.type != "cpu":
        return f"the model is {emb.dtype} on {emb.device.type} (the engine decodes float32 and bfloat16 CPU models)"
    if getattr(base, "rotary_emb", None) is None:
        return "the model has no rotary embedding module"
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            return f"layer {i} has no self_attn or normalises q/k (not LLaMA-style)"
        for part, proj in _PROJ:
            m = getattr(getattr(layer, part, None), proj, None)
            if (why := _linear_problem(f"layer {i} {part}.{proj}", m, emb.dtype)) is not None:
                return why
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w = getattr(getattr(layer, norm, None), "weight", None)
            if w is None or w.dtype != emb.dtype:
                return f"layer {i} has no {norm}.weight in the model's dtype"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, BF16LMHead):  # a dense layer either way: its bf16 copy, or (in place) its weight
        if head.in_place and (head.weight.dtype != emb.dtype or head.weight.device.type != "cpu"):
            return f"the LM head's weight is {head.weight.dtype} on {head.weight.device.type}, the model {emb.dtype}"
    elif (why := _linear_problem("the LM head", head, emb.dtype)) is not None:
        return why
    if (hooked := _hooked(model)) is not None:
        return f"{hooked} has forward hooks or its own forward (the engine would skip them)"
    return None


def sliding_window(model: nn.Module) -> int | None:
    """The model's attention window (positions), or None when it attends over every position."""
    config = getattr(model, "config", None)
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


#: ``generate`` options (arguments, or fields of the model's generation config) that the engine does not serve:
#: several sequences per prompt, caches other than the prompt's dynamic cache, speculative or chunked decoding,
#: outputs it does not produce (hidden states, attentions, the returned cache, which would hold only the prompt)
_UNSERVED = ("num_beams", "num_return_sequences", "cache_implementation", "prompt_lookup_num_tokens",
             "prefill_chunk_size", "assistant_model", "assistant_early_exit", "inputs_embeds", "past_key_values",
             "cache", "return_dict_in_generate", "output_hidden_states", "output_attentions", "negative_prompt_ids",
             "guidance_scale")


def generate_problem(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, kwargs: dict,
                     context: int | None) -> str | None:
    """Why one ``model.generate(input_ids, max_new_tokens=..., **kwargs)`` call cannot decode with the engine.

    Args:
        model: a model :func:`engine_problem` accepts.
        input_ids: the prompt ids ``(batch, T)``.
        max_new_tokens: tokens to generate.
        kwargs: the other ``generate`` arguments.
        context: the model's context in positions (None: unknown).

    Returns:
        A short reason, or None when the engine serves the call.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        return f"a batch of {input_ids.shape[0]} prompts (the engine decodes one sequence)"
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        return "the attention mask has padding"
    needed = input_ids.shape[1] + max_new_tokens
    if (window := sliding_window(model)) is not None and needed > window:
        return f"prompt + new tokens ({needed}) exceed the sliding window ({window})"
    if context is not None and needed > context:
        return f"prompt + new tokens ({needed}) exceed the context ({context})"
    gc = getattr(model, "generation_config", None)
    for name in _UNSERVED:
        value = kwargs.get(name, getattr(gc, name, None))
        if value is not None and value is not False and not (name in ("num_beams", "num_return_sequences")
                                                                 and value == 1):
            return f"generate option {name}={value!r}" if not isinstance(value, (torch.Tensor, nn.Module)) \
                else f"generate option {name}"
    if kwargs.get("use_cache", getattr(gc, "use_cache", True)) is False:
        return "use_cache=False"
    return None


def model_signature(model: nn.Module) -> tuple:
    """What the engine reads from ``model``, as identities: it changes when a weight, dtype or module is replaced
    or a hook is added."""
    parts: list = [type(model)]
    for name, m in model.named_modules():  # one walk: every call of LeanDecoder.generate pays it
        # hooks too: a hook added later switches the engine off
        parts.append((name, type(m), tuple(m._forward_hooks), tuple(m._forward_pre_hooks)))
        if "rotary_emb." in f"{name}.":  # dynamic rope types replace their frequencies in every forward
            continue
        for tensors in (m._parameters, m._buffers):
            for key, t in tensors.items():
                if t is not None:
                    parts.append((key, t.data_ptr(), t.dtype, tuple(t.shape)))
    return tuple(parts)


def _eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if (v := getattr(norm, name, None)) is not None:
            return float(v)
    raise LosaError(f"{type(norm).__name__} has no epsilon attribute (variance_epsilon / eps)")


def _queue_linear(eng: Any, m: nn.Module) -> None:
    """Queue ``m`` on the C++ engine: packed buffers for sparse layers, else a dense weight (read in place): the
    weight of a dense layer or an in-place bf16 head, the bf16 copy of a float32 model's :class:`BF16LMHead`."""
    from losa.inference.decode import BF16LMHead

    if isinstance(m, SparseLinear):
        b = m._buffers
        eng.add_packed(b["meta"], b["values"], b["row_ptr"], b["bias"], m.out_features, m.in_features,
                       FORMAT_CODES[m.fmt])
    elif isinstance(m, BF16LMHead) and not m.in_place:  # its copy keeps every weight: the values are W [N, K]
        eng.add_dense(m.dense_copy(), m._buffers["bias32"])
    else:
        eng.add_dense(m.weight.detach(), None if m.bias is None else m.bias.detach())


def _rotary_tables(rotary: nn.Module, max_len: int, head_dim: int, dtype: torch.dtype) -> tuple:
    """cos and sin ``[max_len, head_dim]`` (float32 holding the model dtype's values) as the model's decode steps get them.

    One call for every position, except for rope types whose tables depend on the positions seen so far
    (``dynamic``, ``longrope``: transformers recomputes their frequencies from the largest position of each
    forward): those get one call per position, as a one-token step at that position would.
    """
    rope_type = getattr(rotary, "rope_type", "default")
    with torch.inference_mode(False), torch.no_grad():
        if rope_type in ("dynamic", "longrope"):
            # the module updates its frequencies as it goes: put its state back afterwards
            buffers = {k: v.clone() for k, v in rotary._buffers.items() if v is not None}
            attrs = {k: getattr(rotary, k) for k in ("max_seq_len_cached", "attention_scaling") if hasattr(rotary, k)}
            try:
                tables = [rotary(torch.zeros(1, 1, head_dim, dtype=dtype), torch.tensor([[p]]))
                          for p in range(max_len)]
            finally:
                for k, v in buffers.items():
                    rotary._buffers[k] = v
                for k, v in attrs.items():
                    setattr(rotary, k, v)
            cos = torch.cat([c[0] for c, _ in tables])
            sin = torch.cat([s_[0] for _, s_ in tables])
        else:
            cos, sin = rotary(torch.zeros(1, max_len, head_dim, dtype=dtype), torch.arange(max_len).unsqueeze(0))
            cos, sin = cos[0], sin[0]
    return cos.float().contiguous(), sin.float().contiguous()


class DecodeEngine:
    """The C++ engine for one model and cache length (positions ``0 .. max_len - 1``).

    The engine reads the model's buffers in place (no copy of the weights); it holds its own KV cache of
    ``2 x layers x kv_heads x max_len x head_dim`` values in the model's dtype, in transparent-huge-page memory
    where that is on (:func:`losa.inference.kernel.hugepages_enabled`): every step reads the whole filled part of
    it, as it reads a weight.

    Args:
        model: a float32 or bfloat16 causal LM that :func:`engine_problem` accepts.
        max_len: positions the cache holds (prompt + new tokens); at most the model's sliding window.

    Raises:
        LosaError: when :func:`engine_problem` names a reason, ``max_len`` < 1, or ``max_len`` exceeds the
            model's sliding window.
    """

    def __init__(self, model: nn.Module, max_len: int) -> None:
        if (why := engine_problem(model)) is not None:
            raise LosaError(f"the decode engine cannot run this model: {why}")
        if max_len < 1:
            raise LosaError(f"max_len {max_len} must be at least 1")
        if (window := sliding_window(model)) is not None and max_len > window:
            raise LosaError(f"a cache of {max_len} positions exceeds the model's sliding window ({window}); the "
                            f"engine attends over every position, so use at most {window}")
        cfg, base = model.config, model.model
        heads, kv_heads = int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or
                                                            cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        attn0 = base.layers[0].self_attn
        scale = float(getattr(attn0, "scaling", head_dim ** -0.5))
        dtype = base.embed_tokens.weight.dtype
        cos, sin = _rotary_tables(base.rotary_emb, max_len, head_dim, dtype)
        k = _kernel.load_kernel()
        self._eng = k.DecodeEngine(base.embed_tokens.weight.detach(), cos, sin, base.norm.weight.detach(), heads,
                                   kv_heads, head_dim, _eps(base.norm), scale, _kernel.best_isa())
        for layer in base.layers:
            for part, proj in _PROJ:
                _queue_linear(self._eng, getattr(getattr(layer, part), proj))
            self._eng.add_layer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach())
        # the head's weight in place (a bf16 one through the AVX512-BF16 loop where it runs, else the float32-input
        # loop on the widened weights), or a float32 model's bf16 copy of it
        _queue_linear(self._eng, model.get_output_embeddings())
        self._eng.set_head()
        # ordinary tensors even when built inside torch.inference_mode, so that later generations outside it can
        # still copy a prompt's cache in
        with torch.inference_mode(False), torch.no_grad():
            # [layers, kv_heads, max_len, head_dim] each
            self.k_cache, self.v_cache = self._eng.allocate_cache(hugepages=_kernel.hugepages_enabled())
        self.max_len = int(max_len)
        self.num_layers = len(base.layers)
        #: next position to decode (None until a prompt's cache has been loaded)
        self.pos: int | None = None

    def load_prompt_cache(self, cache: Any) -> int:
        """Copy a transformers cache of one sequence (after the prompt's forward) into the engine.

        Args:
            cache: a transformers cache (``DynamicCache``, or a ``StaticCache`` whose slots beyond the prompt are
                unused) whose ``layers[i].keys`` / ``.values`` are ``[1, kv_heads, >= T, head_dim]``, ``T`` =
                ``cache.get_seq_length()``.

        Returns:
            ``T``, the next position to decode.

        Raises:
            LosaError: a cache of another layout, batch size or length than the engine holds.
        """
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != self.num_layers or not hasattr(cache, "get_seq_length"):
            raise LosaError("the decode engine needs a transformers cache with one entry per layer")
        t = int(cache.get_seq_length())
        if t > self.max_len:
            raise LosaError(f"the prompt has {t} positions, the engine's cache {self.max_len}")
        for i, layer in enumerate(layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if (keys is None or values is None or keys.dim() != 4 or keys.shape[0] != 1 or keys.shape[2] < t
                    or values.shape[2] < t):
                raise LosaError("the decode engine needs the cache of one sequence ([1, kv_heads, T, head_dim])")
            self.k_cache[i, :, :t].copy_(keys[0, :, :t])
            self.v_cache[i, :, :t].copy_(values[0, :, :t])
        self.pos = t
        return self.pos

    def step(self, token: int) -> torch.Tensor:
        """Decode ``token`` at the next position; returns its logits, float32 ``[vocab]``.

        Raises:
            LosaError: before :meth:`load_prompt_cache`, or when the cache is full.
        """
        if self.pos is None:
            raise LosaError("load the prompt's cache first (load_prompt_cache)")
        if self.pos >= self.max_len:
            raise LosaError(f"the engine's cache of {self.max_len} positions is full")
        logits = self._eng.step(int(token), self.pos)
        self.pos += 1
        return logits


@contextlib.contextmanager
def attach(model: nn.Module, engine: DecodeEngine) -> Iterator[None]:
    """Route ``model``'s one-token forwards to ``engine`` while inside (for ``model.generate``).

    The first forward (the prompt) runs the model as usual and loads its cache into the engine; every later
    forward of one token of one sequence is :meth:`DecodeEngine.step`. ``model.forward`` is restored on exit.

    Args:
        model: the model the engine was built from.
        engine: its engine.

    Raises:
        LosaError: (from the forward) an attention mask with padding, a batch of several sequences, or a step
            whose position disagrees with the engine's (the engine decodes one unpadded sequence).
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward
    own = vars(model).get("forward")  # an instance-level forward (e.g. set by accelerate hooks) to put back
    engine.pos = None

    # the signature of the model's forward (functools.wraps): generate inspects it, e.g. for logits_to_keep
    @functools.wraps(original)
    def forward(input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if input_ids is None or input_ids.shape[0] != 1 or kwargs.get("inputs_embeds") is not None:
            raise LosaError("the decode engine decodes one sequence of token ids; use decode_engine='off' for batches")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise LosaError("the decode engine needs an attention mask without padding")
        if engine.pos is None:  # the prompt: the model's own forward, then its cache into the engine
            out = original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
            engine.load_prompt_cache(out.cache)
            return out
        if input_ids.shape[1] != 1:
            raise LosaError("the decode engine takes one token per step after the prompt")
        if position_ids is not None and int(position_ids[0, -1]) != engine.pos:
            raise LosaError(f"step at position {int(position_ids[0, -1])}, the engine is at {engine.pos}")
        logits = engine.step(int(input_ids[0, 0]))
        return CausalLMOutputWithPast(logits=logits.view(1, 1, -1), cache=kwargs.get("cache"))

    model.forward = forward
    try:
        yield
    finally:
        if own is not None:
            model.forward = own
        else:
            del model.forward  # the class's forward shows again

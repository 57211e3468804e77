"""Lean decode for ``losa generate`` and ``losa serve``: LM head precision, static KV cache, compiled step.

Per decoded token a small model spends much of its time outside the sparse linears: the LM head (for a
float32 model with a tied embedding it streams the whole float32 embedding matrix) and the framework code
around each layer (norms, rotary, cache updates, module calls). Two opt-ins cut them:

* **LM head in bf16 values** (:func:`set_lm_head_dtype`): the head keeps its float32 weight (a tied head
  still shares it with the embedding, which is not touched) and gets a separate bf16 copy, multiplied by the
  compiled kernel with float32 activations and float32 sums (bf16 values are widened exactly, on every ISA).
  Half the bytes of the head; logits differ from the float32 head by bf16 rounding of the weights only.
  A bf16 model's head on a CPU with AVX512-BF16 gets no copy: one-row calls (decode steps, a prompt's last
  position) of a narrow head multiply its own weight with the kernel's dense AVX512-BF16 row loop instead of
  torch's bf16 matrix-vector product (:data:`KERNEL_HEAD_MAX_IN`, benchmarks/results/lm_head.md); the logits
  are the same bf16 values up to the order of the float32 sums.
* **Decode plans** (every :class:`LeanDecoder`): each sparse layer's row-loop dispatch (ISA, thresholds) is
  fixed once (:meth:`SparseLinear.plan_decode`), so a decode step's few rows call the kernel's row loop
  directly instead of the Python dispatch of :func:`~losa.inference.sparse_linear.sparse_matmul`.
* **Decode attention** (every :class:`LeanDecoder`): a model that attends with ``sdpa`` switches to
  :func:`~losa.inference.attention.decode_attention`, which attends one token per head without repeating a
  grouped-query KV cache (transformers repeats it in compiled steps); prompts keep ``sdpa``.
* **Static KV cache + ``torch.compile``** (:class:`LeanDecoder` with ``compile=True``): Hugging Face
  ``generate`` with ``cache_implementation="static"`` compiles the decode step once. The sparse layers are
  opaque to the compiler: planned few-row calls are the dispatcher op ``losa_sparse_kernels::spmm`` in the
  compiled graph, larger batches the ``losa::sparse_matmul`` custom op. The cache length is rounded up to a
  power of two so that prompts of different lengths reuse the compiled step; the first call pays the compile.
  Inductor's C++ wrapper (``cpp_wrapper``) calls the step's kernels from compiled C++ instead of generated
  Python, which cuts the per-token cost of a small model's hundreds of calls; the wrapper is built apart from
  the kernels at a low optimisation level (one optimised build of both took many times longer), so the first
  compile takes only somewhat longer than with the Python wrapper (``--compile-wrapper python`` keeps that;
  measurements: benchmarks/results/decode.md).

:class:`LeanDecoder.generate` is ``model.generate`` with these settings, so stopping criteria, sampling
options and streaming work as there. Measurements: benchmarks/bench_decode.py,
benchmarks/results/decode.md.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from losa.errors import LosaError
from losa.inference import kernel as _kernel
from losa.inference.attention import use_decode_attention
from losa.inference.formats import FORMAT_CODES, pack_dense
from losa.inference.sparse_linear import (
    DecodePlan,
    SparseLinear,
    plan_decode,
    planned_row_loop,
    sparse_matmul,
)

LM_HEAD_DTYPES = ("auto", "float32", "bfloat16")
#: an in-place bf16 head sends one-row calls to the kernel's dense bf16 loop only when narrower than this (inputs):
#: on SmolLM2's and Qwen2-0.5B's heads (576, 896 inputs) the loop beat torch's bf16 F.linear in every run, on
#: LLaMA-2-7B's and Gemma-2B's (4096, 2048) not reliably, so wide heads keep F.linear (benchmarks/results/lm_head.md)
KERNEL_HEAD_MAX_IN = 2048
#: how errors name the fix "keep the LM head as loaded", for the Python API and the command line
_KEEP_HEAD = "set_lm_head_dtype(model, 'float32') (--lm-head-dtype float32)"
#: how a compiled decode step calls its kernels: Inductor's C++ wrapper or its generated Python wrapper
COMPILE_WRAPPERS = ("cpp", "python")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16"}
#: ``LeanDecoder(decode_engine=...)``: the C++ decode engine where it applies, or never
DECODE_ENGINES = ("auto", "off")
#: ``LeanDecoder(token_loop=...)``: with the engine, its own token loop for the calls it serves, or always
#: ``generate``'s loop
TOKEN_LOOPS = ("auto", "generate")
#: smallest static cache length; longer ones are rounded up to the next power of two
MIN_CACHE_LEN = 256


class BF16LMHead(nn.Module):
    """An LM head multiplied by losa's kernel in bf16 values (float32 sums).

    Two modes, by the head's weight:

    * float32 weight: a packed bf16 copy of it (non-persistent buffers; every weight kept, so its values are also
      the dense bf16 matrix, :meth:`dense_copy`), multiplied with float32 activations: one-row calls (decode
      steps) by the kernel's dense row loop over that matrix, other calls by the packed paths;
    * bf16 weight (a bf16 model, on a CPU with AVX512-BF16: :func:`~losa.inference.kernel.native_bf16`): no
      copy (``in_place``); one-row calls of heads narrower than :data:`KERNEL_HEAD_MAX_IN` go through the dense
      AVX512-BF16 row loop over the weight itself (``y [1, V] = x [1, H] · Wᵀ``, bf16 products, float32 sums,
      rounded to bf16 like ``F.linear``), other calls through ``F.linear``. The decode engine multiplies such
      a head with the same loop at any width (no copy of it).

    Either way ``weight`` stays a parameter of this module (the same ``Parameter`` object as before, so a tied
    embedding still shares it and the state dict is unchanged). Where huge pages are on
    (:func:`~losa.inference.kernel.hugepage_memory`), the bf16 copy is made in huge-page memory, and an in-place
    weight's storage is moved there (``weight.data`` replaced by a copy of the same values: the head needs twice
    its memory for a moment; a view or ``state_dict`` tensor taken before no longer shares memory with the
    model, nor does a separate parameter that shared the storage; a weight mapped from a file becomes process
    memory; a later cast of the model allocates ordinary memory again).

    Args:
        head: the model's ``nn.Linear`` output layer (float32, or bfloat16 on a CPU with AVX512-BF16).

    Raises:
        LosaError: when ``head`` is not an ``nn.Linear``, the compiled kernel is unavailable, a bf16 head
            on a CPU without AVX512-BF16, or a ``LOSA_HUGEPAGES`` value that is not understood.
    """

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise LosaError(f"the bf16 LM head needs an nn.Linear output layer, got {type(head).__name__}")
        if _kernel.load_kernel() is None:
            raise LosaError(f"the bf16 LM head needs the compiled kernel; keep the head as loaded: {_KEEP_HEAD}")
        self.out_features, self.in_features = head.out_features, head.in_features
        self.weight = head.weight
        self.bias = head.bias
        self.decode_plan: DecodePlan | None = None
        if head.weight.dtype == torch.bfloat16:  # no copy: see the in_place property
            if not _kernel.native_bf16():
                raise LosaError(f"a bf16 LM head is multiplied in place only on a CPU with AVX512-BF16; keep it "
                                f"as loaded: {_KEEP_HEAD}")
            for name in ("meta", "values", "row_ptr", "bias32"):
                self.register_buffer(name, None, persistent=False)
            # the same values moved into huge-page memory (the same parameter, so a tied embedding follows): decode
            # streams the whole head every token. The head loops ran faster there on the large heads and not on
            # SmolLM2's (benchmarks/results/lm_head.md), and whole SmolLM2 steps showed no difference
            # (lm_head_engine.md). Outside inference mode, so that the parameter stays a normal tensor.
            with torch.inference_mode(False):
                self.weight.data = _kernel.hugepage_memory(self.weight.data)
            return
        w = head.weight.detach()
        packed = pack_dense(w, torch.bfloat16)
        self.register_buffer("meta", packed.meta, persistent=False)
        self.register_buffer("values", _kernel.hugepage_memory(packed.values), persistent=False)
        self.register_buffer("row_ptr", packed.row_ptr, persistent=False)
        self.register_buffer("bias32", None if head.bias is None else head.bias.detach().float().clone(),
                             persistent=False)
        # decode_plan is set by plan_decode (LeanDecoder): compiled decode steps and few-row calls call the row
        # loop without the dispatch (eager one-row calls take the dense row loop over dense_copy())

    def dense_copy(self) -> torch.Tensor:
        """The bf16 copy as a dense ``[out_features, in_features]`` weight: the packed values keep every weight in
        row order (:func:`~losa.inference.formats.pack_dense`), so they are that matrix (a view, no copy).

        Returns:
            bf16 ``[out_features, in_features]``, a view of ``values`` (the weight rounded to bf16).

        Raises:
            LosaError: for an in-place head (it has no copy: use ``weight``).
        """
        if self.in_place:
            raise LosaError("an in-place bf16 LM head has no copy; its weight is the head's own")
        return self.values[: self.out_features * self.in_features].view(self.out_features, self.in_features)

    @property
    def in_place(self) -> bool:
        """Whether the head multiplies its own weight (no packed copy): a bf16 head built on an AVX512-BF16 CPU.
        Its mode follows the weight: cast to float32 with the model, it computes a plain float32 ``F.linear``."""
        return self._buffers.get("values") is None

    def plan_decode(self) -> None:
        """Fix the row-loop dispatch (see :func:`~losa.inference.sparse_linear.plan_decode`)."""
        if not self.in_place:
            self.decode_plan = plan_decode(self.values, False, None)

    def extra_repr(self) -> str:
        how = f"{self.weight.dtype} (in place)".replace("torch.", "") if self.in_place else "bfloat16 (copy)"
        return f"in_features={self.in_features}, out_features={self.out_features}, values={how}"

    def _apply(self, fn, recurse=True):
        if self.in_place:  # the model's own weight: cast with the model (forward checks its dtype per call)
            return super()._apply(fn, recurse)
        # like SparseLinear: the packed copy stays on the CPU in bf16 whatever the model is cast to
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``x · Wᵀ + b`` with ``W`` in bf16 (the copy's rounding, or the bf16 weight itself), in the
        dtype of ``x``; an in-place head whose weight was cast to another dtype computes ``F.linear``."""
        if self.in_place:
            return self._forward_in_place(x)
        x2 = x.reshape(-1, self.in_features)
        b = self._buffers
        if x2.shape[0] == 1 and x2.dtype == torch.float32 and not torch.compiler.is_compiling():
            # a decode step: the dense row loop over the copy (no per-group expansion, no metadata to read)
            isa = self.decode_plan.isa if self.decode_plan is not None else _kernel.best_isa()  # planned: no env read
            y = _kernel.load_kernel().dense_gemv_f32x(x2, self.dense_copy(), b["bias32"], isa)
            return y.view(*x.shape[:-1], self.out_features)
        y = planned_row_loop(self.decode_plan, x2, b["meta"], b["values"], b["row_ptr"], b["bias32"],
                             self.out_features, self.in_features, FORMAT_CODES["bitmask"])
        if y is None:
            fn = torch.ops.losa.sparse_matmul if torch.compiler.is_compiling() else sparse_matmul
            y = fn(x2, b["meta"], b["values"], b["row_ptr"], b["bias32"], self.out_features, self.in_features,
                   FORMAT_CODES["bitmask"], -1, False, False, False)
        return y.view(*x.shape[:-1], self.out_features)

    def _forward_in_place(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        x2 = x.reshape(-1, self.in_features)
        grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)  # the kernel has no backward
        if (x2.shape[0] != 1 or self.in_features >= KERNEL_HEAD_MAX_IN or x.dtype != torch.bfloat16
                or w.dtype != torch.bfloat16 or not w.is_contiguous() or w.device.type != "cpu" or grad
                or torch.compiler.is_compiling() or not _kernel.native_bf16()):
            return nn.functional.linear(x, w, self.bias)
        k = _kernel.load_kernel()
        y = k.dense_gemv_bf16(x2, w.detach(), None if self.bias is None else self.bias.detach(), _kernel.best_isa())
        return y.to(torch.bfloat16).view(*x.shape[:-1], self.out_features)


def normalize_lm_head_dtype(value: str) -> str:
    """``value`` as one of :data:`LM_HEAD_DTYPES` (aliases fp32/bf16 accepted).

    Args:
        value: the requested LM head dtype.

    Returns:
        "auto", "float32" or "bfloat16".

    Raises:
        LosaError: an unknown value.
    """
    v = _ALIASES.get(str(value).lower(), str(value).lower())
    if v not in LM_HEAD_DTYPES:
        raise LosaError(f"LM head dtype (--lm-head-dtype) {value!r} is not supported; use one of "
                        f"{', '.join(LM_HEAD_DTYPES)}")
    return v


def resolve_lm_head_dtype(requested: str, model_dtype: torch.dtype, kernel: bool | None = None,
                          native: bool | None = None) -> str:
    """The LM head to use: ``"float32"`` (as loaded) or ``"bfloat16"`` (:class:`BF16LMHead`).

    ``auto`` picks bf16 for a float32 model where the compiled kernel runs (a bf16 copy: half the bytes of the
    largest matrix decode streams; benchmarks/results/decode.md), and for a bf16 model on a CPU with
    AVX512-BF16 (no copy: a narrow head's one-row calls go through the kernel's dense bf16 row loop, faster
    than torch's bf16 matrix-vector product there: benchmarks/results/lm_head.md); it keeps the head as
    loaded otherwise.

    Args:
        requested: "auto", "float32" or "bfloat16" (aliases fp32/bf16).
        model_dtype: the dtype the model was loaded in.
        kernel: whether the compiled kernel is available (default: ask :mod:`losa.inference.kernel`).
        native: whether the CPU has the AVX512-BF16 loop (default: :func:`~losa.inference.kernel.native_bf16`).

    Returns:
        "float32" or "bfloat16".

    Raises:
        LosaError: an unknown value, or bfloat16 asked for without the compiled kernel.
    """
    v = normalize_lm_head_dtype(requested)
    if kernel is None:
        kernel = _kernel.kernel_available()
    if v == "auto":
        if native is None:
            native = bool(kernel) and _kernel.native_bf16()
        return "bfloat16" if kernel and (model_dtype == torch.float32 or
                                         (model_dtype == torch.bfloat16 and native)) else "float32"
    if v == "bfloat16" and model_dtype == torch.float32 and not kernel:
        raise LosaError(f"a bfloat16 LM head (--lm-head-dtype bfloat16) needs the compiled sparse kernel (a C++ "
                        f"compiler); keep the head as loaded: {_KEEP_HEAD}")
    return v


def set_lm_head_dtype(model: nn.Module, dtype: str) -> bool:
    """Make the LM head a :class:`BF16LMHead` (``dtype="bfloat16"``); the embedding is not changed.

    A float32 head gets a bf16 copy; a bf16 head, on a CPU with AVX512-BF16, is multiplied in place, its storage
    moved into huge-page memory (see :class:`BF16LMHead`).

    Args:
        model: a causal LM with ``get_output_embeddings`` / ``set_output_embeddings``.
        dtype: "float32" (nothing to do) or "bfloat16".

    Returns:
        Whether the head was replaced (False for float32, for a head that is neither float32 nor bf16, for a
        bf16 head on a CPU without AVX512-BF16, or when it already is a :class:`BF16LMHead`).

    Raises:
        LosaError: an unknown dtype, a model without an ``nn.Linear`` output layer, or no compiled kernel.
    """
    if dtype not in ("float32", "bfloat16"):
        raise LosaError(f"LM head dtype {dtype!r} is not supported; use float32 or bfloat16")
    if dtype == "float32":
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, BF16LMHead):
        if not (head.in_place and head.weight.dtype == torch.float32):
            return False
        # an in-place head of a model cast to float32 since: rebuild it as a float32 head's bf16 copy
        plain = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        plain.weight, plain.bias = head.weight, head.bias
        head = plain
    if not isinstance(head, nn.Linear):
        raise LosaError(f"model {type(model).__name__} has no nn.Linear LM head; keep the head as loaded: {_KEEP_HEAD}")
    if head.weight.dtype != torch.float32 and not (head.weight.dtype == torch.bfloat16 and _kernel.native_bf16()):
        return False
    model.set_output_embeddings(BF16LMHead(head))
    return True


def cache_length(needed: int, context: int | None = None) -> int:
    """Static cache length for ``needed`` positions: the next power of two, at least ``MIN_CACHE_LEN``.

    Args:
        needed: prompt plus new tokens.
        context: the model's context (the result never exceeds it when given and at least ``needed``).

    Returns:
        The length.

    Raises:
        LosaError: when ``needed`` < 1.
    """
    if needed < 1:
        raise LosaError(f"cache length {needed} must be at least 1")
    n = max(MIN_CACHE_LEN, 1 << (needed - 1).bit_length())
    if context is not None and needed <= context < n:
        n = context
    return n


class LeanDecoder:
    """``model.generate`` with the lean decode settings (static KV cache and compiled step when asked).

    Building one plans the model's sparse layers and bf16 LM head in place and switches an ``sdpa`` model to
    the decode attention (lasting changes: later forwards of the same model, also outside this decoder, use
    them; see :func:`~losa.inference.sparse_linear.plan_decode` for re-planning and removing a plan, and
    ``model.set_attn_implementation("sdpa")`` to undo the attention).

    With ``decode_engine="auto"`` (the default) and without ``compile``, a model the C++ decode engine
    supports (:func:`~losa.inference.engine.engine_problem`: a float32 or bf16 LLaMA-style model) decodes one prompt
    with it: the prompt runs through the model, each new token is one engine call
    (:mod:`losa.inference.engine`); batches of several prompts and unsupported models take ``generate``'s own
    steps, and so do calls with ``generate`` options it does not serve (beams, several sequences, other caches,
    speculative decoding, returned caches or hidden states: :func:`~losa.inference.engine.generate_problem`).
    :attr:`engine_reason` says whether the model can use it, :attr:`last_engine` whether the last call did and
    why not. The engine keeps its KV cache between calls (:meth:`release_engine` frees it); a model whose
    weights, dtype or modules change is checked again at the next call. Calls on one decoder are serialised
    while the engine runs. Plain calls (greedy, or sampling with temperature / top-k / top-p, with end-of-sequence
    tokens, stopping criteria and streamers) run the engine's own token loop (:mod:`losa.inference.engine_loop`,
    the same tokens without ``generate``'s per-token cost); other calls run ``generate`` with the engine attached
    (it patches ``model.forward`` for the duration of the call). :attr:`last_loop` says which loop ran.

    Args:
        model: the (sparse) causal LM.
        compile: static KV cache plus ``torch.compile`` of the decode step (the first call of each cache
            length compiles; worth it for a server or long generations, not for one short reply). Asked for
            explicitly, it is used instead of the decode engine.
        decode_attention: switch an ``sdpa`` model to :func:`~losa.inference.attention.decode_attention`
            (False keeps transformers' attention; benchmarks use it for the before/after).
        compile_wrapper: with ``compile=True``, ``"cpp"`` (Inductor's C++ wrapper, built apart from the
            kernels) or ``"python"`` (Inductor's default generated Python wrapper).
        decode_engine: ``"auto"`` (the C++ decode engine where it applies) or ``"off"``.
        token_loop: with the engine, ``"auto"`` (its own token loop for the calls it serves) or ``"generate"``
            (always ``generate``'s loop; benchmarks use it for the before/after).

    Raises:
        LosaError: ``compile=True`` without the compiled kernel for a model with sparse layers, an unknown
            ``compile_wrapper``, ``decode_engine`` or ``token_loop``, or an invalid ``LOSA_SPARSE_ISA`` /
            threshold cache while planning.
    """

    def __init__(self, model: nn.Module, compile: bool = False, decode_attention: bool = True,
                 compile_wrapper: str = "cpp", decode_engine: str = "auto", token_loop: str = "auto") -> None:
        if compile_wrapper not in COMPILE_WRAPPERS:
            raise LosaError(f"compile wrapper {compile_wrapper!r} is not supported; use one of "
                            f"{', '.join(COMPILE_WRAPPERS)}")
        if decode_engine not in DECODE_ENGINES:
            raise LosaError(f"decode engine {decode_engine!r} is not supported; use one of {', '.join(DECODE_ENGINES)}")
        if token_loop not in TOKEN_LOOPS:
            raise LosaError(f"token loop {token_loop!r} is not supported; use one of {', '.join(TOKEN_LOOPS)}")
        self.token_loop = token_loop
        self.model = model
        self.compile = bool(compile)
        self.compile_wrapper = compile_wrapper
        self.decode_attention = bool(decode_attention) and use_decode_attention(model)
        self.context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if self.compile:
            if _kernel.load_kernel() is None and any(isinstance(m, (SparseLinear, BF16LMHead))
                                                     for m in model.modules()):
                raise LosaError("compile=True (--compile) needs the compiled sparse kernel (a C++ compiler); use "
                                "compile=False (drop --compile)")
        for m in model.modules():  # decode steps call the kernel's row loop without the per-call dispatch
            if isinstance(m, (SparseLinear, BF16LMHead)):
                m.plan_decode()
        self.decode_engine = decode_engine
        self._engine = None
        self._engine_lock = threading.Lock()  # one generation at a time uses (and patches the model for) the engine
        self._check_engine()
        #: "on" or "off (reason)" for the last :meth:`generate` call (None before the first)
        self.last_engine: str | None = None
        #: "engine" (the engine's own token loop) or "generate (reason)" for the last call (None before the first)
        self.last_loop: str | None = None

    def _check_engine(self) -> None:
        """(Re)decide whether the engine can decode the model as it is now (a changed model drops the engine)."""
        from losa.inference.engine import engine_problem, model_signature

        if self.decode_engine == "off":
            why = "off (asked)"
        elif self.compile:
            why = "off (--compile asked for the compiled step)"
        else:
            problem = engine_problem(self.model)
            why = "on" if problem is None else f"off ({problem})"
        #: whether one-sequence generation uses the C++ decode engine (calls it cannot serve still fall back)
        self.use_engine = why == "on"
        #: "on", or "off (reason)": whether the model can be decoded by the engine at all
        self.engine_reason = why
        watch = self.decode_engine == "auto" and not self.compile  # a changed model can switch it on or off
        self._signature = model_signature(self.model) if watch else None
        self._engine = None

    def release_engine(self) -> None:
        """Free the engine and its KV cache (kept between generations, like a static cache); rebuilt when needed."""
        with self._engine_lock:
            self._engine = None

    def _engine_for(self, needed: int):
        """The decode engine with a cache of at least ``needed`` positions (built on first need, then reused)."""
        from losa.inference.engine import DecodeEngine, sliding_window

        if self._engine is None or self._engine.max_len < needed:
            self._engine = None  # free the old cache first
            length = cache_length(needed, self.context)
            if (window := sliding_window(self.model)) is not None:
                length = min(length, window)
            self._engine = DecodeEngine(self.model, length)
        return self._engine

    def generate_kwargs(self, input_ids: torch.Tensor, max_new_tokens: int) -> dict[str, Any]:
        """The extra ``generate`` arguments of the lean path for this prompt (none without compile).

        Args:
            input_ids: the prompt ids ``(batch, T)``.
            max_new_tokens: the most tokens to generate.

        Returns:
            Keyword arguments for ``model.generate``.
        """
        if not self.compile:
            return {}
        from transformers import CompileConfig

        # guards on module attributes stay on (skipping them saves a little per token, but lets a step compiled
        # for one model run on another instance of the same class)
        if self.compile_wrapper == "cpp":  # torch.compile takes either a mode or Inductor options
            cc = CompileConfig(fullgraph=True, mode=None, dynamic=False,
                               options={"cpp_wrapper": True, "cpp_wrapper_build_separate": True})
        else:
            cc = CompileConfig(fullgraph=True, mode="default", dynamic=False)
        cc._compile_all_devices = True  # transformers compiles on CUDA only unless told
        return {"cache_implementation": "static", "compile_config": cc,
                "max_cache_len": cache_length(input_ids.shape[1] + max_new_tokens, self.context)}

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """``model.generate(input_ids, max_new_tokens=..., **kwargs)`` on the lean path.

        Args:
            input_ids: prompt ids ``(batch, T)``.
            max_new_tokens: the most tokens to generate.
            **kwargs: passed to ``generate`` (sampling options, stopping criteria, attention mask ...).

        Returns:
            The ids, prompt included, as ``generate`` returns them.

        Raises:
            LosaError: when ``max_new_tokens`` < 1, or when Inductor cannot build the C++ wrapper of the step
                (the message names the fallback).
        """
        if max_new_tokens < 1:
            raise LosaError(f"max_new_tokens {max_new_tokens} must be at least 1")
        from torch._dynamo.exc import BackendCompilerFailed

        if self._signature is not None:  # decode_engine="auto" without compile
            from losa.inference.engine import attach, generate_problem, model_signature
            from losa.inference.engine_loop import plan_loop, run_loop

            with self._engine_lock:
                if model_signature(self.model) != self._signature:  # weights, dtype, modules or hooks changed
                    self._check_engine()
                problem = (generate_problem(self.model, input_ids, max_new_tokens, kwargs, self.context)
                           if self.use_engine else self.engine_reason)
                engine = None
                if problem is None:
                    try:
                        engine = self._engine_for(input_ids.shape[1] + max_new_tokens)
                    except LosaError as e:  # the model cannot be decoded by it (any more): generate's own steps
                        problem = str(e)
                if engine is not None:
                    self.last_engine = "on"
                    plan = plan_loop(self.model, input_ids, kwargs) if self.token_loop == "auto" else "asked"
                    if not isinstance(plan, str):
                        self.last_loop = "engine"
                        return run_loop(self.model, engine, input_ids, max_new_tokens, plan,
                                        kwargs.get("attention_mask"))
                    self.last_loop = f"generate ({plan})"
                    with attach(self.model, engine):
                        return self.model.generate(input_ids, max_new_tokens=max_new_tokens, **kwargs)
                self.last_engine = problem if problem.startswith("off (") else f"off ({problem})"
        else:
            self.last_engine = self.engine_reason
        self.last_loop = "generate (no decode engine)"
        try:
            return self.model.generate(input_ids, max_new_tokens=max_new_tokens,
                                       **self.generate_kwargs(input_ids, max_new_tokens), **kwargs)
        except BackendCompilerFailed as e:
            if not (self.compile and self.compile_wrapper == "cpp"):
                raise
            cause = getattr(e, "inner_exception", None) or e.__cause__ or e
            raise LosaError(f"compiling the decode step with Inductor's C++ wrapper failed "
                            f"({type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''}); "
                            "use --compile-wrapper python, or drop --compile") from e

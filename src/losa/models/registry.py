"""Architecture registry: where each model family keeps its decoder layers.

Adding a family is one call::

    register_arch(ArchSpec("myfamily", model_types=("my_model",), layers_path="model.blocks"))

Inside a decoder layer every ``nn.Linear`` (or GPT-2 ``Conv1D``) is a prunable sublayer, except
names matched by ``exclude``. The LM head and embeddings are never pruned (they are outside the
decoder layers).

Mixture-of-experts families whose routed experts are fused 3-D parameters (transformers 5) name the
experts module with ``ArchSpec.experts``: :mod:`losa.models.moe` then prunes every expert matrix on its
own, and :func:`prunable_weights` reports them as ``<experts>.<e>.gate_proj`` / ``up_proj`` / ``down_proj``.
A decoder layer with 3-D parameters anywhere else (or in a non-standard layout) is refused by :func:`get_arch`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from losa.errors import LosaError
from losa.models.experts import expert_weights, is_fused_experts, unsupported_reason
from losa.models.linear import get_weight, is_prunable


@dataclass(frozen=True)
class ArchSpec:
    """How to find the decoder layers of one model family."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    #: glob patterns (relative to the decoder layer) of linear modules not to prune
    exclude: tuple[str, ...] = field(default_factory=tuple)
    #: path (relative to the decoder layer) of a gated MLP computing ``down_proj(act_fn(gate_proj(x)) *
    #: up_proj(x))``; single-pass calibration then runs it in token chunks (less peak memory), else None
    gated_mlp: str | None = None
    #: path (relative to the decoder layer) of the routed experts when they are stored fused as 3-D
    #: ``gate_up_proj`` ``[E, 2I, H]`` / ``down_proj`` ``[E, H, I]`` (transformers 5 MoE); each expert matrix
    #: is then pruned on its own (:mod:`losa.models.moe`). Layers without a module there (dense layers) are fine.
    experts: str | None = None


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Register (or replace) an architecture; each of its ``model_types`` maps to it."""
    for mt in spec.model_types:
        _REGISTRY[mt] = spec
    return spec


for _spec in (
    ArchSpec("llama", ("llama",), gated_mlp="mlp"),
    ArchSpec("mistral", ("mistral",), gated_mlp="mlp"),
    ArchSpec("mixtral", ("mixtral",), exclude=("*.gate",), experts="mlp.experts"),
    ArchSpec("qwen2", ("qwen2",), gated_mlp="mlp"),
    ArchSpec("qwen3", ("qwen3",), gated_mlp="mlp"),
    # the routers (``mlp.gate``) are not nn.Linear in transformers 5; the shared expert's 1-row gate stays dense
    ArchSpec("qwen2_moe", ("qwen2_moe",), exclude=("*.gate", "*.shared_expert_gate"), gated_mlp="mlp",
             experts="mlp.experts"),
    ArchSpec("qwen3_moe", ("qwen3_moe",), exclude=("*.gate",), gated_mlp="mlp", experts="mlp.experts"),
    ArchSpec("gemma", ("gemma",), gated_mlp="mlp"),
    ArchSpec("gemma2", ("gemma2",), gated_mlp="mlp"),
    ArchSpec("gemma3", ("gemma3_text",), gated_mlp="mlp"),
    ArchSpec("gemma3-multimodal", ("gemma3",), layers_path="model.language_model.layers", gated_mlp="mlp"),
    ArchSpec("phi3", ("phi3",)),
    ArchSpec("smollm3", ("smollm3",), gated_mlp="mlp"),
    ArchSpec("opt", ("opt",), layers_path="model.decoder.layers"),
    ArchSpec("gpt2", ("gpt2",), layers_path="transformer.h"),
):
    register_arch(_spec)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def _resolve(obj: object, dotted: str) -> object | None:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def get_arch(model: nn.Module) -> ArchSpec:
    """The registered spec for ``model``'s ``config.model_type``.

    Args:
        model: a causal LM.
    Returns:
        its :class:`ArchSpec`.
    Raises:
        LosaError: no ``config.model_type``; a family that is not registered; a mixture-of-experts
            family whose fused experts losa cannot prune (see :func:`check_experts`).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise LosaError(
            f"{type(model).__name__} has no config.model_type; losa needs a Hugging Face causal LM "
            "(or register an ArchSpec with losa.models.register_arch)"
        )
    spec = _REGISTRY.get(model_type)
    if spec is None:
        if any(p.ndim == 3 for p in model.parameters()):
            raise LosaError(
                f"mixture-of-experts family {model_type!r} is not supported: its experts cannot be pruned yet; "
                f"supported MoE families: {', '.join(moe_model_types())}"
            )
        raise LosaError(
            f"unsupported architecture model_type={model_type!r} ({type(model).__name__}); supported: "
            f"{', '.join(supported_model_types())}. A family of the usual layout (model.layers of attention and MLP "
            "linears) is added from Python with losa.models.register_arch(ArchSpec(...)) before losa.prune / "
            "losa.run (README: Design, Adding things); the command line knows the built-in ones"
        )
    check_experts(model, spec)
    return spec


def moe_model_types() -> list[str]:
    """The registered model types whose fused experts losa prunes, sorted."""
    return sorted(mt for mt, spec in _REGISTRY.items() if spec.experts)


def check_experts(model: nn.Module, spec: ArchSpec) -> None:
    """Refuse a model whose decoder layers hold expert tensors that losa would leave dense.

    Every 3-D parameter of a decoder layer must belong to the module at ``spec.experts`` and that module
    must have the standard fused layout (:func:`losa.models.experts.unsupported_reason`).

    Args:
        model: a model of the family ``spec``.
        spec: its registered spec.
    Raises:
        LosaError: one line naming the family, the tensor and why its experts cannot be pruned yet.
    """
    layers = _resolve(model, spec.layers_path)
    if not isinstance(layers, nn.ModuleList):
        return  # get_decoder_layers reports it
    for i, layer in enumerate(layers):
        for pname, p in layer.named_parameters():
            if p.ndim < 3:
                continue
            owner = pname.rpartition(".")[0]
            if owner != spec.experts:
                why = "it is not registered as the family's experts (ArchSpec.experts)"
            else:
                why = unsupported_reason(layer.get_submodule(owner))
            if why is not None:
                raise LosaError(
                    f"architecture {spec.name!r}: its experts cannot be pruned yet ({spec.layers_path}.{i}.{pname} "
                    f"{list(p.shape)} in {type(layer.get_submodule(owner)).__name__}: {why}); use a supported "
                    f"MoE family ({', '.join(moe_model_types())}) or a dense model"
                )


def get_decoder_layers(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    """The decoder layers of ``model`` as registered for its family."""
    spec = spec or get_arch(model)
    layers = _resolve(model, spec.layers_path)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise LosaError(
            f"architecture {spec.name!r}: no decoder layer list found at '{spec.layers_path}' in "
            f"{type(model).__name__}; fix layers_path in its ArchSpec"
        )
    return layers


def linear_modules(layer: nn.Module, spec: ArchSpec | None = None) -> dict[str, nn.Module]:
    """Prunable linear sublayers of one decoder layer, by name relative to the layer, in order.

    Fused experts appear here (as ``<experts>.<e>.gate_proj`` ...) only while the model is unfused
    (:func:`losa.models.unfused_experts`); :func:`prunable_weights` sees them in both forms.
    """
    exclude = spec.exclude if spec is not None else ()
    out = {
        name: mod
        for name, mod in layer.named_modules()
        if name and is_prunable(mod) and not any(fnmatch.fnmatch(name, p) for p in exclude)
    }
    if not out:
        raise _nothing_to_prune(layer)
    return out


def _nothing_to_prune(layer: nn.Module) -> LosaError:
    """The error for a decoder layer without prunable linears, naming why when losa itself made it so."""
    kinds = {type(m).__name__ for m in layer.modules()}
    if "SparseLinear" in kinds:
        return LosaError(f"decoder layer {type(layer).__name__} holds sparse runtime layers "
                         "(losa.sparsify_for_inference): prune or inspect the checkpoint before sparsifying it")
    return LosaError(f"decoder layer {type(layer).__name__} has no linear sublayers to prune")


def prunable_weights(layer: nn.Module, spec: ArchSpec | None = None) -> dict[str, torch.Tensor]:
    """Every prunable weight of one decoder layer as ``[out, in]``, by name relative to the layer.

    The :func:`linear_modules` weights, plus each expert matrix of a fused experts module at
    ``spec.experts`` (``<experts>.<e>.gate_proj`` ``[I, H]``, ``.up_proj`` ``[I, H]``, ``.down_proj``
    ``[H, I]``): the same names whether the experts are fused or unfused (:mod:`losa.models.moe`).

    Args:
        layer: a decoder layer.
        spec: its family's spec (None: no exclusions, no fused experts).
    Returns:
        name -> weight view ``[out, in]`` (do not write through it), in module order.
    Raises:
        LosaError: the layer has nothing to prune.
    """
    exclude = spec.exclude if spec is not None else ()
    experts = spec.experts if spec is not None else None
    out: dict[str, torch.Tensor] = {}
    for name, mod in layer.named_modules():
        if not name:
            continue
        if name == experts and is_fused_experts(mod):
            out.update({f"{name}.{k}": w for k, w in expert_weights(mod).items()})
        elif is_prunable(mod) and not any(fnmatch.fnmatch(name, p) for p in exclude):
            out[name] = get_weight(mod)
    if not out:
        raise _nothing_to_prune(layer)
    return out


def layer_output(out: object) -> torch.Tensor:
    """The hidden states of a decoder layer's return value (a tensor, or a tuple whose first item it is).

    Returns:
        ``[batch, seq, hidden]``.
    """
    return out[0] if isinstance(out, tuple | list) else out  # type: ignore[return-value]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``name`` under ``root``; the one place losa swaps a submodule.

    Args:
        root: the module that contains the path.
        name: dotted path relative to ``root`` (e.g. ``model.layers.0.mlp.down_proj``).
        new: the replacement.
    Returns:
        the module that was there.
    Raises:
        LosaError: no module at ``name``.
    """
    parent_name, _, child = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
        old = getattr(parent, child)
    except AttributeError:
        raise LosaError(f"module {name!r} is not in this model; load the matching base model") from None
    setattr(parent, child, new)
    return old


#: config attributes that hold a model's number of positions, in the order they are read
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def max_context(model: nn.Module) -> int | None:
    """The longest window the model was built for (its position count), or None if the config has none."""
    cfg = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_window(model: nn.Module, length: int, what: str, flag: str) -> None:
    """Fail at once when a window of ``length`` tokens exceeds the model's context.

    Beyond it, learned position embeddings (OPT, GPT-2) fail with an ``IndexError`` deep inside torch
    and rotary ones run outside what the model was trained on.

    Args:
        model: the model.
        length: window length in tokens.
        what: what the window is for, e.g. ``calibration window``.
        flag: what sets it, named in the fix: the parameter and its flag (:func:`losa.errors.option`, e.g.
            ``seqlen (--seqlen)``), or a flag alone where only the command line sets it (``--eval-seqlen``).
    Raises:
        LosaError: ``length`` > :func:`max_context`, naming the maximum and ``flag``.
    """
    limit = max_context(model)
    if limit is not None and length > limit:
        raise LosaError(f"{what} of {length} tokens exceeds the model's context of {limit} positions; "
                        f"set {flag} to {limit} or lower")


def prompt_problem(prompt_tokens: int, max_new: int, context: int | None, limit: str,
                   which: str = "prompt") -> str | None:
    """Why a prompt cannot start a generation of up to ``max_new`` tokens (None if it can): it has no
    tokens, or it plus ``max_new`` does not fit the model's context.

    ``losa serve`` (per request) and ``losa generate`` refuse such a generation before it starts: an empty
    prompt gives the model nothing to condition on (and ``generate`` fails deep inside transformers);
    beyond the context, learned position embeddings fail with an ``IndexError`` and rotary ones silently
    run outside what the model was trained on.

    Args:
        prompt_tokens: the prompt's length in tokens.
        max_new: the most tokens to generate.
        context: the model's context in tokens (:func:`max_context`); None = unknown, everything fits.
        limit: how the user set ``max_new``, named in the fix (``max_tokens``, ``--max-new-tokens``).
        which: the prompt's name in the message, e.g. ``prompt 2``.
    Returns:
        A one-line message naming the problem and the fix, or None.
    """
    if prompt_tokens == 0:
        return f"{which} is empty after tokenization; give some text"
    if context is None or prompt_tokens + max_new <= context:
        return None
    noun = "token" if prompt_tokens == 1 else "tokens"
    return (f"{which} ({prompt_tokens} {noun}) + {limit} ({max_new}) exceeds the model's context of {context} "
            f"tokens; shorten the prompt or lower {limit}")


def pruned_weights(model: nn.Module, ignore: Sequence[str] = ()) -> Iterator[tuple[int, str, torch.Tensor]]:
    """The prunable weights that pruning changes: :func:`prunable_weights` of every decoder layer without those
    that ``ignore`` leaves dense (:mod:`losa.pruning.ignore`).

    Args:
        model: a causal LM of a registered architecture.
        ignore: glob patterns of linears left dense.
    Returns:
        ``(layer index, name inside the layer, weight view [out, in])`` in layer and module order.
    """
    from losa.pruning.ignore import is_ignored

    spec = get_arch(model)
    for i, layer in enumerate(get_decoder_layers(model, spec)):
        for n, w in prunable_weights(layer, spec).items():
            if not is_ignored(ignore, i, n, spec.layers_path):
                yield i, n, w


def layer_sizes(model: nn.Module, ignore: Sequence[str] = ()) -> list[int]:
    """Prunable weights of every decoder layer, ``[L]`` (every expert matrix included): the weights of the
    layer-wise sparsity allocators (RMI, OWL, ATP, mixed N:M).

    Args:
        model: a causal LM of a registered architecture.
        ignore: glob patterns of linears left dense (:mod:`losa.pruning.ignore`), not counted, so that the
            allocators' parameter-weighted mean is over the linears actually pruned (a layer left dense entirely
            weighs 0).
    Returns:
        One parameter count per decoder layer.
    """
    sizes = [0] * len(get_decoder_layers(model))
    for i, _, w in pruned_weights(model, ignore):
        sizes[i] += w.numel()
    return sizes

"""The decode engine's own token loop: plain greedy and sampling calls without ``generate``'s per-token cost.

Each token through Hugging Face ``generate`` runs its Python bookkeeping (inputs for the step, cache positions,
logits processors, stopping criteria, the model-output object) and ``torch.argmax`` over the vocabulary, a
generic reduction that alone takes a sizeable part of a small model's engine step. For the calls most users
make (one sequence, greedy or sampling with temperature / top-k / top-p, an end-of-sequence token, stopping
criteria, a streamer), :class:`~losa.inference.decode.LeanDecoder` runs this loop instead: the prompt through
the model's forward, then per token one engine step and the token choice. Measurements:
benchmarks/results/decode.md (``generate loop`` rows for the before/after).

It reproduces ``generate``'s sampling loop (``transformers.generation.utils.GenerationMixin._sample``) for one
sequence, so the tokens are the same:

* the options come from transformers' own merge of the call's keywords, the model's generation config and the
  library defaults (``_prepare_generation_config``); any option that would change the tokens other than those
  in :data:`SERVED` (repetition penalties, banned words, minimum lengths, stop strings, ...) sends the call to
  ``generate`` (:func:`loop_problem` names it);
* greedy: the first maximum of the float32 logits (``torch.argmax``'s answer, NaN first), computed by the
  kernel (``first_argmax``: SSE on x86-64, a plain loop elsewhere and with ``LOSA_SPARSE_ISA=scalar``);
* sampling: transformers' own warpers in ``generate``'s order (temperature, top-k, top-p), then
  ``softmax`` and ``torch.multinomial``, so a seed gives the same tokens;
* it stops after ``max_new_tokens``, after an end-of-sequence token (kept in the output), or when a stopping
  criterion says so; every criterion is called after every token with ``scores=None``, as ``generate`` calls
  them without ``output_scores``;
* a streamer gets the prompt, each token after the criteria have seen it, and ``end()``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from losa.inference import kernel as _kernel

#: generation options (fields of transformers' ``GenerationConfig``) the loop serves; every other field must be
#: at transformers' default (or unset) for the loop to run
SERVED = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
          "pad_token_id", "bos_token_id", "use_cache", "output_attentions", "output_hidden_states",
          "_from_model_config", "transformers_version")
#: options that only shape sampling: ``generate`` ignores them when ``do_sample`` is off
_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff")
#: ``generate`` arguments that are not generation options and that the loop serves (an empty ``logits_processor``
#: list is served too)
_ARGUMENTS = ("attention_mask", "streamer", "stopping_criteria")


class LoopPlan(NamedTuple):
    """How one call runs in the loop: ``processors`` is None for greedy decoding, else the sampling warpers
    (a ``LogitsProcessorList``); ``eos`` the end-of-sequence ids; ``criteria`` the caller's stopping criteria
    (a ``StoppingCriteriaList`` or None); ``streamer`` the caller's streamer or None."""

    processors: Any
    eos: frozenset[int]
    criteria: Any
    streamer: Any


def _is_default(value: Any, default: Any) -> bool:
    """Whether an option is at its default: both unset (None or False), or equal values; ``0`` is not unset (it is
    a token id or a time limit that ``generate`` acts on), while ``1`` equals ``1.0``."""
    if (value is None or value is False) and (default is None or default is False):
        return True
    if isinstance(value, bool) or isinstance(default, bool) or value is None or default is None:
        return value is default
    return value == default


def _merged_options(model: nn.Module, options: dict[str, Any]) -> tuple[Any, dict[str, Any], Any]:
    """transformers' own merge (private, transformers 5): the call's options > the model's generation config > the
    library's defaults; returns (the merged ``GenerationConfig``, the keywords it did not take, the defaults)."""
    from transformers import GenerationConfig

    config, rest = model._prepare_generation_config(None, **options)
    defaults = GenerationConfig()
    defaults.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    return config, rest, defaults


def plan_loop(model: nn.Module, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> LoopPlan | str:
    """How the loop runs ``model.generate(input_ids, ..., **kwargs)``, or why it cannot (then ``generate`` runs it).

    Args:
        model: a model the decode engine serves (:func:`~losa.inference.engine.engine_problem`).
        input_ids: the prompt ``(1, T)``.
        kwargs: the call's ``generate`` keywords besides the prompt and ``max_new_tokens``.

    Returns:
        A :class:`LoopPlan`, or a short reason ("generate option repetition_penalty=1.2").
    """
    from transformers import (
        LogitsProcessorList,
        StoppingCriteriaList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    from transformers.generation.stopping_criteria import (
        EosTokenCriteria,
        MaxLengthCriteria,
        MaxTimeCriteria,
        StopStringCriteria,
    )

    options = {k: v for k, v in kwargs.items() if k not in _ARGUMENTS}
    if kwargs.get("logits_processor"):
        return "generate option logits_processor"
    options.pop("logits_processor", None)
    try:
        config, rest, defaults = _merged_options(model, options)
    except (AttributeError, TypeError, ValueError) as e:  # another transformers version: its own loop then
        return f"transformers' generation options could not be read ({type(e).__name__})"
    if rest:
        return f"generate option {sorted(rest)[0]}"
    do_sample = bool(config.do_sample)
    base = defaults.to_dict()
    for key, value in config.to_dict().items():
        if key in SERVED or (not do_sample and key in _SAMPLING_ONLY):
            continue
        if not _is_default(value, base.get(key)):
            return f"generate option {key}={value!r}"
    processors = None
    if do_sample:  # generate's warpers for one sequence (min_tokens_to_keep=1), in its order
        processors = LogitsProcessorList()
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    eos = frozenset() if config.eos_token_id is None else frozenset(
        int(e) for e in torch.as_tensor(config.eos_token_id).flatten().tolist())
    if kwargs.get("attention_mask") is None and config.pad_token_id is not None and \
            config.pad_token_id not in eos and bool((input_ids == config.pad_token_id).any()):
        return "the prompt holds the pad token and no attention mask says whether it is padding"
    criteria = kwargs.get("stopping_criteria")
    # generate replaces its own criteria of these types with the caller's (the loop applies its own as well)
    for c in criteria or ():
        if isinstance(c, (MaxLengthCriteria, EosTokenCriteria, MaxTimeCriteria, StopStringCriteria)):
            return f"a stopping criterion of generate's own type {type(c).__name__}"
    return LoopPlan(processors, eos, StoppingCriteriaList(criteria) if criteria else None, kwargs.get("streamer"))


@torch.no_grad()  # as generate: no autograd graph of the prompt kept alive by the engine's cache
def run_loop(model: nn.Module, engine: Any, input_ids: torch.Tensor, max_new_tokens: int, plan: LoopPlan,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` with ``engine`` (see the module's docstring).

    Args:
        model: the model ``engine`` was built from.
        engine: its :class:`~losa.inference.engine.DecodeEngine`, with room for the prompt and the new tokens.
        input_ids: the prompt ``(1, T)`` (int64).
        max_new_tokens: the most tokens to generate (>= 1).
        plan: :func:`plan_loop`'s plan for the call.
        attention_mask: the prompt's mask ``(1, T)`` (no padding), passed to the prompt's forward.

    Returns:
        The ids ``(1, T + n)``, prompt included, ``n <= max_new_tokens``.

    Raises:
        LosaError: from the engine (a cache too short for the call).
    """
    k, isa = _kernel.load_kernel(), _kernel.best_isa()
    t = input_ids.shape[1]
    ids = torch.empty(1, t + max_new_tokens, dtype=torch.long)
    ids[:, :t] = input_ids
    if plan.streamer is not None:
        plan.streamer.put(input_ids.cpu())
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                return_dict=True)
    engine.pos = None
    engine.load_prompt_cache(out.cache)
    logits = out.logits[0, -1].to(dtype=torch.float32, copy=True)  # [V]
    del out
    n = t
    for i in range(max_new_tokens):
        if plan.processors is None:
            token = int(k.first_argmax(logits, isa))
        else:
            scores = plan.processors(ids[:, :n], logits.view(1, -1))
            token = int(torch.multinomial(nn.functional.softmax(scores, dim=-1), num_samples=1))
        ids[0, n] = token
        n += 1
        done = i + 1 == max_new_tokens or token in plan.eos
        if plan.criteria is not None:  # every criterion, every token (a criterion may stream or watch a deadline)
            done = bool(plan.criteria(ids[:, :n], None).any()) or done
        if plan.streamer is not None:
            plan.streamer.put(ids[0, n - 1:n])
        if done:
            break
        logits = engine.step(token)
    if plan.streamer is not None:
        plan.streamer.end()
    return ids[:, :n].clone()

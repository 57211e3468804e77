"""``losa generate``: greedy/sampled generation with the sparse CPU runtime (or dense, to compare)."""

from __future__ import annotations

import argparse
import os
import time

from losa.cli.common import add_model_arg, add_runtime_args, load_runtime_model, source_model, status
from losa.errors import LosaError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with the sparse inference runtime",
                       description="Load a (pruned) model, swap its pruned linears for sparse CPU kernels "
                                   "and generate. Prints the text to stdout; what was chosen and the decode speed "
                                   "go to stderr.")
    add_model_arg(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    add_runtime_args(p)
    p.add_argument("--save-compact", default=None,
                   help="also write the sparsified model to this new .safetensors file (losa compact writes one "
                        "without generating)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None,
                   help="with --sample: divide the logits by this before sampling (> 0; default: the model's "
                        "generation config, else 1)")
    p.add_argument("--top-k", type=int, default=None,
                   help="with --sample: sample among the k most likely tokens only (>= 1; default: the model's "
                        "generation config)")
    p.add_argument("--top-p", type=float, default=None,
                   help="with --sample: sample among the most likely tokens whose probabilities sum to p "
                        "(0 < p <= 1; default: the model's generation config)")
    p.add_argument("--seed", type=int, default=None, help="with --sample: seed torch's generator (repeatable samples)")
    p.set_defaults(func=run_generate)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, float | int]:
    """The ``generate`` keyword arguments of ``--temperature``, ``--top-k`` and ``--top-p`` (those given).

    Args:
        args: the parsed ``losa generate`` arguments.

    Returns:
        ``temperature`` / ``top_k`` / ``top_p`` for the flags given (transformers' sampling warpers, which the
        decode engine's token loop applies too).

    Raises:
        LosaError: a value out of range, or a sampling flag without ``--sample``.
    """
    given = {flag: v for flag, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                     ("--top-p", args.top_p), ("--seed", args.seed)) if v is not None}
    if given and not args.sample:
        one = len(given) == 1
        raise LosaError(f"{', '.join(given)} only appl{'ies' if one else 'y'} to sampling; add --sample (greedy "
                        f"decoding ignores {'it' if one else 'them'})")
    if args.temperature is not None and not args.temperature > 0:
        raise LosaError(f"--temperature {args.temperature} must be above 0 (greedy decoding: drop --sample)")
    if args.top_k is not None and args.top_k < 1:
        raise LosaError(f"--top-k {args.top_k} must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise LosaError(f"--top-p {args.top_p} must be in (0, 1]")
    names = {"--temperature": "temperature", "--top-k": "top_k", "--top-p": "top_p"}
    return {names[flag]: v for flag, v in given.items() if flag in names}


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from losa.inference import save_sparse
    from losa.inference.decode import LeanDecoder
    from losa.models.registry import max_context, prompt_problem
    from losa.utils.io import check_output_file

    if args.max_new_tokens < 1:
        raise LosaError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if not args.prompt:  # before the model loads (a tokenizer may still find nothing in other text: checked below)
        raise LosaError("--prompt is empty; give some text")
    sampling = sampling_kwargs(args)
    if args.save_compact:
        if not args.sparse:
            raise LosaError("--save-compact writes the sparse layers; drop --dense")
        check_output_file(args.save_compact, "--save-compact", exists_ok=False, suffix=".safetensors")
    model, tok, mode, _ = load_runtime_model(args, "generation")
    ids = tok(args.prompt, return_tensors="pt").input_ids
    problem = prompt_problem(ids.shape[1], args.max_new_tokens, max_context(model), "--max-new-tokens", "--prompt")
    if problem is not None:
        raise LosaError(problem)
    if args.save_compact and mode == "dense":
        raise LosaError("--save-compact: the model has no pruned layer (sparsity < 25 %) to store sparse; "
                        "prune it first (losa prune) or drop --save-compact")
    decoder = LeanDecoder(model, compile=args.compile, compile_wrapper=args.compile_wrapper or "cpp",
                          decode_engine=args.decode_engine)
    if args.save_compact:
        base = source_model(args.model)
        path = save_sparse(model, args.save_compact, source_model=base)
        status(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB) before generating; load it with "
               f"`losa generate {base} --compact {path}`")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = decoder.generate(ids, args.max_new_tokens, do_sample=args.sample, attention_mask=torch.ones_like(ids),
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                               **sampling)
        dt = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    print(tok.decode(out[0], skip_special_tokens=True))
    loop = f"; token loop: {decoder.last_loop}" if decoder.last_engine == "on" else ""
    status(f"decode engine: {decoder.last_engine}{loop}")
    if args.compile:
        mode += f", compiled with the {args.compile_wrapper or 'cpp'} wrapper (this call includes the compile)"
    prompt, threads = ids.shape[1], torch.get_num_threads()
    status(f"[{mode}] {new} tokens in {dt:.2f} s ({new / dt:.1f} tokens/s, "
           f"prompt {prompt} token{'s' if prompt != 1 else ''}, {threads} thread{'s' if threads != 1 else ''})")
    return 0

"""``losa generate``: greedy/sampled generation with the sparse CPU runtime (or dense, to compare)."""

from __future__ import annotations

import argparse
import time

from losa.cli.common import add_model_arg
from losa.errors import LosaError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with the sparse inference runtime",
                       description="Load a (pruned) model, swap its pruned linears for sparse CPU kernels "
                                   "and generate. Prints the text and the decode speed.")
    add_model_arg(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sparse", dest="sparse", action="store_true", default=True,
                      help="use the sparse runtime (default)")
    mode.add_argument("--dense", dest="sparse", action="store_false", help="keep dense layers (baseline)")
    p.add_argument("--value-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="stored precision of the sparse weights (default: float32); with --dtype bfloat16 "
                        "the layers compute like dense bf16 layers (fastest decode on AVX512-BF16 CPUs)")
    p.add_argument("--prefill-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="precision of the prompt (large-batch) GEMM; bfloat16 rounds activations like a dense "
                        "bf16 model and is about 2x faster on CPUs with AVX512-BF16 (default: float32)")
    p.add_argument("--compact", default=None,
                   help="a compact checkpoint written by losa.inference.save_sparse to load into MODEL")
    p.add_argument("--save-compact", default=None, help="write the sparsified model to this .safetensors file")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    import losa
    from losa.inference import load_sparse, save_sparse, sparsify_for_inference

    if args.max_new_tokens < 1:
        raise LosaError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise LosaError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    model, tok = losa.load_model(args.model, dtype=args.dtype)
    if tok is None:
        raise LosaError(f"model {args.model} has no tokenizer; generation needs one")
    model.eval()
    mode = "sparse" if args.sparse else "dense"
    if args.compact:
        if not args.sparse:
            raise LosaError("--compact loads sparse layers; drop --dense")
        load_sparse(model, args.compact, prefill_dtype=args.prefill_dtype)
    elif args.sparse:
        summary = sparsify_for_inference(model, value_dtype=args.value_dtype, prefill_dtype=args.prefill_dtype)
        if summary["replaced"] == 0:
            mode = "dense"
            print("note: no pruned layer found (sparsity < 25 %); generating with dense layers")
        else:
            print(f"sparse layers: {summary['replaced']} ({summary['value_dtype']} values, "
                  f"{summary['compute']} compute, {summary['prefill_dtype']} prefill for float32 inputs, "
                  f"{summary['sparse_bytes'] / 2**20:.1f} MiB instead of {summary['dense_bytes'] / 2**20:.1f} MiB)")
            if summary["sparse_prefill_layers"] and summary["compute"].startswith("bf16"):
                print(f"  {summary['sparse_prefill_layers']} of them skip zeros in the prompt GEMM too "
                      "(>= 65 % sparse; the others decompress tiles for a dense bf16 GEMM)")
    if args.save_compact:
        save_sparse(model, args.save_compact)
        print(f"wrote {args.save_compact}")
    ids = tok(args.prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        dt = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    print(tok.decode(out[0], skip_special_tokens=True))
    print(f"[{mode}] {new} tokens in {dt:.2f} s ({new / dt:.1f} tokens/s, "
          f"prompt {ids.shape[1]} tokens, {torch.get_num_threads()} threads)")
    return 0

"""``losa compact``: write a pruned model's sparse layers (and every other weight) to one compact file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from losa.cli.common import add_model_arg, add_quiet_arg, load_runtime_model, source_model, status


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``compact`` command.

    Args:
        sub: the ``losa`` command's subparsers.
    """
    p = sub.add_parser("compact", help="write a pruned model as a compact sparse file for the runtime",
                       description="Load a pruned checkpoint, pack its pruned linears as the sparse runtime does "
                                   "(bitmask or N:M plus the kept values) and write the whole model to one "
                                   ".safetensors file (losa.inference.save_sparse), smaller in proportion to the "
                                   "pruned weights. `losa generate BASE --compact FILE` and `losa serve BASE "
                                   "--compact FILE` load it into the base model it was pruned from.")
    add_model_arg(p, default=None)
    next(a for a in p._actions if a.dest == "model").help = ("the pruned checkpoint: a local HF directory (losa prune's "
                                                             "output), hub id or .gguf file")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--value-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="stored precision of the sparse weights (default: auto = bfloat16 where the compiled kernel "
                        "runs: half the bytes; float32 with --dtype float32 keeps them exact: --dtype auto loads a "
                        "bf16 model on CPUs with AVX512-BF16)")
    p.set_defaults(dtype="auto")
    next(a for a in p._actions if a.dest == "dtype").help = (
        "dtype of the other weights in the file (embedding, norms): auto, float32, bfloat16, float16 (default: auto "
        "= what losa generate would run on this CPU, printed; float32 keeps them exact)")
    add_quiet_arg(p)
    # what load_runtime_model reads besides the flags above: the file is the sparsified model as loaded
    p.set_defaults(func=run_compact, sparse=True, compact=None, prefill_dtype="auto", lm_head_dtype="float32",
                   threads=None)


def _input_weights(model: str, out: str) -> bool:
    """Whether ``out`` is (or links to) a weight file that loading ``model`` reads: ``model*.safetensors`` in its
    directory. Other files there (an earlier compact file, say) may be replaced with ``--overwrite``."""
    src, dst = Path(model), Path(out)
    if not dst.exists() or not src.is_dir():
        return False
    return any(p.name.startswith("model") and p.suffix == ".safetensors" and
               (p.absolute() == dst.absolute() or os.path.samefile(p, dst)) for p in src.iterdir())


def run_compact(args: argparse.Namespace) -> int:
    """Sparsify ``args.model`` and save it with :func:`losa.inference.save_sparse`.

    Args:
        args: the parsed ``losa compact`` arguments.

    Returns:
        0 once the file is written.

    Raises:
        LosaError: an ``--out`` that is a directory, exists (without ``--overwrite``; with it too when it is a file of
            the input checkpoint) or cannot be written; a model
            that cannot load or has no pruned layer.
    """
    from losa.inference import save_sparse
    from losa.utils.io import check_output_file

    check_output_file(args.out, "--out", exists_ok=args.overwrite, overwrite_flag="--overwrite", suffix=".safetensors")
    if _input_weights(args.model, args.out):  # --overwrite must not eat the checkpoint it reads
        from losa.errors import LosaError

        raise LosaError(f"--out {args.out} is a weight file of the checkpoint being compacted ({args.model}): "
                        "replacing it would lose the model; write the compact file elsewhere")
    model, _, mode, summary = load_runtime_model(args, "compacting", to_run=False)
    if mode == "dense":
        from losa.errors import LosaError

        raise LosaError(f"{args.model} has no pruned layer (sparsity < 25 %) to store sparse; prune it first "
                        "(losa prune) and compact the checkpoint that writes")
    base = source_model(args.model)
    path = save_sparse(model, args.out, source_model=base)
    status(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB: {summary['replaced']} sparse layers with "
           f"{summary['value_dtype']} values, the rest {str(next(model.parameters()).dtype).replace('torch.', '')}); "
           f"load it with `losa generate {base} --compact {path}` (or any model of the same architecture: every "
           "weight comes from the file)")
    return 0

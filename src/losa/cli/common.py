"""Options and helpers shared by several commands."""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from typing import Any

from losa.data.sources import check_eval_datasets, resolve_data_dir
from losa.errors import LosaError

DEFAULT_MODEL = "smollm2-135m"


def add_model_arg(p: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    p.add_argument("model", nargs="?" if default else None, default=default,
                   help=f"local HF directory, hub id, .gguf file or built-in alias (default: {default})")
    p.add_argument("--dtype", default="float32", help="weight dtype to load: float32 (fp32, float), bfloat16 (bf16), "
                                                     "float16 (fp16, half)")


def check_model_arg(name: str) -> None:
    """:func:`losa.models.loading.check_model_name`, plus the command that loads a losa compact file given as the
    model (a file name users try after ``losa compact``).

    Args:
        name: the MODEL argument.
    Raises:
        LosaError: a compact file (naming ``--compact``), or what ``check_model_name`` refuses.
    """

    from losa.export.compact import compact_header
    from losa.models.loading import check_model_name

    header = compact_header(name)
    if header is not None:
        base = header.source_model
        into = f"into {base}" if base else "into the model it was pruned from"
        raise LosaError(f"{name} is a losa compact file, not a model: load it {into} with `losa generate "
                        f"{base or 'MODEL'} --compact {name}` (or losa serve), or give the pruned checkpoint")
    check_model_name(name)


def checkpoint_manifest(name: str) -> dict:
    """The ``losa.json`` of a losa checkpoint (written by ``losa prune`` / ``losa run``), or ``{}`` for any other
    model (no such file, unreadable, not a JSON object)."""
    import os

    from losa.export.checkpoint import MANIFEST

    try:
        with open(os.path.join(name, MANIFEST)) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def source_model(name: str) -> str:
    """The model a compact file written from ``name`` loads into: the ``source_model`` of a losa checkpoint's
    ``losa.json`` (what it was pruned from), else ``name`` itself.

    Args:
        name: the MODEL argument (a losa checkpoint directory, any other model).
    Returns:
        The base model's name as the user gave it to ``losa prune`` / ``losa run``, or ``name``.
    """
    found = checkpoint_manifest(name).get("source_model")
    return found if isinstance(found, str) and found else name


def recipe_for_manifest(recipe: dict) -> dict:
    """A recipe as a checkpoint's losa.json records it: ``data_dir`` as an absolute path (so that
    :func:`recorded_data_dir` finds it from any working directory).

    Args:
        recipe: the config as a mapping (``model_dump``).
    Returns:
        A copy with ``data_dir`` made absolute (``~`` expanded) when it is set.
    """
    import os

    out = dict(recipe)
    if isinstance(out.get("data_dir"), str) and out["data_dir"]:
        out["data_dir"] = os.path.abspath(os.path.expanduser(out["data_dir"]))
    return out


def recorded_data_dir(args: argparse.Namespace, datasets: list[str]) -> None:
    """Without ``--data-dir`` and ``$LOSA_DATA_DIR``, evaluate a losa checkpoint's named ``datasets`` with the data
    directory its recipe recorded, when that directory still holds every one of them (else the hub, as before),
    saying so on stderr; otherwise leave ``args.data_dir`` as given.

    Args:
        args: the command's arguments (``model``, ``data_dir``); ``args.data_dir`` may be set.
        datasets: the perplexity datasets to evaluate (names and files; files need no data dir).
    """
    import os

    from losa.data.sources import EVAL_SPLIT, NAMED_FILES, is_named

    named = [d for d in datasets if is_named(d)]
    if args.data_dir is not None or "LOSA_DATA_DIR" in os.environ or not named:
        return
    recipe = checkpoint_manifest(args.model).get("recipe")
    found = recipe.get("data_dir") if isinstance(recipe, dict) else None
    if not isinstance(found, str) or not found:
        return
    found = os.path.expanduser(found)
    if not os.path.isabs(found):  # recorded as typed: relative to where the checkpoint was written, unknown here
        return
    if all(os.path.isfile(os.path.join(found, NAMED_FILES[d][EVAL_SPLIT[d]])) for d in named):
        args.data_dir = found
        status(f"data dir: {found} (recorded in {os.path.join(args.model, 'losa.json')}; --data-dir overrides)")


def add_data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="directory with wikitext-2-raw/, c4/, ptb/ ... (default: $LOSA_DATA_DIR, else the HF hub)")


def add_recipe_args(p: argparse.ArgumentParser, cls: type) -> None:
    """``--recipe`` plus one flag per field of the config ``cls`` (generated: :mod:`losa.cli.flags`)."""
    from losa.cli.flags import add_config_flags

    p.add_argument("--recipe", help=f"YAML file of {cls.__name__} fields (nested configs as mappings); "
                                    "flags given explicitly override it")
    flags = add_config_flags(p, cls)
    p.set_defaults(config_flags=flags, config_class=cls)


def config_from_args(args: argparse.Namespace) -> Any:
    """The command's config: its YAML recipe (if any), overridden by the flags given.

    ``calib`` defaults to c4 when a data directory is available, else to ``self`` (model-generated text).

    Raises:
        LosaError: an unreadable recipe or an invalid value (one line).
    """
    from losa.cli.flags import config_values
    from losa.utils.config import build_config, load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else {}
    values = config_values(args, args.config_flags, recipe)
    if "calib" not in values:
        values["calib"] = "c4" if data_available(values.get("data_dir")) else "self"
    try:
        return build_config(args.config_class, values)
    except LosaError as e:  # a field the user did not type on the command line: say that the recipe sets it
        flags = config_values(args, args.config_flags, {})
        named = [(k, k) for k in recipe if k not in flags] + [  # nested: options.blocksize, finetune.lr
            (f"{k}.{sub}", sub) for k, v in recipe.items() if isinstance(v, dict)
            for sub in v if sub not in (flags.get(k) or {})]
        # the name as a word of its own: not inside --nm-n, step_eval.seqlen or finetune.distill
        keys = [label for label, word in named if re.search(rf"(?<![\w.-]){re.escape(word)}(?![\w-])", str(e))]
        if not keys:
            raise
        raise LosaError(f"{e} ({', '.join(keys)} {'is' if len(keys) == 1 else 'are'} set by the recipe "
                        f"{args.recipe})") from None


def refuse_ignored(args: argparse.Namespace, ignored: list[tuple[tuple[str, ...], str]],
                   warn_only: bool = False) -> None:
    """Fail when the config ignores fields the user set (``ignored``: (field path, why and the fix), e.g.
    from :meth:`LoSAConfig.ignored_fields`), naming their flags.

    Args:
        args: the parsed command line (its ``config_flags`` name the fields' options).
        ignored: (field path, why and the fix) per ignored field.
        warn_only: warn instead (``--resume``: a run started by a version that accepted these flags must
            resume with the recipe it was started with).
    Raises:
        LosaError: one line for the first reason, with every flag it applies to.
    """
    # a boolean switched off on the command line is named as typed (--no-x)
    options = {f.path: "--no-" + f.option[2:] if getattr(args, f.dest, None) is False else f.option
               for f in args.config_flags}
    for why in dict.fromkeys(w for _, w in ignored):
        names = [options.get(path, ".".join(path)) for path, w in ignored if w == why]
        line = f"{', '.join(names)} {'has' if len(names) == 1 else 'have'} no effect {why}"
        if not warn_only:
            raise LosaError(line)
        warnings.warn(line, stacklevel=2)


def check_window_flags(seqlen: int | None, seqlen_flag: str, max_windows: int | None, seqlen_hint: str = "") -> None:
    """The perplexity window flags of every command, with one wording: a window of at least 2 tokens,
    ``--max-windows`` at least 1.

    Args:
        seqlen: the window length given (None: not given, nothing to check).
        seqlen_flag: its flag, e.g. ``--seqlen`` or ``--eval-seqlen``.
        max_windows: ``--max-windows`` (None: every window).
        seqlen_hint: what else the user can do about the window length (appended after "; ").
    Raises:
        LosaError: a window below 2 tokens or ``--max-windows`` below 1.
    """
    if seqlen is not None and seqlen < 2:
        raise LosaError(f"{seqlen_flag} {seqlen} must be at least 2 (a window predicts all its tokens but the first)"
                        + (f"; {seqlen_hint}" if seqlen_hint else ""))
    if max_windows is not None and max_windows < 1:
        raise LosaError(f"--max-windows {max_windows} must be at least 1; omit it to evaluate every window")


def eval_flag(args: argparse.Namespace) -> str:
    """The option that set the evaluation window, as errors name it: ``--eval-seqlen`` if given, else ``--seqlen``."""
    return "--eval-seqlen" if args.eval_seqlen is not None else "--seqlen"


def eval_settings(args: argparse.Namespace, seqlen: int, data_dir: str | None) -> tuple[list[str], int]:
    """The perplexity datasets and window length of ``--eval`` / ``--eval-seqlen`` / ``--max-windows``,
    checked before any work: every dataset exists, the window has at least 2 tokens, ``--max-windows``
    is at least 1. The window against the model's context is checked once the model is loaded
    (:func:`losa.models.registry.check_window`).

    Args:
        args: the command's arguments.
        seqlen: the window length when ``--eval-seqlen`` is not given (the calibration ``--seqlen``).
        data_dir: the data directory of the config.
    Returns:
        (datasets, window length); no datasets with ``--eval none`` (the default without a data dir).
    Raises:
        LosaError: an unknown dataset or missing file, a named dataset missing from the data dir,
            ``--eval-seqlen`` below 2 or ``--max-windows`` below 1, or evaluation flags (``--eval-seqlen``,
            ``--max-windows``, ``--compare-dense``, ``--eval-every-step``) without any dataset to evaluate.
    """
    evals = args.eval if args.eval is not None else ("wikitext2" if data_available(data_dir) else "none")
    datasets = [] if evals == "none" else [d.strip() for d in evals.split(",") if d.strip()]
    check_window_flags(args.eval_seqlen, "--eval-seqlen", args.max_windows, "omit it to use --seqlen")
    if not datasets:  # nothing is evaluated: the evaluation flags would do nothing
        given = [f for f, v in (("--eval-seqlen", args.eval_seqlen), ("--max-windows", args.max_windows),
                                ("--compare-dense", getattr(args, "compare_dense", False)),
                                ("--eval-every-step", getattr(args, "eval_every_step", False))) if v]
        if given:
            verb, drop = ("has" if len(given) == 1 else "have"), " and ".join(given)
            if args.eval is not None:
                raise LosaError(f"{', '.join(given)} {verb} no effect with --eval none; drop {drop}, or evaluate "
                                "with --eval wikitext2 (c4, ptb) or --eval FILE")
            raise LosaError(f"{', '.join(given)} {verb} no effect without evaluation data (no data dir, so no "
                            f"default --eval); pass --data-dir, --eval FILE or --eval wikitext2 (from the HF hub), or drop {drop}")
    check_eval_datasets(datasets, data_dir, "--eval")
    return datasets, args.eval_seqlen if args.eval_seqlen is not None else seqlen


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars (for logs)")


def data_available(data_dir: str | None) -> bool:
    return resolve_data_dir(data_dir) is not None


def dump(obj: object) -> str:
    return json.dumps(obj, indent=2, default=str)


def status(line: str) -> None:
    """Print a status line of the runtime commands (what was chosen, loaded, timed) to stderr: stdout carries
    only what the command produces (``losa generate``'s text), so ``> out.txt`` captures just that."""
    print(line, file=sys.stderr, flush=True)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Flags of the commands that run a model with the sparse CPU runtime (generate, serve)."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sparse", dest="sparse", action="store_true", default=True,
                      help="use the sparse runtime (default)")
    mode.add_argument("--dense", dest="sparse", action="store_false", help="keep dense layers (baseline)")
    # --dtype comes from add_model_arg; the runtime commands pick it per CPU (losa/inference/arith.py)
    p.set_defaults(dtype="auto")
    dtype_flag = p._option_string_actions.get("--dtype")
    if dtype_flag is not None:
        dtype_flag.help = ("model dtype: auto, float32, bfloat16, float16 (default: auto = bfloat16 on CPUs with "
                           "AVX512-BF16, else float32; the choice and its reason are printed)")
    p.add_argument("--value-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="stored precision of the sparse weights (default: auto = bfloat16 where the compiled "
                        "kernel runs: half the bytes per decoded token; float32 keeps the weights exact)")
    p.add_argument("--prefill-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="precision of the prompt (large-batch) GEMM of a float32 model; bfloat16 rounds activations "
                        "like a dense bf16 model and is about 2x faster with AVX512-BF16; ignored on CPUs without "
                        "native bf16 (default: auto = as the model: bf16 for a bf16 model, else float32)")
    p.add_argument("--lm-head-dtype", default="auto",
                   help="auto, float32 or bfloat16: the LM head. float32 keeps the head as loaded (a bf16 model's head "
                        "stays bf16, multiplied by torch). bfloat16 on a float32 model multiplies a separate bf16 "
                        "copy (float32 sums; a tied embedding is not changed), halving the head's bytes per token; "
                        "on a bf16 model (CPUs with AVX512-BF16) it multiplies the head's own weight with losa's "
                        "kernel instead of torch's bf16 matrix-vector product (default: auto = bfloat16 for a "
                        "float32 model where the compiled kernel runs and for a bf16 model on such a CPU, else as "
                        "loaded; measured in benchmarks/results/decode.md and lm_head.md)")
    p.add_argument("--compile", action="store_true",
                   help="static KV cache and torch.compile of the decode step: less per-token overhead, but the "
                        "first generation of each cache size compiles first (worth it for serving and long outputs)")
    p.add_argument("--compile-wrapper", default=None, choices=["cpp", "python"],
                   help="with --compile: how the compiled step calls its kernels: cpp = Inductor's C++ wrapper (less "
                        "per-token overhead, a longer first compile), python = Inductor's generated Python wrapper "
                        "(default: cpp; measured in benchmarks/results/decode.md)")
    p.add_argument("--decode-engine", default="auto", choices=["auto", "off"],
                   help="auto: decode one prompt of a float32 or bfloat16 LLaMA-style model (LLaMA, Mistral, Qwen2) with the C++ "
                        "decode engine, one call per token (the prompt itself runs through the model); off: "
                        "transformers' decode steps. --compile uses the compiled step instead. A bfloat16 model's "
                        "logits from the engine differ from the modules' by bf16 rounding (the same roundings, sums "
                        "in another order), so greedy text can part ways where two tokens nearly tie; a float32 "
                        "model's agree to float32 rounding (default: auto; measured in "
                        "benchmarks/results/decode.md)")
    p.add_argument("--compact", default=None,
                   help="a compact checkpoint written by losa.inference.save_sparse to load into MODEL")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    add_quiet_arg(p)


def use_stored_value_dtype(args: argparse.Namespace) -> None:
    """With ``--compact``, set ``args.value_dtype`` to the dtype the file stores, before anything is loaded.

    The compact file's values are loaded as stored, so the printed arithmetic line must name that dtype;
    a different ``--value-dtype`` the user gave is ignored with a one-line warning.

    Args:
        args: the parsed ``losa generate`` / ``losa serve`` arguments (changed in place).
    Raises:
        LosaError: ``--compact`` with ``--dense``, or a compact file that is missing or unreadable.
    """
    from losa.export.compact import stored_value_dtype

    if not args.compact:
        return
    if not args.sparse:
        raise LosaError("--compact loads sparse layers; drop --dense")
    stored = stored_value_dtype(args.compact)
    if stored not in ("float32", "bfloat16"):
        return
    if args.value_dtype not in ("auto", stored):
        status(f"warning: --value-dtype {args.value_dtype} ignored: {args.compact} stores {stored} values and "
               f"they are used as stored (to change it, write the file again: losa compact CHECKPOINT --out FILE --value-dtype {args.value_dtype})")
    args.value_dtype = stored


def load_runtime_model(args: argparse.Namespace, purpose: str,
                       to_run: bool = True) -> tuple[Any, Any, str, dict | None]:
    """Load ``args.model`` and swap in the sparse layers as the runtime flags say; prints what it did (to stderr:
    :func:`status`).

    ``auto`` dtypes are chosen for this CPU by :func:`losa.inference.arith.choose_arithmetic` (one printed
    line says what and why); ``--lm-head-dtype`` by :func:`losa.inference.decode.resolve_lm_head_dtype`.

    Args:
        args: the parsed runtime flags (``model``, ``dtype``, ``value_dtype``, ``prefill_dtype``, ``lm_head_dtype``,
            ``sparse``, ``compact``, ``threads``).
        purpose: what the model is loaded for, as the notes name it (e.g. "generation").
        to_run: the model runs here (False: it is only written, ``losa compact``): a tokenizer is required and the
            notes on what runs (no pruned layer, batch-size thresholds) are printed.

    Returns:
        ``(model, tokenizer, mode, summary)``: mode "sparse" or "dense"; the
        :func:`~losa.inference.sparsify_for_inference` summary, or for a ``--compact`` file
        :func:`~losa.inference.sparsify.sparse_summary`'s (None with ``--dense``).

    Raises:
        LosaError: a bad flag or ``LOSA_HUGEPAGES``, a model that cannot load, a missing tokenizer (when needed)
            or an unreadable compact file.
    """
    import torch

    import losa
    from losa.inference import kernel as _kernel
    from losa.inference import load_sparse, sparsify_for_inference, thresholds
    from losa.inference.arith import Requested, choose_arithmetic, detect_isa
    from losa.inference.decode import normalize_lm_head_dtype, resolve_lm_head_dtype, set_lm_head_dtype
    from losa.inference.sparsify import sparse_summary
    use_stored_value_dtype(args)
    head_request = normalize_lm_head_dtype(getattr(args, "lm_head_dtype", "auto"))  # bad flags fail before loading
    _kernel.hugepages_enabled()  # and a bad LOSA_HUGEPAGES
    if getattr(args, "compile_wrapper", None) is not None and not args.compile:
        raise LosaError(f"--compile-wrapper {args.compile_wrapper} only applies to the compiled decode step; add "
                        "--compile or drop it")
    check_model_arg(args.model)  # and a missing model, before the arithmetic line
    if args.threads is not None:
        if args.threads < 1:
            raise LosaError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    choice = choose_arithmetic(detect_isa(use_kernel=args.sparse),
                               Requested(args.dtype, getattr(args, "value_dtype", "auto"),
                                         getattr(args, "prefill_dtype", "auto"),
                                         stored_in=args.compact if args.sparse else None))
    status(choice.line(dense=not args.sparse))
    if args.compact and args.dtype == "auto":
        from losa.export.compact import stored_dense_dtype

        dense = stored_dense_dtype(args.compact)
        if dense == "float32" and choice.dtype != "float32":
            status(f"note: {args.compact} stores its other weights in float32; --dtype auto runs a {choice.dtype} "
                   "model on this CPU, which rounds them (--dtype float32 keeps them as stored)")
    model, tok = losa.load_model(args.model, dtype=choice.dtype)
    if tok is None and to_run:
        raise LosaError(f"model {args.model} has no tokenizer; {purpose} needs one")
    model.eval()
    mode, summary = ("sparse" if args.sparse else "dense"), None
    if args.compact:  # --dense was refused by use_stored_value_dtype
        load_sparse(model, args.compact, prefill_dtype=choice.prefill_dtype)
        summary = sparse_summary(model)
    elif args.sparse:
        from losa.inference.sparsify import NOTHING_SPARSE

        with warnings.catch_warnings():  # said below as a note, in the command's words
            warnings.filterwarnings("ignore", message=re.escape(NOTHING_SPARSE))
            summary = sparsify_for_inference(model, value_dtype=choice.value_dtype,
                                             prefill_dtype=choice.prefill_dtype)
    if summary is not None:
        if summary["replaced"] == 0:
            mode = "dense"
            if to_run:
                status(f"note: no pruned layer found (sparsity < 25 %); {purpose} with dense layers")
        else:
            # the prefill dtype applies to a float32 model's prompts (a bf16 model's run in bf16)
            prefill = (f"{summary['prefill_dtype']} prefill; " if choice.dtype == "float32" else "")
            status(f"sparse layers: {summary['replaced']} ({summary['value_dtype']} values; compute: "
                   f"{summary['compute']}; {prefill}"
                   f"{_mib(summary['sparse_bytes'])} instead of {_mib(summary['dense_bytes'])})")
            if summary["sparse_bytes"] >= summary["dense_bytes"]:
                wider = summary["value_dtype"] == "float32" and choice.dtype != "float32"
                halve = ("write the file again with `losa compact CHECKPOINT --out FILE --value-dtype bfloat16`, "
                         "which halves them" if args.compact else "--value-dtype bfloat16 halves them")
                status("warning: the sparse layers are not smaller than the dense ones" +
                       (f"; their float32 values are twice the model's bf16 weights: {halve} (exact for a bf16 "
                        "model)" if wider else " at this sparsity"))
            if summary["sparse_prefill_layers"] and summary["compute"].startswith("bf16"):
                status(f"  {summary['sparse_prefill_layers']} of them skip zeros in the prompt GEMM too "
                       "(>= 65 % sparse; the others decompress tiles for a dense bf16 GEMM)")
    if to_run and mode == "sparse" and _kernel.load_kernel() is not None:
        hint = thresholds.advice(_kernel.best_isa())
        if hint:
            status(f"note: {hint}")
        used = thresholds.in_use(_kernel.best_isa(), torch.get_num_threads())
        if used:
            status(used)
    if not args.sparse and head_request == "auto":
        head_request = "float32"  # the dense baseline stays as loaded unless asked
    head = resolve_lm_head_dtype(head_request, next(model.parameters()).dtype)
    if set_lm_head_dtype(model, head):
        if model.get_output_embeddings().in_place:
            status("LM head: its bf16 weights through the AVX512-BF16 row loop (float32 sums; no copy)")
        else:
            status("LM head: bf16 copy of its weights (float32 sums; the embedding keeps float32)")
    return model, tok, mode, summary


def _mib(n: int) -> str:
    """A size in MiB with three significant digits (a tiny model's 0.09 vs 0.14 MiB stays visible)."""
    return f"{n / 2**20:.3g} MiB"


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)$", re.IGNORECASE)


def add_offload_args(p: argparse.ArgumentParser) -> None:
    """``--max-memory`` / ``--offload-folder``: load a model larger than memory with accelerate's offloading."""
    p.add_argument("--max-memory", metavar="DEV=SIZE,...", default=None,
                   help="load with accelerate's device map under these budgets, e.g. 0=70GiB,cpu=200GiB (GPU index "
                        "or cpu; sizes in bytes: KB, MB, GB, TB = 10^3.., KiB, MiB, GiB, TiB = 2^10..); what does not "
                        "fit goes to --offload-folder, and losa onloads one decoder layer at a time (README: Models "
                        "larger than memory)")
    p.add_argument("--offload-folder", metavar="DIR", default=None,
                   help="folder for the weights that fit nowhere in --max-memory (disk offloading; implies the "
                        "device map); it is kept after the run")


def offload_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``load_model``'s accelerate arguments from ``--max-memory`` / ``--offload-folder`` (none without them).

    Raises:
        LosaError: a ``--max-memory`` entry that is not ``DEVICE=SIZE`` with a GPU index or ``cpu`` and a size such
            as ``70GiB``.
    """
    if args.max_memory is None and args.offload_folder is None:
        return {}
    import torch

    budgets: dict[int | str, int] = {}  # in bytes: accelerate reads some units otherwise (lowercase gb as bits)
    for item in (args.max_memory or "").split(","):
        if not item.strip():
            continue
        dev, _, size = (x.strip() for x in item.partition("="))
        m = _SIZE.match(size)
        if not (dev.isdigit() or dev == "cpu") or m is None:
            raise LosaError(f"--max-memory entry {item.strip()!r} is not DEVICE=SIZE; use e.g. 0=70GiB,cpu=200GiB "
                            "(a GPU index or cpu, and a size in B, KB, MB, GB, TB or KiB, MiB, GiB, TiB)")
        if dev.isdigit() and int(dev) >= (gpus := torch.cuda.device_count()):
            raise LosaError(f"--max-memory names GPU {dev}, and this machine has {gpus or 'no'} "
                            f"GPU{'' if gpus == 1 else 's'}; give budgets for its devices (cpu without a GPU)")
        unit = m.group(2).upper()
        scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
        budgets[int(dev) if dev.isdigit() else dev] = int(float(m.group(1)) * scale)
    out: dict[str, Any] = {"device_map": "auto"}
    if budgets:
        out["max_memory"] = budgets
    if args.offload_folder is not None:
        out["offload_folder"] = args.offload_folder
    return out


def offload_note(model: Any, args: argparse.Namespace) -> str | None:
    """What accelerate's device map put where (None for a model loaded without one), checked first.

    Raises:
        LosaError: weights went to disk without ``--offload-folder`` (pruned values could not be written back).
    """
    from collections import Counter

    placed = Counter(str(v) for v in (getattr(model, "hf_device_map", None) or {}).values())
    if not placed:
        return None
    if "disk" in placed and args.offload_folder is None:
        raise LosaError(f"the model does not fit in --max-memory {args.max_memory}: {placed['disk']} of its modules "
                        "go to disk, which needs --offload-folder DIR")
    name = {d: f"GPU {d}" if d.isdigit() else d for d in placed}
    where = (f"the whole model on {name[next(iter(placed))]}" if list(model.hf_device_map) == [""] else
             ", ".join(f"{n} module{'s' if n > 1 else ''} on {name[d]}" for d, n in sorted(placed.items())))
    folder = f" (offload folder {args.offload_folder})" if "disk" in placed else ""
    return f"  accelerate's device map: {where}{folder}; losa onloads one decoder layer at a time"

"""Options and helpers shared by several commands."""

from __future__ import annotations

import argparse
import json

from losa.data.sources import resolve_data_dir

DEFAULT_MODEL = "smollm2-135m"


def add_model_arg(p: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    p.add_argument("model", nargs="?" if default else None, default=default,
                   help=f"local HF directory, hub id, .gguf file or built-in alias (default: {default})")
    p.add_argument("--dtype", default="float32", help="weight dtype to load: float32, bfloat16, float16")


def add_data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="directory with wikitext-2-raw/, c4/, ptb/ ... (default: $LOSA_DATA_DIR, else the HF hub)")


def add_calibration_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, default_calib: str = "c4") -> None:
    """The calibration flags shared by ``losa prune`` and ``losa run`` (CalibrationFields)."""
    p.add_argument("--calib", help="calibration source: c4, wikitext2, ptb, self (model-generated), or a "
                                   f".txt/.json/.jsonl file (default: {default_calib})")
    p.add_argument("--nsamples", type=int, help="calibration windows (default: 128)")
    p.add_argument("--seqlen", type=int, help="calibration window length in tokens (default: 2048)")
    p.add_argument("--calib-batch-size", type=int,
                   help="windows per calibration forward (default: about 1024 tokens per batch; all windows in "
                        "one batch for the single-pass mode of losa prune)")
    p.add_argument("--stats-precision", choices=("model", "bfloat16", "float16"),
                   help="autocast dtype of the statistics-only passes (outputs are still propagated in the "
                        "model's dtype). Measured on SmolLM2 (CPU): Wanda 1.0-1.3x faster, but worse perplexity at "
                        "60-70 %% sparsity (default: model)")


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars (for logs)")


def data_available(data_dir: str | None) -> bool:
    return resolve_data_dir(data_dir) is not None


def dump(obj: object) -> str:
    return json.dumps(obj, indent=2, default=str)

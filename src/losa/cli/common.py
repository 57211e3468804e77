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


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars (for logs)")


def data_available(data_dir: str | None) -> bool:
    return resolve_data_dir(data_dir) is not None


def dump(obj: object) -> str:
    return json.dumps(obj, indent=2, default=str)

"""Library versions recorded with every checkpoint, report and benchmark row."""

from __future__ import annotations

import platform


def versions() -> dict[str, str]:
    """``{"losa", "torch", "transformers", "python"}`` version strings (imports torch and transformers)."""
    import torch
    import transformers

    import losa

    return {"losa": losa.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}

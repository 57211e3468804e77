"""losa: Dynamic Low-Rank Sparse Adaptation for LLMs.

One-call API::

    import losa
    model, tok = losa.load_model("smollm2-135m")
    report = losa.prune(model, tok, losa.PruneConfig(method="wanda", sparsity=0.5))
"""

from __future__ import annotations

__version__ = "0.1.0"

from losa.config import PruneConfig  # noqa: E402
from losa.errors import LosaError, SparsityVerificationError  # noqa: E402
from losa.eval.ppl import perplexity  # noqa: E402
from losa.inference import sparsify_for_inference  # noqa: E402
from losa.models.loading import load_model  # noqa: E402
from losa.prune import prune  # noqa: E402
from losa.runner import LoSAConfig, run  # noqa: E402
from losa.save import save_checkpoint  # noqa: E402
from losa.verify import sparsity_report  # noqa: E402

__all__ = [
    "LosaError",
    "SparsityVerificationError",
    "PruneConfig",
    "LoSAConfig",
    "run",
    "sparsify_for_inference",
    "load_model",
    "perplexity",
    "prune",
    "save_checkpoint",
    "sparsity_report",
    "__version__",
]

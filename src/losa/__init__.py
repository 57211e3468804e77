"""losa: Dynamic Low-Rank Sparse Adaptation for LLMs.

One-call API::

    import losa
    model, tok = losa.load_model("smollm2-135m")
    # calibration text: C4 from the hub; offline, data_dir="path/to/data" reads local files (README: Data)
    report = losa.prune(model, tok, losa.PruneConfig(method="wanda", sparsity=0.5))
    print(report.sparsity.overall)

The public names are imported on first use (``losa.utils.lazy``), so ``import losa`` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from losa.errors import LosaError, SparsityVerificationError
from losa.utils.lazy import lazy_attributes

__version__ = "0.1.0"

_EXPORTS = {
    "PruneConfig": "losa.pipelines.oneshot",
    "PruneReport": "losa.pipelines.oneshot",
    "prune": "losa.pipelines.oneshot",
    "LoSAConfig": "losa.pipelines.losa.config",
    "run": "losa.pipelines.losa.loop",
    "sparsify_for_inference": "losa.inference.sparsify",
    "load_model": "losa.models.loading",
    "perplexity": "losa.eval.ppl",
    "save_checkpoint": "losa.export.checkpoint",
    "sparsity_report": "losa.export.verify",
}
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from losa.eval.ppl import perplexity  # noqa: F401
    from losa.export.checkpoint import save_checkpoint  # noqa: F401
    from losa.export.verify import sparsity_report  # noqa: F401
    from losa.inference.sparsify import sparsify_for_inference  # noqa: F401
    from losa.models.loading import load_model  # noqa: F401
    from losa.pipelines.losa.config import LoSAConfig  # noqa: F401
    from losa.pipelines.losa.loop import run  # noqa: F401
    from losa.pipelines.oneshot import PruneConfig, PruneReport, prune  # noqa: F401

__all__ = ["LosaError", "SparsityVerificationError", *_EXPORTS, "__version__"]

"""Export: atomic HF checkpoints with ``losa.json`` (``checkpoint``), sparsity / N:M verification
(``verify``) and the compact sparse file of the inference runtime (``compact``)."""

from losa.utils.lazy import lazy_attributes

__getattr__, __dir__ = lazy_attributes(__name__, {
    "save_checkpoint": "losa.export.checkpoint",
    "sparsity_report": "losa.export.verify",
    "verify_targets": "losa.export.verify",
    "save_sparse": "losa.export.compact",
    "load_sparse": "losa.export.compact",
})
__all__ = ["load_sparse", "save_checkpoint", "save_sparse", "sparsity_report", "verify_targets"]

"""Text sources for calibration and evaluation."""

from losa.data.calibration import get_calibration
from losa.data.sources import eval_text, load_documents, resolve_data_dir

__all__ = ["get_calibration", "eval_text", "load_documents", "resolve_data_dir"]

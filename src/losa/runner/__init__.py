"""The LoSA runner: dynamic prune / fine-tune schedule (``losa.run``)."""

from losa.runner.config import LoSAConfig
from losa.runner.run import run

__all__ = ["LoSAConfig", "run"]

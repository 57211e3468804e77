"""LoSA (Huang et al., ICLR 2025): T steps of prune -> allocate ranks -> fine-tune masked LoRA, then merge.

- ``config``: :class:`LoSAConfig`; ``loop``: :func:`run` and the :class:`LoSARun` object (setup, step,
  finish); ``visitors``: the calibration-engine visitors (RMI Grams, adapter-aware pruning,
  reconstruction errors); ``state``: per-step resume state.
"""

from losa.utils.lazy import lazy_attributes

__getattr__, __dir__ = lazy_attributes(__name__, {"LoSAConfig": "losa.pipelines.losa.config",
                                                  "run": "losa.pipelines.losa.loop",
                                                  "StepEval": "losa.pipelines.losa.loop"})
__all__ = ["LoSAConfig", "StepEval", "run"]

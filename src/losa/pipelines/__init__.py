"""Pipelines: the end-to-end jobs built from the algorithm packages.

- :mod:`losa.pipelines.oneshot`: one-shot pruning (``losa.prune``, ``PruneConfig``);
- :mod:`losa.pipelines.losa`: the LoSA prune / allocate / fine-tune schedule (``losa.run``, ``LoSAConfig``);
- :mod:`losa.pipelines.config`: the calibration fields both share.
"""

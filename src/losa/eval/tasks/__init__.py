"""lm-eval task configs that read losa's offline data files (see :mod:`losa.eval.converters`).

The YAML files here mirror lm-eval's own tasks of the same names (prompts, choices, targets,
metrics, split) and differ only in where the data come from: ``custom_dataset`` points at
:mod:`losa.eval.tasks.hooks`, which converts the local files into a ``datasets.DatasetDict``.
Load them with ``TaskManager(include_path=TASKS_DIR, include_defaults=False, metadata={"data_dir": ...})``.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

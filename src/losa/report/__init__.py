"""Run reports (``report.md`` / ``report.html`` with figures) and paper-style comparison tables.

``write_report`` and ``compare`` import matplotlib on first use, so that recording a run's report.json
(every LoSA step does) does not load a plotting stack.
"""

from typing import Any

from losa.report.schema import FinalResults, RunMeta, RunReport, StepRecord, TaskScore, load_run, save_report

__all__ = ["FinalResults", "RunMeta", "RunReport", "StepRecord", "TaskScore", "compare", "load_run",
           "save_report", "write_report"]


def __getattr__(name: str) -> Any:
    if name in ("write_report", "compare"):
        from losa.report.compare import compare
        from losa.report.render import write_report

        # importing the submodule ``compare`` bound the package attribute to it; bind the functions
        globals().update(compare=compare, write_report=write_report)
        return globals()[name]
    raise AttributeError(f"module 'losa.report' has no attribute {name!r}")

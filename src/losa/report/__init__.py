"""Run reports (``report.md`` / ``report.html`` with figures) and paper-style comparison tables.

``write_report`` and ``compare`` import matplotlib on first use, so that recording a run's report.json
(every LoSA step does) does not load a plotting stack.
"""

from losa.report.schema import FinalResults, RunMeta, RunReport, StepRecord, TaskScore, load_run, save_report
from losa.utils.lazy import lazy_attributes

__all__ = ["FinalResults", "RunMeta", "RunReport", "StepRecord", "TaskScore", "compare", "load_run",
           "save_report", "write_report"]


__getattr__, __dir__ = lazy_attributes(__name__, {"compare": "losa.report.tables",
                                                  "write_report": "losa.report.render"})

"""Run reports (``report.md`` / ``report.html`` with figures) and paper-style comparison tables."""

from losa.report.compare import compare
from losa.report.render import write_report
from losa.report.schema import FinalResults, RunMeta, RunReport, StepRecord, TaskScore, load_run, save_report

__all__ = ["FinalResults", "RunMeta", "RunReport", "StepRecord", "TaskScore", "compare", "load_run",
           "save_report", "write_report"]

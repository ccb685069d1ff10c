"""The report stage: registry -> tables (Markdown, LaTeX, CSV), plots, guideline, report.html."""

from medfm.report.build import ReportFiles, report

__all__ = ["ReportFiles", "report"]

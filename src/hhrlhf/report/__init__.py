"""One self-contained HTML report: preference statistics and audit, red-team analyses."""

from hhrlhf.report.build import ReportConfig, build_report

__all__ = ["ReportConfig", "build_report"]

"""Show: run stores → one self-contained HTML report (plotly.js inlined, works offline).

Reads the store only, through `keel.store`; imports no training code and no torch.

    from keel.report import write_report
    write_report(["runs/demo/bare", "runs/demo/guarded"], "runs/demo/report.html")
"""

from keel.report.charts import Chart, plan_charts
from keel.report.downsample import downsample_minmax
from keel.report.page import ReportError, build_page, write_report
from keel.report.run_data import RunData, load_run
from keel.report.sources import STORE_KINDS, Source, StoreKind, classify

__all__ = [
    "Chart",
    "ReportError",
    "RunData",
    "STORE_KINDS",
    "Source",
    "StoreKind",
    "build_page",
    "classify",
    "downsample_minmax",
    "load_run",
    "plan_charts",
    "write_report",
]

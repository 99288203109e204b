"""Show: run and sweep stores → one self-contained HTML report (plotly.js inlined, works offline).

Reads the stores only, through `keel.store`, as untrusted input (every value checked on read, escaped on
write); imports no training code and no torch.

    from keel.report import write_report
    write_report(["runs/demo/bare", "runs/demo/guarded"], "runs/demo/report.html")
"""

from keel.report.charts import Chart, plan_charts
from keel.report.downsample import downsample_minmax
from keel.report.labels import run_labels
from keel.report.page import ReportError, build_page, write_report
from keel.report.run_data import RunData, load_run
from keel.report.sources import STORE_KINDS, Source, StoreKind, classify
from keel.report.sweep_data import SweepData, load_sweep_data

__all__ = [
    "Chart",
    "ReportError",
    "RunData",
    "STORE_KINDS",
    "Source",
    "StoreKind",
    "SweepData",
    "build_page",
    "classify",
    "downsample_minmax",
    "load_run",
    "load_sweep_data",
    "plan_charts",
    "run_labels",
    "write_report",
]

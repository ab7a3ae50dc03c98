"""``tuna-eval report``: one self-contained HTML page of evaluation runs, sample by sample.

Per sample: the image, question, gold answer, each run's answer marked right / wrong, the tags with their
weights as bars, the datastore neighbours the tags came from (thumbnails with ``--datastore``) and, for
k-shot runs, the demonstrations in prompt order; above them the runs' metrics from results.json and filters.

The page holds everything: thumbnails as base64 JPEG (each distinct image once) and the data as one JSON
blob that the page's script renders a page of samples at a time, through textContent and DOM calls only,
so no string from the data is parsed as HTML. A Content-Security-Policy forbids any fetch: no server, no
network; it opens from disk and can be mailed.

Modules: ``data`` (runs, samples joined across them, marks, summary), ``images`` (thumbnails), ``page``
(the HTML from ``page.html`` and the command). Tests: tests/eval/test_report.py, test_report_browser.py.
"""

from eval.report.data import ReportConfig, ReportError, collect
from eval.report.page import ReportStats, build_report, main, render_html

__all__ = ["ReportConfig", "ReportError", "ReportStats", "build_report", "collect", "main", "render_html"]

"""Evaluation of edits over datasets: readers of the published layouts (datasets.py), the run over an editor
(runner.py), statistics (stats.py) and the reports (report.py). `python -m xmgie_core eval` drives it
(apps/evaluate.py)."""

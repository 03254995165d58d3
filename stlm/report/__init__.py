"""Experiment summary view: `python -m stlm.report runs/ [--out report/]`."""

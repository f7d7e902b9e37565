"""Stages of the CLEAR benchmark pipeline, run as `python -m tasks <stage> [options]`.

No module in this package imports Airflow: the same code runs under Airflow, in a
container or from a shell.
"""

__version__ = "0.1.0"

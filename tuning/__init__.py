"""Sweeps: the CLI, Ray Tune + Optuna, MLflow tracking, model selection and reports.

What it holds: the command line (``cli``), launching and resuming sweeps (``sweep``, ``search``,
``cluster``), MLflow runs and callbacks (``tracking``, ``callbacks``), selection criteria and
correlation statistics as pure functions of a trial table (``selection``), and the leaderboard and
export (``report``). Only this package starts Ray, opens MLflow runs or reads the environment.

It may import ``trainables`` and ``search_spaces``, never the reverse.
Entry points: ``hesstune`` (``tuning.cli:main``), ``tuning.sweep.run_sweep`` and ``tuning.selection``.
"""

"""The audit every fault test ends with (issue "faults users actually meet"): a sweep tracked in
MLflow has exactly the trials it asked for, one child run each, every epoch's metrics present
once, and no run left RUNNING."""

from __future__ import annotations

from collections import Counter
from typing import Any

PER_EPOCH = ("epoch", "train_loss", "val_acc")  # reported by every trial at every epoch


def audit_sweep(uri: str, name: str, *, trials: int, epochs: int) -> Any:
    """Assert the audit on sweep ``name`` in the store at ``uri``; returns its child runs (a
    DataFrame without runs the resumed sweep ended as lost, which are KILLED and counted apart).

    - the parent run and exactly ``trials`` children, one per trial id, all FINISHED;
    - no run of the experiment RUNNING;
    - in every child, no metric has a step logged twice, and ``epoch``, ``train_loss`` and
      ``val_acc`` have every step 1..``epochs``.
    """
    import mlflow
    import pandas as pd

    from tuning.tracking import mlflow_key

    mc = mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[name], max_results=50000)
    assert not (runs["status"] == "RUNNING").any(), runs[["run_id", "status"]].to_string()
    parent = runs[runs["tags.hesstune.role"] == "parent"]
    assert len(parent) == 1 and parent["status"].iloc[0] == "FINISHED", parent[["run_id", "status"]]
    children = runs[runs["tags.hesstune.role"] != "parent"]
    lost = children.get("tags.hesstune.lost", pd.Series(None, index=children.index)).notna()
    assert set(children[lost]["status"]) <= {"KILLED"}
    children = children[~lost]
    assert len(children) == trials, f"{len(children)} child runs, expected {trials}"
    assert children["tags.hesstune.trial_id"].nunique() == trials
    assert set(children["status"]) == {"FINISHED"}, children[["run_id", "status"]].to_string()
    want = list(range(1, epochs + 1))
    for _, row in children.iterrows():
        run_id = row["run_id"]
        keys = [k.removeprefix("metrics.") for k, v in row.items() if k.startswith("metrics.") and pd.notna(v)]
        for key in keys:
            steps = [m.step for m in mc.get_metric_history(run_id, key)]
            twice = [s for s, n in Counter(steps).items() if n > 1]
            assert not twice, f"run {run_id}: {key} logged twice at step(s) {twice}"
        for key in PER_EPOCH:
            steps = sorted(m.step for m in mc.get_metric_history(run_id, mlflow_key(key)))
            assert steps == want, f"run {run_id}: {key} at steps {steps}, expected {want}"
    return children

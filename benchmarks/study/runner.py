"""Train the study's runs in-process and record one row per (run, checkpoint epoch).

Each run goes through :func:`trainables.loop.fine_tune` (the product's loop, one torch thread),
with the loop's own end-of-run measure switched off: at every checkpoint epoch the runner rebuilds
the model from the epoch's checkpoint state and computes

- the per-sample, per-layer curvatures q_ij = v_iᵀ H_ii(x_j, y_j) v_i over the whole training
  set with the engine's exact per-batch routine (the one behind ``measure_layer_curvatures``),
  hence M = Σ_i √max_j max(q_ij, 0) / √n exactly as :func:`trainables.measures.measure_model`
  computes it (a test checks the two agree), plus robust aggregations and diagnostics;
- B with :func:`trainables.measures.bound_terms` (the product's B: forward-corrected loss where
  the transition matrix F is known and positive, else CE truncated at 2 log K), and the same loss
  on the noisy test and validation labels (to check whether B is an upper bound);
- the primitives of the post-hoc criteria (criteria.py): truncated CE, the backward-corrected
  (consistent) loss, the noise entropy and noise-consistent accuracy implied by F, and the
  per-sample validation correctness (hex bit string) for paired validation bands.

Per-run raw outputs (logits on every split, per-sample curvatures, labels) go to ``raw_dir`` as
``.npz`` when given, so that new criteria can be computed later without re-training.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from trainables.noise import corrected_accuracy, noise_entropy
from trainables.records import labels_from_text, labels_text

from .design import Job, method_name, sample_config

__all__ = ["labels_from_text", "labels_text", "record_run", "run_jobs"]

_DATA: dict[str, Any] = {}


def _task_data(cfg: Any) -> Any:
    from trainables.data import load_task

    key = repr(cfg.task)
    if key not in _DATA:
        _DATA.clear()  # one task at a time per worker keeps memory flat
        _DATA[key] = load_task(cfg.task)
    return _DATA[key]


def per_sample_curvatures(
    model: Any, reference: dict[str, Any], x: Any, y: Any, batch: int = 64
) -> tuple[list[str], Any]:
    """q [L, n] (float64, CPU) for the default measure layers, in eval mode, exact (the product's
    :func:`~trainables.hessian.sample_curvatures`), computed on the model's device."""
    from trainables.hessian import sample_curvatures
    from trainables.measures import per_sample_ce

    batches = zip(x.split(batch), y.split(batch), strict=True)
    return sample_curvatures(model, per_sample_ce, batches, reference)


def _measure_stats(q: Any, n: int, noisy: Any) -> dict[str, float]:
    """M and its variants from per-sample curvatures q [L, n]."""
    import torch

    clipped = q.clamp(min=0)
    root_n = math.sqrt(n)

    def agg(values: Any) -> float:
        return float(values.clamp(min=0).sqrt().sum()) / root_n

    stats = {
        "measure": agg(clipped.max(dim=1).values),
        "measure_mean": agg(q.mean(dim=1)),
        "measure_p90": agg(torch.quantile(clipped, 0.9, dim=1)),
        "measure_p99": agg(torch.quantile(clipped, 0.99, dim=1)),
    }
    if bool(noisy.any()) and bool((~noisy).any()):
        stats["measure_noisy"] = agg(clipped[:, noisy].max(dim=1).values)
        stats["measure_cleanlab"] = agg(clipped[:, ~noisy].max(dim=1).values)
        stats["frac_max_noisy"] = float(noisy[clipped.argmax(dim=1)].float().mean())
        share = clipped.sqrt().sum(dim=0)
        stats["curv_ratio_noisy"] = float(share[noisy].mean() / share[~noisy].mean().clamp(min=1e-30))
    return stats


def _noise_constants(transition: np.ndarray | None, k: int) -> dict[str, float]:
    """What F implies: noise entropy H_F (mean row entropy, nats), noise-consistent accuracy A_F."""
    if transition is None:
        return {"noise_entropy": 0.0, "noise_acc": 1.0, "F_min": 0.0, "F_cond": 1.0}
    f = np.asarray(transition, dtype=float)
    return {
        "noise_entropy": noise_entropy(f),
        "noise_acc": float(np.diag(f).mean()),
        "F_min": float(f.min()),
        "F_cond": float(np.linalg.cond(f)),
    }


def _consistent_loss(logits: Any, labels: Any, transition: np.ndarray | None, cap: float) -> float:
    """Mean backward-corrected loss Σ_c (F⁻¹)_{ỹ,c} min(−log p_c, cap) (Ju et al.; the consistent loss
    of trainables/regularizers/consistent.py).

    Per-class losses are clipped at ``cap`` first (the raw consistent loss is unbounded below for a
    model that fits a noisy label, because off-diagonal entries of F⁻¹ are negative).
    """
    import torch

    if transition is None:
        return float(torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none").clamp(max=cap).mean())
    if np.linalg.cond(transition) > 1e8:
        return math.nan
    inv = torch.as_tensor(np.linalg.inv(transition), dtype=torch.float64)
    per_class = (-torch.log_softmax(logits.double(), dim=1)).clamp(max=cap)
    return float((inv[labels] * per_class).sum(dim=1).mean())


def _bits(correct: Any) -> str:
    return np.packbits(np.asarray(correct, dtype=bool)).tobytes().hex()


def _f_columns(measure: float, logits: dict[str, Any], data: Any, transition: np.ndarray | None) -> dict[str, Any]:
    """Every column that reads the noise matrix F: B and its parts, B's loss on the test and
    validation labels, the consistent loss, and the F-corrected validation accuracy."""
    from trainables.measures import bound_metrics, bound_terms

    row: dict[str, Any] = {
        **bound_metrics(measure, logits["train"], data.train.labels, transition, None),
        "test_bound_loss_noisy": bound_terms(logits["test"], data.test_noisy, transition, None)[0],
        "test_bound_loss_clean": bound_terms(logits["test"], data.test.clean, transition, None)[0],
        "train_cons": _consistent_loss(logits["train"], data.train.labels, transition, 2 * math.log(data.num_classes)),
    }
    if data.val is not None:
        val_pred = logits["val"].argmax(1).numpy()
        row["val_bound_loss"] = bound_terms(logits["val"], data.val.labels, transition, None)[0]
        row["val_acc_corr"] = corrected_accuracy(val_pred, data.val.labels.numpy(), transition)
    return row


def _checkpoint_row(
    model: Any,
    reference: dict[str, Any],
    data: Any,
    transition: np.ndarray | None,
    subset: Any = None,
    true_f: np.ndarray | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """One checkpoint's measures; curvatures over ``subset`` of the training set (default: all of
    it), M normalised by the full √n as :func:`trainables.measures.measure_model` does.
    ``transition`` is the run's F (what criteria read); ``true_f``, when the run estimated F,
    gives the same columns prefixed ``trueF_`` for evaluation."""
    import torch.nn.functional as F

    from trainables.models import predict

    tic = time.perf_counter()
    k = data.num_classes
    train, test = data.train, data.test
    n = len(train)
    idx = slice(None) if subset is None else subset
    noisy = train.noise_mask[idx]
    names, q = per_sample_curvatures(model, reference, train.x[idx], train.labels[idx])
    row: dict[str, Any] = _measure_stats(q, n, noisy)
    row["measure_samples"] = float(q.shape[1])
    logits = {"train": predict(model, train.x), "test": predict(model, test.x)}
    if data.val is not None:
        logits["val"] = predict(model, data.val.x)
    row.update(_f_columns(row["measure"], logits, data, transition))
    if true_f is not None:  # evaluation only: what the F-reading criteria would see with the true F
        row.update({f"trueF_{k}": v for k, v in _f_columns(row["measure"], logits, data, true_f).items()})
    cap = 2.0 * math.log(k)
    row["train_trunc"] = float(
        F.cross_entropy(logits["train"].double(), train.labels, reduction="none").clamp(max=cap).mean()
    )
    row["test_trunc_clean"] = float(
        F.cross_entropy(logits["test"].double(), test.clean, reduction="none").clamp(max=cap).mean()
    )
    if data.val is not None:
        row["val_correct"] = _bits(logits["val"].argmax(1) == data.val.labels)
        row["val_pred"] = labels_text(logits["val"].argmax(1), k)
    row["measure_s"] = time.perf_counter() - tic
    raw = {f"logits_{split}": v.numpy().astype(np.float32) for split, v in logits.items()}
    raw["q"] = q.numpy().astype(np.float32)
    raw["layers"] = np.array(names)
    return row, raw


def record_run(
    job: Job, raw_dir: str | Path | None = None, log: Callable[[str], None] = lambda _: None
) -> list[dict[str, Any]]:
    """Train ``job`` once; one row per checkpoint epoch (see the module docstring)."""
    import torch

    from trainables.config import RunConfig
    from trainables.loop import DivergedError, fine_tune
    from trainables.measures import measure_subset
    from trainables.models import create_model, resolve_device
    from trainables.transition import run_transition

    sampled = sample_config(job.seed, job.run)
    cfg = RunConfig().replace(**job.overrides())
    torch.set_num_threads(max(cfg.threads, 1))
    data = _task_data(cfg)
    model = create_model(cfg.model, data.num_classes, task=cfg.task).to(resolve_device(cfg.device))
    run_f = run_transition(cfg, model, data)  # the starting model's estimate, as the loop computes it
    transition = run_f.matrix
    true_f = data.transition if run_f.source != "true" else None  # evaluation-only columns
    base = {
        "search": job.search,
        "setting": job.setting,
        "kind": cfg.task.noise.kind,
        "rate": cfg.task.noise.rate,
        "size": job.size,
        "seed": job.seed,
        "arm": job.arm,
        "run": job.run,
        "method": method_name(sampled),
        "lr": cfg.optim.lr,
        "constraint_radius": cfg.constraint.radius if cfg.constraint.enabled else math.nan,
        "constraint_growth": cfg.constraint.growth if cfg.constraint.enabled else math.nan,
        "nso_sigma": cfg.nso.sigma if cfg.nso.enabled else math.nan,
        "self_label": float(cfg.self_label.enabled),
        "n_train": len(data.train),
        "n_val": 0 if data.val is None else len(data.val),
        "num_classes": data.num_classes,
        "realised_noise": data.realised_noise,
        **_noise_constants(transition, data.num_classes),
        "transition": run_f.source,
    }
    if true_f is not None:
        base["f_error"] = math.nan if run_f.f_error is None else run_f.f_error
        base.update({f"trueF_{k}": v for k, v in _noise_constants(true_f, data.num_classes).items()})
    # the measure sample set S: the training set capped at measure.samples (seeded), as in the product
    subset = measure_subset(len(data.train), cfg.measure.samples, cfg.seed)
    rows, raws = [], {}
    tic = time.perf_counter()
    try:
        for result in fine_tune(cfg, data=data, log=log, evaluate_at=job.checkpoints):
            if result.epoch not in job.checkpoints:
                continue
            train_s = time.perf_counter() - tic
            state = result.state()
            model.load_state_dict(state["model"])
            measured, raw = _checkpoint_row(model, state["reference"], data, transition, subset, true_f)
            engine = {k: v for k, v in result.metrics.items() if not k.startswith(("dist/", "sl_"))}
            row = {**base, "epochs": result.epoch, "trial_id": f"{job.key}-e{result.epoch}", **engine, **measured}
            row["train_s"] = train_s
            rows.append(row)
            raws.update({f"e{result.epoch}_{k}": v for k, v in raw.items()})
            tic = time.perf_counter()
    except DivergedError as err:  # recorded as missing checkpoints; the analysis counts them
        log(f"{job.key}: diverged ({err})")
    if rows and data.val is not None:  # what paired validation statistics need, once per run
        rows[0]["val_labels"] = {
            "val_noisy": labels_text(data.val.labels, data.num_classes),
            "F": None if transition is None else np.round(transition, 10).tolist(),
        }
        if true_f is not None:  # evaluation only (the loss of each F-reading criterion from estimating F)
            rows[0]["val_labels"]["true_F"] = np.round(true_f, 10).tolist()
    if raw_dir is not None and raws:
        path = Path(raw_dir) / f"{job.key}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        labels = {
            "train_clean": data.train.clean.numpy(),
            "train_noisy": data.train.labels.numpy(),
            "test_clean": data.test.clean.numpy(),
            "test_noisy": data.test_noisy.numpy(),
        }
        if data.val is not None:
            labels.update({"val_clean": data.val.clean.numpy(), "val_noisy": data.val.labels.numpy()})
        np.savez_compressed(path, **raws, **labels)
    return rows


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _work(args: tuple[Job, str | None]) -> tuple[str, list[dict[str, Any]], float]:
    job, raw_dir = args
    tic, cpu = time.perf_counter(), time.process_time()
    rows = record_run(job, raw_dir)
    for row in rows:
        row["run_cpu_s"] = time.process_time() - cpu  # CPU seconds of the whole run (idle-machine cost)
    return job.key, rows, time.perf_counter() - tic


def run_jobs(
    todo: Iterable[Job],
    store: Path,
    *,
    workers: int = 2,
    raw_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Run every job not yet in ``store`` (JSON lines, one per finished run); returns how many ran.

    Resumable: a run is appended to ``store`` only when it finished, so an interrupted study
    continues where it stopped. ``workers`` processes, one torch thread each.
    """
    done = finished_keys(store)
    pending = [job for job in todo if job.key not in done]
    if not pending:
        return 0
    store.parent.mkdir(parents=True, exist_ok=True)
    raw = None if raw_dir is None else str(raw_dir)
    started = time.perf_counter()
    count = 0

    def save(key: str, rows: list[dict[str, Any]], seconds: float) -> None:
        nonlocal count
        with store.open("a") as fh:
            fh.write(json.dumps({"key": key, "seconds": seconds, "rows": rows}) + "\n")
        count += 1
        elapsed = time.perf_counter() - started
        log(
            f"[{count}/{len(pending)}] {key}: {len(rows)} checkpoints, {seconds:.0f} s (elapsed {elapsed / 60:.1f} min)"
        )

    if workers <= 1:
        _worker_init()
        for job in pending:
            save(*_work((job, raw)))
        return count
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
        for key, rows, seconds in pool.imap_unordered(_work, [(job, raw) for job in pending], chunksize=1):
            save(key, rows, seconds)
    return count


def finished_keys(store: Path) -> set[str]:
    if not store.is_file():
        return set()
    keys = set()
    for line in store.read_text().splitlines():
        if line.strip():
            try:
                keys.add(json.loads(line)["key"])
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a kill: that run is simply redone
    return keys


def transition_for(setting: str, k: int, train_clean: np.ndarray, train_noisy: np.ndarray) -> np.ndarray | None:
    """The transition matrix the run used (trainables.data._transition), rebuilt from the setting."""
    from trainables.noise import empirical_transition, pair_transition, symmetric_transition

    from .design import Setting

    noise = Setting.parse(setting)
    if noise.kind == "none" or noise.rate == 0:
        return None
    if noise.kind == "symmetric":
        return symmetric_transition(k, noise.rate)
    if noise.kind == "pair":
        return pair_transition(k, noise.rate)
    return empirical_transition(train_clean, train_noisy, k)


def enrich_from_raw(rows: list[dict[str, Any]], raw_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Fill ``val_pred`` and ``val_acc_corr`` of rows recorded before they existed, from the raw
    per-run outputs; returns per search the noisy validation labels and the transition matrix
    (``val_labels.json``: what paired statistics of the corrected validation accuracy need)."""
    raw_dir = Path(raw_dir)
    labels: dict[str, dict[str, Any]] = {}
    by_run: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_run.setdefault(row["trial_id"].rsplit("-e", 1)[0], []).append(row)
    for key, run_rows in by_run.items():
        if run_rows[0]["n_val"] == 0:
            continue
        path = raw_dir / f"{key}.npz"
        if not path.is_file():
            continue
        with np.load(path) as raw:
            noisy = raw["val_noisy"]
            k = int(run_rows[0]["num_classes"])
            transition = transition_for(run_rows[0]["setting"], k, raw["train_clean"], raw["train_noisy"])
            labels[run_rows[0]["search"]] = {
                "val_noisy": labels_text(noisy, k),
                "F": None if transition is None else np.round(transition, 10).tolist(),
            }
            for row in run_rows:
                if "val_acc_corr" in row and "val_pred" in row:
                    continue
                pred = raw[f"e{int(row['epochs'])}_logits_val"].argmax(1)
                row["val_pred"] = labels_text(pred, k)
                row["val_acc_corr"] = corrected_accuracy(pred, noisy, transition)
    return labels


def load_rows(store: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for line in store.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry["key"] in seen:
            continue
        seen.add(entry["key"])
        rows.extend(entry["rows"])
    return rows

"""The noise transition matrix F a run uses, F[j, k] = P(noisy = k | clean = j), and its estimate.

A user never knows F. So unless hesstune injected the noise itself *and* may reveal it
(``task.noise.reveal``, true by default; the selection study sets it false), every part of a run
that needs F — the consistent loss, the forward-corrected bound and its C, ``val_acc_corr``,
``noise_entropy`` — uses F estimated from the training split's noisy labels:

1. penultimate features of the run's *starting* model (``trainables.models.features``);
2. out-of-fold class probabilities of a plain fit on the noisy labels: a standardised
   multinomial logistic regression, 5 folds, so no sample is scored by a model that saw its label,
   its L2 strength chosen from :data:`PROBE_C` by the out-of-fold log-loss on the noisy labels
   (no clean label involved: noisy labels overfit at weak regularisation, docs/transition.md);
3. an estimator on those probabilities (``task.noise.estimator``): ``confident`` (confident
   learning's calibrated count matrix, Northcutt et al. 2021), ``anchor`` (anchor points,
   Patrini et al. 2017) or ``dual_t`` (Yao et al. 2020);
4. entries below :data:`SNAP` set to 0 and rows renormalised (estimation noise, not noise).

The estimate depends only on the task, its split and noise draw, and the starting weights, so it
is computed once per process and reused by every trial there. docs/transition.md has the
estimators' measured errors, which is how the default was chosen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from trainables.config import RunConfig
from trainables.data import TaskData

__all__ = [
    "ESTIMATORS",
    "SNAP",
    "RunTransition",
    "anchor_transition",
    "confident_transition",
    "dual_t_transition",
    "estimate_from_probabilities",
    "out_of_fold_probabilities",
    "run_transition",
]

SNAP = 0.02  # entries below this are estimation noise: set to 0 (docs/transition.md)
FOLDS = 5
PROBE_C = (0.001, 0.01, 0.1, 1.0)  # inverse L2 strengths tried for the out-of-fold probe


@dataclass(frozen=True)
class RunTransition:
    """The F a run uses, where it came from (``true``, ``estimated:<method>`` or ``none``), and —
    when hesstune injected the noise — the estimate's largest absolute entry error ``f_error``."""

    matrix: np.ndarray | None
    source: str
    f_error: float | None = None


def out_of_fold_probabilities(feats: np.ndarray, noisy: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """[n, k] probabilities of the noisy label, each from a logistic regression fitted on the other
    folds; of the strengths in PROBE_C, the one with the lowest out-of-fold noisy log-loss."""
    folds = min(FOLDS, int(np.bincount(noisy, minlength=k).min()))
    if folds < 2:  # a noisy class with one sample: no out-of-fold fit is possible
        return np.full((len(noisy), k), 1.0 / k)
    fits = [_out_of_fold(feats, noisy, k, folds, c, seed) for c in PROBE_C]
    losses = [-np.log(np.clip(p[np.arange(len(noisy)), noisy], 1e-12, None)).mean() for p in fits]
    return fits[int(np.argmin(losses))]


def _out_of_fold(feats: np.ndarray, noisy: np.ndarray, k: int, folds: int, c: float, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probs = np.zeros((len(noisy), k))
    for fit, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(feats, noisy):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500))
        model.fit(feats[fit], noisy[fit])
        probs[np.ix_(held, model.classes_)] = model.predict_proba(feats[held])
    return probs


def anchor_transition(probs: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """Row i = the probabilities at class i's anchor: the sample with the largest p_i once values
    at or above the 97th percentile are dropped as outliers (Patrini et al. 2017)."""
    k = probs.shape[1]
    rows = np.zeros((k, k))
    for i in range(k):
        col = probs[:, i]
        kept = np.flatnonzero(col < np.percentile(col, 97))
        kept = kept if len(kept) else np.arange(len(col))
        rows[i] = probs[kept[np.argmax(col[kept])]]
    return rows


def dual_t_transition(probs: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """Dual-T (Yao et al. 2020): F = T_anchor · T_count, with T_count the row-normalised counts of
    (predicted class → noisy label), factorising F through the predicted class."""
    k = probs.shape[1]
    return anchor_transition(probs, noisy) @ _row_normalised(_counts(probs.argmax(axis=1), noisy, k))


def confident_transition(probs: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """Confident learning (Northcutt et al. 2021): a sample counts towards true class j when
    p_j ≥ t_j = mean p_j over the samples labelled j (the largest such p_j wins; none: not
    counted); the count matrix C[ỹ, j] is calibrated so row ỹ sums to the number labelled ỹ, and
    F[j, k] = C[k, j] / Σ_k C[k, j]."""
    k = probs.shape[1]
    labelled = np.bincount(noisy, minlength=k)
    thresholds = np.array([probs[noisy == j, j].mean() if labelled[j] else 1.0 for j in range(k)])
    above = np.where(probs >= thresholds, probs, -1.0)
    confident = above.max(axis=1) >= 0
    guess = above.argmax(axis=1)
    counts = _counts(noisy[confident], guess[confident], k)  # C[ỹ, y*]
    calibrated = _row_normalised(counts) * labelled[:, None]
    return _row_normalised(calibrated.T)


ESTIMATORS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "anchor": anchor_transition,
    "confident": confident_transition,
    "dual_t": dual_t_transition,
}


def estimate_from_probabilities(probs: np.ndarray, noisy: np.ndarray, method: str) -> np.ndarray:
    """F by ``method`` from out-of-fold probabilities, snapped (entries < SNAP → 0) and row-normalised."""
    raw = np.clip(ESTIMATORS[method](probs, noisy), 0.0, None)
    return _row_normalised(np.where(raw < SNAP, 0.0, raw))


def _counts(rows: np.ndarray, cols: np.ndarray, k: int) -> np.ndarray:
    counts = np.zeros((k, k))
    np.add.at(counts, (rows, cols), 1.0)
    return counts


def _row_normalised(m: np.ndarray) -> np.ndarray:
    """Rows scaled to sum 1; an all-zero row becomes the identity's (no evidence: no noise)."""
    totals = m.sum(axis=1, keepdims=True)
    return np.where(totals > 0, m / np.where(totals > 0, totals, 1.0), np.eye(len(m)))


# -- the run's F ---------------------------------------------------------------------------------
_CACHE: dict[str, np.ndarray] = {}


def run_transition(cfg: RunConfig, model: nn.Module, data: TaskData) -> RunTransition:
    """The F the run uses: the injected noise's when revealed, else an estimate from the data
    (computed with the starting ``model``, before any regularizer is built)."""
    noise = cfg.task.noise
    injected = data.transition is not None
    wants_estimate = cfg.consistent.enabled and cfg.consistent.transition == "estimated"
    if injected and noise.reveal and not wants_estimate:
        return RunTransition(data.transition, "true")
    key = _estimate_key(cfg, model, data)
    if key not in _CACHE:
        _CACHE.clear()  # one task per process at a time keeps memory flat
        _CACHE[key] = _estimate(cfg, model, data)
    matrix = _CACHE[key]
    error = float(np.abs(matrix - data.transition).max()) if injected else None  # evaluation only
    return RunTransition(matrix, f"estimated:{noise.estimator}", error)


def _estimate(cfg: RunConfig, model: nn.Module, data: TaskData) -> np.ndarray:
    from trainables.models import features

    feats = features(model, data.train.x).double().numpy()
    noisy = data.train.labels.numpy()
    probs = out_of_fold_probabilities(feats, noisy, data.num_classes, seed=cfg.task.split_seed)
    return estimate_from_probabilities(probs, noisy, cfg.task.noise.estimator)


def _estimate_key(cfg: RunConfig, model: nn.Module, data: TaskData) -> str:
    """Task (split and noise draw), estimator and the starting body's weights (not the fresh head,
    which differs per seed and does not enter the features)."""
    from trainables.models import head_names, in_head

    heads = head_names(model)
    digest = hashlib.sha1(repr((cfg.task, len(data.train))).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if in_head(name, heads):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()

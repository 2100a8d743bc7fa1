"""Selection metrics derived over a whole sweep (validation band, cleaned validation accuracy,
floored bound) and the noise-case rule behind the default criterion."""

from __future__ import annotations

import numpy as np
import pandas as pd

from trainables.records import correctness_from_text, labels_from_text
from tuning.selection._table import TrialTable, _frame, _numeric
from tuning.selection.criteria import SelectionError


def validation_correctness(frame: pd.DataFrame, n_val: np.ndarray | float) -> np.ndarray | None:
    """[trials, n_val] booleans: which validation samples each trial got right, decoded from its
    ``val_correct`` hex text (rows of trials without a val_acc stay False), or None when some
    trial with a val_acc lacks that text."""
    acc = frame["val_acc"].to_numpy(float)
    scored = np.isfinite(acc)
    texts = frame["val_correct"].to_numpy(object) if "val_correct" in frame else np.full(len(frame), None)
    sizes = np.broadcast_to(n_val, acc.shape)
    if not all(isinstance(t, str) and len(t) * 4 >= sizes[i] > 0 for i, t in enumerate(texts) if scored[i]):
        return None
    n = int(sizes[scored][0]) if scored.any() else 0
    correct = np.zeros((len(frame), n), dtype=bool)
    for i in np.flatnonzero(scored):
        correct[i] = correctness_from_text(texts[i], n)
    return correct


CLEAN_AGREEMENT = 0.8  # fixed before val_acc_clean was scored (docs/results.md)


def cleaned_validation_accuracy(frame: pd.DataFrame, n_val: np.ndarray | float) -> np.ndarray | None:
    """``val_acc_clean``: each trial's accuracy on the validation samples whose noisy label the
    trials' consensus does not contradict. A sample is set aside when at least
    :data:`CLEAN_AGREEMENT` of the trials predict one class and that class is not its label (the
    trials predicting it got the sample wrong). None when some trial with a val_acc lacks its
    per-sample predictions ``val_pred`` or correctness ``val_correct``; NaN for trials without a
    val_acc."""
    correct = validation_correctness(frame, n_val)
    texts = frame["val_pred"].to_numpy(object) if "val_pred" in frame else np.full(len(frame), None)
    scored = np.isfinite(frame["val_acc"].to_numpy(float))
    if correct is None or not scored.any() or not all(isinstance(texts[i], str) for i in np.flatnonzero(scored)):
        return None
    rows = np.flatnonzero(scored)
    pred = np.stack([labels_from_text(texts[i])[: correct.shape[1]] for i in rows])
    right = correct[rows]
    if pred.shape[1] != right.shape[1]:
        return None
    k = int(pred.max()) + 1
    votes = np.stack([np.bincount(column, minlength=k) for column in pred.T])  # [n_val, k]
    consensus, share = votes.argmax(1), votes.max(1) / len(rows)
    voters_right = (right & (pred == consensus)).any(0)  # a voter right on the sample: consensus = label
    keep = ~((share >= CLEAN_AGREEMENT) & ~voters_right)
    out = np.full(len(frame), np.nan)
    if keep.any():
        out[rows] = right[:, keep].mean(1)
    return out


def paired_validation_band(frame: pd.DataFrame, n_val: np.ndarray, z: float = 1.0) -> np.ndarray | None:
    """Trials not significantly worse than the top one on the same validation samples (McNemar),
    or None when some trial with a val_acc lacks its per-sample correctness ``val_correct``."""
    correct = validation_correctness(frame, n_val)
    if correct is None:
        return None
    acc = frame["val_acc"].to_numpy(float)
    scored = np.isfinite(acc)
    top = np.flatnonzero(acc == np.nanmax(acc))
    ref = top[np.argmin(frame["val_loss"].to_numpy(float)[top])] if len(top) > 1 else top[0]
    wins = (correct[ref] & ~correct).sum(1)  # the top trial right, this one wrong
    losses = (~correct[ref] & correct).sum(1)
    return scored & ((wins - losses) <= z * np.sqrt(wins + losses))


# noise_structure of F above which the noise counts as class-dependent: the midpoint of the gap
# on Fashion-MNIST, where the default estimate scored 0.03–0.24 under symmetric noise and
# 0.35–0.92 under pair and correlated noise (54 draws, benchmarks/transition_estimators.py;
# docs/transition.md, "Which noise case a sweep is in").
STRUCTURE_CUT = 0.29


def noise_looks_symmetric(trials: TrialTable) -> bool:
    """Whether the F the trials used (median ``f_structure``) spreads wrong labels evenly; False
    when the trials report no structure (no F, two classes, or older sweeps)."""
    frame = trials if isinstance(trials, pd.DataFrame) else pd.DataFrame(list(trials))
    if "f_structure" not in frame:
        return False
    structure = pd.to_numeric(frame["f_structure"], errors="coerce").to_numpy(float)
    return bool(np.isfinite(structure).any()) and float(np.nanmedian(structure)) < STRUCTURE_CUT


def recommended_criterion(trials: TrialTable) -> str:
    """The selection both studies recommend (docs/results.md, "Decision"). With a validation split
    (finite ``val_acc`` and ``n_val`` > 0): ``val_acc`` when the F the trials used looks symmetric
    (:func:`noise_looks_symmetric`: noisy validation accuracy is then unbiased, and the bound only
    added variance), else ``val_band_bound``. Without one, ``bound``."""
    frame = _frame(trials)
    has_val = "n_val" in frame and bool((frame["n_val"].to_numpy(float) > 0).any())
    if not (has_val and np.isfinite(frame["val_acc"].to_numpy(float)).any()):
        return "bound"
    return "val_acc" if noise_looks_symmetric(frame) else "val_band_bound"


def add_selection_metrics(
    trials: TrialTable,
    *,
    n_val: int | None = None,
    noise_entropy: float | np.ndarray | None = None,
    band_z: float = 1.0,
) -> pd.DataFrame:
    """The trial table with the derived metrics of the study's criteria added.

    * ``val_band_bound``: ``bound`` for the trials in the validation band, NaN for the others (so
      the criterion of the same name picks the lowest B among near-equal validation scores). The
      band is *paired* when every trial with a ``val_acc`` has a ``val_correct`` (the hex of its
      packed per-sample correctness, which trials report at their end): the trials not
      significantly worse than the top one on the same samples, losses − wins ≤ ``band_z`` ·
      √(losses + wins) (McNemar), the top one being the best ``val_acc`` (ties: lowest
      ``val_loss``). Otherwise *unpaired*: ``val_acc`` within ``band_z`` binomial standard errors
      √(a(1 − a)/n_val) of the best a. The study measured the paired band (docs/results.md: −0.4
      points of regret against val_acc; unpaired −0.0). ``frame.attrs["val_band"]`` says which.
      ``n_val``: the validation size (or a ``n_val`` column). Needs ``val_acc`` and ``bound``.
    * ``val_acc_clean`` (when every trial with a ``val_acc`` also has ``val_pred`` and
      ``val_correct``): accuracy on the validation samples the trials' consensus does not
      contradict (:func:`cleaned_validation_accuracy`).
    * ``bound_floor`` (when the table has ``bound_loss``, ``bound_C``, ``measure`` and H_F:
      ``noise_entropy`` or a ``noise_entropy`` column, which trials report from the F they used):
      max(L̂, H_F) + √C · M, B with its loss term floored at the noise entropy
      (docs/measures.md §4), which removes B's reward for fitting noisy labels.
    """
    frame = _frame(trials)
    if noise_entropy is None and "noise_entropy" in frame and np.isfinite(_numeric(frame, "noise_entropy")).all():
        noise_entropy = _numeric(frame, "noise_entropy").to_numpy()
    acc, bound = frame["val_acc"].to_numpy(), frame["bound"].to_numpy()
    if np.isfinite(acc).any():
        size = n_val if n_val is not None else (frame["n_val"].to_numpy(float) if "n_val" in frame else None)
        if size is None:
            raise SelectionError("val_band_bound needs the validation size: pass n_val or add a 'n_val' column")
        paired = paired_validation_band(frame, np.asarray(size, dtype=float), band_z)
        frame.attrs["val_band"] = "unpaired" if paired is None else "paired"
        if paired is None:
            best = float(np.nanmax(acc))
            width = band_z * np.sqrt(best * (1 - best) / np.asarray(size, dtype=float))
            paired = acc >= best - width - 1e-12
        frame["val_band_bound"] = np.where(paired, bound, np.nan)
        clean = cleaned_validation_accuracy(frame, np.asarray(size, dtype=float))
        if clean is not None:  # trials that predate val_pred cannot be cleaned: the column stays absent
            frame["val_acc_clean"] = clean
    else:
        frame["val_band_bound"] = np.nan
    if noise_entropy is not None and {"bound_loss", "bound_C"} <= set(frame.columns):
        loss = np.maximum(_numeric(frame, "bound_loss").to_numpy(), noise_entropy)
        frame["bound_floor"] = loss + np.sqrt(_numeric(frame, "bound_C").to_numpy()) * frame["measure"].to_numpy()
    return frame

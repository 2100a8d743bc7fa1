"""Synthetic label noise with a known (or measured) transition matrix.

Every function takes a ``numpy.random.Generator`` and returns new labels; the clean labels are
never modified, so the noise mask (``noisy != clean``) is always available.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from trainables.config import ConfigError, NoiseConfig

__all__ = [
    "apply_noise",
    "corrected_accuracy",
    "empirical_transition",
    "noise_rate",
    "noise_structure",
    "pair_transition",
    "symmetric_transition",
]


def symmetric_transition(num_classes: int, rate: float) -> np.ndarray:
    """F with diagonal 1 − r and off-diagonal r/(K−1): P(noisy = k | clean = j)."""
    off = rate / (num_classes - 1)
    return np.full((num_classes, num_classes), off) + np.eye(num_classes) * (1.0 - rate - off)


def pair_transition(num_classes: int, rate: float) -> np.ndarray:
    """F for pair noise: class c goes to c+1 (mod K) with probability r."""
    eye = np.eye(num_classes)
    return eye * (1.0 - rate) + np.roll(eye, 1, axis=1) * rate


def empirical_transition(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """Row-normalised counts of (clean → noisy); rows without samples stay the identity."""
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (clean, noisy), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.where(totals > 0, counts / np.maximum(totals, 1.0), np.eye(num_classes))


def _flip_count(n: int, rate: float) -> int:
    return round(rate * n)


def _symmetric(clean: np.ndarray, k: int, rate: float, rng: np.random.Generator, _s: object) -> np.ndarray:
    noisy = clean.copy()
    idx = rng.choice(len(clean), size=_flip_count(len(clean), rate), replace=False)
    shift = rng.integers(1, k, size=len(idx))  # uniform over the K−1 other classes
    noisy[idx] = (clean[idx] + shift) % k
    return noisy


def _pair(clean: np.ndarray, k: int, rate: float, rng: np.random.Generator, _s: object) -> np.ndarray:
    noisy = clean.copy()
    idx = rng.choice(len(clean), size=_flip_count(len(clean), rate), replace=False)
    noisy[idx] = (clean[idx] + 1) % k
    return noisy


def _correlated(clean: np.ndarray, k: int, rate: float, rng: np.random.Generator, scores: object) -> np.ndarray:
    """Flip to a weak model's most probable wrong class, where that model is most confused.

    ``scores`` are the weak model's class probabilities [n, K]. The ⌊r·n⌉ samples with the
    highest wrong-class probability get that class, so errors follow model confusions
    (REGSL's "correlated noise") while the realised rate matches the request.
    """
    if not isinstance(scores, np.ndarray) or scores.shape != (len(clean), k):
        raise ConfigError("correlated noise needs weak-model probabilities for every sample")
    wrong = scores.copy()
    wrong[np.arange(len(clean)), clean] = -np.inf
    best_wrong = wrong.argmax(axis=1)
    confusion = wrong.max(axis=1) + 1e-9 * rng.random(len(clean))  # random tie-break
    idx = np.argsort(-confusion)[: _flip_count(len(clean), rate)]
    noisy = clean.copy()
    noisy[idx] = best_wrong[idx]
    return noisy


_KINDS: dict[str, Callable[[np.ndarray, int, float, np.random.Generator, object], np.ndarray]] = {
    "symmetric": _symmetric,
    "pair": _pair,
    "correlated": _correlated,
}


def apply_noise(
    clean: np.ndarray,
    num_classes: int,
    noise: NoiseConfig,
    rng: np.random.Generator,
    weak_scores: np.ndarray | None = None,
) -> np.ndarray:
    """Noisy copy of ``clean`` drawn by the configured process (``none`` returns a copy)."""
    if noise.kind == "none" or noise.rate == 0.0:
        return clean.copy()
    if noise.kind == "pair" and num_classes < 2:
        raise ConfigError("pair noise needs at least 2 classes")
    return _KINDS[noise.kind](clean, num_classes, noise.rate, rng, weak_scores)


def noise_entropy(transition: np.ndarray) -> float:
    """H_F: the mean row entropy of the transition matrix F (nats), the lowest noisy-label loss a
    model reaches when the clean label is a function of x (``bound_floor``, docs/results.md)."""
    f = np.asarray(transition, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = -np.where(f > 0, f * np.log(f), 0.0).sum(axis=1)
    return float(rows.mean())


def noise_rate(transition: np.ndarray) -> float:
    """The share of wrong labels F implies with balanced classes: 1 − mean_j F[j, j]."""
    f = np.asarray(transition, dtype=float)
    return float(1.0 - np.diag(f).mean())


def noise_structure(transition: np.ndarray) -> float:
    """How the wrong labels of a class spread over the other classes, on [0, 1]: 0 when evenly
    (symmetric noise), 1 when each class flips to a single other one (pair noise). The mean over
    classes with off-diagonal mass > 0.01 of the largest share one other class takes, rescaled
    from [1/(K−1), 1]; NaN with fewer than 3 classes (the cases coincide) or no off-diagonal
    mass. The end-of-sweep report names the noise case from it (docs/results.md)."""
    f = np.asarray(transition, dtype=float)
    k = len(f)
    off = f * (1.0 - np.eye(k))
    mass = off.sum(axis=1)
    rows = mass > 0.01
    if k < 3 or not rows.any():
        return math.nan
    concentration = float((off[rows].max(axis=1) / mass[rows]).mean())
    even = 1.0 / (k - 1)
    return (concentration - even) / (1.0 - even)


# Above this condition number of F, the corrected accuracy's weights (F⁻¹ entries) amplify the
# validation sample's noise and any error in an estimated F into picks tens of points off (a
# near-singular estimate under correlated 50 % noise picked a model 58 points below the best):
# trials then report noisy validation accuracy instead (docs/transition.md).
CORRECTION_MAX_COND = 10.0


def correction_is_stable(transition: np.ndarray | None) -> bool:
    """Whether F is conditioned well enough (cond ≤ CORRECTION_MAX_COND) to be inverted for selection."""
    return transition is None or float(np.linalg.cond(transition)) <= CORRECTION_MAX_COND


def corrected_accuracy(pred: np.ndarray, noisy: np.ndarray, transition: np.ndarray | None) -> float:
    """Unbiased estimate of *clean* accuracy from noisy labels: mean_j (F⁻¹)[ỹ_j, h(x_j)].

    E[(F⁻¹)[ỹ, h] | y] = Σ_k F[y, k] (F⁻¹)[k, h] = 1(h = y) for class-conditional noise with
    transition F. Under symmetric noise it is an increasing affine map of the noisy accuracy (same
    ranking); under pair or other class-dependent noise the plain noisy accuracy gives partial
    credit to exactly the errors the noise makes (a model that learned the flips), this does not.
    """
    pred, noisy = np.asarray(pred), np.asarray(noisy)
    if transition is None:
        return float((pred == noisy).mean())
    if np.linalg.cond(transition) > 1e8:
        return math.nan
    return float(np.linalg.inv(transition)[noisy, pred].mean())

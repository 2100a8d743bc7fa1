"""The text a trial reports about each validation sample, encoded and decoded side by side.

Trials report, at their end, which validation samples they got right (``val_correct``) and which
class they predicted for each (``val_pred``). MLflow keeps them as tags
(``tuning.tracking.set_text_tags``); selection reads them back to compare trials on the same
samples (``val_band_bound``'s paired band) and to set aside the samples whose label the trials'
consensus contradicts (``val_acc_clean``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["correctness_from_text", "correctness_text", "labels_from_text", "labels_text"]


def correctness_text(correct: np.ndarray) -> str:
    """Per-sample booleans as the hex of their packed bits (8 samples per byte)."""
    return np.packbits(np.asarray(correct, dtype=bool)).tobytes().hex()


def correctness_from_text(text: str, n: int) -> np.ndarray:
    """The first ``n`` booleans of :func:`correctness_text`'s output."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)


def labels_text(labels: np.ndarray, k: int) -> str:
    """Per-sample class indices as text: one digit each for K ≤ 10 classes, else comma-terminated
    numbers ("12,7,95,"), so that either form reads back unambiguously."""
    values = np.asarray(labels).tolist()
    return "".join(map(str, values)) if k <= 10 else "".join(f"{v}," for v in values)


def labels_from_text(text: str) -> np.ndarray:
    """The inverse of :func:`labels_text`."""
    if "," in text:
        return np.array([int(v) for v in text.split(",") if v], dtype=np.int64)
    return (np.frombuffer(text.encode(), dtype=np.uint8) - 48).astype(np.int64)

"""Label noise and tasks: realised noise rates, transition matrices, splits, and local data formats.

Real formats are generated in ``tmp_path``: tiny PNG folders (flat and train/ + test/ layouts) and
CIFAR-10/100 pickles in the official python format.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.config import ConfigError, NoiseConfig, TaskConfig
from trainables.data import load_task, task_names
from trainables.noise import (
    apply_noise,
    corrected_accuracy,
    empirical_transition,
    pair_transition,
    symmetric_transition,
)

N, K = 200, 5

# -- label noise ---------------------------------------------------------------------------


def _clean(n: int = N, k: int = K) -> np.ndarray:
    return np.arange(n) % k


def _noisy(kind: str, rate: float, seed: int = 0, scores: np.ndarray | None = None) -> np.ndarray:
    noise = NoiseConfig(kind=kind, rate=rate)  # type: ignore[arg-type]
    return apply_noise(_clean(), K, noise, np.random.default_rng(seed), scores)


def _weak_scores(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(K), size=N)


@pytest.mark.parametrize("kind", ["symmetric", "pair", "correlated"])
@pytest.mark.parametrize("rate", [0.2, 0.4, 0.6])
def test_realised_noise_rate_matches_the_request(kind: str, rate: float) -> None:
    noisy = _noisy(kind, rate, scores=_weak_scores() if kind == "correlated" else None)
    assert abs(float((noisy != _clean()).mean()) - rate) <= 1 / N
    assert set(np.unique(noisy)) <= set(range(K))


def test_symmetric_noise_flips_to_every_other_class_uniformly() -> None:
    clean = _clean(5000)
    noisy = apply_noise(clean, K, NoiseConfig(kind="symmetric", rate=0.4), np.random.default_rng(0))
    assert (noisy != clean).sum() == 2000  # exactly ⌊r·n⌉ flips: no flip kept its class
    flips = empirical_transition(clean, noisy, K)
    np.testing.assert_allclose(flips, symmetric_transition(K, 0.4), atol=0.04)  # r/(K − 1) each


def test_pair_noise_maps_c_to_c_plus_one() -> None:
    noisy, clean = _noisy("pair", 0.4), _clean()
    flipped = noisy != clean
    assert np.array_equal(noisy[flipped], (clean[flipped] + 1) % K)


def test_correlated_noise_follows_the_weak_model() -> None:
    scores = _weak_scores()
    noisy, clean = _noisy("correlated", 0.3, scores=scores), _clean()
    wrong = scores.copy()
    wrong[np.arange(N), clean] = -np.inf
    flipped = noisy != clean
    assert np.array_equal(noisy[flipped], wrong.argmax(1)[flipped])  # the most probable wrong class
    assert wrong.max(1)[flipped].min() >= wrong.max(1)[~flipped].max()  # where the model is most confused


def test_correlated_noise_without_scores_is_an_error() -> None:
    with pytest.raises(ConfigError, match="weak-model probabilities"):
        _noisy("correlated", 0.3)


def test_no_noise_returns_an_equal_copy() -> None:
    clean = _clean()
    noisy = apply_noise(clean, K, NoiseConfig(kind="none", rate=0.0), np.random.default_rng(0))
    assert np.array_equal(noisy, clean) and noisy is not clean


def test_transition_matrices_are_row_stochastic() -> None:
    sym, pair = symmetric_transition(4, 0.3), pair_transition(4, 0.3)
    np.testing.assert_allclose(sym.sum(1), 1.0)
    np.testing.assert_allclose(pair.sum(1), 1.0)
    np.testing.assert_allclose(np.diag(sym), 0.7)
    np.testing.assert_allclose(sym[0, 1:], 0.1)
    assert pair[3, 0] == pytest.approx(0.3) and pair[0, 1] == pytest.approx(0.3) and pair[0, 2] == 0


def test_empirical_transition_counts_and_empty_rows() -> None:
    clean = np.array([0, 0, 0, 0, 1, 1])
    noisy = np.array([0, 0, 1, 2, 1, 0])
    f = empirical_transition(clean, noisy, 3)
    np.testing.assert_allclose(f, [[0.5, 0.25, 0.25], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])


# -- generated data sets ----------------------------------------------------------------------------------


def _write_pngs(folder: Path, count: int, value: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    for i in range(count):
        pixels = np.clip(value + rng.integers(-20, 20, size=(10, 12, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")


@pytest.fixture
def flat_folder(tmp_path: Path) -> Path:
    """40 images: 20 per class, classes 'cat' (dark) and 'dog' (bright)."""
    _write_pngs(tmp_path / "cat", 20, 40)
    _write_pngs(tmp_path / "dog", 20, 210)
    return tmp_path


def _cifar_batch(n: int, classes: int, label_key: bytes, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    data[:, 0] = (labels * 250 // max(classes - 1, 1))[:, None, None]  # red plane encodes the label
    data[:, 2] = rng.integers(0, 256, size=(n, 32, 32))
    return {b"data": data.reshape(n, 3072), label_key: labels.tolist()}


def _pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    sub = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        _pickle(sub / f"data_batch_{i}", _cifar_batch(20, 10, b"labels", i))
    _pickle(sub / "test_batch", _cifar_batch(30, 10, b"labels", 0))
    return tmp_path


def _task(name: str, **kw: object) -> TaskConfig:
    return TaskConfig(name=name, image_size=8, **kw)  # type: ignore[arg-type]


def test_imagefolder_flat_layout_split_sizes_and_classes(flat_folder: Path) -> None:
    data = load_task(
        _task(
            f"imagefolder:{flat_folder}", val_fraction=0.2, test_fraction=0.25, noise=NoiseConfig(kind="none", rate=0.0)
        )
    )
    assert (len(data.train), len(data.val or []), len(data.test)) == (22, 8, 10)
    assert data.num_classes == 2 and data.transition is None
    assert data.train.x.shape[1:] == (3, 8, 8)
    brightness = data.train.x.mean(dim=(1, 2, 3))
    assert brightness[data.train.clean == 1].min() > brightness[data.train.clean == 0].max()  # sorted: cat=0


def test_imagefolder_train_test_layout_keeps_the_fixed_test_set(tmp_path: Path) -> None:
    for split, count in (("train", 10), ("test", 4)):
        _write_pngs(tmp_path / split / "a", count, 30)
        _write_pngs(tmp_path / split / "b", count, 220)
    data = load_task(_task(f"imagefolder:{tmp_path}", val_fraction=0.2, noise=NoiseConfig(rate=0.2)))
    assert len(data.test) == 8 and torch.equal(data.test.labels, data.test.clean)
    assert torch.equal(data.test.clean, torch.tensor([0] * 4 + [1] * 4))
    assert len(data.train) + len(data.val or []) == 20


def test_cifar10_from_official_pickles(cifar10_dir: Path) -> None:
    clean = NoiseConfig(kind="none", rate=0.0)
    data = load_task(_task(f"cifar10:{cifar10_dir}", val_fraction=0.1, noise=clean))
    assert data.num_classes == 10 and len(data.test) == 30
    assert len(data.train) + len(data.val or []) == 100
    red, labels = data.train.x[:, 0].mean(dim=(1, 2)), data.train.clean
    per_class = torch.stack([red[labels == c].mean() for c in labels.unique()])
    assert torch.all(torch.diff(per_class) > 0)  # the red plane (first 1024 bytes) encodes the label
    assert all(float(red[labels == c].std()) < 1e-4 for c in labels.unique())
    assert torch.equal(data.test.clean, torch.arange(30) % 10)


def test_cifar100_from_official_pickles(tmp_path: Path) -> None:
    sub = tmp_path / "cifar-100-python"
    _pickle(sub / "train", _cifar_batch(200, 100, b"fine_labels", 1))
    _pickle(sub / "test", _cifar_batch(50, 100, b"fine_labels", 2))
    data = load_task(_task(f"cifar100:{sub}", val_fraction=0.0, noise=NoiseConfig(kind="none", rate=0.0)))
    assert data.num_classes == 100 and len(data.train) == 200 and len(data.test) == 50
    assert data.val is None


def test_noise_applies_to_train_and_val_but_never_to_test(cifar10_dir: Path) -> None:
    cfg = _task(f"cifar10:{cifar10_dir}", val_fraction=0.2, noise=NoiseConfig(kind="symmetric", rate=0.4))
    data = load_task(cfg)
    assert data.realised_noise == pytest.approx(round(0.4 * 80) / 80)
    assert data.val is not None and data.val.noise_mask.float().mean() == pytest.approx(0.4)
    assert torch.equal(data.test.labels, data.test.clean)
    assert float((data.test_noisy != data.test.clean).float().mean()) == pytest.approx(0.4)
    np.testing.assert_allclose(data.transition, symmetric_transition(10, 0.4))  # type: ignore[arg-type]
    clean_val = load_task(dataclasses.replace(cfg, noise=NoiseConfig(rate=0.4, noisy_val=False)))
    assert clean_val.val is not None and not clean_val.val.noise_mask.any()


def test_same_split_seed_same_split(flat_folder: Path) -> None:
    def load(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = load_task(_task(f"imagefolder:{flat_folder}", split_seed=seed, noise=NoiseConfig(rate=0.2)))
        return d.train.x, d.train.labels

    (x0, y0), (x1, y1), (x2, _) = load(0), load(0), load(1)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(x0, x2)


def test_train_size_and_merge_val(flat_folder: Path) -> None:
    name = f"imagefolder:{flat_folder}"
    assert len(load_task(_task(name, train_size=5)).train) == 5
    merged = load_task(_task(name, val_fraction=0.2, test_fraction=0.25, merge_val=True))
    assert merged.val is None and len(merged.train) == 30
    with pytest.raises(ConfigError, match="train_size=500 exceeds"):
        load_task(_task(name, train_size=500))


# -- errors that name the value ------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere'? does not exist"):
        load_task(_task(f"imagefolder:{tmp_path / 'nowhere'}"))


def test_folder_with_one_class(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "only", 3, 100)
    with pytest.raises(ConfigError, match=r"needs ≥ 2 class sub-folders, found 1"):
        load_task(_task(f"imagefolder:{tmp_path}"))


def test_empty_class_folder(flat_folder: Path) -> None:
    (flat_folder / "emu").mkdir()
    with pytest.raises(ConfigError, match=r"emu'? holds no images"):
        load_task(_task(f"imagefolder:{flat_folder}"))


def test_missing_cifar_files(cifar10_dir: Path) -> None:
    (cifar10_dir / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match="data_batch_3"):
        load_task(_task(f"cifar10:{cifar10_dir}"))


def test_cifar_class_without_samples(tmp_path: Path) -> None:
    sub = tmp_path / "cifar-100-python"
    _pickle(sub / "train", _cifar_batch(50, 50, b"fine_labels", 1))  # classes 50..99 never appear
    _pickle(sub / "test", _cifar_batch(10, 10, b"fine_labels", 2))
    with pytest.raises(ConfigError, match="target class 50 has no images"):
        load_task(_task(f"cifar100:{sub}"))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("emnist", "unknown task 'emnist'"),
        ("mnist", "mnist needs a folder"),
        ("digits:/x", "digits takes no path"),
        ("cifar10", "cifar10 needs a folder"),
    ],
)
def test_bad_task_names(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_task(_task(name))


def test_task_registry() -> None:
    assert task_names() == ["cifar10", "cifar100", "digits", "fashion-mnist", "imagefolder", "mnist"]


def test_corrected_accuracy_inverts_symmetric_noise_and_is_unbiased_under_pair_noise() -> None:
    rng = np.random.default_rng(5)
    k, r = 5, 0.4
    clean = rng.integers(0, k, 2000)
    pred = np.where(rng.random(2000) < 0.7, clean, rng.integers(0, k, 2000))
    noisy = apply_noise(clean, k, NoiseConfig("symmetric", r), rng)
    # symmetric: noisy acc = (1 - r) a + r / (K - 1) (1 - a), so the correction is its affine inverse
    noisy_acc = float((pred == noisy).mean())
    expected = (noisy_acc - r / (k - 1)) / (1 - r - r / (k - 1))
    assert corrected_accuracy(pred, noisy, symmetric_transition(k, r)) == pytest.approx(expected)
    # pair: E over the noise of (F^-1)[noisy, h] is 1(h = clean) exactly (sum over the noisy label)
    f = pair_transition(k, r)
    inv = np.linalg.inv(f)
    for y in range(k):
        for h in range(k):
            assert sum(f[y, j] * inv[j, h] for j in range(k)) == pytest.approx(float(h == y), abs=1e-12)
    assert corrected_accuracy(pred, noisy, None) == pytest.approx(noisy_acc)
    assert np.isnan(corrected_accuracy(pred, noisy, np.full((k, k), 1 / k)))  # singular F


def test_preprocessing_is_the_imagefolder_loaders_normalisation(flat_folder: Path) -> None:
    """What a model card records (task_preprocessing): an image file read as the loader reads it
    and normalised by the recorded mean and std is exactly one of the task's images."""
    from trainables.data import load_image, task_preprocessing

    cfg = _task(f"imagefolder:{flat_folder}", noise=NoiseConfig(kind="none", rate=0.0))
    pre = task_preprocessing(cfg)
    assert pre.classes == (0, 1) and pre.names == ("cat", "dog") and pre.image_size == 8
    x = pre.normalise(load_image(flat_folder / "dog" / "img3.png", 8)[None])
    data = load_task(cfg)
    assert data.val is not None
    images = torch.cat([data.train.x, data.val.x, data.test.x])
    assert float((images - x).abs().amax(dim=(1, 2, 3)).min()) < 1e-5


def test_cifar_class_names_come_from_the_meta_file(cifar10_dir: Path) -> None:
    from trainables.data import task_preprocessing

    cfg = _task(f"cifar10:{cifar10_dir}", noise=NoiseConfig(kind="none", rate=0.0))
    assert task_preprocessing(cfg).names == tuple(str(c) for c in range(10))  # no batches.meta: the ids
    names = [f"class-{c}".encode() for c in range(10)]
    _pickle(cifar10_dir / "cifar-10-batches-py" / "batches.meta", {b"label_names": names})
    load_task.cache_clear()
    assert task_preprocessing(cfg).names == tuple(n.decode() for n in names)

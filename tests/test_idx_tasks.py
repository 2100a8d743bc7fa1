"""MNIST-style IDX tasks and the source/target class layout, on IDX files the tests write."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import write_idx_folder
from trainables import data as data_module
from trainables.config import ConfigError, NoiseConfig, TaskConfig
from trainables.data import load_source_task, load_task
from trainables.idx import read_idx, read_idx_split
from trainables.models import ensure_source_model

CLEAN = NoiseConfig(kind="none", rate=0.0)


def _task(root: Path, kind: str = "mnist", **kw: object) -> TaskConfig:
    return TaskConfig(name=f"{kind}:{root}", image_size=8, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_round_trip_raw_and_gzipped(tmp_path: Path, gz: bool) -> None:
    root = write_idx_folder(tmp_path / "d", train=30, test=10, gz=gz)
    suffix = ".gz" if gz else ""
    x, y = read_idx_split(root / f"train-images-idx3-ubyte{suffix}", root / f"train-labels-idx1-ubyte{suffix}")
    assert x.shape == (30, 8, 8) and x.dtype == np.uint8 and y.tolist() == [i % 10 for i in range(30)]
    assert (x[:, 0:2, 0:2][y == 0] == 255).all()  # class 0's square


def test_default_layout_fine_tunes_on_classes_5_to_9_with_their_official_test_images(tmp_path: Path) -> None:
    root = write_idx_folder(tmp_path / "d", train=200, test=100)
    data = load_task(_task(root, train_size=40, val_size=16, noise=CLEAN))
    assert data.num_classes == 5 and len(data.train) == 40 and data.val is not None and len(data.val) == 16
    assert len(data.test) == 50  # the test images of classes 5–9 only, all of them
    assert sorted(set(data.test.clean.tolist())) == [0, 1, 2, 3, 4]
    assert data.train.x.shape[1:] == (3, 8, 8)
    # relabelled: target class 5 → 0 is the image with class 5's square (row 1, column 1)
    raw, labels = read_idx_split(root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz")
    first5 = raw[labels == 5][0]
    assert (first5[2:4, 2:4] == 255).all()
    assert data.test.x[data.test.clean == 0][0, 0, 2:4, 2:4].min() > data.test.x[0, 0, 6:8, 6:8].max()


def test_source_classes_are_the_other_half_and_never_leak_into_the_target(tmp_path: Path) -> None:
    root = write_idx_folder(tmp_path / "d", train=200, test=100)
    source = load_source_task(_task(root))
    assert source.classes == (0, 1, 2, 3, 4) and len(source.y) == 100 and source.test is not None
    assert len(source.test[1]) == 50 and set(source.y.tolist()) == {0, 1, 2, 3, 4}
    target = load_task(_task(root, noise=CLEAN, val_size=0))
    seen = {tuple(img[0].flatten().tolist()) for img in source.x}
    assert not any(tuple(img[0].flatten().tolist()) in seen for img in target.train.x)


def test_a_custom_layout_relabels_the_target_classes_in_the_order_given(tmp_path: Path) -> None:
    root = write_idx_folder(tmp_path / "d", train=200, test=100)
    data = load_task(_task(root, source_classes=(0, 1), target_classes=(9, 2, 7), noise=CLEAN, val_size=0))
    _, labels = read_idx_split(root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz")
    assert data.num_classes == 3 and len(data.test) == 30
    for new, old in enumerate((9, 2, 7)):
        assert (data.test.clean == new).sum() == (labels == old).sum()
        r, q = divmod(old, 4)  # the bright square of the original class
        image = data.test.x[data.test.clean == new][0, 0]
        assert image[2 * r : 2 * r + 2, 2 * q : 2 * q + 2].min() > image.mean()


def test_default_fashion_mnist_folder_is_debians(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_idx_folder(tmp_path / "fm", train=100, test=50)
    monkeypatch.setitem(data_module.IDX_DEFAULT_DIRS, "fashion-mnist", root)
    data = load_task(TaskConfig(name="fashion-mnist", image_size=8, noise=CLEAN, val_size=0))
    assert len(data.test) == 25
    monkeypatch.setitem(data_module.IDX_DEFAULT_DIRS, "fashion-mnist", tmp_path / "absent")
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        load_task(TaskConfig(name="fashion-mnist", image_size=8, noise=CLEAN, val_size=1))


def test_source_pretraining_on_idx_reports_source_accuracy_and_probes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real recipe (drop_last: no tiny BatchNorm batch) on 200 tiny images: the source model
    learns its classes, and the report holds what a reader needs to see that pretraining matters."""
    monkeypatch.setenv("HESSTUNE_CACHE", str(tmp_path / "cache"))
    root = write_idx_folder(tmp_path / "d", train=400, test=100)
    messages: list[str] = []
    path = ensure_source_model("test_resnet", _task(root), log=messages.append)
    report = json.loads(path.with_suffix(".json").read_text())
    assert report["source_test_n"] == 50 and report["source_test_acc"] > 0.5  # chance: 0.2
    assert {"probe_acc", "probe_acc_random", "seconds"} <= set(report)
    assert "source test accuracy" in messages[-1] and f"{report['source_test_acc']:.3f}" in messages[-1]
    assert any("source pretraining: epoch 12/12" in m for m in messages)  # progress on long work


# -- bad input: one ConfigError naming the problem ---------------------------------------------------


def _truncate(root: Path) -> None:
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])


def _wrong_magic(root: Path) -> None:
    path = root / "train-labels-idx1-ubyte"
    path.write_bytes(b"\0\0\x0d\x01" + path.read_bytes()[4:])


def _count_mismatch(root: Path) -> None:
    write_idx_folder(root / "other", train=50, test=10, gz=False)
    (root / "train-labels-idx1-ubyte").write_bytes((root / "other" / "train-labels-idx1-ubyte").read_bytes())


def _missing(root: Path) -> None:
    (root / "t10k-labels-idx1-ubyte").unlink()


def _bad_gzip(root: Path) -> None:
    (root / "t10k-images-idx3-ubyte").unlink()
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"x" * 100)[:20])


DAMAGE = {
    "truncated": (_truncate, "truncated"),
    "wrong magic": (_wrong_magic, "wrong magic"),
    "count mismatch": (_count_mismatch, "120 images but"),
    "missing file": (_missing, "lacks t10k-labels-idx1-ubyte"),
    "damaged gzip": (_bad_gzip, "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_idx_folders_are_one_clear_error(case: str, tmp_path: Path) -> None:
    root = write_idx_folder(tmp_path / "d", gz=False)
    damage, needle = DAMAGE[case]
    damage(root)
    data_module._idx_pool.cache_clear()
    with pytest.raises(ConfigError, match=needle):
        load_task(_task(root))


def test_read_idx_rejects_a_header_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"\0\0\x08\x03\0\0")
    with pytest.raises(ConfigError, match="inside its header"):
        read_idx(path, 3)


LAYOUTS = {
    "class in both": ({"source_classes": (0, 1, 5), "target_classes": (5, 6)}, "class 5 is in both"),
    "class the task lacks": ({"target_classes": (5, 12)}, "class 12, which task"),
    "one target class": ({"target_classes": (7,)}, "at least 2 target classes"),
    "duplicate class": ({"target_classes": (5, 5, 6)}, "distinct class indices"),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_bad_class_layouts(case: str, tmp_path: Path) -> None:
    root = write_idx_folder(tmp_path / "d", train=40, test=20)
    fields, needle = LAYOUTS[case]
    with pytest.raises(ConfigError, match=needle):
        load_task(_task(root, **fields))


def test_an_empty_target_class_is_named(tmp_path: Path) -> None:
    root = write_idx_folder(tmp_path / "d", train=40, test=20, classes=8)  # classes 8 and 9 never occur
    with pytest.raises(ConfigError, match="class 9 has no images"):
        load_task(_task(root, target_classes=(5, 9)))


def test_a_task_without_source_classes_cannot_pretrain_a_source_model(tmp_path: Path) -> None:
    root = write_idx_folder(tmp_path / "d", train=40, test=20)
    with pytest.raises(ConfigError, match="no source classes"):
        load_source_task(_task(root, source_classes=()))


def test_val_size_that_leaves_no_training_images(tmp_path: Path) -> None:
    root = write_idx_folder(tmp_path / "d", train=40, test=20)
    with pytest.raises(ConfigError, match="leave none"):
        load_task(_task(root, val_size=20))
    assert torch.is_tensor(load_task(_task(root, val_size=10, noise=CLEAN)).train.x)


def test_preprocessing_turns_the_raw_test_images_into_the_tasks_tensors(tmp_path: Path) -> None:
    """A model card's preprocessing (task_preprocessing) applied to the 8-bit test images of the
    files gives the task's test tensors; Fashion-MNIST's target classes carry their names."""
    from trainables.data import task_preprocessing

    root = write_idx_folder(tmp_path / "d", train=60, test=30)
    cfg = _task(root, kind="fashion-mnist", noise=CLEAN)
    pre = task_preprocessing(cfg)
    assert pre.classes == (5, 6, 7, 8, 9) and pre.names == ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    assert pre.mean[0] == pre.mean[1] == pre.mean[2]  # one global mean, grey in three channels
    raw, labels = read_idx_split(root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz")
    x = torch.from_numpy(raw[labels >= 5]).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    assert torch.allclose(pre.normalise(x), load_task(cfg).test.x, atol=1e-5)

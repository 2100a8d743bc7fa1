"""From a sweep to predictions on image files, with the Python API (``tuning.api``).

    uv run python docs/examples/sweep_to_predictions.py [--output DIR] [--trials 3]

A small sweep on the built-in task (digits 5-9, 40 % class-dependent label noise), its leaderboard,
the trial the recommended criterion selects, the export of that trial, and predictions on image
files: the task's clean test images written as 8-bit PNGs, as a user's own images would be.
``tests/test_docs_example.py`` runs this script.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image

from trainables.data import load_task
from tuning import api
from tuning.export import LoadedModel, load_model


def write_test_images(model: LoadedModel, exported: Path, folder: Path) -> tuple[list[Path], list[int]]:
    """The test images of the task the exported model was tuned on, un-normalised, as grey PNG
    files, and their clean labels (the model's output indices)."""
    test = load_task(api.base_config(exported / model.card["config"]).task).test
    pre = model.preprocessing
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    pixels = ((test.x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"test_{i:03d}.png" for i in range(len(pixels))]
    for path, image in zip(paths, pixels, strict=True):
        Image.fromarray(image[0].numpy()).save(path)
    return paths, [int(c) for c in test.clean]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(tempfile.gettempdir()) / "hesstune-example"))
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.output)

    # 1. a sweep: the same options as `hesstune sweep`, as keywords
    sweep = api.sweep(
        "example",
        space="smoke",
        trials=args.trials,
        epochs=2,
        noise="pair:0.4",
        output=out,
        overrides={"measure.samples": 96, "measure.eigen_samples": 32},
    )

    # 2. its trials as a DataFrame, ranked by the criterion the report recommends
    criterion = sweep.criterion()
    print(f"\nleaderboard by {criterion}:")
    print(sweep.leaderboard().head().to_string(index=False))
    chosen = sweep.select()
    print(f"selected trial {chosen.name}: bound {chosen['bound']:.4f}, val_acc {chosen['val_acc']:.4f}")

    # 3. export it (config, weights, model card) and load it back
    sweep.export(out / "best")
    model = load_model(out / "best")

    # 4. predictions on image files
    paths, labels = write_test_images(model, out / "best", out / "images")
    predictions = model.predict(paths)
    for path, p in list(zip(paths, predictions, strict=True))[:5]:
        print(f"{path.name}: {p.name} (class {p.class_id}), probability {p.probability:.3f}")
    correct = sum(p.output == y for p, y in zip(predictions, labels, strict=True))
    # the files hold the images rounded to 8 bits: a borderline image or two may flip
    print(f"accuracy on {len(paths)} image files: {correct / len(paths):.4f}")
    print(f"test_acc the trial logged:   {chosen['test_acc']:.4f}")


if __name__ == "__main__":
    main()

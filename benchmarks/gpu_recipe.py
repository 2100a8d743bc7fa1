"""The GPU recipe (issue #6): the selection study on a real data set with ImageNet-pretrained ResNets.

The built-in ``digits`` task is tiny (5 classes, 8×8 images upsampled, a source model pretrained
on the other 5 digits); the papers' claims are about ImageNet-pretrained ResNets fine-tuned on
real image data under label noise. This script runs the study's design (benchmarks/study: seeded
configs, the ``tv`` and ``pool`` arms, every checkpoint epoch a candidate) on CIFAR-100 or an
image folder such as MIT-Indoor, read from local files, with the papers' independent-noise grid,
then the study's analysis, ending with its ``KEY: VALUE`` lines:

    python benchmarks/gpu_recipe.py --data ~/data/cifar-100-python                   # ResNet-18
    python benchmarks/gpu_recipe.py --data ~/data/cifar-100-python --model resnet50
    python benchmarks/gpu_recipe.py --task imagefolder --data ~/data/indoor          # MIT-Indoor
    python benchmarks/gpu_recipe.py --data ~/data/cifar-100-python --smoke           # minutes: check first

Nothing is downloaded: ``--weights timm`` reads the timm weights from the local Hugging Face
cache, ``--weights file:PATH`` from a safetensors / weights-only torch file. Runs are appended to
``OUT/runs.jsonl`` as they finish, so re-running the same command continues where it stopped;
``OUT/recipe.json`` records what defines the results and a different recipe in the same folder
is refused. See docs/gpu_recipe.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.study.design import Job, Preset, Setting, jobs  # noqa: E402

__all__ = ["RecipeError", "build_preset", "main"]

# The papers' independent (symmetric) noise grid: REGSL's MIT-Indoor ResNet-18 table (Li & Zhang
# 2021), 20/40/60/80 %; Ju et al.'s code injects the same kind of noise on CIFAR-100 and MIT-Indoor.
PAPER_SETTINGS = ("symmetric20", "symmetric40", "symmetric60", "symmetric80")
VAL_FRACTION = 0.1  # the papers hold out 10 % of the training images as validation
SMOKE_TRAIN = 256  # training samples of a --smoke run


@dataclass(frozen=True)
class TaskDefaults:
    image_size: int  # images are resized once and held in memory as float32 (per worker)
    batch_size: int
    checkpoints: tuple[int, ...]


TASKS = {
    # CIFAR-100: batch 256 as the NSO scripts; 128 px keeps 60k images at 12 GB per worker (224 px: 36 GB)
    "cifar100": TaskDefaults(128, 256, (2, 4, 6, 8, 10)),
    # MIT-Indoor & co.: the papers' 224 px and batch 32 (REGSL, Ju et al.)
    "imagefolder": TaskDefaults(224, 32, (4, 8, 12, 16, 20)),
}


class RecipeError(Exception):
    """Bad input to the recipe; the message says what is wrong and what to do."""


# --------------------------------------------------------------------------- arguments


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give non-negative integers, e.g. 0,1,2")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="local data folder (CIFAR-100 python version, or an image folder)")
    p.add_argument("--task", choices=sorted(TASKS), default="cifar100")
    p.add_argument(
        "--model",
        default="resnet18",
        help="timm architecture: resnet18 or resnet50 (with --weights timm and no tag: the torchvision "
        "ImageNet weights the papers used, .tv_in1k); any timm name works, e.g. test_resnet",
    )
    p.add_argument(
        "--weights", default="timm", help="timm (local HF cache, no download) | file:PATH | none (random init)"
    )
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--out", help="output folder (default results/gpu-recipe/<task>-<model>[-smoke])")
    p.add_argument("--seeds", type=_ints, default=(0, 1, 2), help="split/noise/config seeds (default 0,1,2)")
    settings = ",".join(PAPER_SETTINGS)
    p.add_argument("--settings", type=_names, default=PAPER_SETTINGS, help=f"noise settings (default: {settings})")
    p.add_argument("--sizes", type=_names, default=("full",), help="full (all training data) and/or half")
    p.add_argument("--train-size", type=int, help="cap the training part of size full at N images (half: N/2)")
    p.add_argument("--runs", type=int, default=12, help="configs per search (default 12)")
    p.add_argument("--epochs", type=int, help="train this long, candidates at 5 evenly spaced epochs")
    p.add_argument("--checkpoints", type=_ints, help="candidate epochs, e.g. 2,4,6,8,10 (default per task)")
    p.add_argument("--image-size", type=int, help="pixels (default: 128 for cifar100, 224 for imagefolder)")
    p.add_argument("--batch-size", type=int, help="default: 256 for cifar100, 32 for imagefolder")
    p.add_argument("--measure-samples", type=int, default=2048, help="measure sample set: seeded subset (2048)")
    p.add_argument("--workers", type=int, default=2, help="training processes sharing the device (default 2)")
    p.add_argument("--threads", type=int, default=4, help="CPU threads per worker (default 4)")
    p.add_argument(
        "--smoke", action="store_true", help="a quick check: 1 seed, symmetric40, 2 configs, epochs 1,2, ≤ 256 images"
    )
    p.add_argument("--no-figures", action="store_true")
    return p.parse_args(argv)


def resolve_model(model: str, weights: str) -> str:
    """``resnet18``/``resnet50`` with timm weights → the torchvision ImageNet weights (``.tv_in1k``)."""
    if weights == "timm" and model in ("resnet18", "resnet50"):
        return f"{model}.tv_in1k"
    return model


def checkpoints_of(args: argparse.Namespace) -> tuple[int, ...]:
    if args.smoke:
        return (1, 2)
    if args.checkpoints:
        if min(args.checkpoints) < 1:
            raise RecipeError(f"--checkpoints {args.checkpoints}: epochs are 1-indexed (≥ 1)")
        return args.checkpoints
    if args.epochs is not None:
        if args.epochs < 1:
            raise RecipeError(f"--epochs {args.epochs} must be ≥ 1")
        return tuple(sorted({max(1, round(args.epochs * i / 5)) for i in range(1, 6)}))
    return TASKS[args.task].checkpoints


# --------------------------------------------------------------------------- checks before anything runs


def check_device(device: str) -> None:
    from trainables.models import resolve_device

    if device == "auto":
        raise RecipeError("--device auto is ambiguous for a recipe: say cuda or cpu")
    resolve_device(device)  # ConfigError: CUDA not available


def training_count(task: str, data: str) -> int:
    """Validate the data folder (the runs' own loader, at 8 px) and count its training part."""
    from trainables.config import NoiseConfig, TaskConfig
    from trainables.data import load_task

    cfg = TaskConfig(name=f"{task}:{data}", image_size=8, val_fraction=VAL_FRACTION, noise=NoiseConfig("none", 0.0))
    return len(load_task(cfg).train)


def check_weights(model: str, weights: str) -> None:
    """Build the model once with its starting weights: a missing file or cache entry fails here."""
    from huggingface_hub import constants

    from trainables.config import ConfigError, ModelConfig
    from trainables.models import check_model_name, create_model

    if weights not in ("timm", "none", "source") and not weights.startswith("file:"):
        raise RecipeError(f"--weights {weights!r} is unknown: use timm, file:PATH or none")
    check_model_name(model)
    try:
        create_model(ModelConfig(name=model, pretrained=weights), 2)
    except ConfigError as err:
        if weights != "timm":
            raise
        hub = constants.HF_HUB_CACHE
        raise RecipeError(
            f"timm weights for {model!r} are not in the local Hugging Face cache ({hub}): on a machine "
            f"with internet run python -c \"import timm; timm.create_model('{model}', pretrained=True)\" "
            f"and copy {hub}/models--timm--{model} here, or pass --weights file:PATH"
        ) from err


# --------------------------------------------------------------------------- the design


def train_sizes(args: argparse.Namespace, n_train: int) -> tuple[int | None, int]:
    """``task.train_size`` of the sizes full (None: all) and half, given the training part's size."""
    cap = args.train_size
    if cap is not None and not 1 <= cap <= n_train:
        raise RecipeError(f"--train-size {cap}: the training part of {args.data!r} has {n_train} images")
    if args.smoke:
        cap = min(cap or n_train, SMOKE_TRAIN)
    return cap, max((cap or n_train) // 2, 1)


def build_preset(args: argparse.Namespace, n_train: int) -> Preset:
    """The study's design on the real task: a Preset whose runs carry the task/model overrides."""
    defaults = TASKS[args.task]
    for name in args.settings:
        Setting.parse(name)  # ValueError names the accepted forms
    unknown = sorted(set(args.sizes) - {"full", "half"})
    if unknown or not args.sizes:
        raise RecipeError(f"--sizes {','.join(args.sizes)!r}: use full, half or full,half")
    if args.runs < 2:
        raise RecipeError(f"--runs {args.runs}: a search needs ≥ 2 configs to select among")
    full, half = train_sizes(args, n_train)
    base = {
        "task.name": f"{args.task}:{Path(args.data).expanduser().resolve()}",
        "task.val_fraction": VAL_FRACTION,
        "task.image_size": args.image_size or defaults.image_size,
        "model.name": args.model,
        "model.pretrained": args.weights,
        "optim.batch_size": args.batch_size or defaults.batch_size,
        "measure.samples": args.measure_samples,
        "device": args.device,
        "threads": args.threads,
    }
    return Preset(
        "gpu-recipe",
        settings=("symmetric40",) if args.smoke else args.settings,
        sizes=("full",) if args.smoke else args.sizes,
        seeds=args.seeds[:1] if args.smoke else args.seeds,
        runs=2 if args.smoke else args.runs,
        checkpoints=checkpoints_of(args),
        base=tuple(base.items()),
        size_overrides=(("full", (("task.train_size", full),)), ("half", (("task.train_size", half),))),
        note=f"{args.task} with {args.model} ({args.weights} weights)",
    )


def recipe_jobs(preset: Preset) -> list[Job]:
    """The preset's runs, grouped by search so that a worker's cached task data is reused."""
    order = {s: i for i, s in enumerate(preset.settings)}
    return sorted(jobs(preset), key=lambda j: (order[j.setting], j.size, j.seed, j.arm, j.run))


def identity(preset: Preset) -> dict[str, Any]:
    """What defines the recorded rows (seeds, settings and runs may grow; device and workers do not matter)."""
    base = {k: v for k, v in preset.base if k not in ("device", "threads")}
    sizes = {size: dict(extra) for size, extra in preset.size_overrides}
    return {"base": base, "sizes": sizes, "checkpoints": list(preset.checkpoints)}


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """``{"base": {"model.name": …}}`` → ``{"base.model.name": …}``, recursively."""
    import pandas as pd

    return pd.json_normalize(record, sep=".").iloc[0].to_dict()


def check_out(out: Path, preset: Preset) -> None:
    """Refuse an output folder whose runs.jsonl was recorded by a different recipe; else record ours."""
    record = out / "recipe.json"
    wanted = identity(preset)
    if record.is_file():
        found = json.loads(record.read_text())
        if found != wanted:
            old, new = _flat(found), _flat(wanted)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise RecipeError(
                f"{out} holds results of a different recipe ({', '.join(changed)} differ): use another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(wanted, indent=1) + "\n")


# --------------------------------------------------------------------------- main


def prepare(args: argparse.Namespace) -> tuple[Preset, Path]:
    """Every check before anything is trained or written (but recipe.json): the design and its folder."""
    if not Path(args.data).expanduser().is_dir():
        raise RecipeError(f"data folder {args.data!r} does not exist: give the local folder with the {args.task} data")
    for flag in ("runs", "workers", "threads", "measure_samples", "image_size", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise RecipeError(f"--{flag.replace('_', '-')} {value} must be ≥ 1")
    args.model = resolve_model(args.model, args.weights)
    check_device(args.device)
    n_train = training_count(args.task, str(Path(args.data).expanduser()))
    check_weights(args.model, args.weights)
    preset = build_preset(args, n_train)
    tag = f"{args.task}-{args.model.split('.')[0]}" + ("-smoke" if args.smoke else "")
    out = Path(args.out) if args.out else ROOT / "results" / "gpu-recipe" / tag
    check_out(out, preset)
    return preset, out


def run(args: argparse.Namespace, preset: Preset, out: Path) -> list[str]:
    """Train what ``out/runs.jsonl`` lacks, then the study's analysis; returns the printed summary."""
    from benchmarks.study.analysis import analyze
    from benchmarks.study.runner import run_jobs

    todo = recipe_jobs(preset)
    caps = dict(preset.size_overrides)
    sizes = ", ".join(f"{size} {dict(caps[size])['task.train_size'] or 'all'}" for size in preset.sizes)
    print(
        f"gpu recipe: {preset.note}; settings {','.join(preset.settings)}; seeds {list(preset.seeds)}; "
        f"training images: {sizes}; checkpoints {list(preset.checkpoints)}; {len(todo)} runs → {out / 'runs.jsonl'}",
        flush=True,
    )
    ran = run_jobs(todo, out / "runs.jsonl", workers=args.workers, log=lambda s: print(s, flush=True))
    print(f"{ran} runs trained", flush=True)
    figures = None if args.no_figures else out / "figures"
    return analyze(out, stores=[out / "runs.jsonl"], title=f"gpu recipe: {preset.note}", figures=figures)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: weights come from the cache or a file
    args = parse_args(argv)
    try:
        preset, out = prepare(args)
    except (RecipeError, ValueError) as err:  # ValueError covers trainables' ConfigError
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print("\n".join(run(args, preset, out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The selection study (issue #6): Hessian-based model selection against held-out accuracy.

    python benchmarks/selection_study.py run --preset default            # train (resumable), 44 min on 2 cores
    python benchmarks/selection_study.py analyze --preset default        # tables, figures, KEY lines
    python benchmarks/selection_study.py all --preset smoke              # both, a few seconds (CI)

``run`` appends finished runs to ``results/<preset>/runs.jsonl`` (re-running continues where it
stopped) and per-run raw outputs to ``--raw`` when given. ``analyze`` writes
``results/<preset>/trials.csv`` (one row per candidate, the stored results a test re-derives a
published number from), ``tables.md``, ``summary.json`` and figures, and prints the summary that
ends with ``KEY: VALUE`` lines. See docs/results.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.study.design import PRESETS, jobs  # noqa: E402


def _run(args: argparse.Namespace) -> None:
    from benchmarks.study.runner import run_jobs

    preset = PRESETS[args.preset]
    out = Path(args.out or ROOT / "results" / preset.name)
    todo = jobs(preset)
    if args.only:
        todo = [j for j in todo if j.setting in args.only.split(",")]
    print(f"preset {preset.name}: {len(todo)} runs → {out / 'runs.jsonl'} ({args.workers} workers)", flush=True)
    ran = run_jobs(todo, out / "runs.jsonl", workers=args.workers, raw_dir=args.raw, log=lambda s: print(s, flush=True))
    print(f"{ran} runs trained", flush=True)


def _analyze(args: argparse.Namespace) -> None:
    from benchmarks.study.analysis import analyze

    presets = args.preset if isinstance(args.preset, list) else [args.preset]
    if len(presets) > 1 and args.out is None:
        out = ROOT / "results" / "study"  # the union of several presets
    else:
        out = Path(args.out or ROOT / "results" / presets[0])
    stores = [
        (Path(args.out) if args.out and len(presets) == 1 else ROOT / "results" / p) / "runs.jsonl" for p in presets
    ]
    # the digits study's figures sit in docs/figures; another task's in a folder of its own
    own = ROOT / "docs" / "figures" / presets[0] if any(PRESETS[p].base for p in presets) else None
    figures = None if args.no_figures else Path(args.figures or own or ROOT / "docs" / "figures")
    raw = getattr(args, "raw", None) or []
    raw = [raw] if isinstance(raw, str) else raw
    docs = Path(args.docs) if getattr(args, "docs", None) else None
    digits = ROOT / "results" / "study"  # an estimated-F study is set next to the digits study's conclusions
    lines = analyze(
        out,
        stores=stores,
        title=" + ".join(presets),
        figures=figures,
        raw_dirs=[Path(r) for r in raw],
        docs=docs,
        compare_with=digits if own is not None else None,
    )
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "analyze", "all"):
        p = sub.add_parser(name)
        if name == "analyze":
            p.add_argument(
                "--preset",
                action="append",
                choices=sorted(PRESETS),
                help="preset(s) whose results to analyse together (default: default); several → results/study",
            )
        else:
            p.add_argument("--preset", default="default", choices=sorted(PRESETS))
        p.add_argument("--out", help="output folder (default results/<preset>)")
        if name in ("run", "all"):
            p.add_argument("--workers", type=int, default=2, help="training processes, one torch thread each")
            p.add_argument("--raw", help="folder for per-run raw outputs (.npz: logits, curvatures); off by default")
            p.add_argument("--only", help="comma-separated settings to run (e.g. symmetric40)")
        if name == "analyze":
            p.add_argument(
                "--raw",
                action="append",
                help="raw outputs of the run step: fills columns added after a run was recorded",
            )
        if name in ("analyze", "all"):
            p.add_argument(
                "--figures",
                help="figure folder (default docs/figures; docs/figures/PRESET for a "
                "preset on another task, e.g. fashion)",
            )
            p.add_argument("--no-figures", action="store_true")
            p.add_argument("--docs", help="a markdown file whose <!-- begin:NAME --> blocks get the new tables")
    args = parser.parse_args(argv)
    if args.command == "analyze" and not args.preset:
        args.preset = ["default"]
    if args.command in ("run", "all"):
        _run(args)
    if args.command in ("analyze", "all"):
        _analyze(args)


if __name__ == "__main__":
    main()

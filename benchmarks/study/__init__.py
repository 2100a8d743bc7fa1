"""The selection study (issue #6): does a Hessian-based criterion select fine-tuned models as well
as held-out accuracy does, and where does it fail?

- :mod:`.design`: presets (which noise settings, sizes, seeds, arms) and the seeded config sampler;
- :mod:`.runner`: trains every run in-process with :func:`trainables.loop.fine_tune` and records
  one row per (run, checkpoint epoch) with the measures and the per-trial primitives that the
  post-hoc criteria need;
- :mod:`.criteria`: the candidate criteria (columns and procedures), each argued from the theory;
- :mod:`.analysis`: correlations, regret with confidence intervals, leave-one-seed-out constants,
  tables, figures and the ``KEY: VALUE`` summary.

Entry point: ``python benchmarks/selection_study.py --help``.
"""

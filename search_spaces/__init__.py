"""Declarative search spaces (YAML) and the Optuna define-by-run functions built from them.

A space is a small YAML file; the presets live in ``search_spaces/presets`` (``list_presets()``)::

    description: REGSL, layer-wise distance constraints + self-labeling (Li & Zhang, NeurIPS 2021)
    fixed:                          # dotted RunConfig keys applied to every trial
      constraint.enabled: true
      self_label.enabled: true
    params:                         # dotted keys → distributions, sampled in this order
      optim.lr: {float: [1.0e-4, 1.0e-2], log: true}
      constraint.growth: {float: [1, 5]}
      self_label.correct_start: {int: [1, epochs]}     # "epochs" resolves to the run's epochs
      nso.enabled: {categorical: [true, false]}
      nso.sigma: {float: [0.003, 0.03], log: true, when: {nso.enabled: true}}

Top-level keys: ``description`` (text), ``fixed`` (optional mapping) and ``params`` (non-empty
mapping); nothing else.

Keys are the flat keys of ``RunConfig().to_flat()`` (``optim.lr``, ``constraint.radius``, …),
plus ``constraint.group_scale_<g>`` for free per-group constraint scales (g = 0..G−1, no gaps).

A parameter has exactly one distribution:

- ``float: [low, high]`` with optional ``log: true`` (then low > 0); write ``1.0e-4``, not
  ``1e-4``, which PyYAML reads as a string.
- ``int: [low, high]`` with optional ``log: true`` (then low ≥ 1); either bound may be the symbol
  ``epochs``: the run's epochs, i.e. ``fixed: {epochs: …}`` if given, else the base config's.
- ``categorical: [a, b, …]``: YAML scalars (bool, number, string, null), each listed once.

and optionally ``when: {key: value, …}``: sample it only when every named parameter, which must
be an earlier categorical parameter, took that value (compared with its type: ``true`` is not
``1``). Otherwise the parameter is absent from the trial and the config keeps its value.

Everything is checked when the space is loaded, before any trial: the schema, the keys, the
ranges, the conditions, and that the trials build valid RunConfigs (:mod:`search_spaces.validation`).
Every problem raises :class:`SpaceError` naming the file, the key, the value and the fix.

Use with Ray Tune::

    space = load_space("regsl")
    searcher = OptunaSearch(space=space.bind(base), metric=..., mode=...)
    ...
    cfg = to_run_config(trial_config)     # in the trainable: the flat config is complete

Importing this package imports neither Ray, MLflow nor torch.
"""

from search_spaces.errors import SpaceError
from search_spaces.loading import list_presets, load_space, parse_space
from search_spaces.params import EPOCHS, Choice, Distribution, FloatRange, IntRange, Param
from search_spaces.space import BoundSpace, SearchSpace, to_run_config

__all__ = [
    "EPOCHS",
    "BoundSpace",
    "Choice",
    "Distribution",
    "FloatRange",
    "IntRange",
    "Param",
    "SearchSpace",
    "SpaceError",
    "list_presets",
    "load_space",
    "parse_space",
    "to_run_config",
]

"""A search space as data, and the define-by-run functions Optuna and Ray call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optuna.trial import BaseTrial

from search_spaces.params import EPOCHS, Param
from search_spaces.validation import GROUP_SCALE_PREFIX, check_space
from trainables.config import RunConfig

__all__ = ["BoundSpace", "SearchSpace", "to_run_config"]


@dataclass(frozen=True)
class SearchSpace:
    """Fixed overrides plus searched parameters, all named by dotted RunConfig keys.

    ``params`` are sampled in order; a parameter with a ``when`` condition is sampled only when
    the earlier categorical parameters it names took those values. ``fixed`` and ``params``
    are read-only by convention (plain dicts keep the space picklable for Ray's searcher state).
    """

    name: str
    description: str
    fixed: Mapping[str, Any]
    params: tuple[Param, ...]
    source: str = "<memory>"

    @property
    def keys(self) -> tuple[str, ...]:
        """The dotted keys this space may suggest, in sampling order."""
        return tuple(p.key for p in self.params)

    def epochs_for(self, base: RunConfig) -> int:
        """What the symbolic bound ``epochs`` means on ``base``: the fixed epochs, else the base's."""
        return int(self.fixed.get(EPOCHS, base.epochs))

    def define_by_run(self, trial: BaseTrial, *, epochs: int) -> dict[str, Any]:
        """Suggest every active parameter on ``trial``; return what was suggested.

        Pure: the only side effects are ``trial.suggest_*`` calls named by dotted keys.
        """
        sampled: dict[str, Any] = {}
        for param in self.params:
            if param.active(sampled):
                sampled[param.key] = param.dist.suggest(trial, param.key, epochs=epochs)
        return sampled

    def check(self, base: RunConfig) -> None:
        """Raise :class:`SpaceError` unless the space's trials build valid RunConfigs on ``base``."""
        check_space(self, base)

    def bind(self, base: RunConfig) -> BoundSpace:
        """The define-by-run function for Ray's ``OptunaSearch(space=...)``, checked on ``base``.

        The function returns the constants: ``base`` with ``fixed`` applied, minus the suggested
        keys (Ray lets returned constants override suggestions of the same key). Ray merges
        both, so every trial config is a complete flat RunConfig that replays on its own.
        """
        self.check(base)
        return BoundSpace(self, {**base.to_flat(), **self.fixed}, self.epochs_for(base))

    def default_point(self, base: RunConfig) -> dict[str, Any]:
        """``base``'s own values (``fixed`` applied) for the parameters, for ``points_to_evaluate``.

        Follows the conditions like a trial would; a value outside its range is left out, so
        Optuna samples that parameter instead.
        """
        scales = base.constraint.group_scales or ()
        flat = {
            **base.to_flat(),
            **{f"{GROUP_SCALE_PREFIX}{g}": s for g, s in enumerate(scales)},
            **self.fixed,
        }
        epochs = self.epochs_for(base)
        point: dict[str, Any] = {}
        for param in self.params:
            value = flat.get(param.key)
            if param.active(point) and param.dist.contains(value, epochs=epochs):
                point[param.key] = value
        return point


@dataclass(frozen=True)
class BoundSpace:
    """A space bound to a base config: the picklable callable given to ``OptunaSearch``.

    A class, not a closure: Ray pickles the searcher (this function included) with the
    standard ``pickle`` module when it checkpoints the experiment.
    """

    space: SearchSpace
    constants: Mapping[str, Any]
    epochs: int

    def __call__(self, trial: BaseTrial) -> dict[str, Any]:
        sampled = self.space.define_by_run(trial, epochs=self.epochs)
        constants = {k: v for k, v in self.constants.items() if k not in sampled}
        if any(k.startswith(GROUP_SCALE_PREFIX) for k in sampled):
            constants.pop("constraint.group_scales", None)  # the sampled scales replace the list
        return constants


def to_run_config(config: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A trial's flat config (suggestions + constants) as a typed, validated RunConfig."""
    return RunConfig.from_flat(dict(config), base=base)

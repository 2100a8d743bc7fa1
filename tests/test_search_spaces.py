"""Search spaces: presets sample valid RunConfigs, conditions hold, bad files fail clearly.

No Ray: Ray's OptunaSearch merges a define-by-run function's suggestions with the constants it
returns as ``{**suggested, **constants}``; ``_ray_config`` does the same.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import FixedTrial

from search_spaces import (
    BoundSpace,
    FloatRange,
    IntRange,
    SearchSpace,
    SpaceError,
    list_presets,
    load_space,
    parse_space,
    to_run_config,
)
from trainables.config import NSOConfig, RunConfig

PRESETS = ["baseline", "full", "groups", "nso", "regsl", "robust", "smoke"]
BASE = RunConfig().replace(**{"epochs": 6, "task.noise.rate": 0.2, "model.name": "resnet18", "seed": 3})


def _ray_config(bound: BoundSpace, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
    """The trial config Ray builds: what was suggested, then the returned constants."""
    constants = bound(trial)
    assert not set(constants) & set(trial.params), "a constant would override a suggestion"
    return {**trial.params, **constants}


def _flat_value(cfg: RunConfig, key: str) -> Any:
    if key.startswith("constraint.group_scale_"):
        assert cfg.constraint.group_scales is not None
        return cfg.constraint.group_scales[int(key.rsplit("_", 1)[1])]
    return cfg.to_flat()[key]


def _sample(name: str, n: int, base: RunConfig = BASE) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(trial params, Ray config) for ``n`` TPE trials told deterministic pseudo-random values."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=8))
    bound = load_space(name).bind(base)
    out = []
    for i in range(n):
        trial = study.ask()
        config = _ray_config(bound, trial)
        study.tell(trial, float((i * 7919) % 101))
        out.append((dict(trial.params), config))
    return out


# -- presets -----------------------------------------------------------------------------------
def test_list_presets_names_every_shipped_file() -> None:
    assert list_presets() == PRESETS
    folder = resources.files("search_spaces") / "presets"
    assert sorted(f.name for f in folder.iterdir() if f.name.endswith(".yaml")) == [f"{p}.yaml" for p in PRESETS]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trials_build_the_sampled_run_config(name: str) -> None:
    space = load_space(name)
    assert space.name == name and space.description
    for params, config in _sample(name, 30):
        cfg = to_run_config(config)  # self-contained: no base needed to replay
        assert cfg == to_run_config(config, BASE)
        for key, value in params.items():
            param = next(p for p in space.params if p.key == key)
            assert param.dist.contains(value, epochs=BASE.epochs), (key, value)
            assert _flat_value(cfg, key) == value
        for key, value in space.fixed.items():
            assert _flat_value(cfg, key) == value
        for key in ("task.noise.rate", "model.name", "seed"):  # untouched base values survive
            assert cfg.to_flat()[key] == BASE.to_flat()[key]


@pytest.mark.parametrize("name", PRESETS)
def test_ray_config_is_the_complete_flat_run_config(name: str) -> None:
    for params, config in _sample(name, 5):
        expected = set(BASE.to_flat()) | set(params)
        if any(k.startswith("constraint.group_scale_") for k in params):
            expected.discard("constraint.group_scales")
        assert set(config) == expected


def test_full_preset_samples_method_knobs_only_under_their_switch() -> None:
    seen = set()
    for params, config in _sample("full", 60):
        assert ("nso.sigma" in params) == params["nso.enabled"]
        assert ("sam.enabled" in params) == (not params["nso.enabled"])
        assert ("sam.rho" in params) == params.get("sam.enabled", False)
        assert ("constraint.radius" in params) == params["constraint.enabled"]
        assert ("self_label.correct_start" in params) == params["self_label.enabled"]
        assert ("consistent.rate" in params) == params["consistent.enabled"]
        if "nso.sigma" not in params:
            assert config["nso.sigma"] == BASE.nso.sigma
        seen.add((params["nso.enabled"], params["constraint.enabled"]))
    assert len(seen) == 4  # both sides of the switches were explored


@pytest.mark.parametrize(
    ("name", "key", "dist"),
    [
        ("regsl", "constraint.radius", FloatRange(0.03, 20.0, log=True)),
        ("regsl", "constraint.growth", FloatRange(1.0, 5.0)),
        ("regsl", "constraint.head_radius", FloatRange(1.0, 25.0, log=True)),
        ("regsl", "self_label.threshold", FloatRange(0.7, 0.99)),
        ("regsl", "self_label.temperature", FloatRange(0.5, 3.0)),
        ("regsl", "self_label.reweight_start", IntRange(1, "epochs")),
        ("regsl", "self_label.correct_start", IntRange(1, "epochs")),
        ("nso", "nso.sigma", FloatRange(0.003, 0.03, log=True)),
        ("nso", "nso.k", IntRange(1, 3)),
        ("robust", "consistent.rate", FloatRange(0.0, 0.7)),
        ("groups", "constraint.group_scale_4", FloatRange(0.03, 20.0, log=True)),
        ("full", "nso.sigma", FloatRange(0.003, 0.03, log=True)),
        ("full", "constraint.radius", FloatRange(0.03, 20.0, log=True)),
    ],
)
def test_preset_ranges_follow_the_papers(name: str, key: str, dist: Any) -> None:
    assert {p.key: p.dist for p in load_space(name).params}[key] == dist


def test_robust_rate_stays_below_singular_transition_for_four_classes() -> None:
    (rate,) = [p.dist for p in load_space("robust").params if p.key == "consistent.rate"]
    assert isinstance(rate, FloatRange) and rate.high < 0.95 * 3 / 4


def test_groups_preset_has_five_groups_and_a_unit_radius() -> None:
    space = load_space("groups")
    assert [k for k in space.keys if k.startswith("constraint.group_scale_")] == [
        f"constraint.group_scale_{g}" for g in range(5)
    ]
    assert space.fixed["constraint.radius"] == 1.0


# -- FixedTrial: exact values ------------------------------------------------------------------
FULL_OFF = {
    "optim.lr": 1e-3,
    "constraint.enabled": False,
    "self_label.enabled": False,
    "consistent.enabled": False,
    "nso.enabled": False,
    "sam.enabled": False,
}


def test_switch_off_leaves_the_knob_unsampled_and_at_its_default() -> None:
    bound = load_space("full").bind(RunConfig())
    trial = FixedTrial(FULL_OFF)  # would raise if nso.sigma were suggested
    cfg = to_run_config(_ray_config(bound, trial))
    assert "nso.sigma" not in trial.params and "sam.rho" not in trial.params
    assert cfg.nso == NSOConfig() and not cfg.sam.enabled and not cfg.constraint.enabled


def test_switch_on_samples_the_knobs_into_the_config() -> None:
    values = {**FULL_OFF, "nso.enabled": True, "nso.sigma": 0.02, "nso.k": 2, "nso.schedule": "linear"}
    del values["sam.enabled"]  # not asked when NSO is on
    trial = FixedTrial(values)
    cfg = to_run_config(_ray_config(load_space("full").bind(RunConfig()), trial))
    assert trial.params == values
    assert cfg.nso == NSOConfig(enabled=True, sigma=0.02, k=2, lam=0.0, schedule="linear")


def test_switch_on_without_a_value_for_its_knob_is_asked_for_it() -> None:
    with pytest.raises(ValueError, match=r"nso\.sigma"):
        load_space("full").define_by_run(FixedTrial({**FULL_OFF, "nso.enabled": True}), epochs=10)


def test_fixed_trial_values_map_to_the_exact_run_config_fields() -> None:
    values = {
        "optim.lr": 3e-4,
        "constraint.radius": 0.5,
        "constraint.growth": 2.5,
        "constraint.head_radius": 12.0,
        "self_label.threshold": 0.8,
        "self_label.temperature": 2.0,
        "self_label.reweight_start": 3,
        "self_label.correct_start": 4,
    }
    cfg = to_run_config(_ray_config(load_space("regsl").bind(BASE), FixedTrial(values)))
    assert cfg.optim.lr == 3e-4 and cfg.epochs == 6
    assert (cfg.constraint.enabled, cfg.constraint.radius, cfg.constraint.growth) == (True, 0.5, 2.5)
    assert cfg.constraint.head_radius == 12.0
    sl = cfg.self_label
    assert (sl.enabled, sl.threshold, sl.temperature, sl.reweight_start, sl.correct_start) == (
        True, 0.8, 2.0, 3, 4
    )  # fmt: skip
    assert not cfg.nso.enabled and not cfg.consistent.enabled


def test_group_scales_replace_the_list_in_the_trial_config() -> None:
    values = {"optim.lr": 1e-3, "constraint.head_radius": 5.0}
    values |= {f"constraint.group_scale_{g}": 0.1 * (g + 1) for g in range(5)}
    base = RunConfig().replace(**{"constraint.group_scales": [9.0, 9.0]})
    config = _ray_config(load_space("groups").bind(base), FixedTrial(values))
    assert "constraint.group_scales" not in config
    assert to_run_config(config).constraint.group_scales == pytest.approx((0.1, 0.2, 0.3, 0.4, 0.5))


# -- bind: epochs, base checks, pickling ---------------------------------------------------------
def test_epochs_bound_resolves_from_the_base_config() -> None:
    study = optuna.create_study()
    trial = study.ask()
    load_space("regsl").bind(RunConfig().replace(epochs=3))(trial)
    assert trial.distributions["self_label.correct_start"] == optuna.distributions.IntDistribution(1, 3)


def test_fixed_epochs_win_over_the_base_epochs(tmp_path: Path) -> None:
    path = _write(tmp_path, "fixed:\n  epochs: 4\nparams:\n  self_label.correct_start: {int: [2, epochs]}\n")
    trial = optuna.create_study().ask()
    config = _ray_config(load_space(path).bind(RunConfig()), trial)
    assert trial.distributions["self_label.correct_start"] == optuna.distributions.IntDistribution(2, 4)
    assert to_run_config(config).epochs == 4


def test_bind_rejects_a_base_too_short_for_an_epochs_range(tmp_path: Path) -> None:
    space = load_space(_write(tmp_path, "params:\n  self_label.correct_start: {int: [5, epochs]}\n"))
    with pytest.raises(SpaceError, match=r"epochs = 3 the range \[5, 3\] is empty"):
        space.bind(RunConfig().replace(epochs=3))


def test_bind_rejects_a_base_that_breaks_a_combination() -> None:
    with pytest.raises(SpaceError, match=r"'nso\.enabled': True") as err:
        load_space("full").bind(RunConfig().replace(**{"sam.enabled": True}))
    assert "enable one of them" in str(err.value)


def test_bound_space_survives_pickle_like_ray_searcher_checkpoints() -> None:
    bound = pickle.loads(pickle.dumps(load_space("full").bind(BASE)))
    assert _ray_config(bound, FixedTrial(FULL_OFF))["epochs"] == 6


def test_define_by_run_returns_what_it_suggested() -> None:
    values = {"optim.lr": 1e-3, "constraint.radius": 2.0}
    assert load_space("smoke").define_by_run(FixedTrial(values), epochs=10) == values


def test_default_point_is_the_base_config_and_replays_through_optuna() -> None:
    space = load_space("full")
    point = space.default_point(RunConfig())
    assert point == FULL_OFF
    study = optuna.create_study()
    study.enqueue_trial(point)
    trial = study.ask()
    space.bind(RunConfig())(trial)
    assert trial.params == point


def test_default_point_leaves_out_values_outside_the_range() -> None:
    point = load_space("regsl").default_point(RunConfig().replace(**{"constraint.radius": 50.0}))
    assert "constraint.radius" not in point
    assert point["self_label.correct_start"] == 10 and point["constraint.head_radius"] == 10.0


# -- bad input ---------------------------------------------------------------------------------
def _write(tmp_path: Path, text: str, name: str = "bad.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


LR = "  optim.lr: {float: [1.0e-4, 1.0e-2], log: true}\n"
BAD = {
    "unknown top-level key": ("param:\n" + LR, ["param", "allowed keys: description, fixed, params"]),
    "unknown param key": (
        "params:\n  optim.lrr: {float: [0.001, 0.01]}\n",
        ["params.optim.lrr", "did you mean optim.lr"],
    ),
    "unknown fixed key": (
        "fixed:\n  nso.enable: true\nparams:\n" + LR,
        ["fixed.nso.enable", "did you mean nso.enabled"],
    ),
    "bad group key": (
        "params:\n  constraint.group_scale_x: {float: [1, 2]}\n",
        ["group_scale_x", "not a run"],
    ),
    "low >= high": (
        "params:\n  optim.lr: {float: [0.01, 0.001]}\n",
        ["params.optim.lr", "[0.01, 0.001]", "low ≥"],
    ),
    "log with low 0": ("params:\n  optim.lr: {float: [0, 0.1], log: true}\n", ["[0, 0.1]", "low > 0"]),
    "log not bool": ("params:\n  optim.lr: {float: [1, 2], log: 'yes'}\n", ["optim.lr.log", "'yes'"]),
    "1e-4 is a string": ("params:\n  optim.lr: {float: [1e-4, 1.0e-2]}\n", ["'1e-4'", "write 1.0e-4"]),
    "int not integer": ("params:\n  nso.k: {int: [1.5, 3]}\n", ["params.nso.k = 1.5", "integers"]),
    "int bounds equal": ("params:\n  nso.k: {int: [2, 2]}\n", ["[2, 2]", "low ≥ high"]),
    "epochs in float": ("params:\n  nso.sigma: {float: [0.01, epochs]}\n", ["'epochs'", "finite numbers"]),
    "empty categorical": (
        "params:\n  nso.schedule: {categorical: []}\n",
        ["params.nso.schedule", "non-empty"],
    ),
    "duplicate choice": ("params:\n  nso.k: {categorical: [1, 2, 1]}\n", ["choice 1 appears twice"]),
    "non-scalar choice": ("params:\n  nso.k: {categorical: [[1, 2]]}\n", ["[1, 2]", "scalars"]),
    "unknown kind": (
        "params:\n  optim.lr: {uniform: [0.001, 0.01]}\n",
        ["no distribution kind", "float: [lo"],
    ),
    "two kinds": ("params:\n  nso.k: {int: [1, 3], categorical: [1]}\n", ["two distribution kinds"]),
    "unknown option": (
        "params:\n  optim.lr: {float: [0.1, 1], step: 0.1}\n",
        ["'step'", "allows: log, when"],
    ),
    "not a mapping": ("params:\n  optim.lr: [0.001, 0.01]\n", ["params.optim.lr", "must be a mapping"]),
    "when unknown": (
        "params:\n  nso.sigma: {float: [0.01, 0.02], when: {nso.enabled: true}}\n",
        ["params.nso.sigma.when.nso.enabled", "not an earlier categorical"],
    ),
    "when later": (
        "params:\n  nso.sigma: {float: [0.01, 0.02], when: {nso.enabled: true}}\n"
        "  nso.enabled: {categorical: [true, false]}\n",
        ["nso.sigma.when.nso.enabled", "not an earlier categorical"],
    ),
    "when numeric": (
        "params:\n" + LR + "  nso.sigma: {float: [0.01, 0.02], when: {optim.lr: 0.001}}\n",
        ["when.optim.lr", "not an earlier categorical"],
    ),
    "when value not a choice": (
        "params:\n  nso.schedule: {categorical: [constant, linear]}\n"
        "  nso.sigma: {float: [0.01, 0.02], when: {nso.schedule: exp}}\n",
        ["'exp'", "not among the choices", "['constant', 'linear']"],
    ),
    "when value of other type": (
        "params:\n  nso.enabled: {categorical: [true, false]}\n"
        "  nso.sigma: {float: [0.01, 0.02], when: {nso.enabled: 1}}\n",
        ["nso.enabled = 1", "[True, False]"],
    ),
    "contradicting when": (
        "params:\n  nso.enabled: {categorical: [true, false]}\n"
        "  nso.schedule: {categorical: [constant, linear], when: {nso.enabled: true}}\n"
        "  nso.sigma: {float: [0.01, 0.02], when: {nso.enabled: false, nso.schedule: linear}}\n",
        ["params.nso.sigma.when", "never be sampled"],
    ),
    "malformed yaml": ("params: {optim.lr: [\n", ["not valid YAML"]),
    "duplicate key": ("params:\n" + LR + LR, ["duplicate key 'optim.lr'"]),
    "top level list": ("- optim.lr\n", ["must be a mapping"]),
    "empty file": ("", ["must be a mapping"]),
    "no params": ("description: nothing to search\n", ["params", "at least one searched parameter"]),
    "fixed and searched": ("fixed:\n  optim.lr: 0.001\nparams:\n" + LR, ["fixed.optim.lr", "not both"]),
    "epochs searched": (
        "params:\n  epochs: {int: [2, 8]}\n  self_label.correct_start: {int: [1, epochs]}\n",
        ["params.self_label.correct_start", "ambiguous"],
    ),
    "fixed value invalid": (
        "fixed:\n  constraint.growth: 0.5\nparams:\n" + LR,
        ["fixed", "constraint.growth=0.5"],
    ),
    "range rejected": (
        "params:\n  constraint.growth: {float: [0.5, 2]}\n",
        ["params.constraint.growth = 0.5", "must be ≥ 1", "narrow the range"],
    ),
    "conditional range rejected": (
        "params:\n  self_label.enabled: {categorical: [false, true]}\n"
        "  self_label.threshold: {float: [0.5, 1.0], when: {self_label.enabled: true}}\n",
        ["params.self_label.threshold = 1.0", "(0, 1)"],
    ),
    "int range on a float field rejected": (
        "params:\n  self_label.correct_start: {float: [1, 5]}\n",
        ["params.self_label.correct_start", "non-integers", "int: [1, 5]"],
    ),
    "group scales with a gap": (
        "params:\n  constraint.group_scale_0: {float: [1, 2]}\n  constraint.group_scale_2: {float: [1, 2]}\n",
        ["params.constraint.group_scale_0", "0..G-1"],
    ),
    "group scales twice": (
        "fixed:\n  constraint.group_scales: [1.0]\nparams:\n  constraint.group_scale_0: {float: [1, 2]}\n",
        ["fixed.constraint.group_scales", "conflicts"],
    ),
    "incompatible switches": (
        "params:\n  nso.enabled: {categorical: [true, false]}\n  sam.enabled: {categorical: [true, false]}\n",
        ["{'nso.enabled': True, 'sam.enabled': True}", "add a when: condition"],
    ),
    "epochs range empty on the default config": (
        "params:\n  self_label.correct_start: {int: [20, epochs]}\n",
        ["epochs = 10", "empty"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_space_file_raises_a_space_error_naming_file_key_and_fix(tmp_path: Path, case: str) -> None:
    text, fragments = BAD[case]
    path = _write(tmp_path, text)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    message = str(err.value)
    assert path in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file_is_a_space_error(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match=r"nope\.yaml' does not exist"):
        load_space(str(tmp_path / "nope.yaml"))


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(SpaceError, match="unknown search space 'regls'") as err:
        load_space("regls")
    assert all(name in str(err.value) for name in PRESETS)


def test_user_file_loads_by_path_with_its_stem_as_name(tmp_path: Path) -> None:
    path = Path(_write(tmp_path, "description: mine\nparams:\n" + LR, name="mine.yml"))
    for spec in (path, str(path)):
        space = load_space(spec)
        assert isinstance(space, SearchSpace)
        assert (space.name, space.description, space.keys) == ("mine", "mine", ("optim.lr",))


def test_schema_example_in_the_package_docstring_is_a_valid_space() -> None:
    import search_spaces

    block = (search_spaces.__doc__ or "").split("::\n\n")[1].split("\n\n")[0]
    space = parse_space(yaml.safe_load(textwrap.dedent(block)), name="doc", source="docstring")
    space.check(RunConfig())
    assert space.params[-1].when == {"nso.enabled": True}


def test_importing_search_spaces_starts_no_heavy_framework() -> None:
    code = "import sys, search_spaces; print(sorted({'ray', 'mlflow', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""Configuration: composition, and one clear line for every kind of mistake."""

import pytest

from icl_gd import analyses, config, models


def test_defaults_are_the_paper_setting():
    cfg = config.load_config()
    assert (cfg.task.dim, cfg.task.n_context, cfg.task.x_dist.name, cfg.task.x_scale) == (10, 10, "uniform", 0.5)
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.b2, cfg.train.steps) == (2048, 1e-3, 0.98, 5000)
    assert cfg.eval.n_tasks == 10_000 and cfg.eval.line_search_tasks == 100_000
    assert models.init_scale(cfg.model) == pytest.approx(0.002)


@pytest.mark.parametrize("name", config.group_options("experiment"))
def test_every_experiment_composes(name):
    cfg = config.load_config([f"experiment={name}"])
    assert cfg.name == name


@pytest.mark.parametrize(
    "override,message",
    [
        ("task.n_context=0", "task.n_context: got 0; allowed: an integer >= 1"),
        ("train.lr=-1", "train.lr: got -1.0; allowed: a number > 0"),
        ("task.x_dist=cauchy", "task.x_dist: got 'cauchy'; allowed: uniform | gaussian | laplace | exponential"),
        ("model.attention=relu", "model.attention: got 'relu'; allowed: linear | softmax"),
        ("train.seeds=0", "train.seeds: got 0; allowed: an integer >= 1"),
        ("task.distractors=11", "task.distractors: got 11; allowed: an integer in [0, task.n_context=10]"),
        ("experiment=nope", "experiment: unknown value 'nope'; allowed: "),
        ("train.foo=1", "train.foo: unknown field; allowed: steps, batch_size"),
        ("bogus=1", "bogus: unknown field; allowed: "),
        ("train.steps=abc", "train.steps: Value 'abc' of type 'str' could not be converted to Integer"),
        ("task=lds", None),
        ("task.variant=full", "task.variant: unknown field; allowed: kind, dim, n_context"),
        ("train.checkpoint_every=0", "train.checkpoint_every: got 0; allowed: an integer >= 1"),
        ("model.positional_dim=5", "model.positional_dim: got 5; allowed: null or an even integer >= 2"),
        ("model.input_embedding=conv", "model.input_embedding: got 'conv'; allowed: mlp | residual"),
        ("eval.mlpgd_eta=0", "eval.mlpgd_eta: got 0.0; allowed: a number > 0"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_field(override, message):
    if message is None:  # a valid override of the same kind, for contrast
        config.load_config([override])
        return
    with pytest.raises(config.ConfigError) as err:
        config.load_config([override])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["task=lds", "task.variant=spiral"],
            "task.variant: got 'spiral'; allowed: full | partial | contracting | fixed",
        ),
        (["task=lds", "task.dim=3"], "task.dim: unknown field; allowed: kind, state_dim, length"),
        (["task=lds", "task.length=1"], "task.length: got 1; allowed: an integer >= 2"),
        (["task=lds", "task.ridge_lambda=0"], "task.ridge_lambda: got 0.0; allowed: a number > 0"),
        (["task=sine", "task.dim=2"], "task.dim: got 2; allowed: 1 for task=sine"),
        (["task=sine", "task.x_dist=gaussian"], "task.x_dist: unknown field; allowed: kind, dim, n_context, noise_std"),
    ],
)
def test_each_task_kind_has_its_own_schema(overrides, message):
    with pytest.raises(config.ConfigError) as err:
        config.load_config(overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_analysis_names_are_checked_against_the_registry():
    with pytest.raises(config.ConfigError) as err:
        analyses.check(config.load_config(["analyses=[nope]"]))
    assert str(err.value).startswith("analyses: got 'nope'; allowed: a list of ")
    assert "\n" not in str(err.value)


def test_a_run_config_round_trips_through_yaml():
    for overrides in ([], ["task=lds", "task.variant=partial"], ["experiment=sine"]):
        cfg = config.load_config(overrides)
        assert config.from_yaml(config.to_yaml(cfg)) == cfg


def test_sweeps_expand_to_jobs():
    jobs = config.expand_sweep(["model.layers=1,2", "task.dim=3"])
    assert jobs == [["model.layers=1", "task.dim=3"], ["model.layers=2", "task.dim=3"]]
    with pytest.raises(config.ConfigError, match="experiment: unknown value 'x'"):
        config.expand_sweep(["experiment=single_layer,x"])

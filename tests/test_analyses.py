"""The analyses, on tiny trained runs of their experiments: each writes every file it promises."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from icl_gd import analyses, cli, config, experiment, models, references, runs, tasks

TINY = [
    "train.steps=4",
    "train.eval_every=2",
    "train.batch_size=64",
    "train.seeds=2",
    "train.progress=false",
    "eval.n_tasks=300",
    "eval.line_search_tasks=600",
    "eval.gdpp_steps=5",
]


def train_tiny(tmp_path_factory, name: str, *extra: str):
    cfg = config.load_config([f"experiment={name}", *TINY, *extra])
    trained = experiment.train(cfg, tmp_path_factory.mktemp(name) / "run", quiet=True)
    analyses.run_all(trained)
    return trained


@pytest.fixture(scope="module")
def ood_run(tmp_path_factory):
    return train_tiny(tmp_path_factory, "ood", "task.dim=3", "task.n_context=4")


@pytest.fixture(scope="module")
def sine_run(tmp_path_factory):
    return train_tiny(
        tmp_path_factory, "sine", "task.n_context=6", "model.input_mlp_width=8", "model.input_mlp_features=4"
    )


def test_every_analysis_has_its_files_checked():
    """The files each analysis promises are checked where it runs: the named experiments' analyses in
    tests/test_experiments.py, explain's in tests/test_explain.py. A new analysis fails here until
    an experiment lists it (or a test of its own checks its files and is added below)."""
    listed = {
        name
        for exp in config.group_options("experiment")
        for name in config.load_config([f"experiment={exp}"]).analyses
    }
    assert listed | {"explain", "layer_match"} == set(analyses.REGISTRY)  # tests/test_layer_match.py checks its files
    assert all(analyses.REGISTRY[name].files for name in analyses.REGISTRY)


def test_ood_shifts_keep_the_training_variance_for_every_law():
    task = tasks.from_config(config.load_config(["task.x_dist=laplace", "task.x_scale=0.3"]).task)
    var = tasks.input_law("laplace", 0.3).var
    shifts = analyses.ood_shifts(task)
    laws = [changes for family, _, changes in shifts if family == "input_law"]
    assert [c["x_dist"] for c in laws] == list(analyses.INPUT_LAWS)
    for changes in laws:
        assert tasks.input_law(changes["x_dist"], changes["x_scale"]).var == pytest.approx(var, rel=1e-12)
    scales = [changes["x_scale"] for family, _, changes in shifts if family == "input_scale"]
    assert scales == pytest.approx([0.3 * c for c in analyses.INPUT_SCALES])
    assert min(analyses.INPUT_SCALES) == 0.5 and max(analyses.INPUT_SCALES) == 2.0
    assert min(analyses.WEIGHT_SCALES) == 0.5 and max(analyses.WEIGHT_SCALES) == 5.0


def test_ood_input_scales_scale_the_covariance_of_non_isotropic_inputs():
    task = tasks.from_config(config.load_config(["task.dim=3", "task.x_cov=[0.5,1,2]", "task.x_rotation=1"]).task)
    for family, c, changes in analyses.ood_shifts(task):
        if family == "input_scale":
            np.testing.assert_allclose(task.shifted(**changes).covariance, c**2 * task.covariance, rtol=1e-6)


def test_ood_table_files_and_consistency_with_the_run(ood_run):
    summary = runs.load_summary(ood_run.run_dir)
    assert summary["status"] == "completed"
    out = ood_run.run_dir / "analyses" / "ood"
    for suffix in ("csv", "json", "png", "pdf"):
        assert (out / f"ood.{suffix}").stat().st_size > 0
    df = pd.read_csv(out / "ood.csv")
    assert len(df) == len(analyses.INPUT_SCALES) + len(analyses.WEIGHT_SCALES) + len(analyses.INPUT_LAWS)
    assert json.loads((out / "ood.json").read_text())["rows"] == summary["analyses"]["ood"]["rows"]
    unshifted = df[df["value"].astype(str).isin(["1.0", "uniform"])]
    assert len(unshifted) == 3
    # The unshifted rows evaluate the run's own evaluation set: the run's final and GD losses.
    np.testing.assert_allclose(unshifted["model"], summary["final"]["loss"]["mean"], rtol=1e-5)
    np.testing.assert_allclose(unshifted["gd"], summary["references"]["gd"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(unshifted["ols"], summary["references"]["ols"]["loss"], rtol=1e-4, atol=1e-9)
    # The run's GD++ (tied across the recurrent model's steps) was scored on these same draws.
    np.testing.assert_allclose(unshifted["gdpp"], summary["references"]["gdpp"]["loss"], rtol=1e-5)


def test_ood_losses_of_label_linear_references_scale_with_the_weights_squared(ood_run):
    """GD, GD++ and OLS are linear in the labels: weights scaled by c scale their loss by c^2."""
    df = pd.read_csv(ood_run.run_dir / "analyses" / "ood" / "ood.csv")
    w = df[df["shift"] == "weight_scale"].assign(value=lambda f: f["value"].astype(float))
    base = w[w["value"] == 1.0].iloc[0]
    for name in ("gd", "gdpp"):
        np.testing.assert_allclose(w[name], w["value"] ** 2 * base[name], rtol=1e-5)


def test_mlp_gd_partial_cos_is_one_for_the_gd_construction_on_features():
    """An input MLP followed by the GD construction (any eta) is GD on the features: partial cos 1,
    and at the line-searched eta the same predictions and loss as MLP + GD."""
    feats, n = 4, 6
    task = tasks.from_config(config.load_config(["task=sine", f"task.n_context={n}"]).task)
    t_eval, t_search = task.draw(jax.random.key(1), 400), task.draw(jax.random.key(2), 2000)
    keys = jax.random.split(jax.random.key(3), 2)
    embed = models.MLP(
        jax.random.normal(keys[0], (1, 8)),
        jnp.linspace(-1, 1, 8),
        jax.random.normal(keys[1], (8, feats)) / 3,
        jnp.zeros(feats),
    )
    arch = models.Architecture(task.layout, input_mlp=True)
    mlp_gd = jax.jit(analyses.mlp_gd, static_argnums=(0, 1, 5))
    gd = lambda eta: references.gd_weights(jnp.array([eta]), feats, n)._replace(embed=embed)
    out = mlp_gd(arch, task, gd(0.3), t_eval, t_search, 1)
    assert float(out["partial_cos"]) == pytest.approx(1.0, abs=1e-5)
    best = float(out["mlp_gd_eta"])
    out = mlp_gd(arch, task, gd(best), t_eval, t_search, 1)
    assert float(out["preds_diff"]) == pytest.approx(0.0, abs=1e-5)
    assert float(out["loss"]) == pytest.approx(float(out["mlp_gd_loss"]), rel=1e-5)
    assert float(out["mlp_ols_loss"]) >= 0


def test_sine_analysis_files_and_values(sine_run):
    result = runs.load_summary(sine_run.run_dir)["analyses"]["sine"]
    for name in ("loss", "mlp_gd_loss", "mlp_gd_eta", "mlp_ols_loss", "preds_diff", "partial_cos"):
        assert len(result[name]["per_seed"]) == 2 and np.all(np.isfinite(result[name]["per_seed"]))
    assert all(-1.0 <= c <= 1.0 for c in result["partial_cos"]["per_seed"])
    assert all(e > 0 for e in result["mlp_gd_eta"]["per_seed"])
    np.testing.assert_allclose(
        result["loss"]["per_seed"], runs.load_summary(sine_run.run_dir)["final"]["loss"]["per_seed"], rtol=1e-5
    )
    for suffix in ("csv", "json", "png", "pdf"):
        assert (sine_run.run_dir / "analyses" / "sine" / f"sine.{suffix}").stat().st_size > 0


def test_analyses_refuse_runs_they_do_not_apply_to(ood_run):
    result = CliRunner().invoke(cli.app, ["analyze", str(ood_run.run_dir), "sine"])
    assert result.exit_code == 2 and "model.input_mlp=true" in result.output
    result = CliRunner().invoke(cli.app, ["analyze", str(ood_run.run_dir), "copy"])
    assert result.exit_code == 2 and "task.tokens=classic" in result.output

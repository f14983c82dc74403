"""Task variants: distractors and their closed-form GD reference, and the errors on bad values of
the task options (the named experiments run in tests/test_experiments.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import analyses, config, experiment, references, tasks


def test_distractors_are_k_uniform_positions_of_noise_at_the_labels_scale():
    kwargs = {"dim": 4, "n_context": 6, "noise_std": 0.0}
    clean = tasks.sample_linear(jax.random.key(5), 50_000, **kwargs)
    fake = tasks.sample_linear(jax.random.key(5), 50_000, distractors=2, **kwargs)
    np.testing.assert_array_equal(fake.x, clean.x)
    replaced = np.asarray(fake.y != clean.y)
    np.testing.assert_array_equal(replaced.sum(1), 2)
    # Each position is a distractor with probability k/N = 1/3 (standard error 0.2%), and fake
    # labels ~ N(0, d sigma^2 s_w^2) = N(0, 4/12) (standard error of the variance 0.45%).
    np.testing.assert_allclose(replaced.mean(0), 1 / 3, rtol=0.02)
    assert float(jnp.var(fake.y[replaced])) == pytest.approx(4 / 12, rel=0.02)


def test_closed_form_gd_with_distractors_matches_the_line_search():
    """The expected one-step GD loss with k distractors (references.closed_form_gd) against the
    line-searched loss on 200,000 tasks (its standard error is about 0.3%)."""
    params = {"dim": 10, "n_context": 10, "x_dist": "laplace", "x_scale": 0.3, "noise_std": 0.5, "distractors": 3}
    closed = references.closed_form_gd(
        params["dim"],
        params["n_context"],
        params["x_dist"],
        params["x_scale"],
        1.0,
        params["noise_std"],
        params["distractors"],
    )
    searched = references.line_search_eta(tasks.sample_linear(jax.random.key(7), 200_000, **params), 1, 3 * closed.eta)
    assert searched.loss == pytest.approx(closed.loss, rel=0.015)
    assert searched.eta == pytest.approx(closed.eta, rel=0.05)
    assert (
        closed.loss
        > references.closed_form_gd(10, 10, params["x_dist"], params["x_scale"], 1.0, params["noise_std"]).loss
    )


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["task.tokens=interleaved"], "task.tokens"),
        (["task.distractors=11"], "task.distractors"),
        (["task.distractors=-1"], "task.distractors"),
        (["task=sine", "task.distractors=1"], "task.distractors"),
        (["task.kind=sine"], "task.kind"),
        (["task=lds", "model.input_mlp=true"], "model.input_mlp"),
        (["task=lds", "analyses=[ood]"], "analyses"),
        (["task.x_dist=cauchy"], "task.x_dist"),
        (["task.noise_std=-0.1"], "task.noise_std"),
        (["model.input_mlp_features=0"], "model.input_mlp_features"),
        (["model.input_mlp_width=0"], "model.input_mlp_width"),
        (["analyses=[ood,nope]"], "analyses"),
        (["analyses=[sine]"], "analyses"),
        (["experiment=sine", "analyses=[ood]"], "analyses"),
        (["experiment=classic_tokens", "task.tokens=constructed"], "analyses"),
        (["model.positional=maybe"], "model.positional"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_field(overrides, field):
    """Through the checks the CLI runs before any work: the config, what the task kind needs of the
    model, and the analyses."""
    with pytest.raises(config.ConfigError) as err:
        cfg = config.load_config(overrides)
        experiment.check(cfg)
        analyses.check(cfg)
    message = str(err.value)
    assert message.startswith(field) and "\n" not in message

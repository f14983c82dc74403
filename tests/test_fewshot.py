"""Few-shot transfer of a dynamical-systems model to regression (docs/science.md section 8)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from icl_gd import analyses, config, fewshot, runs
from icl_gd.cli import app
from icl_gd.config import ConfigError


def test_regression_pairs_are_an_orthogonal_map_plus_noise():
    pairs = fewshot.draw_pairs(jax.random.key(0), 64, 4, 30, noise=0.01)
    assert pairs.x.shape == pairs.y.shape == (64, 30, 4) and pairs.w.shape == (64, 4, 4)
    np.testing.assert_allclose(
        jnp.einsum("bij,bkj->bik", pairs.w, pairs.w), np.broadcast_to(np.eye(4), (64, 4, 4)), atol=1e-5
    )
    assert float(jnp.abs(pairs.x).max()) <= 1.0
    assert float(jnp.var(pairs.x)) == pytest.approx(1 / 3, rel=0.05)  # U(-1, 1): the states' scale
    residual = pairs.y - jnp.einsum("bij,bnj->bni", pairs.w, pairs.x)
    assert float(jnp.std(residual)) == pytest.approx(0.01, rel=0.05)
    exact = fewshot.draw_pairs(jax.random.key(0), 8, 4, 5, noise=0.0)
    np.testing.assert_allclose(exact.y, jnp.einsum("bij,bnj->bni", exact.w, exact.x), atol=1e-6)


def test_least_squares_is_a_ridge_solve_on_the_pairs_before_each_one():
    pairs = fewshot.draw_pairs(jax.random.key(1), 3, 3, 8)
    lam = 1e-3
    preds = np.asarray(fewshot.least_squares(pairs.x, pairs.y, lam))
    for b in range(3):
        x, y = np.asarray(pairs.x[b], np.float64), np.asarray(pairs.y[b], np.float64)
        for i in range(8):  # fitted on pairs 0..i-1, applied to x_i
            w = np.linalg.solve(x[:i].T @ x[:i] + lam * np.eye(3), x[:i].T @ y[:i]).T
            np.testing.assert_allclose(preds[b, i], w @ x[i], rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(preds[:, 0], 0.0)


def test_interleaving_places_pairs_separators_and_prefix():
    pairs = fewshot.draw_pairs(jax.random.key(2), 2, 2, 3)
    states, x_at = fewshot.interleave(pairs)
    assert states.shape == (2, 6, 2)
    np.testing.assert_array_equal(x_at, [0, 2, 4])
    np.testing.assert_array_equal(states[:, 0::2], pairs.x)
    np.testing.assert_array_equal(states[:, 1::2], pairs.y)
    prompt = fewshot.Prompt(jnp.array([7.0, 8.0]), jnp.array([[1.0, 2.0], [3.0, 4.0]]))
    states, x_at = fewshot.interleave(pairs, prompt)
    assert states.shape == (2, 2 + 9, 2)
    np.testing.assert_array_equal(x_at, [2, 5, 8])
    np.testing.assert_array_equal(states[:, :2], np.broadcast_to(prompt.prefix, (2, 2, 2)))
    np.testing.assert_array_equal(states[:, x_at], pairs.x)
    np.testing.assert_array_equal(states[:, x_at + 1], pairs.y)
    np.testing.assert_array_equal(states[:, x_at + 2], np.broadcast_to(prompt.separator, (2, 3, 2)))
    assert (fewshot.max_pairs(10), fewshot.max_pairs(11), fewshot.max_pairs(10, 0), fewshot.max_pairs(10, 1)) == (
        5,
        5,
        3,
        3,
    )


def test_a_model_that_is_least_squares_gets_the_least_squares_curve():
    """A fake model that fits ridge least squares on the pairs before each `x_i` in its sequence."""
    length, lam = 11, 1e-3  # 5 pairs, then one padding state and the dummy target
    count = fewshot.max_pairs(length)
    pairs = fewshot.draw_pairs(jax.random.key(3), 200, 3, count)

    def predict(states_BxTp1xD):
        assert states_BxTp1xD.shape == (200, length + 1, 3)
        x, y = states_BxTp1xD[:, 0 : 2 * count : 2], states_BxTp1xD[:, 1 : 2 * count : 2]
        preds = jnp.zeros_like(states_BxTp1xD[:, :-1])
        return preds.at[:, 0 : 2 * count : 2].set(fewshot.least_squares(x, y, lam))

    curve = fewshot.model_curve(predict, pairs, length)
    least = fewshot.pair_losses(fewshot.least_squares(pairs.x, pairs.y, lam), pairs.y)
    np.testing.assert_allclose(curve, least, rtol=1e-6)
    zero = fewshot.pair_losses(jnp.zeros_like(pairs.y), pairs.y)
    assert float(least[0]) == pytest.approx(float(zero[0]))  # nothing seen: least squares predicts 0
    np.testing.assert_allclose(zero, 3 / 6, rtol=0.1)  # E||W x||^2 / 2 = D/6
    assert float(least[-1]) < 0.01  # 4 pairs of a 3-d map: determined up to the noise


def test_tuning_lowers_the_loss_of_a_frozen_predictor_that_reads_the_separator():
    """Toy model: predicts `s_{t-1} - 1` at position t. At `x_i` the previous state is the
    separator (or the prefix's last state, for `x_1`): tuned toward 1, the loss falls to D/6."""
    dim, length = 3, 13

    def predict(states_BxTp1xD):
        s = states_BxTp1xD[:, :-1]
        return jnp.concatenate([jnp.zeros_like(s[:, :1]), s[:, :-1]], 1) - 1.0

    prompt = fewshot.init_prompt(jax.random.key(4), dim, prefix=1)
    tuned, trace = fewshot.tune(predict, prompt, jax.random.key(5), length=length, steps=150, batch=64, lr=0.05)
    assert trace.shape == (150,) and tuned.prefix.shape == (1, dim)
    assert float(trace[-10:].mean()) < 0.5 * float(trace[0])
    np.testing.assert_allclose(tuned.separator, 1.0, atol=0.1)
    np.testing.assert_allclose(tuned.prefix[-1], 1.0, atol=0.1)
    pairs = fewshot.draw_pairs(jax.random.key(6), 500, dim, 4)
    before, after = (fewshot.model_curve(predict, pairs, length, p) for p in (prompt, tuned))
    assert after.shape == (4,) and bool(jnp.all(after < before))
    np.testing.assert_allclose(after, dim / 6, rtol=0.15)


def test_fewshot_analysis_via_the_cli_writes_every_file(tiny_lds_run):
    run_dir = tiny_lds_run.run_dir
    result = CliRunner().invoke(app, ["analyze", str(run_dir), "fewshot"])
    assert result.exit_code == 0, result.output
    for file in analyses.REGISTRY["fewshot"].files:
        assert (run_dir / file).stat().st_size > 0, file
    summary = runs.load_summary(run_dir)["analyses"]["fewshot"]
    assert summary["pairs"] == 5 and summary["tuning"]["pairs"] == 3  # 10 // 2; (10 - 1) // 3
    assert set(summary["at"]) == {"1", "4"}
    assert isinstance(summary["finding"], str) and "least squares" in summary["finding"]
    df = pd.read_csv(run_dir / "analyses" / "fewshot" / "fewshot.csv")
    assert list(df.columns) == [
        "pairs",
        "model_seed0",
        "model_seed1",
        "least_squares",
        "zero",
        "tuned_seed0",
        "tuned_seed1",
    ]
    assert df["pairs"].tolist() == [0, 1, 2, 3, 4]
    assert df["tuned_seed0"].isna().tolist() == [False, False, False, True, True]
    np.testing.assert_allclose(df[["model_seed0", "model_seed1"]].T, summary["model"]["per_seed"], rtol=1e-6)
    assert df["least_squares"][0] == pytest.approx(df["zero"][0])
    assert df["least_squares"].iloc[-1] < 0.01 < df["zero"].iloc[-1]
    rows = json.loads((run_dir / "analyses" / "fewshot" / "fewshot.json").read_text())["rows"]
    assert len(rows) == 5 and rows[-1]["tuned_seed1"] is None


def test_fewshot_refuses_configs_it_does_not_apply_to(tmp_path):
    with pytest.raises(ConfigError, match=r"^analyses: got 'fewshot'; allowed: fewshot only with task=lds$"):
        analyses.check(config.load_config(["task=linear"]), ["fewshot"])
    tight = config.load_config(["task=lds", "task.length=4", "eval.fewshot_tune_steps=1", "eval.fewshot_prefix=2"])
    with pytest.raises(ConfigError, match=r"^eval\.fewshot_prefix: got 2; allowed: at most task\.length - 3 = 1"):
        analyses.check(tight, ["fewshot"])
    with pytest.raises(ConfigError, match=r"^eval\.fewshot_prefix: got 3; allowed: .*fewshot_tune_steps > 0"):
        config.load_config(["task=lds", "eval.fewshot_prefix=3"])
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "task=linear", "analyses=[fewshot]", "--out", str(out)])
    assert result.exit_code == 2 and "task=lds" in result.output and not out.exists()  # refused before training

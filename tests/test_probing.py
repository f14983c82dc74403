"""Linear probes of the residual stream (docs/science.md section 8): the numerics of
icl_gd.probing, and the `probes` and `first_layer` analyses on a tiny trained lds run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from icl_gd import analyses, cli, config, probing, runs, tasks

LDS = ["task=lds", "task.length=10", "task.state_dim=3"]


def lds_task(*overrides: str) -> tasks.lds.LinearDynamics:
    return tasks.from_config(config.load_config([*LDS, *overrides]).task)


def test_probe_recovers_a_planted_linear_readout_and_not_an_independent_target():
    n, f, o = 1024, 12, 4
    k_x, k_m, k_b, k_y = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k_x, (2 * n, f)) * jnp.linspace(0.1, 10.0, f)  # features of unequal scales
    m, b = jax.random.normal(k_m, (f, o)), jax.random.normal(k_b, (o,))
    planted, independent = x @ m + b, jax.random.normal(k_y, (2 * n, o))
    res = x[:, None, None, :]  # one layer, one position
    scores = jax.jit(probing.probe_grid)(
        res[:n],
        {"planted": planted[:n, None], "control": independent[:n, None]},
        res[n:],
        {"planted": planted[n:, None], "control": independent[n:, None]},
    )
    assert float(scores["planted"].r2[0, 0]) == pytest.approx(1.0, abs=1e-5)
    assert float(scores["planted"].mse[0, 0]) < 1e-4 * float(jnp.var(planted))
    assert -0.1 < float(scores["control"].r2[0, 0]) <= 0.01  # about -f / n: chance
    assert float(scores["control"].mse[0, 0]) == pytest.approx(1.0, rel=0.1)


def test_constant_targets_score_nan_and_constant_features_are_harmless():
    x = jax.random.normal(jax.random.key(1), (400, 3))
    x = jnp.concatenate([x, jnp.zeros((400, 2))], -1)[:, None, None]  # an empty slot, as a token's first
    fit, test = (
        {"x": x[:200, 0, :, :2], "zero": jnp.zeros((200, 1, 2))},
        {"x": x[200:, 0, :, :2], "zero": jnp.zeros((200, 1, 2))},
    )
    scores = jax.jit(probing.probe_grid)(x[:200], fit, x[200:], test)
    assert bool(jnp.isnan(scores["zero"].r2[0, 0])) and float(scores["zero"].mse[0, 0]) == 0.0
    assert float(scores["x"].r2[0, 0]) == pytest.approx(1.0, abs=1e-5)


def test_preconditioned_inputs_equal_a_direct_solve():
    task = lds_task()
    states = task.states(jax.random.key(2), 4)
    lam = task.ridge_lambda
    got = probing.preconditioned_inputs(np.asarray(states), lam)
    s = np.asarray(states, np.float64)
    for b in range(4):
        for t in range(task.length):  # 0-based position t: the states s_i, i < t
            a = s[b, :t].T @ s[b, :t] + lam * np.eye(3)
            np.testing.assert_allclose(got[b, t], np.linalg.solve(a, s[b, t]), rtol=1e-5)
    targets = probing.lds_targets(states, states[::-1], lam)
    np.testing.assert_array_equal(targets["s_t"], states[:, :-1])
    np.testing.assert_array_equal(targets["s_t+1"], states[:, 1:])
    np.testing.assert_array_equal(targets["s_t-1"][:, 1:], states[:, :-2])
    np.testing.assert_array_equal(targets["s_t-1"][:, 0], 0.0)
    np.testing.assert_array_equal(targets["control"], states[::-1, :-1])


def test_lags_in_constructed_tokens():
    """Tokens (0, s_t, s_t, s_{t-1}) hold lags 0 and 1 exactly, and lag 2 not (W* differs per sequence)."""
    task, n, lags = lds_task(), 2048, range(4)
    states = task.states(jax.random.key(3), 2 * n)
    res = task.batch(states).tokens[:, None]  # the residual stream before the first layer
    targets = {k: probing.lagged(states, k) for k in lags}
    scores = jax.jit(probing.probe_grid)(
        res[:n], {k: v[:n] for k, v in targets.items()}, res[n:], {k: v[n:] for k, v in targets.items()}
    )
    r2 = np.array([np.nanmean(scores[k].r2[0]) for k in lags])
    assert r2[0] == pytest.approx(1.0, abs=1e-4) and r2[1] == pytest.approx(1.0, abs=1e-4)
    assert r2[2] < 0.5 and r2[3] < 0.5
    assert np.isnan(scores[2].r2[0, :2]).all() and np.isfinite(scores[2].r2[0, 2:]).all()  # s_{t-2} = 0 for t <= 2
    assert probing.readable(r2) == [0, 1]
    assert probing.first_layer_finding(r2, r2).startswith("the pair (s_t, s_{t-1}) is in the tokens from the start")
    built = probing.first_layer_finding(np.array([1.0, 0.1, 0.0]), np.array([1.0, 0.95, 0.92]))
    assert built.startswith("the first layer builds the pair") and "adds lag(s) [2]" in built


@pytest.mark.parametrize("name", ["probes", "first_layer"])
def test_analyze_cli_writes_every_promised_file(tiny_lds_run, name):
    result = CliRunner().invoke(cli.app, ["analyze", str(tiny_lds_run.run_dir), name])
    assert result.exit_code == 0, result.output
    for file in analyses.REGISTRY[name].files:
        assert (tiny_lds_run.run_dir / file).stat().st_size > 0, file
    summary = runs.load_summary(tiny_lds_run.run_dir)["analyses"][name]
    if name == "probes":
        assert list(summary["targets"]) == ["s_t", "s_t-1", "s_t+1", "preconditioned", "control"]
        r2 = summary["r2_by_layer"]
        assert len(r2["s_t"]["per_seed"]) == 2 and len(r2["s_t"]["mean"]) == 3  # embedding, 2 layers
        assert r2["s_t"]["mean"][0] == pytest.approx(1.0, abs=1e-3)  # in the token itself
        assert max(r2["control"]["mean"]) < 0.05
        full = json.loads((tiny_lds_run.run_dir / "analyses/probes/probes.json").read_text())
        assert np.array(full["r2"]["s_t-1"]["per_seed"], dtype=float).shape == (2, 3, 10)
        assert len(pd.read_csv(tiny_lds_run.run_dir / "analyses/probes/probes.csv")) == 5 * 2 * 3 * 10
    else:
        assert summary["lags"] == [0, 1, 2, 3] and summary["readable_before"] == [0, 1]
        assert summary["finding"].startswith("the pair (s_t, s_{t-1}) is in the tokens from the start")
        assert len(pd.read_csv(tiny_lds_run.run_dir / "analyses/first_layer/first_layer.csv")) == 2 * 2 * 4


def test_probe_analyses_refuse_other_tasks_and_too_many_lags():
    for name in ("probes", "first_layer"):
        result = CliRunner().invoke(cli.app, ["train", f"analyses=[{name}]"])
        assert result.exit_code == 2
        assert result.output.strip() == f"error: analyses: got '{name}'; allowed: {name} only with task=lds"
    cfg = config.load_config([*LDS, "eval.probe_lags=10", "analyses=[first_layer]"])
    with pytest.raises(config.ConfigError, match=r"^eval.probe_lags: got 10; allowed: an integer in \[1, "):
        analyses.check(cfg)
    with pytest.raises(config.ConfigError, match=r"^eval\.probe_tasks: got 1; allowed: an integer >= 2$"):
        config.load_config(["eval.probe_tasks=1"])

"""`icl-gd explain` on sequence models (task=lds, docs/science.md section 8): on a model that is K GD
steps with a known eta the GD family must win, with its eta recovered, in every position band."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from icl_gd import analyses, cli, explain, references, tasks
from icl_gd.references import lds

D, T, STEPS, SEQUENCES, ITERS = 3, 12, 2, 256, 20
TASK = tasks.lds.LinearDynamics(state_dim=D, length=T)


def gd_model(eta, tokens_BxTxW: jax.Array) -> jax.Array:
    """A model that runs `STEPS` GD steps with step `eta`, read from constructed tokens
    `(0, s_t, s_t, s_{t-1})`: `[B, K, T, D]`."""
    states = tokens_BxTxW[..., D : 2 * D]
    states_Tp1 = jnp.concatenate([states, jnp.zeros_like(states[:, :1])], 1)  # s_{T+1} is never seen
    family = explain.SequenceFamily("gd", STEPS, TASK.ridge_lambda)
    return jax.vmap(lambda s: family.predict(jnp.atleast_1d(eta), s))(states_Tp1)


def test_gd_model_is_explained_by_gd_with_eta_recovered():
    etas = jnp.array([0.05, 0.08])
    report = explain.explain_sequences(
        gd_model, etas, TASK, jax.random.key(0), steps=STEPS, n_tasks=SEQUENCES, iters=ITERS
    )
    assert json.loads(json.dumps(report)) == report
    assert set(report["bands"]) == {"1-5", "6-12"} and report["bands"]["6-12"]["positions"] == [6, 12]
    for band in (report, *report["bands"].values()):
        rank = band["ranking"]
        assert rank["winner"] == "gd" and rank["wins"] == 2 and band["explains"], band["verdict"]
        gd = band["families"]["gd"]
        np.testing.assert_allclose(np.array(gd["params"])[:, 0], etas, rtol=1e-3)
        assert gd["heldout"]["r2"]["mean"] > 1 - 1e-6 and gd["states_x2"]["r2"]["mean"] > 1 - 1e-5
        # Families with as many parameters cannot follow it; those that contain GD pay for their extra ones.
        assert min(rank["delta"]["newton_schulz"]["mean"], rank["delta"]["ridge"]["mean"]) > 10
        assert rank["delta"]["richardson"]["mean"] == pytest.approx(np.log(SEQUENCES), rel=0.05)
    assert len(report["families"]["gd"]["per_layer"]["r2"]) == STEPS


def test_sequence_families_are_the_references():
    """A family's predictions on one sequence are the lds references' with the same scalars, and the
    spectral path that fits and scores the families gives them too."""
    states = TASK.states(jax.random.key(1), 4)
    fams, omitted = explain.sequence_families(STEPS, TASK.ridge_lambda)
    assert not omitted and {f.name for f in fams} >= {"gd", "gd_per_step", "ridge", "ridge_online"}
    theta = {"gd": [0.1], "gd_per_step": [0.1, 0.05], "ridge": [np.log(0.3)], "ridge_online": []}
    refs = references.REGISTRY["lds"]
    expected = {
        "gd": lambda s: refs["gd"].predict(TASK, lds.SolverParams(jnp.array([0.1]), STEPS), s[:-1], s),
        "ridge": lambda s: lds.ridge_online_predict(TASK, 0.3, s[:-1], s),
        "ridge_online": lambda s: lds.ridge_online_predict(TASK, TASK.ridge_lambda, s[:-1], s),
    }
    spec = lds.spectra(states)
    for family in fams:
        if family.name not in theta:
            continue
        th = jnp.asarray(theta[family.name], jnp.float32)
        direct = jax.vmap(lambda s: family.predict(th, s))(states)
        # Not at the task's lambda = 1e-3: early A_t are singular, and ridge amplifies float32 errors 1000-fold.
        if family.name != "ridge_online":
            np.testing.assert_allclose(lds.spectral_readouts(family.solve(th), spec), direct, rtol=1e-4, atol=1e-5)
        if family.name in expected:
            reference = jax.vmap(expected[family.name])(states)
            np.testing.assert_allclose(direct, jnp.broadcast_to(reference, direct.shape), rtol=1e-4, atol=1e-5)
    assert set(explain.sequence_families(1, TASK.ridge_lambda)[1]) == {"gd_per_step", "richardson", "chebyshev"}


def test_position_bands():
    assert explain.position_bands(50) == {"1-5": (1, 5), "6-15": (6, 15), "16-50": (16, 50)}
    assert explain.position_bands(12) == {"1-5": (1, 5), "6-12": (6, 12)}
    assert explain.position_bands(5) == {}


def test_cli_explain_on_an_lds_run_and_bad_input(tiny_lds_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "explained"
    args = ["explain", str(tiny_lds_run.run_dir), "--seed-all", "--tasks", "64", "--iters", "10", "--out", str(out)]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / analyses.EXPLAIN_FILE).read_text())
    assert report["task"] == "lds" and report["seeds"] == 2 and report["ranking"]["winner"] in report["families"]
    assert set(report["bands"]) == {"1-5", "6-10"} and len(report["families"]["gd"]["per_layer"]["r2"]) == 2
    for name in ("ranking.png", "ranking.pdf", "bands.png", "bands.pdf"):
        assert (out / name).stat().st_size > 0, name
    assert "BIC" in result.output
    for bad, field in ((["--tasks", "10"], "--tasks"), (["--seed", "5"], "--seed")):
        target = tmp_path / f"bad{field}"
        result = runner.invoke(cli.app, ["explain", str(tiny_lds_run.run_dir), "--out", str(target), *bad])
        assert result.exit_code == 2 and f"error: {field}:" in result.output and not target.exists()
        assert len(result.output.strip().splitlines()) == 1

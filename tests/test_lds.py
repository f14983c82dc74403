"""The linear-dynamical-system task (docs/science.md section 8) and its references, end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from icl_gd import config, experiment, references, runs, tasks
from icl_gd.cli import app
from icl_gd.references import lds as lds_refs

SMALL = ["task=lds", "task.length=12", "task.state_dim=3", "eval.n_tasks=300", "eval.line_search_tasks=2000"]


def make(*overrides: str) -> tasks.lds.LinearDynamics:
    return tasks.from_config(config.load_config(["task=lds", *overrides]).task)


@pytest.mark.parametrize("variant", ["full", "fixed", "contracting", "partial"])
def test_sequences_follow_their_dynamics(variant):
    task = make(f"task.variant={variant}", "task.length=20", "task.noise_std=0", "task.obs_noise_std=0")
    states = task.states(jax.random.key(0), 64)
    assert states.shape == (64, 21, task.state_dim) and bool(jnp.all(jnp.isfinite(states)))
    # Noiseless: each sequence is linear in its hidden state, so s_{t+1} is an exact linear function of
    # the last few states; for full / fixed / contracting of s_t alone.
    if variant != "partial":
        x, y = states[:, :-1], states[:, 1:]
        w = jax.vmap(lambda x, y: jnp.linalg.lstsq(x, y)[0])(x, y)
        np.testing.assert_allclose(jnp.einsum("btd,bde->bte", x, w), y, atol=1e-4)
    if variant == "fixed":
        w0 = jnp.linalg.lstsq(states[0, :-1], states[0, 1:])[0]
        w1 = jnp.linalg.lstsq(states[1, :-1], states[1, 1:])[0]
        np.testing.assert_allclose(w0, w1, atol=1e-4)


def test_orthogonal_transitions_and_the_zero_predictor():
    task = make()
    w = task.transitions(jax.random.key(1), 8)
    np.testing.assert_allclose(jnp.einsum("bij,bkj->bik", w, w), jnp.broadcast_to(jnp.eye(10), (8, 10, 10)), atol=1e-5)
    lam = jnp.linalg.eigvalsh(make("task.variant=contracting").transitions(jax.random.key(2), 8))
    assert float(lam.min()) >= 0.3 - 1e-5 and float(lam.max()) == pytest.approx(0.9, abs=1e-5)
    # The zero predictor scores D/6 at t = 1 (docs/science.md section 8).
    batch = task.sample(jax.random.key(3), 20_000)
    assert float(0.5 * jnp.mean(jnp.sum(batch.targets[:, 0] ** 2, -1))) == pytest.approx(task.zero_loss(), rel=0.02)


def test_constructed_tokens():
    task = make("task.length=5", "task.state_dim=2")
    batch = task.sample(jax.random.key(0), 3)
    s = batch.context
    t = 3  # 0-based position
    np.testing.assert_array_equal(
        batch.tokens[:, t], jnp.concatenate([jnp.zeros((3, 2)), s[:, t], s[:, t], s[:, t - 1]], -1)
    )
    np.testing.assert_array_equal(batch.tokens[:, 0, 6:], 0.0)  # s_0 = 0
    np.testing.assert_array_equal(batch.targets, s[:, 1:])


def test_online_ridge_equals_a_batch_solve_on_every_prefix():
    task = make("task.length=15", "task.state_dim=4")
    states = task.states(jax.random.key(4), 3)
    lam = 0.05
    preds = jax.vmap(lambda s: lds_refs.ridge_online_predict(task, lam, s[:-1], s))(states)[:, 0]
    for b in range(3):
        s = np.asarray(states[b], np.float64)
        for t in range(15):  # 0-based position t: pairs (s_i, s_{i+1}) with i < t
            x, y = s[:t], s[1 : t + 1]
            w = np.linalg.solve(x.T @ x + lam * np.eye(4), x.T @ y).T
            np.testing.assert_allclose(preds[b, t], w @ s[t], rtol=2e-3, atol=2e-5)


def test_gd_reference_is_one_gd_step_and_its_eta_the_best():
    task = make("task.length=10", "task.state_dim=3")
    states = task.states(jax.random.key(5), 2000)
    eta = float(lds_refs.one_step_eta(states))
    gd = references.REGISTRY["lds"]["gd"]

    def predict(e):
        return jax.vmap(lambda st: gd.predict(task, lds_refs.SolverParams(jnp.array([e]), 1), st[:-1], st)[0])(states)

    s = np.asarray(states[0], np.float64)
    preds = np.asarray(predict(eta)[0])
    for t in range(10):
        w = eta * sum((np.outer(s[i + 1], s[i]) for i in range(t)), np.zeros((3, 3)))  # one GD step from W = 0
        np.testing.assert_allclose(preds[t], w @ s[t], rtol=1e-4, atol=1e-5)

    def loss(e):
        return float(0.5 * jnp.mean(jnp.sum((predict(e) - states[:, 1:]) ** 2, -1)))

    assert loss(eta) < min(loss(0.9 * eta), loss(1.1 * eta))


def test_baselines_cli_reports_each_reference_by_position(tmp_path):
    path = tmp_path / "lds.json"
    result = CliRunner().invoke(app, ["baselines", *SMALL, "--json", str(path)])
    assert result.exit_code == 0, result.output
    refs = json.loads(path.read_text())["references"]
    assert set(refs) == {"gd", "ridge_online", "richardson", "newton_schulz", "chebyshev"} and refs["gd"]["eta"] > 0
    for entry in refs.values():
        assert len(entry["loss_by_position"]) == 12
        assert entry["loss"] == pytest.approx(np.mean(entry["loss_by_position"]), rel=1e-5)
        assert entry["loss_by_position"][0] == pytest.approx(3 / 6, rel=0.15)  # nothing seen yet: zero prediction
    assert refs["ridge_online"]["loss_by_position"][-1] < 0.01 < refs["gd"]["loss_by_position"][-1]
    assert "ridge_online" in result.output and "t=12" in result.output


def test_train_lds_end_to_end(tmp_path):
    cfg = config.load_config(
        [
            *SMALL,
            "model.layers=2",
            "train.steps=60",
            "train.eval_every=30",
            "train.batch_size=64",
            "train.seeds=2",
            "train.lr=3e-3",
        ]
    )
    trained = experiment.train(cfg, tmp_path / "lds", quiet=True)
    summary = trained.summary
    assert summary["status"] == "completed"
    final = summary["final"]
    others = ("ridge_online", "richardson", "newton_schulz", "chebyshev")
    aligned = ("preds_diff", "model_cos", "model_diff") if trained.task.sequence_sensitivities else ("preds_diff",)
    assert set(final) == {
        "loss",
        "gd_loss",
        *aligned,
        *(f"{name}_loss" for name in others),
        *(f"{metric}_{name}" for metric in aligned for name in others),
        "loss_by_position",
    }
    by_position = final["loss_by_position"]
    assert len(by_position["mean"]) == 12 and len(by_position["per_seed"]) == 2
    assert final["loss"]["mean"] == pytest.approx(np.mean(by_position["mean"]), rel=1e-5)
    assert final["loss"]["mean"] < 0.5  # below the zero predictor (D/6 = 0.5 at every position)
    for name in ("curves", "per_layer", "loss_by_position"):
        assert (trained.run_dir / "plots" / f"{name}.png").is_file() and (
            trained.run_dir / "plots" / f"{name}.pdf"
        ).is_file()
    df = runs.load_metrics(trained.run_dir)
    assert {"layer1_loss", "layer2_loss", "ridge_online_loss", "layer2_chebyshev_loss"} <= set(df.columns)
    assert runs.load(trained.run_dir).params is not None
    refs = summary["references"]
    assert refs["ridge_online"]["lambda"] == pytest.approx(1e-3)
    assert refs["gd"]["loss"] == pytest.approx(final["gd_loss"]["mean"], rel=1e-6)
    assert references.for_task(trained.task)[0].name == "gd"

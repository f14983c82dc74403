"""The command line, as a researcher uses it."""

import json

import pytest
from typer.testing import CliRunner

from icl_gd import runs
from icl_gd.cli import app
from tests.conftest import SMALL_EVAL

runner = CliRunner()
TINY = ["task.dim=3", "task.n_context=5", "train.steps=40", "train.eval_every=20", "train.batch_size=64", *SMALL_EVAL]


def test_train_writes_a_run_and_refuses_to_overwrite_it(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *TINY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "model_cos" in result.output and runs.load_summary(out)["status"] == "completed"
    again = runner.invoke(app, ["train", *TINY, "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


@pytest.mark.parametrize(
    "override,field",
    [
        ("task.n_context=0", "task.n_context"),
        ("experiment=nope", "experiment"),
        ("train.nope=3", "train.nope"),
        ("train.lr=-0.1", "train.lr"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, override, field):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", override, "--out", str(out)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}")
    assert not out.exists()


def test_diverging_run_exits_nonzero(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", *TINY, "train.steps=200", "train.lr=1e6", "train.clip_norm=1e6", "--out", str(out)]
    )
    assert result.exit_code == 1 and "diverged" in result.output
    assert runs.load_summary(out)["status"] == "failed"


def test_baselines_prints_and_writes_json(tmp_path):
    path = tmp_path / "refs.json"
    result = runner.invoke(app, ["baselines", "task.dim=5", "task.n_context=20", *SMALL_EVAL, "--json", str(path)])
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())["references"]
    assert data["gd_closed_form"]["eta"] == pytest.approx(data["gd"]["eta"], rel=0.05)
    assert data["ols"]["loss"] < 1e-6 < data["gd"]["loss"]
    assert "OLS" in result.output and "closed form" in result.output
    again = runner.invoke(app, ["baselines", "--json", str(path)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_compare_overlays_runs(tmp_path, tiny_run):
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(tiny_run.run_dir), str(tiny_run.run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "compare.png").is_file() and (out / "compare.pdf").is_file() and (out / "compare.csv").is_file()
    assert "model_cos" in result.output
    missing = runner.invoke(app, ["compare", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not a run directory" in missing.output


def test_multirun_sweeps_with_hydra(tmp_path):
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["train", "-m", *TINY, "train.seed=0,1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    losses = [runs.load_summary(out / str(job))["final"]["loss"]["mean"] for job in (0, 1)]
    assert losses[0] != losses[1]
    bad = runner.invoke(app, ["train", "-m", "task.dim=2,0", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "task.dim" in bad.output and not (tmp_path / "bad").exists()

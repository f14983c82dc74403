"""Runs survive interruptions: SIGINT / SIGTERM save the run and mark it `interrupted`, and
`--resume` continues it to the same metrics as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from icl_gd import experiment, progress, runs
from icl_gd.cli import app
from icl_gd.config import load_config
from tests.conftest import SMALL_EVAL

RUN = [
    "task.dim=3",
    "task.n_context=5",
    "train.steps=160",
    "train.eval_every=20",
    "train.checkpoint_every=2",
    "train.batch_size=64",
    "train.seeds=2",
    "train.lr=3e-3",
    *SMALL_EVAL,
]


def interrupt_at(monkeypatch, step: int, signum: int = signal.SIGTERM):
    """Send `signum` to this process once the progress bar reports `step` (as SLURM would, any time)."""
    update = progress.TrainProgress.update

    def update_then_signal(self, done, loss):
        update(self, done, loss)
        if done >= step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(progress.TrainProgress, "update", update_then_signal)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return experiment.train(load_config(RUN), tmp_path_factory.mktemp("runs") / "whole", quiet=True)


def test_sigterm_marks_interrupted_and_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, uninterrupted):
    run_dir = tmp_path / "cut"
    interrupt_at(monkeypatch, 60)
    with pytest.raises(experiment.TrainingInterrupted) as stopped:
        experiment.train(load_config(RUN), run_dir, quiet=True)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    summary = runs.load_summary(run_dir)
    assert summary["status"] == "interrupted" and summary["interruption"]["signal"] == "SIGTERM"
    step = summary["interruption"]["step"]
    assert 60 <= step < 160 and runs.Checkpoints(run_dir).latest_step() == step
    assert runs.load_metrics(run_dir)["step"].max() == step
    monkeypatch.undo()

    resumed = experiment.resume(run_dir, quiet=True)
    assert resumed.summary["status"] == "completed" and resumed.summary["resumed_at"] == [step]
    got, want = runs.load_metrics(run_dir), runs.load_metrics(uninterrupted.run_dir)
    assert list(got["step"]) == list(want["step"])  # no row lost or repeated
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-6)
    for name, stats in uninterrupted.summary["final"].items():
        assert resumed.summary["final"][name]["per_seed"] == pytest.approx(stats["per_seed"], rel=1e-6)


def test_resume_after_a_kill_between_checkpoints(tmp_path, monkeypatch, uninterrupted):
    """A run killed without a chance to save (SIGKILL, a node failure) resumes from its last
    checkpoint, dropping the metrics rows recorded after it."""
    run_dir = tmp_path / "killed"
    interrupt_at(monkeypatch, 100, signal.SIGINT)
    with pytest.raises(experiment.TrainingInterrupted):
        experiment.train(load_config(RUN), run_dir, quiet=True)
    monkeypatch.undo()
    summary = runs.load_summary(run_dir)
    last = summary["interruption"]["step"]
    # Make it look killed: status still running, rows past an earlier checkpoint, no final save.
    checkpoints = runs.Checkpoints(run_dir)
    earlier = [s for s in checkpoints._manager.all_steps() if s < last]
    checkpoints._manager.delete(last)
    checkpoints.close()
    summary["status"] = "running"
    runs.write_json(run_dir / runs.SUMMARY_FILE, summary)
    resumed = experiment.resume(run_dir, quiet=True)
    assert resumed.summary["resumed_at"] == [max(earlier)]
    pd.testing.assert_frame_equal(
        runs.load_metrics(run_dir), runs.load_metrics(uninterrupted.run_dir), check_exact=False, rtol=1e-6
    )


def test_a_real_sigterm_from_outside(tmp_path):
    """The CLI in its own process, stopped by SIGTERM as a scheduler would: exit 143, run marked
    interrupted; `icl-gd train --resume` then completes it."""
    run_dir = tmp_path / "preempted"
    args = [
        sys.executable,
        "-m",
        "icl_gd",
        "train",
        *RUN,
        "train.steps=100000",
        "train.progress=false",
        "--out",
        str(run_dir),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / runs.METRICS_FILE
        if metrics.exists() and len(metrics.read_text().splitlines()) > 1 + 2 * 3:  # 3 evaluations of 2 seeds
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "interrupted" in out and "--resume" in out
    summary = runs.load_summary(run_dir)
    assert summary["status"] == "interrupted"
    # Finish it quickly: the resumed run continues to the configured train.steps of its config.yaml.
    (run_dir / runs.CONFIG_FILE).write_text(
        (run_dir / runs.CONFIG_FILE)
        .read_text()
        .replace("steps: 100000", f"steps: {summary['interruption']['step'] + 40}")
    )
    result = CliRunner().invoke(app, ["train", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert runs.load_summary(run_dir)["status"] == "completed"
    steps = runs.load_metrics(run_dir)["step"]
    assert steps.is_monotonic_increasing and (steps.value_counts() == 2).all()  # one row per seed and evaluation
    assert steps.max() == summary["interruption"]["step"] + 40


@pytest.mark.parametrize("case", ["completed", "failed", "corrupt", "missing", "with overrides"])
def test_resume_refuses_what_it_cannot_continue(tmp_path, tiny_run, case):
    run_dir = tiny_run.run_dir
    if case == "failed":
        run_dir = tmp_path / "failed"
        result = CliRunner().invoke(app, ["train", *RUN, "train.lr=1e6", "train.clip_norm=1e6", "--out", str(run_dir)])
        assert result.exit_code == 1
    elif case == "corrupt":
        run_dir = tmp_path / "corrupt"
        run_dir.mkdir()
        (run_dir / runs.CONFIG_FILE).write_text("task: [unclosed")
        (run_dir / runs.SUMMARY_FILE).write_text(json.dumps({"status": "interrupted"}))
    elif case == "missing":
        run_dir = tmp_path / "nothing"
    before = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else None
    extra = ["train.steps=10"] if case == "with overrides" else []
    result = CliRunner().invoke(app, ["train", *extra, "--resume", str(run_dir)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --resume:"), result.output
    expected = {
        "completed": "completed run",
        "failed": "failed run",
        "corrupt": "cannot be read",
        "missing": "not a run directory",
        "with overrides": "alone",
    }[case]
    assert expected in lines[0]
    assert (sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else None) == before

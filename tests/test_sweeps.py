"""Sweeps as a lab runs them: the launcher checked before any job, `sweep.json`, submitit's local
executor end to end, preemption (save, requeue, resume) and relaunching an interrupted sweep."""

import json
import os
import signal

import jax
import pytest
from typer.testing import CliRunner

from icl_gd import config, progress, runs, sweeps
from icl_gd.cli import app

runner = CliRunner()
TINY = [
    "task.dim=2",
    "train.steps=4",
    "train.eval_every=2",
    "train.batch_size=16",
    "train.seeds=2",
    "eval.n_tasks=100",
    "eval.line_search_tasks=500",
    "eval.gdpp_steps=5",
    "train.progress=false",
]


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["launcher=nope"], "launcher"),
        (["hydra/launcher=nope"], "hydra/launcher"),
        (["launcher=joblib", "launcher.n_jobs=0"], "launcher.n_jobs"),
        (["launcher=joblib", "launcher.foo=1"], "launcher.foo"),
        (["launcher=submitit_local", "hydra.launcher.timeout_min=-5"], "launcher.timeout_min"),
        (["launcher=submitit_local", "launcher.tasks_per_node=2"], "launcher.tasks_per_node"),
        (["hydra/launcher=submitit_slurm", "launcher.partition=[a,b]"], "launcher.partition"),
        (["launcher=slurm", "launcher.timeout_min=abc"], "launcher.timeout_min"),
        (["launcher=slurm"], "launcher"),  # no sbatch here
        (["launcher=joblib", "hydra/launcher=submitit_local"], "hydra/launcher"),
    ],
)
def test_bad_launcher_settings_fail_before_any_job(tmp_path, monkeypatch, overrides, field):
    monkeypatch.setattr(sweeps.shutil, "which", lambda name: None)  # a SLURM host would submit the last cases
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["train", "-m", "task.n_context=4,8", *overrides, "--out", str(out)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {field}:") and "allowed: " in lines[0]
    assert not out.exists()


def test_launcher_keys_by_either_name():
    joblib = sweeps.plan(["model.layers=1,2", "launcher=joblib", "launcher.n_jobs=2"])
    assert joblib.launcher == "joblib" and joblib.settings["n_jobs"] == 2
    assert joblib.job_overrides == ["model.layers=1,2"]
    local = sweeps.plan(["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=7"])
    assert local.launcher == "submitit_local" and local.settings["timeout_min"] == 7
    assert sweeps.plan([]).launcher == "local"


def test_submitit_sweep_writes_its_index_and_compare_aggregates_it(tmp_path, monkeypatch):
    # submitit configures logging when imported (closing every handler, pytest's too) unless told not to.
    monkeypatch.setenv("SUBMITIT_LOG_LEVEL", "NOCONFIG")
    # The jobs are processes of their own: they share the tests' compilation cache (tests/conftest.py).
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir or "")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    sweep = tmp_path / "sweep"
    result = runner.invoke(
        app, ["train", "-m", *TINY, "task.n_context=4,8", "launcher=submitit_local", "--out", str(sweep)]
    )
    assert result.exit_code == 0, result.output
    index = json.loads((sweep / sweeps.SWEEP_FILE).read_text())
    assert index["swept"] == {"task.n_context": [4, 8]} and index["launcher"]["name"] == "submitit_local"
    assert [p["status"] for p in index["points"]] == ["completed", "completed"]
    for point in index["points"]:  # each point's parameters are those of the run in its directory
        assert runs.load_config(sweep / point["dir"]).task.n_context == point["params"]["task.n_context"]

    out = tmp_path / "cmp"
    bad = runner.invoke(app, ["compare", str(sweep), "--x", "model.layers", "--out", str(out)])
    assert bad.exit_code == 2 and "error: --x: got 'model.layers'; allowed: task.n_context" in bad.output
    assert not out.exists()
    # The sweep and one of its points again, alone: two runs of the point n_context = 4.
    result = runner.invoke(app, ["compare", str(sweep), str(sweep / "0"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    compared = json.loads((out / "compare.json").read_text())
    assert compared["parameters"] == ["task.n_context"] and [i["kind"] for i in compared["inputs"]] == ["sweep", "run"]
    four, eight = compared["groups"]
    assert four["point"] == {"task.n_context": 4} and len(four["runs"]) == 2 and len(eight["runs"]) == 1
    own = runs.load_summary(sweep / "1")
    assert eight["final"]["loss"]["mean"] == pytest.approx(own["final"]["loss"]["mean"])
    assert eight["final"]["loss"]["ci95"] == pytest.approx(own["final"]["loss"]["ci95"])  # one run: its own interval
    assert len(four["final"]["loss"]["per_seed"]) == 4  # 2 runs x 2 seeds
    assert eight["references"]["gd"] == own["references"]["gd"]["loss"] != four["references"]["gd"]
    assert compared["files"]["final_vs_parameter"]["task.n_context"] == [
        "final_vs_task_n_context.png",
        "final_vs_task_n_context.pdf",
    ]
    assert all((out / f).is_file() for f in ("final_vs_task_n_context.png", "groups.csv", "compare.png"))


def interrupt_at(monkeypatch, step: int, signum: int):
    """Send `signum` to this process, once, when training reports `step` (as SLURM or Ctrl-C would)."""
    update, sent = progress.TrainProgress.update, []

    def update_then_signal(self, done, loss):
        update(self, done, loss)
        if done >= step and not sent:
            sent.append(done)
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(progress.TrainProgress, "update", update_then_signal)


def test_interrupted_sweep_resumes_and_completed_points_are_not_rerun(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    first = [*TINY, "train.steps=8"]
    # Ctrl-C during the second point: the first reports 4 evaluations, the second then its first.
    update, calls = progress.TrainProgress.update, []

    def second_point_interrupted(self, step, loss):
        update(self, step, loss)
        calls.append(step)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(progress.TrainProgress, "update", second_point_interrupted)
    # Points of the same shapes (a swept learning rate, n_context as the submitit sweep's first
    # point): their programs compile once.
    cut = runner.invoke(app, ["train", "-m", *first, "task.n_context=4", "train.lr=1e-3,2e-3", "--out", str(sweep)])
    monkeypatch.undo()
    assert cut.exit_code == 130 and f"icl-gd train --resume {sweep}" in cut.output, cut.output
    assert [p["status"] for p in sweeps.load_index(sweep)["points"]] == ["completed", "interrupted"]
    step = runs.load_summary(sweep / "1")["interruption"]["step"]
    kept = {f: (sweep / "0" / f).read_bytes() for f in (runs.SUMMARY_FILE, runs.METRICS_FILE)}

    resumed = runner.invoke(app, ["train", "--resume", str(sweep)])
    assert resumed.exit_code == 0, resumed.output
    assert "completed before; not re-run" in resumed.output
    assert {f: (sweep / "0" / f).read_bytes() for f in kept} == kept
    summary = runs.load_summary(sweep / "1")
    assert 0 < step < 8 and summary["status"] == "completed" and summary["resumed_at"] == [step]
    assert json.loads((sweep / sweeps.SWEEP_FILE).read_text())["points"][1]["status"] == "completed"
    assert list(runs.load_metrics(sweep / "1")["step"]) == [0, 0, 2, 2, 4, 4, 6, 6, 8, 8]  # 2 seeds: no row lost


def test_preempted_point_saves_then_requeues_and_the_requeued_job_resumes(tmp_path, monkeypatch):
    """Inside a submitit job, USR2 (preemption / time limit) saves the run before submitit requeues."""
    requeued = []

    def submitit_requeue(signum, frame):  # what submitit's handler does: dump, requeue, exit
        requeued.append(signum)
        raise SystemExit(144)

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    previous = signal.signal(signal.SIGUSR2, submitit_requeue)
    try:
        cfg, run_dir = config.load_config([*TINY, "task.n_context=4", "train.steps=8"]), tmp_path / "point"
        interrupt_at(monkeypatch, 2, signal.SIGUSR2)
        with pytest.raises(SystemExit) as exited, sweeps.requeue_on_preemption():
            sweeps.run_point(cfg, run_dir)
        assert exited.value.code == 144 and requeued == [signal.SIGUSR2]
        summary = runs.load_summary(run_dir)
        step = summary["interruption"]["step"]
        assert summary["status"] == "interrupted" and summary["interruption"]["signal"] == "SIGTERM" and step < 8
        with runs.Checkpoints(run_dir) as checkpoints:
            assert checkpoints.latest_step() == step

        with sweeps.requeue_on_preemption():  # the requeued job
            resumed = sweeps.run_point(cfg, run_dir)
            assert resumed is not None and resumed.summary["resumed_at"] == [step]
            assert sweeps.run_point(cfg, run_dir) is None  # completed: not re-run
        assert signal.getsignal(signal.SIGUSR2) is submitit_requeue
        with pytest.raises(SystemExit), sweeps.requeue_on_preemption():  # outside training: requeued at once
            signal.raise_signal(signal.SIGUSR2)
        assert requeued == [signal.SIGUSR2] * 2
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_stopping_sweep_starts_no_point(tmp_path):
    """Ctrl-C during a joblib sweep marks it stopping: a point a worker picks up then is left pending."""
    (tmp_path / sweeps.STOP_FILE).touch()
    assert sweeps.run_point(config.load_config(TINY), tmp_path / "0") is None
    assert sweeps.point_status(tmp_path / "0") == sweeps.PENDING and not (tmp_path / "0").exists()

"""Live logs: `logger=tensorboard` writes TensorBoard event files whose scalars are `metrics.csv`'s,
live at every evaluation and continued by `--resume`; the default writes none."""

import signal
import struct
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c
from typer.testing import CliRunner

from icl_gd import config, experiment, loggers, runs
from icl_gd.cli import app
from tests.conftest import SMALL_EVAL
from tests.test_resume import interrupt_at

EVENT_PB2: Any = (
    event_pb2  # TensorBoard's record format; protobuf builds its classes at import, unseen by type checkers
)
# The shapes and settings of tests/test_resume.py's runs: their compiled programs serve this one.
RUN = [
    "task.dim=3",
    "task.n_context=5",
    "train.steps=80",
    "train.eval_every=20",
    "train.checkpoint_every=1",
    "train.batch_size=64",
    "train.seeds=2",
    "train.lr=3e-3",
    *SMALL_EVAL,
    "logger=tensorboard",
]


def _records(file: Path) -> list[bytes]:
    """The records of a TFRecord file (`u64 length, u32 masked crc32c of it, data, u32 masked
    crc32c of the data`, little-endian), each checksum checked."""
    raw, out, at = file.read_bytes(), [], 0
    while at < len(raw):
        header = raw[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        data = raw[at + 12 : at + 12 + length]
        (header_crc,), (data_crc,) = (
            struct.unpack("<I", raw[at + 8 : at + 12]),
            struct.unpack("<I", raw[at + 12 + length : at + 16 + length]),
        )
        assert header_crc == masked_crc32c(header) and data_crc == masked_crc32c(data)
        out.append(data)
        at += 16 + length
    return out


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """`{tag: [(step, value), ...]}` as TensorBoard shows one run folder: its event files in name
    order, a restart marker (`SessionLog.START` at step `s`) hiding what came before at steps >= s."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for file in sorted(folder.glob("events.out.tfevents.*")):
        for record in _records(file):
            event = EVENT_PB2.Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == EVENT_PB2.SessionLog.START:
                scalars = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_scalars_equal_metrics_csv_across_a_resume(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    interrupt_at(monkeypatch, 20, signal.SIGTERM)
    with pytest.raises(experiment.TrainingInterrupted):
        experiment.train(config.load_config(RUN), run_dir, quiet=True)
    monkeypatch.undo()
    stopped = runs.load_summary(run_dir)["interruption"]["step"]
    assert 20 <= stopped < 80
    experiment.resume(run_dir, quiet=True)

    table = runs.load_metrics(run_dir)
    columns = [c for c in table.columns if c not in ("step", "seed")]
    assert sorted(p.name for p in (run_dir / loggers.TENSORBOARD_DIR).iterdir()) == ["seed0", "seed1"]
    for seed in (0, 1):
        folder = run_dir / loggers.TENSORBOARD_DIR / f"seed{seed}"
        assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # the first run's file, the resumed one's
        scalars = read_scalars(folder)
        assert set(scalars) == {f"eval/{c}" for c in columns} | {"train/loss"}
        rows = table[table["seed"] == seed]
        for column in columns:
            steps, values = zip(*scalars[f"eval/{column}"], strict=True)
            assert list(steps) == list(rows["step"]) == [0, 20, 40, 60, 80]  # each once: the restart hid the repeat
            np.testing.assert_array_equal(np.asarray(values, np.float32), np.asarray(rows[column], np.float32))
        train_steps, train_losses = zip(*scalars["train/loss"], strict=True)
        assert list(train_steps) == list(range(80)) and np.isfinite(train_losses).all()


def test_each_evaluation_is_on_disk_before_the_next(tmp_path):
    """Flushed at every evaluation, so that TensorBoard shows a running job."""
    logger = loggers.REGISTRY["tensorboard"](tmp_path, 0)
    losses_SxN = np.array([[1.0, 0.5], [2.0, 1.5]])
    logger.log(0, [{"step": 0, "seed": s, "loss": 3.0 + s} for s in (0, 1)], None)
    logger.log(2, [{"step": 2, "seed": s, "loss": 0.25 + s} for s in (0, 1)], losses_SxN)
    for seed in (0, 1):
        scalars = read_scalars(tmp_path / loggers.TENSORBOARD_DIR / f"seed{seed}")  # not closed yet
        assert scalars == {
            "eval/loss": [(0, 3.0 + seed), (2, 0.25 + seed)],
            "train/loss": [(0, 1.0 + seed), (1, 0.5 + seed)],
        }
    logger.close()


def test_default_logger_writes_only_metrics_csv_and_names_the_devices(tiny_run):
    assert not any("tfevents" in p.name for p in tiny_run.run_dir.rglob("*"))
    assert not (tiny_run.run_dir / loggers.TENSORBOARD_DIR).exists()
    summary = runs.load_summary(tiny_run.run_dir)
    devices = jax.devices()
    assert summary["backend"] == jax.default_backend() and summary["n_devices"] == len(devices)
    assert summary["devices"] == [f"{d.platform}:{d.id} ({d.device_kind})" for d in devices]
    assert summary["device"] == f"{devices[0].platform}:{devices[0].device_kind}"


def test_every_logger_option_has_an_implementation():
    assert {option.name for option in config.Logger} == set(loggers.REGISTRY)


def test_a_bad_logger_fails_in_one_line(tmp_path):
    with pytest.raises(config.ConfigError) as err:
        config.load_config(["logger=wandb"])
    assert str(err.value) == "logger: got 'wandb'; allowed: csv | tensorboard"
    result = CliRunner().invoke(app, ["train", "logger=wandb", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and result.output.strip() == "error: logger: got 'wandb'; allowed: csv | tensorboard"
    assert not (tmp_path / "run").exists()

"""Live logs of a training run besides `metrics.csv`, which `runs.RunDir` always writes: each
evaluation's rows and the training losses of the chunk before it, written as they come so that a
running job can be watched. `REGISTRY` maps `logger=<name>` (`config.Logger`) to a factory
`(run_dir, start) -> Logger`; another destination is one entry there and one in `config.Logger`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TENSORBOARD_DIR = "tensorboard"


class Logger:
    """`logger=csv`: nothing besides `metrics.csv`. Loggers are context managers, closed with the run."""

    def log(self, step: int, rows: list[dict], train_losses: np.ndarray | None) -> None:
        """One evaluation: `metrics.csv`'s `rows` (one per seed) at `step`, and `train_losses[S, n]`,
        the training losses of the `n` steps before it (batches `step - n .. step - 1`), or None."""

    def close(self) -> None:
        """Write out what is pending and release the files."""

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoard(Logger):
    """`logger=tensorboard`: event files in `RUN_DIR/tensorboard/seed<k>/`, one TensorBoard run per
    seed (its UI overlays them), with `eval/<column>` for every metric column of `metrics.csv` at
    the evaluation's step and `train/loss` at each training step `t` (the loss of batch `t`, taken
    at the parameters after `t` updates, as `eval/loss` at `t`). Written in this thread and flushed
    at every evaluation. A resumed run (`start > 0`) writes a new file per seed that opens with a
    restart marker at `start`: TensorBoard hides what earlier files logged at or after `start`,
    as `runs.RunDir.truncate_metrics` drops those rows."""

    def __init__(self, run_dir: Path, start: int):
        # Imported here: tensorboardX imports PyTorch whenever it is installed, a cost for these runs only.
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2, summary_pb2

        self._root, self._start = run_dir / TENSORBOARD_DIR, start
        self._open = EventsWriter
        # TensorBoard's record formats; protobuf builds their classes at import, unseen by type checkers.
        self._events: Any = event_pb2
        self._summaries: Any = summary_pb2
        self._writers: dict[int, EventsWriter] = {}

    def _writer(self, seed: int):
        if seed not in self._writers:
            folder = self._root / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            # The suffix keeps a resumed run's file apart from one opened in the same second.
            writer = self._open(str(folder / "events"), filename_suffix=f".step{self._start}")
            if self._start:
                restart = self._events.SessionLog(status=self._events.SessionLog.START)
                writer.write_event(self._events.Event(wall_time=time.time(), step=self._start, session_log=restart))
            self._writers[seed] = writer
        return self._writers[seed]

    def _scalars(self, wall_time: float, step: int, values: dict[str, float]):
        """An event holding `values` as TensorBoard scalars at `step`."""
        scalars = [self._summaries.Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()]
        return self._events.Event(wall_time=wall_time, step=step, summary=self._summaries.Summary(value=scalars))

    def log(self, step: int, rows: list[dict], train_losses: np.ndarray | None) -> None:
        now = time.time()
        for row in rows:
            seed = int(row["seed"])
            writer = self._writer(seed)
            if train_losses is not None:
                first = step - train_losses.shape[1]
                for t, loss in enumerate(np.asarray(train_losses[seed], dtype=float).tolist(), start=first):
                    writer.write_event(self._scalars(now, t, {"train/loss": loss}))
            values = {f"eval/{name}": float(value) for name, value in row.items() if name not in ("step", "seed")}
            writer.write_event(self._scalars(now, step, values))
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


REGISTRY: dict[str, Callable[[Path, int], Logger]] = {
    "csv": lambda run_dir, start: Logger(),
    "tensorboard": TensorBoard,
}

"""A progress bar for training (steps, steps/s, current loss); silent when not a terminal."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_steps: int, enabled: bool = True, description: str = "training", start: int = 0):
        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>8.1f} steps/s"),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            console=console,
            disable=not (enabled and console.is_terminal),
        )
        self._task = self._progress.add_task(description, total=total_steps, completed=start, rate=0.0, loss="-")
        self._start_step = start
        self._started = 0.0

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, loss: float) -> None:
        """Show `step` steps done and the current training loss (mean over seeds)."""
        rate = (step - self._start_step) / max(time.perf_counter() - self._started, 1e-9)
        self._progress.update(self._task, completed=step, rate=rate, loss=f"{loss:.4f}")

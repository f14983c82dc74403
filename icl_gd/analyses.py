"""Post-training analyses of a finished run directory, by name.

An analysis is a function `run_dir -> dict` that reads the run (`runs.load_params`, its
config and metrics), writes its own files under `run_dir/analyses/<name>/` and returns a
JSON-ready summary, stored in `summary.json` under `analyses.<name>`. Experiments list the
analyses to run after training in `analyses: [...]`; `icl-gd analyze RUN_DIR NAME` runs one
later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

Analysis = Callable[[Path], dict]
REGISTRY: dict[str, Analysis] = {}


def register(name: str) -> Callable[[Analysis], Analysis]:
    def add(fn: Analysis) -> Analysis:
        REGISTRY[name] = fn
        return fn

    return add


def output_dir(run_dir: Path, name: str) -> Path:
    path = Path(run_dir) / "analyses" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(name: str, run_dir: Path) -> dict:
    """Run analysis `name` on `run_dir` and record its result in the run's summary."""
    from icl_gd import runs

    result = REGISTRY[name](Path(run_dir))
    summary = runs.load_summary(run_dir)
    summary.setdefault("analyses", {})[name] = result
    runs.write_json(Path(run_dir) / runs.SUMMARY_FILE, summary)
    return result

"""Run directories: creation (never over an existing one), config, metrics, summary, checkpoints,
resumption, and the one loader (`load`) of a finished run for later analyses.

A run directory holds `config.yaml`, `metrics.csv`, `summary.json`, `plots/` and `checkpoint/`
(Orbax: parameters and optimizer state of every seed, at the checkpoint cadence and at the end).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import jax
import pandas as pd
from flax import nnx
from omegaconf import DictConfig

from icl_gd import config as config_lib
from icl_gd import models, tasks, training

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CHECKPOINT_DIR = "config.yaml", "metrics.csv", "summary.json", "checkpoint"
CHECKPOINTS_KEPT = 2


class RunDirExists(FileExistsError):
    """Refusal to write into a directory that already holds something."""


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (not a run, corrupt, or in the wrong state)."""


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    """`runs/<experiment>/<timestamp>`, with a suffix if two runs start in the same second."""
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path = Path(root) / name / stamp
    suffix = 1
    while path.exists():
        path = Path(root) / name / f"{stamp}_{suffix}"
        suffix += 1
    return path


def check_new(path: Path, allow_empty: bool = False) -> None:
    """Raise RunDirExists unless `path` is absent (or an empty directory, when allowed)."""
    if path.exists() and not (allow_empty and path.is_dir() and not any(path.iterdir())):
        raise RunDirExists(f"--out: {path} already exists; choose a new directory (runs are never overwritten)")


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist"):
        return json_ready(cast(Any, value).tolist())
    return value


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_ready(data), indent=2) + "\n")
    os.replace(tmp, path)


def load_config(run_dir: str | Path) -> DictConfig:
    """A run's resolved config on the current schemas (fields added since then take defaults)."""
    return config_lib.from_yaml((Path(run_dir) / CONFIG_FILE).read_text())


def load_summary(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / METRICS_FILE)


class RunDir:
    """The files of one run; created only once the configuration is known to be valid."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, path: Path, cfg: DictConfig, allow_empty: bool = False) -> RunDir:
        check_new(Path(path), allow_empty)
        run = cls(path)
        (run.path / "plots").mkdir(parents=True, exist_ok=True)
        (run.path / CONFIG_FILE).write_text(config_lib.to_yaml(cfg))
        return run

    @classmethod
    def open_for_resume(cls, path: Path) -> tuple[RunDir, DictConfig, dict, int]:
        """The run, its config, summary and the step of its last checkpoint (0 if it has none);
        raises RunDirError in one line for a run that is completed, failed, or not readable."""
        path = Path(path)
        if not (path / SUMMARY_FILE).is_file() or not (path / CONFIG_FILE).is_file():
            raise RunDirError(f"--resume: {path} is not a run directory (no {SUMMARY_FILE} / {CONFIG_FILE})")
        try:
            summary = load_summary(path)
            cfg = load_config(path)
            config_lib.validate(cfg)
        except (ValueError, OSError) as err:  # json.JSONDecodeError and ConfigError are ValueErrors
            raise RunDirError(f"--resume: {path} cannot be read ({str(err).splitlines()[0]})") from None
        status = summary.get("status")
        if status not in ("interrupted", "running"):
            detail = (
                f" ({summary['failure']['reason']} at step {summary['failure']['step']})"
                if "failure" in summary
                else ""
            )
            raise RunDirError(f"--resume: {path} is a {status} run{detail}; allowed: an interrupted run")
        try:
            with Checkpoints(path) as checkpoints:
                step = checkpoints.latest_step() or 0
        except Exception as err:
            raise RunDirError(
                f"--resume: {path}/{CHECKPOINT_DIR} cannot be read ({str(err).splitlines()[0]})"
            ) from None
        return cls(path), cfg, summary, step

    def append_metrics(self, rows: list[dict]) -> None:
        file = self.path / METRICS_FILE
        pd.DataFrame(rows).to_csv(file, mode="a", header=not file.exists(), index=False)

    def truncate_metrics(self, step: int) -> None:
        """Drop the rows of evaluations at or after `step` (recorded past the checkpoint resumed from)."""
        file = self.path / METRICS_FILE
        if file.exists():
            df = pd.read_csv(file)
            tmp = file.with_suffix(".csv.tmp")
            df[df["step"] < step].to_csv(tmp, index=False)
            os.replace(tmp, file)

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / SUMMARY_FILE, summary)


def _quiet_orbax() -> None:
    logging.getLogger("absl").setLevel(logging.WARNING)


class Checkpoints:
    """Parameters and optimizer state of every seed (leading seed axis) in `RUN_DIR/checkpoint`,
    with Orbax; the last `CHECKPOINTS_KEPT` steps are kept."""

    def __init__(self, run_dir: Path):
        import orbax.checkpoint as ocp

        _quiet_orbax()
        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=CHECKPOINTS_KEPT)
        self._manager = ocp.CheckpointManager((Path(run_dir) / CHECKPOINT_DIR).resolve(), options=options)

    def latest_step(self):
        return self._manager.latest_step()

    def save(self, step: int, params: nnx.State, opt_state: Any) -> None:
        if self._manager.latest_step() == step:
            return
        ocp = self._ocp
        self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
                opt_state=ocp.args.StandardSave(jax.tree_util.tree_leaves(opt_state)),
            ),
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, params: nnx.State, opt_state: Any) -> tuple[nnx.State, Any]:
        """The state saved at `step`, into the structure of `params` and `opt_state`."""
        ocp = self._ocp
        leaves, treedef = jax.tree_util.tree_flatten(opt_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(nnx.to_pure_dict(params)), opt_state=ocp.args.StandardRestore(leaves)
            ),
        )
        nnx.replace_by_pure_dict(params, restored["params"])
        return params, jax.tree_util.tree_unflatten(treedef, list(restored["opt_state"]))

    def steps(self) -> list[int]:
        """The steps of the checkpoints kept, oldest first."""
        return sorted(self._manager.all_steps())

    def restore_params(self, abstract: nnx.State, step: int | None = None) -> nnx.State:
        """The parameters of the checkpoint at `step` (default the latest; also of runs written
        before optimizer states were kept)."""
        ocp, step = self._ocp, self._manager.latest_step() if step is None else step
        if step is None:
            raise RunDirError(f"RUN_DIR: {self._manager.directory} holds no checkpoint")
        target = ocp.args.StandardRestore(nnx.to_pure_dict(abstract))
        if (Path(self._manager.directory) / str(step) / "params").is_dir():
            restored = self._manager.restore(step, args=ocp.args.Composite(params=target))["params"]
        else:  # a single item: the final parameters, as runs of earlier versions saved them
            restored = self._manager.restore(step, args=target)
        nnx.replace_by_pure_dict(abstract, cast(dict[str, Any], restored))
        return abstract

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Trained:
    """A trained run in memory, as `icl-gd train` leaves it and `load` rebuilds it: what analyses
    and `explain` read (the parameters of every seed have a leading seed axis)."""

    run_dir: Path
    cfg: DictConfig
    task: tasks.TaskKind
    model: models.Model
    params: nnx.State
    summary: dict

    def seed(self, s: int) -> nnx.State:
        return jax.tree_util.tree_map(lambda a: a[s], self.params)


def _abstract_params(cfg: DictConfig, model: models.Model) -> nnx.State:
    """The structure of every seed's parameters (leading seed axis), to restore a checkpoint into,
    placed on this process's devices as training places them (`training.seed_sharding`), whatever
    the devices that saved it."""
    seeds = int(cfg.train.seeds)
    init_keys, _ = training.seed_keys(int(cfg.train.seed), seeds)
    sharding = training.seed_sharding(seeds)
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
        jax.eval_shape(jax.vmap(model.init), init_keys),
    )


def load(run_dir: str | Path) -> Trained:
    """The one loader of a run directory: config, task, model and the checkpointed parameters."""
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY_FILE).exists() or not (run_dir / CHECKPOINT_DIR).exists():
        raise RunDirError(f"RUN_DIR: {run_dir} is not a run directory (no {SUMMARY_FILE} / {CHECKPOINT_DIR})")
    cfg = load_config(run_dir)
    task = tasks.from_config(cfg.task)
    model = models.build(cfg.model, task.layout)
    with Checkpoints(run_dir) as checkpoints:
        params = checkpoints.restore_params(_abstract_params(cfg, model))
    return Trained(run_dir, cfg, task, model, params, load_summary(run_dir))


def previous_checkpoint(trained: Trained) -> tuple[list[int], nnx.State] | None:
    """The steps `[previous, final]` and every seed's parameters of the checkpoint kept before the
    final one (`train.checkpoint_every` evaluations earlier; None when the run kept only one)."""
    with Checkpoints(trained.run_dir) as checkpoints:
        steps = checkpoints.steps()
        if len(steps) < 2:
            return None
        return steps[-2:], checkpoints.restore_params(_abstract_params(trained.cfg, trained.model), steps[-2])

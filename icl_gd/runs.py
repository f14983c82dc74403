"""Run directories: creation (never over an existing one), config, metrics, summary, checkpoint.

A run directory holds `config.yaml`, `metrics.csv`, `summary.json`, `plots/` and `checkpoint/`.
`load_model(run_dir, seed)` rebuilds a trained model from it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import jax
import pandas as pd
from flax import nnx
from omegaconf import DictConfig, OmegaConf

from icl_gd import config as config_lib

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.yaml", "metrics.csv", "summary.json"


class RunDirExists(FileExistsError):
    """Refusal to write into a directory that already holds something."""


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


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist"):
        return _json_ready(value.tolist())
    return value


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_ready(data), indent=2) + "\n")
    os.replace(tmp, path)


class RunDir:
    """The files of one run; created only once the configuration is known to be valid."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, path: Path, cfg: DictConfig, allow_empty: bool = False) -> "RunDir":
        check_new(Path(path), allow_empty)
        run = cls(path)
        (run.path / "plots").mkdir(parents=True, exist_ok=True)
        (run.path / CONFIG_FILE).write_text(config_lib.to_yaml(cfg))
        return run

    def append_metrics(self, rows: list[dict]) -> None:
        file = self.path / METRICS_FILE
        pd.DataFrame(rows).to_csv(file, mode="a", header=not file.exists(), index=False)

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / SUMMARY_FILE, summary)

    def save_checkpoint(self, params: nnx.State, step: int) -> None:
        """Final parameters of every seed (leading seed axis), with Orbax."""
        import orbax.checkpoint as ocp

        logging.getLogger("absl").setLevel(logging.WARNING)
        with ocp.CheckpointManager((self.path / "checkpoint").resolve()) as manager:
            manager.save(step, args=ocp.args.StandardSave(nnx.to_pure_dict(params)))
            manager.wait_until_finished()


def load_config(run_dir: str | Path) -> DictConfig:
    """A run's resolved config on the current schema (fields added since then take defaults)."""
    return OmegaConf.merge(OmegaConf.structured(config_lib.Config), OmegaConf.load(Path(run_dir) / CONFIG_FILE))


def load_summary(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / METRICS_FILE)


def load_params(run_dir: str | Path) -> tuple[DictConfig, nnx.GraphDef, nnx.State]:
    """Config, model structure and the trained parameters of every seed (leading seed axis)."""
    import orbax.checkpoint as ocp

    from icl_gd import models, training

    logging.getLogger("absl").setLevel(logging.WARNING)
    cfg = load_config(run_dir)
    input_dim = cfg.task.dim
    scale = config_lib.init_scale(cfg.model)
    init_keys, _ = training.seed_keys(cfg.train.seed, cfg.train.seeds)
    abstract = jax.eval_shape(jax.vmap(lambda k: models.init_params(cfg.model, input_dim, scale, k)), init_keys)
    with ocp.CheckpointManager((Path(run_dir) / "checkpoint").resolve()) as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(nnx.to_pure_dict(abstract)))
    nnx.replace_by_pure_dict(abstract, restored)
    return cfg, models.graphdef(cfg.model, input_dim, scale), abstract


def load_model(run_dir: str | Path, seed: int = 0):
    """The trained `models.Transformer` of one seed of a run."""
    _, graphdef, params = load_params(run_dir)
    return nnx.merge(graphdef, jax.tree_util.tree_map(lambda a: a[seed], params))

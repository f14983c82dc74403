"""Shared fixtures: small configurations and one tiny trained run reused by several tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import pytest

from icl_gd import experiment
from icl_gd.config import load_config

# Many tests train tiny runs of the same shapes: JAX's persistent compilation cache lets a program
# compiled by one test (or xdist worker) serve the others. It changes no result.
jax.config.update("jax_compilation_cache_dir", str(Path(tempfile.gettempdir()) / "icl-gd-tests-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

# Small evaluation sets keep the suite fast; results stay exact enough for the assertions.
SMALL_EVAL = ["eval.n_tasks=2000", "eval.line_search_tasks=20000"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 2-seed single-layer run of 200 steps at d = 4, N = 8."""
    cfg = load_config(
        [
            "task.dim=4",
            "task.n_context=8",
            "train.steps=200",
            "train.eval_every=100",
            "train.seeds=2",
            "train.batch_size=256",
            *SMALL_EVAL,
        ]
    )
    return experiment.train(cfg, tmp_path_factory.mktemp("runs") / "tiny", quiet=True)


# One tiny sequence run (task=lds, 2 layers, 2 seeds) for the analyses of sequence models.
TINY_LDS_RUN = [
    "task=lds",
    "task.length=10",
    "task.state_dim=3",
    "model.layers=2",
    "train.steps=20",
    "train.eval_every=10",
    "train.batch_size=64",
    "train.seeds=2",
    "train.progress=false",
    "eval.n_tasks=200",
    "eval.line_search_tasks=1000",
    "eval.sensitivity_tasks=16",
    "eval.probe_tasks=256",
    "eval.probe_lags=3",
    "eval.fewshot_tasks=256",
    "eval.fewshot_tune_steps=5",
    "eval.fewshot_prefix=1",
    "eval.fewshot_batch=32",
]


@pytest.fixture(scope="session")
def tiny_lds_run(tmp_path_factory):
    """A 2-seed, 2-layer linear-attention run of 20 steps on short sequences (analyses write into it)."""
    return experiment.train(load_config(TINY_LDS_RUN), tmp_path_factory.mktemp("runs") / "tiny_lds", quiet=True)

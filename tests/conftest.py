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

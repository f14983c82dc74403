"""Seeds sharded across devices: with four (forced host) devices the seed axis of a run is split
across them, and the run equals the same run on one device."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest

from icl_gd import experiment, runs
from icl_gd.config import load_config
from tests.conftest import SMALL_EVAL

# The shapes of tests/test_training.py's multi-seed run: the unsharded run here compiles nothing new.
OVERRIDES = [
    "task.dim=3",
    "task.n_context=5",
    "train.steps=50",
    "train.eval_every=25",
    "train.batch_size=64",
    *SMALL_EVAL,
    "train.seeds=4",
]

# Run in a process of its own: the device count is fixed when JAX starts.
SHARDED_RUN = """
import json, sys
import jax
from icl_gd import experiment
from icl_gd.config import load_config
jax.config.update("jax_compilation_cache_dir", sys.argv[2])
trained = experiment.train(load_config(json.loads(sys.argv[3])), sys.argv[1], quiet=True)
leaf = jax.tree_util.tree_leaves(trained.params)[0]
print(json.dumps({"devices": jax.device_count(), "leaf_devices": len(leaf.sharding.device_set)}))
"""


def test_sharded_seeds_equal_unsharded(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    cache = jax.config.jax_compilation_cache_dir or str(tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, "-c", SHARDED_RUN, str(tmp_path / "sharded"), cache, json.dumps(OVERRIDES)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    placed = json.loads(done.stdout.strip().splitlines()[-1])
    assert placed == {"devices": 4, "leaf_devices": 4}
    sharded = runs.load_summary(tmp_path / "sharded")
    assert sharded["seed_devices"] == 4 and sharded["n_devices"] == 4 and len(sharded["devices"]) == 4

    one = experiment.train(load_config(OVERRIDES), tmp_path / "one", quiet=True)
    assert one.summary["seed_devices"] == 1
    a, b = runs.load_metrics(tmp_path / "sharded"), runs.load_metrics(tmp_path / "one")
    pd.testing.assert_index_equal(a.columns, b.columns)
    np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), rtol=1e-5, atol=1e-7)
    # The sharded run's checkpoint loads on one device, with the parameters of the unsharded run.
    loaded = runs.load(tmp_path / "sharded")
    for x, y in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(one.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    assert sharded["final"]["loss"]["mean"] == pytest.approx(one.summary["final"]["loss"]["mean"], rel=1e-5)

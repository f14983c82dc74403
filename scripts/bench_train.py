"""Benchmark the compiled training loop of the default single-layer config, then of the
sequence models of the follow-up paper.

Prints: compile time, steady training steps/s at batch 2048, evaluation time on the
10,000-task evaluation set, and the time per seed for `train.seeds=1,4,16`; then training
steps/s at batch 256 for the `lds_linear` (1 and 6 layers), `lds_softmax` and `lds_mesa`
experiments (one seed, both mesa implementations).
Usage: `python scripts/bench_train.py [OVERRIDES...]` (or `make bench`).
"""

from __future__ import annotations

import sys
import time

import jax

from icl_gd import config as config_lib
from icl_gd import experiment, models, tasks, training


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def bench(overrides: list[str], seeds: int, chunks: int = 5, evaluate: bool = True) -> dict:
    cfg = config_lib.load_config([*overrides, f"train.seeds={seeds}"])
    tc, task = cfg.train, tasks.from_config(cfg.task)
    model = models.build(cfg.model, task.layout)
    optimizer = training.make_optimizer(tc)
    init_keys, data_keys = training.seed_keys(tc.seed, seeds)
    params, opt_state = training.init_states(model, optimizer, init_keys)
    chunk = training.make_train_chunk(model, optimizer, task, tc.batch_size)
    n = tc.eval_every
    (params, opt_state, _), compile_s = timed(lambda: chunk(params, opt_state, data_keys, 0, n))
    start = time.perf_counter()
    for i in range(1, chunks + 1):
        params, opt_state, losses = chunk(params, opt_state, data_keys, i * n, n)
    jax.block_until_ready(losses)
    steady_s = (time.perf_counter() - start) / (chunks * n)
    if not evaluate:
        return {"compile_s": compile_s, "steps_per_s": 1 / steady_s, "ms_per_step": 1e3 * steady_s}
    refs = experiment.compute_references(cfg, task)
    evaluator = experiment.make_evaluator(model, cfg, refs)
    evaluate = lambda: evaluator(params)
    _, eval_compile_s = timed(evaluate)
    _, eval_s = timed(evaluate)
    return {
        "seeds": seeds,
        "compile_s": compile_s,
        "steps_per_s": 1 / steady_s,
        "ms_per_step": 1e3 * steady_s,
        "ms_per_step_per_seed": 1e3 * steady_s / seeds,
        "eval_compile_s": eval_compile_s,
        "eval_s": eval_s,
        "batch": tc.batch_size,
        "full_run_estimate_s": tc.steps * steady_s + (tc.steps // n + 1) * eval_s,
    }


def main(overrides: list[str]) -> None:
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}, overrides: {overrides or 'none'}")
    _, refs_s = timed(lambda: experiment.compute_references(config_lib.load_config(overrides)).evals)
    print(f"references (line search on the eta set, GD/OLS/ridge on the eval set): {refs_s:.2f} s")
    header = (
        "seeds",
        "compile_s",
        "steps_per_s",
        "ms_per_step",
        "ms_per_step_per_seed",
        "eval_s",
        "full_run_estimate_s",
    )
    print(" | ".join(header))
    for seeds in (1, 4, 16):
        row = bench(overrides, seeds)
        print(" | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in header))
    print("\nsequence models (task=lds, batch 256, one seed):")
    print("model | compile_s | steps_per_s | ms_per_step")
    for label, model in SEQUENCE_MODELS.items():
        row = bench([*model, "train.eval_every=20", *overrides], 1, chunks=3, evaluate=False)
        print(f"{label} | {row['compile_s']:.3g} | {row['steps_per_s']:.3g} | {row['ms_per_step']:.3g}")


SEQUENCE_MODELS = {
    "lds_linear, 1 layer": ["experiment=lds_linear"],
    "lds_linear, 6 layers": ["experiment=lds_linear", "model.layers=6"],
    "lds_softmax, 7 layers": ["experiment=lds_softmax"],
    "lds_mesa, scan": ["experiment=lds_mesa"],
    "lds_mesa, solve": ["experiment=lds_mesa", "model.mesa_impl=solve"],
}


if __name__ == "__main__":
    main(sys.argv[1:])

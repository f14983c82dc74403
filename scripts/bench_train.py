"""Benchmark training: where the time of a run goes, and how it scales (README, Performance).

Sections (all by default; `--only a,b` picks some):
- `profile`: the default single-layer run taken apart: sampling a batch, forward + backward +
  optimizer on batches drawn beforehand, a whole step, an evaluation, the references, compilation.
- `prng`: ms per training step with each of JAX's generators (`prng=threefry2x32|rbg|unsafe_rbg`).
- `seeds`: steps/s at batch 2048 for 1, 4, 16 and 64 seeds trained together (vmap).
- `layers`: ms per step against `model.layers` = 1..8 (and `model.recurrent=true`).
- `e2e`: the whole `icl-gd train experiment=single_layer` (`make run`) and `experiment=recurrent`
  (K = 3, GD++ fit included) as processes, with a cold and then a warm compilation cache.
- `lds`: training steps/s of the follow-up paper's sequence models (batch 256, one seed).
Every figure names the machine it was taken on. Usage:
`python scripts/bench_train.py [--only SECTIONS] [OVERRIDES...]` (or `make bench ARGS=...`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from icl_gd import config as config_lib
from icl_gd import experiment, models, tasks, training

SECTIONS = ("profile", "prng", "seeds", "layers", "e2e", "lds")
SEQUENCE_MODELS = {
    "lds_linear, 1 layer": ["experiment=lds_linear"],
    "lds_linear, 6 layers": ["experiment=lds_linear", "model.layers=6"],
    "lds_softmax, 7 layers": ["experiment=lds_softmax"],
    "lds_mesa, scan": ["experiment=lds_mesa"],
    "lds_mesa, solve": ["experiment=lds_mesa", "model.mesa_impl=solve"],
}


def machine() -> str:
    """CPU model and cores, and JAX's devices."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    devices = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
    return f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} on {jax.device_count()} device(s) ({devices})"


def timed(fn, repeats: int = 1) -> tuple[object, float]:
    """`fn()`'s result and the fastest of `repeats` wall times (s), each until the result is ready."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return out, best


class Trainer:
    """The compiled training chunk of a config, ready to time."""

    def __init__(self, overrides: list[str], seeds: int = 1):
        self.cfg = config_lib.load_config([*overrides, f"train.seeds={seeds}"])
        self.prng = training.prng(self.cfg)
        with self.prng:
            tc = self.cfg.train
            self.task = tasks.from_config(self.cfg.task)
            self.model = models.build(self.cfg.model, self.task.layout)
            self.optimizer = training.make_optimizer(tc)
            init_keys, self.data_keys = training.seed_keys(int(tc.seed), seeds)
            self.state = training.init_states(self.model, self.optimizer, init_keys)
            self.chunk = training.make_train_chunk(self.model, self.optimizer, self.task, int(tc.batch_size))

    def step_time(self, steps: int, chunks: int = 3) -> tuple[float, float]:
        """Compile time (s, the first chunk) and the fastest ms per step of the next `chunks`."""
        with self.prng:
            params, opt_state = self.state
            (params, opt_state, _), compile_s = timed(lambda: self.chunk(params, opt_state, self.data_keys, 0, steps))
            best = float("inf")
            for i in range(1, chunks + 1):
                start = time.perf_counter()
                params, opt_state, losses = self.chunk(params, opt_state, self.data_keys, i * steps, steps)
                jax.block_until_ready(losses)
                best = min(best, (time.perf_counter() - start) / steps)
            self.state = (params, opt_state)
        return compile_s, 1e3 * best


def profile(overrides: list[str]) -> None:
    """One step of the default run taken apart (one seed, batch `train.batch_size`)."""
    trainer = Trainer(overrides)
    cfg, task, model, n = trainer.cfg, trainer.task, trainer.model, 50
    batch_size = int(cfg.train.batch_size)
    with trainer.prng:
        key = trainer.data_keys[0]
        draws = jax.jit(
            lambda k: jax.lax.map(lambda i: task.sample(jax.random.fold_in(k, i), batch_size), jnp.arange(n))
        )
        batches = draws(key)
        _, sample_s = timed(lambda: draws(key), repeats=3)
        params, opt_state = jax.tree_util.tree_map(lambda a: a[0], trainer.state)

        def step(carry, batch):
            params, opt_state = carry
            loss = lambda p: training.batch_loss(model.predict(p, batch.tokens)[:, -1], batch.targets)
            value, grads = jax.value_and_grad(loss)(params)
            updates, opt_state = trainer.optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        drawn = jax.jit(lambda p, o, b: jax.lax.scan(step, (p, o), b))
        timed(lambda: drawn(params, opt_state, batches))
        _, compute_s = timed(lambda: drawn(params, opt_state, batches), repeats=3)
        (_, refs_s) = timed(lambda: experiment.compute_references(cfg, task).evals)
        refs, refs_warm_s = timed(lambda: experiment.compute_references(cfg, task))
        evaluator = experiment.make_evaluator(model, cfg, refs)
        _, eval_compile_s = timed(lambda: evaluator(trainer.state[0]))
        _, eval_s = timed(lambda: evaluator(trainer.state[0]), repeats=3)
        compile_s, step_ms = trainer.step_time(int(cfg.train.eval_every))
    sample_ms, compute_ms = 1e3 * sample_s / n, 1e3 * compute_s / n
    print(f"\n## profile: one step of {cfg.name} (batch {batch_size}, one seed, prng={training.prng_name(cfg)})")
    print("part | time")
    print(f"sampling a batch (alone, {n} in one program; includes writing it out) | {sample_ms:.3f} ms")
    print(f"forward + backward + optimizer on batches drawn beforehand | {compute_ms:.3f} ms")
    print(f"whole training step (sampling fused in) | {step_ms:.3f} ms")
    print(f"evaluation ({cfg.eval.n_tasks} tasks, every reference, sensitivities) | {1e3 * eval_s:.1f} ms")
    print(f"references, first call (compiling) / again | {refs_s:.2f} s / {refs_warm_s:.2f} s")
    print(f"compilation: training chunk / evaluator | {compile_s:.2f} s / {eval_compile_s:.2f} s")


def prng(overrides: list[str]) -> None:
    print("\n## prng: ms per training step by generator (one seed; default: the task kind's choice)")
    print("experiment | prng | ms/step | steps/s")
    for experiment_name, steps in (("single_layer", 100), ("lds_linear", 20)):
        for impl in config_lib.Prng:
            _, ms = Trainer([f"experiment={experiment_name}", *overrides, f"prng={impl.name}"]).step_time(steps)
            print(f"{experiment_name} | {impl.name} | {ms:.3f} | {1e3 / ms:.0f}")


def seeds(overrides: list[str]) -> None:
    print("\n## seeds: training at batch 2048, seeds side by side (vmap)")
    print("seeds | compile (s) | ms/step | steps/s | ms/step/seed")
    for n in (1, 4, 16, 64):
        compile_s, ms = Trainer(overrides, seeds=n).step_time(100 if n < 16 else 10)
        print(f"{n} | {compile_s:.2f} | {ms:.2f} | {1e3 / ms:.1f} | {ms / n:.2f}")


def layers(overrides: list[str]) -> None:
    print("\n## layers: ms per step against model.layers (batch 2048, one seed)")
    print("layers | ms/step | ms/step, recurrent")
    for k in range(1, 9):
        times = [Trainer([*overrides, f"model.layers={k}", f"model.recurrent={r}"]).step_time(50)[1] for r in (0, 1)]
        print(f"{k} | {times[0]:.2f} | {times[1]:.2f}")


def end_to_end(overrides: list[str]) -> None:
    """`icl-gd train` as a user runs it, each experiment with a cold then a warm compilation cache."""
    print("\n## e2e: `icl-gd train` as a process (references, compilation, training, plots, checkpoints)")
    print("experiment | cache | wall (s) | final loss | GD loss | GD++ loss")
    icl = Path(sys.executable).with_name("icl-gd")
    for name in ("single_layer", "recurrent"):
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
            env = {**os.environ, "ICL_GD_COMPILE_CACHE": cache}
            for state in ("cold", "warm"):
                run_dir = Path(out) / state
                command = [str(icl), "train", f"experiment={name}", "train.progress=false", "--out", str(run_dir)]
                start = time.perf_counter()
                subprocess.run([*command, *overrides], env=env, check=True, capture_output=True)
                wall = time.perf_counter() - start

                summary = json.loads((run_dir / "summary.json").read_text())
                refs = summary["references"]
                print(
                    f"{name} | {state} | {wall:.1f} | {summary['final']['loss']['mean']:.4f} | "
                    f"{refs['gd']['loss']:.4f} | {refs['gdpp']['loss']:.4f}"
                )


def lds(overrides: list[str]) -> None:
    print("\n## lds: sequence models (task=lds, batch 256, one seed)")
    print("model | compile (s) | steps/s | ms/step")
    for label, model in SEQUENCE_MODELS.items():
        compile_s, ms = Trainer([*model, *overrides]).step_time(20)
        print(f"{label} | {compile_s:.2f} | {1e3 / ms:.2f} | {ms:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every benchmark")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; allowed: {', '.join(SECTIONS)}")
    print(f"machine: {machine()}")
    runs = {"profile": profile, "prng": prng, "seeds": seeds, "layers": layers, "e2e": end_to_end, "lds": lds}
    for name in chosen:
        started = time.perf_counter()
        runs[name](args.overrides)
        print(f"({name}: {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()

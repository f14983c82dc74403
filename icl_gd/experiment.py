"""Experiments: the references of a configured task, and a training run written to its run
directory. `train(cfg, run_dir) -> runs.Trained` is the whole of `icl-gd train` for one job and
`resume(run_dir)` continues an interrupted one.

What is tracked follows from the registries: the task kind lists its references (primary
first); each gets `<name>_loss` and alignment columns (`preds_diff`, and with sensitivities
`model_cos` and `model_diff`, suffixed `_<name>` except for the primary reference), and, when it
runs one step per model layer, per-layer columns `layer<k>_*` (docs/science.md section 5).
"""

from __future__ import annotations

import functools
import platform
import signal
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from icl_gd import config as config_lib
from icl_gd import loggers, metrics, models, plots, references, runs, tasks, training
from icl_gd.progress import TrainProgress


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run after saving it; `--resume` continues it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def check(cfg: DictConfig) -> tasks.TaskKind:
    """What the task kind needs of the model, checked before any work; returns the task kind."""
    task = tasks.from_config(cfg.task)
    layout = task.layout
    if cfg.model.input_mlp and layout.input_tokens is None:
        raise config_lib.ConfigError(f"model.input_mlp: got true; allowed: false for task={task.name}")
    if cfg.model.first_layer is not None and not layout.mask.causal:
        raise config_lib.ConfigError(
            f"model.first_layer: got {cfg.model.first_layer.name}; allowed: null for task={task.name} "
            "(a first layer of its own needs a causal task: task=lds, or classic tokens)"
        )
    return task


def evaluation_batch(task: tasks.TaskKind, cfg: DictConfig) -> tasks.Batch:
    """The fixed evaluation set of a config: `eval.n_tasks` sequences from `fold_in(key(eval.seed), 0)`."""
    with training.prng(cfg):
        return tasks.sample(task, jax.random.fold_in(jax.random.key(int(cfg.eval.seed)), 0), int(cfg.eval.n_tasks))


@functools.partial(jax.jit, static_argnums=(0, 1))
def evaluate_reference(
    task: tasks.TaskKind, ref: references.Reference, params, batch: tasks.Batch
) -> metrics.Evaluation:
    """A reference's readouts (and sensitivities) on `batch`, in a compiled program of its own
    (at most one batched LAPACK call per program, see `icl_gd.linalg`), reused for every run
    of the same task and shapes."""
    predict = functools.partial(ref.predict, task, params)
    return metrics.evaluate(predict, batch.queries, batch.context, sensitivities=task.sensitivities)


@dataclass
class References:
    """The task's references, fitted on data of their own and evaluated on the evaluation set."""

    task: tasks.TaskKind
    eval_batch: tasks.Batch
    fitted: list[references.Reference]
    params: dict[str, Any]
    evals: dict[str, metrics.Evaluation]
    analytic: dict

    def losses(self, name: str) -> np.ndarray:
        """`[K, P]`: loss of each readout at each scored position."""
        return np.asarray(metrics.losses(self.evals[name], self.eval_batch.targets, by_position=True))

    def as_dict(self) -> dict:
        """`summary.json`'s `references`: each reference's parameters and loss on the evaluation set
        (final readout; with several scored positions, the mean over them and `loss_by_position`)."""
        out = {}
        for ref in self.fitted:
            loss = self.losses(ref.name)[-1]
            entry = {**ref.describe(self.params[ref.name]), "loss": float(loss.mean())}
            if loss.shape[0] > 1:
                entry["loss_by_position"] = loss.tolist()
            out[ref.name] = entry
        return {**out, **self.analytic}


def compute_references(cfg: DictConfig, task: tasks.TaskKind | None = None) -> References:
    """Fit the task's references in their order (each may use those before it), then evaluate
    them on the evaluation set (docs/science.md sections 4-6 and 8)."""
    task = task or tasks.from_config(cfg.task)
    with training.prng(cfg):
        batch = evaluation_batch(task, cfg)
        key = jax.random.key(int(cfg.eval.seed))
        fitted, params, evals = references.for_task(task), {}, {}
        for ref in fitted:
            params[ref.name] = ref.fit(references.FitContext(task, cfg, key, batch, params))
            evals[ref.name] = evaluate_reference(task, ref, params[ref.name], batch)
    return References(task, batch, fitted, params, evals, references.analytic(task))


def alignment_metrics(task: tasks.TaskKind) -> tuple[str, ...]:
    return ("preds_diff", "model_cos", "model_diff") if task.sensitivities else ("preds_diff",)


def suffix(task: tasks.TaskKind, name: str) -> str:
    """Alignment columns name the reference, except for the task's primary one."""
    return "" if name == task.references[0] else f"_{name}"


def has_interpolation(task: tasks.TaskKind) -> bool:
    """The interpolated model is defined for regression tasks (docs/science.md section 5)."""
    return isinstance(task, tasks.Regression)


def final_metrics(task: tasks.TaskKind) -> list[str]:
    """The columns of `metrics.csv` (final readout) and the keys of `summary.json`'s `final`."""
    names = ["loss"]
    for ref in references.for_task(task):
        names += [f"{ref.name}_loss", *(f"{m}{suffix(task, ref.name)}" for m in alignment_metrics(task))]
    return names + (["interpolated_loss"] if has_interpolation(task) else [])


def per_layer_metrics(task: tasks.TaskKind) -> list[str]:
    """The `layer<k>_*` columns: each layer's readout against as many steps of each stepwise reference."""
    names = ["loss"]
    for ref in references.for_task(task):
        if ref.stepwise:
            sfx = suffix(task, ref.name)
            names += [f"{ref.name}_loss", f"preds_diff{sfx}", *([f"model_cos{sfx}"] if task.sensitivities else [])]
    return names


def interpolates(model_cfg, task: tasks.TaskKind) -> bool:
    """The interpolation with the GD construction needs one-head linear-attention stacks on the
    plain constructed tokens the construction is written for."""
    layout = task.layout
    return (
        model_cfg.heads == 1
        and model_cfg.attention.name == "linear"
        and not model_cfg.layernorm
        and not model_cfg.mlp
        and not model_cfg.input_mlp
        and not model_cfg.positional
        and model_cfg.embed_dim is None
        and model_cfg.first_layer is None
        and not layout.copy_layer
    )


def interpolate(weights: models.Weights, gd: models.Weights, input_dim: int) -> models.Weights:
    """Rescale `W_KQ` so that its x-block has mean diagonal 1 (the factor moves into `W_PV`),
    then average each product with the GD construction's (docs/science.md section 5)."""
    w_kq, w_pv = cast(models.Attention, weights.layers.attn)  # interpolates(): linear attention
    scale = jnp.mean(jnp.diagonal(w_kq[..., :input_dim, :input_dim], axis1=-2, axis2=-1), axis=-1)[..., None, None]
    n = w_kq.shape[0]
    gd_kq, gd_pv = cast(models.Attention, gd.layers.attn)
    return models.lsa(0.5 * (w_kq / scale + gd_kq[:n]), 0.5 * (w_pv * scale + gd_pv[:n]))


def make_evaluator(model: models.Model, cfg: DictConfig, refs: References):
    """`params[S] -> {metric: [S, K, P]}`, compiled and vmapped over seeds: the model's loss and its
    alignment with every reference, for every readout and scored position."""
    task, layout = refs.task, refs.task.layout
    with_interpolation = has_interpolation(task) and interpolates(cfg.model, task)
    gd_weights = None
    if with_interpolation:
        n_context = cast(tasks.Regression, task).n_context  # has_interpolation: a regression task
        gd_weights = references.gd_weights(refs.params[task.references[0]], layout.input_dim, n_context)

    def evaluate(params, batch, ref_evals, gd_weights):
        weights = model.weights(params)

        def predict(q_Pxd, tokens_TxD):
            return models.forward(model.arch, weights, tokens_TxD, q_Pxd)

        ev = metrics.evaluate(predict, batch.queries, batch.tokens, sensitivities=task.sensitivities)
        out = {"loss": metrics.losses(ev, batch.targets, by_position=True)}
        for name, ref_ev in ref_evals.items():
            aligned = metrics.alignment(ev, ref_ev, by_position=True)
            out.update({f"{m}{suffix(task, name)}": aligned[m] for m in alignment_metrics(task)})
        if has_interpolation(task):
            if gd_weights is None:
                out["interpolated_loss"] = jnp.full(out["loss"].shape, jnp.nan)
            else:
                mixed = interpolate(weights, gd_weights, layout.input_dim)
                mixed_ev = metrics.Evaluation(models.predict_batch(model.arch, mixed, batch.tokens))
                out["interpolated_loss"] = metrics.losses(mixed_ev, batch.targets, by_position=True)
        return out

    compiled = jax.jit(jax.vmap(evaluate, in_axes=(0, None, None, None)))
    return lambda params: compiled(params, refs.eval_batch, refs.evals, gd_weights)


def sequence_alignment(model: models.Model, params_S, refs: References, n_sequences: int) -> dict[str, np.ndarray]:
    """Sequence tasks, at the end of a run: the model's alignment with each reference at every
    position (final readout), from the sensitivities of the prediction at `t` to the last state
    `s_t` (`metrics.last_input_sensitivities`) on the first `n_sequences` of the evaluation set:
    `{f"{metric}{suffix}": [S, P]}` for `model_cos`, `model_diff`, `preds_diff`."""
    task = refs.task
    states = refs.eval_batch.context[:n_sequences]

    def model_predict(weights):
        return lambda st: models.forward(model.arch, weights, task.batch(st[None]).tokens[0])

    @jax.jit
    def evaluate(params_S, states):
        return jax.vmap(lambda p: metrics.last_input_sensitivities(model_predict(model.weights(p)), states))(params_S)

    model_ev = evaluate(params_S, states)
    last = lambda ev: metrics.Evaluation(ev.preds[:, -1:], None if ev.sens is None else ev.sens[:, -1:])
    out = {}
    for ref in refs.fitted:
        ref_ev = _reference_sensitivities(task, ref, refs.params[ref.name], states)
        aligned = jax.vmap(lambda ev: metrics.alignment(last(ev), last(ref_ev), by_position=True))(model_ev)
        out.update({f"{m}{suffix(task, ref.name)}": np.asarray(v[:, -1]) for m, v in aligned.items()})
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _reference_sensitivities(
    task: tasks.TaskKind, ref: references.Reference, params, states_BxTp1xD: jax.Array
) -> metrics.Evaluation:
    """A sequence reference's readouts and last-state sensitivities (`metrics.last_input_sensitivities`),
    its queries being the states `s_1..s_T` themselves."""

    def predict(states_Tp1xD):
        return ref.predict(task, params, states_Tp1xD[:-1], states_Tp1xD)

    return metrics.last_input_sensitivities(predict, states_BxTp1xD)


def metric_rows(step: int, evaluated: dict, refs: References, layers: int) -> list[dict]:
    """`metrics.csv` rows, one per seed: final-readout metrics averaged over positions, then
    `layer<k>_<metric>` columns for deep models."""
    task = refs.task
    ref_losses = {f"{ref.name}_loss": refs.losses(ref.name).mean(-1) for ref in refs.fitted}
    n_seeds = np.asarray(evaluated["loss"]).shape[0]
    finals, per_layer = final_metrics(task), per_layer_metrics(task)
    rows = []
    for s in range(n_seeds):
        values = {name: np.asarray(value)[s].mean(-1) for name, value in evaluated.items()}  # [K] each
        values.update(ref_losses)
        row = {"step": step, "seed": s, **{name: float(values[name][-1]) for name in finals}}
        if layers > 1:
            row.update(
                {
                    f"layer{k + 1}_{name}": float(values[name][min(k, len(values[name]) - 1)])
                    for k in range(layers)
                    for name in per_layer
                }
            )
        rows.append(row)
    return rows


def per_layer_summary(rows: list[dict], task: tasks.TaskKind, layers: int) -> list[dict]:
    """For each layer `k`: the readout after layer `k` against `k` steps of each stepwise reference."""
    names = [n for n in per_layer_metrics(task) if not n.startswith("preds_diff") or not task.sensitivities]
    if layers == 1:
        return [{name: metrics.mean_ci95([r[name] for r in rows]) for name in names}]
    return [
        {name: metrics.mean_ci95([r[f"layer{k}_{name}"] for r in rows]) for name in names} for k in range(1, layers + 1)
    ]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "not installed"


def environment() -> dict:
    """`summary.json`'s record of the machine: JAX's backend, its devices (`platform:id (kind)`,
    e.g. `cpu:0 (cpu)`, `gpu:0 (NVIDIA H200)`), the first one's `platform:kind`, and versions."""
    devices = jax.devices()
    versions = {pkg: _version(pkg) for pkg in ("icl-gd", "jax", "jaxlib", "flax", "optax")}
    versions["python"] = platform.python_version()
    return {
        "backend": jax.default_backend(),
        "device": f"{devices[0].platform}:{devices[0].device_kind}",
        "devices": [f"{d.platform}:{d.id} ({d.device_kind})" for d in devices],
        "n_devices": len(devices),
        "versions": versions,
    }


class _StopSignals:
    """While active, SIGINT and SIGTERM (what SLURM sends on preemption) only set `received`, so
    that the loop can finish its chunk, save and mark the run `interrupted`."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.received = signum

    def __enter__(self) -> _StopSignals:
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: signals stay with their owner
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(cfg: DictConfig, run_dir: Path, allow_empty_dir: bool = False, quiet: bool = False) -> runs.Trained:
    """Train `train.seeds` seeds of the configured model in a new run directory, tracking every
    metric against the task's references, per layer. Raises `TrainingDiverged` (after marking the
    run failed) if the loss stops being finite, `TrainingInterrupted` (after saving) on SIGINT /
    SIGTERM."""
    config_lib.validate(cfg)
    task = check(cfg)
    run = runs.RunDir.create(run_dir, cfg, allow_empty=allow_empty_dir)
    summary = {
        "status": "running",
        "experiment": cfg.name,
        "task": task.name,
        "seeds": int(cfg.train.seeds),
        "prng": training.prng_name(cfg),
        **environment(),
    }
    run.write_summary(summary)
    return _run(cfg, task, run, summary, start=0, quiet=quiet)


def resume(run_dir: Path, quiet: bool = False) -> runs.Trained:
    """Continue an interrupted (or killed) run from its last checkpoint to `train.steps`,
    appending to its `metrics.csv`; raises `runs.RunDirError` for a run that cannot be resumed."""
    run, cfg, summary, step = runs.RunDir.open_for_resume(run_dir)
    task = check(cfg)
    summary.update(status="running", resumed_at=[*summary.get("resumed_at", []), step])
    summary.pop("interruption", None)
    run.write_summary(summary)
    return _run(cfg, task, run, summary, start=step, quiet=quiet)


def _run(
    cfg: DictConfig, task: tasks.TaskKind, run: runs.RunDir, summary: dict, start: int, quiet: bool
) -> runs.Trained:
    """`_loop` with SIGINT / SIGTERM caught from the start: one that arrives while the references
    are fitted stops the run before its first chunk (saved and marked interrupted all the same)."""
    logger = loggers.REGISTRY[cfg.logger.name](run.path, start)
    with training.prng(cfg), _StopSignals() as stop, runs.Checkpoints(run.path) as checkpoints, logger:
        return _loop(cfg, task, run, summary, start, quiet, stop, checkpoints, logger)


def _loop(
    cfg: DictConfig,
    task: tasks.TaskKind,
    run: runs.RunDir,
    summary: dict,
    start: int,
    quiet: bool,
    stop: _StopSignals,
    checkpoints: runs.Checkpoints,
    logger: loggers.Logger,
) -> runs.Trained:
    """The training loop shared by `train` and `resume`: chunks of `train.eval_every` steps, an
    evaluation after each (read once the next chunk is dispatched), checkpoints every
    `train.checkpoint_every` evaluations and at the end."""
    started, elapsed_before = time.time(), float(summary.get("wall_time_s", 0.0))
    tc, layers = cfg.train, int(cfg.model.layers)
    refs = compute_references(cfg, task)
    summary["references"] = refs.as_dict()
    model = models.build(cfg.model, task.layout)
    optimizer = training.make_optimizer(tc)
    init_keys, data_keys = training.seed_keys(int(tc.seed), int(tc.seeds))
    sharding = training.seed_sharding(int(tc.seeds))
    params, opt_state, data_keys = jax.device_put(
        (*training.init_states(model, optimizer, init_keys), data_keys), sharding
    )
    summary["seed_devices"] = len(sharding.device_set)
    if start > 0:
        params, opt_state = checkpoints.restore(start, params, opt_state)
    run.truncate_metrics(start)  # rows past the checkpoint, from a run killed before it could save
    train_chunk = training.make_train_chunk(model, optimizer, task, int(tc.batch_size))
    evaluator = make_evaluator(model, cfg, refs)
    wall = lambda: elapsed_before + time.time() - started

    def fail(step: int, seed: int, reason: str):
        summary.update(status="failed", failure={"step": step, "seed": seed, "reason": reason}, wall_time_s=wall())
        run.write_summary(summary)
        raise TrainingDiverged(f"run diverged at step {step} (seed {seed}): {reason}; marked failed in {run.path}")

    def record(step: int, evaluated, train_losses) -> tuple[list[dict], dict]:
        if train_losses is not None:
            train_losses = np.asarray(train_losses)
            bad = ~np.isfinite(train_losses)
            if bad.any():
                seed, offset = np.argwhere(bad)[0]
                fail(step - train_losses.shape[1] + int(offset) + 1, int(seed), "training loss is not finite")
        host = jax.device_get(evaluated)
        rows = metric_rows(step, host, refs, layers)
        bad_seeds = [row["seed"] for row in rows if not np.isfinite(row["loss"])]
        if bad_seeds:
            fail(step, bad_seeds[0], "evaluation loss is not finite")
        run.append_metrics(rows)
        logger.log(step, rows, train_losses)
        return rows, host

    rows, last_eval = record(start, evaluator(params), None)
    pending, step = None, start  # the previous chunk's results, read only once the next chunk is dispatched
    chunks_done = 0
    with TrainProgress(int(tc.steps), enabled=bool(tc.progress) and not quiet, start=start) as progress:
        while step < tc.steps and stop.received is None:
            n = min(int(tc.eval_every), int(tc.steps) - step)
            params, opt_state, chunk_losses = train_chunk(params, opt_state, data_keys, step, n)
            step += n
            evaluated = evaluator(params)
            if pending is not None:
                rows, last_eval = record(*pending)
                progress.update(pending[0], float(np.mean(pending[2][:, -1])))
            pending = (step, evaluated, chunk_losses)
            chunks_done += 1
            if chunks_done % int(tc.checkpoint_every) == 0 and step < tc.steps:
                checkpoints.save(step, params, opt_state)
        if pending is not None:
            rows, last_eval = record(*pending)
            progress.update(pending[0], float(np.mean(pending[2][:, -1])))
    checkpoints.save(step, params, opt_state)
    if step < tc.steps:
        assert stop.received is not None
        name = signal.Signals(stop.received).name
        summary.update(status="interrupted", interruption={"step": step, "signal": name}, wall_time_s=wall())
        run.write_summary(summary)
        raise TrainingInterrupted(
            f"{name} at step {step}: run saved and marked interrupted in {run.path}; "
            f"continue with `icl-gd train --resume {run.path}`",
            stop.received,
        )

    final = final_summary(rows, last_eval, task)
    if task.sequence_sensitivities:
        aligned = sequence_alignment(model, params, refs, int(cfg.eval.sensitivity_tasks))
        # Means over t >= 2: at t = 1 the references have seen no pair and predict 0 whatever s_1.
        final.update({n: metrics.mean_ci95(v[:, 1:].mean(-1)) for n, v in aligned.items() if n.startswith("model_")})
        summary["alignment_by_position"] = {name: metrics.mean_ci95(v) for name, v in aligned.items()}
    summary.update(
        status="completed",
        final=final,
        per_layer=per_layer_summary(rows, task, layers),
        wall_time_s=wall(),
    )
    run.write_summary(summary)
    trained = runs.Trained(run.path, cfg, task, model, params, summary)
    plots.run_figures(runs.load_metrics(run.path), summary, run.path / "plots")
    return trained


def final_summary(rows: list[dict], evaluated: dict, task: tasks.TaskKind) -> dict:
    """`final.<metric>` across seeds, and for sequence tasks the model's `loss_by_position`."""
    out = {name: metrics.mean_ci95([r[name] for r in rows]) for name in final_metrics(task)}
    loss_SxKxP = np.asarray(evaluated["loss"])
    if loss_SxKxP.shape[-1] > 1:
        out["loss_by_position"] = metrics.mean_ci95(loss_SxKxP[:, -1])
    return out

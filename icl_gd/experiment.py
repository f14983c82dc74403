"""Experiments: the references of a configured task, and a training run written to its run
directory. `train(cfg, run_dir) -> RunResult` is the whole of `icl-gd train` for one job.
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from omegaconf import DictConfig

from icl_gd import config as config_lib
from icl_gd import analyses, metrics, models, plots, references, runs, tasks, tokens, training
from icl_gd.progress import TrainProgress

FINAL_METRICS = ("loss", "gd_loss", "preds_diff", "model_cos", "model_diff", "interpolated_loss")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class References:
    """Reference algorithms on the evaluation set of a configured task."""

    eval_tasks: tasks.Tasks
    layers: int
    gd: references.GDReference  # one eta shared by `layers` steps, line-searched
    gd_closed_form: Optional[references.GDReference]  # one step, SPEC section 6
    gd_weights: models.Weights
    gd_eval: metrics.Evaluation  # readouts after 1..layers GD steps
    ols_loss: float
    ridge_lambda: float
    ridge_loss: float

    def as_dict(self) -> dict:
        closed = self.gd_closed_form
        return {
            "gd": {"eta": self.gd.eta, "loss": self.gd.loss, "steps": self.layers},
            "gd_closed_form": {"eta": closed.eta, "loss": closed.loss} if closed else None,
            "ols": {"loss": self.ols_loss},
            "ridge": {"lambda": self.ridge_lambda, "loss": self.ridge_loss},
        }


def compute_references(cfg: DictConfig) -> References:
    """Line-search GD's `eta` on a set of its own, then evaluate GD, OLS and ridge on the eval set."""
    t, layers = cfg.task, int(cfg.model.layers)
    sample = tasks.sampler(t)
    eval_key = jax.random.key(cfg.eval.seed)
    eval_tasks = sample(jax.random.fold_in(eval_key, 0), cfg.eval.n_tasks)
    search_tasks = sample(jax.random.fold_in(eval_key, 1), cfg.eval.line_search_tasks)
    closed = None
    if t.kind == "linear":
        closed = references.closed_form_gd(t.dim, t.n_context, t.x_dist, t.x_scale, t.w_std, t.noise_std, t.distractors)
        eta_max = 3.0 * closed.eta
    else:
        eta_max = 10.0
    eta = references.line_search_eta(search_tasks, layers, eta_max).eta
    etas = jnp.full((layers,), eta)
    input_dim = eval_tasks.x.shape[-1]
    gd_eval = jax.jit(metrics.evaluate, static_argnums=0)(
        functools.partial(references.gd_direct, etas_K=etas), eval_tasks
    )
    gd_loss = float(metrics.losses(gd_eval, eval_tasks.yq)[-1])
    lam = references.bayes_ridge_lambda(t.noise_std, t.w_std)
    ridge_losses = [
        float(references.loss(jax.jit(jax.vmap(functools.partial(references.ridge_predict, lam=lam)))(
            eval_tasks.x, eval_tasks.y, eval_tasks.xq)[:, 0], eval_tasks.yq))
        for lam in (0.0, lam)
    ]
    return References(
        eval_tasks=eval_tasks,
        layers=layers,
        gd=references.GDReference(eta=eta, loss=gd_loss),
        gd_closed_form=closed,
        gd_weights=references.gd_weights(etas, input_dim, t.n_context),
        gd_eval=gd_eval,
        ols_loss=ridge_losses[0],
        ridge_lambda=lam,
        ridge_loss=ridge_losses[1],
    )


def interpolates(model_cfg) -> bool:
    """The interpolated model (SPEC section 5) is defined for one-head linear-attention stacks
    (on the plain constructed tokens of the GD construction, checked in `make_evaluator`)."""
    return (model_cfg.heads == 1 and model_cfg.attention == "linear" and not model_cfg.layernorm
            and not model_cfg.mlp and not model_cfg.input_mlp)


def interpolate(weights: models.Weights, gd: models.Weights, input_dim: int) -> models.Weights:
    """Rescale `W_KQ` so that its x-block has mean diagonal 1 (the factor moves into `W_PV`),
    then average each product with the GD construction's (SPEC section 5)."""
    w_kq, w_pv = weights["w_kq"], weights["w_pv"]
    scale = jnp.mean(jnp.diagonal(w_kq[..., :input_dim, :input_dim], axis1=-2, axis2=-1), axis=-1)
    scale = scale[..., None, None]
    n = w_kq.shape[0]
    return {"w_kq": 0.5 * (w_kq / scale + gd["w_kq"][:n]), "w_pv": 0.5 * (w_pv * scale + gd["w_pv"][:n])}


def make_evaluator(graphdef: nnx.GraphDef, model_cfg, input_dim: int):
    """`(params[S], eval_tasks, gd_eval, gd_weights) -> metrics[S]`, compiled, vmapped over seeds."""
    with_interpolation = interpolates(model_cfg)

    def evaluate(params, eval_tasks, gd_eval, gd_weights):
        model = nnx.merge(graphdef, params)
        weights = model.weights()
        ev = metrics.evaluate(functools.partial(models.forward, model.arch, weights), eval_tasks)
        to_gd = metrics.alignment(ev, gd_eval)
        out = {"loss": metrics.losses(ev, eval_tasks.yq)[-1]}
        out.update({name: value[-1] for name, value in to_gd.items()})
        if with_interpolation and model.arch.layout == tokens.Layout():
            mixed = interpolate(weights, gd_weights, input_dim)
            preds = models.predict_batch(model.arch, mixed, eval_tasks.x, eval_tasks.y, eval_tasks.xq)
            out["interpolated_loss"] = references.loss(preds[:, -1], eval_tasks.yq)
        else:
            out["interpolated_loss"] = jnp.nan
        return out

    return jax.jit(jax.vmap(evaluate, in_axes=(0, None, None, None)))


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "not installed"


def environment() -> dict:
    device = jax.devices()[0]
    versions = {pkg: _version(pkg) for pkg in ("icl-gd", "jax", "jaxlib", "flax", "optax")}
    versions["python"] = platform.python_version()
    return {"device": f"{device.platform}:{device.device_kind}", "n_devices": jax.device_count(), "versions": versions}


def train(cfg: DictConfig, run_dir: Path, allow_empty_dir: bool = False, quiet: bool = False) -> RunResult:
    """Train `train.seeds` seeds of the configured model, tracking every metric against GD.

    Raises `TrainingDiverged` (after marking the run failed) if the loss stops being finite.
    """
    config_lib.validate(cfg)
    run = runs.RunDir.create(run_dir, cfg, allow_empty=allow_empty_dir)
    started = time.time()
    tc, n_seeds = cfg.train, int(cfg.train.seeds)
    summary = {"status": "running", "experiment": cfg.name, "seeds": n_seeds, **environment()}
    run.write_summary(summary)

    refs = compute_references(cfg)
    summary["references"] = refs.as_dict()
    input_dim = refs.eval_tasks.x.shape[-1]
    scale = config_lib.init_scale(cfg.model)
    layout = tokens.Layout.from_config(cfg.task, cfg.model)
    graphdef = models.graphdef(cfg.model, input_dim, scale, layout)
    optimizer = training.make_optimizer(tc)
    init_keys, data_keys = training.seed_keys(tc.seed, n_seeds)
    params, opt_state = training.init_states(cfg.model, input_dim, scale, optimizer, init_keys, layout)
    train_chunk = training.make_train_chunk(graphdef, optimizer, tasks.sampler(cfg.task), tc.batch_size)
    evaluator = make_evaluator(graphdef, cfg.model, input_dim)
    evaluate = lambda p: evaluator(p, refs.eval_tasks, refs.gd_eval, refs.gd_weights)  # noqa: E731
    gd_loss = refs.gd.loss

    def record(step: int, evaluated, train_losses) -> dict:
        host = jax.device_get(evaluated)
        if train_losses is not None:
            train_losses = np.asarray(train_losses)
            bad = ~np.isfinite(train_losses)
            if bad.any():
                seed, offset = np.argwhere(bad)[0]
                fail(step - train_losses.shape[1] + int(offset) + 1, int(seed), "training loss is not finite")
        if not np.all(np.isfinite(host["loss"])):
            fail(step, int(np.argmin(np.isfinite(host["loss"]))), "evaluation loss is not finite")
        rows = [{"step": step, "seed": s, "gd_loss": gd_loss, **{k: float(v[s]) for k, v in host.items()}}
                for s in range(n_seeds)]
        run.append_metrics(rows)
        return host

    def fail(step: int, seed: int, reason: str):
        summary.update(status="failed", failure={"step": step, "seed": seed, "reason": reason},
                       wall_time_s=time.time() - started)
        run.write_summary(summary)
        raise TrainingDiverged(f"run diverged at step {step} (seed {seed}): {reason}; marked failed in {run.path}")

    host = record(0, evaluate(params), None)
    pending = None  # the previous chunk's results, read only once the next chunk is dispatched
    with TrainProgress(tc.steps, enabled=bool(tc.progress) and not quiet) as progress:
        for start in range(0, tc.steps, tc.eval_every):
            n = min(tc.eval_every, tc.steps - start)
            params, opt_state, chunk_losses = train_chunk(params, opt_state, data_keys, start, n)
            evaluated = evaluate(params)
            if pending is not None:
                host = record(*pending)
                progress.update(pending[0], float(np.mean(pending[2][:, -1])))
            pending = (start + n, evaluated, chunk_losses)
        host = record(*pending)
        progress.update(pending[0], float(np.mean(pending[2][:, -1])))

    run.save_checkpoint(params, tc.steps)
    final = {name: metrics.mean_ci95(host[name]) for name in FINAL_METRICS if name != "gd_loss"}
    final["gd_loss"] = metrics.mean_ci95([gd_loss] * n_seeds)
    summary.update(status="completed", final={k: final[k] for k in FINAL_METRICS}, wall_time_s=time.time() - started)
    run.write_summary(summary)
    plots.training_curves(runs.load_metrics(run.path), summary, run.path / "plots" / "curves")
    for name in cfg.analyses:
        summary.setdefault("analyses", {})[name] = analyses.run(name, run.path)
    return RunResult(run.path, summary)

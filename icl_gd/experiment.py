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

FINAL_METRICS = ("loss", "gd_loss", "preds_diff", "model_cos", "model_diff", "interpolated_loss",
                 "gdpp_loss", "preds_diff_gdpp", "model_cos_gdpp", "model_diff_gdpp")
PER_LAYER_METRICS = ("loss", "gd_loss", "gdpp_loss", "preds_diff", "model_cos", "preds_diff_gdpp", "model_cos_gdpp")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class References:
    """Reference algorithms on the evaluation set of a configured task.

    GD and GD++ are evaluated with one readout per step (`[T, layers]`), so that layer `k` of a
    model is compared with `k` steps of each.
    """

    eval_tasks: tasks.Tasks
    layers: int
    gd: references.GDReference  # one eta shared by `layers` steps, line-searched
    gd_closed_form: Optional[references.GDReference]  # one step, SPEC section 6
    gd_weights: models.Weights
    gd_eval: metrics.Evaluation
    gdpp: references.GDPP  # (eta_k, gamma_k) fitted on the task loss
    gdpp_shared: bool
    gdpp_eval: metrics.Evaluation
    ols_loss: float
    ridge_lambda: float
    ridge_loss: float

    def as_dict(self) -> dict:
        closed = self.gd_closed_form
        return {
            "gd": {"eta": self.gd.eta, "loss": self.gd.loss, "steps": self.layers},
            "gd_closed_form": {"eta": closed.eta, "loss": closed.loss} if closed else None,
            "gdpp": {"etas": np.asarray(self.gdpp.etas).tolist(), "gammas": np.asarray(self.gdpp.gammas).tolist(), "loss": self.gdpp.loss,
                     "steps": self.layers, "shared": self.gdpp_shared},
            "ols": {"loss": self.ols_loss},
            "ridge": {"lambda": self.ridge_lambda, "loss": self.ridge_loss},
        }


def _evaluate_steps(weights: models.Weights, layers: int, eval_tasks: tasks.Tasks) -> metrics.Evaluation:
    """Readouts (and sensitivities) of an LSA construction after each of `layers` steps."""
    arch = models.Architecture(layers=layers)
    return jax.jit(lambda w, t: metrics.evaluate(functools.partial(models.forward, arch, w), t))(weights, eval_tasks)


@jax.jit
def _ols_ridge_losses(t: tasks.Tasks, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """OLS and ridge losses on `t`, both read from one SVD per task (`references.ridge_spectrum`)."""
    spec = jax.vmap(references.ridge_spectrum)(t.x, t.y)
    ridge_at = jax.vmap(references.ridge_from_spectrum, in_axes=(0, 0, None))
    return references.loss(ridge_at(spec, t.xq, 0.0), t.yq), references.loss(ridge_at(spec, t.xq, lam), t.yq)


def evaluation_tasks(cfg: DictConfig, **changes) -> tasks.Tasks:
    """The fixed evaluation set of a config (`changes` shift the task law, same key)."""
    return tasks.sampler(cfg.task, **changes)(jax.random.fold_in(jax.random.key(cfg.eval.seed), 0), cfg.eval.n_tasks)


def compute_references(cfg: DictConfig) -> References:
    """Line-search GD's `eta` and fit GD++ on data of their own, then evaluate GD, GD++, OLS and
    ridge on the evaluation set (SPEC sections 4-6)."""
    t, ev, layers = cfg.task, cfg.eval, int(cfg.model.layers)
    sample = tasks.sampler(t)
    eval_key = jax.random.key(ev.seed)
    eval_tasks = evaluation_tasks(cfg)
    search_tasks = sample(jax.random.fold_in(eval_key, 1), ev.line_search_tasks)
    closed = None
    if t.kind == "linear":
        closed = references.closed_form_gd(t.dim, t.n_context, t.x_dist, t.x_scale, t.w_std, t.noise_std, t.distractors)
        eta_max = 3.0 * closed.eta
    else:
        eta_max = 10.0
    eta = references.line_search_eta(search_tasks, layers, eta_max).eta
    input_dim = eval_tasks.x.shape[-1]
    gd_w = references.gd_weights(jnp.full((layers,), eta), input_dim, t.n_context)
    gd_eval = _evaluate_steps(gd_w, layers, eval_tasks)
    shared = bool(cfg.model.recurrent)
    if layers == 1 or ev.gdpp_steps == 0:
        # One GD++ step is one GD step: gamma acts on the inputs only after the label update.
        n = 1 if shared else layers
        gdpp = references.GDPP(jnp.full((n,), eta), jnp.zeros((n,)), float(metrics.losses(gd_eval, eval_tasks.yq)[-1]))
    else:
        gdpp = references.fit_gdpp(sample, layers, shared, eta, jax.random.fold_in(eval_key, 2), dim=input_dim,
                                   n_context=t.n_context, train_steps=ev.gdpp_steps, batch=ev.gdpp_batch,
                                   lr=ev.gdpp_lr, eval_tasks=eval_tasks)
    gdpp_eval = _evaluate_steps(references.gdpp_weights(gdpp.etas, gdpp.gammas, input_dim, t.n_context), layers, eval_tasks)
    lam = references.bayes_ridge_lambda(t.noise_std, t.w_std)
    ols_loss, ridge_loss = _ols_ridge_losses(eval_tasks, lam)
    return References(
        eval_tasks=eval_tasks,
        layers=layers,
        gd=references.GDReference(eta=eta, loss=float(metrics.losses(gd_eval, eval_tasks.yq)[-1])),
        gd_closed_form=closed,
        gd_weights=gd_w,
        gd_eval=gd_eval,
        gdpp=gdpp._replace(loss=float(metrics.losses(gdpp_eval, eval_tasks.yq)[-1])),
        gdpp_shared=shared,
        gdpp_eval=gdpp_eval,
        ols_loss=float(ols_loss),
        ridge_lambda=lam,
        ridge_loss=float(ridge_loss),
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
    """`(params[S], refs) -> metrics[S]`, compiled and vmapped over seeds. Every metric is a
    `[layers]` vector (readout after each layer against as many GD / GD++ steps)."""
    with_interpolation = interpolates(model_cfg)

    def evaluate(params, eval_tasks, gd_eval, gdpp_eval, gd_weights):
        model = nnx.merge(graphdef, params)
        weights = model.weights()
        ev = metrics.evaluate(functools.partial(models.forward, model.arch, weights), eval_tasks)
        out = {"loss": metrics.losses(ev, eval_tasks.yq)}
        out.update(metrics.alignment(ev, gd_eval))
        out.update({f"{name}_gdpp": value for name, value in metrics.alignment(ev, gdpp_eval).items()})
        if with_interpolation and model.arch.layout == tokens.Layout():
            mixed = interpolate(weights, gd_weights, input_dim)
            preds = models.predict_batch(model.arch, mixed, eval_tasks.x, eval_tasks.y, eval_tasks.xq)
            out["interpolated_loss"] = 0.5 * jnp.mean((preds - eval_tasks.yq[:, None]) ** 2, axis=0)
        else:
            out["interpolated_loss"] = jnp.full(out["loss"].shape, jnp.nan)
        return out

    compiled = jax.jit(jax.vmap(evaluate, in_axes=(0, None, None, None, None)))
    return lambda params, refs: compiled(params, refs.eval_tasks, refs.gd_eval, refs.gdpp_eval, refs.gd_weights)


def metric_rows(step: int, evaluated: dict, refs: References) -> list[dict]:
    """`metrics.csv` rows, one per seed: final-readout metrics, then `layer<k>_<metric>` columns."""
    gd_losses = np.asarray(metrics.losses(refs.gd_eval, refs.eval_tasks.yq))
    gdpp_losses = np.asarray(metrics.losses(refs.gdpp_eval, refs.eval_tasks.yq))
    n_seeds, layers = np.asarray(evaluated["loss"]).shape
    rows = []
    for s in range(n_seeds):
        per_layer = {name: np.asarray(value)[s] for name, value in evaluated.items()}
        per_layer.update(gd_loss=gd_losses, gdpp_loss=gdpp_losses)
        row = {"step": step, "seed": s}
        row.update({name: float(per_layer[name][-1]) for name in FINAL_METRICS})
        if layers > 1:
            row.update({f"layer{k + 1}_{name}": float(per_layer[name][k]) for k in range(layers) for name in PER_LAYER_METRICS})
        rows.append(row)
    return rows


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
    """Train `train.seeds` seeds of the configured model, tracking every metric against GD and
    GD++, per layer. Raises `TrainingDiverged` (after marking the run failed) if the loss stops
    being finite.
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

    def record(step: int, evaluated, train_losses) -> list[dict]:
        if train_losses is not None:
            train_losses = np.asarray(train_losses)
            bad = ~np.isfinite(train_losses)
            if bad.any():
                seed, offset = np.argwhere(bad)[0]
                fail(step - train_losses.shape[1] + int(offset) + 1, int(seed), "training loss is not finite")
        rows = metric_rows(step, jax.device_get(evaluated), refs)
        bad_seeds = [row["seed"] for row in rows if not np.isfinite(row["loss"])]
        if bad_seeds:
            fail(step, bad_seeds[0], "evaluation loss is not finite")
        run.append_metrics(rows)
        return rows

    def fail(step: int, seed: int, reason: str):
        summary.update(status="failed", failure={"step": step, "seed": seed, "reason": reason},
                       wall_time_s=time.time() - started)
        run.write_summary(summary)
        raise TrainingDiverged(f"run diverged at step {step} (seed {seed}): {reason}; marked failed in {run.path}")

    rows = record(0, evaluator(params, refs), None)
    pending = None  # the previous chunk's results, read only once the next chunk is dispatched
    with TrainProgress(tc.steps, enabled=bool(tc.progress) and not quiet) as progress:
        for start in range(0, tc.steps, tc.eval_every):
            n = min(tc.eval_every, tc.steps - start)
            params, opt_state, chunk_losses = train_chunk(params, opt_state, data_keys, start, n)
            evaluated = evaluator(params, refs)
            if pending is not None:
                rows = record(*pending)
                progress.update(pending[0], float(np.mean(pending[2][:, -1])))
            pending = (start + n, evaluated, chunk_losses)
        rows = record(*pending)
        progress.update(pending[0], float(np.mean(pending[2][:, -1])))

    run.save_checkpoint(params, tc.steps)
    summary.update(status="completed", final={name: metrics.mean_ci95([r[name] for r in rows]) for name in FINAL_METRICS},
                   per_layer=per_layer_summary(rows, refs.layers), wall_time_s=time.time() - started)
    run.write_summary(summary)
    df = runs.load_metrics(run.path)
    plots.training_curves(df, summary, run.path / "plots" / "curves")
    if refs.layers > 1:
        plots.per_layer(df, summary, run.path / "plots" / "per_layer")
    for name in cfg.analyses:
        summary.setdefault("analyses", {})[name] = analyses.run(name, run.path)
    return RunResult(run.path, summary)


def per_layer_summary(rows: list[dict], layers: int) -> list[dict]:
    """For each layer `k`: the readout after layer `k` against `k` GD and GD++ steps, across seeds."""
    names = ("loss", "gd_loss", "gdpp_loss", "model_cos", "model_cos_gdpp")
    if layers == 1:
        return [{name: metrics.mean_ci95([r[name] for r in rows]) for name in names}]
    return [{name: metrics.mean_ci95([r[f"layer{k}_{name}"] for r in rows]) for name in names} for k in range(1, layers + 1)]

"""Post-training analyses of a finished run directory, by name.

An analysis is a function `run_dir -> dict` that reads the run (`runs.load_params`, its
config and metrics), writes its own files under `run_dir/analyses/<name>/` and returns a
JSON-ready summary, stored in `summary.json` under `analyses.<name>`. Experiments list the
analyses to run after training in `analyses: [...]`; `icl-gd analyze RUN_DIR NAME` runs one
later. `explain` (issue 5, numerics in `icl_gd.explain`) writes `RUN_DIR/explain/`, the folder
`icl-gd explain` writes and `icl-gd compare` reads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from icl_gd import explain as explain_lib
from icl_gd import metrics, models, plots, references, runs, tasks, tokens

Analysis = Callable[[Path], dict]
REGISTRY: dict[str, Analysis] = {}


def register(name: str) -> Callable[[Analysis], Analysis]:
    def add(fn: Analysis) -> Analysis:
        REGISTRY[name] = fn
        return fn

    return add


def output_dir(run_dir: Path, name: str) -> Path:
    path = Path(run_dir) / "analyses" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(name: str, run_dir: Path) -> dict:
    """Run analysis `name` on `run_dir` and record its result in the run's summary."""
    result = REGISTRY[name](Path(run_dir))
    summary = runs.load_summary(run_dir)
    summary.setdefault("analyses", {})[name] = result
    runs.write_json(Path(run_dir) / runs.SUMMARY_FILE, summary)
    return result


def _seed_predictions(graphdef, params, t) -> jax.Array:
    """Final readout of every seed's trained model on tasks `t`: `[S, T]`."""

    def one(p):
        model = nnx.merge(graphdef, p)
        return models.predict_batch(model.arch, model.weights(), t.x, t.y, t.xq)[:, -1]

    return jax.vmap(one)(params)


def _table(out: Path, name: str, rows: list[dict]) -> None:
    pd.DataFrame(rows).to_csv(out / f"{name}.csv", index=False)
    runs.write_json(out / f"{name}.json", {"rows": rows})


# Out-of-distribution evaluation (SPEC section 1): shifts of the training task law.
INPUT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
WEIGHT_SCALES = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0)
INPUT_LAWS = ("uniform", "gaussian", "laplace", "exponential")


def ood_shifts(task_cfg) -> list[tuple[str, float | str, dict]]:
    """`(family, value, sampler changes)` for each shift: inputs scaled by a factor, weights scaled
    by a factor, and inputs from each law at the training inputs' variance."""
    var = tasks.input_law(task_cfg.x_dist, task_cfg.x_scale).var
    return (
        [("input_scale", c, {"x_scale": c * task_cfg.x_scale}) for c in INPUT_SCALES]
        + [("weight_scale", c, {"w_std": c * task_cfg.w_std}) for c in WEIGHT_SCALES]
        + [("input_law", law, {"x_dist": law, "x_scale": math.sqrt(var / tasks.input_law(law, 1.0).var)})
           for law in INPUT_LAWS]
    )


@register("ood")
def ood(run_dir: Path) -> dict:
    """Loss under each shift of `ood_shifts`, applied to the draws of the run's evaluation set (so
    the unshifted rows repeat the run's final losses), for the trained model (every seed) and the
    run's references: GD with its line-searched eta, GD++ with its fitted `(eta_k, gamma_k)` (both
    fitted on the training law), OLS and ridge (Bayes-optimal lambda of the training law).
    Writes `ood.csv`, `ood.json` and `ood.png/pdf`."""
    from icl_gd import experiment  # experiment imports this module

    cfg, graphdef, params = runs.load_params(run_dir)
    if cfg.task.kind != "linear":
        raise ValueError("analysis ood: needs linear regression tasks (task.kind=linear)")
    refs = runs.load_summary(run_dir)["references"]
    steps = int(cfg.model.layers)
    etas = jnp.full((steps,), refs["gd"]["eta"])
    gdpp_etas, gdpp_gammas = (jnp.broadcast_to(jnp.asarray(refs["gdpp"][k]), (steps,)) for k in ("etas", "gammas"))
    lam = refs["ridge"]["lambda"]
    def per_task(x, y, xq):
        spec = references.ridge_spectrum(x, y)  # one SVD for OLS and ridge (see ridge_spectrum)
        return {"gd": references.gd_direct(x, y, xq, etas)[-1],
                "gdpp": references.gdpp_direct(x, y, xq, gdpp_etas, gdpp_gammas)[-1],
                "ols": references.ridge_from_spectrum(spec, xq), "ridge": references.ridge_from_spectrum(spec, xq, lam)}

    @jax.jit
    def shifted_losses(t):
        out = {name: references.loss(preds, t.yq) for name, preds in jax.vmap(per_task)(t.x, t.y, t.xq).items()}
        out["model"] = jax.vmap(lambda p: references.loss(p, t.yq))(_seed_predictions(graphdef, params, t))
        return out

    rows = []
    for family, value, changes in ood_shifts(cfg.task):
        host = jax.device_get(shifted_losses(experiment.evaluation_tasks(cfg, **changes)))
        model = metrics.mean_ci95(host.pop("model"))
        rows.append({"shift": family, "value": value, "model": model["mean"], "model_lo": model["ci95"][0],
                     "model_hi": model["ci95"][1], **{k: float(v) for k, v in host.items()}})
    out = output_dir(run_dir, "ood")
    _table(out, "ood", rows)
    plots.ood_curves(pd.DataFrame(rows), out / "ood")
    return {"rows": rows}


# Non-linear regression through the input MLP (SPEC section 1): "MLP + GD" and the partial cos.
SINE_EXAMPLES = 4
SINE_GRID = 200


def _feature_tasks(weights: models.Weights, t: tasks.Tasks) -> tasks.Tasks:
    """The tasks seen through the input MLP: features `phi(x)` in place of the inputs."""
    return t._replace(x=models.embed_inputs(weights, t.x), xq=models.embed_inputs(weights, t.xq))


def mlp_gd(arch: models.Architecture, weights: models.Weights, eval_tasks: tasks.Tasks, search_tasks: tasks.Tasks,
           steps: int) -> dict[str, jax.Array]:
    """A model with an input MLP against "MLP + GD": `steps` GD steps on its own learned features
    `phi(x)`, `eta` line-searched on `search_tasks` seen through the same features. Returns both
    losses, the eta, OLS on the features, preds diff and the partial cos: the cosine between the
    sensitivities `d y_hat / d phi(x_q)` of the model's attention layers and of GD on the
    features, i.e. the model cos restricted to what GD on the learned features can express (the
    input MLP shared by both is factored out)."""
    on_features = dataclasses.replace(arch, input_mlp=False)
    search = _feature_tasks(weights, search_tasks)
    n_context = search.x.shape[-2]
    eta_max = 2.0 * n_context / jnp.mean(jnp.sum(search.x**2, -1))
    eta, _ = references.minimize_scalar(lambda e: references.gd_loss(jnp.full((steps,), e), search), 0.0, eta_max)
    feats = _feature_tasks(weights, eval_tasks)
    model_ev = metrics.evaluate(functools.partial(models.forward, on_features, weights), feats)
    gd_ev = metrics.evaluate(lambda x, y, xq: references.gd_direct(x, y, xq, jnp.full((steps,), eta))[-1:], feats)
    ols = jax.vmap(references.ridge_predict)(feats.x, feats.y, feats.xq)[:, 0]
    align = {k: v[-1] for k, v in metrics.alignment(model_ev, gd_ev).items()}
    return {"loss": metrics.losses(model_ev, eval_tasks.yq)[-1], "mlp_gd_loss": metrics.losses(gd_ev, eval_tasks.yq)[0],
            "mlp_gd_eta": eta, "mlp_ols_loss": references.loss(ols, eval_tasks.yq),
            "preds_diff": align["preds_diff"], "partial_cos": align["model_cos"]}


@register("sine")
def sine(run_dir: Path) -> dict:
    """`mlp_gd` for every seed of a run with an input MLP, on its evaluation set (eta searched on
    its line-search set), and example fits with the learned features. Writes `sine.csv/json/png/pdf`."""
    cfg, graphdef, params = runs.load_params(run_dir)
    if not cfg.model.input_mlp:
        raise ValueError("analysis sine: needs a model with an input MLP (model.input_mlp=true)")
    ev, steps = cfg.eval, int(cfg.model.layers)
    sample = tasks.sampler(cfg.task)
    eval_key = jax.random.key(ev.seed)
    eval_tasks = sample(jax.random.fold_in(eval_key, 0), ev.n_tasks)
    search_tasks = sample(jax.random.fold_in(eval_key, 1), ev.line_search_tasks)

    def per_seed(p):
        model = nnx.merge(graphdef, p)
        return mlp_gd(model.arch, model.weights(), eval_tasks, search_tasks, steps)

    per = jax.device_get(jax.jit(jax.vmap(per_seed))(params))
    rows = [{"seed": s, **{k: float(v[s]) for k, v in per.items()}} for s in range(int(cfg.train.seeds))]
    out = output_dir(run_dir, "sine")
    _table(out, "sine", rows)
    grid = jnp.linspace(-5.0, 5.0, SINE_GRID)
    plots.sine_fits(*jax.device_get(_sine_curves(graphdef, params, eval_tasks, grid, per["mlp_gd_eta"][0], steps)),
                    np.asarray(grid), out / "sine")
    return {name: metrics.mean_ci95(per[name]) for name in per}


def _sine_curves(graphdef, params, t: tasks.Tasks, grid: jax.Array, eta, steps: int):
    """For the first seed and `SINE_EXAMPLES` tasks: the model's and MLP + GD's predictions at
    every query on `grid`, the context points, and the learned features on `grid`."""
    model = nnx.merge(graphdef, jax.tree_util.tree_map(lambda a: a[0], params))
    weights = model.weights()
    ex = jax.tree_util.tree_map(lambda a: a[:SINE_EXAMPLES], t)
    xq_G = grid[:, None]

    def curves(x, y):
        feats, feats_q = models.embed_inputs(weights, x), models.embed_inputs(weights, xq_G)
        net = jax.vmap(lambda xq: models.forward(model.arch, weights, x, y, xq)[-1])(xq_G)
        gd = jax.vmap(lambda fq: references.gd_direct(feats, y, fq, jnp.full((steps,), eta))[-1])(feats_q)
        return net, gd

    net, gd = jax.vmap(curves)(ex.x, ex.y)
    return net, gd, ex.x[..., 0], ex.y, models.embed_inputs(weights, xq_G)


# Classic tokens (SPEC section 2): does the first (causal softmax) layer learn to copy?
COPY_TASKS = 256


def token_dependence(weights: models.Weights, layout: tokens.Layout, seq_MxD: jax.Array) -> jax.Array:
    """`[M, M]`: Frobenius norm of `d update_j / d content_i`, the copy layer's update of token j
    (its output minus its input) against the data part `(x, y)` of token i (positions held fixed)."""
    content, pos = seq_MxD[:, : seq_MxD.shape[1] - layout.positions], seq_MxD[:, seq_MxD.shape[1] - layout.positions:]

    def update(c):
        seq = jnp.concatenate([c, pos], axis=-1)
        return models.copy_layer(weights, seq) - seq

    jac = jax.jacrev(update)(content)  # [M, D, M, C]
    return jnp.sqrt(jnp.sum(jac**2, axis=(1, 3)))


def dependence_shares(norms_MxM: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """Share of the squared dependence of each kind of token's update on itself, on its left
    neighbour and on the rest, averaged over the tokens of that kind (x, y and the query)."""
    sq = norms_MxM**2
    m = sq.shape[0]
    idx = jnp.arange(m)
    total = sq.sum(1)
    own = sq[idx, idx] / total
    left = jnp.where(idx > 0, sq[idx, jnp.maximum(idx - 1, 0)], 0.0) / total
    kinds = {"x": (idx % 2 == 0) & (idx > 0) & (idx < m - 1), "y": idx % 2 == 1, "query": idx == m - 1}
    return {kind: {"self": jnp.mean(own, where=sel), "neighbour": jnp.mean(left, where=sel),
                   "rest": jnp.mean(1.0 - own - left, where=sel)} for kind, sel in kinds.items()}


def copy_fit(updates_TxD: jax.Array, x_Txd: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The best linear map (least squares with an intercept) from `x` to the updates: the share
    of the updates' variance it explains (1 when a layer writes a linear image of `x` and nothing
    else), and its singular values, largest first (how many directions of `x` are copied)."""
    target = updates_TxD - updates_TxD.mean(0)
    design = jnp.concatenate([x_Txd, jnp.ones_like(x_Txd[:, :1])], axis=-1)
    coef = jnp.linalg.lstsq(design, target)[0]
    r2 = 1.0 - jnp.sum((target - design @ coef) ** 2) / jnp.maximum(jnp.sum(target**2), 1e-12)
    return r2, jnp.linalg.svd(coef[:-1], compute_uv=False)


@register("copy")
def copy_dependence(run_dir: Path) -> dict:
    """Classic tokens: how much the first layer's update of each token depends on the token
    itself, on its left neighbour and on the rest (Jacobian norms, `token_dependence`), and how
    much of the label tokens' update is a linear function of their inputs `x_i` (`copy_r2`) and
    the singular values of that map per seed (`copy_singular_values`: a full copy has `d` of
    comparable size, a low-rank one copies only some directions of `x_i`). A copying layer gives
    label tokens a neighbour share and `copy_r2` near 1.
    Writes `copy.csv/json/png/pdf`."""
    cfg, graphdef, params = runs.load_params(run_dir)
    layout = tokens.Layout.from_config(cfg.task, cfg.model)
    if layout.kind != "classic":
        raise ValueError("analysis copy: needs classic tokens (task.tokens=classic)")
    d = int(cfg.model.input_mlp_features) if cfg.model.input_mlp else int(cfg.task.dim)
    t = tasks.sampler(cfg.task)(jax.random.fold_in(jax.random.key(cfg.eval.seed), 0), COPY_TASKS)

    def per_seed(p):
        model = nnx.merge(graphdef, p)
        weights = model.weights()

        def sequence(x, y, xq):
            if model.arch.input_mlp:
                x, xq = models.embed_inputs(weights, x), models.embed_inputs(weights, xq)
            ctx, query = tokens.build(layout, x, y, xq)
            return jnp.concatenate([ctx, query[None]]), x

        seqs, xs = jax.vmap(sequence)(t.x, t.y, t.xq)
        norms = jax.lax.map(functools.partial(token_dependence, weights, layout), seqs, batch_size=32).mean(0)
        moved = (jax.vmap(functools.partial(models.copy_layer, weights))(seqs) - seqs)[:, 1:-1:2]  # label tokens
        return norms, dependence_shares(norms), *copy_fit(moved.reshape(-1, moved.shape[-1]), xs.reshape(-1, d))

    norms, shares, r2, singular = jax.device_get(jax.jit(jax.vmap(per_seed))(params))
    rows = [{"seed": s, "token": kind, **{part: float(v[s]) for part, v in parts.items()}}
            for s in range(int(cfg.train.seeds)) for kind, parts in shares.items()]
    out = output_dir(run_dir, "copy")
    _table(out, "copy", rows)
    plots.token_dependence(np.asarray(norms[0]), pd.DataFrame(rows), out / "copy")
    return {"shares": {kind: {part: metrics.mean_ci95(v) for part, v in parts.items()} for kind, parts in shares.items()},
            "copy_r2": metrics.mean_ci95(r2), "copy_singular_values": singular}

EXPLAIN_DIR, EXPLAIN_FILE = "explain", "explain.json"
MIN_EXPLAIN_TASKS = 64


class ExplainError(ValueError):
    """Bad input to `explain_run`, in one line naming the argument and its allowed values."""


def _check_explain(run_dir: Path, seeds: Optional[Sequence[int]], n_tasks: int, iters: int, out: Path):
    """Everything `explain_run` needs, checked before any work: returns the run's config and seeds."""
    from icl_gd import runs

    summary_file = run_dir / runs.SUMMARY_FILE
    if not summary_file.exists() or not (run_dir / "checkpoint").exists():
        raise ExplainError(f"RUN_DIR: {run_dir} is not a run directory (no {runs.SUMMARY_FILE} / checkpoint)")
    status = runs.load_summary(run_dir).get("status")
    if status != "completed":
        raise ExplainError(f"RUN_DIR: {run_dir} is a {status} run; allowed: a completed run")
    cfg = runs.load_config(run_dir)
    if cfg.task.kind != "linear":
        raise ExplainError(f"task.kind: explain tests linear-regression hypotheses; got {cfg.task.kind!r}, allowed: linear")
    n_seeds = int(cfg.train.seeds)
    seeds = list(range(n_seeds)) if seeds is None else [int(s) for s in seeds]
    if not seeds or any(not 0 <= s < n_seeds for s in seeds):
        raise ExplainError(f"--seed: got {seeds}; allowed: seeds in 0..{n_seeds - 1} (this run has {n_seeds})")
    fams, _ = explain_lib.families(int(cfg.task.dim), int(cfg.model.layers), float(cfg.task.noise_std))
    least = max(MIN_EXPLAIN_TASKS, 2 * max(f.n_params for f in fams))
    if n_tasks < least:
        raise ExplainError(f"--tasks: got {n_tasks}; allowed: an integer >= {least} (twice the largest family's parameters)")
    if iters < 1:
        raise ExplainError(f"--iters: got {iters}; allowed: an integer >= 1")
    if out.exists():
        raise ExplainError(f"--out: {out} already exists; explain never overwrites, pass --out NEW_DIR")
    return cfg, seeds


def explain_run(run_dir: Path, *, seeds: Optional[Sequence[int]] = None, n_tasks: int = 2048, iters: int = 50,
                out: Optional[Path] = None) -> tuple[dict, Path]:
    """Run `icl_gd.explain` on the trained model of the given seeds (all by default) and write
    `explain.json`, the ranking figure, the weight heatmaps (first seed) and, for deep models,
    the per-layer figure to `out` (default `RUN_DIR/explain`), which must not exist. Files appear
    all at once: they are written to a temporary folder that is then renamed."""
    import jax
    import numpy as np
    from flax import nnx

    from icl_gd import models, plots, runs

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / EXPLAIN_DIR
    cfg, seeds = _check_explain(run_dir, seeds, n_tasks, iters, out)
    started = time.time()
    _, graphdef, params = runs.load_params(run_dir)
    params_S = jax.tree_util.tree_map(lambda a: a[np.asarray(seeds)], params)

    def model_fn(p, x, y, xq):
        model = nnx.merge(graphdef, p)
        return models.forward(model.arch, model.weights(), x, y, xq)

    key = jax.random.fold_in(jax.random.key(int(cfg.eval.seed)), 2)  # 0 and 1: the eval and line-search sets
    report = explain_lib.explain(model_fn, params_S, cfg.task, key, steps=int(cfg.model.layers), n_tasks=n_tasks,
                                 iters=iters)
    weights = jax.device_get(jax.vmap(lambda p: nnx.merge(graphdef, p).weights())(params_S))
    n_context = int(cfg.task.n_context)
    report.update(
        run=str(run_dir), experiment=runs.load_summary(run_dir).get("experiment"), seed_ids=seeds,
        weights={"per_seed": [explain_lib.weight_structure(weights["w_kq"][i], weights["w_pv"][i], n_context)
                              for i in range(len(seeds))]},
        wall_time_s=time.time() - started,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        runs.write_json(tmp / EXPLAIN_FILE, report)
        plots.explain_ranking(report, tmp / "ranking")
        plots.weight_heatmaps(weights["w_kq"][0], weights["w_pv"][0], tmp / "weights",
                              f"{report['experiment']}, seed {seeds[0]}")
        if report["steps"] > 1:
            plots.explain_layers(report, tmp / "layers")
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report, out


@register("explain")
def explain(run_dir: Path) -> dict:
    """Which algorithm the trained model runs (issue 5), on every seed; files in RUN_DIR/explain/."""
    report, out = explain_run(run_dir)
    rank = report["ranking"]
    return {"winner": rank["winner"], "runner_up": rank["runner_up"], "margin": rank["margin"],
            "explains": report["explains"], "verdict": report["verdict"], "file": str(out / EXPLAIN_FILE)}


@register("depth_extrapolation")
def depth_extrapolation(run_dir: Path) -> dict:
    """Iterate a trained recurrent layer up to `eval.extrapolate_to` times (each update scaled by
    `eval.damping`) and compare with as many GD and GD++ steps, with the run's own `eta` and
    fitted GD++ scalars (SPEC section 4), on the run's evaluation set."""
    from icl_gd import experiment  # experiment imports this module

    cfg, graphdef, params = runs.load_params(run_dir)
    refs = runs.load_summary(run_dir)["references"]
    if not cfg.model.recurrent:
        raise ValueError("depth_extrapolation: model.recurrent must be true (a weight-tied model)")
    n, damping, trained = int(cfg.eval.extrapolate_to), float(cfg.eval.damping), int(cfg.model.layers)
    t = experiment.evaluation_tasks(cfg)
    dim, n_context = t.x.shape[-1], cfg.task.n_context

    def evaluate(arch, weights):
        return metrics.evaluate(lambda x, y, xq: models.forward(arch, weights, x, y, xq), t)

    arch = dataclasses.replace(models.Architecture.from_config(cfg.model), layers=n)

    @jax.jit
    def model_eval(seed_params):
        weights = nnx.merge(graphdef, seed_params).weights()
        return evaluate(arch, {**weights, "w_pv": damping * weights["w_pv"]})

    gd_eval = jax.jit(evaluate, static_argnums=0)(models.Architecture(layers=n),
                                                  references.gd_weights(jnp.full((1,), refs["gd"]["eta"]), dim, n_context))
    gdpp_weights = references.gdpp_weights(jnp.asarray(refs["gdpp"]["etas"][:1]), jnp.asarray(refs["gdpp"]["gammas"][:1]), dim, n_context)
    gdpp_eval = jax.jit(evaluate, static_argnums=0)(models.Architecture(layers=n), gdpp_weights)
    rows = []
    for seed in range(cfg.train.seeds):
        ev = model_eval(jax.tree_util.tree_map(lambda a: a[seed], params))
        to_gd, to_gdpp = metrics.alignment(ev, gd_eval), metrics.alignment(ev, gdpp_eval)
        loss = metrics.losses(ev, t.yq)
        rows += [{"seed": seed, "iterations": k + 1, "loss": float(loss[k]), "model_cos": float(to_gd["model_cos"][k]),
                  "model_cos_gdpp": float(to_gdpp["model_cos"][k]), "preds_diff_gdpp": float(to_gdpp["preds_diff"][k])}
                 for k in range(n)]
    df = pd.DataFrame(rows)
    gd_loss, gdpp_loss = np.asarray(metrics.losses(gd_eval, t.yq)), np.asarray(metrics.losses(gdpp_eval, t.yq))
    df["gd_loss"] = gd_loss[df["iterations"] - 1]
    df["gdpp_loss"] = gdpp_loss[df["iterations"] - 1]
    out = output_dir(run_dir, "depth_extrapolation")
    df.to_csv(out / "depth_extrapolation.csv", index=False)
    plots.depth_extrapolation(df, trained, damping, out / "depth_extrapolation")
    mean = df.groupby("iterations").mean(numeric_only=True)
    at = sorted({trained, min(2 * trained, n), n})
    return {
        "trained_layers": trained,
        "iterations": n,
        "damping": damping,
        "at": {str(k): {name: float(mean.loc[k, name]) for name in ("loss", "gd_loss", "gdpp_loss", "model_cos", "model_cos_gdpp")}
               for k in at},
        "best_iterations": int(mean["loss"].idxmin()),
        "best_loss": float(mean["loss"].min()),
    }

"""Post-training analyses of a finished run directory, by name.

An analysis is a function `run_dir -> dict` that reads the run (`runs.load_params`, its
config and metrics), writes its own files under `run_dir/analyses/<name>/` and returns a
JSON-ready summary, stored in `summary.json` under `analyses.<name>`. Experiments list the
analyses to run after training in `analyses: [...]`; `icl-gd analyze RUN_DIR NAME` runs one
later. `explain` (issue 5, numerics in `icl_gd.explain`) writes `RUN_DIR/explain/`, the folder
`icl-gd explain` writes and `icl-gd compare` reads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from icl_gd import explain as explain_lib

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
    from icl_gd import runs

    result = REGISTRY[name](Path(run_dir))
    summary = runs.load_summary(run_dir)
    summary.setdefault("analyses", {})[name] = result
    runs.write_json(Path(run_dir) / runs.SUMMARY_FILE, summary)
    return result


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
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    import pandas as pd
    from flax import nnx

    from icl_gd import experiment, metrics, models, plots, references, runs

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

"""Post-training analyses of a finished run directory, by name.

An analysis is a function `run_dir -> dict` that reads the run (`runs.load_params`, its
config and metrics), writes its own files under `run_dir/analyses/<name>/` and returns a
JSON-ready summary, stored in `summary.json` under `analyses.<name>`. Experiments list the
analyses to run after training in `analyses: [...]`; `icl-gd analyze RUN_DIR NAME` runs one
later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

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

"""Per-layer algorithm matching (docs/science.md "Per-layer algorithm matching"; Fu et al. 2023):
which number of steps `j` of GD, GD++ and Newton-Schulz does the readout after each layer `k` of a
trained model match best, and how closely?

Every algorithm with `j` steps runs with its own task-optimal parameters, fitted to the labels of
tasks of its own and never to the model, so that no free parameter flatters a match: GD's `eta`
and Newton-Schulz's `alpha` line-searched for `j` steps, GD++'s `(eta_k, gamma_k)` (one pair per
step, or one shared pair for weight-tied models) by Levenberg-Marquardt on the task loss. Each
layer's readout is then compared with the algorithm after each `j`, seed by seed: R^2 of the
predictions (`explain.agreement`) and model cos (docs/science.md section 5).

Pure functions of arrays, keys and static sizes; the run directory lives in `icl_gd.analyses`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from icl_gd import explain, metrics, references
from icl_gd.tasks import Tasks

MIN_STEPS = 8  # GD and GD++ run j = 1..max(2K, MIN_STEPS) steps against a K-layer model
ETA_RANGE = 2.0  # line searches run over [0, ETA_RANGE / E[x^2]]: past every stable step size
FIT_ITERS = 30  # Levenberg-Marquardt steps of the GD++ fits

ModelFn = Callable[..., jax.Array]  # (params, x_Nxd, y_N, xq_d) -> y_hat_K
Readouts = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, int], jax.Array]  # (theta, x, y, xq, J) -> [J]


@dataclass(frozen=True)
class Algorithm:
    """An algorithm compared with every layer: `readouts(theta_P, x, y, xq, J) -> [J]` after each of
    its `J` steps; `steps(J_gd)`: its `J` when GD runs `J_gd` steps; `fit(t, J, fitted, shared) ->
    theta [J, P]`, row `j - 1` task-optimal for `j` steps on the tasks `t` (`fitted`: the
    algorithms fitted before it; `shared`: one set of scalars for every step)."""

    label: str
    readouts: Readouts
    steps: Callable[[int], int]
    fit: Callable[[Tasks, int, dict[str, jax.Array], bool], jax.Array]
    about: str


def step_counts(layers: int) -> int:
    """`J` of GD and GD++ against a `layers`-deep model."""
    return max(2 * layers, MIN_STEPS)


def eta_range(t: Tasks) -> jax.Array:
    """The upper end of the line searches: `ETA_RANGE / E[x^2]` on the tasks `t`."""
    return ETA_RANGE / jnp.mean(t.x**2)


@functools.partial(jax.jit, static_argnames=("readouts", "steps"))
def line_search(readouts: Readouts, t: Tasks, steps: int) -> jax.Array:
    """For each `j = 1..steps`, the scalar `s` whose readout after `j` steps of `readouts(s)` has the
    lowest loss on `t` (`references.minimize_scalar` over `[0, eta_range(t)]`): `[steps, 1]`. For
    GD this is `references.line_search_eta` for every `j` in one program."""

    def losses(s):
        preds_TxJ = jax.vmap(lambda x, y, q: readouts(s[None], x, y, q, steps))(t.x, t.y, t.xq)
        return jax.vmap(references.loss, in_axes=(1, None))(preds_TxJ, t.yq)

    best = lambda j: references.minimize_scalar(lambda s: losses(s)[j], 0.0, eta_range(t))[0]
    return jax.vmap(best)(jnp.arange(steps))[:, None]


def _fit_gdpp_rows(t: Tasks, steps: int, fitted: dict[str, jax.Array], shared: bool) -> jax.Array:
    """`[steps, 2 steps]`: row `j - 1` the etas then the gammas of GD++ fitted for `j` steps,
    zero from step `j` on (a step with `eta = gamma = 0` changes nothing; the last gamma acts after
    the last readout). One step of GD++ is one step of GD."""
    etas_gd, sp = fitted["gd"][:, 0], references.spectrum(t)
    rows = [jnp.zeros(2 * steps).at[0].set(etas_gd[0])]
    for j in range(2, steps + 1):
        theta = references.fit_gdpp(sp, etas_gd[j - 1], etas_gd[0], steps=j, shared=shared, iters=FIT_ITERS)
        etas, gammas = references.gdpp_scalars(theta, j, shared)
        pad = jnp.zeros(steps - j)
        rows.append(jnp.concatenate([etas, pad, gammas.at[-1].set(0.0), pad]))
    return jnp.stack(rows)


def _gd_readouts(theta, x, y, q, steps):
    return references.gd_direct(x, y, q, jnp.full((steps,), theta[0]))


def _gdpp_readouts(theta, x, y, q, steps):
    return references.gdpp_direct(x, y, q, theta[:steps], theta[steps:])


def _newton_schulz_readouts(theta, x, y, q, steps):
    return explain.newton_schulz(x, y, q, theta[0], steps)


# The algorithms, fitted in this order (GD++ starts from GD's fit).
ALGORITHMS = {
    "gd": Algorithm(
        "GD",
        _gd_readouts,
        lambda j_gd: j_gd,
        lambda t, steps, fitted, shared: line_search(_gd_readouts, t, steps),
        "j GD steps, eta line-searched for j steps (docs/science.md section 4)",
    ),
    "gdpp": Algorithm(
        "GD++",
        _gdpp_readouts,
        lambda j_gd: j_gd,
        _fit_gdpp_rows,
        "j GD++ steps, (eta_k, gamma_k) fitted for j steps (shared by the steps for weight-tied models)",
    ),
    "newton_schulz": Algorithm(
        "Newton-Schulz",
        _newton_schulz_readouts,
        lambda j_gd: math.ceil(math.log2(j_gd)) + 1,
        lambda t, steps, fitted, shared: line_search(_newton_schulz_readouts, t, steps),
        "j Newton-Schulz steps (2^j Neumann terms) from alpha I, alpha line-searched for j steps",
    ),
}


def fit(t: Tasks, steps: int, shared: bool) -> dict[str, jax.Array]:
    """Every algorithm's task-optimal parameters `[J, P]` for `j = 1..J` steps on the tasks `t`, GD
    and GD++ with `J = steps` (`shared`: GD++ shares its scalars across steps, for weight-tied models)."""
    fitted = {}
    for name, alg in ALGORITHMS.items():
        fitted[name] = alg.fit(t, alg.steps(steps), fitted, shared)
    return fitted


def match(model_fn: ModelFn, params_S, t: Tasks, thetas: dict[str, jax.Array]) -> dict:
    """Every seed's readout after every layer against every algorithm after every `j`, on the tasks
    `t`, the algorithms with the parameters `thetas` (`fit`'s output, or any `[J, P]`: row `j - 1`
    runs `j` steps). Returns `{"model_loss": [S, K], name: {"loss": [J], metric: [S, K, J]}}` with
    `explain.agreement`'s metrics (`r2`, `nmse`, `model_cos`, `model_diff`, `preds_diff`)."""
    yq = t.yq[:, None, None]

    @jax.jit
    def run(params_S, t, thetas):
        model_ev = jax.vmap(lambda p: metrics.evaluate_tasks(functools.partial(model_fn, p), t))(params_S)
        out: dict = {"model_loss": jax.vmap(lambda ev: metrics.losses(ev, yq))(model_ev)}
        for name, theta_JxP in thetas.items():
            steps, readouts = theta_JxP.shape[0], ALGORITHMS[name].readouts

            def after(theta_P, j, readouts=readouts, steps=steps):
                ev = metrics.evaluate_tasks(lambda x, y, q: readouts(theta_P, x, y, q, steps)[j][None], t)
                return ev, metrics.losses(ev, yq)[0]

            alg_ev, loss_J = jax.vmap(after)(theta_JxP, jnp.arange(steps))
            per_j = jax.vmap(lambda m, a: explain.agreement(m, a, t.yq), in_axes=(None, 0))
            scores = jax.vmap(per_j, in_axes=(0, None))(model_ev, alg_ev)  # [S, J, K]
            scores.pop("loss")
            out[name] = {"loss": loss_J, **{m: jnp.swapaxes(v, 1, 2) for m, v in scores.items()}}
        return out

    return jax.device_get(run(params_S, t, thetas))


def best_steps(r2_SxKxJ: np.ndarray) -> np.ndarray:
    """The best `j` (1-based) of every seed and layer, by R^2: `[S, K]`."""
    return np.argmax(np.nan_to_num(np.asarray(r2_SxKxJ), nan=-np.inf), axis=-1) + 1


def report(raw: dict, thetas: dict[str, jax.Array]) -> dict:
    """`match`'s results, JSON-ready: per algorithm its parameters and loss per `j`, R^2 and model
    cos per layer (a `metrics.mean_ci95` entry each, lists over `j`), and per layer the best `j` by
    R^2 with the R^2 and model cos there (each seed's best, mean and 95% interval across seeds,
    `j_of_mean`, the best `j` of the seed-mean R^2, and `at_edge`: it is the largest `j` tried, more
    steps may match better); per layer the algorithm whose best mean R^2 is highest, and a one-line
    `finding`."""
    model_loss = np.asarray(raw["model_loss"])
    n_layers = model_loss.shape[1]
    algorithms = {}
    for name, alg in ALGORITHMS.items():
        if name not in thetas:
            continue
        r2, cos = np.asarray(raw[name]["r2"], np.float64), np.asarray(raw[name]["model_cos"], np.float64)
        best = best_steps(r2)
        at_best = lambda v, k, best=best: np.take_along_axis(v[:, k], best[:, k, None] - 1, -1)[:, 0]
        algorithms[name] = {
            "label": alg.label,
            "about": alg.about,
            "steps": int(r2.shape[-1]),
            "params": np.asarray(thetas[name]).tolist(),
            "loss": np.asarray(raw[name]["loss"]).tolist(),
            "r2": [metrics.mean_ci95(r2[:, k]) for k in range(n_layers)],
            "model_cos": [metrics.mean_ci95(cos[:, k]) for k in range(n_layers)],
            "best": [
                {
                    "layer": k + 1,
                    "j": metrics.mean_ci95(best[:, k]),
                    "j_of_mean": int(np.argmax(r2[:, k].mean(0))) + 1,
                    "at_edge": bool(np.argmax(r2[:, k].mean(0)) == r2.shape[-1] - 1),
                    "r2": metrics.mean_ci95(at_best(r2, k)),
                    "model_cos": metrics.mean_ci95(at_best(cos, k)),
                }
                for k in range(n_layers)
            ],
        }
    layers = []
    for k in range(n_layers):
        top = max(algorithms, key=lambda name: algorithms[name]["best"][k]["r2"]["mean"])
        b = algorithms[top]["best"][k]
        layers.append(
            {
                "layer": k + 1,
                "model_loss": metrics.mean_ci95(model_loss[:, k]),
                "algorithm": top,
                "j": b["j_of_mean"],
                "r2": b["r2"]["mean"],
                "model_cos": b["model_cos"]["mean"],
                "at_edge": b["at_edge"],
            }
        )
    finding = "; ".join(
        f"layer {m['layer']}: {algorithms[m['algorithm']]['label']} j={m['j']}"
        f"{' (its largest j)' if m['at_edge'] else ''} (R^2 {m['r2']:.4f}, cos {m['model_cos']:.4f})"
        for m in layers
    )
    return {"seeds": int(model_loss.shape[0]), "algorithms": algorithms, "layers": layers, "finding": finding}


def layer_match(
    model_fn: ModelFn, params_S, fit_tasks: Tasks, tasks: Tasks, *, layers: int, shared: bool
) -> tuple[dict, dict]:
    """The whole analysis for a `layers`-deep model given as `model_fn(params, x, y, xq) -> y_hat_K`
    (a leading seed axis on `params_S`): the algorithms fitted on `fit_tasks` (GD and GD++ for up to
    `step_counts(layers)` steps), matched with every layer on `tasks`. Returns `match`'s raw arrays
    and the JSON-ready `report`."""
    thetas = fit(fit_tasks, step_counts(layers), shared)
    raw = match(model_fn, params_S, tasks, thetas)
    return raw, report(raw, thetas)

"""Post-training analyses of a trained run, by name.

An analysis is a registered function `runs.Trained -> dict`: it reads the run in memory (config,
task, model, parameters of every seed, summary with the fitted references), writes the files it
promises under the run directory and returns a JSON-ready summary, stored in `summary.json`
under `analyses.<name>`. `icl-gd train` runs the experiment's `analyses: [...]` on the run it
holds; `icl-gd analyze RUN_DIR NAME` loads a finished run with `runs.load` and runs one.
`explain` (numerics in `icl_gd.explain`) writes `RUN_DIR/explain/`, which `icl-gd compare` reads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from icl_gd import explain as explain_lib
from icl_gd import fewshot, metrics, mlpgd, models, plots, probing, references, runs, tasks, training
from icl_gd import layer_match as layer_match_lib
from icl_gd.config import ConfigError


@dataclass(frozen=True)
class Analysis:
    """`run(trained) -> dict`; `applies(cfg)`: None, or the one-line error (naming the field to
    change) when it does not apply to a config; `files`: what it writes, relative to the run directory."""

    run: Callable[[runs.Trained], dict]
    applies: Callable[[DictConfig], str | None]
    files: tuple[str, ...]


REGISTRY: dict[str, Analysis] = {}


def register(name: str, files: tuple[str, ...], applies: Callable[[DictConfig], str | None] = lambda cfg: None):
    def add(fn: Callable[[runs.Trained], dict]) -> Callable[[runs.Trained], dict]:
        REGISTRY[name] = Analysis(fn, applies, files)
        return fn

    return add


def check(cfg: DictConfig, names: Sequence[str] | None = None) -> None:
    """Raise ConfigError, naming the field, if an analysis (default: the config's `analyses`) is
    unknown or does not apply to the config; run before any work."""
    allowed = f"a list of {', '.join(sorted(REGISTRY))}"
    for name in cfg.analyses if names is None else names:
        if name not in REGISTRY:
            raise ConfigError(f"analyses: got {name!r}; allowed: {allowed}")
        error = REGISTRY[name].applies(cfg)
        if error is not None:
            raise ConfigError(error)


def output_dir(run_dir: Path, name: str) -> Path:
    path = Path(run_dir) / "analyses" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(name: str, trained: runs.Trained) -> dict:
    """Run analysis `name` on a trained run and record its result in the run's summary."""
    with training.prng(trained.cfg):
        result = REGISTRY[name].run(trained)
    trained.summary.setdefault("analyses", {})[name] = result
    runs.write_json(Path(trained.run_dir) / runs.SUMMARY_FILE, trained.summary)
    return result


def run_all(trained: runs.Trained) -> dict:
    """The analyses the run's config lists, in order."""
    return {name: run(name, trained) for name in trained.cfg.analyses}


def _table(out: Path, name: str, rows: list[dict]) -> None:
    pd.DataFrame(rows).to_csv(out / f"{name}.csv", index=False)
    runs.write_json(out / f"{name}.json", {"rows": rows})


def _regression(trained: runs.Trained) -> tasks.Regression:
    """The run's task, for the analyses whose `applies` admits regression task kinds only."""
    return cast(tasks.Regression, trained.task)


def _final_predictions(trained: runs.Trained, t: tasks.Tasks) -> jax.Array:
    """Final readout of every seed's trained model on regression tasks `t`: `[S, T]`."""
    tokens = _regression(trained).batch(t).tokens
    return jax.vmap(lambda p: trained.model.predict(p, tokens)[:, -1, 0, 0])(trained.params)


def _eval_key(cfg: DictConfig, index: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(int(cfg.eval.seed)), index)


def _needs(name: str, ok: Callable[[DictConfig], bool], what: str) -> Callable[[DictConfig], str | None]:
    """`applies` for an analysis that needs `what` of the config."""
    return lambda cfg: None if ok(cfg) else f"analyses: got {name!r}; allowed: {name} only with {what}"


def _kind(name: str, kinds: tuple[str, ...]) -> Callable[[DictConfig], str | None]:
    return _needs(name, lambda cfg: cfg.task.kind in kinds, "task=" + " or task=".join(kinds))


# Out-of-distribution evaluation (docs/science.md section 1): shifts of the training task law.
INPUT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
WEIGHT_SCALES = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0)
INPUT_LAWS = ("uniform", "gaussian", "laplace", "exponential")


def ood_shifts(task) -> list[tuple[str, float | str, dict]]:
    """`(family, value, changes)` for each shift of a linear task: inputs scaled by a factor
    (`task.scaled`: the covariance of non-isotropic inputs), weights scaled by a factor, and inputs
    from each law at the training inputs' variance (non-isotropic inputs keep their covariance)."""
    var = tasks.input_law(task.x_dist, task.x_scale).var
    field = "x_scale" if task.x_cov is None else "x_cov"
    return [
        *[("input_scale", c, {field: getattr(task.scaled(c), field)}) for c in INPUT_SCALES],
        *[("weight_scale", c, {"w_std": c * task.w_std}) for c in WEIGHT_SCALES],
        *[
            ("input_law", law, {"x_dist": law, "x_scale": math.sqrt(var / tasks.input_law(law, 1.0).var)})
            for law in INPUT_LAWS
        ],
    ]


@register(
    "ood",
    files=("analyses/ood/ood.csv", "analyses/ood/ood.json", "analyses/ood/ood.png", "analyses/ood/ood.pdf"),
    applies=_kind("ood", ("linear",)),
)
def ood(trained: runs.Trained) -> dict:
    """Loss under each shift of `ood_shifts`, applied to the draws of the run's evaluation set (so
    the unshifted rows repeat the run's final losses), for the trained model (every seed) and the
    run's references: GD with its line-searched eta, GD++ with its fitted `(eta_k, gamma_k)` (both
    fitted on the training law), OLS and ridge (Bayes-optimal lambda of the training law)."""
    cfg, refs = trained.cfg, trained.summary["references"]
    steps = int(cfg.model.layers)
    etas = jnp.full((steps,), refs["gd"]["eta"])
    gdpp_etas, gdpp_gammas = (jnp.broadcast_to(jnp.asarray(refs["gdpp"][k]), (steps,)) for k in ("etas", "gammas"))
    lam = refs["ridge"]["lambda"]

    def per_task(x, y, xq):
        spec = references.ridge_spectrum(x, y)  # one SVD for OLS and ridge (see icl_gd.linalg)
        return {
            "gd": references.gd_direct(x, y, xq, etas)[-1],
            "gdpp": references.gdpp_direct(x, y, xq, gdpp_etas, gdpp_gammas)[-1],
            "ols": references.ridge_from_spectrum(spec, xq),
            "ridge": references.ridge_from_spectrum(spec, xq, lam),
        }

    @jax.jit
    def shifted_losses(t):
        out = {name: references.loss(preds, t.yq) for name, preds in jax.vmap(per_task)(t.x, t.y, t.xq).items()}
        out["model"] = jax.vmap(lambda p: references.loss(p, t.yq))(_final_predictions(trained, t))
        return out

    rows = []
    for family, value, changes in ood_shifts(trained.task):
        shifted = (
            cast(tasks.LinearRegression, trained.task).shifted(**changes).draw(_eval_key(cfg, 0), int(cfg.eval.n_tasks))
        )
        host = jax.device_get(shifted_losses(shifted))
        model = metrics.mean_ci95(host.pop("model"))
        rows.append(
            {
                "shift": family,
                "value": value,
                "model": model["mean"],
                "model_lo": model["ci95"][0],
                "model_hi": model["ci95"][1],
                **{k: float(v) for k, v in host.items()},
            }
        )
    out = output_dir(trained.run_dir, "ood")
    _table(out, "ood", rows)
    plots.ood_curves(pd.DataFrame(rows), out / "ood")
    return {"rows": rows}


# Non-linear regression through the input embedding (docs/science.md sections 1 and 9): "MLP + GD" two
# ways, GD on the model's own features (eta line-searched) and the paper's network of its own (icl_gd.mlpgd).
SINE_EXAMPLES = 4
SINE_GRID = 200
MLPGD_KEY = 2  # eval key index of the paper's comparator (0: the eval set, 1: the line-search set)


def _features(weights: models.Weights, x: jax.Array) -> jax.Array:
    """The model's input-embedding features of inputs `x` (its configured form)."""
    assert weights.embed is not None
    return models.input_features(weights.embed, weights.embed_in, x)


def _feature_tasks(weights: models.Weights, t: tasks.Tasks) -> tasks.Tasks:
    """The tasks seen through the model's input embedding: features `phi(x)` in place of the inputs."""
    return t._replace(x=_features(weights, t.x), xq=_features(weights, t.xq))


def on_features(
    arch: models.Architecture, task: tasks.Regression, features: int
) -> tuple[models.Architecture, tasks.Regression]:
    """The model's attention layers as a model of their own, on tasks whose inputs are the features."""
    feature_task = dataclasses.replace(task, dim=features)
    return dataclasses.replace(arch, layout=feature_task.layout, input_mlp=False), feature_task


def _raw_evaluation(
    arch: models.Architecture, task: tasks.Regression, weights: models.Weights, t: tasks.Tasks
) -> metrics.Evaluation:
    """The model's predictions on tasks `t` and their sensitivities to the raw query input `x_q`."""
    return metrics.evaluate_tasks(functools.partial(models.regression_readout, arch, weights, task), t)


def mlp_gd(
    arch: models.Architecture,
    task: tasks.Regression,
    weights: models.Weights,
    eval_tasks: tasks.Tasks,
    search_tasks: tasks.Tasks,
    steps: int,
) -> dict[str, jax.Array]:
    """A model with an input embedding against "MLP + GD" on its own features: `steps` GD steps on
    its learned features `phi(x)`, `eta` line-searched on `search_tasks` seen through the same
    features. Returns both losses, the eta, OLS on the features, preds diff, the partial cos: the
    cosine between the sensitivities `d y_hat / d phi(x_q)` of the model's attention layers and of
    GD on the features, i.e. the model cos restricted to what GD on the learned features can express
    (the embedding shared by both is factored out), and the paper's metric, the sign agreement of
    `d y_hat / d x_q` (through the shared embedding)."""
    search = _feature_tasks(weights, search_tasks)
    n_context = search.x.shape[-2]
    eta_max = 2.0 * n_context / jnp.mean(jnp.sum(search.x**2, -1))
    eta, _ = references.minimize_scalar(lambda e: references.gd_loss(jnp.full((steps,), e), search), 0.0, eta_max)
    etas = jnp.full((steps,), eta)
    feats = _feature_tasks(weights, eval_tasks)
    feature_arch, feature_task = on_features(arch, task, feats.x.shape[-1])
    attention_only = weights._replace(embed=None, embed_in=None)
    model_ev = metrics.evaluate_tasks(
        functools.partial(models.regression_readout, feature_arch, attention_only, feature_task), feats
    )
    gd_ev = metrics.evaluate_tasks(lambda x, y, xq: references.gd_direct(x, y, xq, etas)[-1:], feats)
    gd_raw = metrics.evaluate_tasks(
        lambda x, y, xq: references.gd_direct(_features(weights, x), y, _features(weights, xq[None])[0], etas)[-1:],
        eval_tasks,
    )
    ols = jax.vmap(references.ridge_predict)(feats.x, feats.y, feats.xq)[:, 0]
    align = metrics.alignment(model_ev, gd_ev)
    yq = eval_tasks.yq[:, None, None]
    return {
        "loss": metrics.losses(model_ev, yq)[-1],
        "mlp_gd_loss": metrics.losses(gd_ev, yq)[0],
        "mlp_gd_eta": eta,
        "mlp_ols_loss": references.loss(ols, eval_tasks.yq),
        "preds_diff": align["preds_diff"][-1],
        "partial_cos": align["model_cos"][-1],
        "sign_agreement": metrics.sign_agreement(_raw_evaluation(arch, task, weights, eval_tasks), gd_raw)[-1],
    }


def paper_mlp_gd(
    arch: models.Architecture,
    task: tasks.Regression,
    weights: models.Weights,
    comparator: mlpgd.Comparator,
    eta: float,
    eval_tasks: tasks.Tasks,
) -> dict[str, jax.Array]:
    """A model with an input embedding against the paper's "MLP + GD", a meta-learned network of its
    own (icl_gd.mlpgd): the comparator's loss, the preds diff, and on the sensitivities
    `d y_hat / d x_q` (their only shared space; scalars in 1-d) the cosine (in 1-d, `2 a - 1` for
    the sign agreement `a`) and the paper's partial cos, the sign agreement."""
    model_ev = _raw_evaluation(arch, task, weights, eval_tasks)
    paper_ev = metrics.evaluate_tasks(functools.partial(mlpgd.predict, comparator, eta), eval_tasks)
    align = metrics.alignment(model_ev, paper_ev)
    return {
        "mlpgd_loss": metrics.losses(paper_ev, eval_tasks.yq[:, None, None])[0],
        "mlpgd_preds_diff": align["preds_diff"][-1],
        "mlpgd_model_cos": align["model_cos"][-1],
        "mlpgd_sign_agreement": metrics.sign_agreement(model_ev, paper_ev)[-1],
    }


@register(
    "sine",
    files=tuple(f"analyses/sine/sine.{s}" for s in ("csv", "json", "png", "pdf")),
    applies=_needs("sine", lambda cfg: bool(cfg.model.input_mlp), "model.input_mlp=true"),
)
def sine(trained: runs.Trained) -> dict:
    """`mlp_gd` for every seed of a run with an input embedding, on its evaluation set (eta searched
    on its line-search set), and with `eval.mlpgd_steps > 0` `paper_mlp_gd` against the paper's
    comparator, trained once for the run on keys of its own; example fits with the learned features."""
    cfg, task, model, ev = trained.cfg, _regression(trained), trained.model, trained.cfg.eval
    steps = int(cfg.model.layers)
    eval_tasks = task.draw(_eval_key(cfg, 0), int(ev.n_tasks))
    search_tasks = task.draw(_eval_key(cfg, 1), int(ev.line_search_tasks))
    comparator, eta, extra = None, float(ev.mlpgd_eta), {}
    if int(ev.mlpgd_steps) > 0:
        key = _eval_key(cfg, MLPGD_KEY)
        comparator, train_losses = mlpgd.train(
            mlpgd.init(model, jax.random.fold_in(key, 0)),
            task.draw,
            jax.random.fold_in(key, 1),
            steps=int(ev.mlpgd_steps),
            batch=int(ev.mlpgd_batch),
            lr=float(ev.mlpgd_lr),
            eta=eta,
        )
        extra = {"mlpgd": {"eta": eta, "steps": int(ev.mlpgd_steps), "train_loss_last": float(train_losses[-1])}}

    def per_seed(p):
        weights = model.weights(p)
        out = mlp_gd(model.arch, task, weights, eval_tasks, search_tasks, steps)
        if comparator is not None:
            out |= paper_mlp_gd(model.arch, task, weights, comparator, eta, eval_tasks)
        return out

    per = jax.device_get(jax.jit(jax.vmap(per_seed))(trained.params))
    rows = [{"seed": s, **{k: float(v[s]) for k, v in per.items()}} for s in range(int(cfg.train.seeds))]
    out = output_dir(trained.run_dir, "sine")
    _table(out, "sine", rows)
    grid = jnp.linspace(-5.0, 5.0, SINE_GRID)
    curves = _sine_curves(trained, eval_tasks, grid, per["mlp_gd_eta"][0], steps, comparator, eta)
    net, gd, paper, ctx_x, ctx_y, feats = jax.device_get(curves)
    plots.sine_fits(net, gd, ctx_x, ctx_y, feats, np.asarray(grid), out / "sine", paper)
    return {**{name: metrics.mean_ci95(per[name]) for name in per}, **extra}


def _sine_curves(
    trained: runs.Trained,
    t: tasks.Tasks,
    grid: jax.Array,
    eta,
    steps: int,
    comparator: mlpgd.Comparator | None,
    mlpgd_eta: float,
):
    """For the first seed and `SINE_EXAMPLES` tasks: the model's, MLP + GD's on its features and
    (when trained) the paper's comparator's predictions at every query on `grid`, the context
    points, and the learned features on `grid`."""
    weights = trained.model.weights(trained.seed(0))
    ex = jax.tree_util.tree_map(lambda a: a[:SINE_EXAMPLES], t)
    xq_G = grid[:, None]
    readout = functools.partial(models.regression_readout, trained.model.arch, weights, _regression(trained))
    feats_q = _features(weights, xq_G)

    def paper_curve(c: mlpgd.Comparator, x, y):
        return jax.vmap(lambda xq: mlpgd.predict(c, mlpgd_eta, x, y, xq)[0])(xq_G)

    def curves(x, y):
        feats = _features(weights, x)
        net = jax.vmap(lambda xq: readout(x, y, xq)[-1])(xq_G)
        gd = jax.vmap(lambda fq: references.gd_direct(feats, y, fq, jnp.full((steps,), eta))[-1])(feats_q)
        return net, gd, None if comparator is None else paper_curve(comparator, x, y)

    net, gd, paper = jax.jit(jax.vmap(curves))(ex.x, ex.y)
    return net, gd, paper, ex.x[..., 0], ex.y, feats_q


# Classic tokens (docs/science.md section 2): does the first (causal softmax) layer learn to copy?
COPY_TASKS = 256


def token_dependence(copy: models.Attention, positions: int, seq_MxD: jax.Array) -> jax.Array:
    """`[M, M]`: Frobenius norm of `d update_j / d content_i`, the copy layer's update of token j
    (its output minus its input) against the data part `(x, y)` of token i (the last `positions`
    coordinates, one-hot positions, held fixed)."""
    width = seq_MxD.shape[1] - positions
    content, pos = seq_MxD[:, :width], seq_MxD[:, width:]

    def update(c):
        seq = jnp.concatenate([c, pos], axis=-1)
        return models.copy_layer(copy, seq) - seq

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
    return {
        kind: {
            "self": jnp.mean(own, where=sel),
            "neighbour": jnp.mean(left, where=sel),
            "rest": jnp.mean(1.0 - own - left, where=sel),
        }
        for kind, sel in kinds.items()
    }


def copy_fit(updates_TxD: jax.Array, x_Txd: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The best linear map (least squares with an intercept) from `x` to the updates: the share
    of the updates' variance it explains (1 when a layer writes a linear image of `x` and nothing
    else), and its singular values, largest first (how many directions of `x` are copied)."""
    target = updates_TxD - updates_TxD.mean(0)
    design = jnp.concatenate([x_Txd, jnp.ones_like(x_Txd[:, :1])], axis=-1)
    coef = jnp.linalg.lstsq(design, target)[0]
    r2 = 1.0 - jnp.sum((target - design @ coef) ** 2) / jnp.maximum(jnp.sum(target**2), 1e-12)
    return r2, jnp.linalg.svd(coef[:-1], compute_uv=False)


@register(
    "copy",
    files=tuple(f"analyses/copy/copy.{s}" for s in ("csv", "json", "png", "pdf")),
    applies=_needs(
        "copy",
        lambda cfg: cfg.task.get("tokens") is not None and cfg.task.tokens.name == "classic",
        "task.tokens=classic",
    ),
)
def copy_dependence(trained: runs.Trained) -> dict:
    """Classic tokens: how much the first layer's update of each token depends on the token
    itself, on its left neighbour and on the rest (Jacobian norms, `token_dependence`), and how
    much of the label tokens' update is a linear function of their inputs `x_i` (`copy_r2`) and
    the singular values of that map per seed (`copy_singular_values`: a full copy has `d` of
    comparable size, a low-rank one copies only some directions of `x_i`). A copying layer gives
    label tokens a neighbour share and `copy_r2` near 1."""
    cfg, task, arch = trained.cfg, _regression(trained), trained.model.arch
    t = task.draw(_eval_key(cfg, 0), COPY_TASKS)
    batch = task.batch(t)
    positions = arch.positions_width if arch.positional else 0

    def per_seed(p):
        weights = trained.model.weights(p)
        assert weights.copy is not None
        seqs = jax.vmap(functools.partial(models.embed, arch, weights))(batch.tokens)
        norms = jax.lax.map(functools.partial(token_dependence, weights.copy, positions), seqs, batch_size=32).mean(0)
        moved = (jax.vmap(functools.partial(models.copy_layer, weights.copy))(seqs) - seqs)[:, 1:-1:2]  # label tokens
        # The x slot of the x tokens (features, with an input MLP).
        x = seqs[:, 0:-1:2, : seqs.shape[-1] - positions - 1]
        return (
            norms,
            dependence_shares(norms),
            *copy_fit(moved.reshape(-1, moved.shape[-1]), x.reshape(-1, x.shape[-1])),
        )

    norms, shares, r2, singular = jax.device_get(jax.jit(jax.vmap(per_seed))(trained.params))
    rows = [
        {"seed": s, "token": kind, **{part: float(v[s]) for part, v in parts.items()}}
        for s in range(int(cfg.train.seeds))
        for kind, parts in shares.items()
    ]
    out = output_dir(trained.run_dir, "copy")
    _table(out, "copy", rows)
    plots.token_dependence(np.asarray(norms[0]), pd.DataFrame(rows), out / "copy")
    return {
        "shares": {kind: {part: metrics.mean_ci95(v) for part, v in parts.items()} for kind, parts in shares.items()},
        "copy_r2": metrics.mean_ci95(r2),
        "copy_singular_values": singular,
    }


EXPLAIN_DIR, EXPLAIN_FILE = "explain", "explain.json"
MIN_EXPLAIN_TASKS = 64


class ExplainError(ValueError):
    """Bad input to `explain_run`, in one line naming the argument and its allowed values."""


def check_explain(
    run_dir: Path, seeds: Sequence[int] | None, n_tasks: int, iters: int, out: Path | None
) -> tuple[Path, list[int]]:
    """Everything `explain_run` needs of a run directory, checked before any work: returns the
    output folder and the seeds."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / EXPLAIN_DIR
    if not (run_dir / runs.SUMMARY_FILE).exists() or not (run_dir / runs.CHECKPOINT_DIR).exists():
        raise ExplainError(f"RUN_DIR: {run_dir} is not a run directory (no {runs.SUMMARY_FILE} / checkpoint)")
    status = runs.load_summary(run_dir).get("status")
    if status != "completed":
        raise ExplainError(f"RUN_DIR: {run_dir} is a {status} run; allowed: a completed run")
    cfg = runs.load_config(run_dir)
    if cfg.task.kind not in ("linear", "lds"):
        raise ExplainError(
            "task.kind: explain tests linear-regression and linear-dynamics hypotheses; "
            f"got {cfg.task.kind!r}, allowed: linear, lds"
        )
    n_seeds = int(cfg.train.seeds)
    seeds = list(range(n_seeds)) if seeds is None else [int(s) for s in seeds]
    if not seeds or any(not 0 <= s < n_seeds for s in seeds):
        raise ExplainError(f"--seed: got {seeds}; allowed: seeds in 0..{n_seeds - 1} (this run has {n_seeds})")
    if cfg.task.kind == "lds":
        fams, _ = explain_lib.sequence_families(int(cfg.model.layers), float(cfg.task.ridge_lambda))
    else:
        fams, _ = explain_lib.families(int(cfg.task.dim), int(cfg.model.layers), float(cfg.task.noise_std))
    least = max(MIN_EXPLAIN_TASKS, 2 * max(f.n_params for f in fams))
    if n_tasks < least:
        raise ExplainError(
            f"--tasks: got {n_tasks}; allowed: an integer >= {least} (twice the largest family's parameters)"
        )
    if iters < 1:
        raise ExplainError(f"--iters: got {iters}; allowed: an integer >= 1")
    if out.exists():
        raise ExplainError(f"--out: {out} already exists; explain never overwrites, pass --out NEW_DIR")
    return out, seeds


def explain_run(
    trained: runs.Trained,
    *,
    seeds: Sequence[int] | None = None,
    n_tasks: int = 2048,
    iters: int = 50,
    out: Path | None = None,
) -> tuple[dict, Path]:
    """`_explain_run` with the run's random number generator."""
    with training.prng(trained.cfg):
        return _explain_run(trained, seeds=seeds, n_tasks=n_tasks, iters=iters, out=out)


def _explain_run(
    trained: runs.Trained,
    *,
    seeds: Sequence[int] | None,
    n_tasks: int,
    iters: int,
    out: Path | None,
) -> tuple[dict, Path]:
    """Run `icl_gd.explain` on the trained model of the given seeds (all by default) and write
    `explain.json`, the ranking figure, the weight heatmaps (first seed) and, for deep models,
    the per-layer figure to `out` (default `RUN_DIR/explain`), which must not exist; for sequence
    tasks (`explain_sequences`), `explain.json`, the ranking and the position-band figures. Files
    appear all at once: they are written to a temporary folder that is then renamed."""
    run_dir = Path(trained.run_dir)
    out, seeds = check_explain(run_dir, seeds, n_tasks, iters, out)
    started = time.time()
    cfg, model = trained.cfg, trained.model
    params_S = jax.tree_util.tree_map(lambda a: a[np.asarray(seeds)], trained.params)
    floor_models = _floor_models(trained, seeds)
    if cfg.task.kind == "lds":
        return _explain_sequences_run(trained, params_S, seeds, n_tasks, iters, out, started, floor_models)

    def model_fn(p, x, y, xq):
        return models.regression_readout(model.arch, model.weights(p), _regression(trained), x, y, xq)

    key = _eval_key(cfg, 2)  # 0 and 1: the eval and line-search sets
    report = explain_lib.explain(
        model_fn,
        params_S,
        trained.task,
        key,
        steps=int(cfg.model.layers),
        n_tasks=n_tasks,
        iters=iters,
        floor_models=floor_models,
    )
    attn = jax.device_get(jax.vmap(lambda p: model.weights(p).layers.attn)(params_S))
    n_context = int(cfg.task.n_context)
    report.update(
        run=str(run_dir),
        experiment=trained.summary.get("experiment"),
        seed_ids=seeds,
        weights={
            "per_seed": [explain_lib.weight_structure(attn.w_kq[i], attn.w_pv[i], n_context) for i in range(len(seeds))]
        },
        wall_time_s=time.time() - started,
    )

    def figures(tmp: Path) -> None:
        plots.weight_heatmaps(attn.w_kq[0], attn.w_pv[0], tmp / "weights", f"{report['experiment']}, seed {seeds[0]}")
        if report["steps"] > 1:
            plots.explain_layers(report, tmp / "layers")

    _write_explain(out, report, figures)
    return report, out


def _floor_models(trained: runs.Trained, seeds: list[int]) -> explain_lib.FloorModels:
    """The models of `explain`'s noise floor: every ordered pair of the run's seeds (final
    checkpoints), and each explained seed's final checkpoint against its previous one."""
    n_seeds = int(trained.cfg.train.seeds)
    pairs = {"seeds": [(i, j) for i in range(n_seeds) for j in range(n_seeds) if i != j]}
    previous = runs.previous_checkpoint(trained)
    if previous is None:
        return explain_lib.FloorModels(trained.params, pairs)
    steps, earlier = previous
    params = jax.tree_util.tree_map(
        lambda final, prev: np.concatenate([final, prev[np.asarray(seeds)]]), trained.params, earlier
    )
    pairs["checkpoints"] = [(s, n_seeds + k) for k, s in enumerate(seeds)]
    return explain_lib.FloorModels(params, pairs, {"checkpoints": steps})


def _write_explain(out: Path, report: dict, figures: Callable[[Path], object]) -> None:
    """`explain.json`, the ranking figure and the kind's own `figures` in `out`, all at once: written
    to a temporary folder that is then renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        runs.write_json(tmp / EXPLAIN_FILE, report)
        plots.explain_ranking(report, tmp / "ranking")
        figures(tmp)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _explain_sequences_run(
    trained: runs.Trained,
    params_S,
    seeds: list[int],
    n_tasks: int,
    iters: int,
    out: Path,
    started: float,
    floor_models: explain_lib.FloorModels,
) -> tuple[dict, Path]:
    """`explain_run` for a sequence task: no weight structure (the GD blocks of docs/science.md
    section 4 are written for regression tokens), so `weights` lists none for each seed."""
    cfg = trained.cfg
    report = explain_lib.explain_sequences(
        trained.model.predict,
        params_S,
        trained.task,
        _eval_key(cfg, 2),
        steps=int(cfg.model.layers),
        n_tasks=n_tasks,
        iters=iters,
        floor_models=floor_models,
    )
    report.update(
        run=str(trained.run_dir),
        experiment=trained.summary.get("experiment"),
        seed_ids=seeds,
        weights={"per_seed": [[] for _ in seeds]},
        wall_time_s=time.time() - started,
    )
    _write_explain(out, report, lambda tmp: plots.explain_bands(report, tmp / "bands"))
    return report, out


@register(
    "explain",
    files=(
        f"{EXPLAIN_DIR}/{EXPLAIN_FILE}",
        f"{EXPLAIN_DIR}/ranking.png",
        f"{EXPLAIN_DIR}/ranking.pdf",
    ),
    applies=_kind("explain", ("linear", "lds")),
)
def explain(trained: runs.Trained) -> dict:
    """Which algorithm the trained model runs, on every seed; files in RUN_DIR/explain/ (also the
    weight heatmaps for regression, the bands figure for sequences)."""
    report, out = explain_run(trained)
    rank = report["ranking"]
    return {
        "winner": report["winner"],
        "winner_by": report["winner_by"],
        "within_floor": report["within_floor"],
        "floor": report["floor"]["nmse"],
        "floor_source": report["floor"]["source"],
        "bic_winner": rank["winner"],
        "runner_up": rank["runner_up"],
        "margin": rank["margin"],
        "explains": report["explains"],
        "verdict": report["verdict"],
        "file": str(out / EXPLAIN_FILE),
    }


def _needs_recurrent(cfg: DictConfig) -> str | None:
    if cfg.task.kind not in ("linear", "sine"):
        return _kind("depth_extrapolation", ("linear", "sine"))(cfg)
    return (
        None
        if cfg.model.recurrent
        else "model.recurrent: got False; allowed: true for the depth_extrapolation analysis"
    )


@register(
    "depth_extrapolation",
    files=tuple(f"analyses/depth_extrapolation/depth_extrapolation.{s}" for s in ("csv", "png", "pdf")),
    applies=_needs_recurrent,
)
def depth_extrapolation(trained: runs.Trained) -> dict:
    """Iterate a trained recurrent layer up to `eval.extrapolate_to` times (each update scaled by
    `eval.damping`) and compare with as many GD and GD++ steps, with the run's own `eta` and
    fitted GD++ scalars (docs/science.md section 4), on the run's evaluation set. Depth is the
    length of a scan, so 50 iterations compile one layer."""
    cfg, refs, task = trained.cfg, trained.summary["references"], _regression(trained)
    n, damping, trained_depth = int(cfg.eval.extrapolate_to), float(cfg.eval.damping), int(cfg.model.layers)
    t = task.draw(_eval_key(cfg, 0), int(cfg.eval.n_tasks))
    arch = trained.model.arch.deeper(n)
    gd_etas = jnp.full((n,), refs["gd"]["eta"])
    gdpp_etas, gdpp_gammas = (jnp.full((n,), refs["gdpp"][k][0]) for k in ("etas", "gammas"))

    @jax.jit
    def model_eval(seed_params):
        weights = trained.model.weights(seed_params)
        attn = weights.layers.attn  # each layer's update is scaled by its output factor
        attn = (
            attn._replace(w_pv=damping * attn.w_pv)
            if isinstance(attn, models.Attention)
            else attn._replace(w_p=damping * attn.w_p)
        )
        damped = weights._replace(layers=weights.layers._replace(attn=attn))
        return metrics.evaluate_tasks(functools.partial(models.regression_readout, arch, damped, task), t)

    gd_eval = jax.jit(lambda t: metrics.evaluate_tasks(lambda x, y, q: references.gd_direct(x, y, q, gd_etas), t))(t)
    gdpp_eval = jax.jit(
        lambda t: metrics.evaluate_tasks(lambda x, y, q: references.gdpp_direct(x, y, q, gdpp_etas, gdpp_gammas), t)
    )(t)
    yq = t.yq[:, None, None]
    rows = []
    for seed in range(int(cfg.train.seeds)):
        ev = model_eval(trained.seed(seed))
        to_gd, to_gdpp = metrics.alignment(ev, gd_eval), metrics.alignment(ev, gdpp_eval)
        loss = metrics.losses(ev, yq)
        rows += [
            {
                "seed": seed,
                "iterations": k + 1,
                "loss": float(loss[k]),
                "model_cos": float(to_gd["model_cos"][k]),
                "model_cos_gdpp": float(to_gdpp["model_cos"][k]),
                "preds_diff_gdpp": float(to_gdpp["preds_diff"][k]),
            }
            for k in range(n)
        ]
    df = pd.DataFrame(rows)
    gd_loss, gdpp_loss = np.asarray(metrics.losses(gd_eval, yq)), np.asarray(metrics.losses(gdpp_eval, yq))
    df["gd_loss"] = gd_loss[df["iterations"] - 1]
    df["gdpp_loss"] = gdpp_loss[df["iterations"] - 1]
    out = output_dir(trained.run_dir, "depth_extrapolation")
    df.to_csv(out / "depth_extrapolation.csv", index=False)
    plots.depth_extrapolation(df, trained_depth, damping, out / "depth_extrapolation")
    mean = cast(pd.DataFrame, df.groupby("iterations").mean(numeric_only=True))
    at = sorted({trained_depth, min(2 * trained_depth, n), n})
    names = ("loss", "gd_loss", "gdpp_loss", "model_cos", "model_cos_gdpp")
    return {
        "trained_layers": trained_depth,
        "iterations": n,
        "damping": damping,
        "at": {str(k): {name: float(mean.loc[k, name]) for name in names} for k in at},
        "best_iterations": int(cast(int, mean["loss"].idxmin())),  # a label of the index: iterations
        "best_loss": float(cast(float, mean["loss"].min())),
    }


# Few-shot transfer (docs/science.md section 8): a model trained on dynamical systems, shown regression pairs.
FEWSHOT_AT = (1, 5)  # pairs seen before the prediction, reported with the most that fit
FEWSHOT_FILES = ("fewshot.json", "fewshot.csv", "loss_by_pairs.png", "loss_by_pairs.pdf")


def _fewshot_applies(cfg: DictConfig) -> str | None:
    error = _kind("fewshot", ("lds",))(cfg)
    if error is not None or int(cfg.eval.fewshot_tune_steps) == 0:
        return error
    prefix, length = int(cfg.eval.fewshot_prefix), int(cfg.task.length)
    if fewshot.max_pairs(length, prefix) >= 1:
        return None
    allowed = f"at most task.length - 3 = {length - 3} (one pair and its separator must fit)"
    return f"eval.fewshot_prefix: got {prefix}; allowed: {allowed}"


@register(
    "fewshot",
    files=tuple(f"analyses/fewshot/{f}" for f in FEWSHOT_FILES),
    applies=_fewshot_applies,
)
def fewshot_transfer(trained: runs.Trained) -> dict:
    """Loss of every seed's model on `y_i` by pairs seen, on `eval.fewshot_tasks` regression
    sequences `x_1, y_1, x_2, y_2, ...` (as many pairs as fit `task.length`), against ridge least
    squares (`task.ridge_lambda`) on the pairs seen and the zero predictor; with
    `eval.fewshot_tune_steps > 0`, also after tuning a separator and `eval.fewshot_prefix` prefix
    states with the model frozen (same pairs, fewer fit)."""
    cfg, ev, task = trained.cfg, trained.cfg.eval, cast(tasks.lds.LinearDynamics, trained.task)
    length, dim, steps = task.length, task.state_dim, int(ev.fewshot_tune_steps)
    pairs = fewshot.draw_pairs(_eval_key(cfg, 5), int(ev.fewshot_tasks), dim, fewshot.max_pairs(length))
    least = fewshot.pair_losses(jax.jit(fewshot.least_squares)(pairs.x, pairs.y, task.ridge_lambda), pairs.y)
    zero = fewshot.pair_losses(jnp.zeros_like(pairs.y), pairs.y)
    k_init, k_tune = jax.random.split(_eval_key(cfg, 6))
    prompt = fewshot.init_prompt(k_init, dim, int(ev.fewshot_prefix))

    def per_seed(params):
        predict = lambda states: trained.model.predict(params, task.batch(states).tokens)[:, -1]
        out = {"model": fewshot.model_curve(predict, pairs, length)}
        if steps:
            batch, lr = int(ev.fewshot_batch), float(ev.fewshot_lr)
            tuned, trace = fewshot.tune(predict, prompt, k_tune, length=length, steps=steps, batch=batch, lr=lr)
            out |= {"tuned": fewshot.model_curve(predict, pairs, length, tuned), "trace": trace}
        return out

    per = jax.device_get(jax.jit(jax.vmap(per_seed))(trained.params))
    least, zero = np.asarray(least), np.asarray(zero)
    seeds, n_tuned = range(int(cfg.train.seeds)), per["tuned"].shape[1] if steps else 0
    rows = [
        {
            "pairs": k,
            **{f"model_seed{s}": float(per["model"][s, k]) for s in seeds},
            "least_squares": float(least[k]),
            "zero": float(zero[k]),
            **({f"tuned_seed{s}": float(per["tuned"][s, k]) if k < n_tuned else None for s in seeds} if steps else {}),
        }
        for k in range(len(least))
    ]
    out = output_dir(trained.run_dir, "fewshot")
    _table(out, "fewshot", rows)
    curves = {name: metrics.mean_ci95(per[name]) for name in ("model", "tuned") if name in per}
    title = f"{plots.run_title(trained.summary)}: few-shot regression, {len(seeds)} seed(s)"
    plots.fewshot_curves(curves, least, zero, title, out / "loss_by_pairs")
    last = len(least) - 1
    at = {
        str(k): {
            "model": metrics.mean_ci95(per["model"][:, k]),
            "least_squares": float(least[k]),
            "zero": float(zero[k]),
            **({"tuned": metrics.mean_ci95(per["tuned"][:, k])} if k < n_tuned else {}),
        }
        for k in sorted({k for k in FEWSHOT_AT if k < last} | {last})
    }
    result = {
        "pairs": last + 1,
        "x_law": "uniform(-1, 1)",
        "noise_std": fewshot.NOISE_STD,
        "ridge_lambda": task.ridge_lambda,
        "model": curves["model"],
        "least_squares": least,
        "zero": zero,
        "at": at,
    }
    if steps:
        result["tuned"] = curves["tuned"]
        result["tuning"] = {
            "steps": steps,
            "prefix": int(ev.fewshot_prefix),
            "pairs": n_tuned,
            # Each step's loss is on a fresh batch: averaged over the first and last tenth of the steps.
            "loss_first_tenth": metrics.mean_ci95(per["trace"][:, : max(1, steps // 10)].mean(1)),
            "loss_last_tenth": metrics.mean_ci95(per["trace"][:, -max(1, steps // 10) :].mean(1)),
        }
    tuned_mean = curves["tuned"]["mean"] if steps else None
    result["finding"] = fewshot.finding(curves["model"]["mean"], least.tolist(), zero.tolist(), tuned_mean)
    return result


# Linear probes of the residual stream (docs/science.md section 8).
PROBE_FIGURES = ("r2_by_layer", "r2_by_position")


def _probe_scores(
    trained: runs.Trained, states: jax.Array, targets: dict[str, jax.Array], layers: slice
) -> dict[str, probing.Scores]:
    """Probes of each seed's residual stream (the indices `layers`) at every position, fitted on the
    first half of the sequences `states` (`[2n, T+1, D]`, targets `[2n, T, D]`) and scored on the
    second: `Scores` `[S, L, T]`. Seed by seed (one residual stream in memory), one compiled program."""
    n = states.shape[0] // 2
    first, second = slice(None, n), slice(n, None)
    part = lambda tree, rows: jax.tree_util.tree_map(lambda a: a[rows], tree)

    @jax.jit
    def per_seed(params, tokens, targets):
        res = trained.model.residuals(params, tokens)[:, layers]
        return probing.probe_grid(res[first], part(targets, first), res[second], part(targets, second))

    tokens = cast(tasks.lds.LinearDynamics, trained.task).batch(states).tokens
    per = [jax.device_get(per_seed(trained.seed(s), tokens, targets)) for s in range(int(trained.cfg.train.seeds))]
    return {name: probing.Scores(*(np.stack([p[name][i] for p in per]) for i in range(2))) for name in targets}


def _over_positions(values_SxLxT: np.ndarray) -> np.ndarray:
    """Mean over the positions where the target varies (R^2 is NaN elsewhere): `[S, L]`."""
    return np.nanmean(values_SxLxT, -1)


@register(
    "probes",
    files=tuple(
        f"analyses/probes/{f}"
        for f in ("probes.json", "probes.csv", *(f"{fig}.{s}" for fig in PROBE_FIGURES for s in ("png", "pdf")))
    ),
    applies=_kind("probes", ("lds",)),
)
def probes(trained: runs.Trained) -> dict:
    """Linear probes (`icl_gd.probing`) of the residual stream after the embedding (layer 0) and
    after each layer, at every position, for `s_t`, `s_{t-1}`, `s_{t+1}`, the preconditioned input
    and a control (`probing.lds_targets`), fitted on `eval.probe_tasks` sequences and scored on as
    many held-out ones (docs/science.md section 8). Summary: R^2 and MSE by layer, averaged over
    positions, per seed with mean and 95% interval; probes.json and probes.csv by position too."""
    cfg, task = trained.cfg, cast(tasks.lds.LinearDynamics, trained.task)
    n = int(cfg.eval.probe_tasks)
    states = task.states(_eval_key(cfg, 3), 2 * n)
    control = task.states(_eval_key(cfg, 4), 2 * n)  # independent sequences: the control target
    scores = _probe_scores(trained, states, probing.lds_targets(states, control, task.ridge_lambda), slice(None))
    n_seeds, n_layers, length = scores["s_t"].r2.shape
    out = output_dir(trained.run_dir, "probes")
    runs.write_json(
        out / "probes.json",
        {
            "layers": list(range(n_layers)),
            "positions": list(range(1, length + 1)),
            "fit_tasks": n,
            "held_out_tasks": n,
            **{
                metric: {
                    name: {"mean": getattr(sc, metric).mean(0), "per_seed": getattr(sc, metric)}
                    for name, sc in scores.items()
                }
                for metric in probing.Scores._fields
            },
        },
    )
    rows = [
        {"seed": s, "target": name, "layer": k, "position": t + 1, "r2": sc.r2[s, k, t], "mse": sc.mse[s, k, t]}
        for name, sc in scores.items()
        for s in range(n_seeds)
        for k in range(n_layers)
        for t in range(length)
    ]
    pd.DataFrame(rows).to_csv(out / "probes.csv", index=False)
    by_layer = {
        metric: {name: metrics.mean_ci95(_over_positions(getattr(sc, metric))) for name, sc in scores.items()}
        for metric in probing.Scores._fields
    }
    title = f"{plots.run_title(trained.summary)}: linear probes, {n} fit / {n} held-out sequences, {n_seeds} seed(s)"
    labels = probing.TARGET_LABELS
    plots.probe_r2_by_layer(by_layer["r2"], labels, title, out / "r2_by_layer")
    plots.probe_r2_by_position(
        {name: np.mean(sc.r2, 0) for name, sc in scores.items()}, labels, title, out / "r2_by_position"
    )
    return {"targets": labels, "r2_by_layer": by_layer["r2"], "mse_by_layer": by_layer["mse"]}


def _first_layer_applies(cfg: DictConfig) -> str | None:
    error = _kind("first_layer", ("lds",))(cfg)
    if error is None and cfg.eval.probe_lags >= cfg.task.length:
        allowed = f"an integer in [1, task.length - 1 = {cfg.task.length - 1}] for the first_layer analysis"
        return f"eval.probe_lags: got {cfg.eval.probe_lags}; allowed: {allowed}"
    return error


@register(
    "first_layer",
    files=tuple(
        f"analyses/first_layer/{f}" for f in ("first_layer.csv", "first_layer.json", "r2_by_lag.png", "r2_by_lag.pdf")
    ),
    applies=_first_layer_applies,
)
def first_layer(trained: runs.Trained) -> dict:
    """Which past states `s_{t-k}`, `k = 0..eval.probe_lags`, a linear probe reads from the residual
    stream before the first layer (index 0) and after it (index 1): held-out R^2 averaged over the
    positions `t > k`, probes as in `probes` (docs/science.md section 8; the follow-up found that a
    softmax first layer on raw states builds the pair `(s_t, s_{t-1})`). `finding` says whether the
    pair is there from the start or built by the first layer, from the numbers."""
    cfg = trained.cfg
    n, lags = int(cfg.eval.probe_tasks), range(int(cfg.eval.probe_lags) + 1)
    states = cast(tasks.lds.LinearDynamics, trained.task).states(_eval_key(cfg, 3), 2 * n)
    scores = _probe_scores(trained, states, {f"lag{k}": probing.lagged(states, k) for k in lags}, slice(0, 2))
    r2_SxIxK, mse_SxIxK = (
        np.stack([_over_positions(getattr(scores[f"lag{k}"], m)) for k in lags], -1) for m in probing.Scores._fields
    )
    before, after = metrics.mean_ci95(r2_SxIxK[:, 0]), metrics.mean_ci95(r2_SxIxK[:, 1])
    finding = probing.first_layer_finding(np.asarray(before["mean"]), np.asarray(after["mean"]))
    rows = [
        {"seed": s, "residual": i, "lag": k, "r2": float(r2_SxIxK[s, i, k]), "mse": float(mse_SxIxK[s, i, k])}
        for s in range(r2_SxIxK.shape[0])
        for i in range(2)
        for k in lags
    ]
    out = output_dir(trained.run_dir, "first_layer")
    _table(out, "first_layer", rows)
    title = f"{plots.run_title(trained.summary)}: {finding}"
    plots.r2_by_lag(before, after, probing.READABLE_R2, title, out / "r2_by_lag")
    return {
        "lags": list(lags),
        "r2_before": before,
        "r2_after": after,
        "readable_r2": probing.READABLE_R2,
        "readable_before": probing.readable(np.asarray(before["mean"])),
        "readable_after": probing.readable(np.asarray(after["mean"])),
        "finding": finding,
    }


# Per-layer algorithm matching (docs/science.md "Per-layer algorithm matching"; Fu et al. 2023).
LAYER_MATCH_TASKS = 2048  # scored tasks: the first of the run's evaluation set
LAYER_MATCH_FIT_TASKS = 4096  # tasks the algorithms are fitted on (at most eval.line_search_tasks)
LAYER_MATCH_KEY = 11  # eval key index of those tasks


def _layer_match_applies(cfg: DictConfig) -> str | None:
    error = _kind("layer_match", ("linear",))(cfg)
    if error is None and int(cfg.model.layers) < 2:
        allowed = "an integer >= 2 for the layer_match analysis (it matches the readout after every layer)"
        return f"model.layers: got {cfg.model.layers}; allowed: {allowed}"
    return error


@register(
    "layer_match",
    files=tuple(f"analyses/layer_match/layer_match.{s}" for s in ("json", "csv", "png", "pdf")),
    applies=_layer_match_applies,
)
def layer_match(trained: runs.Trained) -> dict:
    """Which number of steps `j` of GD, GD++ and Newton-Schulz the readout after each layer matches
    best (`icl_gd.layer_match`), for every seed, on the first `LAYER_MATCH_TASKS` tasks of the
    run's evaluation set; the algorithms' task-optimal parameters are fitted on
    `LAYER_MATCH_FIT_TASKS` tasks of their own. Writes the report (json), every seed, layer,
    algorithm and `j` (csv) and the heatmaps (png, pdf)."""
    cfg, task, model = trained.cfg, _regression(trained), trained.model
    started = time.time()
    n_tasks = min(int(cfg.eval.n_tasks), LAYER_MATCH_TASKS)
    scored = jax.tree_util.tree_map(lambda a: a[:n_tasks], task.draw(_eval_key(cfg, 0), int(cfg.eval.n_tasks)))
    n_fit = min(int(cfg.eval.line_search_tasks), LAYER_MATCH_FIT_TASKS)
    fit_tasks = task.draw(_eval_key(cfg, LAYER_MATCH_KEY), n_fit)

    def model_fn(p, x, y, xq):
        return models.regression_readout(model.arch, model.weights(p), task, x, y, xq)

    raw, report = layer_match_lib.layer_match(
        model_fn, trained.params, fit_tasks, scored, layers=int(cfg.model.layers), shared=bool(cfg.model.recurrent)
    )
    report.update(tasks=n_tasks, fit_tasks=n_fit, wall_time_s=time.time() - started)
    rows = [
        {
            "seed": s,
            "algorithm": name,
            "layer": k + 1,
            "j": j + 1,
            **{m: float(raw[name][m][s, k, j]) for m in ("r2", "model_cos", "preds_diff")},
            "algorithm_loss": float(raw[name]["loss"][j]),
        }
        for name in report["algorithms"]
        for s, k, j in np.ndindex(*raw[name]["r2"].shape)
    ]
    out = output_dir(trained.run_dir, "layer_match")
    pd.DataFrame(rows).to_csv(out / "layer_match.csv", index=False)
    runs.write_json(out / "layer_match.json", report)
    title = f"{plots.run_title(trained.summary)}: {n_tasks} tasks, {report['seeds']} seed(s)"
    plots.layer_match(report, title, out / "layer_match")
    return {
        "finding": report["finding"],
        "layers": report["layers"],
        "best": {name: alg["best"] for name, alg in report["algorithms"].items()},
        "file": str(out / "layer_match.json"),
    }

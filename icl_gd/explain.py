"""Which algorithm does a trained model run? A fair test of hypotheses (issue 5).

A hypothesis family is a predictor `theta, (x, y, xq) -> y_hat_K` (one readout per step, as a
model has one per layer) with a fixed number of free parameters. Each family is fitted to the
model's final readout on a fit set (the model's predictions, not the labels), by damped
Gauss-Newton compiled as one scan from the best of a few starting points; then compared with
the model (docs/science.md section 5 metrics) on held-out tasks from the training law and on shifted input
laws. Families are ranked by a BIC on the held-out discrepancy, so that a family pays for every
parameter it was given, and against a noise floor: the discrepancy between other seeds (or
checkpoints) of the same model, within which the family with the fewest parameters wins. Besides
GD-like solvers and closed forms, the families include softmax smoothers (one or two heads: softmax
attention as one step of functional GD, Cheng, Chen & Sra 2023).

Sequence models (task=lds, docs/science.md section 8): `explain_sequences` fits solvers of every
position's normal equations (GD, GD per step, Richardson, Newton-Schulz, Chebyshev, ridge) to the
model's predictions, on all positions and on position bands, with the same BIC ranking (and the
noise floor on all positions).

Everything here is a pure function of arrays, keys and static sizes; the run directory lives in
`icl_gd.analyses`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from icl_gd import metrics, references
from icl_gd import tasks as tasks_lib
from icl_gd.linalg import spd_solve
from icl_gd.references import lds as lds_refs
from icl_gd.references import solvers
from icl_gd.tasks import Tasks

NMSE_ZERO = 1e-6  # normalised discrepancies below this (0.1% RMS of the model's predictions) count as zero
EXPLAINS_R2 = 0.95  # a family "explains" the model when held-out R^2 and model cos both reach this
MULTIPLES = (0.125, 0.25, 0.5, 1.0, 2.0)  # starting step sizes, in units of 1 / (input variance)
HELDOUT = "heldout"

ModelFn = Callable[..., jax.Array]  # (params, x_Nxd, y_N, xq_d) -> y_hat_K


def _normal_equations(x_Nxd: jax.Array, y_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`A = X^T X / N` and `b = X^T y / N`, the gradient of docs/science.md's loss being `A w - b`."""
    n = x_Nxd.shape[0]
    return x_Nxd.T @ x_Nxd / n, x_Nxd.T @ y_N / n


def richardson(x_Nxd, y_N, xq_d, alpha, lam, steps: int) -> jax.Array:
    """Richardson iteration on the ridge normal equations `(A + lam I) w = b` from `w = 0`, which
    is the truncated Neumann series of `alpha (I - alpha (A + lam I))^j b`; `lam = 0` is plain GD."""
    a, b = _normal_equations(x_Nxd, y_N)
    shifted = a + lam * jnp.eye(a.shape[0], dtype=a.dtype)
    return solvers.richardson(shifted, b[None], xq_d, jnp.full((steps,), alpha))[:, 0]


def chebyshev(x_Nxd, y_N, xq_d, center, half_width, steps: int) -> jax.Array:
    """Chebyshev iteration for `A w = b` assuming A's spectrum in `center -+ half_width`. Its first
    step is GD with `eta = 1 / center`."""
    a, b = _normal_equations(x_Nxd, y_N)
    return solvers.chebyshev(a, b[None], xq_d, center, half_width, steps)[:, 0]


def newton_schulz(x_Nxd, y_N, xq_d, alpha, steps: int) -> jax.Array:
    """Newton-Schulz iteration `M <- M (2I - A M)` for `A^-1` from `M_0 = alpha I`; readout `k` is
    `x_q^T M_k b`, the Neumann series with `2^k` terms (Fu et al. 2023's "iterative Newton")."""
    a, b = _normal_equations(x_Nxd, y_N)
    return solvers.newton_schulz(a, b[None], xq_d, alpha, steps)[:, 0]


def softmax_smoother(x_Nxd, y_N, xq_d, a_dxd, r) -> jax.Array:
    """One step of kernel regression with a softmax-normalised exponential kernel (Cheng, Chen & Sra
    2023: softmax attention as functional GD), `r sum_i softmax_i(x_i^T A x_q) y_i`: the readout of
    one softmax-attention head whose `W_KQ` x-block is `A sqrt(D)` (scores are scaled by `1/sqrt(D)`,
    `D` the key size) and whose `W_PV` label entry is `-r` (docs/science.md section 9)."""
    return r * jax.nn.softmax(x_Nxd @ (a_dxd @ xq_d)) @ y_N


# Kernel shapes of the softmax families: name: (parameters (d), A from them (theta, d), start (a, d)).
_KERNELS = {
    "scalar": (lambda d: 1, lambda th, d: th[0] * jnp.eye(d), lambda a, d: a[None]),
    "diag": (lambda d: d, lambda th, d: jnp.diag(th), lambda a, d: a * jnp.ones(d)),
    "full": (lambda d: d * d, lambda th, d: th.reshape(d, d), lambda a, d: a * jnp.eye(d).ravel()),
}
_HEAD_SIGNS = (1.0, -1.0)  # two heads: the difference of two smoothers
_LOGIT_STDS = (-4.0, -2.0, -1.0, -0.5, -0.125, 0.125, 0.5, 1.0, 2.0, 4.0)  # starting kernels, in logit stds


def softmax_heads(theta, x_Nxd, y_N, xq_d, kernel: str, heads: int) -> jax.Array:
    """`sum_h s_h r_h sum_i softmax_i(x_i^T A_h x_q) y_i` with `s = (+1, -1)`, theta `(A_1, r_1, A_2, r_2)`."""
    size, matrix, _ = _KERNELS[kernel]
    dim = x_Nxd.shape[1]
    per_head = theta.reshape(heads, size(dim) + 1)
    smoothers = jnp.stack([softmax_smoother(x_Nxd, y_N, xq_d, matrix(h[:-1], dim), h[-1]) for h in per_head])
    return jnp.asarray(_HEAD_SIGNS[:heads]) @ smoothers


def _softmax_starts(kernel: str, heads: int, d: int, eta0) -> jax.Array:
    """Kernels `A = a I` whose logits `x_i^T A x_q` (std `|a| sqrt(d) / eta0`) have a std in
    `_LOGIT_STDS`, every pair of different ones for two heads; `r` = 0, set by `fit` (`LINEAR_IN`)."""
    _, _, start = _KERNELS[kernel]
    scales = jnp.asarray(_LOGIT_STDS) * eta0 / math.sqrt(d)
    head = lambda a: jnp.concatenate([start(a, d), jnp.zeros(1)])
    if heads == 1:
        return jax.vmap(head)(scales)
    i, j = np.triu_indices(len(_LOGIT_STDS), 1)
    return jax.vmap(lambda a1, a2: jnp.concatenate([head(a1), head(a2)]))(scales[i], scales[j])


_SOFTMAX = {  # name: (kernel, heads)
    "softmax_scalar": ("scalar", 1),
    "softmax_diag": ("diag", 1),
    "softmax_full": ("full", 1),
    "softmax_2heads_scalar": ("scalar", 2),
    "softmax_2heads_full": ("full", 2),
}


def _softmax_family(kernel: str, heads: int) -> tuple:
    """A family of `heads` softmax smoothers (`softmax_heads`): one attention layer, so `families`
    offers it to one-layer models only (its readout is broadcast over `K` like a closed form's)."""
    size = _KERNELS[kernel][0]
    what = "one softmax smoother" if heads == 1 else "the difference of two softmax smoothers"
    return (
        lambda k, d: heads * (size(d) + 1),
        lambda th, x, y, q, sp, k, d, lam: jnp.broadcast_to(softmax_heads(th, x, y, q, kernel, heads), (k,)),
        lambda k, d, e, n: _softmax_starts(kernel, heads, d, e),
        f"{what}, r sum_i softmax_i(x_i^T A x_q) y_i, A {kernel} (Cheng, Chen & Sra 2023)",
    )


def _readouts(kernel: str, heads: int):
    """Indices of the readouts `r_h` in a softmax family's parameters (the last of each head's)."""
    return lambda k, d: tuple((h + 1) * (_KERNELS[kernel][0](d) + 1) - 1 for h in range(heads))


def _pairs(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.stack(jnp.meshgrid(a, b, indexing="ij"), -1).reshape(-1, 2)


def _chebyshev_starts(steps, dim, eta0, n):
    center_fraction = _pairs(1 / (jnp.asarray(MULTIPLES) * eta0), jnp.array([0.0, 0.5, 0.9]))
    return jnp.stack([center_fraction[:, 0], center_fraction.prod(-1)], -1)


_GAMMAS = jnp.array([0.0, 0.25, 0.5])  # GD++ starting gammas, in units of eta0
_STEP_SIZES = lambda eta0: jnp.asarray(MULTIPLES) * eta0
_SCALAR = lambda k, d, e, n: _STEP_SIZES(e)[:, None]

# name: (parameter count (K, d), predict (theta, x, y, xq, ridge spectrum, K, d, lam) -> y_hat_K,
#        starts (K, d, eta0, N) -> [C, P], about)
FAMILIES = {
    "gd": (
        lambda k, d: 1,
        lambda th, x, y, q, sp, k, d, lam: references.gd_direct(x, y, q, jnp.broadcast_to(th[0], (k,))),
        _SCALAR,
        "K GD steps, one shared eta (docs/science.md section 4)",
    ),
    "gd_per_step": (
        lambda k, d: k,
        lambda th, x, y, q, sp, k, d, lam: references.gd_direct(x, y, q, th),
        lambda k, d, e, n: jnp.repeat(_STEP_SIZES(e)[:, None], k, 1),
        "K GD steps, one eta per step",
    ),
    "gdpp": (
        lambda k, d: 2,
        lambda th, x, y, q, sp, k, d, lam: references.gdpp_direct(
            x, y, q, jnp.broadcast_to(th[0], (k,)), jnp.broadcast_to(th[1], (k,))
        ),
        lambda k, d, e, n: _pairs(_STEP_SIZES(e), _GAMMAS * e),
        "GD++, (eta, gamma) shared (docs/science.md section 4)",
    ),
    "gdpp_per_step": (
        lambda k, d: 2 * k,
        lambda th, x, y, q, sp, k, d, lam: references.gdpp_direct(x, y, q, th[:k], th[k:]),
        lambda k, d, e, n: jnp.repeat(_pairs(_STEP_SIZES(e), _GAMMAS * e), k, 1),
        "GD++, (eta_k, gamma_k) per step",
    ),
    "precond_diag": (
        lambda k, d: d,
        lambda th, x, y, q, sp, k, d, lam: references.precond_gd_direct(
            x, y, q, jnp.broadcast_to(jnp.diag(th), (k, d, d))
        ),
        lambda k, d, e, n: _STEP_SIZES(e)[:, None] * jnp.ones(d),
        "GD with a diagonal preconditioner shared by the steps",
    ),
    "precond_diag_per_step": (
        lambda k, d: d * k,
        lambda th, x, y, q, sp, k, d, lam: references.precond_gd_direct(x, y, q, jax.vmap(jnp.diag)(th.reshape(k, d))),
        lambda k, d, e, n: _STEP_SIZES(e)[:, None] * jnp.ones(d * k),
        "GD with a diagonal preconditioner per step",
    ),
    "precond_full": (
        lambda k, d: d * d,
        lambda th, x, y, q, sp, k, d, lam: references.precond_gd_direct(
            x, y, q, jnp.broadcast_to(th.reshape(d, d), (k, d, d))
        ),
        lambda k, d, e, n: _STEP_SIZES(e)[:, None] * jnp.eye(d).ravel(),
        "GD with a full preconditioner shared by the steps",
    ),
    "precond_full_per_step": (
        lambda k, d: d * d * k,
        lambda th, x, y, q, sp, k, d, lam: references.precond_gd_direct(x, y, q, th.reshape(k, d, d)),
        lambda k, d, e, n: _STEP_SIZES(e)[:, None] * jnp.tile(jnp.eye(d).ravel(), k),
        "GD with a full preconditioner per step",
    ),
    "richardson": (
        lambda k, d: 2,
        lambda th, x, y, q, sp, k, d, lam: richardson(x, y, q, th[0], th[1], k),
        lambda k, d, e, n: _pairs(_STEP_SIZES(e), jnp.array([0.0, 0.01, 0.1]) / e),
        "Richardson on the ridge normal equations = truncated Neumann series, (alpha, lambda)",
    ),
    "chebyshev": (
        lambda k, d: 2,
        lambda th, x, y, q, sp, k, d, lam: chebyshev(x, y, q, th[0], th[1], k),
        _chebyshev_starts,
        "Chebyshev iteration, spectrum of A assumed in center -+ half width",
    ),
    "newton_schulz": (
        lambda k, d: 1,
        lambda th, x, y, q, sp, k, d, lam: newton_schulz(x, y, q, th[0], k),
        _SCALAR,
        "Newton-Schulz iteration for A^-1 from alpha I (2^k Neumann terms at step k)",
    ),
    "ridge": (
        lambda k, d: 1,
        lambda th, x, y, q, sp, k, d, lam: jnp.broadcast_to(
            references.ridge_from_spectrum(sp, q, jnp.exp(th[0])), (k,)
        ),
        lambda k, d, e, n: jnp.log(jnp.logspace(-4, 2, 13) * n / e)[:, None],
        "ridge regression on the context, fitted lambda (theta = log lambda)",
    ),
    "ols": (
        lambda k, d: 0,
        lambda th, x, y, q, sp, k, d, lam: jnp.broadcast_to(references.ridge_from_spectrum(sp, q), (k,)),
        lambda k, d, e, n: jnp.zeros((1, 0)),
        "least squares on the context (minimum norm)",
    ),
    "bayes": (
        lambda k, d: 0,
        lambda th, x, y, q, sp, k, d, lam: jnp.broadcast_to(references.ridge_from_spectrum(sp, q, lam), (k,)),
        lambda k, d, e, n: jnp.zeros((1, 0)),
        "Bayes-optimal: ridge with lambda = noise^2 / w_std^2",
    ),
    **{name: _softmax_family(*spec) for name, spec in _SOFTMAX.items()},
}
# name: (K, d) -> the parameters its predictor is linear in. `fit` scores every start with them
# set by least squares (variable projection), so that the starts need only cover the others.
LINEAR_IN = {name: _readouts(*spec) for name, spec in _SOFTMAX.items()}


@dataclass(frozen=True)
class Family:
    """A hypothesis for a model with `steps` readouts on `dim`-dimensional inputs: a predictor
    `theta_P, (x, y, xq) -> y_hat_K` (closed forms give the same value at every step). Hashable,
    so that its compiled fit is reused across calls."""

    name: str
    steps: int
    dim: int
    lam: float = 0.0  # the Bayes-optimal ridge penalty (family "bayes")

    @property
    def n_params(self) -> int:
        return FAMILIES[self.name][0](self.steps, self.dim)

    @property
    def about(self) -> str:
        return FAMILIES[self.name][3]

    @property
    def linear_in(self) -> tuple[int, ...]:
        """The parameters its predictor is linear in, set by least squares at every start (`LINEAR_IN`)."""
        return LINEAR_IN[self.name](self.steps, self.dim) if self.name in LINEAR_IN else ()

    def predict(self, theta_P, x_Nxd, y_N, xq_d, spec: references.RidgeSpectrum) -> jax.Array:
        """Readouts `[K]` on one task; `spec` is the task's `references.ridge_spectrum`."""
        return FAMILIES[self.name][1](theta_P, x_Nxd, y_N, xq_d, spec, self.steps, self.dim, self.lam)

    def starts(self, eta0: jax.Array, n_context: int) -> jax.Array:
        """Candidate starting points `[C, P]`, from a step-size scale `eta0` (1 / input variance)."""
        return FAMILIES[self.name][2](self.steps, self.dim, eta0, n_context)


def families(dim: int, steps: int, noise_std: float = 0.0, w_std: float = 1.0) -> tuple[list[Family], dict[str, str]]:
    """The hypothesis families for a model with `steps` readouts, and those left out (with the
    reason) because at this depth or noise level they coincide with a simpler one, or (the softmax
    smoothers) describe one attention layer only."""
    if steps > 1:
        omitted = dict.fromkeys(_SOFTMAX, "one softmax-attention step: tested on one-layer models only")
    else:
        after = "for one step it is gd: {} acts only after the step"
        omitted = {
            "gd_per_step": "for one step it is gd",
            "gdpp": after.format("gamma"),
            "gdpp_per_step": after.format("gamma"),
            "precond_diag_per_step": "for one step it is precond_diag",
            "precond_full_per_step": "for one step it is precond_full",
            "richardson": after.format("lambda"),
            "chebyshev": "for one step it is gd with eta = 1 / center",
        }
    if noise_std == 0:
        omitted["bayes"] = "noiseless tasks: the Bayes-optimal predictor is ols"
    lam = references.bayes_ridge_lambda(noise_std, w_std)
    return [Family(name, steps, dim, lam) for name in FAMILIES if name not in omitted], omitted


def fit(
    family: Family, t: Tasks, spec: references.RidgeSpectrum, target_T: jax.Array, eta0: jax.Array, iters: int
) -> jax.Array:
    """Parameters of `family` whose final readout best matches `target_T` (the model's) on `t`
    (`spec`: the tasks' ridge spectra), from the best of the family's starting points."""
    starts = family.starts(eta0, t.x.shape[1])
    if family.n_params == 0:
        return starts[0]

    def residual(theta):
        preds = jax.vmap(family.predict, in_axes=(None, 0, 0, 0, 0))(theta, t.x, t.y, t.xq, spec)
        return preds[:, -1] - target_T

    if family.linear_in:
        starts = jax.vmap(functools.partial(_least_squares_in, residual, np.asarray(family.linear_in)))(starts)
    costs = jax.vmap(lambda th: jnp.sum(residual(th) ** 2))(starts)
    best = starts[jnp.argmin(jnp.where(jnp.isfinite(costs), costs, jnp.inf))]
    return solvers.levenberg_marquardt(residual, best, t.x.shape[0], iters)


def _least_squares_in(residual: Callable[[jax.Array], jax.Array], index: np.ndarray, theta_P: jax.Array) -> jax.Array:
    """`theta` with the entries at `index`, in which `residual` is linear, set to minimise
    `|residual|^2` (lightly damped, for heads that coincide)."""
    at = lambda v: residual(theta_P.at[index].set(v))
    zero = jnp.zeros(len(index), theta_P.dtype)
    r0, jvp = jax.linearize(at, zero)
    jac_RxL = jax.vmap(jvp, out_axes=1)(jnp.eye(len(index), dtype=theta_P.dtype))
    jtj = jac_RxL.T @ jac_RxL
    damped = jtj + 1e-6 * jnp.trace(jtj) / len(index) * jnp.eye(len(index)) + 1e-30 * jnp.eye(len(index))
    return theta_P.at[index].set(-spd_solve(damped, jac_RxL.T @ r0))


def discrepancy(other: jax.Array | np.ndarray, model: jax.Array | np.ndarray) -> jax.Array:
    """The normalised discrepancy `nmse = mean((f - m)^2) / var(m)` over the leading axis (tasks)."""
    return jnp.mean((other - model) ** 2, axis=0) / jnp.var(model, axis=0)


def agreement(model: metrics.Evaluation, other: metrics.Evaluation, yq_T: jax.Array) -> dict[str, jax.Array]:
    """Per readout `[K]`: docs/science.md section 5's preds diff, model cos and model diff, plus the
    normalised discrepancy `nmse = mean((f - m)^2) / var(m)` (`r2 = 1 - nmse`) and `other`'s loss."""
    out = metrics.alignment(model, other)
    nmse = discrepancy(other.preds[..., 0, 0], model.preds[..., 0, 0])  # [T, K]: one scored position, one output
    out.update(nmse=nmse, r2=1.0 - nmse, loss=metrics.losses(other, yq_T[:, None, None]))
    return out


def task_sets(task, key: jax.Array, n_tasks: int) -> dict[str, Tasks]:
    """The fit set and the scoring sets: held-out tasks from the training law (a linear-regression
    task kind), and the same tasks with inputs scaled by 0.5 and 2 (`task.scaled`: a non-isotropic
    covariance scales with them), and from another input law of the same covariance."""
    law, scale = task.x_dist, task.x_scale
    other = "uniform" if law == "gaussian" else "gaussian"
    matched = scale * math.sqrt(tasks_lib.input_law(law, 1.0).var / tasks_lib.input_law(other, 1.0).var)
    laws = {
        "fit": task,
        HELDOUT: task,
        "x_scale_x0.5": task.scaled(0.5),
        "x_scale_x2": task.scaled(2.0),
        f"x_dist_{other}": task.shifted(x_dist=other, x_scale=matched),
    }
    return {name: law.draw(jax.random.fold_in(key, i), n_tasks) for i, (name, law) in enumerate(laws.items())}


def _stack(trees: list):
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


# The ridge spectra of stacked task sets `[sets, T]`: the one batched SVD of explain, in a program
# of its own (see `references.ridge_spectrum`).
_spectra = jax.jit(jax.vmap(jax.vmap(references.ridge_spectrum)))


@functools.partial(jax.jit, static_argnames=("fams", "iters"))
def _fit_and_score(
    sets: Tasks,
    spectra: references.RidgeSpectrum,
    model_ev: metrics.Evaluation,
    eta0: jax.Array,
    *,
    fams: tuple[Family, ...],
    iters: int,
) -> dict:
    """Every family and seed: fit the family to the model's final readout on the first of the
    stacked `sets`, then its agreement with the model on the others. One program for all
    families (compiling them apart takes twice as long), cached across calls with the same
    families and shapes; it holds no LAPACK call (see `icl_gd.linalg`)."""
    head = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)
    rest = lambda tree: jax.tree_util.tree_map(lambda a: a[1:], tree)

    def one_seed(family, model_ev):
        theta = fit(family, head(sets), head(spectra), model_ev.preds[0, :, -1, 0, 0], eta0, iters)
        predict = functools.partial(family.predict, theta)
        score = lambda t, spec, ev: agreement(ev, metrics.evaluate_tasks(predict, t, spec), t.yq)
        return {"theta": theta, "scores": jax.vmap(score)(rest(sets), rest(spectra), rest(model_ev))}

    return {f.name: jax.vmap(functools.partial(one_seed, f))(model_ev) for f in fams}


def fit_and_score(model_fn: ModelFn, fams: list[Family], params_S, sets: dict[str, Tasks], iters: int) -> dict:
    """Fit every family to every seed's model and score it on every set but the fit set.

    Returns `{"model_loss": [S, sets, K], "families": {name: {"theta": [S, P], "scores": {metric:
    [S, sets, K]}}}}`, the scoring sets in the order of `sets`. The sets are stacked (fit set
    first) so that each stage is traced once; the model, the ridge spectra and the fits are three
    programs, so that each holds at most one batched LAPACK call (`references.ridge_spectrum`).
    """
    names = ["fit", *[name for name in sets if name != "fit"]]
    stacked = _stack([sets[name] for name in names])
    eta0 = 1.0 / jnp.mean(sets["fit"].x ** 2)

    @jax.jit
    def evaluate_model(params_S, t):
        evaluate = lambda p, t: metrics.evaluate_tasks(functools.partial(model_fn, p), t)
        return jax.vmap(jax.vmap(evaluate, in_axes=(None, 0)), in_axes=(0, None))(params_S, t)

    model_ev = evaluate_model(params_S, stacked)
    spectra = _spectra(stacked.x, stacked.y)
    scored_ev = jax.tree_util.tree_map(lambda a: a[:, 1:], model_ev)
    yq = jnp.broadcast_to(stacked.yq[1:, :, None, None], (*scored_ev.preds.shape[:3], 1, 1))
    model_loss = jax.vmap(jax.vmap(metrics.losses))(scored_ev, yq)
    fitted = _fit_and_score(stacked, spectra, model_ev, eta0, fams=tuple(fams), iters=iters)
    return jax.device_get({"model_loss": model_loss, "families": fitted})


def ranking(nmse_SxF: np.ndarray, n_params_F: np.ndarray, n_tasks: int, names: list[str]) -> dict:
    """BIC on the held-out discrepancy: `score = n log(nmse + NMSE_ZERO) + p log n` per seed and family
    (Gaussian discrepancies of variance `nmse`, `p` fitted parameters, `n` held-out tasks); lower
    is better. The winner has the lowest mean score; its margin is the runner-up's score minus its
    own, per seed, with a 95% interval across seeds (Student t)."""
    score = n_tasks * np.log(np.asarray(nmse_SxF, np.float64) + NMSE_ZERO) + np.asarray(n_params_F) * math.log(n_tasks)
    order = np.argsort(score.mean(0), kind="stable")
    winner, runner_up = order[0], order[1]
    return {
        "criterion": f"BIC = n log(nmse + {NMSE_ZERO:g}) + p log n on {n_tasks} held-out tasks (lower is better)",
        "order": [names[i] for i in order],
        "winner": names[winner],
        "runner_up": names[runner_up],
        "margin": metrics.mean_ci95(score[:, runner_up] - score[:, winner]),
        "wins": int(np.sum(score.argmin(1) == winner)),
        "seeds": int(score.shape[0]),
        "score": {name: metrics.mean_ci95(score[:, i]) for i, name in enumerate(names)},
        "delta": {name: metrics.mean_ci95(score[:, i] - score[:, winner]) for i, name in enumerate(names)},
    }


def off_identity(m_Bxdxd: np.ndarray) -> np.ndarray:
    """`||M - mean(diag M) I|| / ||M||` per matrix: how far a preconditioner is from a scaled identity."""
    m = np.asarray(m_Bxdxd, np.float64)
    scale = np.trace(m, axis1=-2, axis2=-1) / m.shape[-1]
    return np.linalg.norm(m - scale[:, None, None] * np.eye(m.shape[-1]), axis=(-2, -1)) / np.maximum(
        np.linalg.norm(m, axis=(-2, -1)), 1e-30
    )


def against_gamma_star(p_Sxdxd: np.ndarray, gamma_dxd: np.ndarray) -> dict[str, np.ndarray]:
    """Fitted preconditioners against the best one-step preconditioner `Gamma*` (docs/science.md
    section 10), per matrix: the best scalar `c` (`P ~ c Gamma*`), the relative Frobenius distance
    `||P - c Gamma*|| / ||P||` after it, and the cosine of the flattened matrices."""
    p = np.asarray(p_Sxdxd, np.float64).reshape(len(p_Sxdxd), -1)
    g = np.asarray(gamma_dxd, np.float64).ravel()
    scale = p @ g / (g @ g)
    p_norm = np.maximum(np.linalg.norm(p, axis=1), 1e-30)
    return {
        "scale": scale,
        "rel_distance": np.linalg.norm(p - scale[:, None] * g, axis=1) / p_norm,
        "cosine": p @ g / (p_norm * np.linalg.norm(g)),
    }


def _gamma_star_report(task, fams: list[Family], report: dict) -> dict:
    """`Gamma*` of the task's input law (`references.regression.precond_step`: its covariance, input
    kurtosis, prior, noise and distractors), and `against_gamma_star` for the fitted `precond_full` and
    `precond_diag` (added to their entries as `gamma_star`)."""
    best = references.regression.precond_step(task).best()
    matrices = {
        "precond_full": lambda th: th.reshape(-1, task.dim, task.dim),
        "precond_diag": lambda th: th[:, :, None] * np.eye(task.dim),
    }
    for f in fams:
        if f.name in matrices:
            compared = against_gamma_star(matrices[f.name](np.asarray(report[f.name]["params"])), best.gamma)
            report[f.name]["gamma_star"] = {name: metrics.mean_ci95(v) for name, v in compared.items()}
    return {
        "gamma": best.gamma.tolist(),
        "loss": best.loss,
        "off_identity": float(off_identity(best.gamma[None])[0]),
        "about": "the best preconditioner of one GD step on this input law (docs/science.md section 10)",
    }


def weight_structure(w_kq: np.ndarray, w_pv: np.ndarray, n_context: int) -> list[dict]:
    """Per layer and head of `[L, H, D, D]` products: the fraction of the Frobenius norm outside
    the blocks the GD / GD++ constructions use (docs/science.md section 4: `W_KQ` only in its x-block,
    `W_PV` only in its x-block (GD++) and label entry (GD)), how far the x-block of `W_KQ` is
    from a multiple of the identity, and the `eta`, `gamma` a GD++ layer with these entries has."""
    w_kq, w_pv = np.asarray(w_kq, np.float64), np.asarray(w_pv, np.float64)
    dim = w_kq.shape[-1] - 1
    xx = np.zeros(w_kq.shape[-2:], bool)
    xx[:dim, :dim] = True
    yy = np.zeros_like(xx)
    yy[dim, dim] = True

    def outside(w, mask):
        return float(np.linalg.norm(np.where(mask, 0.0, w)) / max(np.linalg.norm(w), 1e-30))

    rows = []
    for layer in range(w_kq.shape[0]):
        for head in range(w_kq.shape[1]):
            kq, pv = w_kq[layer, head], w_pv[layer, head]
            kq_diag = float(np.mean(np.diag(kq)[:dim]))
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "kq_outside_gd": outside(kq, xx),
                    "pv_outside_gd": outside(pv, yy),
                    "pv_outside_gdpp": outside(pv, xx | yy),
                    "kq_x_block_off_identity": float(off_identity(kq[None, :dim, :dim])[0]),
                    "implied_eta": -n_context * pv[dim, dim] * kq_diag,
                    "implied_gamma": -n_context * float(np.mean(np.diag(pv)[:dim])) * kq_diag,
                }
            )
    return rows


# The noise floor (issue 10 item 8): a trained model is never exactly any algorithm, so with
# thousands of held-out tasks the BIC always prefers the family with most parameters. The
# yardstick is how far apart two models are that run the same algorithm by construction: other
# seeds of the same run, or the same seed one checkpoint earlier. Families whose held-out
# discrepancy is within it cannot be told from the model, and the fewest parameters win.

# source: (name in the verdict, what the model is as close to, what is compared), in order of preference
FLOOR_SOURCES = {
    "seeds": ("seed-to-seed", "another seed of it", "independently trained seeds of the run, every ordered pair"),
    "checkpoints": (
        "checkpoint-to-checkpoint",
        "its own previous checkpoint",
        "each explained seed's final checkpoint against its previous one",
    ),
}
FLOOR_USABLE = 1.0 - EXPLAINS_R2  # a floor wider than what "explains" allows cannot separate families


class FloorModels(NamedTuple):
    """Models that run the same algorithm as the one explained: parameters with a leading axis
    `[M, ...]` and, per source of `FLOOR_SOURCES`, pairs `(reference, other)` of indices into them
    (the discrepancy is the other's against the reference's, as a family's against the model's);
    `steps`: per source, the training steps compared (checkpoints), for the report."""

    params: Any
    pairs: dict[str, list[tuple[int, int]]]
    steps: dict[str, list[int]] | None = None


def floor_discrepancies(predict: Callable[[Any], jax.Array], floor: FloorModels) -> dict[str, np.ndarray]:
    """Per source, `discrepancy` of each pair's final readouts, all entries of `predict(params)`
    (one set of tasks or sequences) pooled as the family scores pool them."""
    preds = jax.jit(jax.vmap(predict))(floor.params)
    flat = preds.reshape(preds.shape[0], -1)
    out = {}
    for source, pairs in floor.pairs.items():
        ref, other = np.asarray(pairs, int).reshape(-1, 2).T
        out[source] = np.asarray(discrepancy(flat[other].T, flat[ref].T)) if len(ref) else np.zeros(0)
    return out


def noise_floor(nmse_by_source: dict[str, np.ndarray], steps: dict[str, list[int]] | None = None) -> dict:
    """The floor, JSON-ready: every available source's discrepancies (mean, 95% interval across
    pairs, number of pairs) and the floor itself, from the first source of `FLOOR_SOURCES` whose mean
    is usable (below `FLOOR_USABLE`), else the first available: other seeds are the yardstick, a
    checkpoint stands in for them when the run has one seed or seeds that learned different things."""
    sources: dict[str, dict[str, Any]] = {
        name: {"pairs": len(v), "nmse": metrics.mean_ci95(v), "about": FLOOR_SOURCES[name][2]}
        | ({"steps": steps[name]} if steps and name in steps else {})
        for name, v in nmse_by_source.items()
        if len(v)
    }
    available = [name for name in FLOOR_SOURCES if name in sources]
    usable = [name for name in available if sources[name]["nmse"]["mean"] < FLOOR_USABLE]
    source = (usable or available or [None])[0]
    return {
        "source": source,
        "nmse": None if source is None else sources[source]["nmse"],
        "available": available,
        "sources": sources,
        "usable_below": FLOOR_USABLE,
        "rule": "families with held-out nmse (mean over seeds) at most the floor's mean are indistinguishable "
        "from the model; among them the fewest parameters win (then the lowest nmse); the floor is the first "
        f"source (seeds, checkpoints) with a mean below {FLOOR_USABLE:g}; without one the BIC ranking stands",
    }


def within_floor(floor: dict, nmse_F: np.ndarray, n_params_F: np.ndarray, names: list[str]) -> list[str]:
    """The families within a usable `floor` (`noise_floor`), fewest parameters first, then lowest nmse."""
    if floor["nmse"] is None or floor["nmse"]["mean"] >= FLOOR_USABLE:
        return []
    inside = [i for i in range(len(names)) if nmse_F[i] <= floor["nmse"]["mean"]]
    return [names[i] for i in sorted(inside, key=lambda i: (n_params_F[i], nmse_F[i]))]


def conclude(families_report: dict, rank: dict, floor: dict | None, with_cos: bool = True) -> dict:
    """Winner, whether it explains the model, and the verdict line: the family within the noise
    floor with the fewest parameters when there is one (`within_floor`), else the BIC winner. A
    family explains the model when its held-out R^2 (and model cos, `with_cos`) reach
    `EXPLAINS_R2`. `floor` None: no floor clause (position bands of sequence models)."""
    names = list(families_report)
    nmse_F = np.array([families_report[n][HELDOUT]["nmse"]["mean"] for n in names])
    n_params_F = np.array([families_report[n]["n_params"] for n in names])
    within = [] if floor is None else within_floor(floor, nmse_F, n_params_F, names)
    winner = within[0] if within else rank["winner"]
    held = families_report[winner][HELDOUT]
    r2, cos = held["r2"]["mean"], held["model_cos"]["mean"] if with_cos else None
    explains = bool(r2 >= EXPLAINS_R2 and (cos is None or cos >= EXPLAINS_R2))
    fit = f"held-out R^2 {r2:.4f}" + ("" if cos is None else f", model cos {cos:.4f}")
    bic = (
        f"BIC margin {rank['margin']['mean']:.1f} over {rank['runner_up']}, "
        f"lowest in {rank['wins']}/{rank['seeds']} seed(s)"
    )
    needs = "both must reach" if with_cos else "must reach"
    source = None if floor is None else floor["source"]
    label, other, _ = FLOOR_SOURCES.get(source or "", ("", "", ""))
    level = floor["nmse"]["mean"] if floor is not None and floor["nmse"] is not None else math.nan
    if not explains:
        verdict = f"no family explains the model: the best, {winner}, reaches {fit} ({needs} {EXPLAINS_R2})"
    elif within:
        by_bic = "the BIC agrees" if rank["winner"] == winner else f"by BIC alone {rank['winner']} wins: {bic}"
        verdict = (
            f"{winner} ({families_report[winner]['n_params']} parameter(s)) is as close to the model as {other}: "
            f"within the {label} floor nmse {level:.2g} "
            + (f"are {', '.join(within)}; the fewest parameters win " if len(within) > 1 else "is only it ")
            + f"({fit}; {by_bic})"
        )
    else:
        verdict = f"{winner} ({families_report[winner]['n_params']} parameter(s)) explains the model best: {fit}; {bic}"
    if floor is not None and not within:
        if source is None:
            verdict += "; no noise floor (it needs two seeds or two checkpoints)"
        elif level >= FLOOR_USABLE:
            verdict += (
                f"; the {label} floor nmse {level:.2g} is too wide to separate families (usable below {FLOOR_USABLE:g})"
            )
        else:
            verdict += f"; no family is within the {label} floor nmse {level:.2g} (best {nmse_F.min():.2g})"
    return {
        "winner": winner,
        "winner_by": "floor" if within else "BIC",
        "within_floor": within,
        "explains": explains,
        "verdict": verdict,
    }


def measure_floor(predict: Callable[[Any], jax.Array], floor_models: FloorModels | None) -> dict:
    """`noise_floor` of `floor_models` (None: no source) on the final readouts `predict(params)`."""
    if floor_models is None:
        return noise_floor({})
    return noise_floor(floor_discrepancies(predict, floor_models), floor_models.steps)


def _over_floor(families_report: dict, floor: dict) -> None:
    """Every family's held-out nmse over the floor (`nmse_over_floor`; None without a floor)."""
    level = None if floor["nmse"] is None else max(floor["nmse"]["mean"], 1e-30)
    for entry in families_report.values():
        entry["nmse_over_floor"] = None if level is None else entry[HELDOUT]["nmse"]["mean"] / level


def explain(
    model_fn: ModelFn,
    params_S,
    task,
    key: jax.Array,
    *,
    steps: int,
    n_tasks: int = 2048,
    iters: int = 50,
    floor_models: FloorModels | None = None,
) -> dict:
    """The whole test for a model given as `model_fn(params, x, y, xq) -> y_hat_K` with a leading
    seed axis on `params_S`: families fitted, scored, ranked by BIC and against the noise floor of
    `floor_models` (`conclude`); JSON-ready (means and 95% intervals across seeds, final readout
    unless `per_layer`)."""
    fams, omitted = families(task.dim, steps, task.noise_std, task.w_std)
    sets = task_sets(task, key, n_tasks)
    raw = fit_and_score(model_fn, fams, params_S, sets, iters)
    names = [f.name for f in fams]
    scoring = [name for name in sets if name != "fit"]
    held = scoring.index(HELDOUT)
    nmse_SxF = np.stack([raw["families"][name]["scores"]["nmse"][:, held, -1] for name in names], 1)
    rank = ranking(nmse_SxF, np.array([f.n_params for f in fams]), n_tasks, names)
    report = {}
    for f in fams:
        r = raw["families"][f.name]
        entry = {"n_params": f.n_params, "about": f.about, "params": np.asarray(r["theta"]).tolist()}
        scores = r["scores"]
        entry.update({s: {m: metrics.mean_ci95(v[:, i, -1]) for m, v in scores.items()} for i, s in enumerate(scoring)})
        entry["per_layer"] = {m: scores[m][:, held].mean(0).tolist() for m in ("r2", "model_cos", "preds_diff")}
        if f.name.startswith("precond_full"):
            entry["off_identity"] = metrics.mean_ci95(
                off_identity(np.asarray(r["theta"]).reshape(-1, f.dim, f.dim)).reshape(len(r["theta"]), -1).mean(1)
            )
        report[f.name] = entry
    heldout = sets[HELDOUT]
    final = lambda p: jax.vmap(lambda x, y, q: model_fn(p, x, y, q)[-1])(heldout.x, heldout.y, heldout.xq)
    floor = measure_floor(final, floor_models)
    _over_floor(report, floor)
    outcome = conclude(report, rank, floor)
    gamma_star = {}
    if steps == 1 and getattr(task, "x_cov", None) is not None:  # non-isotropic inputs: GD is not Gamma*
        gamma_star = {"gamma_star": _gamma_star_report(task, fams, report)}
        full = report["precond_full"]["gamma_star"]
        outcome["verdict"] += (
            f"; fitted precond_full against Gamma*: relative distance {full['rel_distance']['mean']:.3g}, "
            f"cosine {full['cosine']['mean']:.4f}, scale {full['scale']['mean']:.3g}"
        )
    return {
        "steps": steps,
        "n_tasks": n_tasks,
        "fit_iters": iters,
        "seeds": int(nmse_SxF.shape[0]),
        "sets": scoring,
        "model": {s: {"loss": metrics.mean_ci95(raw["model_loss"][:, i, -1])} for i, s in enumerate(scoring)},
        "families": report,
        "omitted": omitted,
        "ranking": rank,
        "floor": floor,
        **gamma_star,
        **outcome,
        "explains_threshold": EXPLAINS_R2,
    }


# Sequence tasks (task=lds, docs/science.md section 8). A family is a `K`-step solver of each
# position's normal equations `W (A_t + lambda I) = B_t` (`references.solvers`, shared with the
# references of `task=lds`), fitted to the model's final readout and scored by its predictions at
# every position; fitting and scoring go through `A_t`'s eigendecomposition (`references.lds.Spectra`),
# exact and `O(D^2)` per position whatever the family.

SequenceModelFn = Callable[..., jax.Array]  # (params, tokens_BxTxW) -> y_hat [B, K, T, D]
BAND_EDGES = (5, 15)  # position bands 1-5, 6-15, 16-T: few pairs seen, some, many
STATE_SCALES = (0.5, 2.0)  # shifted scoring sets: the held-out sequences with their states scaled
ALL_POSITIONS = "all"
# The sensitivities of sequence predictions take one reverse pass per position: not computed, and
# reported as such where regression reports have model cos / model diff.
NOT_COMPUTED = {"mean": None, "ci95": [None, None], "per_seed": []}


def _solver_family(name: str, about: str) -> tuple:
    solver = lds_refs.SOLVERS[name]
    return (lambda k: len(solver.scalars), solver.solve, lambda k, eta: solver.starts(eta), about)


# name: (parameter count (K), solve (theta, K, task lambda) -> (A, B, q) -> [K, O],
#        starts (K, eta0) -> [C, P], about)
SEQUENCE_FAMILIES = {
    "gd": _solver_family("gd", "K GD steps on the pairs seen so far, one shared eta (docs/science.md section 8)"),
    "gd_per_step": (
        lambda k: k,
        lambda th, k, lam: lambda a, b, q: solvers.richardson(a, b, q, th),
        lambda k, eta: jnp.repeat(lds_refs.SOLVERS["gd"].starts(eta), k, 1),
        "K GD steps, one eta per step",
    ),
    "richardson": _solver_family("richardson", "Richardson on W (A + lambda I) = B, (alpha, lambda)"),
    "newton_schulz": _solver_family("newton_schulz", "Newton-Schulz for (A + lambda I)^-1 from alpha I, task's lambda"),
    "chebyshev": _solver_family("chebyshev", "Chebyshev iteration, spectrum of A + lambda I in center -+ half width"),
    "ridge": (
        lambda k: 1,
        lambda th, k, lam: lds_refs.ridge(jnp.exp(th[0]), k),
        lambda k, eta: jnp.log(jnp.logspace(-4, 2, 13) / eta)[:, None],
        "ridge on the pairs seen so far, fitted lambda (theta = log lambda)",
    ),
    "ridge_online": (
        lambda k: 0,
        lambda th, k, lam: lds_refs.ridge(lam, k),
        lambda k, eta: jnp.zeros((1, 0)),
        "ridge with the task's lambda (the ridge_online reference)",
    ),
}


@dataclass(frozen=True)
class SequenceFamily:
    """A hypothesis for a sequence model with `steps` readouts: a solver `theta -> (A, B, q) -> [K, O]`
    on every position's normal equations (`lam`: the task's ridge penalty). Hashable, so that its
    compiled fit is reused across calls."""

    name: str
    steps: int
    lam: float

    @property
    def n_params(self) -> int:
        return SEQUENCE_FAMILIES[self.name][0](self.steps)

    @property
    def about(self) -> str:
        return SEQUENCE_FAMILIES[self.name][3]

    def solve(self, theta_P: jax.Array) -> lds_refs.Solve:
        return SEQUENCE_FAMILIES[self.name][1](theta_P, self.steps, self.lam)

    def predict(self, theta_P: jax.Array, states_Tp1xD: jax.Array) -> jax.Array:
        """Readouts `[K, T, D]` on one sequence of states `s_1..s_{T+1}`."""
        return lds_refs.per_position(self.solve(theta_P), *lds_refs.normal_equations(states_Tp1xD), states_Tp1xD[:-1])

    def starts(self, eta0: jax.Array) -> jax.Array:
        """Candidate starting points `[C, P]`, from the step size `eta0` of one GD step."""
        return SEQUENCE_FAMILIES[self.name][2](self.steps, eta0)


def sequence_families(steps: int, lam: float) -> tuple[list[SequenceFamily], dict[str, str]]:
    """The families for a sequence model with `steps` readouts, and those left out (with the reason)
    because at this depth they coincide with a simpler one."""
    omitted = {}
    if steps == 1:
        omitted = {
            "gd_per_step": "for one step it is gd",
            "richardson": "for one step it is gd: lambda acts only after the step",
            "chebyshev": "for one step it is gd with eta = 1 / center",
        }
    return [SequenceFamily(name, steps, lam) for name in SEQUENCE_FAMILIES if name not in omitted], omitted


def position_bands(length: int) -> dict[str, tuple[int, int]]:
    """Position bands `name: (first, last)` (1-based, inclusive) cut at `BAND_EDGES`: sub-bands of
    `1..length` only, empty when it has a single band."""
    edges = [edge for edge in BAND_EDGES if edge < length]
    if not edges:
        return {}
    firsts, lasts = [1, *(edge + 1 for edge in edges)], [*edges, length]
    return {f"{a}-{b}": (a, b) for a, b in zip(firsts, lasts, strict=True)}


def sequence_sets(task, key: jax.Array, n_sequences: int) -> dict[str, jax.Array]:
    """States `[N, T+1, D]` of the fit set, the held-out set (both from the training law) and the
    held-out sequences with their states scaled by `STATE_SCALES` (the same dynamics from a scaled
    start, with scaled noise)."""
    held = task.states(jax.random.fold_in(key, 1), n_sequences)
    scaled = {f"states_x{scale:g}": scale * held for scale in STATE_SCALES}
    return {"fit": task.states(jax.random.fold_in(key, 0), n_sequences), HELDOUT: held, **scaled}


def _band_mean(values_NxKxT: jax.Array, mask_T: jax.Array) -> jax.Array:
    """Mean over sequences and the positions in `mask`, per readout: `[K]`."""
    return jnp.sum(values_NxKxT * mask_T, (0, 2)) / (mask_T.sum() * values_NxKxT.shape[0])


def _band_loss(preds_NxKxTxD: jax.Array, targets_NxTxD: jax.Array, mask_T: jax.Array) -> jax.Array:
    """docs/science.md section 8's loss, `0.5 |y_hat - s_{t+1}|^2`, averaged over the band: `[K]`."""
    return _band_mean(0.5 * jnp.sum((preds_NxKxTxD - targets_NxTxD[:, None]) ** 2, -1), mask_T)


def sequence_agreement(
    family_NxKxTxD: jax.Array, model_NxKxTxD: jax.Array, targets_NxTxD: jax.Array, mask_T: jax.Array
) -> dict[str, jax.Array]:
    """Per readout `[K]`, over the positions in `mask`: the normalised discrepancy
    `nmse = mean((f - m)^2) / var(m)` (over sequences, positions and coordinates; `r2 = 1 - nmse`),
    the preds diff (mean distance of the predictions, docs/science.md section 5) and the family's loss."""
    model_mean = _band_mean(jnp.mean(model_NxKxTxD, -1), mask_T)[None, :, None, None]
    var = _band_mean(jnp.mean((model_NxKxTxD - model_mean) ** 2, -1), mask_T)
    nmse = _band_mean(jnp.mean((family_NxKxTxD - model_NxKxTxD) ** 2, -1), mask_T) / var
    return {
        "nmse": nmse,
        "r2": 1.0 - nmse,
        "preds_diff": _band_mean(jnp.linalg.norm(family_NxKxTxD - model_NxKxTxD, axis=-1), mask_T),
        "loss": _band_loss(family_NxKxTxD, targets_NxTxD, mask_T),
    }


def _masked(spec: lds_refs.Spectra, target_NxTxD: jax.Array, mask_T: jax.Array):
    """Spectra and targets with the positions outside `mask` zeroed: they leave every residual."""
    return lds_refs.Spectra(spec.eig, spec.z * mask_T[:, None, None]), target_NxTxD * mask_T[:, None]


@functools.partial(jax.jit, static_argnames=("fams", "iters"))
def _fit_and_score_sequences(
    spectra: lds_refs.Spectra,
    targets: jax.Array,
    model_preds: jax.Array,
    masks_BxT: jax.Array,
    eta0: jax.Array,
    *,
    fams: tuple[SequenceFamily, ...],
    iters: int,
) -> dict:
    """Every family, seed and band: fit the family to the model's final readout on the band's
    positions of the first of the stacked sets, then its agreement with the model on the band in
    the others. `spectra` `[sets, N, T, ...]`, `targets` `[sets, N, T, D]`, `model_preds`
    `[S, sets, N, K, T, D]`, `masks` `[bands, T]`. One program for all families; it holds no LAPACK
    call (the spectra are computed apart)."""
    head = lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree)
    rest = lambda tree: jax.tree_util.tree_map(lambda a: a[1:], tree)

    def one(family, model_setsxNxKxTxD, mask_T):
        target = model_setsxNxKxTxD[0, :, -1]
        spec, target = _masked(head(spectra), target, mask_T)
        theta = lds_refs.fit_spectral(family.solve, spec, target, family.starts(eta0), iters)

        def score(spec_set, model_NxKxTxD, targets_NxTxD):
            readouts = lds_refs.spectral_readouts(family.solve(theta), spec_set)
            return sequence_agreement(readouts, model_NxKxTxD, targets_NxTxD, mask_T)

        return {"theta": theta, "scores": jax.vmap(score)(rest(spectra), model_setsxNxKxTxD[1:], targets[1:])}

    per_seed_band = lambda fn: jax.vmap(jax.vmap(fn, in_axes=(None, 0)), in_axes=(0, None))
    model_loss = per_seed_band(
        lambda preds, mask: jax.vmap(_band_loss, in_axes=(0, 0, None))(preds[1:], targets[1:], mask)
    )(model_preds, masks_BxT)
    families = {f.name: per_seed_band(functools.partial(one, f))(model_preds, masks_BxT) for f in fams}
    return {"model_loss": model_loss, "families": families}


def _band_report(
    raw: dict, fams: list[SequenceFamily], band: int, scoring: list[str], n_sequences: int, floor: dict | None
) -> dict:
    """Ranking, families and verdict of one position band (`band`: its index in the raw results),
    JSON-ready; laid out as a regression report (`explain`), with the noise `floor` (all positions)
    when given."""
    names = [f.name for f in fams]
    held = scoring.index(HELDOUT)
    nmse_SxF = np.stack([raw["families"][name]["scores"]["nmse"][:, band, held, -1] for name in names], 1)
    rank = ranking(nmse_SxF, np.array([f.n_params for f in fams]), n_sequences, names)
    report = {}
    for f in fams:
        r = raw["families"][f.name]
        scores = {m: v[:, band] for m, v in r["scores"].items()}
        entry = {"n_params": f.n_params, "about": f.about, "params": np.asarray(r["theta"][:, band]).tolist()}
        for i, s in enumerate(scoring):
            entry[s] = {m: metrics.mean_ci95(v[:, i, -1]) for m, v in scores.items()}
            entry[s].update(model_cos=NOT_COMPUTED, model_diff=NOT_COMPUTED)
        entry["per_layer"] = {m: scores[m][:, held].mean(0).tolist() for m in ("r2", "preds_diff")}
        report[f.name] = entry
    if floor is not None:
        _over_floor(report, floor)
    return {
        "model": {s: {"loss": metrics.mean_ci95(raw["model_loss"][:, band, i, -1])} for i, s in enumerate(scoring)},
        "families": report,
        "ranking": rank,
        **({} if floor is None else {"floor": floor}),
        **conclude(report, rank, floor, with_cos=False),
    }


def explain_sequences(
    model_fn: SequenceModelFn,
    params_S,
    task,
    key: jax.Array,
    *,
    steps: int,
    n_tasks: int = 2048,
    iters: int = 50,
    floor_models: FloorModels | None = None,
) -> dict:
    """The whole test for a sequence model given as `model_fn(params, tokens_BxTxW) -> [B, K, T, D]`
    (a leading seed axis on `params_S`; tokens from `task.batch`): every family fitted, scored and
    ranked on all positions at once (one algorithm with one set of scalars at every position) and on
    each position band of its own (`position_bands`: a trained model need not use the same effective
    step at every context length, e.g. softmax attention normalises by `t`; the fitted scalars per
    band show the drift). A family explains a band when its held-out R^2 reaches `EXPLAINS_R2`
    (no model cos: see `NOT_COMPUTED`). The noise floor of `floor_models` (`conclude`) applies to
    all positions, on the held-out sequences. JSON-ready: the all-positions band at the top level,
    laid out as a regression report, the sub-bands under `bands`."""
    fams, omitted = sequence_families(steps, float(task.ridge_lambda))
    sets = sequence_sets(task, key, n_tasks)
    names = ["fit", *[name for name in sets if name != "fit"]]
    states = jnp.stack([sets[name] for name in names])
    evaluate = jax.jit(jax.vmap(jax.vmap(model_fn, in_axes=(None, 0)), in_axes=(0, None)))
    model_preds = evaluate(params_S, jax.vmap(lambda s: task.batch(s).tokens)(states))
    spectra = jax.vmap(lds_refs.spectra)(states)  # its own program: one batched LAPACK call
    length = states.shape[2] - 1
    bands = {ALL_POSITIONS: (1, length), **position_bands(length)}
    masks = jnp.stack([(jnp.arange(1, length + 1) >= a) & (jnp.arange(1, length + 1) <= b) for a, b in bands.values()])
    eta0 = lds_refs.one_step_eta(sets["fit"])
    raw = _fit_and_score_sequences(
        spectra, states[:, :, 1:], model_preds, masks.astype(states.dtype), eta0, fams=tuple(fams), iters=iters
    )
    raw = jax.device_get(raw)
    scoring = names[1:]
    held_tokens = task.batch(sets[HELDOUT]).tokens
    floor = measure_floor(lambda p: model_fn(p, held_tokens)[:, -1], floor_models)
    reports = {
        name: _band_report(raw, fams, i, scoring, n_tasks, floor if name == ALL_POSITIONS else None)
        for i, name in enumerate(bands)
    }
    report = reports.pop(ALL_POSITIONS)
    for name, band in reports.items():
        band["positions"] = list(bands[name])
    return {
        "task": "lds",
        "steps": steps,
        "n_tasks": n_tasks,
        "fit_iters": iters,
        "seeds": int(np.asarray(raw["model_loss"]).shape[0]),
        "sets": scoring,
        "positions": [1, length],
        **report,
        "omitted": omitted,
        "explains_threshold": EXPLAINS_R2,
        "sensitivities": "not computed for sequence models: R^2 of the predictions only",
        "bands": reports,
    }

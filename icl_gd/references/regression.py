"""Reference algorithms for regression tasks (docs/science.md sections 4, 6 and 10): GD and GD++
computed on the data and as LSA weights, the learning-rate line search, closed forms, OLS and
ridge; registered as the references `gd`, `gdpp`, `ols` and `ridge` of `task=linear` and `task=sine`,
and preconditioned GD (`precond_gd`) of `task=linear` with non-isotropic inputs.

The GD reference is explicit `jnp` on purpose: it is the object of study, and tests check the
LSA constructions against it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from icl_gd import models, tasks
from icl_gd.references import solvers
from icl_gd.references.registry import ANALYTIC, Reference, register
from icl_gd.tasks import LinearRegression, Regression, Tasks, input_law


def gdpp_weights(etas_K: jax.Array, gammas_K: jax.Array, dim: int, n_context: int) -> models.Weights:
    """K LSA layers doing GD++ steps (docs/science.md section 4), as products `W_KQ`, `W_PV` per layer.

    `W_KQ = [[I_d, 0], [0, 0]]` reads `x_i^T x_j`; `W_PV = [[-gamma/N I_d, 0], [0, -eta/N]]`
    moves every label by `-(eta/N) sum_i y_i x_i^T x_j` (the GD step) and every input by
    `-(gamma/N) sum_i x_i x_i^T x_j`. `gamma = 0` is plain GD: `W_K = W_Q = [[I, 0], [0, 0]]`,
    `W_V = [[0, 0], [0, -1]]`, `W_P = [[0, 0], [0, eta/N]]`.
    """
    etas_K, gammas_K = jnp.atleast_1d(etas_K), jnp.atleast_1d(gammas_K)
    n_layers, d1 = etas_K.shape[0], dim + 1
    x_block = jnp.zeros((d1, d1)).at[:dim, :dim].set(jnp.eye(dim))
    label = jnp.zeros((d1, d1)).at[dim, dim].set(1.0)
    w_kq = jnp.broadcast_to(x_block, (n_layers, 1, d1, d1))
    w_pv = -(gammas_K[:, None, None] * x_block + etas_K[:, None, None] * label) / n_context
    return models.lsa(w_kq, w_pv[:, None])


def gd_weights(etas_K: jax.Array, dim: int, n_context: int) -> models.Weights:
    """K plain GD steps as LSA weights (GD++ with `gamma = 0`)."""
    etas_K = jnp.atleast_1d(etas_K)
    return gdpp_weights(etas_K, jnp.zeros_like(etas_K), dim, n_context)


def gd_direct(x_Nxd: jax.Array, y_N: jax.Array, xq_d: jax.Array, etas_K: jax.Array) -> jax.Array:
    """Predictions `W_k x_q` after each of K GD steps on `L(W) = 1/(2N) sum (W x_i - y_i)^2`, from `W_0 = 0`."""
    n = x_Nxd.shape[0]

    def step(w_d, eta):
        grad = x_Nxd.T @ (x_Nxd @ w_d - y_N) / n
        w_d = w_d - eta * grad
        return w_d, w_d @ xq_d

    _, preds = jax.lax.scan(step, jnp.zeros(x_Nxd.shape[1], x_Nxd.dtype), jnp.atleast_1d(etas_K))
    return preds


def gdpp_direct(x_Nxd, y_N, xq_d, etas_K, gammas_K) -> jax.Array:
    """GD++ computed on the data: each step moves the residual labels by a GD step and every input
    by `x <- x - gamma (1/N) sum_i x_i x_i^T x`, both from the state before the step."""
    n = x_Nxd.shape[0]

    def step(state, eta_gamma):
        x, r, xq, q = state
        eta, gamma = eta_gamma
        gram = x.T @ x / n
        r_new = r - eta * (x @ (x.T @ r)) / n
        q_new = q - eta * (xq @ (x.T @ r)) / n
        return (x - gamma * x @ gram, r_new, xq - gamma * gram @ xq, q_new), -q_new

    etas_K, gammas_K = jnp.atleast_1d(etas_K), jnp.atleast_1d(gammas_K)
    init = (x_Nxd, y_N, xq_d, jnp.zeros((), x_Nxd.dtype))
    _, preds = jax.lax.scan(step, init, (etas_K, gammas_K))
    return preds


class Spectrum(NamedTuple):
    """Tasks seen by GD and GD++ (docs/science.md section 4, "in the eigenbasis"): per task the
    eigenvalues `lam_d` of `A = X^T X / N`, and `b = X^T y / N` (`s_d`) and `x_q` (`z_d`) in its
    eigenbasis, with the query's label `yq`."""

    lam: jax.Array
    s: jax.Array
    z: jax.Array
    yq: jax.Array


@jax.jit
def spectrum(t: Tasks) -> Spectrum:
    """`Spectrum` of tasks `t`: one batched `eigh`, in a program of its own (icl_gd.linalg)."""
    n = t.x.shape[1]
    lam, u = jnp.linalg.eigh(jnp.einsum("bnd,bne->bde", t.x, t.x) / n)
    b = jnp.einsum("bnd,bn->bd", t.x, t.y) / n
    to_basis = lambda v: jnp.einsum("bde,bd->be", u, v)
    return Spectrum(lam, to_basis(b), to_basis(t.xq), t.yq)


def gdpp_spectral(sp: Spectrum, etas_K: jax.Array, gammas_K: jax.Array) -> jax.Array:
    """`gdpp_direct` on every task of `sp` at `O(K d)` a task: `[B, K]`. `A`'s eigenbasis never
    changes, so a step is per eigenvalue: the readout moves by `eta z.s`, then
    `s <- (1 - gamma lam)(1 - eta lam) s`, `z <- (1 - gamma lam) z`, `lam <- lam (1 - gamma lam)^2`."""

    def step(state, eta_gamma):
        lam, s, z, pred = state
        eta, gamma = eta_gamma
        pred = pred + eta * jnp.sum(z * s, axis=-1)
        shrink = 1.0 - gamma * lam
        return (lam * shrink**2, shrink * (1.0 - eta * lam) * s, shrink * z, pred), pred

    init = (sp.lam, sp.s, sp.z, jnp.zeros_like(sp.yq))
    _, preds_KxB = jax.lax.scan(step, init, (jnp.atleast_1d(etas_K), jnp.atleast_1d(gammas_K)))
    return preds_KxB.T


def loss(preds_B: jax.Array, yq_B: jax.Array) -> jax.Array:
    """`0.5 * mean((y_hat - y_q)^2)` (docs/science.md section 5)."""
    return 0.5 * jnp.mean((preds_B - yq_B) ** 2)


def minimize_scalar(
    f: Callable[[jax.Array], jax.Array], lo: float | jax.Array, hi: float | jax.Array, points: int = 64, rounds: int = 5
):
    """Grid search on `[lo, hi]`, zooming `rounds` times around the best point. Non-finite
    values count as +inf. Returns `(argmin, min)`."""

    def values(grid):
        v = jax.lax.map(f, grid)
        return jnp.where(jnp.isfinite(v), v, jnp.inf)

    def zoom(bounds, _):
        grid = jnp.linspace(bounds[0], bounds[1], points)
        best = jnp.argmin(values(grid))
        return jnp.stack([grid[jnp.maximum(best - 1, 0)], grid[jnp.minimum(best + 1, points - 1)]]), None

    bounds, _ = jax.lax.scan(zoom, jnp.array([lo, hi], jnp.float32), None, length=rounds)
    x = bounds.mean()
    return x, f(x)


class GDReference(NamedTuple):
    eta: float
    loss: float


def closed_form_gd(
    dim: int,
    n_context: int,
    x_dist: str,
    x_scale: float,
    w_std: float = 1.0,
    noise_std: float = 0.0,
    distractors: int = 0,
) -> GDReference:
    """Best learning rate and expected loss of one GD step (docs/science.md section 6).

    With `g = (1/N) sum_i y_i x_i^T x_q`: `eta* = E[g y_q] / E[g^2]` and the loss is
    `0.5 (E[y_q^2] - E[g y_q]^2 / E[g^2])`. For `N` clean labels, `E[g y_q] = s_w^2 d sigma^4`,
    `E[g^2] = s_w^2 sigma^2 T + noise^2 d sigma^4 / N`, and
    `T = (d m4 + d(d-1) sigma^4 + (N-1) d sigma^4) / N`. Noiseless with `s_w = 1` this is
    docs/science.md's `eta* = d sigma^2 / T`, loss `0.5 sigma^2 (d - d^2 sigma^4 / T)`. With `k`
    distractors (labels replaced by independent noise of the labels' variance `s_y^2`), only
    the `C = N - k` clean labels correlate with `y_q` and with each other:
    `E[g y_q] = (C/N) s_w^2 d sigma^4` and
    `N^2 E[g^2] = C (A + noise^2 d sigma^4) + k s_y^2 d sigma^4 + C (C-1) s_w^2 d sigma^6`,
    with `A = s_w^2 sigma^2 (d m4 + d(d-1) sigma^4)` (one clean term squared).
    """
    var, m4 = input_law(x_dist, x_scale)
    d, n, k = dim, n_context, distractors
    clean = n - k
    e_yy = w_std**2 * d * var + noise_std**2
    one_term = w_std**2 * var * (d * m4 + d * (d - 1) * var**2)
    e_gy = clean / n * w_std**2 * d * var**2
    e_gg = (
        clean * (one_term + noise_std**2 * d * var**2)
        + k * e_yy * d * var**2
        + clean * (clean - 1) * w_std**2 * d * var**3
    ) / n**2
    return GDReference(eta=e_gy / e_gg, loss=0.5 * (e_yy - e_gy**2 / e_gg))


class PrecondGD(NamedTuple):
    """The best preconditioner `Gamma*` of one preconditioned GD step and its expected loss."""

    loss: float
    gamma: np.ndarray


class PrecondStep(NamedTuple):
    """The second moments of one preconditioned GD step `y_hat = x_q^T Gamma b`, `b = (1/N) sum_i
    x_i y_i`, on inputs of covariance `Sigma` (docs/science.md section 10), in float64:
    `E[y_q^2] = e_yy`, `E[b y_q x_q^T] = c Sigma^2` and `E[b b^T] = Sigma H`, `H = h_sigma Sigma +
    h_eye I`. Every quadratic loss below follows from them."""

    sigma: np.ndarray
    e_yy: float
    c: float
    h: np.ndarray

    @classmethod
    def of(
        cls,
        sigma_dxd: np.ndarray,
        n_context: int,
        *,
        kurtosis: float = 3.0,
        w_std: float = 1.0,
        noise_std: float = 0.0,
        distractors: int = 0,
    ) -> PrecondStep:
        """The moments for inputs `x = B z`, `B B^T = Sigma` with `B^T B` diagonal (`B = R diag(sqrt(
        eigenvalues))`, as `task.x_cov` draws them, or a multiple of `I`), `z` i.i.d. coordinates of unit
        variance and fourth moment `kurtosis` (3: Gaussian; then any `B` will do), `w ~ N(0, s_w^2 I)`,
        label noise `sigma_n`, and `k` of the `N` context labels replaced by noise of the labels'
        variance `s_y^2 = s_w^2 tr(Sigma) + sigma_n^2`. Then `E[x x^T x x^T] = (kurtosis - 1) Sigma^2 +
        tr(Sigma) Sigma`, and with `C = N - k` clean labels: `c = (C/N) s_w^2`, `h_sigma = s_w^2 C (C +
        kurtosis - 2) / N^2`, `h_eye = s_y^2 / N`. Noiseless, `s_w = 1`, Gaussian: `Sigma H = M` of
        docs/science.md section 10."""
        sigma = np.asarray(sigma_dxd, np.float64)
        n, clean = n_context, n_context - distractors
        e_yy = w_std**2 * float(np.trace(sigma)) + noise_std**2
        h_sigma = w_std**2 * clean * (clean + kurtosis - 2) / n**2
        h = h_sigma * sigma + e_yy / n * np.eye(sigma.shape[0])
        return cls(sigma, e_yy, clean / n * w_std**2, h)

    def loss(self, gamma_dxd: np.ndarray) -> float:
        """Expected loss of `Gamma`: `0.5 [E[y_q^2] - 2 c tr(Gamma Sigma^2) + tr(Sigma Gamma Sigma H Gamma^T)]`."""
        s, g = self.sigma, np.asarray(gamma_dxd, np.float64)
        return float(0.5 * (self.e_yy - 2 * self.c * np.trace(g @ s @ s) + np.trace(s @ g @ s @ self.h @ g.T)))

    def best(self) -> PrecondGD:
        """`Gamma* = c H^-1` (the loss's gradient `2 Sigma (Gamma Sigma H - c Sigma)` vanishes, `H` and
        `Sigma` commuting), loss `0.5 (E[y_q^2] - c tr(Sigma Gamma* Sigma))`."""
        gamma = self.c * np.linalg.inv(self.h)
        gamma = 0.5 * (gamma + gamma.T)
        return PrecondGD(
            loss=float(0.5 * (self.e_yy - self.c * np.trace(self.sigma @ gamma @ self.sigma))), gamma=gamma
        )

    def best_scalar(self) -> GDReference:
        """`Gamma = eta I`: `eta* = c tr(Sigma^2) / tr(Sigma^2 H)`, loss
        `0.5 (E[y_q^2] - c^2 tr(Sigma^2)^2 / tr(Sigma^2 H))` (plain GD, docs/science.md section 10)."""
        s2 = self.sigma @ self.sigma
        gain, curvature = self.c * np.trace(s2), np.trace(s2 @ self.h)
        return GDReference(eta=float(gain / curvature), loss=float(0.5 * (self.e_yy - gain**2 / curvature)))


def precond_gd_closed_form(sigma_dxd: np.ndarray, n_context: int, **law) -> PrecondGD:
    """`Gamma* = ((1 + 1/N) Sigma + tr(Sigma)/N I)^-1` and its loss `0.5 (tr(Sigma) - tr(Sigma Gamma*
    Sigma))` for Gaussian inputs `N(0, Sigma)`, `w ~ N(0, I)`, noiseless (docs/science.md section
    10); `law` (`PrecondStep.of`'s keywords: `kurtosis`, `w_std`, `noise_std`, `distractors`)
    generalises it exactly. No case returns None."""
    return PrecondStep.of(sigma_dxd, n_context, **law).best()


def precond_step(task: LinearRegression) -> PrecondStep:
    """The preconditioned step's moments for a linear task's input law, prior, noise and distractors."""
    return PrecondStep.of(
        task.covariance,
        task.n_context,
        kurtosis=task.kurtosis,
        w_std=task.w_std,
        noise_std=task.noise_std,
        distractors=task.distractors,
    )


def precond_gd_direct(x_Nxd: jax.Array, y_N: jax.Array, xq_d: jax.Array, gammas_Kxdxd: jax.Array) -> jax.Array:
    """Predictions `W_k x_q` after each of K preconditioned GD steps `W <- W - Gamma_k (A W - b)`
    from `W_0 = 0`, `A = X^T X / N`, `b = X^T y / N`; the first is `x_q^T Gamma_1 b`."""
    n = x_Nxd.shape[0]
    a, b = x_Nxd.T @ x_Nxd / n, x_Nxd.T @ y_N / n

    def step(w_d, gamma):
        w_d = w_d - gamma @ (a @ w_d - b)
        return w_d, w_d @ xq_d

    return jax.lax.scan(step, jnp.zeros_like(b), gammas_Kxdxd)[1]


def gd_loss(etas_K: jax.Array, t: Tasks) -> jax.Array:
    preds = jax.vmap(gd_direct, in_axes=(0, 0, 0, None))(t.x, t.y, t.xq, etas_K)
    return loss(preds[:, -1], t.yq)


@functools.partial(jax.jit, static_argnums=1)
def _line_search(sp: Spectrum, steps: int, eta_max: jax.Array) -> tuple[jax.Array, jax.Array]:
    gd_loss_sp = lambda e: loss(gdpp_spectral(sp, jnp.full((steps,), e), jnp.zeros((steps,)))[:, -1], sp.yq)
    return minimize_scalar(gd_loss_sp, 0.0, eta_max)


@jax.jit
def _one_step_eta(t: Tasks, eta_max: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step's prediction is `eta g`, `g = x_q . X^T y / N`: the loss is a parabola in `eta`,
    lowest on `t` at `mean(g y_q) / mean(g^2)` (clipped to `[0, eta_max]`)."""
    g = jnp.einsum("bd,bnd,bn->b", t.xq, t.x, t.y) / t.x.shape[1]
    eta = jnp.clip(jnp.mean(g * t.yq) / jnp.mean(g * g), 0.0, eta_max)
    return eta, loss(eta * g, t.yq)


def line_search_eta(t: Tasks | Spectrum, steps: int, eta_max: float) -> GDReference:
    """The one `eta` shared by `steps` GD steps that minimises the loss on `t`: exactly for one step,
    else by `minimize_scalar` on `[0, eta_max]`, each trial costing `O(K d)` a task (`gdpp_spectral`)."""
    if steps == 1 and isinstance(t, Tasks):
        eta, value = _one_step_eta(t, jnp.float32(eta_max))
    else:
        eta, value = _line_search(t if isinstance(t, Spectrum) else spectrum(t), steps, jnp.float32(eta_max))
    return GDReference(eta=float(eta), loss=float(value))


class RidgeSpectrum(NamedTuple):
    """One task's context through its thin SVD `X = U S V^T`: `vt_Rxd = V^T`, `b_R = S U^T y`
    and `s2_R = S^2`, so that the ridge solution for every `lam` at once is
    `w(lam) = V (b / (s^2 + lam))` (`R = min(N, d)`)."""

    s2: jax.Array
    b: jax.Array
    vt: jax.Array


def ridge_spectrum(x_Nxd: jax.Array, y_N: jax.Array) -> RidgeSpectrum:
    """The SVD factors of one context that every ridge / OLS solution is read from. Directions
    with singular values below `jnp.linalg.pinv`'s cutoff are dropped (`b = 0`, `s2 = 1`).

    One SVD per task serves OLS, ridge at any `lam` and its derivatives. On CPU, keep batched
    LAPACK calls (this SVD, `jnp.linalg.solve`) to one at a time in a compiled program: jaxlib's
    batched LAPACK kernels fan out into XLA's intra-op thread pool and block until it is done, so
    two of them running side by side can hold every pool thread of a 2-core machine and wait
    for each other forever.
    """
    u, s, vt = jnp.linalg.svd(x_Nxd, full_matrices=False)
    keep = s > 10 * max(x_Nxd.shape) * jnp.finfo(s.dtype).eps * s[0]
    return RidgeSpectrum(jnp.where(keep, s**2, 1.0), jnp.where(keep, s * (u.T @ y_N), 0.0), vt)


def ridge_from_spectrum(spec: RidgeSpectrum, xq_d: jax.Array, lam: float | jax.Array = 0.0) -> jax.Array:
    """`x_q^T (X^T X + lam I)^-1 X^T y`; `lam = 0` is the minimum-norm least-squares solution
    (`pinv(X) y`). Differentiable in `lam` and `x_q`."""
    return (spec.vt @ xq_d) @ (spec.b / (spec.s2 + lam))


def ridge_predict(x_Nxd, y_N, xq_d, lam=0.0) -> jax.Array:
    """Ridge (`lam > 0`) or OLS (`lam = 0`) fitted on the context, read out at the query: `[1]`."""
    return ridge_from_spectrum(ridge_spectrum(x_Nxd, y_N), xq_d, lam)[None]


def bayes_ridge_lambda(noise_std: float, w_std: float) -> float:
    """Ridge penalty of the posterior mean under `w ~ N(0, s_w^2 I)` and label noise `sigma`."""
    return noise_std**2 / w_std**2


# GD++ fit starts, in units of the line-searched eta: first-step scale, growth of the steps from
# one to the next, and gamma as a fraction of eta. The loss surface has several basins: for K = 3
# (d = N = 10) a start from a shared eta ends at loss 0.087, one with steps growing about
# tenfold at 0.039 (eta_k ~ 3.5, 30, 270 with gamma_k ~ eta_k).
GDPP_SCALES = (0.5, 1.0)
GDPP_GROWTHS = (1.0, 3.0, 9.0)
GDPP_GAMMAS = (0.0, 0.5, 1.0)


def gdpp_starts(steps: int, shared: bool) -> tuple[jax.Array, jax.Array]:
    """Starting `(log(eta_k / eta), gamma_k / eta)` pairs `[C, n]` for `fit_gdpp` (growing steps
    only when they are not tied)."""
    n = 1 if shared else steps
    k = jnp.arange(n)
    growths = (1.0,) if shared else GDPP_GROWTHS
    combos = [(c, r, f) for c in GDPP_SCALES for r in growths for f in GDPP_GAMMAS]
    log_eta = jnp.stack([jnp.log(c) + k * jnp.log(r) for c, r, _ in combos])
    return log_eta, jnp.stack([f * c * r**k for c, r, f in combos])


def gdpp_scalars(theta_P: jax.Array, steps: int, shared: bool) -> tuple[jax.Array, jax.Array]:
    """GD++'s `(eta_k, gamma_k)` for `steps` steps from its parameters: `(eta, gamma)` shared, or
    all the etas then all the gammas."""
    n = 1 if shared else steps
    return jnp.broadcast_to(theta_P[:n], (steps,)), jnp.broadcast_to(theta_P[n:], (steps,))


@functools.partial(jax.jit, static_argnames=("steps", "shared", "iters"))
def fit_gdpp(
    sp: Spectrum,
    eta_gd: jax.Array,
    eta_init: jax.Array,
    *,
    steps: int,
    shared: bool,
    iters: int,
    starts: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """GD++'s parameters for `steps` steps (`gdpp_scalars`) with the lowest loss on the tasks `sp`
    (docs/science.md section 4): damped Gauss-Newton (`solvers.levenberg_marquardt`) on the
    residuals `y_hat - y_q`, from the best of the `(u, v)` starts `[C, n]` (default `gdpp_starts`:
    `eta_k = eta_init exp(u_k)`, `gamma_k = eta_init v_k`) and of GD with its own `eta_gd` for
    `steps` steps (`gamma = 0`), so that the fit never ends above that GD. In the eigenbasis of each
    task (`gdpp_spectral`) a residual costs `O(K d)`: the fit on 100,000 tasks takes a second."""
    u, v = gdpp_starts(steps, shared) if starts is None else starts
    n = u.shape[1]
    gd = jnp.concatenate([jnp.full((n,), eta_gd), jnp.zeros((n,))])
    candidates = jnp.concatenate([jnp.concatenate([eta_init * jnp.exp(u), eta_init * v], 1), gd[None]])

    def residual(theta):
        return gdpp_spectral(sp, *gdpp_scalars(theta, steps, shared))[:, -1] - sp.yq

    costs = jax.vmap(lambda theta: jnp.sum(residual(theta) ** 2))(candidates)
    best = candidates[jnp.argmin(jnp.where(jnp.isfinite(costs), costs, jnp.inf))]
    return solvers.levenberg_marquardt(residual, best, sp.yq.shape[0], iters)


# The registered references of the regression task kinds.
REGRESSION_KINDS = ("linear", "sine")
SINE_ETA_MAX = 10.0  # line-search range for task kinds without a closed form


def _closed_form_linear(t: LinearRegression) -> GDReference:
    """Section 6's formula for i.i.d. coordinates; section 10's best scalar for non-isotropic inputs."""
    if t.x_cov is None:
        return closed_form_gd(t.dim, t.n_context, t.x_dist, t.x_scale, t.w_std, t.noise_std, t.distractors)
    return precond_step(t).best_scalar()


CLOSED_FORMS: dict[str, Callable[..., GDReference | None]] = {"linear": _closed_form_linear, "sine": lambda t: None}


def closed_form(task: Regression) -> GDReference | None:
    """One GD step's best eta and expected loss (docs/science.md sections 6 and 10), where the task kind has one."""
    return CLOSED_FORMS[task.name](task)


def _fit_gd(ctx) -> jax.Array:
    """One `eta` shared by the model's number of steps, line-searched on tasks of its own."""
    closed = closed_form(ctx.task)
    eta_max = 3.0 * closed.eta if closed is not None else SINE_ETA_MAX
    search = tasks.draw(ctx.task, jax.random.fold_in(ctx.key, 1), int(ctx.cfg.eval.line_search_tasks))
    return jnp.full((ctx.steps,), line_search_eta(search, ctx.steps, eta_max).eta)


class GDPPSteps(NamedTuple):
    """The GD++ reference's parameters: `(eta_k, gamma_k)` for each of the K steps, and whether
    they are tied across steps (recurrent models)."""

    etas: jax.Array
    gammas: jax.Array
    shared: jax.Array


def _fit_gdpp(ctx) -> GDPPSteps:
    """Per-step `(eta_k, gamma_k)` (tied for recurrent models) fitted on `eval.line_search_tasks`
    tasks of its own from GD's line-searched eta (`fit_gdpp`); one step of GD++ is one step of GD
    (gamma acts after the label update)."""
    etas, shared, ev = ctx.fitted["gd"], bool(ctx.cfg.model.recurrent), ctx.cfg.eval
    if ctx.steps == 1 or int(ev.gdpp_steps) == 0:
        return GDPPSteps(etas, jnp.zeros_like(etas), jnp.asarray(shared))
    fit_set = spectrum(tasks.draw(ctx.task, jax.random.fold_in(ctx.key, 2), int(ev.line_search_tasks)))
    theta = fit_gdpp(fit_set, etas[0], etas[0], steps=ctx.steps, shared=shared, iters=int(ev.gdpp_steps))
    etas, gammas = gdpp_scalars(theta, ctx.steps, shared)
    if not shared:  # the last gamma moves the inputs after the last readout: no effect, reported as 0
        gammas = gammas.at[-1].set(0.0)
    return GDPPSteps(etas, gammas, jnp.asarray(shared))


def _describe_gdpp(p: GDPPSteps) -> dict:
    n = 1 if bool(p.shared) else p.etas.shape[0]
    return {
        "etas": [float(e) for e in p.etas[:n]],
        "gammas": [float(g) for g in p.gammas[:n]],
        "steps": int(p.etas.shape[0]),
        "shared": bool(p.shared),
    }


def _regression(predict_xyq):
    """Wrap `(params, x, y, xq, steps) -> y_hat_K` as a reference's `predict`."""

    def predict(task, params, queries_1xd, t):
        return predict_xyq(params, t.x, t.y, queries_1xd[0])[:, None, None]

    return predict


register(
    Reference(
        "gd",
        "GD",
        _fit_gd,
        _regression(lambda etas, x, y, q: gd_direct(x, y, q, etas)),
        describe=lambda etas: {"eta": float(etas[0]), "steps": int(etas.shape[0])},
        stepwise=True,
    ),
    REGRESSION_KINDS,
)
register(
    Reference(
        "gdpp",
        "GD++",
        _fit_gdpp,
        _regression(lambda p, x, y, q: gdpp_direct(x, y, q, p.etas, p.gammas)),
        describe=_describe_gdpp,
        stepwise=True,
    ),
    REGRESSION_KINDS,
)
register(
    Reference(
        "ols",
        "OLS",
        lambda ctx: None,
        _regression(lambda _, x, y, q: ridge_predict(x, y, q)),
    ),
    REGRESSION_KINDS,
)
register(
    Reference(
        "ridge",
        "ridge (Bayes-optimal lambda)",
        lambda ctx: jnp.asarray(ctx.task.ridge_lambda, jnp.float32),
        _regression(lambda lam, x, y, q: ridge_predict(x, y, q, lam)),
        describe=lambda lam: {"lambda": float(lam)},
    ),
    REGRESSION_KINDS,
)


def _fit_precond_gd(ctx) -> jax.Array:
    """`Gamma*` of the task's law (docs/science.md section 10), the same at each of the model's steps."""
    gamma = jnp.asarray(precond_step(ctx.task).best().gamma, jnp.float32)
    return jnp.broadcast_to(gamma, (ctx.steps, *gamma.shape))


register(
    Reference(
        "precond_gd",
        "preconditioned GD",
        _fit_precond_gd,
        _regression(lambda gammas, x, y, q: precond_gd_direct(x, y, q, gammas)),
        describe=lambda g: {"gamma": np.asarray(g[0], np.float64).tolist(), "steps": int(g.shape[0])},
        stepwise=True,
    ),
    ("linear",),
)


def _analytic(task: Regression) -> dict:
    """`gd_closed_form` (`{eta, loss}`, None without one) and, for non-isotropic linear tasks,
    `precond_gd_closed_form` (`{loss, gamma}`, `gamma` as nested lists)."""
    out = {"gd_closed_form": None if (c := closed_form(task)) is None else c._asdict()}
    if isinstance(task, LinearRegression) and task.x_cov is not None:
        best = precond_step(task).best()
        out["precond_gd_closed_form"] = {"loss": float(best.loss), "gamma": best.gamma.tolist()}
    return out


ANALYTIC.update(dict.fromkeys(REGRESSION_KINDS, _analytic))

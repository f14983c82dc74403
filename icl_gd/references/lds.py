"""References for linear dynamical systems (docs/science.md section 8), per position `t` on the
pairs `(s_i, s_{i+1})`, `i < t`, that the model has seen, applied to the query `s_t`. With the
prefix sums `A_t = sum_{i<t} s_i s_i^T` and `B_t = sum_{i<t} s_{i+1} s_i^T` (zero at `t = 1`):

- `ridge_online`: ridge least squares refitted at every position, `W_t = B_t (A_t + lambda I)^-1`;
- `gd`: `K` GD steps (one per model layer) from `W = 0` on `1/2 sum_{i<t} ||W s_i - s_{i+1}||^2`,
  `W <- W - eta (W A_t - B_t)`, one `eta` for every position and step;
- `richardson`, `newton_schulz`, `chebyshev`: `K` steps of truncated iterative solvers of the ridge
  normal equations `W (A_t + lambda I) = B_t` (`icl_gd.references.solvers`).

The stepwise references read out `W_k s_t` after each step: predictions `[K, T, D]`. Their scalars
minimise the mean loss of the final readout over positions on `eval.line_search_tasks` sequences of
their own: exactly for one GD step; for the other fits (GD with `K > 1`, the solvers) by
Levenberg-Marquardt on a stratified subsample of `FIT_SEQUENCES` of them (`stratified_subsample`),
through `A_t`'s eigendecomposition, in which any of these solvers costs `O(D^2)` per position
(`Spectra`). The subsample keeps every sequence of the tail that dominates the mean: a `K`-step
solver diverges where `A_t`'s largest eigenvalue is too large for its step sizes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp

from icl_gd.linalg import spd_solve
from icl_gd.references import solvers
from icl_gd.references.registry import FitContext, Reference, register

LINE_SEARCH_CHUNK = 1024  # sequences per chunk of the one-step line search (bounds its memory)
FIT_SEQUENCES = 1024  # the subsample of the nonlinear fits: half the tail, half the rest
SQUARINGS = 4  # the largest eigenvalue of a sequence's last A_t, from the trace of its 16th power
FIT_ITERS = 30  # Levenberg-Marquardt steps of those fits
STEP_MULTIPLES = (0.25, 0.5, 1.0, 2.0)  # starting step sizes of the fits, in units of a GD eta


def normal_equations(states_Tp1xD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`A_t = sum_{i<t} s_i s_i^T` and `B_t = sum_{i<t} s_{i+1} s_i^T` at every position, `[T, D, D]`
    each: causal prefix sums over the pairs seen before `t`, zero at `t = 1`."""
    inputs, targets = states_Tp1xD[:-2], states_Tp1xD[1:-1]  # pairs (s_i, s_{i+1}), i = 1..T-1
    zero = jnp.zeros((1, inputs.shape[1], inputs.shape[1]), inputs.dtype)
    prefix = lambda outer: jnp.concatenate([zero, jnp.cumsum(outer, 0)])
    return prefix(jnp.einsum("id,ie->ide", inputs, inputs)), prefix(jnp.einsum("id,ie->ide", targets, inputs))


Solve = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (A, B, q) -> readouts [K, O]


def per_position(solve: Solve, a_TxDxD: jax.Array, b_TxDxD: jax.Array, queries_TxD: jax.Array) -> jax.Array:
    """A solver's readouts at every position, each on its own normal equations: `[K, T, D]`."""
    return jnp.swapaxes(jax.vmap(solve)(a_TxDxD, b_TxDxD, queries_TxD), 0, 1)


def _shifted(a_DxD: jax.Array, lam: float | jax.Array) -> jax.Array:
    return a_DxD + lam * jnp.eye(a_DxD.shape[-1], dtype=a_DxD.dtype)


def ridge(lam: float | jax.Array, steps: int = 1) -> Solve:
    """Ridge on the normal equations, `B (A + lam I)^-1 q`, the same at each of `steps` readouts;
    an SPD solve of its own (no LAPACK call)."""

    def solve(a_DxD: jax.Array, b_OxD: jax.Array, q_D: jax.Array) -> jax.Array:
        return jnp.broadcast_to(b_OxD @ spd_solve(_shifted(a_DxD, lam), q_D), (steps, b_OxD.shape[0]))

    return solve


def ridge_online_predict(task, lam: jax.Array, queries_TxD: jax.Array, states_Tp1xD: jax.Array) -> jax.Array:
    """Ridge least squares on the pairs seen so far, at every position: `[1, T, D]`."""
    return per_position(ridge(lam), *normal_equations(states_Tp1xD), queries_TxD)


class Spectra(NamedTuple):
    """Every position's normal equations as seen by a solver's readout: with `A_t = V diag(eig) V^T`,
    a solver whose iterates are `W_k = B_t P_k(A_t)` reads out
    `W_k s_t = sum_i P_k(eig_i) z_i`, `z_i = (B_t v_i)(v_i . s_t)`. `eig` `[..., T, D]`,
    `z` `[..., T, D (eigen), D (state)]`."""

    eig: jax.Array
    z: jax.Array


def spectrum(states_Tp1xD: jax.Array) -> Spectra:
    """The `Spectra` of one sequence (one eigendecomposition per position)."""
    a, b = normal_equations(states_Tp1xD)
    eig, v = jnp.linalg.eigh(a)  # v[t, :, i]: eigenvector i
    z = jnp.einsum("tdi,ti->tid", jnp.einsum("tde,tei->tdi", b, v), jnp.einsum("tei,te->ti", v, states_Tp1xD[:-1]))
    return Spectra(eig, z)


# The spectra of a batch of sequences, in a program of its own: its eigendecompositions are its one
# batched LAPACK call (see `icl_gd.linalg`).
spectra = jax.jit(jax.vmap(spectrum))


def spectral_filters(solve: Solve, eig: jax.Array) -> jax.Array:
    """`P_k(eig)` for every eigenvalue and step, `[..., K]`: the solver run on the `1 x 1` systems
    `(eig, 1, 1)` that its iteration decouples into in `A`'s eigenbasis."""
    one = jnp.ones((1, 1), eig.dtype)
    run = jax.vmap(lambda eigenvalue: solve(eigenvalue * one, one, one[0])[:, 0])
    return run(eig.reshape(-1)).reshape(*eig.shape, -1)


def spectral_readouts(solve: Solve, spec: Spectra) -> jax.Array:
    """A solver's readouts from the spectra, equal to `per_position` on the normal equations:
    `[..., K, T, D]`."""
    return jnp.einsum("...tik,...tid->...ktd", spectral_filters(solve, spec.eig), spec.z)


def one_step_directions(states_Tp1xD: jax.Array) -> jax.Array:
    """`g_t = B_t s_t = sum_{i<t} s_{i+1} (s_i^T s_t)` at every position, `[T, D]`: one GD step's
    update direction, as a masked `[T, T]` score matrix (cheaper than forming `B_t`)."""
    inputs, targets, queries = states_Tp1xD[:-2], states_Tp1xD[1:-1], states_Tp1xD[:-1]
    earlier = jnp.arange(inputs.shape[0])[:, None] < jnp.arange(queries.shape[0])[None, :]  # pair i before t
    return jnp.einsum("it,id->td", jnp.where(earlier, inputs @ queries.T, 0.0), targets)


@jax.jit
def one_step_eta(states_NxTp1xD: jax.Array) -> jax.Array:
    """The `eta` of one GD step minimising the mean loss over positions on the sequences: the loss is
    quadratic in `eta`, so the line search is exact, `eta = sum <g, s_{t+1}> / sum |g|^2`. Chunked
    over sequences."""

    def sums(states_Tp1xD):
        g = one_step_directions(states_Tp1xD)
        return jnp.stack([jnp.sum(g * states_Tp1xD[1:]), jnp.sum(g * g)])

    total = jax.lax.map(sums, states_NxTp1xD, batch_size=LINE_SEARCH_CHUNK).sum(0)
    return total[0] / total[1]


class Solver(NamedTuple):
    """A `K`-step solver of the normal equations as a reference: the names of its fitted scalars
    (the order of `theta`), `solve(theta, steps, lam) -> (A, B, q) -> [K, O]` on the unshifted `A`
    (`lam`: the task's ridge penalty, for those that do not fit their own), and its starting points
    `starts(eta) -> [C, P]` around a GD `eta`."""

    label: str
    scalars: tuple[str, ...]
    solve: Callable[[jax.Array, int, float], Solve]
    starts: Callable[[jax.Array], jax.Array]


def _grid(first: jax.Array, second: jax.Array) -> jax.Array:
    """Every pair `(first_i, second_j)`: `[len(first) * len(second), 2]`."""
    return jnp.stack(jnp.meshgrid(first, second, indexing="ij"), -1).reshape(-1, 2)


def _chebyshev_starts(eta: jax.Array) -> jax.Array:
    center, fraction = _grid(1 / (eta * jnp.asarray(STEP_MULTIPLES)), jnp.array([0.0, 0.5, 0.9])).T
    return jnp.stack([center, fraction * center], -1)


SOLVERS = {
    # eta: W <- W - eta (W A - B), the same eta at every step (docs/science.md section 8).
    "gd": Solver(
        "GD",
        ("eta",),
        lambda th, steps, lam: lambda a, b, q: solvers.richardson(a, b, q, jnp.full(steps, th[0])),
        lambda eta: eta * jnp.asarray(STEP_MULTIPLES)[:, None],
    ),
    # (alpha, lam): W <- W - alpha (W (A + lam I) - B); (eta, 0) is GD. lam starts at 0 and at
    # contractions alpha lam of 5% and 20% per step.
    "richardson": Solver(
        "Richardson (truncated Neumann series)",
        ("alpha", "lambda"),
        lambda th, steps, lam: lambda a, b, q: solvers.richardson(_shifted(a, th[1]), b, q, jnp.full(steps, th[0])),
        lambda eta: _grid(eta * jnp.asarray(STEP_MULTIPLES), jnp.array([0.0, 0.05, 0.2]) / eta),
    ),
    # alpha: M_0 = alpha I, M <- M (2I - (A + lam I) M) with the task's lam. Step k is 2^k GD steps, so
    # alpha must be small for the largest A_t: the starts go down to eta / 8.
    "newton_schulz": Solver(
        "Newton-Schulz",
        ("alpha",),
        lambda th, steps, lam: lambda a, b, q: solvers.newton_schulz(_shifted(a, lam), b, q, th[0], steps),
        lambda eta: eta * jnp.array([0.125, *STEP_MULTIPLES])[:, None],
    ),
    # (center, half width) of the assumed spectrum of A + lam I, with the task's lam; (1/eta, 0) is GD.
    # Half widths start as fractions of the center.
    "chebyshev": Solver(
        "Chebyshev",
        ("center", "half_width"),
        lambda th, steps, lam: lambda a, b, q: solvers.chebyshev(_shifted(a, lam), b, q, th[0], th[1], steps),
        _chebyshev_starts,
    ),
}


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SolverParams:
    """A fitted solver: its scalars `theta` `[P]` and its number of steps (static: it shapes the
    readouts)."""

    theta: jax.Array
    steps: int = field(metadata={"static": True})


def largest_eigenvalue_bound(states_Tp1xD: jax.Array) -> jax.Array:
    """`(tr A_T^p)^(1/p)` with `p = 2^SQUARINGS`, at the last position (`A_t` only grows with `t`): at
    least `A_T`'s largest eigenvalue and at most `D^(1/p)` times it, by repeated squaring of
    `A_T / tr A_T` (no start vector to be unlucky with, no LAPACK call)."""
    inputs = states_Tp1xD[:-2]
    gram = inputs.T @ inputs
    trace = jnp.trace(gram)
    power = jax.lax.fori_loop(0, SQUARINGS, lambda _, m: m @ m, gram / trace)  # eigenvalues in [0, 1]
    return trace * jnp.trace(power) ** (1.0 / 2**SQUARINGS)


@functools.partial(jax.jit, static_argnames="n_fit")
def stratified_subsample(states_NxTp1xD: jax.Array, n_fit: int) -> tuple[jax.Array, jax.Array]:
    """`n_fit` of the sequences and their weights `[n_fit]` (summing to 1), such that a weighted mean
    over them is an unbiased estimate of the plain mean over all `N`: the `n_fit / 2` sequences with
    the largest `largest_eigenvalue_bound` (weight `1/N` each: the tail is enumerated, not sampled), and as
    many of the others (an arbitrary choice among i.i.d. sequences is a uniform sample), each
    standing for its share of them. All of them, equally weighted, when `N <= n_fit`."""
    n = states_NxTp1xD.shape[0]
    if n <= n_fit:
        return states_NxTp1xD, jnp.full((n,), 1.0 / n, states_NxTp1xD.dtype)
    n_tail = n_fit // 2
    tail = jax.lax.top_k(jax.vmap(largest_eigenvalue_bound)(states_NxTp1xD), n_tail)[1]
    others = jnp.nonzero(jnp.ones(n, bool).at[tail].set(False), size=n_fit - n_tail)[0]
    weights = jnp.concatenate(
        [jnp.full((n_tail,), 1.0 / n), jnp.full((n_fit - n_tail,), (n - n_tail) / (n * (n_fit - n_tail)))]
    )
    return states_NxTp1xD[jnp.concatenate([tail, others])], weights.astype(states_NxTp1xD.dtype)


def fit_spectral(
    solve_of: Callable[[jax.Array], Solve],
    spec: Spectra,
    targets_NxTxD: jax.Array,
    starts_CxP: jax.Array,
    iters: int,
    weights_N: jax.Array | None = None,
) -> jax.Array:
    """The `theta` whose solver `solve_of(theta)` has the final readout closest to `targets` (least
    squares over sequences, positions and coordinates, sequences weighted by `weights`) on sequences
    given by their spectra: Levenberg-Marquardt from the best of the starting points (it never ends
    above it). Each evaluation costs `O(D^2)` per position, whatever the solver (`spectral_readouts`)."""
    if starts_CxP.shape[1] == 0:  # nothing to fit
        return starts_CxP[0]
    scale = 1.0 if weights_N is None else jnp.sqrt(weights_N)[:, None, None]

    def residual(theta):
        filters = spectral_filters(solve_of(theta), spec.eig)[..., -1]
        return (scale * (jnp.einsum("...ti,...tid->...td", filters, spec.z) - targets_NxTxD)).ravel()

    costs = jax.vmap(lambda theta: jnp.sum(residual(theta) ** 2))(starts_CxP)
    best = starts_CxP[jnp.argmin(jnp.where(jnp.isfinite(costs), costs, jnp.inf))]
    return solvers.levenberg_marquardt(residual, best, targets_NxTxD.size, iters)


@functools.partial(jax.jit, static_argnames=("name", "steps", "lam", "iters"))
def fit_solver(
    spec: Spectra,
    targets_NxTxD: jax.Array,
    weights_N: jax.Array,
    starts_CxP: jax.Array,
    *,
    name: str,
    steps: int,
    lam: float,
    iters: int,
) -> jax.Array:
    """`fit_spectral` for the `steps`-step solver `name` (`lam`: the task's ridge penalty), compiled
    once per solver and shape."""
    solve_of = lambda theta: SOLVERS[name].solve(theta, steps, lam)
    return fit_spectral(solve_of, spec, targets_NxTxD, starts_CxP, iters, weights_N)


def _fit(ctx: FitContext, name: str, states_NxTp1xD: jax.Array, eta: jax.Array) -> SolverParams:
    """Solver `name` fitted for the mean loss of its final readout over positions on the sequences
    (a stratified subsample of them), from starts around `eta`."""
    subsample, weights = stratified_subsample(states_NxTp1xD, FIT_SEQUENCES)
    lam = float(ctx.task.ridge_lambda)
    theta = fit_solver(
        spectra(subsample),
        subsample[:, 1:],
        weights,
        SOLVERS[name].starts(eta),
        name=name,
        steps=ctx.steps,
        lam=lam,
        iters=FIT_ITERS,
    )
    return SolverParams(theta, ctx.steps)


def _fit_gd(ctx: FitContext) -> SolverParams:
    """One `eta` shared by the `K` steps, on `eval.line_search_tasks` sequences of its own: exact
    for one step; for more, fitted from starts around the one-step `eta`."""
    states = ctx.task.states(jax.random.fold_in(ctx.key, 1), int(ctx.cfg.eval.line_search_tasks))
    eta = one_step_eta(states)
    return SolverParams(eta[None], 1) if ctx.steps == 1 else _fit(ctx, "gd", states, eta)


def solver_reference(name: str, fit: Callable[[FitContext], SolverParams]) -> Reference:
    """Solver `name` as a stepwise reference, with its `fit`."""
    solver = SOLVERS[name]

    def predict(task, p: SolverParams, queries_TxD: jax.Array, states_Tp1xD: jax.Array) -> jax.Array:
        solve = solver.solve(p.theta, p.steps, task.ridge_lambda)
        return per_position(solve, *normal_equations(states_Tp1xD), queries_TxD)

    def describe(p: SolverParams) -> dict:
        return {**{s: float(v) for s, v in zip(solver.scalars, p.theta, strict=True)}, "steps": p.steps}

    return Reference(name, solver.label, fit, predict, describe=describe, stepwise=True)


def _fit_of_its_own(name: str, seed: int) -> Callable[[FitContext], SolverParams]:
    """Fit solver `name` on `eval.line_search_tasks` sequences of its own (`fold_in(key, seed)`) from
    starts around the fitted GD's `eta`."""

    def fit(ctx: FitContext) -> SolverParams:
        states = ctx.task.states(jax.random.fold_in(ctx.key, seed), int(ctx.cfg.eval.line_search_tasks))
        return _fit(ctx, name, states, ctx.fitted["gd"].theta[0])

    return fit


register(solver_reference("gd", _fit_gd), ("lds",))
register(
    Reference(
        "ridge_online",
        "online ridge",
        lambda ctx: jnp.asarray(ctx.task.ridge_lambda, jnp.float32),
        ridge_online_predict,
        describe=lambda lam: {"lambda": float(lam)},
    ),
    ("lds",),
)
# Data of their own: fold_in(key, 2..4) (GD's is fold_in(key, 1)).
register(solver_reference("richardson", _fit_of_its_own("richardson", 2)), ("lds",))
register(solver_reference("newton_schulz", _fit_of_its_own("newton_schulz", 3)), ("lds",))
register(solver_reference("chebyshev", _fit_of_its_own("chebyshev", 4)), ("lds",))

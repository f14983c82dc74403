"""Few-shot transfer of a model trained on linear dynamical systems (docs/science.md section 8).

The model, trained only to predict the next state, is shown regression pairs `y = W x + 0.01 eps`
(`W` Haar-random orthogonal per sequence, `x ~ U(-1, 1)^D`: the law of the first state `s_1`, so
the pairs have the scale of the states) as the state sequence `x_1, y_1, x_2, y_2, ...`. Its
prediction of the state after `x_i` is its guess of `y_i`; the loss there, by the number `i - 1`
of pairs seen before, is compared with ridge least squares on those pairs and with the zero
predictor. Optionally a learned separator state after each pair and a learned prefix of states,
`prefix, x_1, y_1, sep, x_2, y_2, sep, ...`, are tuned with Adam, the model frozen.

A model is a `Predict`: states `[B, T+1, D]` (the last one only a target) to its next-state
predictions `[B, T, D]` at every position, `T` its sequence length. Sequences shorter than `T`
are padded with zero states at the end; causal attention keeps them out of earlier predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from icl_gd.linalg import spd_solve
from icl_gd.tasks.lds import haar_orthogonal

NOISE_STD = 0.01  # of the regression labels (docs/science.md section 8)
INIT_SCALE = 0.1  # of the initial separator and prefix: off 0, a saddle of attention (quadratic in a token)

Predict = Callable[[jax.Array], jax.Array]  # states [B, T+1, D] -> next-state predictions [B, T, D]


class Pairs(NamedTuple):
    """`n` regression sequences: inputs `x` and labels `y = W x + noise`, `[n, N, D]`; `W`, `[n, D, D]`."""

    x: jax.Array
    y: jax.Array
    w: jax.Array


class Prompt(NamedTuple):
    """Learned states: the separator after each pair, `[D]`, and the prefix before the first, `[Q, D]`."""

    separator: jax.Array
    prefix: jax.Array


def draw_pairs(key: jax.Array, n: int, dim: int, pairs: int, noise: float = NOISE_STD) -> Pairs:
    """`n` sequences of `pairs` pairs: `x ~ U(-1, 1)^dim`, `y = W x + noise eps`, `W` Haar-orthogonal."""
    k_w, k_x, k_eps = jax.random.split(key, 3)
    w = haar_orthogonal(k_w, n, dim)
    x = jax.random.uniform(k_x, (n, pairs, dim), minval=-1.0, maxval=1.0)
    y = jnp.einsum("bij,bnj->bni", w, x) + noise * jax.random.normal(k_eps, (n, pairs, dim))
    return Pairs(x, y, w)


def interleave(pairs: Pairs, prompt: Prompt | None = None) -> tuple[jax.Array, jax.Array]:
    """The state sequences and the (0-based) positions of `x_1..x_N` in them: `x_1, y_1, x_2, ...`
    (`[n, 2N, D]`, x at `2i`), or with a prompt `prefix, x_1, y_1, sep, x_2, y_2, sep, ...`
    (`[n, Q + 3N, D]`, x at `Q + 3i`)."""
    n, count, dim = pairs.x.shape
    if prompt is None:
        return jnp.stack([pairs.x, pairs.y], 2).reshape(n, 2 * count, dim), 2 * jnp.arange(count)
    sep = jnp.broadcast_to(prompt.separator, pairs.x.shape)
    triples = jnp.stack([pairs.x, pairs.y, sep], 2).reshape(n, 3 * count, dim)
    q = prompt.prefix.shape[0]
    prefix = jnp.broadcast_to(prompt.prefix, (n, q, dim))
    return jnp.concatenate([prefix, triples], 1), q + 3 * jnp.arange(count)


def max_pairs(length: int, prefix: int | None = None) -> int:
    """Pairs that fit a model of `length` positions: `length // 2` plain, `(length - prefix) // 3`
    with separators after a prefix of `prefix` states."""
    return length // 2 if prefix is None else (length - prefix) // 3


def least_squares(x_BxNxD: jax.Array, y_BxNxD: jax.Array, lam: float) -> jax.Array:
    """Ridge least squares fitted on the pairs before each one, applied to its `x`:
    `W_i = (sum_{j<i} y_j x_j^T)(sum_{j<i} x_j x_j^T + lam I)^{-1}`, `[B, N, D]` (0 for `i = 1`).
    Prefix sums of the Gram matrices, an SPD solve per pair (no LAPACK call: icl_gd.linalg)."""
    dim = x_BxNxD.shape[-1]

    def one(x, y):
        zero = jnp.zeros((1, dim, dim), x.dtype)
        gram = jnp.concatenate([zero, jnp.cumsum(jnp.einsum("nd,ne->nde", x, x), 0)[:-1]])
        cross = jnp.concatenate([zero, jnp.cumsum(jnp.einsum("nd,ne->nde", y, x), 0)[:-1]])
        solved = jax.vmap(spd_solve)(gram + lam * jnp.eye(dim, dtype=x.dtype), x)
        return jnp.einsum("nde,ne->nd", cross, solved)

    return jax.vmap(one)(x_BxNxD, y_BxNxD)


def pair_losses(preds_BxNxD: jax.Array, y_BxNxD: jax.Array) -> jax.Array:
    """`0.5 ||y_hat_i - y_i||^2` averaged over sequences, by pairs seen before (`i - 1`): `[N]`."""
    return 0.5 * jnp.mean(jnp.sum((preds_BxNxD - y_BxNxD) ** 2, -1), 0)


def model_curve(predict: Predict, pairs: Pairs, length: int, prompt: Prompt | None = None) -> jax.Array:
    """The model's loss on `y_i` (its prediction at `x_i`) by pairs seen before, on as many of
    the pairs as fit its `length` positions: `[N]`."""
    count = min(pairs.x.shape[1], max_pairs(length, None if prompt is None else prompt.prefix.shape[0]))
    x, y = pairs.x[:, :count], pairs.y[:, :count]
    states, x_at = interleave(Pairs(x, y, pairs.w), prompt)
    padded = jnp.pad(states, ((0, 0), (0, length + 1 - states.shape[1]), (0, 0)))
    return pair_losses(predict(padded)[:, x_at], y)


def init_prompt(key: jax.Array, dim: int, prefix: int) -> Prompt:
    """A small random separator and prefix of `prefix` states (`INIT_SCALE`)."""
    states = INIT_SCALE * jax.random.normal(key, (prefix + 1, dim))
    return Prompt(states[0], states[1:])


def tune(
    predict: Predict,
    prompt: Prompt,
    key: jax.Array,
    *,
    length: int,
    steps: int,
    batch: int,
    lr: float,
) -> tuple[Prompt, jax.Array]:
    """Adam on the separator and prefix, the model frozen: each step draws `batch` fresh
    regression sequences from `fold_in(key, step)` and lowers the mean loss at the y-prediction
    positions. One compiled scan; returns the tuned prompt and the loss of every step, `[steps]`."""
    dim, count = prompt.separator.shape[-1], max_pairs(length, prompt.prefix.shape[0])
    optimizer = optax.adam(lr)

    def loss_fn(p: Prompt, k: jax.Array) -> jax.Array:
        return model_curve(predict, draw_pairs(k, batch, dim, count), length, p).mean()

    def step(carry, i):
        p, opt_state = carry
        value, grads = jax.value_and_grad(loss_fn)(p, jax.random.fold_in(key, i))
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (cast(Prompt, optax.apply_updates(p, updates)), opt_state), value

    @jax.jit
    def run(p: Prompt) -> tuple[Prompt, jax.Array]:
        (p, _), values = jax.lax.scan(step, (p, optimizer.init(p)), jnp.arange(steps))
        return p, values

    return run(prompt)


def finding(
    model_N: Sequence[float], least_N: Sequence[float], zero_N: Sequence[float], tuned_M: Sequence[float] | None = None
) -> str:
    """One line on what the mean curves show: whether the model's loss falls with more pairs (by
    more than 10% from none to the most), how much of the gap between the zero predictor and least
    squares it closes at the most pairs, and the tuned model against the plain one at its most pairs."""
    last, best = len(model_N) - 1, min(range(len(model_N)), key=lambda k: model_N[k])
    closed = (zero_N[last] - model_N[last]) / (zero_N[last] - least_N[last])
    text = (
        f"the model's loss {'falls' if model_N[last] < 0.9 * model_N[0] else 'does not fall'} with more pairs "
        f"({model_N[0]:.3g} with none, {model_N[last]:.3g} after {last}"
        + (f", lowest {model_N[best]:.3g} after {best}" if best != last else "")
        + f"); least squares reaches {least_N[last]:.3g} and the zero predictor scores {zero_N[last]:.3g}: "
        f"the model closes {closed:.0%} of the gap between them"
    )
    if tuned_M is not None:
        k = len(tuned_M) - 1
        text += f"; with the tuned separator/prefix {tuned_M[k]:.3g} after {k} pairs (plain: {model_N[k]:.3g})"
    return text

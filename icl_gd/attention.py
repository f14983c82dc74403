"""Attention kinds as a registry (docs/science.md section 3).

An attention kind is one function `(keys_NxD, queries_MxD, w_kq_HxDxD, w_pv_HxDxD, visible_NxM)
-> updates_MxD`: the update of each query token from the key / value tokens, where `visible`
(None: all of them) says which keys each query sees. Every layer is described by the products
`W_KQ = W_K^T W_Q` and `W_PV = W_P W_V` per head, so trained models and the GD / GD++
constructions run through the same functions; `keys_and_visibility` turns a task's `Mask` into
keys and visibility. Register a new kind with `@register("name")` and add its name to
`config.Attention`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from icl_gd.tasks.base import Mask

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]
REGISTRY: dict[str, AttentionFn] = {}


def register(name: str) -> Callable[[AttentionFn], AttentionFn]:
    def add(fn: AttentionFn) -> AttentionFn:
        REGISTRY[name] = fn
        return fn

    return add


def take(tokens_TxD: jax.Array, positions: tuple[int, ...]) -> jax.Array:
    """The tokens at static `positions`: a slice when they are contiguous, else a gather."""
    start = positions[0]
    if positions == tuple(range(start, start + len(positions))):
        return tokens_TxD[start : start + len(positions)]
    return tokens_TxD[np.asarray(positions)]


def keys_and_visibility(
    tokens_TxD: jax.Array, positions: tuple[int, ...], mask: Mask
) -> tuple[jax.Array, jax.Array | None]:
    """The key / value tokens and, for causal masks, which of them each query sees (`[N, M]`).
    A context mask needs no matrix: its keys are the first `n_keys` tokens for every query."""
    if not mask.causal:
        return tokens_TxD[: mask.n_keys], None
    return tokens_TxD, jnp.asarray(mask.visible(tokens_TxD.shape[0], positions))


def _pool(scores_HxNxM: jax.Array, keys_NxD: jax.Array, w_pv: jax.Array) -> jax.Array:
    """`sum_h W_PV_h sum_i a_ij e_i`; the order of products keeps the cost at O(H (N + D) D M)."""
    pooled_HxMxD = jnp.einsum("hnm,nd->hmd", scores_HxNxM, keys_NxD)
    return jnp.einsum("hed,hmd->me", w_pv, pooled_HxMxD)


@register("linear")
def linear(
    keys_NxD: jax.Array, queries_MxD: jax.Array, w_kq: jax.Array, w_pv: jax.Array, visible_NxM: jax.Array | None
) -> jax.Array:
    """Linear self-attention: scores `e_i^T W_KQ e_j` used as they are (docs/science.md section 3)."""
    scores_HxNxM = jnp.einsum("nd,hde,me->hnm", keys_NxD, w_kq, queries_MxD)
    if visible_NxM is not None:
        scores_HxNxM = scores_HxNxM * visible_NxM
    return _pool(scores_HxNxM, keys_NxD, w_pv)


@register("softmax")
def softmax(
    keys_NxD: jax.Array, queries_MxD: jax.Array, w_kq: jax.Array, w_pv: jax.Array, visible_NxM: jax.Array | None
) -> jax.Array:
    """Softmax attention: scores scaled by `1/sqrt(D)`, normalised over the visible keys
    (docs/science.md section 9)."""
    scores_HxNxM = jnp.einsum("nd,hde,me->hnm", keys_NxD, w_kq, queries_MxD) / jnp.sqrt(keys_NxD.shape[-1])
    if visible_NxM is not None:
        scores_HxNxM = jnp.where(visible_NxM, scores_HxNxM, -jnp.inf)
    return _pool(jax.nn.softmax(scores_HxNxM, axis=1), keys_NxD, w_pv)

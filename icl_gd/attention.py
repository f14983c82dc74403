"""Attention kinds as a registry (docs/science.md section 3).

An attention kind maps `(keys_NxDk, values_NxDv, queries_MxDk, w, visible_NxM) -> updates_MxDv`:
the update of each query token from the key / value tokens, where `visible` (None: all of them)
says which keys each query sees, and `w` is the layer's weights in the form the kind needs.
Linear and softmax attention read the products `W_KQ = W_K^T W_Q` and `W_PV = W_P W_V` per head
(`Products`), so that trained models and the GD / GD++ constructions run through the same
functions; the mesa-layer reads the projections themselves and a ridge parameter per head
(`Projections`). Keys and values are the same tokens except in a first layer whose keys and
queries also see positional encodings. Register a new kind with `register(name, Kind(...))` and
add its name to `config.Attention`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from icl_gd import mesa
from icl_gd.linalg import spd_solve
from icl_gd.tasks.base import Mask


class Products(NamedTuple):
    """One layer's attention as products per head: `w_kq = W_K^T W_Q` `[H, Dk, Dk]`,
    `w_pv = W_P W_V` `[H, Dv, Dv]` (with a leading layer axis when stacked)."""

    w_kq: jax.Array
    w_pv: jax.Array


class Projections(NamedTuple):
    """One layer's projections per head: `w_q`, `w_k` `[H, S, Dk]`, `w_v` `[H, S, Dv]`, `w_p`
    `[H, Dv, S]` (`S`: the key size) and the mesa-layer's ridge parameter `lam` `[H]`."""

    w_q: jax.Array
    w_k: jax.Array
    w_v: jax.Array
    w_p: jax.Array
    lam: jax.Array


AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, Any, jax.Array | None], jax.Array]


@dataclass(frozen=True)
class Kind:
    """`apply`: the attention function; `weights`: the form of weights it reads (`Products` or
    `Projections`); `whole_sequence`: a causal kind whose output at a position is computed with
    every earlier one at once (the mesa-layer's recursion), so its queries are all the tokens;
    `implementations`: interchangeable versions of `apply` by name (`model.mesa_impl`)."""

    apply: AttentionFn
    weights: type
    whole_sequence: bool = False
    implementations: tuple[tuple[str, AttentionFn], ...] = ()

    def function(self, impl: str | None = None) -> AttentionFn:
        return dict(self.implementations)[impl] if impl is not None and self.implementations else self.apply


REGISTRY: dict[str, Kind] = {}


def register(name: str, kind: Kind) -> Kind:
    REGISTRY[name] = kind
    return kind


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


def _pool(scores_HxNxM: jax.Array, values_NxD: jax.Array, w_pv: jax.Array) -> jax.Array:
    """`sum_h W_PV_h sum_i a_ij e_i`; the order of products keeps the cost at O(H (N + D) D M)."""
    pooled_HxMxD = jnp.einsum("hnm,nd->hmd", scores_HxNxM, values_NxD)
    return jnp.einsum("hed,hmd->me", w_pv, pooled_HxMxD)


def linear(
    keys_NxD: jax.Array, values_NxD: jax.Array, queries_MxD: jax.Array, w: Products, visible_NxM: jax.Array | None
) -> jax.Array:
    """Linear self-attention: scores `e_i^T W_KQ e_j` used as they are (docs/science.md section 3)."""
    scores_HxNxM = jnp.einsum("nd,hde,me->hnm", keys_NxD, w.w_kq, queries_MxD)
    if visible_NxM is not None:
        scores_HxNxM = scores_HxNxM * visible_NxM
    return _pool(scores_HxNxM, values_NxD, w.w_pv)


def softmax(
    keys_NxD: jax.Array, values_NxD: jax.Array, queries_MxD: jax.Array, w: Products, visible_NxM: jax.Array | None
) -> jax.Array:
    """Softmax attention: scores scaled by `1/sqrt(D)`, normalised over the visible keys
    (docs/science.md section 9)."""
    scores_HxNxM = jnp.einsum("nd,hde,me->hnm", keys_NxD, w.w_kq, queries_MxD) / jnp.sqrt(keys_NxD.shape[-1])
    if visible_NxM is not None:
        scores_HxNxM = jnp.where(visible_NxM, scores_HxNxM, -jnp.inf)
    return _pool(jax.nn.softmax(scores_HxNxM, axis=1), values_NxD, w.w_pv)


def ridge_readout(k_NxS: jax.Array, v_NxS: jax.Array, q_MxS: jax.Array, lam: jax.Array) -> jax.Array:
    """`V^T K (K^T K + I / lam)^-1 q` for every query: the mesa-layer over a whole context."""
    gram = k_NxS.T @ k_NxS + jnp.eye(k_NxS.shape[1], dtype=k_NxS.dtype) / lam
    z_MxS = jax.vmap(lambda q: spd_solve(gram, q))(q_MxS)
    return z_MxS @ k_NxS.T @ v_NxS


def mesa_attention(causal_fn: Callable[..., jax.Array]) -> AttentionFn:
    """The mesa-layer with `causal_fn` (one of `mesa.IMPLEMENTATIONS`) for its causal ridge solves."""

    def apply(
        keys_NxD: jax.Array,
        values_NxD: jax.Array,
        queries_MxD: jax.Array,
        w: Projections,
        visible_NxM: jax.Array | None,
    ) -> jax.Array:
        """Per head, the ridge regression of values on keys over the visible tokens, applied to the
        query (docs/science.md section 3): causally over the sequence when `visible` is given (the
        queries are then the key tokens themselves), else over all keys for every query."""
        k_HxNxS = jnp.einsum("hsd,nd->hns", w.w_k, keys_NxD)
        v_HxNxS = jnp.einsum("hsd,nd->hns", w.w_v, values_NxD)
        q_HxMxS = jnp.einsum("hsd,md->hms", w.w_q, queries_MxD)
        readout = causal_fn if visible_NxM is not None else ridge_readout
        out_HxMxS = jax.vmap(readout)(k_HxNxS, v_HxNxS, q_HxMxS, w.lam)
        return jnp.einsum("hds,hms->md", w.w_p, out_HxMxS)

    return apply


register("linear", Kind(linear, Products))
register("softmax", Kind(softmax, Products))
_MESA = tuple((name, mesa_attention(fn)) for name, fn in mesa.IMPLEMENTATIONS.items())
register("mesa", Kind(_MESA[0][1], Projections, whole_sequence=True, implementations=_MESA))

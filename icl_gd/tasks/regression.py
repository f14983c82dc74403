"""In-context regression as token sequences (docs/science.md sections 1-2), shared by the
`linear` and `sine` task kinds.

A regression task is `N` context pairs `(x_i, y_i)` and a query `x_q` whose label `y_q` is to be
predicted; a batch keeps them as `Tasks` (its `context`, what the references need). Constructed
tokens put `(x_i, y_i)` in one token and the query as `(x_q, 0)`; classic tokens give `x_i` and
`y_i` tokens of their own, `(x_i, 0)` and `(0, y_i)`, interleaved, with the query `(x_q, 0)` last.
Keys and values come from the context tokens only; the prediction is minus the query token's
label slot after the last layer.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from icl_gd.tasks.base import Batch, Layout, Mask


class Tasks(NamedTuple):
    """`x_BxNxd` context inputs, `y_BxN` context labels, `xq_Bxd` query, `yq_B` its label."""

    x: jax.Array
    y: jax.Array
    xq: jax.Array
    yq: jax.Array


def constructed(x_Nxd: jax.Array, y_N: jax.Array, xq_d: jax.Array) -> jax.Array:
    """One task's tokens `[N+1, d+1]`: `(x_i, y_i)` for the context, then `(x_q, 0)`."""
    ctx = jnp.concatenate([x_Nxd, y_N[:, None]], axis=-1)
    query = jnp.concatenate([xq_d, jnp.zeros((1,), xq_d.dtype)])
    return jnp.concatenate([ctx, query[None]])


def classic(x_Nxd: jax.Array, y_N: jax.Array, xq_d: jax.Array) -> jax.Array:
    """One task's tokens `[2N+1, d+1]`: `(x_1, 0), (0, y_1), ..., (x_N, 0), (0, y_N), (x_q, 0)`."""
    n, d = x_Nxd.shape
    x_tokens = jnp.concatenate([x_Nxd, jnp.zeros((n, 1), x_Nxd.dtype)], axis=-1)
    y_tokens = jnp.concatenate([jnp.zeros((n, d), y_N.dtype), y_N[:, None]], axis=-1)
    ctx = jnp.stack([x_tokens, y_tokens], axis=1).reshape(2 * n, d + 1)
    return jnp.concatenate([ctx, constructed(x_Nxd[:0], y_N[:0], xq_d)])


TOKENIZERS = {"constructed": constructed, "classic": classic}


@dataclass(frozen=True)
class Regression(abc.ABC):
    """Base of the regression task kinds: tokens, layout and batches from `draw(key, n) -> Tasks`."""

    dim: int
    n_context: int
    tokens: str  # a key of TOKENIZERS

    name: ClassVar[str]  # set by each task kind
    references: ClassVar[tuple[str, ...]] = ("gd", "gdpp", "ols", "ridge")
    sensitivities: ClassVar[bool] = True
    sequence_sensitivities: ClassVar[bool] = False
    prng: ClassVar[str] = "rbg"  # uniform inputs: Philox bits are cheaper than threefry's

    @property
    def layout(self) -> Layout:
        classic_tokens = self.tokens == "classic"
        n_ctx_tokens = (2 if classic_tokens else 1) * self.n_context
        inputs = tuple(range(0, n_ctx_tokens + 1, 2 if classic_tokens else 1))  # x tokens and the query
        return Layout(
            length=n_ctx_tokens + 1,
            width=self.dim + 1,
            input_dim=self.dim,
            query_slot=0,
            readout=self.dim,
            output_dim=1,
            readout_sign=-1.0,
            scored=(n_ctx_tokens,),
            mask=Mask(causal=False, n_keys=n_ctx_tokens),
            input_tokens=inputs,
            copy_layer=classic_tokens,
        )

    def tokenize(self, x_Nxd: jax.Array, y_N: jax.Array, xq_d: jax.Array) -> jax.Array:
        return TOKENIZERS[self.tokens](x_Nxd, y_N, xq_d)

    def batch(self, t: Tasks) -> Batch:
        """The token sequences of tasks `t`, with their query inputs and labels."""
        return Batch(jax.vmap(self.tokenize)(t.x, t.y, t.xq), t.xq[:, None], t.yq[:, None, None], t)

    @abc.abstractmethod
    def draw(self, key: jax.Array, n: int) -> Tasks:
        """`n` tasks of this kind's law."""

    @property
    @abc.abstractmethod
    def ridge_lambda(self) -> float:
        """The ridge penalty of the Bayes-optimal predictor (docs/science.md section 4)."""

    def sample(self, key: jax.Array, n: int) -> Batch:
        return self.batch(self.draw(key, n))

"""Token construction (SPEC section 2): each task becomes context tokens and one query token.

Every token lives in one residual layout `[x slot (d) | label slot (1) | positions (P)]`.
Constructed tokens put `(x_i, y_i)` in one token and the query as `(x_q, 0)`. Classic tokens
give `x_i` and `y_i` tokens of their own, `(x_i, 0)` and `(0, y_i)` (the label padded with zeros
to the token width), interleaved `x_1, y_1, ..., x_N, y_N`, with the query `(x_q, 0)` last.
Positional encodings, when on, are one-hot positions appended to every token. Context and
query are kept apart because keys and values come from the context tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

KINDS = ("constructed", "classic")


@dataclass(frozen=True)
class Layout:
    """Static token layout: the kind of tokens and the number of one-hot positions (0: none)."""

    kind: str = "constructed"
    positions: int = 0

    @classmethod
    def from_config(cls, task_cfg, model_cfg) -> "Layout":
        kind = str(task_cfg.tokens)
        return cls(kind, sequence_length(kind, int(task_cfg.n_context)) if model_cfg.positional else 0)

    def dim(self, features: int) -> int:
        """Token width for `features` input coordinates."""
        return features + 1 + self.positions

    @property
    def label(self) -> int:
        """Index of the label slot, counted from the end (the readout coordinate)."""
        return -1 - self.positions


def sequence_length(kind: str, n_context: int) -> int:
    """Tokens in a sequence, the query included."""
    return (2 * n_context if kind == "classic" else n_context) + 1


def constructed(x_Nxd: jax.Array, y_N: jax.Array, xq_d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One task's context tokens `[N, d+1]` and query token `[d+1]`."""
    ctx = jnp.concatenate([x_Nxd, y_N[:, None]], axis=-1)
    query = jnp.concatenate([xq_d, jnp.zeros((1,), xq_d.dtype)])
    return ctx, query


def classic(x_Nxd: jax.Array, y_N: jax.Array, xq_d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One task's context tokens `[2N, d+1]`, `(x_1, 0), (0, y_1), ...`, and query token `[d+1]`."""
    n, d = x_Nxd.shape
    x_tokens = jnp.concatenate([x_Nxd, jnp.zeros((n, 1), x_Nxd.dtype)], axis=-1)
    y_tokens = jnp.concatenate([jnp.zeros((n, d), y_N.dtype), y_N[:, None]], axis=-1)
    ctx = jnp.stack([x_tokens, y_tokens], axis=1).reshape(2 * n, d + 1)
    return ctx, constructed(x_Nxd[:0], y_N[:0], xq_d)[1]


def build(layout: Layout, x_Nxd: jax.Array, y_N: jax.Array, xq_d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Context and query tokens of `layout`, one-hot positions appended when it has them."""
    ctx, query = (classic if layout.kind == "classic" else constructed)(x_Nxd, y_N, xq_d)
    if not layout.positions:
        return ctx, query
    eye = jnp.eye(layout.positions, dtype=ctx.dtype)
    return jnp.concatenate([ctx, eye[:-1]], axis=-1), jnp.concatenate([query, eye[-1]])

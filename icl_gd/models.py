"""Transformers of self-attention layers over token sequences (docs/science.md section 3).

`forward(arch, weights, tokens)` is the one forward pass: it reads a task's token sequence
(`tasks.Layout` says where the queries, the readout and the attention mask are) and returns the
readout at every scored position after every layer, `[K, P, O]`. The layers run under
`lax.scan` over a stacked weight structure (one entry, applied `K` times, when tied), so depth
costs no compile time. `Weights` is explicit: attention as the products `W_KQ`, `W_PV` per layer
and head, plus optional LayerNorm, MLP, input-MLP and copy-layer parameters. A `Transformer`
(Flax NNX) holds the trainable factors; `Model` bundles its structure with `forward`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from icl_gd import attention
from icl_gd.tasks import Layout, Mask, Regression


class LayerNorm(NamedTuple):
    scale: jax.Array
    bias: jax.Array


class MLP(NamedTuple):
    """`gelu(z W1 + b1) W2 + b2`."""

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array


Attention = attention.Products  # linear and softmax layers as the GD constructions write them


class Layers(NamedTuple):
    """Layer weights stacked on a leading axis of length `K` (separate weights) or 1 (tied); the
    attention in the form its kind reads (`attention.Products` or `attention.Projections`)."""

    attn: Attention | attention.Projections
    ln_attn: LayerNorm | None = None
    ln_mlp: LayerNorm | None = None
    mlp: MLP | None = None


class Weights(NamedTuple):
    """Everything `forward` reads besides the architecture."""

    layers: Layers
    embed: MLP | None = None  # the input MLP, on the query slot of input tokens
    copy: Attention | None = None  # classic tokens: a causal softmax layer first, `[H, D, D]`
    first: Layers | None = None  # `model.first_layer`: a first layer of its own (no layer axis)
    project_in: jax.Array | None = None  # `model.embed_dim`: tokens `[D_tok]` -> model width `[E]`
    project_out: jax.Array | None = None  # `model.embed_dim`: model width -> prediction, `[E, O]`
    embed_in: jax.Array | None = None  # `model.input_embedding=residual`: the bias-free map `[d, F]` before `embed`


def lsa(w_kq: jax.Array, w_pv: jax.Array) -> Weights:
    """Plain linear self-attention stacks from `[K, H, D, D]` products (the GD / GD++ constructions)."""
    return Weights(Layers(Attention(w_kq, w_pv)))


@dataclass(frozen=True)
class Architecture:
    """Static description of a forward pass: what `forward` needs besides the weights."""

    layout: Layout
    layers: int = 1
    attention: str = "linear"
    clip_activations: float | None = None
    input_mlp: bool = False
    positional: bool = False
    positional_dim: int | None = None  # None: one-hot positions; else sinusoidal encodings of this size
    first_layer: str | None = None  # the attention kind of a first layer of its own
    mesa_impl: str = "scan"
    embed_dim: int | None = None

    @classmethod
    def from_config(cls, model_cfg, layout: Layout) -> Architecture:
        return cls(
            layout=layout,
            layers=int(model_cfg.layers),
            attention=model_cfg.attention.name,
            clip_activations=model_cfg.clip_activations,
            input_mlp=bool(model_cfg.input_mlp),
            positional=bool(model_cfg.positional),
            positional_dim=None if model_cfg.positional_dim is None else int(model_cfg.positional_dim),
            first_layer=None if model_cfg.first_layer is None else model_cfg.first_layer.name,
            mesa_impl=model_cfg.mesa_impl.name,
            embed_dim=None if model_cfg.embed_dim is None else int(model_cfg.embed_dim),
        )

    @property
    def stacked(self) -> int:
        """Layers in the stack (all but a first layer of its own)."""
        return self.layers - (self.first_layer is not None)

    def deeper(self, layers: int) -> Architecture:
        return dataclasses.replace(self, layers=layers)

    def token_width(self, features: int) -> int:
        """Width of the tokens the model reads, with `features` input-MLP features (when it has
        one) and positions (when it has them)."""
        extra = features - self.layout.input_dim if self.input_mlp else 0
        return self.layout.width + extra + (self.positions_width if self.positional else 0)

    @property
    def positions_width(self) -> int:
        """Width of the positions appended to the tokens: one-hot, or sinusoidal of `positional_dim`."""
        return self.layout.length if self.positional_dim is None else self.positional_dim

    def positions(self, dtype) -> jax.Array:
        """`[length, positions_width]`: the positions `embed` appends (one-hot, or sinusoidal)."""
        if self.positional_dim is None:
            return jnp.eye(self.layout.length, dtype=dtype)
        return jnp.asarray(sinusoidal(self.layout.length, self.positional_dim), dtype)

    def width(self, features: int) -> int:
        """Token width inside the model: `embed_dim` when the tokens are projected, else the tokens'."""
        return self.embed_dim if self.embed_dim is not None else self.token_width(features)

    def readout(self, weights: Weights) -> int:
        """Index of the first readout coordinate inside the model (after the input MLP's features)."""
        if self.input_mlp and self.layout.readout >= self.layout.query_slot + self.layout.input_dim:
            assert weights.embed is not None
            return self.layout.readout + weights.embed.w2.shape[-1] - self.layout.input_dim
        return self.layout.readout


def _layer_norm(z: jax.Array, p: LayerNorm) -> jax.Array:
    mean = z.mean(-1, keepdims=True)
    var = ((z - mean) ** 2).mean(-1, keepdims=True)
    return (z - mean) * jax.lax.rsqrt(var + 1e-6) * p.scale + p.bias


def mlp(z: jax.Array, p: MLP) -> jax.Array:
    return jax.nn.gelu(z @ p.w1 + p.b1) @ p.w2 + p.b2


def input_features(embed: MLP, embed_in: jax.Array | None, x_Nxd: jax.Array) -> jax.Array:
    """The input embedding's features of inputs `x`, `[N, F]` (docs/science.md section 9): `mlp(x)`,
    or with the residual form's bias-free linear map `embed_in`, the paper's `e + mlp(e)`, `e = x embed_in`."""
    if embed_in is None:
        return mlp(x_Nxd, embed)
    e = x_Nxd @ embed_in
    return e + mlp(e, embed)


def embed(
    arch: Architecture, weights: Weights, rows_RxD: jax.Array, positions: tuple[int, ...] | None = None
) -> jax.Array:
    """The model's input tokens at `positions` (default: the whole sequence): the input MLP's
    features in place of the query slot of the input tokens (zeros in the others), then the
    positions (one-hot or sinusoidal) appended when the model has them."""
    layout = arch.layout
    where = np.arange(layout.length) if positions is None else np.asarray(positions)
    if arch.input_mlp:
        assert weights.embed is not None and layout.input_tokens is not None
        start, stop = layout.query_slot, layout.query_slot + layout.input_dim
        is_input = np.isin(where, layout.input_tokens)[:, None]
        inputs = rows_RxD[:, start:stop]
        features = jnp.where(is_input, input_features(weights.embed, weights.embed_in, inputs), 0.0)
        rows_RxD = jnp.concatenate([rows_RxD[:, :start], features, rows_RxD[:, stop:]], axis=-1)
    if arch.positional:
        rows_RxD = jnp.concatenate([rows_RxD, arch.positions(rows_RxD.dtype)[where]], axis=-1)
    if weights.project_in is not None:
        rows_RxD = rows_RxD @ weights.project_in
    return rows_RxD


def sinusoidal(length: int, dim: int) -> np.ndarray:
    """Sinusoidal position encodings `[length, dim]` (Vaswani et al. 2017): `sin` on even and `cos`
    on odd coordinates, frequencies `10000^(-2i / dim)`."""
    angles = np.arange(length)[:, None] * np.exp(np.arange(0, dim, 2) * (-np.log(10000.0) / dim))[None, :]
    pe = np.zeros((length, dim), np.float32)
    pe[:, 0::2] = np.sin(angles)
    pe[:, 1::2] = np.cos(angles)[:, : dim // 2]
    return pe


def layer(
    arch: Architecture,
    w: Layers,
    queries_MxD: jax.Array,
    keys_NxD: jax.Array,
    visible_NxM: jax.Array | None = None,
    kind: str | None = None,
    pe: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """One block's output for the query tokens: attention of kind `kind` (default: the model's) to
    the key tokens (pre-LN on both when the weights have LayerNorms; `pe`: position encodings of
    the keys and of the queries, appended to both for the scores only), then the MLP, each with a
    residual connection, then the activation clip."""
    ln = w.ln_attn
    norm = (lambda z: z) if ln is None else (lambda z: _layer_norm(z, ln))
    keys, queries = norm(keys_NxD), norm(queries_MxD)
    values = keys
    if pe is not None:
        keys, queries = jnp.concatenate([keys, pe[0]], -1), jnp.concatenate([queries, pe[1]], -1)
    apply = attention.REGISTRY[kind or arch.attention].function(arch.mesa_impl)
    out = queries_MxD + apply(keys, values, queries, w.attn, visible_NxM)
    if w.mlp is not None:
        out = out + mlp(out if w.ln_mlp is None else _layer_norm(out, w.ln_mlp), w.mlp)
    if arch.clip_activations is not None:
        out = jnp.clip(out, -arch.clip_activations, arch.clip_activations)
    return out


def layer_at(
    arch: Architecture,
    w: Layers,
    tokens_TxD: jax.Array,
    positions: tuple[int, ...],
    kind: str | None = None,
    pe_TxP: jax.Array | None = None,
) -> jax.Array:
    """`layer` for the tokens at `positions` of a sequence, with the keys the task's mask allows
    (all tokens, then `positions` taken, for a kind that computes a causal sequence at once)."""
    mask, kind = arch.layout.mask, kind or arch.attention
    everywhere = tuple(range(tokens_TxD.shape[0]))
    if attention.REGISTRY[kind].whole_sequence and mask.causal and positions != everywhere:
        return attention.take(layer_at(arch, w, tokens_TxD, everywhere, kind, pe_TxP), positions)
    keys, visible = attention.keys_and_visibility(tokens_TxD, positions, mask)
    pe = None if pe_TxP is None else (pe_TxP[: keys.shape[0]], attention.take(pe_TxP, positions))
    return layer(arch, w, attention.take(tokens_TxD, positions), keys, visible, kind, pe)


def first_layer(arch: Architecture, weights: Weights, tokens_TxD: jax.Array) -> jax.Array:
    """The first layer of its own (`model.first_layer`) over the whole sequence, its keys and
    queries seeing sinusoidal position encodings of the model's width (the follow-up's full-fledged
    models, docs/science.md section 8)."""
    assert weights.first is not None and arch.first_layer is not None
    pe = jnp.asarray(sinusoidal(tokens_TxD.shape[0], tokens_TxD.shape[-1]), tokens_TxD.dtype)
    return layer_at(arch, weights.first, tokens_TxD, tuple(range(tokens_TxD.shape[0])), arch.first_layer, pe)


def copy_layer(copy: Attention, tokens_TxD: jax.Array) -> jax.Array:
    """Classic tokens' first layer: causal softmax self-attention over the whole sequence (token j
    attends to the tokens i <= j), with a residual connection."""
    everywhere = tuple(range(tokens_TxD.shape[0]))
    visible = jnp.asarray(Mask(causal=True).visible(tokens_TxD.shape[0], everywhere))
    return tokens_TxD + attention.softmax(tokens_TxD, tokens_TxD, tokens_TxD, copy, visible)


def _separable(arch: Architecture, weights: Weights) -> bool:
    """Whether the key tokens never depend on the scored ones: keys from a context prefix that
    holds no scored position, and no copy layer (regression tasks)."""
    mask, scored = arch.layout.mask, arch.layout.scored
    return not mask.causal and min(scored) >= mask.n_keys and weights.copy is None and weights.first is None


def _stack_size(weights: Weights) -> int:
    return jax.tree_util.tree_leaves(weights.layers.attn)[0].shape[0]


def _reader(arch: Architecture, weights: Weights) -> Callable[[jax.Array], jax.Array]:
    """Tokens `[M, W]` -> predictions `[M, O]`: the output projection, or the task's readout slot."""
    project_out = weights.project_out
    if project_out is not None:
        return lambda t: t @ project_out
    layout, start = arch.layout, arch.readout(weights)
    return lambda t: layout.readout_sign * t[:, start : start + layout.output_dim]


def forward(
    arch: Architecture, weights: Weights, tokens_TxD: jax.Array, queries_Pxd: jax.Array | None = None
) -> jax.Array:
    """Readouts after each layer at each scored position, `[K, P, O]`, for one token sequence
    (with `queries` written at the query slot of the scored tokens first, when given).

    Layers `1..K-1` update every token under one `lax.scan`; the last updates only the scored
    tokens, the only ones read out. A weight stack of length 1 is applied at every layer. When the
    keys never depend on the scored tokens (regression), the context and the other tokens are
    carried apart, so that derivatives with respect to `queries` (sensitivities) skip the context.
    """
    layout = arch.layout
    n_sets, n_stacked = _stack_size(weights), arch.stacked
    if n_sets not in (1, n_stacked):
        raise ValueError(f"model.layers: got {n_stacked} layers for {n_sets} weight sets; allowed: 1 or {n_sets}")
    read = _reader(arch, weights)
    at = lambda i: jax.tree_util.tree_map(lambda a: a[i], weights.layers)
    first = lambda i: at(i if n_sets > 1 else 0)
    steps = jnp.arange(n_stacked - 1)

    if _separable(arch, weights):
        n = layout.mask.n_keys
        scored = tuple(p - n for p in layout.scored)  # within the tokens after the context
        rest = tokens_TxD[n:]
        if queries_Pxd is not None:
            slot = slice(layout.query_slot, layout.query_slot + layout.input_dim)
            rest = rest.at[np.asarray(scored), slot].set(queries_Pxd)
        ctx = embed(arch, weights, tokens_TxD[:n], tuple(range(n)))
        rest = embed(arch, weights, rest, tuple(range(n, layout.length)))

        def body_apart(carry, i):
            ctx, rest = carry
            w = first(i)
            ctx, rest = layer(arch, w, ctx, ctx), layer(arch, w, rest, ctx)
            return (ctx, rest), read(attention.take(rest, scored))

        (ctx, rest), early_KxPxO = jax.lax.scan(body_apart, (ctx, rest), steps)
        last = layer(arch, first(n_stacked - 1), attention.take(rest, scored), ctx)
        return jnp.concatenate([early_KxPxO, read(last)[None]])

    if queries_Pxd is not None:
        tokens_TxD = layout.place_queries(tokens_TxD, queries_Pxd)
    tokens_TxD = embed(arch, weights, tokens_TxD)
    if weights.copy is not None:
        tokens_TxD = copy_layer(weights.copy, tokens_TxD)
    readouts = []
    if weights.first is not None:
        tokens_TxD = first_layer(arch, weights, tokens_TxD)
        readouts.append(read(attention.take(tokens_TxD, layout.scored))[None])
    everywhere = tuple(range(layout.length))

    def body(tokens, i):
        tokens = layer_at(arch, first(i), tokens, everywhere)
        return tokens, read(attention.take(tokens, layout.scored))

    tokens_TxD, early_KxPxO = jax.lax.scan(body, tokens_TxD, steps)
    last = layer_at(arch, first(n_stacked - 1), tokens_TxD, layout.scored)
    return jnp.concatenate([*readouts, early_KxPxO, read(last)[None]])


def residual_stream(arch: Architecture, weights: Weights, tokens_TxD: jax.Array) -> jax.Array:
    """Every token's representation after the embedding (index 0) and after each layer `k`
    (index `k`), `[K+1, T, W]` (`W`: the model's width): what probes read (docs/science.md section 8)."""
    tokens_TxD = embed(arch, weights, tokens_TxD)
    if weights.copy is not None:
        tokens_TxD = copy_layer(weights.copy, tokens_TxD)
    stream = [tokens_TxD[None]]
    if weights.first is not None:
        tokens_TxD = first_layer(arch, weights, tokens_TxD)
        stream.append(tokens_TxD[None])
    n_sets = _stack_size(weights)
    everywhere = tuple(range(arch.layout.length))

    def body(tokens, i):
        w = jax.tree_util.tree_map(lambda a: a[i if n_sets > 1 else 0], weights.layers)
        tokens = layer_at(arch, w, tokens, everywhere)
        return tokens, tokens

    _, after_KxTxW = jax.lax.scan(body, tokens_TxD, jnp.arange(arch.stacked))
    return jnp.concatenate([*stream, after_KxTxW])


def predict_batch(arch: Architecture, weights: Weights, tokens_BxTxD: jax.Array) -> jax.Array:
    """`forward` over a batch of sequences: `[B, K, P, O]`."""
    return jax.vmap(forward, in_axes=(None, None, 0))(arch, weights, tokens_BxTxD)


def regression_readout(
    arch: Architecture, weights: Weights, task: Regression, x_Nxd: jax.Array, y_N: jax.Array, xq_d: jax.Array
) -> jax.Array:
    """A regression task's prediction after each layer, `[K]`: `forward` on the task's tokens (the
    query given apart, so that derivatives with respect to it skip the context)."""
    return forward(arch, weights, task.tokenize(x_Nxd, y_N, jnp.zeros_like(xq_d)), xq_d[None])[:, 0, 0]


def init_scale(model_cfg) -> float:
    """Variance-scaling factor of the initial weights: `model.init_scale`, or the paper's `0.002 / K`."""
    return float(model_cfg.init_scale) if model_cfg.init_scale is not None else 0.002 / int(model_cfg.layers)


class Transformer(nnx.Module):
    """Trainable factors `W_Q, W_K, W_V, W_P` per layer and head (plus LayerNorm / MLPs).

    Factors are stacked over layers (`[L, H, S, D]`, `S` the key size, `W_P` `[L, H, D, S]`); a
    recurrent model keeps one stack entry and applies it `layers` times. Initialisation: variance
    scaling (fan-in, truncated normal) with scale `init_scale`, as in the paper's code. With
    classic tokens a causal copy layer (factors `copy_q, copy_k, copy_v, copy_p`, `[H, D, D]`)
    comes first. Optional, created after the rest (so that the random streams of models without
    them do not move): input and output projections (`model.embed_dim`), a first layer of its own
    (`first_*`, keys and queries `2D` wide: they see position encodings), the mesa-layer's
    `log(lambda)` per layer and head, and the residual input embedding's bias-free map `embed_in`
    (its MLP, `embed_*`, then reads the `F` features instead of the raw inputs).
    """

    def __init__(self, model_cfg, layout: Layout, init_scale: float, rngs: nnx.Rngs):
        self.arch = arch = Architecture.from_config(model_cfg, layout)
        n = 1 if model_cfg.recurrent else arch.stacked
        heads = int(model_cfg.heads)
        features = int(model_cfg.input_mlp_features)
        dim = arch.width(features)
        key = dim if model_cfg.key_size is None else int(model_cfg.key_size)
        init = jax.nn.initializers.variance_scaling(
            init_scale, "fan_in", "truncated_normal", in_axis=-1, out_axis=-2, batch_axis=(0, 1)
        )
        init_p = jax.nn.initializers.variance_scaling(  # fan-in of W_P: all heads' values
            init_scale, "fan_in", "truncated_normal", in_axis=(-3, -1), out_axis=-2, batch_axis=0
        )
        self.w_q = nnx.Param(init(rngs.params(), (n, heads, key, dim)))
        self.w_k = nnx.Param(init(rngs.params(), (n, heads, key, dim)))
        self.w_v = nnx.Param(init(rngs.params(), (n, heads, key, dim)))
        self.w_p = nnx.Param(init_p(rngs.params(), (n, heads, dim, key)))
        # Optional parts are None when absent (in this order: the random streams of earlier versions).
        self.copy_q, self.copy_k, self.copy_v, self.copy_p = (
            (
                nnx.Param(init(rngs.params(), (1, heads, dim, dim))[0]),
                nnx.Param(init(rngs.params(), (1, heads, dim, dim))[0]),
                nnx.Param(init(rngs.params(), (1, heads, dim, dim))[0]),
                nnx.Param(init_p(rngs.params(), (1, heads, dim, dim))[0]),
            )
            if layout.copy_layer
            else (None,) * 4
        )
        dense = jax.nn.initializers.variance_scaling(init_scale, "fan_in", "truncated_normal")
        ln, ln_mlp = bool(model_cfg.layernorm), bool(model_cfg.layernorm and model_cfg.mlp)
        self.ln_attn_scale, self.ln_attn_bias = (
            (nnx.Param(jnp.ones((n, dim))), nnx.Param(jnp.zeros((n, dim)))) if ln else (None, None)
        )
        self.ln_mlp_scale, self.ln_mlp_bias = (
            (nnx.Param(jnp.ones((n, dim))), nnx.Param(jnp.zeros((n, dim)))) if ln_mlp else (None, None)
        )
        width = int(model_cfg.mlp_width)
        self.mlp_w1, self.mlp_b1, self.mlp_w2, self.mlp_b2 = (
            (
                nnx.Param(jax.vmap(lambda k: dense(k, (dim, width)))(jax.random.split(rngs.params(), n))),
                nnx.Param(jnp.zeros((n, width))),
                nnx.Param(jax.vmap(lambda k: dense(k, (width, dim)))(jax.random.split(rngs.params(), n))),
                nnx.Param(jnp.zeros((n, dim))),
            )
            if model_cfg.mlp
            else (None,) * 4
        )
        # The residual embedding draws from the model's variance-scaling law, as the paper's code; the mlp form He.
        residual = bool(model_cfg.input_mlp) and model_cfg.input_embedding.name == "residual"
        embed_width, embed_init = int(model_cfg.input_mlp_width), dense if residual else jax.nn.initializers.he_normal()
        self.embed_w1, self.embed_b1, self.embed_w2, self.embed_b2 = (
            (
                nnx.Param(embed_init(rngs.params(), (features if residual else layout.input_dim, embed_width))),
                nnx.Param(jnp.zeros((embed_width,))),
                nnx.Param(embed_init(rngs.params(), (embed_width, features))),
                nnx.Param(jnp.zeros((features,))),
            )
            if model_cfg.input_mlp
            else (None,) * 4
        )
        self.project_in, self.project_out = (
            (
                nnx.Param(dense(rngs.params(), (arch.token_width(features), dim))),
                nnx.Param(dense(rngs.params(), (dim, layout.output_dim))),
            )
            if arch.embed_dim is not None
            else (None, None)
        )
        first = lambda shape, fn=init: nnx.Param(fn(rngs.params(), (1, *shape))[0])
        self.first_q, self.first_k, self.first_v, self.first_p = (
            (
                first((heads, key, 2 * dim)),
                first((heads, key, 2 * dim)),
                first((heads, key, dim)),
                first((heads, dim, key), init_p),
            )
            if arch.first_layer is not None
            else (None,) * 4
        )
        log_lam = math.log(float(model_cfg.mesa_lambda))
        mesa = lambda kind, shape: nnx.Param(jnp.full(shape, log_lam)) if kind == "mesa" else None
        self.mesa_log_lambda = mesa(arch.attention, (n, heads))
        self.first_log_lambda = mesa(arch.first_layer, (1, heads))
        self.embed_in = nnx.Param(dense(rngs.params(), (layout.input_dim, features))) if residual else None

    def weights(self) -> Weights:
        """The explicit `Weights`: attention as products per layer and head, and the rest."""
        # Optional parts are set or None together (`__init__`): the first of a group decides.
        pair = lambda a, b: None if a is None else LayerNorm(a[...], b[...])
        four = lambda *ps: None if ps[0] is None else MLP(*(p[...] for p in ps))
        copy = None
        if self.copy_q is not None:
            copy_k, copy_v, copy_p = cast(
                tuple[nnx.Param, nnx.Param, nnx.Param], (self.copy_k, self.copy_v, self.copy_p)
            )
            copy = Attention(
                jnp.einsum("hkd,hke->hde", copy_k[...], self.copy_q[...]),
                jnp.einsum("hdk,hke->hde", copy_p[...], copy_v[...]),
            )
        layers = Layers(
            attn=_attention(self.arch.attention, self.w_q, self.w_k, self.w_v, self.w_p, self.mesa_log_lambda),
            ln_attn=pair(self.ln_attn_scale, self.ln_attn_bias),
            ln_mlp=pair(self.ln_mlp_scale, self.ln_mlp_bias),
            mlp=four(self.mlp_w1, self.mlp_b1, self.mlp_w2, self.mlp_b2),
        )
        first = None
        if self.arch.first_layer is not None:
            q, k, v, p = (
                cast(nnx.Param, f)[...][None] for f in (self.first_q, self.first_k, self.first_v, self.first_p)
            )
            first = Layers(_attention(self.arch.first_layer, q, k, v, p, self.first_log_lambda, stacked=False))
        value = lambda p: None if p is None else p[...]
        return Weights(
            layers,
            embed=four(self.embed_w1, self.embed_b1, self.embed_w2, self.embed_b2),
            copy=copy,
            first=first,
            project_in=value(self.project_in),
            project_out=value(self.project_out),
            embed_in=value(self.embed_in),
        )

    def __call__(self, tokens_TxD: jax.Array) -> jax.Array:
        return forward(self.arch, self.weights(), tokens_TxD)


def _attention(kind: str, w_q, w_k, w_v, w_p, log_lam, stacked: bool = True) -> Attention | attention.Projections:
    """A layer stack's attention in the form its kind reads: products `W_K^T W_Q`, `W_P W_V` per
    layer and head, or the projections and `lambda` themselves (without the layer axis when not
    `stacked`)."""
    factors = [f[...] if isinstance(f, nnx.Param) else f for f in (w_q, w_k, w_v, w_p)]
    if attention.REGISTRY[kind].weights is attention.Projections:
        assert log_lam is not None
        q, k, v, p = factors
        out = attention.Projections(q, k, v, p, jnp.exp(log_lam[...]))
    else:
        q, k, v, p = factors
        out = Attention(jnp.einsum("lhkd,lhke->lhde", k, q), jnp.einsum("lhdk,lhke->lhde", p, v))
    return out if stacked else jax.tree_util.tree_map(lambda a: a[0], out)


class Model(NamedTuple):
    """A configured model: its static structure, the function that draws fresh parameters from a
    key (vmap it over seed keys), and the pure functions of those parameters."""

    graphdef: nnx.GraphDef
    arch: Architecture
    init: Callable[[jax.Array], nnx.State]

    def weights(self, params: nnx.State) -> Weights:
        return nnx.merge(self.graphdef, params).weights()

    def predict(self, params: nnx.State, tokens_BxTxD: jax.Array) -> jax.Array:
        """Readouts `[B, K, P, O]`."""
        return predict_batch(self.arch, self.weights(params), tokens_BxTxD)

    def residuals(self, params: nnx.State, tokens_BxTxD: jax.Array) -> jax.Array:
        """`residual_stream` over a batch of sequences: `[B, K+1, T, W]`."""
        weights = self.weights(params)
        return jax.vmap(lambda tokens: residual_stream(self.arch, weights, tokens))(tokens_BxTxD)

    def module(self, params: nnx.State) -> Transformer:
        return nnx.merge(self.graphdef, params)


def build(model_cfg, layout: Layout, scale: float | None = None) -> Model:
    """The model a config describes for a task layout (`scale` overrides the init scale)."""
    scale = init_scale(model_cfg) if scale is None else scale

    def init(key: jax.Array) -> nnx.State:
        return nnx.split(Transformer(model_cfg, layout, scale, nnx.Rngs(params=key)))[1]

    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, layout, scale, nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract)
    return Model(graphdef, Architecture.from_config(model_cfg, layout), init)

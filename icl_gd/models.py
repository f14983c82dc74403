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


class Attention(NamedTuple):
    """One attention layer's products per head: `w_kq = W_K^T W_Q`, `w_pv = W_P W_V`, `[H, D, D]`
    (with a leading layer axis when stacked)."""

    w_kq: jax.Array
    w_pv: jax.Array


class Layers(NamedTuple):
    """Layer weights stacked on a leading axis of length `K` (separate weights) or 1 (tied)."""

    attn: Attention
    ln_attn: LayerNorm | None = None
    ln_mlp: LayerNorm | None = None
    mlp: MLP | None = None


class Weights(NamedTuple):
    """Everything `forward` reads besides the architecture."""

    layers: Layers
    embed: MLP | None = None  # the input MLP, on the query slot of input tokens
    copy: Attention | None = None  # classic tokens: a causal softmax layer first, `[H, D, D]`


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

    @classmethod
    def from_config(cls, model_cfg, layout: Layout) -> Architecture:
        return cls(
            layout=layout,
            layers=int(model_cfg.layers),
            attention=model_cfg.attention.name,
            clip_activations=model_cfg.clip_activations,
            input_mlp=bool(model_cfg.input_mlp),
            positional=bool(model_cfg.positional),
        )

    def deeper(self, layers: int) -> Architecture:
        return dataclasses.replace(self, layers=layers)

    def width(self, features: int) -> int:
        """Token width inside the model, with `features` input-MLP features (when it has one)."""
        extra = features - self.layout.input_dim if self.input_mlp else 0
        return self.layout.width + extra + (self.layout.length if self.positional else 0)

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


def embed(
    arch: Architecture, weights: Weights, rows_RxD: jax.Array, positions: tuple[int, ...] | None = None
) -> jax.Array:
    """The model's input tokens at `positions` (default: the whole sequence): the input MLP's
    features in place of the query slot of the input tokens (zeros in the others), then one-hot
    positions appended when the model has them."""
    layout = arch.layout
    where = np.arange(layout.length) if positions is None else np.asarray(positions)
    if arch.input_mlp:
        assert weights.embed is not None and layout.input_tokens is not None
        start, stop = layout.query_slot, layout.query_slot + layout.input_dim
        is_input = np.isin(where, layout.input_tokens)[:, None]
        features = jnp.where(is_input, mlp(rows_RxD[:, start:stop], weights.embed), 0.0)
        rows_RxD = jnp.concatenate([rows_RxD[:, :start], features, rows_RxD[:, stop:]], axis=-1)
    if arch.positional:
        rows_RxD = jnp.concatenate([rows_RxD, jnp.eye(layout.length, dtype=rows_RxD.dtype)[where]], axis=-1)
    return rows_RxD


def layer(
    arch: Architecture, w: Layers, queries_MxD: jax.Array, keys_NxD: jax.Array, visible_NxM: jax.Array | None = None
) -> jax.Array:
    """One block's output for the query tokens: attention to the key tokens (pre-LN on both when the
    weights have LayerNorms), then the MLP, each with a residual connection, then the activation clip."""
    ln = w.ln_attn
    norm = (lambda z: z) if ln is None else (lambda z: _layer_norm(z, ln))
    update = attention.REGISTRY[arch.attention](
        norm(keys_NxD), norm(queries_MxD), w.attn.w_kq, w.attn.w_pv, visible_NxM
    )
    out = queries_MxD + update
    if w.mlp is not None:
        out = out + mlp(out if w.ln_mlp is None else _layer_norm(out, w.ln_mlp), w.mlp)
    if arch.clip_activations is not None:
        out = jnp.clip(out, -arch.clip_activations, arch.clip_activations)
    return out


def layer_at(arch: Architecture, w: Layers, tokens_TxD: jax.Array, positions: tuple[int, ...]) -> jax.Array:
    """`layer` for the tokens at `positions` of a sequence, with the keys the task's mask allows."""
    keys, visible = attention.keys_and_visibility(tokens_TxD, positions, arch.layout.mask)
    return layer(arch, w, attention.take(tokens_TxD, positions), keys, visible)


def copy_layer(copy: Attention, tokens_TxD: jax.Array) -> jax.Array:
    """Classic tokens' first layer: causal softmax self-attention over the whole sequence (token j
    attends to the tokens i <= j), with a residual connection."""
    everywhere = tuple(range(tokens_TxD.shape[0]))
    visible = jnp.asarray(Mask(causal=True).visible(tokens_TxD.shape[0], everywhere))
    return tokens_TxD + attention.softmax(tokens_TxD, tokens_TxD, copy.w_kq, copy.w_pv, visible)


def _separable(arch: Architecture, weights: Weights) -> bool:
    """Whether the key tokens never depend on the scored ones: keys from a context prefix that
    holds no scored position, and no copy layer (regression tasks)."""
    mask, scored = arch.layout.mask, arch.layout.scored
    return not mask.causal and min(scored) >= mask.n_keys and weights.copy is None


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
    n_sets = weights.layers.attn.w_kq.shape[0]
    if n_sets not in (1, arch.layers):
        raise ValueError(f"model.layers: got {arch.layers} layers for {n_sets} weight sets; allowed: 1 or {n_sets}")
    start = arch.readout(weights)
    read = lambda t: layout.readout_sign * t[:, start : start + layout.output_dim]
    at = lambda i: jax.tree_util.tree_map(lambda a: a[i], weights.layers)
    first = lambda i: at(i if n_sets > 1 else 0)
    steps = jnp.arange(arch.layers - 1)

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
        last = layer(arch, first(arch.layers - 1), attention.take(rest, scored), ctx)
        return jnp.concatenate([early_KxPxO, read(last)[None]])

    if queries_Pxd is not None:
        tokens_TxD = layout.place_queries(tokens_TxD, queries_Pxd)
    tokens_TxD = embed(arch, weights, tokens_TxD)
    if weights.copy is not None:
        tokens_TxD = copy_layer(weights.copy, tokens_TxD)
    everywhere = tuple(range(layout.length))

    def body(tokens, i):
        tokens = layer_at(arch, first(i), tokens, everywhere)
        return tokens, read(attention.take(tokens, layout.scored))

    tokens_TxD, early_KxPxO = jax.lax.scan(body, tokens_TxD, steps)
    last = layer_at(arch, first(arch.layers - 1), tokens_TxD, layout.scored)
    return jnp.concatenate([early_KxPxO, read(last)[None]])


def residual_stream(arch: Architecture, weights: Weights, tokens_TxD: jax.Array) -> jax.Array:
    """Every token's representation after the embedding (index 0) and after each layer `k`
    (index `k`), `[K+1, T, W]` (`W`: the model's width): what probes read (docs/science.md section 8)."""
    tokens_TxD = embed(arch, weights, tokens_TxD)
    if weights.copy is not None:
        tokens_TxD = copy_layer(weights.copy, tokens_TxD)
    n_sets = weights.layers.attn.w_kq.shape[0]
    everywhere = tuple(range(arch.layout.length))

    def body(tokens, i):
        w = jax.tree_util.tree_map(lambda a: a[i if n_sets > 1 else 0], weights.layers)
        tokens = layer_at(arch, w, tokens, everywhere)
        return tokens, tokens

    _, after_KxTxW = jax.lax.scan(body, tokens_TxD, jnp.arange(arch.layers))
    return jnp.concatenate([tokens_TxD[None], after_KxTxW])


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

    Factors are stacked over layers (`[L, H, D, D]`); a recurrent model keeps one stack entry
    and applies it `layers` times. Initialisation: variance scaling (fan-in, truncated normal)
    with scale `init_scale`, as in the paper's code. With classic tokens a causal copy layer
    (factors `copy_q, copy_k, copy_v, copy_p`, `[H, D, D]`) comes first.
    """

    def __init__(self, model_cfg, layout: Layout, init_scale: float, rngs: nnx.Rngs):
        self.arch = Architecture.from_config(model_cfg, layout)
        n = 1 if model_cfg.recurrent else int(model_cfg.layers)
        heads = int(model_cfg.heads)
        features = int(model_cfg.input_mlp_features)
        dim = self.arch.width(features)
        init = jax.nn.initializers.variance_scaling(
            init_scale, "fan_in", "truncated_normal", in_axis=-1, out_axis=-2, batch_axis=(0, 1)
        )
        init_p = jax.nn.initializers.variance_scaling(  # fan-in of W_P: all heads' values
            init_scale, "fan_in", "truncated_normal", in_axis=(-3, -1), out_axis=-2, batch_axis=0
        )
        self.w_q = nnx.Param(init(rngs.params(), (n, heads, dim, dim)))
        self.w_k = nnx.Param(init(rngs.params(), (n, heads, dim, dim)))
        self.w_v = nnx.Param(init(rngs.params(), (n, heads, dim, dim)))
        self.w_p = nnx.Param(init_p(rngs.params(), (n, heads, dim, dim)))
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
        embed_width, he = int(model_cfg.input_mlp_width), jax.nn.initializers.he_normal()
        self.embed_w1, self.embed_b1, self.embed_w2, self.embed_b2 = (
            (
                nnx.Param(he(rngs.params(), (layout.input_dim, embed_width))),
                nnx.Param(jnp.zeros((embed_width,))),
                nnx.Param(he(rngs.params(), (embed_width, features))),
                nnx.Param(jnp.zeros((features,))),
            )
            if model_cfg.input_mlp
            else (None,) * 4
        )

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
            attn=Attention(
                jnp.einsum("lhkd,lhke->lhde", self.w_k[...], self.w_q[...]),
                jnp.einsum("lhdk,lhke->lhde", self.w_p[...], self.w_v[...]),
            ),
            ln_attn=pair(self.ln_attn_scale, self.ln_attn_bias),
            ln_mlp=pair(self.ln_mlp_scale, self.ln_mlp_bias),
            mlp=four(self.mlp_w1, self.mlp_b1, self.mlp_w2, self.mlp_b2),
        )
        return Weights(layers, embed=four(self.embed_w1, self.embed_b1, self.embed_w2, self.embed_b2), copy=copy)

    def __call__(self, tokens_TxD: jax.Array) -> jax.Array:
        return forward(self.arch, self.weights(), tokens_TxD)


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

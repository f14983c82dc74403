"""Transformers built from self-attention layers on in-context regression tokens (SPEC sections 2-3).

Every attention layer is described by the products `W_KQ = W_K^T W_Q` and `W_PV = W_P W_V`
(one pair per head): they fix the layer's function, so trained models and the GD / GD++
constructions of `references` run through the same pure `forward`. A `Transformer` (Flax
NNX) holds the trainable factors and turns them into these products. With classic tokens a
causal softmax layer (`copy_kq`, `copy_pv`, one-hot positions in the tokens) comes first; it has
to learn to copy each `x_i` into its label's token before the attention layers can do GD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from icl_gd import tokens

Weights = dict  # {"w_kq": [L,H,D,D], "w_pv": [L,H,D,D], optional "ln_*", "mlp_*", "embed_*", "copy_*"}


@dataclass(frozen=True)
class Architecture:
    """Static description of a forward pass: what `forward` needs besides the weights."""

    layers: int = 1
    attention: str = "linear"
    layernorm: bool = False
    mlp: bool = False
    clip_activations: Optional[float] = None
    input_mlp: bool = False
    layout: tokens.Layout = tokens.Layout()

    @classmethod
    def from_config(cls, model_cfg, layout: tokens.Layout = tokens.Layout()) -> "Architecture":
        return cls(
            layers=int(model_cfg.layers),
            attention=str(model_cfg.attention),
            layernorm=bool(model_cfg.layernorm),
            mlp=bool(model_cfg.mlp),
            clip_activations=model_cfg.clip_activations,
            input_mlp=bool(model_cfg.input_mlp),
            layout=layout,
        )


def _layer_norm(z: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    mean = z.mean(-1, keepdims=True)
    var = ((z - mean) ** 2).mean(-1, keepdims=True)
    return (z - mean) * jax.lax.rsqrt(var + 1e-6) * scale + bias


def attend(queries_MxD: jax.Array, ctx_NxD: jax.Array, w_kq: jax.Array, w_pv: jax.Array, attention: str,
           mask_NxM: Optional[jax.Array] = None) -> jax.Array:
    """Update of each query token: `sum_h W_PV_h sum_i a_ij e_i` with `a_ij` from `e_i^T W_KQ_h e_j`.

    Linear attention uses the scores as they are (SPEC section 3); softmax normalises them over
    the context tokens (scaled by 1/sqrt(D)). Keys and values come from the context only, and
    only where `mask_NxM` is true when given. The order of products keeps the cost at
    O(H (N + D) D M) for M queries.
    """
    scores_HxNxM = jnp.einsum("nd,hde,me->hnm", ctx_NxD, w_kq, queries_MxD)
    if attention == "softmax":
        scores_HxNxM = scores_HxNxM / jnp.sqrt(ctx_NxD.shape[-1])
        if mask_NxM is not None:
            scores_HxNxM = jnp.where(mask_NxM, scores_HxNxM, -jnp.inf)
        scores_HxNxM = jax.nn.softmax(scores_HxNxM, axis=1)
    elif mask_NxM is not None:
        scores_HxNxM = scores_HxNxM * mask_NxM
    pooled_HxMxD = jnp.einsum("hnm,nd->hmd", scores_HxNxM, ctx_NxD)
    return jnp.einsum("hed,hmd->me", w_pv, pooled_HxMxD)


def _mlp(z: jax.Array, w1, b1, w2, b2) -> jax.Array:
    return jax.nn.gelu(z @ w1 + b1) @ w2 + b2


def embed_inputs(weights: Weights, x: jax.Array) -> jax.Array:
    """The input MLP: raw inputs `[..., d]` to learned features `[..., F]`."""
    hidden = jax.nn.gelu(x @ weights["embed_w1"] + weights["embed_b1"])
    return hidden @ weights["embed_w2"] + weights["embed_b2"]


def copy_layer(weights: Weights, seq_MxD: jax.Array) -> jax.Array:
    """The first layer for classic tokens: causal softmax self-attention (token j attends to the
    tokens i <= j, itself included) with a residual connection, over the whole sequence."""
    m = seq_MxD.shape[0]
    causal_MxM = jnp.tri(m, dtype=bool).T  # [i, j]: key i <= query j
    return seq_MxD + attend(seq_MxD, seq_MxD, weights["copy_kq"], weights["copy_pv"], "softmax", causal_MxM)


def forward(arch: Architecture, weights: Weights, x_Nxd: jax.Array, y_N: jax.Array, xq_d: jax.Array) -> jax.Array:
    """Predictions `y_hat` read out after each layer, `[layers]`, for one task.

    `y_hat = -(query token's label slot)`. A weight stack of length 1 is applied at every
    layer (weight tying); the last layer updates only the query token, the only one read out.
    Classic tokens pass through `copy_layer` first (it has no readout of its own).
    """
    if arch.input_mlp:
        x_Nxd, xq_d = embed_inputs(weights, x_Nxd), embed_inputs(weights, xq_d)
    ctx, query = tokens.build(arch.layout, x_Nxd, y_N, xq_d)
    if arch.layout.kind == "classic":
        seq = copy_layer(weights, jnp.concatenate([ctx, query[None]]))
        ctx, query = seq[:-1], seq[-1]
    n_weights = weights["w_kq"].shape[0]
    readouts = []
    for layer in range(arch.layers):
        i = layer if n_weights > 1 else 0
        last = layer == arch.layers - 1
        if arch.layernorm:
            norm = lambda z: _layer_norm(z, weights["ln_attn_scale"][i], weights["ln_attn_bias"][i])  # noqa: E731
            h_ctx, h_query = norm(ctx), norm(query)
        else:
            h_ctx, h_query = ctx, query
        attn_in = h_query[None] if last else jnp.concatenate([h_ctx, h_query[None]])
        update = attend(attn_in, h_ctx, weights["w_kq"][i], weights["w_pv"][i], arch.attention)
        query = query + update[-1]
        if not last:
            ctx = ctx + update[:-1]
        if arch.mlp:
            mlp_weights = [weights[k][i] for k in ("mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2")]
            if arch.layernorm:
                norm = lambda z: _layer_norm(z, weights["ln_mlp_scale"][i], weights["ln_mlp_bias"][i])  # noqa: E731
            else:
                norm = lambda z: z  # noqa: E731
            query = query + _mlp(norm(query), *mlp_weights)
            if not last:
                ctx = ctx + _mlp(norm(ctx), *mlp_weights)
        if arch.clip_activations is not None:
            query = jnp.clip(query, -arch.clip_activations, arch.clip_activations)
            ctx = jnp.clip(ctx, -arch.clip_activations, arch.clip_activations)
        readouts.append(-query[arch.layout.label])
    return jnp.stack(readouts)


def predict_batch(arch: Architecture, weights: Weights, x, y, xq) -> jax.Array:
    """`forward` over a batch of tasks: `[B, layers]`."""
    return jax.vmap(forward, in_axes=(None, None, 0, 0, 0))(arch, weights, x, y, xq)


class Transformer(nnx.Module):
    """Trainable factors `W_Q, W_K, W_V, W_P` per layer and head (plus LayerNorm / MLPs).

    Weights are stacked over layers (`[L, H, D, D]`); a recurrent model keeps one stack entry
    and applies it `layers` times. Initialisation: variance scaling (fan-in, truncated normal)
    with scale `init_scale`, as in the paper's code. `layout` fixes the token width and whether a
    causal copy layer (factors `copy_q, copy_k, copy_v, copy_p`, `[H, D, D]`) comes first.
    """

    def __init__(self, model_cfg, input_dim: int, init_scale: float, rngs: nnx.Rngs,
                 layout: tokens.Layout = tokens.Layout()):
        self.arch = Architecture.from_config(model_cfg, layout)
        n = 1 if model_cfg.recurrent else int(model_cfg.layers)
        heads = int(model_cfg.heads)
        features = int(model_cfg.input_mlp_features) if model_cfg.input_mlp else input_dim
        dim = layout.dim(features)
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
        if layout.kind == "classic":
            self.copy_q = nnx.Param(init(rngs.params(), (1, heads, dim, dim))[0])
            self.copy_k = nnx.Param(init(rngs.params(), (1, heads, dim, dim))[0])
            self.copy_v = nnx.Param(init(rngs.params(), (1, heads, dim, dim))[0])
            self.copy_p = nnx.Param(init_p(rngs.params(), (1, heads, dim, dim))[0])
        dense = jax.nn.initializers.variance_scaling(init_scale, "fan_in", "truncated_normal")
        if model_cfg.layernorm:
            self.ln_attn_scale = nnx.Param(jnp.ones((n, dim)))
            self.ln_attn_bias = nnx.Param(jnp.zeros((n, dim)))
            if model_cfg.mlp:
                self.ln_mlp_scale = nnx.Param(jnp.ones((n, dim)))
                self.ln_mlp_bias = nnx.Param(jnp.zeros((n, dim)))
        if model_cfg.mlp:
            width = int(model_cfg.mlp_width)
            self.mlp_w1 = nnx.Param(jax.vmap(lambda k: dense(k, (dim, width)))(jax.random.split(rngs.params(), n)))
            self.mlp_b1 = nnx.Param(jnp.zeros((n, width)))
            self.mlp_w2 = nnx.Param(jax.vmap(lambda k: dense(k, (width, dim)))(jax.random.split(rngs.params(), n)))
            self.mlp_b2 = nnx.Param(jnp.zeros((n, dim)))
        if model_cfg.input_mlp:
            width = int(model_cfg.input_mlp_width)
            he = jax.nn.initializers.he_normal()
            self.embed_w1 = nnx.Param(he(rngs.params(), (input_dim, width)))
            self.embed_b1 = nnx.Param(jnp.zeros((width,)))
            self.embed_w2 = nnx.Param(he(rngs.params(), (width, features)))
            self.embed_b2 = nnx.Param(jnp.zeros((features,)))

    def weights(self) -> Weights:
        """Attention as products per layer and head, plus any LayerNorm / MLP parameters."""
        out = {
            "w_kq": jnp.einsum("lhkd,lhke->lhde", self.w_k[...], self.w_q[...]),
            "w_pv": jnp.einsum("lhdk,lhke->lhde", self.w_p[...], self.w_v[...]),
        }
        if self.arch.layout.kind == "classic":
            out["copy_kq"] = jnp.einsum("hkd,hke->hde", self.copy_k[...], self.copy_q[...])
            out["copy_pv"] = jnp.einsum("hdk,hke->hde", self.copy_p[...], self.copy_v[...])
        for name, value in vars(self).items():
            if isinstance(value, nnx.Param) and name.split("_")[0] in ("ln", "mlp", "embed"):
                out[name] = value[...]
        return out

    def __call__(self, x_Nxd: jax.Array, y_N: jax.Array, xq_d: jax.Array) -> jax.Array:
        return forward(self.arch, self.weights(), x_Nxd, y_N, xq_d)


def init_params(model_cfg, input_dim: int, init_scale: float, key: jax.Array,
                layout: tokens.Layout = tokens.Layout()) -> nnx.State:
    """Parameters of a fresh `Transformer` (a pytree; `jax.vmap` it over seed keys)."""
    return nnx.split(Transformer(model_cfg, input_dim, init_scale, nnx.Rngs(params=key), layout))[1]


def graphdef(model_cfg, input_dim: int, init_scale: float, layout: tokens.Layout = tokens.Layout()) -> nnx.GraphDef:
    """The static structure that `nnx.merge` combines with parameters from `init_params`."""
    return nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, input_dim, init_scale, nnx.Rngs(0), layout)))

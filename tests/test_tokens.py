"""Regression token layouts (docs/science.md section 2) and the classic-token forward pass with
its copy layer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_gd import analyses, models, references, tasks
from icl_gd.tasks.regression import classic

D, N = 3, 4
CLASSIC = tasks.linear.LinearRegression(dim=D, n_context=N, tokens="classic")


@pytest.fixture(scope="module")
def task():
    t = tasks.sample_linear(jax.random.key(0), 8, dim=D, n_context=N)
    return jax.tree_util.tree_map(lambda a: a[0], t), t


def test_classic_tokens_interleave_inputs_and_padded_labels(task):
    t, _ = task
    seq = classic(t.x, t.y, t.xq)
    ctx, query = seq[:-1], seq[-1]
    assert ctx.shape == (2 * N, D + 1)
    np.testing.assert_array_equal(ctx[0::2, :D], t.x)
    np.testing.assert_array_equal(ctx[0::2, D], 0.0)
    np.testing.assert_array_equal(ctx[1::2, :D], 0.0)
    np.testing.assert_array_equal(ctx[1::2, D], t.y)
    np.testing.assert_array_equal(query, jnp.concatenate([t.xq, jnp.zeros(1)]))
    layout = CLASSIC.layout
    assert layout.length == 2 * N + 1 and layout.copy_layer and layout.scored == (2 * N,)
    assert layout.input_tokens == tuple(range(0, 2 * N + 1, 2))  # x tokens and the query: an input MLP embeds them


@pytest.mark.parametrize("kind, length", [("constructed", N + 1), ("classic", 2 * N + 1)])
def test_positions_are_one_hot_and_the_label_slot_is_read_out(task, kind, length):
    t, _ = task
    regression = tasks.linear.LinearRegression(dim=D, n_context=N, tokens=kind)
    arch = models.Architecture(regression.layout, positional=True)
    assert arch.width(D) == D + 1 + length
    plain = regression.tokenize(t.x, t.y, t.xq)
    seq = models.embed(arch, models.Weights(models.Layers(models.Attention(None, None))), plain)
    np.testing.assert_array_equal(seq[:, D + 1 :], jnp.eye(length))
    np.testing.assert_array_equal(seq[:, : D + 1], plain)
    assert arch.readout(models.Weights(models.Layers(models.Attention(None, None)))) == D  # the label slot


def test_sinusoidal_positions_of_their_own_size_are_appended(task):
    """`model.positional_dim`: sinusoidal encodings of that size in place of one-hot positions (the
    paper's classic-token setup, docs/science.md section 9)."""
    t, _ = task
    arch = models.Architecture(CLASSIC.layout, positional=True, positional_dim=6)
    assert arch.width(D) == D + 1 + 6
    plain = CLASSIC.tokenize(t.x, t.y, t.xq)
    seq = models.embed(arch, models.Weights(models.Layers(models.Attention(None, None))), plain)
    np.testing.assert_array_equal(seq[:, : D + 1], plain)
    chex.assert_trees_all_close(seq[:, D + 1 :], models.sinusoidal(2 * N + 1, 6), atol=1e-7)
    np.testing.assert_array_equal(seq[0, D + 1 :], [0.0, 1.0] * 3)  # position 0: sin 0, cos 0


def copying_weights(eta: float, sharpness: float = 400.0) -> tuple[models.Architecture, models.Weights]:
    """A copy layer that moves each token's left neighbour's x slot into its own (a shift on the
    one-hot positions), followed by the GD construction padded to the wider tokens."""
    arch = models.Architecture(CLASSIC.layout, positional=True)
    width, length = arch.width(D), CLASSIC.layout.length
    pos = slice(D + 1, width)
    copy_kq = jnp.zeros((width, width)).at[pos, pos].set(sharpness * jnp.eye(length, k=1))
    copy_pv = jnp.zeros((width, width)).at[:D, :D].set(jnp.eye(D))
    gd = references.gd_weights(jnp.array([eta]), D, N).layers.attn
    pad = lambda w: jnp.zeros((*w.shape[:2], width, width)).at[..., : D + 1, : D + 1].set(w)
    weights = models.lsa(pad(gd.w_kq), pad(gd.w_pv))._replace(copy=models.Attention(copy_kq[None], copy_pv[None]))
    return arch, weights


def test_classic_tokens_with_a_copy_layer_and_the_gd_construction_do_one_gd_step(task):
    _, t = task
    arch, weights = copying_weights(eta=1.7)
    preds = models.predict_batch(arch, weights, CLASSIC.batch(t).tokens)[:, 0, 0, 0]
    expected = jax.vmap(references.gd_direct, in_axes=(0, 0, 0, None))(t.x, t.y, t.xq, jnp.array([1.7]))[:, 0]
    chex.assert_trees_all_close(preds, expected, atol=1e-6, rtol=1e-6)


def test_copy_layer_dependence_is_all_on_the_left_neighbour(task):
    t, _ = task
    arch, weights = copying_weights(eta=1.0)
    seq = models.embed(arch, weights, CLASSIC.tokenize(t.x, t.y, t.xq))
    norms = analyses.token_dependence(weights.copy, CLASSIC.layout.length, seq)
    # A saturated softmax on positions: each token's update is its neighbour's x slot, exactly.
    expected = jnp.sqrt(D) * jnp.eye(2 * N + 1, k=-1).at[0, 0].set(1.0)
    chex.assert_trees_all_close(norms, expected, atol=1e-5)
    shares = analyses.dependence_shares(norms)
    for kind in ("x", "y", "query"):
        chex.assert_trees_all_close(shares[kind], {"self": 0.0, "neighbour": 1.0, "rest": 0.0}, atol=1e-6)
    moved = models.copy_layer(weights.copy, seq) - seq
    r2, singular = analyses.copy_fit(moved[1:-1:2], t.x)
    assert float(r2) == pytest.approx(1.0, abs=1e-5)
    chex.assert_trees_all_close(singular, jnp.ones(D), atol=1e-4)  # the identity on the x slot


def test_constructed_forward_reads_the_label_slot_with_positions(task):
    """Positions appended to constructed tokens, zero-padded GD weights: still one GD step."""
    _, t = task
    constructed = tasks.linear.LinearRegression(dim=D, n_context=N, tokens="constructed")
    arch = models.Architecture(constructed.layout, layers=2, positional=True)
    width = arch.width(D)
    gd = references.gd_weights(jnp.array([2.0, 2.0]), D, N).layers.attn
    pad = lambda w: jnp.zeros((*w.shape[:2], width, width)).at[..., : D + 1, : D + 1].set(w)
    preds = models.predict_batch(arch, models.lsa(pad(gd.w_kq), pad(gd.w_pv)), constructed.batch(t).tokens)
    expected = jax.vmap(references.gd_direct, in_axes=(0, 0, 0, None))(t.x, t.y, t.xq, jnp.array([2.0, 2.0]))
    chex.assert_trees_all_close(preds[:, :, 0, 0], expected, atol=1e-6, rtol=1e-6)


def test_an_input_mlp_embeds_the_x_tokens_and_the_query_only(task):
    """Classic tokens through an input MLP: features in the x slot of the x tokens and of the query,
    zeros in the label tokens (as the inputs were before embedding)."""
    t, _ = task
    arch = models.Architecture(CLASSIC.layout, input_mlp=True)
    embed = models.MLP(jnp.ones((D, 5)), jnp.ones(5), jnp.ones((5, 2)), jnp.ones(2))
    seq = models.embed(
        arch, models.Weights(models.Layers(models.Attention(None, None)), embed=embed), CLASSIC.tokenize(t.x, t.y, t.xq)
    )
    assert seq.shape == (2 * N + 1, 2 + 1)
    inputs = jnp.concatenate([t.x, t.xq[None]])
    chex.assert_trees_all_close(seq[0::2, :2], models.mlp(inputs, embed), rtol=1e-6)
    np.testing.assert_array_equal(seq[1::2, :2], 0.0)
    np.testing.assert_array_equal(seq[1::2, 2], t.y)  # the label slot, after the features
    assert arch.readout(models.Weights(models.Layers(models.Attention(None, None)), embed=embed)) == 2

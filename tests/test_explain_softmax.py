"""Calibration of `explain`'s softmax families (issue 10 item 2; Cheng, Chen & Sra 2023): softmax
attention layers built with a known kernel `A` and readout `r` are ranked first by their own family,
with `A` and `r` recovered."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from icl_gd import explain, models, tasks

DIM, N, TASKS, ITERS = 4, 8, 256, 30  # test_explain's shapes, so that compiled fits are shared
CLEAR = 10.0  # BIC difference read as very strong evidence (Kass & Raftery 1995)
TASK = tasks.linear.LinearRegression(dim=DIM, n_context=N, tokens="constructed")
ARCH = models.Architecture(TASK.layout, layers=1, attention="softmax")


def softmax_layer(kernels_HxDxD, readouts_H) -> models.Weights:
    """One softmax-attention layer whose head `h` reads out `s_h r_h sum_i softmax_i(x_i^T A_h x_q) y_i`
    (`s = (+1, -1)`): `W_KQ`'s x-block is `A_h sqrt(D)` (the scores are scaled by `1/sqrt(D)`, `D`
    the key size) and `W_PV`'s label entry `-s_h r_h` (the readout is minus the query's label slot)."""
    kernels, readouts = jnp.asarray(kernels_HxDxD), jnp.asarray(readouts_H)
    heads, d1 = len(readouts), DIM + 1
    signs = jnp.asarray((1.0, -1.0)[:heads])
    w_kq = jnp.zeros((1, heads, d1, d1)).at[0, :, :DIM, :DIM].set(kernels * math.sqrt(d1))
    w_pv = jnp.zeros((1, heads, d1, d1)).at[0, :, DIM, DIM].set(-signs * readouts)
    return models.lsa(w_kq, w_pv)


def _model(weights, x, y, xq):
    return models.regression_readout(ARCH, weights, TASK, x, y, xq)


def _explain(*layers):
    params = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)
    return explain.explain(_model, params, TASK, jax.random.key(7), steps=1, n_tasks=TASKS, iters=ITERS)


def _ranked_first(report, family, seeds=1):
    rank = report["ranking"]
    assert rank["winner"] == family and rank["wins"] == seeds and report["explains"], report["verdict"]
    assert report["winner"] == family and rank["margin"]["mean"] > CLEAR
    assert report["families"][family]["heldout"]["r2"]["mean"] > 1 - 1e-6
    assert min(rank["delta"][name]["mean"] for name in ("gd", "precond_full", "ridge")) > 10 * CLEAR


def test_parameter_counts():
    counts = {name: explain.Family(name, 3, DIM).n_params for name in explain.LINEAR_IN}
    d2 = DIM * DIM
    assert counts == {
        "softmax_scalar": 2,
        "softmax_diag": DIM + 1,
        "softmax_full": d2 + 1,
        "softmax_2heads_scalar": 4,
        "softmax_2heads_full": 2 * d2 + 2,
    }
    assert explain.Family("softmax_2heads_full", 3, DIM).linear_in == (d2, 2 * d2 + 1)  # the readouts r_h


def test_scalar_kernel_ranked_softmax_scalar_with_a_r_recovered():
    a_r = [(6.0, 2.0), (-3.0, 1.5)]
    report = _explain(*[softmax_layer([a * np.eye(DIM)], [r]) for a, r in a_r])
    _ranked_first(report, "softmax_scalar", seeds=2)
    # Both fit exactly; the two-head family pays for its two extra parameters, and only that.
    assert report["ranking"]["runner_up"] == "softmax_2heads_scalar"
    assert report["ranking"]["margin"]["ci95"][0] > CLEAR
    np.testing.assert_allclose(report["families"]["softmax_scalar"]["params"], a_r, rtol=1e-3)


def test_diagonal_and_full_kernels_ranked_their_family_with_a_recovered():
    diags, readouts = np.array([[8.0, -4.0, 2.0, 6.0], [-5.0, 3.0, 1.0, 7.0]]), [1.5, -1.0]
    report = _explain(*[softmax_layer([np.diag(a)], [r]) for a, r in zip(diags, readouts, strict=True)])
    _ranked_first(report, "softmax_diag", seeds=2)
    fitted = report["families"]["softmax_diag"]["params"]
    np.testing.assert_allclose(fitted, np.column_stack([diags, readouts]), rtol=1e-3)

    rng = np.random.default_rng(1)
    fulls = 4.0 * np.eye(DIM) + 3.0 * rng.normal(size=(2, DIM, DIM))  # not symmetric
    report = _explain(*[softmax_layer([a], [-2.0]) for a in fulls])
    _ranked_first(report, "softmax_full", seeds=2)
    expected = np.column_stack([fulls.reshape(2, -1), [-2.0, -2.0]])
    np.testing.assert_allclose(report["families"]["softmax_full"]["params"], expected, atol=2e-3)


def _canonical(theta_2heads, size):
    """Two heads `(A_1, r_1, A_2, r_2)` with the larger `A[0]` first: the predictor is unchanged by
    `(A_1, r_1, A_2, r_2) -> (A_2, -r_2, A_1, -r_1)`."""
    th = np.asarray(theta_2heads)
    first, second = th[: size + 1], th[size + 1 :]
    if first[0] >= second[0]:
        return th
    return np.concatenate([second[:-1], -second[-1:], first[:-1], -first[-1:]])


def test_two_head_constructions_ranked_two_heads_with_parameters_recovered():
    heads = [(6.0, 2.0, -6.0, 2.0), (10.0, 1.0, 2.0, -3.0)]  # (a_1, r_1, a_2, r_2): r_1 S(a_1) - r_2 S(a_2)
    layers = [softmax_layer([a1 * np.eye(DIM), a2 * np.eye(DIM)], [r1, r2]) for a1, r1, a2, r2 in heads]
    report = _explain(*layers)
    _ranked_first(report, "softmax_2heads_scalar", seeds=2)
    for fitted, true in zip(report["families"]["softmax_2heads_scalar"]["params"], heads, strict=True):
        np.testing.assert_allclose(_canonical(fitted, 1), true, rtol=1e-3)

    rng = np.random.default_rng(2)
    kernels = np.stack([6.0 * np.eye(DIM), -3.0 * np.eye(DIM)]) + 2.0 * rng.normal(size=(2, 2, DIM, DIM))
    report = _explain(*[softmax_layer(k, [2.0, 1.5]) for k in kernels])
    _ranked_first(report, "softmax_2heads_full", seeds=2)
    for fitted, k in zip(report["families"]["softmax_2heads_full"]["params"], kernels, strict=True):
        true = np.concatenate([k[0].ravel(), [2.0], k[1].ravel(), [1.5]])
        np.testing.assert_allclose(_canonical(fitted, DIM * DIM), true, atol=5e-3)

"""Benchmark the mesa-layer's implementations (icl_gd.mesa, docs/science.md section 3).

For each sequence length `T` (key and value size `K = V = 20` by default) and each version, prints
the compiled temporary memory of the gradient program (XLA's `memory_analysis`, for one sequence
and one head, and for the whole batch) and the forward + backward time per call on a batch of 64
sequences x 4 heads (vmapped, one `lam` per head): the median of a few runs after a warm-up.
Versions: `scan` (custom VJP, the recursion run backwards), `scan_autodiff` (autodiff of the same
scan, which stores every inverse), `solve` (batched solves, `custom_linear_solve` backward) and
`solve_autodiff` (the same solves differentiated through the elimination, for comparison).
Usage: `python scripts/bench_mesa.py [--lengths 50 200 800] [--dim 20] [--batch 64] [--heads 4]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from icl_gd import mesa
from icl_gd.linalg import spd_solve


def solve_autodiff(keys_TxK: jax.Array, values_TxV: jax.Array, queries_TxK: jax.Array, lam: jax.Array) -> jax.Array:
    """`mesa.mesa_solve` without `custom_linear_solve`: autodiff goes through the `K` elimination steps."""
    eye = jnp.eye(keys_TxK.shape[1], dtype=keys_TxK.dtype)
    gram_TxKxK = jnp.cumsum(jnp.einsum("ti,tj->tij", keys_TxK, keys_TxK), axis=0) + eye / lam
    s_TxVxK = jnp.cumsum(jnp.einsum("tv,tk->tvk", values_TxV, keys_TxK), axis=0)
    return jnp.einsum("tvk,tk->tv", s_TxVxK, jax.vmap(spd_solve)(gram_TxKxK, queries_TxK))


VERSIONS: dict[str, Callable[..., jax.Array]] = {
    "scan": mesa.mesa_scan,
    "scan_autodiff": mesa.mesa_scan_autodiff,
    "solve": mesa.mesa_solve,
    "solve_autodiff": solve_autodiff,
}


def gradient_program(fn: Callable[..., jax.Array], batched: bool) -> Callable[..., tuple[jax.Array, ...]]:
    """The gradient of a mean squared output with respect to keys, values, queries and `lam`; with
    `batched`, over `[B, H, T, *]` inputs and one `lam` per head."""
    if batched:
        fn = jax.vmap(jax.vmap(fn), in_axes=(0, 0, 0, None))
    return jax.jit(jax.grad(lambda k, v, q, lam: jnp.mean(fn(k, v, q, lam) ** 2), argnums=(0, 1, 2, 3)))


def temp_mib(program: Callable[..., tuple[jax.Array, ...]], args: list[jax.Array]) -> float:
    analysis = jax.jit(program).lower(*args).compile().memory_analysis()
    return float("nan") if analysis is None else analysis.temp_size_in_bytes / 2**20


def bench(name: str, length: int, dim: int, batch: int, heads: int, repeats: int) -> dict:
    keys = jax.random.split(jax.random.key(0), 3)
    k, v, q = (jax.random.normal(key, (batch, heads, length, dim)) / jnp.sqrt(dim) for key in keys)
    lam = jnp.linspace(0.5, 2.0, heads)
    one = [k[0, 0], v[0, 0], q[0, 0], lam[0]]
    program = gradient_program(VERSIONS[name], batched=True)
    start = time.perf_counter()
    jax.block_until_ready(program(k, v, q, lam))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(program(k, v, q, lam))
        times.append(time.perf_counter() - start)
    return {
        "T": length,
        "version": name,
        "temp_MiB_1seq": temp_mib(gradient_program(VERSIONS[name], batched=False), one),
        "temp_MiB_batch": temp_mib(program, [k, v, q, lam]),
        "compile_s": compile_s,
        "ms_fwd_bwd": 1e3 * statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 800])
    parser.add_argument("--dim", type=int, default=20, help="key and value size K = V")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS), choices=list(VERSIONS))
    args = parser.parse_args()
    device = jax.devices()[0]
    print(
        f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}, K = V = {args.dim}, "
        f"batch {args.batch} x {args.heads} heads, float32"
    )
    header = ("T", "version", "temp_MiB_1seq", "temp_MiB_batch", "compile_s", "ms_fwd_bwd")
    print(" | ".join(header))
    for length in args.lengths:
        for name in args.versions:
            row = bench(name, length, args.dim, args.batch, args.heads, args.repeats)
            print(" | ".join(f"{row[h]:.3g}" if isinstance(row[h], float) else str(row[h]) for h in header), flush=True)


if __name__ == "__main__":
    main()

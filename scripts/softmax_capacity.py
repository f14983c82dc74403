"""How well can one (or two) softmax smoothers do at all? The capacity side of "why does one softmax
head stall" (README, "Beyond linearity").

Fits each softmax family of `icl_gd.explain` (`y_hat = r sum_i softmax_i(x_i^T A x_q) y_i`, one head
or the difference of two) and one GD step to the *labels* of fresh tasks of the default task (not
to a model), by the same Levenberg-Marquardt fit `explain` uses, and prints each one's loss on
held-out tasks: the best a layer computing that family can reach, whatever its training does.
Usage: `python scripts/softmax_capacity.py [--tasks 8192] [--iters 100] [overrides ...]`, e.g.
`task.n_context=20`.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from rich.console import Console
from rich.table import Table

from icl_gd import config, references, tasks
from icl_gd import explain as explain_lib

FAMILIES = ("gd", "softmax_scalar", "softmax_diag", "softmax_full", "softmax_2heads_scalar", "softmax_2heads_full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8192, help="tasks to fit on (as many held out)")
    parser.add_argument("--iters", type=int, default=100, help="Levenberg-Marquardt iterations")
    parser.add_argument("overrides", nargs="*", help="config overrides of the task, e.g. task.n_context=20")
    args = parser.parse_args()
    cfg = config.load_config(args.overrides)
    task = tasks.from_config(cfg.task)
    fit_set, held = (task.draw(jax.random.fold_in(jax.random.key(cfg.eval.seed), i), args.tasks) for i in (7, 8))
    spectrum = jax.jit(jax.vmap(references.ridge_spectrum))
    fit_spec, held_spec = spectrum(fit_set.x, fit_set.y), spectrum(held.x, held.y)
    eta0 = 1.0 / jnp.mean(fit_set.x**2)
    table = Table(title=f"families fitted to the labels of {args.tasks} tasks, loss on {args.tasks} held-out tasks")
    for column in ("family", "parameters", "held-out loss"):
        table.add_column(column)
    zero = float(0.5 * jnp.mean(held.yq**2))
    for name in FAMILIES:
        family = explain_lib.Family(name, 1, task.dim)

        @jax.jit
        def loss(fit_set, fit_spec, held, held_spec, family=family):
            theta = explain_lib.fit(family, fit_set, fit_spec, fit_set.yq, eta0, args.iters)
            preds = jax.vmap(family.predict, in_axes=(None, 0, 0, 0, 0))(theta, held.x, held.y, held.xq, held_spec)
            return references.loss(preds[:, -1], held.yq)

        table.add_row(name, str(family.n_params), f"{float(loss(fit_set, fit_spec, held, held_spec)):.4f}")
    table.add_row("predicting 0", "0", f"{zero:.4f}")
    Console().print(table)


if __name__ == "__main__":
    main()

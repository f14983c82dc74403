"""References as a registry: a reference algorithm is a pair of pure functions, `fit` (its few
parameters, from data of its own) and `predict` (its readouts on one sequence, one per step),
registered for the task kinds it applies to. A task kind lists the names it uses
(`TaskKind.references`, primary first); the metric columns, `summary.json` keys, tables and
plots follow from that list."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax

from icl_gd.tasks import Batch, TaskKind


class FitContext(NamedTuple):
    """What a reference's `fit` may use: the task, the whole config (`eval.*`, `model.layers`,
    `model.recurrent`), the evaluation key (fold in an index of its own for data of its own), the
    evaluation batch, and the parameters of the references fitted before it."""

    task: Any
    cfg: Any
    key: jax.Array
    eval_batch: Batch
    fitted: dict[str, Any]

    @property
    def steps(self) -> int:
        """Readouts the model has (one per layer): a stepwise reference runs as many steps."""
        return int(self.cfg.model.layers)


@dataclass(frozen=True)
class Reference:
    """`fit(ctx) -> params`; `predict(task, params, queries_Pxd, context) -> [K, P, O]` for one
    sequence (`context`: the task's arrays for it); `describe(params) -> dict` (JSON-ready, into
    `summary.json`); `stepwise`: one readout per step, compared with the model layer by layer."""

    name: str
    label: str
    fit: Callable[[FitContext], Any]
    predict: Callable[..., jax.Array]
    describe: Callable[[Any], dict] = field(default=lambda params: {})
    stepwise: bool = False


REGISTRY: dict[str, dict[str, Reference]] = {}  # task kind -> reference name -> Reference
ANALYTIC: dict[str, Callable[[Any], dict]] = {}  # task kind -> closed-form entries of summary.json


def register(reference: Reference, kinds: tuple[str, ...]) -> Reference:
    for kind in kinds:
        REGISTRY.setdefault(kind, {})[reference.name] = reference
    return reference


def for_task(task: TaskKind) -> list[Reference]:
    """The references a task kind declares, primary first."""
    return [REGISTRY[task.name][name] for name in task.references]


def analytic(task: TaskKind) -> dict:
    """Closed-form entries for `summary.json`'s references (e.g. `gd_closed_form`), if the kind has any."""
    return ANALYTIC.get(task.name, lambda task: {})(task)

"""What every task kind produces: a `Batch` of token sequences with targets at the scored
positions, and a static `Layout` that tells the model how to read them.

A task kind is a frozen dataclass (hashable, so it can be a static argument of `jax.jit`)
registered under its config name; `from_config(task_cfg)` builds the one a config asks for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar

import jax
import numpy as np


class Batch(NamedTuple):
    """`tokens_BxTxD`: what the model reads; `queries_BxPxd`: the query input at each scored
    position (also written in the tokens, at `Layout.query_slot`); `targets_BxPxO`: what the
    model should predict there; `context`: the task's own arrays, all a reference needs."""

    tokens: jax.Array
    queries: jax.Array
    targets: jax.Array
    context: Any


@dataclass(frozen=True)
class Mask:
    """Which tokens a query token attends to: the first `n_keys` tokens (regression: the context,
    docs/science.md section 3), or, when `causal`, every token up to and including its own."""

    causal: bool
    n_keys: int = 0

    def visible(self, n_tokens: int, query_positions: tuple[int, ...]) -> np.ndarray:
        """`[n_tokens, M]` booleans: key `i` is visible to the query at `query_positions[m]`."""
        keys = np.arange(n_tokens)[:, None]
        if self.causal:
            return keys <= np.asarray(query_positions)[None, :]
        return np.broadcast_to(keys < self.n_keys, (n_tokens, len(query_positions)))


@dataclass(frozen=True)
class Layout:
    """Static description of a task's token sequences.

    A token has `width` coordinates; the model's prediction at a scored position is
    `readout_sign * token[readout : readout + output_dim]` after the last layer. Sensitivities
    are taken with respect to `token[query_slot : query_slot + input_dim]` of the scored tokens
    (where the task put `Batch.queries`). `input_tokens` lists the tokens whose input slot an
    input MLP embeds (None: the task has no such slot); `copy_layer` asks for a causal softmax
    layer first (classic tokens must copy each `x_i` next to its `y_i`).
    """

    length: int
    width: int
    input_dim: int
    query_slot: int
    readout: int
    output_dim: int
    readout_sign: float
    scored: tuple[int, ...]
    mask: Mask
    input_tokens: tuple[int, ...] | None = None
    copy_layer: bool = False

    def place_queries(self, tokens_TxD: jax.Array, queries_Pxd: jax.Array) -> jax.Array:
        """`tokens` with the query inputs replaced by `queries` (a perturbation of them, for
        sensitivities)."""
        slot = slice(self.query_slot, self.query_slot + self.input_dim)
        return tokens_TxD.at[np.asarray(self.scored), slot].set(queries_Pxd)


class TaskKind(Protocol):
    """A task kind: a registered frozen dataclass built from its config node."""

    name: ClassVar[str]
    references: ClassVar[tuple[str, ...]]  # names in `icl_gd.references.REGISTRY`, primary first
    sensitivities: ClassVar[bool]  # whether model cos / model diff are tracked (docs/science.md section 5)
    prng: ClassVar[str]  # the generator its runs use unless `prng` is set: the faster one for its draws
    # whether the context is a state sequence whose last state `s_t` is the input of the prediction at
    # `t` (model cos by position, computed once at the end of a run: `metrics.last_input_sensitivities`)
    sequence_sensitivities: ClassVar[bool]

    @property
    def layout(self) -> Layout: ...

    def batch(self, context: Any) -> Batch:
        """The batch of given task arrays (`Batch.context`: regression tasks, state sequences)."""
        ...

    def sample(self, key: jax.Array, n: int) -> Batch: ...


REGISTRY: dict[str, Callable[[Any], TaskKind]] = {}
T = TypeVar("T")


def register(cls: T) -> T:
    """Register a task kind under its `name` (the value of `task.kind` and of the `task` group)."""
    REGISTRY[cls.name] = cls.from_config  # type: ignore[attr-defined]
    return cls


def from_config(task_cfg) -> TaskKind:
    """The task kind a config node describes."""
    return REGISTRY[str(task_cfg.kind)](task_cfg)


@functools.partial(jax.jit, static_argnums=(0, 2))
def sample(task: TaskKind, key: jax.Array, n: int) -> Batch:
    """`task.sample(key, n)` as one compiled program (evaluation and fit sets drawn outside a
    training step: eager sampling would dispatch, and on first use compile, every primitive alone)."""
    return task.sample(key, n)


@functools.partial(jax.jit, static_argnums=(0, 2))
def draw(task: Any, key: jax.Array, n: int) -> Any:
    """`task.draw(key, n)` of a regression task kind, as one compiled program (see `sample`)."""
    return task.draw(key, n)

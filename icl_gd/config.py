"""Typed configuration: dataclass schemas for Hydra, composition and validation.

Everything a user can set is a field here; `load_config` composes the YAML groups in
`icl_gd/conf` (also reachable as `conf/` at the repository root) with command-line
overrides and turns every mistake into one `ConfigError` line naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent / "conf"
GROUPS = ("task", "model", "train", "eval", "experiment")

X_DISTS = ("uniform", "gaussian", "laplace", "exponential")
TOKENS = ("constructed", "classic")
ATTENTIONS = ("linear", "softmax")
TASK_KINDS = ("linear", "sine")


@dataclass
class TaskConfig:
    """In-context regression tasks (SPEC section 1)."""

    kind: str = "linear"
    dim: int = 10
    n_context: int = 10
    x_dist: str = "uniform"
    x_scale: float = 0.5
    w_std: float = 1.0
    noise_std: float = 0.0
    distractors: int = 0
    tokens: str = "constructed"


@dataclass
class ModelConfig:
    """Transformer built from linear self-attention layers (SPEC section 3)."""

    layers: int = 1
    recurrent: bool = False
    heads: int = 1
    attention: str = "linear"
    init_scale: Optional[float] = None  # None: 0.002 / layers, as the paper's code
    layernorm: bool = False
    mlp: bool = False
    mlp_width: int = 64
    input_mlp: bool = False
    input_mlp_width: int = 64
    input_mlp_features: int = 10
    clip_activations: Optional[float] = None
    positional: bool = False


@dataclass
class TrainConfig:
    """Online training with AdamW and global-norm clipping (SPEC section 7)."""

    steps: int = 5000
    batch_size: int = 2048
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.98
    weight_decay: float = 0.0
    clip_norm: float = 1e-3
    seeds: int = 1
    seed: int = 0
    eval_every: int = 100
    progress: bool = True


@dataclass
class EvalConfig:
    """The fixed evaluation set and the reference fits."""

    n_tasks: int = 10_000
    seed: int = 1234
    line_search_tasks: int = 100_000
    gdpp_steps: int = 1000  # GD++ fit (references.fit_gdpp): Adam steps, from every start at once
    gdpp_batch: int = 512
    gdpp_lr: float = 0.05  # relative: steps of any size move by the same factor
    extrapolate_to: int = 50  # depth_extrapolation: iterations of a trained recurrent layer
    damping: float = 1.0  # depth_extrapolation: each iteration's update is scaled by this


@dataclass
class Config:
    name: str = "single_layer"
    out: Optional[str] = None
    analyses: list[str] = field(default_factory=list)  # run after training, see icl_gd.analyses
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


ConfigStore.instance().store(name="base_config", node=Config)

SCHEMAS = {"task": TaskConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


class ConfigError(ValueError):
    """A bad configuration, described in one line that names the field."""


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _check_override_keys(overrides: list[str]) -> None:
    """Reject unknown groups, options and fields with the allowed values listed."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(f"cannot parse overrides: {str(err).splitlines()[0]}") from None
    for override in parsed:
        key = override.key_or_group.lstrip("+~")
        if key.startswith("hydra"):
            continue
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in GROUPS:
            allowed = group_options(parts[0])
            values = override.sweep_string_iterator() if override.is_sweep_override() else [override.value()]
            for value in values:
                if str(value) not in allowed:
                    raise ConfigError(f"{parts[0]}: unknown value '{value}'; allowed: {', '.join(allowed)}")
            continue
        if len(parts) == 1:
            top = [f.name for f in dataclasses.fields(Config) if f.name not in SCHEMAS]
            if parts[0] not in top:
                raise ConfigError(f"{key}: unknown field; allowed: {', '.join(top + list(GROUPS))}")
            continue
        schema = SCHEMAS.get(parts[0])
        if schema is None:
            raise ConfigError(f"{key}: unknown field; allowed groups: {', '.join(SCHEMAS)}")
        names = [f.name for f in dataclasses.fields(schema)]
        if len(parts) != 2 or parts[1] not in names:
            raise ConfigError(f"{key}: unknown field; allowed: {', '.join(names)}")


def _compose(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(err)) from None
    finally:
        GlobalHydra.instance().clear()


def _one_line(err: BaseException) -> str:
    """Condense a Hydra/OmegaConf error into `field: problem`."""
    cause = err
    while cause.__cause__ is not None or cause.__context__ is not None:
        nxt = cause.__cause__ or cause.__context__
        if isinstance(nxt, OmegaConfBaseException):
            cause = nxt
            break
        cause = nxt
    full_key = getattr(cause, "full_key", None)
    message = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0]
    return f"{full_key}: {message}" if full_key else message


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}; allowed: {allowed}")


def validate(cfg: DictConfig) -> None:
    """Check value ranges; raise ConfigError naming the first bad field."""
    from icl_gd.analyses import REGISTRY

    for name in cfg.analyses:
        _require(name in REGISTRY, "analyses", f"a list of {', '.join(sorted(REGISTRY)) or '(none registered)'}", name)
    t, m, tr, ev = cfg.task, cfg.model, cfg.train, cfg.eval
    _require("sine" not in cfg.analyses or m.input_mlp, "analyses", "sine only with model.input_mlp=true", "sine")
    _require("ood" not in cfg.analyses or t.kind == "linear", "analyses", "ood only with task.kind=linear", "ood")
    _require("copy" not in cfg.analyses or t.tokens == "classic", "analyses", "copy only with task.tokens=classic", "copy")
    _require(t.kind in TASK_KINDS, "task.kind", " | ".join(TASK_KINDS), t.kind)
    _require(t.dim >= 1, "task.dim", "an integer >= 1", t.dim)
    _require(t.n_context >= 1, "task.n_context", "an integer >= 1", t.n_context)
    _require(t.x_dist in X_DISTS, "task.x_dist", " | ".join(X_DISTS), t.x_dist)
    _require(math.isfinite(t.x_scale) and t.x_scale > 0, "task.x_scale", "a number > 0", t.x_scale)
    _require(math.isfinite(t.w_std) and t.w_std > 0, "task.w_std", "a number > 0", t.w_std)
    _require(math.isfinite(t.noise_std) and t.noise_std >= 0, "task.noise_std", "a number >= 0", t.noise_std)
    _require(0 <= t.distractors <= t.n_context, "task.distractors", f"an integer in [0, task.n_context={t.n_context}]", t.distractors)
    _require(t.tokens in TOKENS, "task.tokens", " | ".join(TOKENS), t.tokens)
    _require(t.kind != "sine" or t.dim == 1, "task.dim", "1 for task.kind=sine", t.dim)
    _require(t.kind != "sine" or t.distractors == 0, "task.distractors", "0 for task.kind=sine", t.distractors)
    _require(m.layers >= 1, "model.layers", "an integer >= 1", m.layers)
    _require(m.heads >= 1, "model.heads", "an integer >= 1", m.heads)
    _require(m.attention in ATTENTIONS, "model.attention", " | ".join(ATTENTIONS), m.attention)
    _require(m.init_scale is None or m.init_scale > 0, "model.init_scale", "null (0.002 / layers) or a number > 0", m.init_scale)
    _require(m.mlp_width >= 1, "model.mlp_width", "an integer >= 1", m.mlp_width)
    _require(m.input_mlp_width >= 1, "model.input_mlp_width", "an integer >= 1", m.input_mlp_width)
    _require(m.input_mlp_features >= 1, "model.input_mlp_features", "an integer >= 1", m.input_mlp_features)
    _require(m.clip_activations is None or m.clip_activations > 0, "model.clip_activations", "null or a number > 0", m.clip_activations)
    _require(tr.steps >= 1, "train.steps", "an integer >= 1", tr.steps)
    _require(tr.batch_size >= 1, "train.batch_size", "an integer >= 1", tr.batch_size)
    _require(math.isfinite(tr.lr) and tr.lr > 0, "train.lr", "a number > 0", tr.lr)
    _require(0 <= tr.b1 < 1, "train.b1", "a number in [0, 1)", tr.b1)
    _require(0 <= tr.b2 < 1, "train.b2", "a number in [0, 1)", tr.b2)
    _require(tr.weight_decay >= 0, "train.weight_decay", "a number >= 0", tr.weight_decay)
    _require(tr.clip_norm > 0, "train.clip_norm", "a number > 0", tr.clip_norm)
    _require(tr.seeds >= 1, "train.seeds", "an integer >= 1", tr.seeds)
    _require(tr.seed >= 0, "train.seed", "an integer >= 0", tr.seed)
    _require(tr.eval_every >= 1, "train.eval_every", "an integer >= 1", tr.eval_every)
    _require(ev.n_tasks >= 2, "eval.n_tasks", "an integer >= 2", ev.n_tasks)
    _require(ev.line_search_tasks >= 2, "eval.line_search_tasks", "an integer >= 2", ev.line_search_tasks)
    _require(ev.gdpp_steps >= 0, "eval.gdpp_steps", "an integer >= 0", ev.gdpp_steps)
    _require(ev.gdpp_batch >= 1, "eval.gdpp_batch", "an integer >= 1", ev.gdpp_batch)
    _require(ev.gdpp_lr > 0, "eval.gdpp_lr", "a number > 0", ev.gdpp_lr)
    _require(ev.extrapolate_to >= 1, "eval.extrapolate_to", "an integer >= 1", ev.extrapolate_to)
    _require(0 < ev.damping <= 1, "eval.damping", "a number in (0, 1]", ev.damping)
    if "depth_extrapolation" in cfg.analyses:
        _require(bool(m.recurrent), "model.recurrent", "true for the depth_extrapolation analysis", m.recurrent)


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose `conf/config.yaml` with overrides, then validate; raises ConfigError."""
    overrides = list(overrides)
    _check_override_keys(overrides)
    cfg = _compose(overrides)
    validate(cfg)
    return cfg


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The override lists of every job a Hydra multirun over `overrides` would launch."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    _check_override_keys(overrides)
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def init_scale(model: DictConfig) -> float:
    return model.init_scale if model.init_scale is not None else 0.002 / model.layers

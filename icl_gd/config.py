"""Typed configuration: dataclass schemas for Hydra, composition and validation.

Everything a user can set is a field here; `load_config` composes the YAML groups in
`icl_gd/conf` (also reachable as `conf/` at the repository root) with command-line
overrides and turns every mistake into one `ConfigError` line naming the field. The task
kind is a config group (`task=linear`, `task=sine`, `task=lds`), each option with a schema of
its own (`TASK_SCHEMAS`); choices with a fixed set of values are enums. This module imports
nothing else of the package (an import contract): checks that need the registries of tasks
or analyses live with them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent / "conf"
GROUPS = ("task", "model", "train", "eval", "experiment")


class XDist(enum.Enum):
    """Law of one input coordinate (docs/science.md section 1)."""

    uniform = enum.auto()
    gaussian = enum.auto()
    laplace = enum.auto()
    exponential = enum.auto()


class Tokens(enum.Enum):
    """Regression token layouts (docs/science.md section 2)."""

    constructed = enum.auto()
    classic = enum.auto()


class Attention(enum.Enum):
    """Attention kinds; each is one entry of `icl_gd.attention.REGISTRY`."""

    linear = enum.auto()
    softmax = enum.auto()
    mesa = enum.auto()


class MesaImpl(enum.Enum):
    """The mesa-layer's causal ridge solves (docs/science.md section 3): a Sherman-Morrison
    recursion under `lax.scan` with a backward pass linear in memory, or a batched solve per position."""

    scan = enum.auto()
    solve = enum.auto()


class AmplitudePhase(enum.Enum):
    """Sine tasks' amplitude and phase (docs/science.md section 1): drawn independently, or
    coupled as in the paper's code (`a = 0.1 + 0.4 phi / pi`, one parameter per task)."""

    independent = enum.auto()
    coupled = enum.auto()


class InputEmbedding(enum.Enum):
    """The input MLP's form (docs/science.md section 9): `mlp` is `gelu(x W1 + b1) W2 + b2` to
    `model.input_mlp_features`; `residual` is the paper's, a linear map without bias to
    `model.input_mlp_features`, then `e + MLP(e)` with a hidden layer of `model.input_mlp_width`."""

    mlp = enum.auto()
    residual = enum.auto()


class SequenceTokens(enum.Enum):
    """Sequence-task tokens (docs/science.md section 8): `(0, s_t, s_t, s_{t-1})`, or the state alone."""

    constructed = enum.auto()
    raw = enum.auto()


class Schedule(enum.Enum):
    """Learning-rate schedules: constant (the first paper's code), or linear warm-up from 0 then
    cosine decay to `train.end_lr` at `train.steps` (the follow-up's code)."""

    constant = enum.auto()
    warmup_cosine = enum.auto()


class Logger(enum.Enum):
    """Where each evaluation goes besides `metrics.csv` (always written): nowhere else, or
    TensorBoard event files in the run directory; each is one entry of `icl_gd.loggers.REGISTRY`."""

    csv = enum.auto()
    tensorboard = enum.auto()


class Prng(enum.Enum):
    """JAX's random number generator for every draw of a run (data, initialisation, evaluation set,
    reference fits). `rbg` (XLA's Philox bit generator behind `threefry` keys) draws the uniform
    inputs of regression tasks 1.3-1.6x faster than `threefry` on CPU, `threefry` the Gaussian draws of
    `task=lds` 1.1-1.4x faster than `rbg` (README, Performance): by default each task kind uses its
    faster one; `unsafe_rbg` also derives keys with Philox."""

    threefry2x32 = enum.auto()
    rbg = enum.auto()
    unsafe_rbg = enum.auto()


class LdsVariant(enum.Enum):
    """Linear dynamical systems (docs/science.md section 8): a random orthogonal transition per
    sequence (`full`), observed through a random projection of a larger hidden state
    (`partial`), a contracting transition (`contracting`), or one transition for all (`fixed`)."""

    full = enum.auto()
    partial = enum.auto()
    contracting = enum.auto()
    fixed = enum.auto()


@dataclass
class LinearTaskConfig:
    """In-context linear regression (docs/science.md section 1)."""

    kind: str = "linear"
    dim: int = 10
    n_context: int = 10
    x_dist: XDist = XDist.uniform
    x_scale: float = 0.5
    w_std: float = 1.0
    noise_std: float = 0.0
    distractors: int = 0
    tokens: Tokens = Tokens.constructed
    # Non-isotropic inputs (docs/science.md section 10): the d eigenvalues of the input covariance
    # (null: isotropic, the law's own variance). Set, inputs are `R diag(sqrt(x_cov)) z` with `z` the
    # law `x_dist` standardised to unit variance, so `task.x_scale` is not used.
    x_cov: list[float] | None = None
    x_rotation: int | None = None  # null: the eigenbasis is the standard one; else the seed of a random rotation R


@dataclass
class SineTaskConfig:
    """Non-linear 1-d regression `y = a sin(x + phi)` (docs/science.md section 1)."""

    kind: str = "sine"
    dim: int = 1  # fixed: one input coordinate
    n_context: int = 10
    noise_std: float = 0.0
    tokens: Tokens = Tokens.constructed
    amplitude_phase: AmplitudePhase = AmplitudePhase.independent


@dataclass
class LdsTaskConfig:
    """Autoregressive prediction of linear dynamical systems (docs/science.md section 8)."""

    kind: str = "lds"
    state_dim: int = 10
    length: int = 50
    noise_std: float = 0.01
    clip: float = 10.0
    variant: LdsVariant = LdsVariant.full
    hidden_dim: int = 15  # `partial` only: size of the hidden state seen through a projection
    obs_noise_std: float = 0.01  # `partial` only
    contracting_max: float = 0.9  # `contracting` only: eigenvalues drawn in [0.3, max], one equal to max
    transition_seed: int = 0  # `fixed` only: the one transition shared by every sequence
    ridge_lambda: float = 1e-3  # the online ridge reference's penalty
    tokens: SequenceTokens = SequenceTokens.constructed


TASK_SCHEMAS: dict[str, type] = {"linear": LinearTaskConfig, "sine": SineTaskConfig, "lds": LdsTaskConfig}


@dataclass
class ModelConfig:
    """Transformer built from self-attention layers (docs/science.md section 3)."""

    layers: int = 1
    recurrent: bool = False
    heads: int = 1
    attention: Attention = Attention.linear
    init_scale: float | None = None  # None: 0.002 / layers, as the paper's code
    layernorm: bool = False
    mlp: bool = False
    mlp_width: int = 64
    input_mlp: bool = False
    input_mlp_width: int = 64
    input_mlp_features: int = 10
    input_embedding: InputEmbedding = InputEmbedding.mlp
    clip_activations: float | None = None
    positional: bool = False  # positions appended to the tokens: one-hot, or sinusoidal of positional_dim
    positional_dim: int | None = None  # null: one-hot (width = sequence length); else sinusoidal of this size
    key_size: int | None = None  # None: the model's width
    embed_dim: int | None = None  # None: the tokens as they are; else input / output projections of this width
    first_layer: Attention | None = None  # a first layer of its own, of this kind, keys and queries seeing positions
    mesa_impl: MesaImpl = MesaImpl.scan
    mesa_lambda: float = 1.0  # the mesa-layer's initial lambda (learned per layer and head)


@dataclass
class TrainConfig:
    """Online training with AdamW and global-norm clipping (docs/science.md section 7)."""

    steps: int = 5000
    batch_size: int = 2048
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.98
    weight_decay: float = 0.0
    clip_norm: float = 1e-3
    schedule: Schedule = Schedule.constant
    warmup_steps: int = 1000  # warmup_cosine only
    end_lr: float = 1e-5  # warmup_cosine only
    seeds: int = 1
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 10  # evaluations between two checkpoints (and one at the end)
    progress: bool = True


@dataclass
class EvalConfig:
    """The fixed evaluation set and the reference fits."""

    n_tasks: int = 10_000
    seed: int = 1234
    line_search_tasks: int = 100_000
    # GD++ fit (references.fit_gdpp): Levenberg-Marquardt iterations on `line_search_tasks` tasks of
    # its own, from the best of several starts (0: GD++ is GD with gamma = 0).
    gdpp_steps: int = 50
    extrapolate_to: int = 50  # depth_extrapolation: iterations of a trained recurrent layer
    damping: float = 1.0  # depth_extrapolation: each iteration's update is scaled by this
    sensitivity_tasks: int = 256  # sequence tasks: sequences of the eval set for model cos by position (at the end)
    probe_tasks: int = 4096  # probes, first_layer: sequences to fit each probe on (and as many held out)
    probe_lags: int = 6  # first_layer: past states s_{t-k}, k = 0..probe_lags, probed
    fewshot_tasks: int = 2048  # fewshot: regression sequences evaluated (docs/science.md section 8)
    fewshot_tune_steps: int = 0  # fewshot: Adam steps tuning a separator (and prefix), model frozen; 0: off
    fewshot_prefix: int = 0  # fewshot: learned prefix states (tuned with the separator)
    fewshot_lr: float = 0.01  # fewshot: Adam's learning rate for the separator and prefix
    fewshot_batch: int = 256  # fewshot: fresh regression sequences per tuning step
    # sine: the paper's comparator "MLP + GD" (docs/science.md section 9), a network of its own with
    # the model's input embedding followed by one GD step of fixed `mlpgd_eta`, embedding meta-learned
    # by Adam for `mlpgd_steps` steps (0: not trained, only GD on the model's own features is compared).
    mlpgd_steps: int = 0
    mlpgd_lr: float = 3e-4
    mlpgd_eta: float = 0.1
    mlpgd_batch: int = 2048


@dataclass
class Config:
    name: str = "single_layer"
    out: str | None = None
    analyses: list[str] = field(default_factory=list)  # run after training, see icl_gd.analyses
    logger: Logger = Logger.csv  # live logs besides metrics.csv, see icl_gd.loggers
    prng: Prng | None = None  # the generator of every draw of the run; null: the task kind's (`TaskKind.prng`)
    task: Any = MISSING  # one of TASK_SCHEMAS, chosen by the `task` group
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_store = ConfigStore.instance()
_store.store(name="base_config", node=Config)
for _kind, _schema in TASK_SCHEMAS.items():
    _store.store(group="task", name=f"{_kind}_schema", node=_schema)

SCHEMAS = {"model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


class ConfigError(ValueError):
    """A bad configuration, described in one line that names the field."""


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _fields(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def _check_override_keys(overrides: list[str]) -> None:
    """Reject unknown groups, options and fields with the allowed values listed. Task fields are
    checked against the schema of the task kind the overrides choose."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(f"cannot parse overrides: {str(err).splitlines()[0]}") from None
    task_fields = None
    group_choices = [o for o in parsed if o.key_or_group.lstrip("+~") in GROUPS]
    if any(o.is_sweep_override() for o in group_choices):
        task_fields = [f for schema in TASK_SCHEMAS.values() for f in _fields(schema)]  # each job is checked alone
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
            top = [f.name for f in dataclasses.fields(Config) if f.name not in (*SCHEMAS, "task")]
            if parts[0] not in top:
                raise ConfigError(f"{key}: unknown field; allowed: {', '.join(top + list(GROUPS))}")
            continue
        if key == "task.kind":
            raise ConfigError(
                f"task.kind: set by the task group; choose it with task=<kind>, "
                f"allowed: {', '.join(group_options('task'))}"
            )
        if parts[0] == "task":
            if task_fields is None:
                chosen = [f"{o.key_or_group.lstrip('+~')}={o.value()}" for o in group_choices]
                task_fields = _fields(TASK_SCHEMAS[str(_compose(chosen).task.kind)])
            names = task_fields
        elif parts[0] in SCHEMAS:
            names = _fields(SCHEMAS[parts[0]])
        else:
            raise ConfigError(f"{key}: unknown field; allowed groups: {', '.join(GROUPS[:-1])}")
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


_ENUM_ERROR = re.compile(r"Invalid value '(.*)', expected one of \[(.*)\]")


def _one_line(err: BaseException) -> str:
    """Condense a Hydra/OmegaConf error into `field: problem` (enum errors as `got X; allowed: a | b`)."""
    cause = err
    while cause.__cause__ is not None or cause.__context__ is not None:
        nxt = cast(BaseException, cause.__cause__ or cause.__context__)  # one is set: the loop's condition
        if isinstance(nxt, OmegaConfBaseException):
            cause = nxt
            break
        cause = nxt
    full_key = getattr(cause, "full_key", None)
    message = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0]
    enum_error = _ENUM_ERROR.search(message)
    if enum_error:
        value, allowed = enum_error.groups()
        message = f"got '{value}'; allowed: {allowed.replace(', ', ' | ')}"
    return f"{full_key}: {message}" if full_key else message


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}; allowed: {allowed}")


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _validate_linear(t: DictConfig) -> None:
    _require(t.dim >= 1, "task.dim", "an integer >= 1", t.dim)
    _require(t.n_context >= 1, "task.n_context", "an integer >= 1", t.n_context)
    _require(_positive(t.x_scale), "task.x_scale", "a number > 0", t.x_scale)
    _require(_positive(t.w_std), "task.w_std", "a number > 0", t.w_std)
    _require(math.isfinite(t.noise_std) and t.noise_std >= 0, "task.noise_std", "a number >= 0", t.noise_std)
    d_range = f"an integer in [0, task.n_context={t.n_context}]"
    _require(0 <= t.distractors <= t.n_context, "task.distractors", d_range, t.distractors)
    if t.x_cov is not None:
        cov = list(t.x_cov)
        allowed = f"null or a list of task.dim={t.dim} positive eigenvalues"
        _require(len(cov) == t.dim and all(_positive(float(c)) for c in cov), "task.x_cov", allowed, cov)
    rot = t.x_rotation
    _require(rot is None or rot >= 0, "task.x_rotation", "null or an integer >= 0 (a rotation's seed)", rot)
    _require(rot is None or t.x_cov is not None, "task.x_rotation", "null unless task.x_cov is set", rot)


def _validate_sine(t: DictConfig) -> None:
    _require(t.dim == 1, "task.dim", "1 for task=sine", t.dim)
    _require(t.n_context >= 1, "task.n_context", "an integer >= 1", t.n_context)
    _require(math.isfinite(t.noise_std) and t.noise_std >= 0, "task.noise_std", "a number >= 0", t.noise_std)


def _validate_lds(t: DictConfig) -> None:
    _require(t.state_dim >= 1, "task.state_dim", "an integer >= 1", t.state_dim)
    _require(t.length >= 2, "task.length", "an integer >= 2", t.length)
    _require(math.isfinite(t.noise_std) and t.noise_std >= 0, "task.noise_std", "a number >= 0", t.noise_std)
    _require(_positive(t.clip), "task.clip", "a number > 0", t.clip)
    _require(t.hidden_dim >= 1, "task.hidden_dim", "an integer >= 1", t.hidden_dim)
    obs = t.obs_noise_std
    _require(math.isfinite(obs) and obs >= 0, "task.obs_noise_std", "a number >= 0", obs)
    cmax = t.contracting_max
    _require(0.3 < cmax < 1, "task.contracting_max", "a number in (0.3, 1)", cmax)
    _require(t.transition_seed >= 0, "task.transition_seed", "an integer >= 0", t.transition_seed)
    _require(_positive(t.ridge_lambda), "task.ridge_lambda", "a number > 0", t.ridge_lambda)


TASK_VALIDATORS = {"linear": _validate_linear, "sine": _validate_sine, "lds": _validate_lds}


def validate(cfg: DictConfig) -> None:
    """Check value ranges; raise ConfigError naming the first bad field."""
    m, tr, ev = cfg.model, cfg.train, cfg.eval
    _require(cfg.task.kind in TASK_VALIDATORS, "task.kind", " | ".join(TASK_VALIDATORS), cfg.task.kind)
    TASK_VALIDATORS[cfg.task.kind](cfg.task)
    _require(m.layers >= 1, "model.layers", "an integer >= 1", m.layers)
    _require(m.heads >= 1, "model.heads", "an integer >= 1", m.heads)
    _require(m.key_size is None or m.key_size >= 1, "model.key_size", "null or an integer >= 1", m.key_size)
    pdim = m.positional_dim
    even = pdim is None or (pdim >= 2 and pdim % 2 == 0)
    _require(even, "model.positional_dim", "null or an even integer >= 2", pdim)
    _require(m.embed_dim is None or m.embed_dim >= 1, "model.embed_dim", "null or an integer >= 1", m.embed_dim)
    if m.first_layer is not None:
        _require(m.layers >= 2, "model.layers", "an integer >= 2 with model.first_layer set", m.layers)
    _require(_positive(m.mesa_lambda), "model.mesa_lambda", "a number > 0", m.mesa_lambda)
    init = m.init_scale
    _require(init is None or init > 0, "model.init_scale", "null (0.002 / layers) or a number > 0", init)
    _require(m.mlp_width >= 1, "model.mlp_width", "an integer >= 1", m.mlp_width)
    _require(m.input_mlp_width >= 1, "model.input_mlp_width", "an integer >= 1", m.input_mlp_width)
    _require(m.input_mlp_features >= 1, "model.input_mlp_features", "an integer >= 1", m.input_mlp_features)
    clip = m.clip_activations
    _require(clip is None or clip > 0, "model.clip_activations", "null or a number > 0", clip)
    _require(tr.steps >= 1, "train.steps", "an integer >= 1", tr.steps)
    _require(tr.batch_size >= 1, "train.batch_size", "an integer >= 1", tr.batch_size)
    _require(_positive(tr.lr), "train.lr", "a number > 0", tr.lr)
    _require(0 <= tr.b1 < 1, "train.b1", "a number in [0, 1)", tr.b1)
    _require(0 <= tr.b2 < 1, "train.b2", "a number in [0, 1)", tr.b2)
    _require(tr.weight_decay >= 0, "train.weight_decay", "a number >= 0", tr.weight_decay)
    _require(tr.clip_norm > 0, "train.clip_norm", "a number > 0", tr.clip_norm)
    if tr.schedule.name == "warmup_cosine":
        allowed = f"an integer in [0, train.steps={tr.steps}] with train.schedule=warmup_cosine"
        _require(0 <= tr.warmup_steps <= tr.steps, "train.warmup_steps", allowed, tr.warmup_steps)
    _require(math.isfinite(tr.end_lr) and tr.end_lr >= 0, "train.end_lr", "a number >= 0", tr.end_lr)
    _require(tr.seeds >= 1, "train.seeds", "an integer >= 1", tr.seeds)
    _require(tr.seed >= 0, "train.seed", "an integer >= 0", tr.seed)
    _require(tr.eval_every >= 1, "train.eval_every", "an integer >= 1", tr.eval_every)
    _require(tr.checkpoint_every >= 1, "train.checkpoint_every", "an integer >= 1", tr.checkpoint_every)
    _require(ev.n_tasks >= 2, "eval.n_tasks", "an integer >= 2", ev.n_tasks)
    _require(ev.line_search_tasks >= 2, "eval.line_search_tasks", "an integer >= 2", ev.line_search_tasks)
    _require(ev.gdpp_steps >= 0, "eval.gdpp_steps", "an integer >= 0", ev.gdpp_steps)
    _require(ev.extrapolate_to >= 1, "eval.extrapolate_to", "an integer >= 1", ev.extrapolate_to)
    _require(0 < ev.damping <= 1, "eval.damping", "a number in (0, 1]", ev.damping)
    _require(ev.sensitivity_tasks >= 1, "eval.sensitivity_tasks", "an integer >= 1", ev.sensitivity_tasks)
    _require(ev.probe_tasks >= 2, "eval.probe_tasks", "an integer >= 2", ev.probe_tasks)
    _require(ev.probe_lags >= 1, "eval.probe_lags", "an integer >= 1", ev.probe_lags)
    _require(ev.fewshot_tasks >= 1, "eval.fewshot_tasks", "an integer >= 1", ev.fewshot_tasks)
    _require(ev.fewshot_tune_steps >= 0, "eval.fewshot_tune_steps", "an integer >= 0 (0: off)", ev.fewshot_tune_steps)
    prefix_ok = ev.fewshot_prefix == 0 or (ev.fewshot_prefix > 0 and ev.fewshot_tune_steps > 0)
    prefix_allowed = "an integer >= 0; 0 unless eval.fewshot_tune_steps > 0"
    _require(prefix_ok, "eval.fewshot_prefix", prefix_allowed, ev.fewshot_prefix)
    _require(_positive(ev.fewshot_lr), "eval.fewshot_lr", "a number > 0", ev.fewshot_lr)
    _require(ev.fewshot_batch >= 1, "eval.fewshot_batch", "an integer >= 1", ev.fewshot_batch)
    _require(ev.mlpgd_steps >= 0, "eval.mlpgd_steps", "an integer >= 0 (0: off)", ev.mlpgd_steps)
    _require(_positive(ev.mlpgd_lr), "eval.mlpgd_lr", "a number > 0", ev.mlpgd_lr)
    _require(_positive(ev.mlpgd_eta), "eval.mlpgd_eta", "a number > 0", ev.mlpgd_eta)
    _require(ev.mlpgd_batch >= 1, "eval.mlpgd_batch", "an integer >= 1", ev.mlpgd_batch)


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


# Fields of earlier versions that no longer mean anything: dropped from a run's config.yaml.
RETIRED = {"eval": ("gdpp_batch", "gdpp_lr")}  # the Adam fit of GD++, now Levenberg-Marquardt
# Fields added since whose default differs from what runs written before them did.
EARLIER = {"prng": "threefry2x32"}


def from_yaml(text: str) -> DictConfig:
    """A config written by `to_yaml` (a run's `config.yaml`) on the current schemas: fields added
    since then take their defaults (or, in `EARLIER`, what the run did), retired ones are dropped;
    raises ConfigError if it no longer fits them."""
    try:
        raw = cast(DictConfig, OmegaConf.create(text))  # a run's config.yaml: a mapping
        for group, names in RETIRED.items():
            for name in names:
                raw.get(group, {}).pop(name, None)
        for name, value in EARLIER.items():
            raw.setdefault(name, value)
        kind = str(raw.get("task", {}).get("kind", "linear"))
        if kind not in TASK_SCHEMAS:
            raise ConfigError(f"task.kind: got {kind!r}; allowed: {' | '.join(TASK_SCHEMAS)}")
        base = OmegaConf.structured(Config)
        base.task = OmegaConf.structured(TASK_SCHEMAS[kind])
        cfg = OmegaConf.merge(base, raw)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(_one_line(err)) from None
    assert isinstance(cfg, DictConfig)
    return cfg

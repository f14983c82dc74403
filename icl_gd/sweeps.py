"""Sweeps (`icl-gd train -m`): the launcher that runs the points, checked before any starts; the
sweep directory's index `sweep.json`; and one point run to completion whatever happened to it
before (a requeued or relaunched point resumes from its checkpoint, a completed one is left as is).

The launcher is the config group `launcher` (`conf/launcher/<name>.yaml`, each choosing Hydra's
`hydra/launcher` plugin and documenting its keys): `launcher=slurm launcher.partition=gpu`;
`hydra.launcher.<key>=...` and `hydra/launcher=<plugin>` are accepted as well. A sweep directory
holds `sweep.json` and one run directory per point, `<num>/` (Hydra's job number).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import json
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from icl_gd import analyses, experiment, runs
from icl_gd import config as config_lib
from icl_gd.config import ConfigError

SWEEP_FILE = "sweep.json"
STOP_FILE = ".stopping"  # in a sweep directory while Ctrl-C stops its worker processes
PENDING = "pending"  # a point whose run directory has no summary.json yet


class SweepError(ValueError):
    """A sweep directory that cannot be used as asked, in one line."""


@dataclass(frozen=True)
class Launcher:
    """A `launcher=<name>` option: Hydra's plugin and its structured config (whose fields are the
    keys allowed; None: no keys)."""

    plugin: str
    schema: type | None
    children: bool = False  # the points run in worker processes of this one, which Ctrl-C reaches too


LAUNCHERS = {
    "local": Launcher("basic", None),  # one point after another, in this process
    "joblib": Launcher("joblib", JobLibLauncherConf, children=True),  # worker processes on this machine
    "submitit_local": Launcher("submitit_local", LocalQueueConf),  # a submitit job per point, on this machine
    "slurm": Launcher("submitit_slurm", SlurmQueueConf),  # a SLURM job per point (one job array), via submitit
}
DEFAULT_LAUNCHER = "local"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= lo


def _optional(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or rule(v)


def _one_of(*values) -> Callable[[Any], bool]:
    return lambda v: v in values


_NAME = (_optional(lambda v: isinstance(v, str) and v.strip() != ""), "null or a name (a string)")
# Value checks of the launcher keys (the plugins' schemas check the types): key -> (ok, allowed).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "timeout_min": (_int(1), "an integer >= 1 (minutes)"),
    "nodes": (_one_of(1), "1 (a point is one process: its seeds train together, vmapped)"),
    "tasks_per_node": (_one_of(1), "1 (a point is one process: its seeds train together, vmapped)"),
    "cpus_per_task": (_optional(_int(1)), "null or an integer >= 1"),
    "gpus_per_node": (_optional(_int(0)), "null or an integer >= 0"),
    "gpus_per_task": (_optional(_int(0)), "null or an integer >= 0"),
    "cpus_per_gpu": (_optional(_int(1)), "null or an integer >= 1"),
    "mem_gb": (_optional(_int(1)), "null or an integer >= 1 (GB)"),
    "signal_delay_s": (_int(0), "an integer >= 0 (seconds before the time limit)"),
    "max_num_timeout": (_int(0), "an integer >= 0 (requeues after a timeout)"),
    "array_parallelism": (_int(1), "an integer >= 1"),
    **dict.fromkeys(
        ("partition", "qos", "account", "constraint", "exclude", "gres", "comment", "mem_per_gpu", "mem_per_cpu"),
        _NAME,
    ),
    "n_jobs": (lambda v: _is_int(v) and v != 0, "a non-zero integer (-1: one job per CPU core)"),
    "timeout": (_optional(lambda v: isinstance(v, int | float) and v > 0), "null or a number > 0 (seconds)"),
    "prefer": (_one_of("processes", "threads"), "processes | threads"),
    "require": (_one_of(None, "sharedmem"), "null | sharedmem"),
    "backend": (_one_of(None, "loky", "multiprocessing", "threading"), "null | loky | multiprocessing | threading"),
    "verbose": (_int(0), "an integer >= 0"),
    "setup": (_optional(lambda v: isinstance(v, list)), "null or a list of shell lines run before the job"),
    "additional_parameters": (lambda v: isinstance(v, dict), "a mapping of sbatch options, e.g. {mail-type: END}"),
    "stderr_to_stdout": (_one_of(True, False), "true | false"),
}


def launcher_keys(name: str) -> list[str]:
    schema = LAUNCHERS[name].schema
    return [] if schema is None else [f.name for f in dataclasses.fields(schema) if f.name != "_target_"]


@dataclass
class Plan:
    """A multirun split in two: the overrides every job composes, and the launcher's (`+launcher=
    <name>` and its keys as `hydra.launcher.<key>=...`), checked; `settings`: the launcher's keys."""

    launcher: str
    settings: dict[str, Any]
    job_overrides: list[str]
    launcher_overrides: list[str]


def _parse(overrides: list[str]) -> list[Override]:
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(f"cannot parse overrides: {str(err).splitlines()[0]}") from None


def plan(overrides: list[str]) -> Plan:
    """Split and check the launcher's overrides; raises ConfigError naming the field and the
    values allowed (unknown launcher or key, a value out of range, SLURM without `sbatch`)."""
    name = plugin = None
    keys: dict[str, str] = {}
    jobs = []
    for text, override in zip(overrides, _parse(overrides), strict=True):
        key = override.key_or_group.lstrip("+~")
        if key in ("launcher", "hydra/launcher") or key.startswith(("launcher.", "hydra.launcher.")):
            if override.is_sweep_override():
                raise ConfigError(f"{key}: got a sweep; allowed: one value for the whole sweep")
            value = text.split("=", 1)[1]
            if key == "launcher":
                name = value
            elif key == "hydra/launcher":
                plugin = value
            else:
                keys[key.split("launcher.", 1)[1]] = value
        else:
            jobs.append(text)
    if name is not None and name not in LAUNCHERS:
        raise ConfigError(f"launcher: unknown value '{name}'; allowed: {', '.join(LAUNCHERS)}")
    if plugin is not None:
        by_plugin = {launcher.plugin: n for n, launcher in LAUNCHERS.items()}
        if plugin not in by_plugin:
            raise ConfigError(f"hydra/launcher: unknown value '{plugin}'; allowed: {', '.join(by_plugin)}")
        if name is not None and by_plugin[plugin] != name:
            raise ConfigError(
                f"hydra/launcher: got '{plugin}' with launcher={name}; allowed: "
                f"{LAUNCHERS[name].plugin} (launcher={name} chooses it), or one of the two alone"
            )
        name = by_plugin[plugin]
    name = name or DEFAULT_LAUNCHER
    allowed = launcher_keys(name)
    for key in keys:
        if key.split(".")[0] not in allowed:  # nested: launcher.additional_parameters.<sbatch option>
            raise ConfigError(
                f"launcher.{key}: unknown key for launcher={name}; allowed: {', '.join(allowed) or 'none'}"
            )
    launcher_overrides = [f"+launcher={name}", *(f"++hydra.launcher.{k}={v}" for k, v in keys.items())]
    settings = _settings(launcher_overrides, keys)
    for key, value in settings.items():
        ok, allowed_values = RULES.get(key, (None, ""))
        if ok is not None and not ok(value):
            raise ConfigError(f"launcher.{key}: got {value!r}; allowed: {allowed_values}")
    if name == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError(
            "launcher: got 'slurm' but sbatch is not on PATH; allowed: slurm on a SLURM submission host, "
            f"or {' | '.join(n for n in LAUNCHERS if n != 'slurm')}"
        )
    return Plan(name, settings, jobs, launcher_overrides)


def _settings(launcher_overrides: list[str], given: dict[str, str]) -> dict[str, Any]:
    """The launcher's keys as Hydra composes them (the group's YAML, then the overrides), without
    the ones that refer to the job (interpolations such as `${hydra.sweep.dir}`)."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_lib.CONF_DIR), version_base="1.3"):
            node = compose(config_name="config", overrides=launcher_overrides, return_hydra_config=True).hydra.launcher
    except (HydraException, OmegaConfBaseException) as err:
        cause: BaseException | None = err
        while cause is not None and getattr(cause, "full_key", None) is None:
            cause = cause.__cause__ or cause.__context__
        full_key = str(getattr(cause, "full_key", "") or "")
        key = full_key.removeprefix("hydra.launcher.")
        if key in given:  # a value of the wrong type for the plugin's schema
            allowed = RULES[key][1] if key in RULES else f"a value of the type of {full_key}"
            raise ConfigError(f"launcher.{key}: got {given[key]!r}; allowed: {allowed}") from None
        raise ConfigError(f"launcher: {str(err).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()
    settings = {}
    for key in map(str, node):
        if key != "_target_" and not OmegaConf.is_interpolation(node, key):
            value = node[key]
            settings[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return settings


def _value(cfg: DictConfig, key: str, job: list[str]) -> Any:
    """A point's value of swept parameter `key`: the config's (enums by name), or for a group
    choice (`experiment=...`) the option's name."""
    if "." in key:
        value = OmegaConf.select(cfg, key)
        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
        return value.name if isinstance(value, enum.Enum) else value
    return next(o.value() for o in _parse(job) if o.key_or_group.lstrip("+~") == key)


def new_index(overrides: list[str], plan: Plan, jobs: list[list[str]], cfgs: list[DictConfig]) -> dict:
    """`sweep.json` of a sweep about to start: its overrides, launcher, the swept parameters and
    their values, and per point its directory, parameters, overrides and status (`pending`)."""
    swept = [o.key_or_group.lstrip("+~") for o in _parse(plan.job_overrides) if o.is_sweep_override()]
    points = [
        {
            "num": num,
            "dir": str(num),
            "params": {key: _value(cfg, key, job) for key in swept},
            "overrides": job,
            "status": PENDING,
        }
        for num, (job, cfg) in enumerate(zip(jobs, cfgs, strict=True))
    ]
    values = {key: list({json.dumps(p["params"][key]): p["params"][key] for p in points}.values()) for key in swept}
    return {
        "kind": "icl-gd sweep",
        "version": 1,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join(["icl-gd", "train", "-m", *overrides]),
        "overrides": overrides,
        "launcher": {"name": plan.launcher, "plugin": LAUNCHERS[plan.launcher].plugin, "settings": plan.settings},
        "swept": values,
        "points": points,
    }


def point_status(run_dir: Path) -> str:
    """`pending` (not started), else the run's `summary.json` status: running, interrupted,
    completed or failed."""
    try:
        return str(runs.load_summary(run_dir).get("status", PENDING))
    except FileNotFoundError:
        return PENDING


def load_index(sweep_dir: Path) -> dict:
    """A sweep's `sweep.json`, each point's status read afresh from its run directory."""
    try:
        index = json.loads((Path(sweep_dir) / SWEEP_FILE).read_text())
        for point in index["points"]:
            point["status"] = point_status(Path(sweep_dir) / point["dir"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SweepError(f"SWEEP_DIR: {sweep_dir}/{SWEEP_FILE} cannot be read ({str(err).splitlines()[0]})") from None
    return index


def write_index(sweep_dir: Path, index: dict) -> None:
    for point in index["points"]:
        point["status"] = point_status(Path(sweep_dir) / point["dir"])
    index["updated"] = dt.datetime.now().isoformat(timespec="seconds")
    runs.write_json(Path(sweep_dir) / SWEEP_FILE, index)


def relaunch(index: dict, jobs: list[list[str]]) -> None:
    """Record a relaunch in the index; its overrides must still expand to the points it started with."""
    recorded = [p["overrides"] for p in index["points"]]
    if recorded != jobs:
        raise SweepError(
            f"SWEEP_DIR: its {len(recorded)} point(s) in {SWEEP_FILE} differ from the {len(jobs)} its overrides "
            "expand to now; allowed: a sweep directory written by this version of icl-gd"
        )
    index.setdefault("relaunched", []).append(dt.datetime.now().isoformat(timespec="seconds"))


def launch(plan: Plan, sweep_dir: Path, task: Callable[[DictConfig], None]) -> None:
    """Run `task` on every point with Hydra's multirun and the planned launcher; point `num`'s
    run directory is `sweep_dir/<num>`."""
    import hydra

    main = hydra.main(config_path=str(config_lib.CONF_DIR), config_name="config", version_base="1.3")(task)
    argv = sys.argv
    sweep = str(Path(sweep_dir).resolve()).replace("\\", "\\\\").replace("'", "\\'")
    sys.argv = [argv[0], "--multirun", *plan.job_overrides, *plan.launcher_overrides, f"hydra.sweep.dir='{sweep}'"]
    try:
        with _patient_interrupt(sweep_dir) if LAUNCHERS[plan.launcher].children else contextlib.nullcontext():
            main()
    finally:
        sys.argv = argv
        (Path(sweep_dir) / STOP_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def _patient_interrupt(sweep_dir: Path) -> Iterator[None]:
    """While worker processes train the points: the first SIGINT here marks the sweep `stopping`
    and waits (Ctrl-C reaches the workers too: each saves its run and stops, and the points not
    started stay pending); a second one stops waiting."""
    received: list[int] = []

    def on_sigint(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        (Path(sweep_dir) / STOP_FILE).touch()
        print("interrupted: the running points save and stop (Ctrl-C again: stop waiting)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:  # every running point had completed: the sweep stops all the same
        raise SweepInterrupted("SIGINT stopped the sweep", 128 + signal.SIGINT)


class SweepInterrupted(KeyboardInterrupt):
    """A point stopped by SIGINT / SIGTERM (saved, marked interrupted): the whole sweep stops.
    A BaseException, so that no launcher goes on to the next point."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message, exit_code)  # both in `args`: it crosses process boundaries (joblib)
        self.exit_code = exit_code

    def __str__(self) -> str:
        return str(self.args[0])


def stopping(sweep_dir: Path) -> bool:
    """Whether the sweep is being stopped (Ctrl-C while worker processes train its points)."""
    return (Path(sweep_dir) / STOP_FILE).exists()


def run_point(cfg: DictConfig, run_dir: Path) -> runs.Trained | None:
    """Train the point into `run_dir`, or resume it where an earlier attempt left it (interrupted,
    or killed: a requeued or relaunched job), then run the analyses its summary lacks. None: the
    point was completed and analysed (or failed) before and is not re-run, or the sweep is being
    stopped (`stopping`): a point not started is left pending, one interrupted stays so quietly,
    while the others save."""
    status = point_status(run_dir)
    if stopping(run_dir.parent):
        return None
    try:
        if status == PENDING:
            trained = experiment.train(cfg, run_dir, allow_empty_dir=True)
        elif status in ("running", "interrupted"):
            trained = experiment.resume(run_dir)
        elif status == "completed" and set(cfg.analyses) - set(runs.load_summary(run_dir).get("analyses", {})):
            trained = runs.load(run_dir)
        else:
            return None
    except experiment.TrainingInterrupted as err:
        if stopping(run_dir.parent):
            return None
        name = signal.Signals(err.exit_code - 128).name
        raise SweepInterrupted(f"{name} stopped point {run_dir} (saved, marked interrupted)", err.exit_code) from err
    done = trained.summary.get("analyses", {})
    for name in cfg.analyses:
        if name not in done:
            analyses.run(name, trained)
    return trained


@contextlib.contextmanager
def requeue_on_preemption() -> Iterator[None]:
    """Inside a submitit job (SLURM or its local executor), make submitit's requeue and our
    interruption work together. submitit ignores SIGTERM and, on its signal (USR2: sent
    `signal_delay_s` before the time limit, and after SIGTERM on preemption), dumps the job's
    resubmission and requeues it. Here that signal is first turned into a SIGTERM, which training
    catches (finish the chunk, save, mark the run interrupted); then submitit requeues, and the
    requeued job finds the run interrupted and resumes it. Outside training submitit requeues at
    once. A SIGTERM alone (scancel) stops the run, saved, without a requeue. Elsewhere: no change."""
    usr = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
    requeue = signal.getsignal(usr) if os.environ.get("SUBMITIT_EXECUTOR") else None
    if not callable(requeue):
        yield
        return
    outside_training = signal.getsignal(signal.SIGTERM)
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        if signal.getsignal(signal.SIGTERM) is outside_training:
            requeue(signum, frame)
        else:
            signal.raise_signal(signal.SIGTERM)

    signal.signal(usr, on_signal)
    try:
        yield
    except SweepInterrupted:
        if received:
            requeue(received[0], None)  # exits: the requeued job resumes the saved run
        raise
    finally:
        signal.signal(usr, requeue)

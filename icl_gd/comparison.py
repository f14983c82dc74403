"""Comparing runs and sweeps (`icl-gd compare`): run directories and sweep directories (read through
their `sweep.json`) as one list of runs, the parameters that vary between them, groups of runs at
the same point, each final metric's mean and 95% interval over the seeds of every run of a group,
and figures of a final metric against a parameter with the references at each point. Everything
goes to one folder with an index, `compare.json`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from omegaconf import OmegaConf

from icl_gd import metrics, plots, references, runs, sweeps

COMPARE_FILE, RUNS_TABLE, GROUPS_TABLE = "compare.json", "compare.csv", "groups.csv"
# Fields on which runs of one point may differ: where they go, the base seed (replicates), output.
NOT_PARAMETERS = frozenset({"out", "logger", "train.seed", "train.progress", "train.checkpoint_every"})
DEFAULT_METRICS = ("loss", "model_cos")
LOG_METRICS = ("loss", "preds_diff", "model_diff")  # prefixes of the metrics drawn on a log axis
REFERENCE_STYLES = ("--", "-.", ":", (0, (1, 3)), (0, (5, 2, 1, 2)))


class CompareError(ValueError):
    """Inputs or options `compare` cannot use, in one line naming the argument."""


@dataclass
class Run:
    """A run directory: its summary, resolved config (dotted keys) and, for a sweep's point, the
    sweep and the point's parameters (`sweep.json`)."""

    path: Path
    summary: dict
    config: dict[str, Any]
    sweep: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def value(self, key: str) -> Any:
        return self.params[key] if key in self.params else self.config.get(key)

    @property
    def status(self) -> str:
        return str(self.summary.get("status", sweeps.PENDING))

    def references(self) -> dict[str, float]:
        """The loss of each reference fitted for this run's point (not the closed-form entries)."""
        fitted = references.REGISTRY.get(str(self.summary.get("task", "linear")), {})
        refs = self.summary.get("references", {})
        return {name: float(entry["loss"]) for name, entry in refs.items() if name in fitted and "loss" in entry}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _load_run(path: Path, sweep: Path | None = None, params: dict | None = None) -> Run:
    try:
        config = OmegaConf.to_container(runs.load_config(path), resolve=True, enum_to_str=True)
        return Run(path, runs.load_summary(path), _flat(config), sweep, dict(params or {}))
    except (ValueError, OSError) as err:  # ConfigError and JSON errors are ValueErrors
        raise CompareError(f"PATHS: {path} cannot be read ({str(err).splitlines()[0]})") from None


@dataclass
class Inputs:
    """The runs to compare, in the order given (a sweep's points in order), the sweep points left
    out (not started: no `summary.json`), and what each input path was."""

    runs: list[Run]
    skipped: list[dict]
    sources: list[dict]


def load(paths: Sequence[Path]) -> Inputs:
    """Read run and sweep directories; raises CompareError (or sweeps.SweepError) in one line."""
    found, skipped, sources = [], [], []
    for path in map(Path, paths):
        if (path / sweeps.SWEEP_FILE).is_file():
            index = sweeps.load_index(path)
            sources.append(
                {"path": str(path), "kind": "sweep", "swept": index["swept"], "points": len(index["points"])}
            )
            for point in index["points"]:
                run_dir = path / point["dir"]
                if point["status"] == sweeps.PENDING or not (run_dir / runs.METRICS_FILE).is_file():
                    skipped.append({"path": str(run_dir), "status": point["status"]})
                else:
                    found.append(_load_run(run_dir, path, point["params"]))
        elif (path / runs.METRICS_FILE).is_file() and (path / runs.SUMMARY_FILE).is_file():
            sources.append({"path": str(path), "kind": "run"})
            found.append(_load_run(path))
        else:
            raise CompareError(
                f"PATHS: {path} is not a run directory (no {runs.METRICS_FILE} / {runs.SUMMARY_FILE}) "
                f"nor a sweep directory (no {sweeps.SWEEP_FILE})"
            )
    if not found:
        raise CompareError(f"PATHS: nothing to compare yet: {len(skipped)} point(s), none started")
    return Inputs(found, skipped, sources)


def parameters(found: Sequence[Run]) -> list[str]:
    """What varies between the runs: the sweeps' swept parameters (in `sweep.json` order), then the
    config fields that differ and do not follow from those (an `experiment=` choice sets many
    fields; they are not parameters of their own). `NOT_PARAMETERS` never count."""
    swept = list(dict.fromkeys(k for r in found for k in r.params))
    fields = sorted({k for r in found for k in r.config} - NOT_PARAMETERS - set(swept))
    differ = [k for k in fields if len({_key(r.config.get(k)) for r in found}) > 1]

    def follows(key: str) -> bool:
        by_point: dict[str, set[str]] = {}
        for r in found:
            by_point.setdefault(_key([r.value(s) for s in swept]), set()).add(_key(r.config.get(key)))
        return bool(swept) and all(len(values) == 1 for values in by_point.values())

    return swept + [k for k in differ if not follows(k)]


@dataclass
class Group:
    """The runs at one point (the same value of every parameter)."""

    point: dict[str, Any]
    runs: list[Run]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_fmt(v)}" for k, v in self.point.items()) or "all runs"

    def final(self, metric: str) -> dict | None:
        """`metrics.mean_ci95` over the seeds of every completed run of the group (`per_seed`: the
        pooled values); None when none has the metric."""
        values = []
        for r in self.runs:
            stats = r.summary.get("final", {}).get(metric) if r.status == "completed" else None
            if stats is not None and not isinstance(stats["mean"], list):
                values += stats.get("per_seed", [stats["mean"]])
        return metrics.mean_ci95(values) if values else None

    def references(self) -> dict[str, float]:
        """Each reference's loss at this point (mean over the group's runs)."""
        losses: dict[str, list[float]] = {}
        for r in self.runs:
            for name, loss in r.references().items():
                losses.setdefault(name, []).append(loss)
        return {name: float(np.mean(v)) for name, v in losses.items()}

    def statuses(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.runs) for s in dict.fromkeys(r.status for r in self.runs)}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def group(found: Sequence[Run], params: Sequence[str]) -> list[Group]:
    """Runs grouped by their parameters' values, in order of first appearance; labels each run
    (its point, or `<experiment> K=<layers> (<dir>)` when nothing varies)."""
    groups: dict[str, Group] = {}
    for r in found:
        point = {k: r.value(k) for k in params}
        groups.setdefault(_key(point), Group(point, [])).runs.append(r)
    labels: set[str] = set()
    for i, r in enumerate(found):
        base = groups[_key({k: r.value(k) for k in params})].label if params else None
        base = base or f"{r.summary.get('experiment', '')} K={r.config.get('model.layers')} ({r.path.name})"
        r.label = base if base not in labels else f"{base} ({r.path.name}, {i})"
        labels.add(r.label)
    return list(groups.values())


def final_metrics(found: Sequence[Run]) -> list[str]:
    """The scalar final metrics of the runs, in order of first appearance."""
    names = (n for r in found for n, s in r.summary.get("final", {}).items() if not isinstance(s["mean"], list))
    return list(dict.fromkeys(names))


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def check_options(x: Sequence[str] | None, chosen: Sequence[str] | None, found: Sequence[Run], params: list[str]):
    """The x parameters and the metrics of the figures; raises CompareError naming the option.
    Default x: the swept parameters of the sweeps given, else the numeric parameters that vary;
    default metrics: loss and model cos (those the runs have)."""
    available = final_metrics(found)
    for name in chosen or ():
        if name not in available:
            raise CompareError(f"--metric: got '{name}'; allowed: {', '.join(available) or 'none (no run completed)'}")
    for name in x or ():
        if name not in params:
            allowed = ", ".join(params) or "none (the runs differ in no parameter)"
            raise CompareError(f"--x: got '{name}'; allowed: {allowed}")
    swept = [p for p in params if any(p in r.params for r in found)]
    default = swept or [p for p in params if _numeric([r.value(p) for r in found])]
    return list(x or default), list(chosen or [m for m in DEFAULT_METRICS if m in available])


def runs_table(found: Sequence[Run], params: Sequence[str]) -> pd.DataFrame:
    """One row per run: label, directory, parameters, status, seeds and every final mean."""
    rows = []
    for r in found:
        row = {"run": r.label, "path": str(r.path), **{k: r.value(k) for k in params}}
        row.update(status=r.status, seeds=r.summary.get("seeds"))
        finals = r.summary.get("final", {}).items()
        row.update({name: stats["mean"] for name, stats in finals if not isinstance(stats["mean"], list)})
        rows.append(row)
    return pd.DataFrame(rows)


def groups_table(groups: Sequence[Group], params: Sequence[str], names: Sequence[str]) -> pd.DataFrame:
    """One row per group: parameters, runs, seeds pooled, statuses, each metric's mean and 95%
    interval (`<metric>_lo`, `<metric>_hi`), and the references' losses (`ref_<name>_loss`)."""
    rows = []
    for g in groups:
        row: dict[str, Any] = {**{k: g.point[k] for k in params}, "runs": len(g.runs)}
        loss = g.final(names[0]) if names else None
        row["seeds"] = len(loss["per_seed"]) if loss else 0
        row["status"] = ", ".join(f"{n} {s}" for s, n in g.statuses().items())
        for name in names:
            stats = g.final(name)
            lo, hi = (None, None) if stats is None else stats["ci95"]
            row.update({name: None if stats is None else stats["mean"], f"{name}_lo": lo, f"{name}_hi": hi})
        row.update({f"ref_{n}_loss": v for n, v in g.references().items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _reference_label(task: str, name: str) -> str:
    ref = references.REGISTRY.get(task, {}).get(name)
    return ref.label if ref is not None else name


def final_vs_parameter(groups: Sequence[Group], params: Sequence[str], x: str, names: Sequence[str], stem: Path):
    """Each final metric (one panel each) against parameter `x`: mean and 95% interval over the
    seeds of every run at a point, one line per combination of the other parameters; on the loss
    panel each reference's loss at the same points (flat when it does not vary with `x`)."""
    others = [p for p in params if p != x]
    values = list({_key(g.point[x]): g.point[x] for g in groups}.values())
    numeric = _numeric(values)
    position = {_key(v): (float(v) if numeric else float(i)) for i, v in enumerate(values)}
    series: dict[str, list[Group]] = {}
    for g in groups:
        series.setdefault(", ".join(f"{k}={_fmt(g.point[k])}" for k in others), []).append(g)
    task = str(groups[0].runs[0].summary.get("task", "linear"))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    ref_styles: dict[str, dict] = {}  # one style per reference: its own colour with one series, else a line style
    ref_values: dict[str, list[float]] = {}
    for ax, name in zip(axes[0], names, strict=True):
        means, lows = [], []  # lows: the positive ends of the intervals too
        for i, (label, members) in enumerate(series.items()):
            members = sorted(members, key=lambda g: position[_key(g.point[x])])
            stats = [(position[_key(g.point[x])], s) for g in members if (s := g.final(name)) is not None]
            xs = np.array([p for p, _ in stats])
            mean = np.array([s["mean"] for _, s in stats], dtype=float)
            lo, hi = (np.array([np.nan if s["ci95"][b] is None else s["ci95"][b] for _, s in stats]) for b in (0, 1))
            color = f"C{i % 10}"
            yerr = np.nan_to_num(np.stack([mean - lo, hi - mean]))
            ax.errorbar(xs, mean, yerr=yerr, marker="o", capsize=3, color=color, label=label or "trained model")
            means += list(mean)
            lows += [*lo[lo > 0], *mean]
            if name != "loss":
                continue
            refs = [g.references() for g in members]
            at = np.array([position[_key(g.point[x])] for g in members])
            for ref in refs[0]:
                j = len(ref_styles) if ref not in ref_styles else list(ref_styles).index(ref)
                style = ref_styles.setdefault(
                    ref,
                    {"color": f"C{(j + 1) % 10}", "linestyle": "--"}
                    if len(series) == 1
                    else {"color": "black", "linestyle": REFERENCE_STYLES[j % len(REFERENCE_STYLES)]},
                )
                ys = np.array([r.get(ref, np.nan) for r in refs])
                ref_values.setdefault(ref, []).extend(ys)
                drawn = {**style, "color": style["color"] if len(series) == 1 else color, "linewidth": 1}
                if np.allclose(ys, ys[0], rtol=1e-6, atol=0):
                    ax.axhline(ys[0], **drawn)
                else:
                    ax.plot(at, ys, marker=".", **drawn)
        if (name.startswith(LOG_METRICS) or name.endswith("_loss")) and min(means, default=0) > 0:
            ax.set_yscale("log")  # references far below the model (OLS on noiseless tasks) stay off the axis
            near = [v for values in ref_values.values() for v in values if v >= min(lows) / 1e3]
            ax.set_ylim(bottom=max(ax.get_ylim()[0], min(lows + near) / 2))
        if numeric and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        if not numeric or len(values) <= 12:
            ax.set_xticks([position[_key(v)] for v in values], [_fmt(v) for v in values])
        ax.set_xlabel(x)
        ax.set_title(f"final {name}")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    bottom = axes[0][list(names).index("loss")].get_ylim()[0] if "loss" in names else -np.inf
    for ref, style in ref_styles.items():
        handles.append(Line2D([], [], linewidth=1, **style))
        labels.append(_reference_label(task, ref) + (" (below the axis)" if max(ref_values[ref]) < bottom else ""))
    axes[0][0].legend(handles, labels, fontsize=7)
    fig.suptitle(
        f"final metrics against {x}: mean and 95% interval over the seeds of every run at a point"
        + ("; dashed: references at each point" if ref_styles else ""),
        fontsize=9,
    )
    return plots.save(fig, stem)


def curves(found: Sequence[Run], stem: Path) -> list[Path]:
    """The overlays of every run's training curves (and, for sequence runs, loss by position)."""
    frames = {r.label: runs.load_metrics(r.path) for r in found}
    primaries = {r.label: next(iter(r.summary.get("references", {"gd": None}))) for r in found}
    paths = plots.compare(frames, primaries, stem)
    by_position = {r.label: r.summary for r in found if "loss_by_position" in r.summary.get("final", {})}
    if by_position:
        paths += plots.compare_by_position(by_position, stem.with_name(stem.name + "_by_position"))
    return paths


@dataclass
class Comparison:
    """What `write` produced: the tables, and the files by kind (relative to the output folder)."""

    params: list[str]
    groups: list[Group]
    runs_df: pd.DataFrame
    groups_df: pd.DataFrame
    files: dict[str, Any]


def write(inputs: Inputs, out: Path, xs: Sequence[str], names: Sequence[str]) -> Comparison:
    """Tables (`compare.csv` per run, `groups.csv` per point), curve overlays, one figure per x
    parameter (`final_vs_<x>`) and the index `compare.json`, into the new folder `out`."""
    params = parameters(inputs.runs)
    groups = group(inputs.runs, params)
    out.mkdir(parents=True)
    runs_df, groups_df = runs_table(inputs.runs, params), groups_table(groups, params, final_metrics(inputs.runs))
    runs_df.to_csv(out / RUNS_TABLE, index=False)
    groups_df.to_csv(out / GROUPS_TABLE, index=False)
    rel = lambda paths: [str(p.relative_to(out)) for p in paths]
    figures = {
        x: rel(final_vs_parameter(groups, params, x, names, out / f"final_vs_{x.replace('.', '_')}")) for x in xs
    }
    files = {
        "tables": {"runs": RUNS_TABLE, "groups": GROUPS_TABLE},
        "curves": rel(curves(inputs.runs, out / "compare")),
    }
    files["final_vs_parameter"] = figures
    index = {
        "kind": "icl-gd compare",
        "version": 1,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "inputs": inputs.sources,
        "skipped": inputs.skipped,
        "parameters": params,
        "values": {k: list({_key(g.point[k]): g.point[k] for g in groups}.values()) for k in params},
        "metrics": final_metrics(inputs.runs),
        "plotted": {"x": list(xs), "metrics": list(names)},
        "runs": [
            {"label": r.label, "path": str(r.path), "sweep": r.sweep and str(r.sweep), "status": r.status}
            | {"group": next(i for i, g in enumerate(groups) if any(r is m for m in g.runs))}
            | {"seeds": r.summary.get("seeds")}
            for r in inputs.runs
        ],
        "groups": [
            {
                "label": g.label,
                "point": g.point,
                "runs": [str(r.path) for r in g.runs],
                "status": g.statuses(),
                "final": {n: s for n in final_metrics(inputs.runs) if (s := g.final(n)) is not None},
                "references": g.references(),
            }
            for g in groups
        ],
        "files": files,
    }
    runs.write_json(out / COMPARE_FILE, index)
    return Comparison(params, groups, runs_df, groups_df, files)

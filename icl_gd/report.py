"""`icl-gd report PATH`: one self-contained HTML page for a run directory, a sweep or an
`icl-gd compare` folder, to open offline or mail.

Figures are embedded as base64 PNG data URIs and the style is inline CSS: the page loads no
script and no external resource. Every value is escaped with the standard library's `html`.
A kind of folder is a registered `Kind` (how to recognise it, how to render it); `write` renders
the first kind that recognises PATH.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pandas as pd
import yaml

from icl_gd import analyses, runs

REPORT_FILE = "report.html"
SWEEP_FILE = "sweep.json"  # the index a sweep writes next to its numbered run directories
COMPARE_TABLE, COMPARE_INDEX = "compare.csv", "compare.json"  # what `icl-gd compare` writes
MAX_ROWS = 60  # rows of a CSV shown in a table; the file holds them all
MAX_LIST = 8  # a list longer than this is summarised (count and range), in full in the JSON files

STATUS_COLORS = {"completed": "#2e7d32", "failed": "#c62828", "interrupted": "#ef6c00", "running": "#ef6c00"}

CSS = """
:root { --ink: #1d2433; --muted: #5b6475; --line: #dde2ea; --accent: #1f4e8c; --head: #1f2a44; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f6f9; color: var(--ink);
  font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: var(--head); color: #fff; padding: 22px 32px 18px; }
header h1 { margin: 0; font-size: 22px; font-weight: 650; }
header .path { color: #b8c2d6; font: 12px ui-monospace, Menlo, Consolas, monospace; margin-top: 4px;
  word-break: break-all; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 10px; font-size: 12px; font-weight: 650;
  letter-spacing: .04em; text-transform: uppercase; color: #fff; vertical-align: 3px; margin-left: 10px; }
dl.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 10px 24px;
  margin: 16px 0 0; }
dl.facts dt { font-size: 11px; text-transform: uppercase; letter-spacing: .05em; color: #b8c2d6; }
dl.facts dd { margin: 0; font-size: 15px; font-weight: 600; }
details dl.facts dt { color: var(--muted); }
nav { background: #fff; border-bottom: 1px solid var(--line); padding: 8px 32px; font-size: 13px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 18px; }
main { max-width: 1240px; margin: 0 auto; padding: 4px 32px 32px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 14px 20px 10px;
  margin: 18px 0; }
section section { border: none; padding: 0; margin: 12px 0; }
h2 { font-size: 17px; margin: 0 0 10px; color: var(--accent); border-bottom: 1px solid var(--line);
  padding-bottom: 6px; }
h3 { font-size: 15px; margin: 10px 0 6px; color: var(--ink); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0 14px; }
caption { caption-side: top; text-align: left; font-weight: 600; color: var(--muted); padding: 2px 0 6px; }
th, td { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #eef1f6; font-weight: 600; vertical-align: bottom; }
td.num { text-align: right; white-space: nowrap; font: 12px ui-monospace, Menlo, Consolas, monospace;
  font-variant-numeric: tabular-nums; }
table.kv td.num { text-align: left; }
tbody tr:nth-child(even) td { background: #f9fafc; }
.cards { column-width: 200px; column-gap: 28px; }
.cards .scroll { break-inside: avoid; }
.pair { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 0 36px; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 14px; }
figure.wide { grid-column: 1 / -1; }
figure { margin: 0 0 8px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { font-size: 12px; color: var(--muted); margin-top: 3px; }
.note { border-left: 4px solid var(--accent); background: #eef3fb; padding: 8px 12px; margin: 6px 0 12px; }
.note.bad { border-left-color: #c62828; background: #fdecea; }
.muted { color: var(--muted); font-size: 12px; }
details.point { border: 1px solid var(--line); border-radius: 6px; margin: 10px 0; padding: 0 14px; }
details > summary { cursor: pointer; font-weight: 600; padding: 8px 0; }
pre { background: #f3f4f7; border: 1px solid var(--line); padding: 10px; overflow: auto; font-size: 12px; }
footer { color: var(--muted); font-size: 12px; text-align: center; padding: 0 0 24px; }
@media print { header, .badge { print-color-adjust: exact; -webkit-print-color-adjust: exact; }
  nav { display: none; } section { break-inside: avoid-page; } }
"""


class ReportError(ValueError):
    """Bad input to `write`, in one line naming the argument and what is allowed."""


# Formatting: every value shown goes through `fmt` and `html.escape`.


def esc(value: object) -> str:
    return html.escape(str(value))


def _is_stats(value: object) -> bool:
    return isinstance(value, dict) and "mean" in value and "ci95" in value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value: object) -> str:
    """A value as text: 4 significant digits, `mean [lo, hi]` for a `{mean, ci95}` entry, short
    lists in full, long ones as their count and range, a matrix as its shape."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if _is_stats(value):
        stats = cast(dict, value)
        lo, hi = stats["ci95"]
        bounds = "" if lo is None or isinstance(lo, list) else f" [{lo:.4g}, {hi:.4g}]"
        return fmt(stats["mean"]) + bounds
    if isinstance(value, list):
        if value and isinstance(value[0], list):
            return f"{len(value)}x{len(value[0])} matrix"
        if len(value) > MAX_LIST:
            numbers = [v for v in value if _is_number(v)]
            span = f" in [{min(numbers):.3g}, {max(numbers):.3g}]" if numbers else ""
            return f"{len(value)} values{span}"
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    return str(value)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys; `{mean, ci95}` entries and lists are leaves."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not _is_stats(value):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# HTML pieces.


NUMERIC = re.compile(r"[-+0-9.e\[\], *]*[0-9][-+0-9.e\[\], *]*")  # 0.2, 1e-05, [1, -2], 3 [2, 4], 0.5 *


def _cell(value: object) -> str:
    text = fmt(value)
    return f'<td class="num">{esc(text)}</td>' if NUMERIC.fullmatch(text) else f"<td>{esc(text)}</td>"


def table(
    table_id: str, caption: str, header: Sequence[str], rows: Iterable[Sequence[object]], kv: bool = False
) -> str:
    """A table with an id and a caption; numbers in monospace, right-aligned (left in a `kv`
    table of fields and values)."""
    head = f"<thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in header)}</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    kind = ' class="kv"' if kv else ""
    return (
        f'<div class="scroll"><table id="{esc(table_id)}"{kind}>'
        f"<caption>{esc(caption)}</caption>{head}<tbody>{body}</tbody></table></div>"
    )


def csv_table(table_id: str, df: pd.DataFrame, caption: str, transpose: bool = True) -> str:
    """A CSV file's data frame as a table (its first `MAX_ROWS` rows); `transpose`: rows become
    columns, headed by the first column (runs as columns, metrics as rows)."""
    if transpose:
        df = df.set_index(df.columns[0]).T.reset_index(names="")
    shown = df.head(MAX_ROWS)
    more = f" (first {MAX_ROWS} of {len(df)} rows)" if len(df) > MAX_ROWS else ""
    rows = [[None if pd.isna(v) else v for v in row] for row in shown.itertuples(index=False)]
    return table(table_id, caption + more, [str(c) for c in df.columns], rows)


WIDE_PX = 1600  # a figure at least this wide (multi-panel) takes a row of its own


def figure(path: Path, root: Path) -> str:
    """A PNG file embedded as a data URI, captioned with its path under `root`."""
    data = path.read_bytes()
    wide = int.from_bytes(data[16:20], "big") >= WIDE_PX  # the IHDR chunk's width
    kind = ' class="wide"' if wide else ""
    return (
        f'<figure{kind}><img alt="{esc(path.stem)}" '
        f'src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"<figcaption>{esc(path.relative_to(root))}</figcaption></figure>"
    )


def figures(paths: Iterable[Path], root: Path) -> str:
    items = "".join(figure(p, root) for p in paths)
    return f'<div class="figures">{items}</div>' if items else ""


def section(section_id: str, title: str, *parts: str, level: int = 2) -> str:
    return f'<section id="{esc(section_id)}"><h{level}>{esc(title)}</h{level}>{"".join(parts)}</section>'


def note(text: str, bad: bool = False) -> str:
    return f'<p class="note{" bad" if bad else ""}">{esc(text)}</p>'


def facts(pairs: Iterable[tuple[str, str]]) -> str:
    items = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in pairs)
    return f'<dl class="facts">{items}</dl>'


def badge(status: str) -> str:
    color = STATUS_COLORS.get(status, "#757575")
    return f'<span class="badge" style="background:{color}">{esc(status)}</span>'


Section = tuple[str, str, str]  # (id, title for the links, html)


def page(title: str, status: str | None, path: Path, header_facts: str, sections: Sequence[Section]) -> str:
    """The whole document: a header (title, status, facts), links to the sections, the sections."""
    links = "".join(f'<a href="#{esc(sid)}">{esc(name)}</a>' for sid, name, _ in sections)
    generated = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}{badge(status) if status else ''}</h1>"
        f'<div class="path">{esc(path.resolve())}</div>{header_facts}</header>'
        f"<nav>{links}</nav><main>{''.join(body for _, _, body in sections)}</main>"
        f"<footer>icl-gd report, generated {esc(generated)}; self-contained (figures embedded, no external "
        "resources).</footer></body></html>\n"
    )


# A run directory.


@dataclass(frozen=True)
class Run:
    path: Path
    summary: dict
    config: dict
    config_text: str

    @classmethod
    def load(cls, path: Path) -> Run:
        try:
            text = (path / runs.CONFIG_FILE).read_text()
            config, summary = yaml.safe_load(text), runs.load_summary(path)
        except (ValueError, OSError, yaml.YAMLError) as err:  # json.JSONDecodeError is a ValueError
            raise ReportError(f"PATH: {path} cannot be read ({str(err).splitlines()[0]})") from None
        if not isinstance(config, dict) or not isinstance(summary, dict):
            raise ReportError(
                f"PATH: {path} cannot be read ({runs.CONFIG_FILE} / {runs.SUMMARY_FILE} is not a mapping)"
            )
        return cls(path, summary, config, text)

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "unknown"))

    def final(self, metric: str) -> dict | None:
        return self.summary.get("final", {}).get(metric)


def _is_run(path: Path) -> bool:
    return (path / runs.SUMMARY_FILE).is_file() and (path / runs.CONFIG_FILE).is_file()


def _wall(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _model_text(cfg: dict) -> str:
    model = cfg.get("model", {})
    parts = [f"{model.get('layers', '?')} x {model.get('attention', '?')}", f"{model.get('heads', 1)} head(s)"]
    parts += [name for name in ("recurrent", "layernorm", "mlp", "input_mlp") if model.get(name)]
    return ", ".join(parts)


def _task_text(cfg: dict) -> str:
    task = cfg.get("task", {})
    dims = {"dim": "d", "n_context": "N", "state_dim": "D", "length": "T"}
    return f"{task.get('kind', '?')} " + " ".join(f"{s}={task[k]}" for k, s in dims.items() if k in task)


def run_facts(run: Run) -> list[tuple[str, str]]:
    """The header of a run: what was trained, on what, how long, and where it ended."""
    s, train = run.summary, run.config.get("train", {})
    devices = f"{s.get('device', '-')}" + (f" x {s['n_devices']}" if s.get("n_devices", 1) != 1 else "")
    return [
        ("experiment", str(s.get("experiment", run.config.get("name", "-")))),
        ("task", _task_text(run.config)),
        ("model", _model_text(run.config)),
        ("seeds", f"{s.get('seeds', '-')} (base seed {train.get('seed', '-')})"),
        ("steps", str(train.get("steps", "-"))),
        ("wall time", _wall(s.get("wall_time_s"))),
        ("device", devices),
        ("final loss", fmt(run.final("loss"))),
        ("model cos", fmt(run.final("model_cos"))),
    ]


def _status_note(summary: dict) -> str:
    if "failure" in summary:
        f = summary["failure"]
        return note(f"failed at step {f.get('step')}, seed {f.get('seed')}: {f.get('reason')}", bad=True)
    if "interruption" in summary:
        i = summary["interruption"]
        return note(f"interrupted by {i.get('signal')} at step {i.get('step')}; resume with icl-gd train --resume")
    return ""


def _results(run: Run, prefix: str) -> str:
    """Final metrics (mean, 95% interval, each seed) beside the references, then per-layer means
    for deep models."""
    final = run.summary.get("final", {})
    shown = {k: v for k, v in final.items() if _is_stats(v) and not isinstance(v["mean"], list)}
    by_position = [k for k, v in final.items() if _is_stats(v) and isinstance(v["mean"], list)]
    rows = [
        (name, stats["mean"], None if stats["ci95"][0] is None else stats["ci95"], stats.get("per_seed"))
        for name, stats in shown.items()
    ]
    metrics_table = table(
        f"{prefix}final-metrics",
        f"final metrics on the evaluation set: mean over {run.summary.get('seeds', '?')} seed(s), "
        "Student-t 95% interval",
        ("metric", "mean", "95% interval", "per seed"),
        rows,
    )
    parts = [_status_note(run.summary), f'<div class="pair">{metrics_table}{_references(run, prefix)}</div>']
    if by_position:
        parts.append(f'<p class="muted">By position ({esc(", ".join(by_position))}): in summary.json and plots/.</p>')
    per_layer = run.summary.get("per_layer") or []
    if len(per_layer) > 1:
        metrics = list(dict.fromkeys(m for layer in per_layer for m in layer))
        parts.append(
            table(
                f"{prefix}per-layer",
                "per layer: the readout after layer k against k steps of each reference (mean over seeds)",
                ("layer", *metrics),
                [(k + 1, *[layer.get(m, {}).get("mean") for m in metrics]) for k, layer in enumerate(per_layer)],
            )
        )
    return "".join(parts)


def _references(run: Run, prefix: str) -> str:
    refs = run.summary.get("references", {})
    rows = [
        (
            name,
            fmt({k: v for k, v in entry.items() if k not in ("loss", "loss_by_position")}) or "-",
            entry.get("loss"),
        )
        for name, entry in refs.items()
        if isinstance(entry, dict)
    ]
    return table(
        f"{prefix}references",
        "references fitted on the task (first: the primary; *_closed_form: expected loss, closed form)",
        ("reference", "parameters", "loss"),
        rows,
    )


def explain_rows(report: dict) -> tuple[list[str], list[list[object]]]:
    """`explain`'s ranking as a table: each family's BIC above the winner, held-out `1-R^2` (also
    over the noise floor, * within it), alignment to the model, shifted sets' `1-R^2`, loss."""
    rank, fams = report["ranking"], report["families"]
    shifted = [s for s in report.get("sets", []) if s != "heldout"]
    header = ["family", "params", "BIC - winner [95%]", "1-R^2", "1-R^2 / floor", "model cos", "preds diff"]
    header += ["model diff", *[f"1-R^2 {s}" for s in shifted], "loss"]
    rows = []
    for name in rank["order"]:
        fam, held = fams[name], fams[name]["heldout"]
        within = " *" if name in report.get("within_floor", ()) else ""
        rows.append(
            [
                name,
                fam.get("n_params"),
                rank["delta"][name],
                held["nmse"]["mean"],
                fmt(fam.get("nmse_over_floor")) + within,
                *[held[m]["mean"] for m in ("model_cos", "preds_diff", "model_diff")],
                *[fam[s]["nmse"]["mean"] for s in shifted],
                held["loss"]["mean"],
            ]
        )
    return header, rows


def _explain(run: Run, prefix: str) -> str:
    folder = run.path / analyses.EXPLAIN_DIR
    report = _read_json(folder / analyses.EXPLAIN_FILE)
    header, rows = explain_rows(report)
    parts = [
        note(str(report.get("verdict", "")), bad=not report.get("explains", False)),
        table(
            f"{prefix}explain-ranking",
            f"which algorithm? {report.get('seeds', '?')} seed(s), {report.get('n_tasks', '?')} tasks per set; "
            f"{report['ranking'].get('criterion', '')}",
            header,
            rows,
        ),
    ]
    floors = report.get("floor", {}).get("sources", {})
    if floors:
        parts.append(
            table(
                f"{prefix}explain-floor",
                "noise floor: 1-R^2 between models that should agree (the floor used is marked)",
                ("source", "1-R^2 [95%]", "pairs", "used"),
                [
                    (source, e.get("nmse"), e.get("pairs"), "yes" if source == report["floor"].get("source") else "")
                    for source, e in floors.items()
                ],
            )
        )
    if report.get("steps", 1) > 1:
        names = report["ranking"]["order"]
        parts.append(
            table(
                f"{prefix}explain-layers",
                "per layer: 1-R^2 of layer k's readout against step k (held-out)",
                ("family", *[str(k + 1) for k in range(report["steps"])]),
                [(n, *[1 - v for v in report["families"][n]["per_layer"]["r2"]]) for n in names],
            )
        )
    bands = report.get("bands", {})  # sequence models: a ranking per band of positions
    if bands:
        rows = []
        for band, e in bands.items():
            best = e["ranking"]["winner"]
            held = e["families"][best]["heldout"]["nmse"]["mean"]
            rows.append((band, "{}-{}".format(*e["positions"]), best, held, ", ".join(e["ranking"]["order"][1:4])))
        header = ("band", "positions", "best", "1-R^2", "then")
        parts.append(table(f"{prefix}explain-bands", "the best family per band of positions", header, rows))
    weights = (report.get("weights", {}).get("per_seed") or [[]])[0]  # regression: the GD blocks, first seed
    if weights:
        keys = ("kq_outside_gd", "pv_outside_gd", "pv_outside_gdpp", "kq_x_block_off_identity", "implied_eta")
        header = ("layer", "head", "W_KQ outside GD", "W_PV outside GD", "W_PV outside GD++", "W_KQ x-block off I")
        rows = [(w["layer"], w["head"], *[w.get(k) for k in keys], w.get("implied_gamma")) for w in weights]
        caption = f"weights of seed {(report.get('seed_ids') or [0])[0]}: norms outside the blocks GD writes"
        parts.append(table(f"{prefix}explain-weights", caption, (*header, "implied eta", "implied gamma"), rows))
    parts.append(figures(sorted(folder.glob("*.png")), run.path))
    return "".join(parts)


def _analysis(run: Run, name: str, prefix: str) -> str:
    """One analysis: its summary entry (the CSV's rows left to the CSV) as a table, its CSV tables,
    its figures."""
    folder = run.path / "analyses" / name
    result = {k: v for k, v in run.summary.get("analyses", {}).get(name, {}).items() if k not in ("rows", "file")}
    flat = flatten(result).items()
    parts = [table(f"{prefix}analysis-{name}", f"{name}: results", (), flat, kv=True)] if flat else []
    parts += [
        csv_table(f"{prefix}analysis-{name}-{p.stem}", pd.read_csv(p), p.name, transpose=False)
        for p in sorted(folder.glob("*.csv"))
    ]
    parts.append(figures(sorted(folder.glob("*.png")), run.path))
    return section(f"{prefix}analysis-{name}-section", name, *parts, level=3)


def _analyses(run: Run, prefix: str) -> str:
    folder = run.path / "analyses"
    names = list(run.summary.get("analyses", {})) + sorted(p.name for p in folder.glob("*") if p.is_dir())
    names = [n for n in dict.fromkeys(names) if n != "explain"]  # explain has a section of its own
    return "".join(_analysis(run, name, prefix) for name in names)


def _configuration(run: Run, prefix: str) -> str:
    """The resolved configuration, one card per group, then the file itself (collapsed)."""
    groups = {k: v for k, v in run.config.items() if isinstance(v, dict)}
    top = {k: v for k, v in run.config.items() if not isinstance(v, dict)}
    cards = [table(f"{prefix}config", "run", (), top.items(), kv=True)] if top else []
    cards += [table(f"{prefix}config-{g}", g, (), flatten(v).items(), kv=True) for g, v in groups.items()]
    raw = f"<details><summary>{esc(runs.CONFIG_FILE)}</summary><pre>{esc(run.config_text)}</pre></details>"
    return f'<div class="cards">{"".join(cards)}</div>{raw}'


def _environment(run: Run, prefix: str) -> str:
    s = run.summary
    rows = [(key, s[key]) for key in ("backend", "device", "n_devices", "devices") if key in s]
    rows += [("wall time", _wall(s.get("wall_time_s"))), *s.get("versions", {}).items()]
    return table(f"{prefix}versions", "summary.json", (), rows, kv=True)


def run_sections(run: Run, prefix: str = "", level: int = 2) -> list[Section]:
    """A run's sections, in reading order; `prefix` keeps ids unique on a sweep's page."""
    plots = sorted((run.path / "plots").glob("*.png"))
    has_explain = (run.path / analyses.EXPLAIN_DIR / analyses.EXPLAIN_FILE).is_file()
    analysed = _analyses(run, prefix)
    parts = [
        ("results", "Results", _results(run, prefix)),
        ("figures", "Training curves", figures(plots, run.path)),
        ("explain", "Explain: which algorithm does the model run?", _explain(run, prefix) if has_explain else ""),
        ("analyses", "Analyses", analysed),
        ("configuration", "Configuration", _configuration(run, prefix)),
        ("environment", "Versions and devices", _environment(run, prefix)),
    ]
    return [
        (f"{prefix}{sid}", title, section(f"{prefix}{sid}", title, body, level=level))
        for sid, title, body in parts
        if body
    ]


def render_run(path: Path) -> str:
    run = Run.load(path)
    title = f"{run.summary.get('experiment', path.name)}: run report"
    return page(title, run.status, path, facts(run_facts(run)), run_sections(run))


# A sweep: sweep.json's points, or the numbered run directories of a Hydra multirun.


@dataclass(frozen=True)
class Point:
    path: Path
    params: dict
    status: str  # sweep.json's; a run directory's own summary.json is read afresh


def _numbered(path: Path) -> list[Path]:
    dirs = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit() and _is_run(p)]
    return sorted(dirs, key=lambda p: int(p.name))


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (ValueError, OSError) as err:
        raise ReportError(f"PATH: {file} cannot be read ({str(err).splitlines()[0]})") from None


def _load_sweep(path: Path) -> tuple[dict, list[Point]]:
    """sweep.json (empty without one) and the points: from its `points` ({dir, params, status}),
    or the numbered run directories with the config fields that differ between them as params."""
    if (path / SWEEP_FILE).is_file():
        index = _read_json(path / SWEEP_FILE)
        points = [
            Point(path / str(p["dir"]), dict(p.get("params") or {}), str(p.get("status", "missing")))
            for p in index.get("points", [])
        ]
        return index, points
    dirs = _numbered(path)
    configs = [flatten(Run.load(d).config) for d in dirs]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    swept = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
    return {}, [Point(d, {k: c.get(k) for k in swept}, "missing") for d, c in zip(dirs, configs, strict=True)]


def _point_details(i: int, point: Point, run: Run | None, status: str) -> str:
    """A point's run, collapsed: its header facts and every section of its own report."""
    label = f"#{i} ({point.path.name}/) " + " ".join(f"{k}={fmt(v)}" for k, v in point.params.items())
    if run is None:
        missing = note(f"{point.path}: no run directory ({runs.SUMMARY_FILE} + {runs.CONFIG_FILE})", bad=True)
        return (
            f'<details class="point" id="point-{i}"><summary>{esc(label)} ({esc(status)})</summary>{missing}</details>'
        )
    body = "".join(h for _, _, h in run_sections(run, prefix=f"point-{i}-", level=3))
    summary = f"{label} ({status}, final loss {fmt(run.final('loss'))})"
    return (
        f'<details class="point" id="point-{i}"><summary>{esc(summary)}</summary>'
        f"{facts(run_facts(run))}{body}</details>"
    )


def render_sweep(path: Path) -> str:
    index, points = _load_sweep(path)
    loaded = {p.path: Run.load(p.path) for p in points if _is_run(p.path)}
    status = {p.path: loaded[p.path].status if p.path in loaded else p.status for p in points}
    params = list(dict.fromkeys(k for p in points for k in p.params))
    rows = []
    for i, p in enumerate(points):
        run = loaded.get(p.path)
        finals = [run.final(m) if run else None for m in ("loss", "model_cos")]
        wall = _wall(run.summary.get("wall_time_s")) if run else "-"
        rows.append([i, p.path.name, *[p.params.get(k) for k in params], status[p.path], *finals, wall])
    header = ["#", "dir", *params, "status", "final loss [95%]", "model cos [95%]", "wall time"]
    command = note(str(index["command"])) if index.get("command") else ""
    points_table = table("sweep-points", f"{len(points)} points of the sweep", header, rows)
    details = [_point_details(i, p, loaded.get(p.path), status[p.path]) for i, p in enumerate(points)]
    sections: list[Section] = [
        ("points", "Points", section("points", "Points", command, points_table)),
        ("runs", "Runs", section("runs", "Runs", *details)),
    ]
    for c in sorted(path.iterdir()):  # `icl-gd compare` folders inside the sweep (the Makefile's sweeps)
        if c.is_dir() and (c / COMPARE_TABLE).is_file():
            title = f"Comparison ({c.name}/)"
            sections.append(
                (f"comparison-{c.name}", title, section(f"comparison-{c.name}", title, _comparison_body(c)))
            )
    found = list(loaded.values())
    experiments = sorted({str(r.summary.get("experiment")) for r in found})
    header_facts = [
        ("points", str(len(points))),
        ("status", _counts(Counter(status.values()))),
        ("swept", ", ".join(params) or "-"),
        ("experiment", ", ".join(experiments) or "-"),
        ("seeds per point", ", ".join(sorted({str(r.summary.get("seeds")) for r in found})) or "-"),
        ("total wall time", _wall(sum(r.summary.get("wall_time_s") or 0.0 for r in found))),
        ("device", ", ".join(sorted({str(r.summary.get("device")) for r in found})) or "-"),
        ("launcher", str(index.get("launcher", {}).get("name", "-"))),
    ]
    title = f"{', '.join(experiments) or path.name}: sweep report"
    return page(title, _overall(list(status.values())), path, facts(header_facts), sections)


def _counts(statuses: Mapping[str, int]) -> str:
    """`4 completed, 1 failed`."""
    return ", ".join(f"{n} {s}" for s, n in statuses.items()) or "-"


def _overall(statuses: list[str]) -> str:
    return "completed" if set(statuses) == {"completed"} else "incomplete"


# A comparison folder written by `icl-gd compare`.


def _groups_table(index: dict) -> str:
    """compare.json's groups (runs at one point) as columns: the point, its runs, each final metric
    (mean and 95% interval over the seeds of all its runs), the references' losses."""
    groups = index["groups"]
    params = index.get("parameters", [])
    refs = list(dict.fromkeys(r for g in groups for r in g.get("references", {})))
    rows = [(k, *[g["point"].get(k) for g in groups]) for k in params]
    rows += [("runs", *[len(g["runs"]) for g in groups]), ("status", *[_counts(g["status"]) for g in groups])]
    rows += [(m, *[g["final"].get(m) for g in groups]) for m in index.get("metrics", [])]
    rows += [(f"{r} loss (reference)", *[g["references"].get(r) for g in groups]) for r in refs]
    caption = "final metrics by point: mean [95% interval] over the seeds of every run at the point"
    return table("compare-groups", caption, ("", *[g["label"] for g in groups]), rows)


def _comparison_body(path: Path) -> str:
    """compare.json's groups (when it has them), the figures, the runs, each run's final metrics
    (compare.csv, runs as columns), the other compare_*.csv tables (explain side by side)."""
    index = _read_json(path / COMPARE_INDEX) if (path / COMPARE_INDEX).is_file() else {}
    parts = [note(f"left out: {s.get('path')} ({s.get('status')})", bad=True) for s in index.get("skipped", [])]
    parts += [_groups_table(index)] if index.get("groups") else []
    parts.append(figures(sorted(path.glob("*.png")), path))
    if index.get("runs"):
        columns = ("label", "status", "seeds", "group", "path")
        parts.append(
            table("compare-runs", "runs compared", columns, [[r.get(c) for c in columns] for r in index["runs"]])
        )
    df = pd.read_csv(path / COMPARE_TABLE)
    parts.append(
        csv_table("compare", df.drop(columns=["path"], errors="ignore"), "each run's final metrics (mean over seeds)")
    )
    parts += [csv_table(p.stem, pd.read_csv(p), p.name, transpose=False) for p in sorted(path.glob("compare_*.csv"))]
    return "".join(parts)


def render_comparison(path: Path) -> str:
    df = pd.read_csv(path / COMPARE_TABLE)
    index = _read_json(path / COMPARE_INDEX) if (path / COMPARE_INDEX).is_file() else {}
    statuses = df["status"].astype(str).tolist() if "status" in df else []
    header_facts = [
        ("runs", str(len(df))),
        ("points", str(len(index["groups"])) if "groups" in index else "-"),
        ("varied", ", ".join(index.get("parameters", [])) or "-"),
        ("status", _counts(Counter(statuses))),
        ("seeds per run", ", ".join(sorted({str(s) for s in df["seeds"]})) if "seeds" in df else "-"),
        ("created", str(index.get("created", "-"))),
    ]
    overall = _overall(statuses) if statuses else None
    body = [("comparison", "Comparison", section("comparison", "Comparison", _comparison_body(path)))]
    return page(f"{path.name}: comparison report", overall, path, facts(header_facts), body)


# The kinds of folder, tried in order.


@dataclass(frozen=True)
class Kind:
    """`detect(path)`: whether PATH is of this kind; `render(path)`: its page; `what`: the kind in the
    error message that lists what PATH may be."""

    detect: Callable[[Path], bool]
    render: Callable[[Path], str]
    what: str


KINDS: dict[str, Kind] = {
    "run": Kind(_is_run, render_run, f"a run directory ({runs.SUMMARY_FILE} + {runs.CONFIG_FILE})"),
    "sweep": Kind(
        lambda p: (p / SWEEP_FILE).is_file() or bool(_numbered(p)),
        render_sweep,
        f"a sweep ({SWEEP_FILE}, or numbered run directories)",
    ),
    "comparison": Kind(
        lambda p: (p / COMPARE_TABLE).is_file(), render_comparison, f"an icl-gd compare folder ({COMPARE_TABLE})"
    ),
}


def kind_of(path: Path) -> str:
    """The first kind that recognises PATH, or ReportError naming PATH and what it may be."""
    allowed = "; allowed: " + ", ".join(k.what for k in KINDS.values())
    if not path.is_dir():
        raise ReportError(f"PATH: {path} is not a directory{allowed}")
    for name, kind in KINDS.items():
        if kind.detect(path):
            return name
    raise ReportError(f"PATH: {path} is not a run, sweep or comparison folder{allowed}")


def write(path: Path, out: Path | None = None) -> Path:
    """Render PATH's report into `out` (default `PATH/report.html`), which must not exist."""
    path = Path(path)
    name = kind_of(path)
    out = Path(out) if out is not None else path / REPORT_FILE
    if out.exists():
        raise ReportError(f"--out: {out} already exists; choose a new file (reports are never overwritten)")
    document = KINDS[name].render(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "x", encoding="utf-8") as file:  # "x": never over a file created meanwhile
        file.write(document)
    return out

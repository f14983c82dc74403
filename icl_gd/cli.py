"""`icl-gd`: train models, evaluate baselines, explain and compare runs from the command line.

Overrides are Hydra's (`experiment=single_layer train.seeds=5 task.dim=5`); `--multirun`
sweeps comma-separated values with the launcher chosen by `launcher=local|joblib|submitit_local|slurm`
(icl_gd.sweeps); `compare` reads run and sweep directories (icl_gd.comparison).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NoReturn, cast

import typer
from rich.console import Console
from rich.table import Table

from icl_gd import config as config_lib

logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)  # no "no TPU" notice on every run

app = typer.Typer(add_completion=False, no_args_is_help=True, help=cast(str, __doc__).splitlines()[0])
# JAX's persistent compilation cache: a second run of the same shapes loads its programs instead of
# compiling them (README, Performance). `ICL_GD_COMPILE_CACHE=off` turns it off.
COMPILE_CACHE_ENV = "ICL_GD_COMPILE_CACHE"


def compile_cache_dir() -> Path | None:
    """`$ICL_GD_COMPILE_CACHE`, else `$XDG_CACHE_HOME/icl-gd/jax` (`~/.cache/icl-gd/jax`); None when off."""
    chosen = os.environ.get(COMPILE_CACHE_ENV)
    if chosen is not None:
        return None if chosen.lower() in ("", "off", "0", "false") else Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "icl-gd" / "jax"


@app.callback()
def _startup() -> None:
    """Before any command: the persistent compilation cache, in a user cache folder."""
    folder = compile_cache_dir()
    if folder is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


console = Console()
OVERRIDES = typer.Argument(None, help="Hydra overrides, e.g. experiment=single_layer train.seeds=5")


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _load(overrides: list[str]):
    """A validated config whose analyses apply to it, or a one-line error (exit 2)."""
    from icl_gd import analyses, experiment

    try:
        cfg = config_lib.load_config(overrides)
        experiment.check(cfg)
        analyses.check(cfg)
    except config_lib.ConfigError as err:
        _fail(str(err))
    return cfg


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and value and isinstance(value[0], list):  # a matrix: in full in --json only
        diag = [row[i] for i, row in enumerate(value)]
        return f"{len(value)}x{len(value[0])} matrix, diagonal in [{min(diag):.3g}, {max(diag):.3g}]"
    return str(value)


def print_summary(summary: dict, run_dir: Path) -> None:
    table = Table(
        title=f"{summary['experiment']}: {summary['status']} in {summary['wall_time_s']:.1f} s "
        f"({summary['seeds']} seed(s))"
    )
    for column in ("metric", "mean", "95% interval"):
        table.add_column(column)
    for name, stats in summary["final"].items():
        if isinstance(stats["mean"], list):  # by position: in summary.json and plots/
            continue
        lo, hi = stats["ci95"]
        table.add_row(name, _fmt(stats["mean"]), "-" if lo is None else f"[{lo:.4g}, {hi:.4g}]")
    console.print(table)
    console.print(f"run directory: {run_dir}")


@app.command()
def train(
    overrides: list[str] | None = OVERRIDES,
    out: Path | None = typer.Option(
        None, "--out", help="Run directory (must not exist). Default runs/<experiment>/<timestamp>."
    ),
    multirun: bool = typer.Option(False, "--multirun", "-m", help="Sweep comma-separated override values with Hydra."),
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue an interrupted run to train.steps, or a sweep (its points not completed)."
    ),
):
    """Train a model and write its run directory (config, metrics, plots, checkpoints, summary).
    SIGINT / SIGTERM save the run and mark it `interrupted`; `--resume RUN_DIR` continues it, and
    `--resume SWEEP_DIR` a sweep (completed points are not re-run)."""
    from icl_gd import experiment, runs, sweeps

    overrides = list(overrides or [])
    if resume is not None:
        if overrides or out is not None or multirun:
            _fail("--resume: takes the run directory alone; allowed: no overrides, --out or --multirun with it")
        if (resume / sweeps.SWEEP_FILE).is_file():
            return _multirun([], resume, relaunch=True)
        return _run_job(lambda: experiment.resume(resume))
    if multirun:
        return _multirun(overrides, out)
    cfg = _load(overrides)
    run_dir = out if out is not None else runs.default_run_dir(cfg.name)
    try:
        runs.check_new(run_dir)
    except runs.RunDirExists as err:
        _fail(str(err))
    _run_job(lambda: experiment.train(cfg, run_dir))


def _run_job(job) -> None:
    """Train (or resume), then run the config's analyses on the run in memory; failures exit with
    one line: 2 for bad input, 1 for a diverged run, 128 + signal for an interrupted one."""
    from icl_gd import analyses, experiment, runs

    try:
        trained = job()
        analyses.run_all(trained)
    except (runs.RunDirError, config_lib.ConfigError) as err:
        _fail(str(err))
    except experiment.TrainingDiverged as err:
        _fail(str(err), code=1)
    except experiment.TrainingInterrupted as err:
        _fail(str(err), code=err.exit_code)
    print_summary(trained.summary, trained.run_dir)


def _multirun(overrides: list[str], out: Path | None, relaunch: bool = False) -> None:
    """Check the launcher and every point before anything is written, write `sweep.json`, then hand
    the sweep to Hydra's launcher; `relaunch`: continue the sweep in `out` with its own overrides."""
    from icl_gd import runs, sweeps

    try:
        index = sweeps.load_index(out) if relaunch and out is not None else None
        overrides = index["overrides"] if index is not None else overrides
        plan = sweeps.plan(overrides)
        jobs = config_lib.expand_sweep(plan.job_overrides)
        cfgs = [_load(job) for job in jobs]
        sweep_dir = out if out is not None else runs.default_run_dir(cfgs[0].name)
        if index is None:
            runs.check_new(sweep_dir)
            index = sweeps.new_index(overrides, plan, jobs, cfgs)
            sweep_dir.mkdir(parents=True)
        else:
            sweeps.relaunch(index, jobs)
    except (config_lib.ConfigError, sweeps.SweepError, runs.RunDirExists) as err:
        _fail(str(err))
    sweeps.write_index(sweep_dir, index)
    console.print(f"launching {len(jobs)} job(s) with launcher={plan.launcher} into {sweep_dir}")
    try:
        sweeps.launch(plan, sweep_dir, _hydra_entry)
    except KeyboardInterrupt as err:  # sweeps.SweepInterrupted from a point, or a second Ctrl-C
        stopped = str(err) or "SIGINT stopped the sweep"
        wait = "its SLURM jobs go on (squeue --me); once they have ended, " if plan.launcher == "slurm" else ""
        _fail(
            f"{stopped}; {wait}continue it with `icl-gd train --resume {sweep_dir}`",
            code=getattr(err, "exit_code", 130),
        )
    finally:
        sweeps.write_index(sweep_dir, index)
    table = Table(title=f"sweep {sweep_dir} ({sweeps.SWEEP_FILE})")
    for column in ("point", *index["swept"], "status"):
        table.add_column(column)
    for point in index["points"]:
        table.add_row(point["dir"], *[_fmt(v) for v in point["params"].values()], point["status"])
    console.print(table)
    console.print(f"compare the points with `icl-gd compare {sweep_dir}`")


def _hydra_entry(cfg) -> None:
    """One point of a sweep, in the launcher's process: trained, resumed (a requeued or relaunched
    job) or, completed before, left as it is; a diverged point is marked failed and the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig

    from icl_gd import experiment, sweeps

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with sweeps.requeue_on_preemption():
            trained = sweeps.run_point(cfg, run_dir)
    except experiment.TrainingDiverged as err:
        console.print(f"error: {err}")
        return
    if trained is None:
        status = sweeps.point_status(run_dir)
        stopped = sweeps.stopping(run_dir.parent) and status in (sweeps.PENDING, "interrupted")
        console.print(f"{run_dir}: {status}" + (" (the sweep is stopping)" if stopped else " before; not re-run"))
        return
    print_summary(trained.summary, trained.run_dir)


@app.command()
def baselines(
    overrides: list[str] | None = OVERRIDES,
    json_file: Path | None = typer.Option(None, "--json", help="Also write the table as JSON (must not exist)."),
):
    """Fit and evaluate the task's reference algorithms, without training: each reference's loss on
    the evaluation set (for sequence tasks, the mean over positions and the loss at each position)."""
    from icl_gd import experiment, runs

    cfg = _load(list(overrides or []))
    if json_file is not None and json_file.exists():
        _fail(f"--json: {json_file} already exists; choose a new file")
    refs = experiment.compute_references(cfg)
    data = {"references": refs.as_dict()}
    table = Table(title=f"references of task={refs.task.name} on {cfg.eval.n_tasks} evaluation sequences")
    for column in ("reference", "parameters", "loss"):
        table.add_column(column)
    for ref in refs.fitted:
        entry = data["references"][ref.name]
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in entry.items() if k not in ("loss", "loss_by_position"))
        table.add_row(f"{ref.name}: {ref.label}", params or "-", _fmt(entry["loss"]))
    for name, entry in refs.analytic.items():
        if entry is not None:
            table.add_row(
                f"{name} (expected, closed form)",
                ", ".join(f"{k}={_fmt(v)}" for k, v in entry.items() if k != "loss"),
                _fmt(entry["loss"]),
            )
    console.print(table)
    by_position = {
        name: e["loss_by_position"]
        for name, e in data["references"].items()
        if isinstance(e, dict) and "loss_by_position" in e
    }
    if by_position:
        positions = len(next(iter(by_position.values())))
        shown = sorted({1, 2, 3, 5, 10, 20, positions // 2, positions} & set(range(1, positions + 1)))
        table = Table(title="loss by position t (predicting s_{t+1} from s_1..s_t)")
        table.add_column("reference")
        for t in shown:
            table.add_column(f"t={t}")
        for name, losses in by_position.items():
            table.add_row(name, *[_fmt(losses[t - 1]) for t in shown])
        console.print(table)
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        runs.write_json(json_file, data)
        console.print(f"written: {json_file}")


@app.command()
def compare(
    paths: list[Path] = typer.Argument(..., help="Run directories and sweep directories (with sweep.json), mixed."),
    out: Path | None = typer.Option(
        None, "--out", help="Where the figures and tables go (must not exist). Default runs/compare/<timestamp>."
    ),
    x: list[str] | None = typer.Option(
        None, "--x", help="Parameter on the x axis of the final-metric figures (repeatable). Default: each that varies."
    ),
    metric: list[str] | None = typer.Option(
        None, "--metric", help="Final metric of those figures (repeatable). Default: loss and model_cos."
    ),
):
    """Group runs by the parameters that differ (from sweep.json, or from their configs); tabulate
    each group's final metrics (mean and 95% interval over the seeds of all its runs); plot final
    metrics against each parameter with the references at each point; overlay the curves; put the
    `explain` results side by side for runs that have RUN_DIR/explain/explain.json. Index: compare.json."""
    import json

    from icl_gd import analyses, comparison, runs, sweeps

    out = out if out is not None else runs.default_run_dir("compare")
    try:
        inputs = comparison.load(paths)
        params = comparison.parameters(inputs.runs)
        xs, names = comparison.check_options(x, metric, inputs.runs, params)
        runs.check_new(out)
    except (comparison.CompareError, sweeps.SweepError, runs.RunDirExists) as err:
        _fail(str(err))
    result = comparison.write(inputs, out, xs, names)
    for skipped in inputs.skipped:
        console.print(f"left out: {skipped['path']} ({skipped['status']})")
    refs = list(dict.fromkeys(name for g in result.groups for name in g.references()))
    table = Table(title="final metrics by point: mean [95% interval] over the seeds of every run at the point")
    for column in (*result.params, "runs", "seeds", "status", *names, *(f"{r} loss" for r in refs)):
        table.add_column(column, overflow="fold")
    for g, (_, row) in zip(result.groups, result.groups_df.iterrows(), strict=True):
        table.add_row(
            *[_fmt(g.point[k]) for k in result.params],
            *[str(row[c]) for c in ("runs", "seeds", "status")],
            *[_interval(s) if (s := g.final(n)) is not None else "-" for n in names],
            *[_fmt(g.references().get(r)) for r in refs],
        )
    (console if console.is_terminal else Console(width=200)).print(table)
    explained = {r.label: r.path / analyses.EXPLAIN_DIR / analyses.EXPLAIN_FILE for r in inputs.runs}
    reports = {label: json.loads(path.read_text()) for label, path in explained.items() if path.exists()}
    if reports:
        explain_df = explain_table(reports)
        explain_df.to_csv(out / "compare_explain.csv", index=False)
        table = Table(title="explain: BIC above each run's winner (held-out R^2); first rows: the verdicts")
        for column in explain_df.columns:
            table.add_column(str(column))
        for _, row in explain_df.iterrows():
            table.add_row(*[str(v) for v in row.tolist()])
        (console if console.is_terminal else Console(width=200)).print(table)
    console.print(f"written to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))


def explain_table(reports: dict[str, dict]):
    """Families (rows) by runs (columns): `BIC above the winner (R^2)`, after rows for the winner,
    its margin (95% interval) and whether it explains the model."""
    import pandas as pd

    names = list(dict.fromkeys(n for r in reports.values() for n in r["ranking"]["order"]))
    rows = [
        {"family": "winner", **{label: r["ranking"]["winner"] for label, r in reports.items()}},
        {"family": "margin", **{label: _interval(r["ranking"]["margin"]) for label, r in reports.items()}},
        {"family": "explains", **{label: str(r["explains"]) for label, r in reports.items()}},
    ]
    for name in names:
        row = {"family": f"{name}"}
        for label, r in reports.items():
            fam = r["families"].get(name)
            row[label] = (
                "-"
                if fam is None
                else (f"{r['ranking']['delta'][name]['mean']:.4g} ({fam['heldout']['r2']['mean']:.4f})")
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _interval(stats: dict) -> str:
    lo, hi = stats["ci95"]
    return _fmt(stats["mean"]) + ("" if lo is None else f" [{lo:.4g}, {hi:.4g}]")


@app.command("experiments")
def list_experiments():
    """List the named experiments (`experiment=<name>`)."""
    for name in config_lib.group_options("experiment"):
        first = (config_lib.CONF_DIR / "experiment" / f"{name}.yaml").read_text().splitlines()[1:3]
        console.print(f"[bold]{name}[/bold]: " + " ".join(line.lstrip("# ") for line in first))


@app.command()
def analyze(
    run_dir: Path = typer.Argument(..., help="A run directory written by `icl-gd train`."),
    name: str = typer.Argument(..., help="Analysis to run (see `analyses` in the experiment configs)."),
):
    """Run a post-training analysis on a finished run; results go to RUN_DIR/analyses/NAME/."""
    import json

    from icl_gd import analyses, runs

    if name not in analyses.REGISTRY:
        _fail(f"NAME: unknown analysis '{name}'; allowed: {', '.join(sorted(analyses.REGISTRY)) or '(none)'}")
    if not (run_dir / runs.SUMMARY_FILE).exists() or not (run_dir / runs.CONFIG_FILE).exists():
        _fail(f"RUN_DIR: {run_dir} is not a run directory (no {runs.SUMMARY_FILE} / {runs.CONFIG_FILE})")
    try:
        analyses.check(runs.load_config(run_dir), [name])
        result = analyses.run(name, runs.load(run_dir))
    except (config_lib.ConfigError, runs.RunDirError, analyses.ExplainError) as err:
        _fail(str(err))
    console.print_json(json.dumps(runs.json_ready(result)))


@app.command()
def explain(
    run_dir: Path = typer.Argument(..., help="A completed run directory written by `icl-gd train`."),
    seed: int = typer.Option(0, "--seed", help="The seed to explain."),
    seed_all: bool = typer.Option(False, "--seed-all", help="Explain every seed; 95% intervals across them."),
    tasks: int = typer.Option(2048, "--tasks", help="Tasks in the fit set and in each scoring set."),
    iters: int = typer.Option(50, "--iters", help="Gauss-Newton iterations per fit."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (must not exist). Default RUN_DIR/explain."),
):
    """Which algorithm does the trained model run? Fit GD, GD++, preconditioned GD, iterative
    solvers, ridge and softmax smoothers to its predictions, score them on held-out and shifted
    tasks, rank them by BIC and against the noise floor of the run's other seeds and previous
    checkpoint; write explain.json and figures."""
    from icl_gd import analyses, runs

    try:
        seeds = None if seed_all else [seed]
        analyses.check_explain(run_dir, seeds, tasks, iters, out)
        report, folder = analyses.explain_run(runs.load(run_dir), seeds=seeds, n_tasks=tasks, iters=iters, out=out)
    except analyses.ExplainError as err:
        _fail(str(err))
    print_explain(report)
    console.print(
        f"written: {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))}) in {report['wall_time_s']:.1f} s"
    )


def print_explain(report: dict) -> None:
    """The ranking table (mean over seeds; final readout; `1-R^2` is the model's prediction variance
    a family leaves unexplained), then per-layer `1-R^2` for deep models, the best family per band
    of positions for sequence models, weights and the verdict."""
    out = console if console.is_terminal else Console(width=200)
    rank, fams, sets = report["ranking"], report["families"], report["sets"]
    ood = [s for s in sets if s != "heldout"]
    table = Table(
        title=f"{report.get('experiment', '')}: {report['seeds']} seed(s), {report['n_tasks']} tasks per set; "
        f"{rank['criterion']}"
    )
    for column in (
        "family",
        "params",
        "BIC - winner [95%]",
        "1-R^2",
        "1-R^2 / floor",
        "model cos",
        "preds diff",
        "model diff",
        *[f"1-R^2 {s}" for s in ood],
        "loss",
    ):
        table.add_column(column)
    for name in rank["order"]:
        fam, held = fams[name], fams[name]["heldout"]
        table.add_row(
            name,
            str(fam["n_params"]),
            _interval(rank["delta"][name]),
            _fmt(held["nmse"]["mean"]),
            _fmt(fam.get("nmse_over_floor")) + (" *" if name in report.get("within_floor", ()) else ""),
            *[_fmt(held[m]["mean"]) for m in ("model_cos", "preds_diff", "model_diff")],
            *[_fmt(fam[s]["nmse"]["mean"]) for s in ood],
            _fmt(held["loss"]["mean"]),
        )
    out.print(table)
    out.print(f"model loss on held-out tasks: {_fmt(report['model']['heldout']['loss']['mean'])}")
    for source, entry in report["floor"]["sources"].items():
        used = " (the floor; * = within it)" if source == report["floor"]["source"] else ""
        steps = f", steps {entry['steps']}" if "steps" in entry else ""
        out.print(f"noise floor, {source}: 1-R^2 {_interval(entry['nmse'])} over {entry['pairs']} pair(s){steps}{used}")
    if report["steps"] > 1:
        layers = Table(title="per layer: 1-R^2 of layer k's readout against step k (held-out)")
        layers.add_column("family")
        for k in range(report["steps"]):
            layers.add_column(str(k + 1))
        for name in rank["order"]:
            layers.add_row(name, *[_fmt(1 - v) for v in fams[name]["per_layer"]["r2"]])
        out.print(layers)
    for band, entry in report.get("bands", {}).items():  # sequence models: a fit per band of positions
        lo, hi = entry["positions"]
        held = entry["families"][entry["ranking"]["winner"]]["heldout"]
        out.print(
            f"positions {lo}-{hi} ({band}): best {entry['ranking']['winner']} "
            f"(1-R^2 {_fmt(held['nmse']['mean'])}), then {', '.join(entry['ranking']['order'][1:4])}"
        )
    for row in report["weights"]["per_seed"][0]:
        out.print(
            f"weights layer {row['layer']} head {row['head']}: norm outside the GD blocks W_KQ "
            f"{row['kq_outside_gd']:.3g}, W_PV {row['pv_outside_gd']:.3g} (GD++ blocks {row['pv_outside_gdpp']:.3g}); "
            f"x-block of W_KQ off identity {row['kq_x_block_off_identity']:.3g}; "
            f"implied eta {row['implied_eta']:.4g}, gamma {row['implied_gamma']:.4g}"
        )
    out.print(f"[bold]{report['verdict']}[/bold]")


@app.command()
def report(
    path: Path = typer.Argument(..., help="A run directory, a sweep directory or an `icl-gd compare` folder."),
    out: Path | None = typer.Option(None, "--out", help="The HTML file (must not exist). Default PATH/report.html."),
):
    """Write one self-contained HTML page (figures embedded, tables, configuration, versions and
    devices; no external resources) for a run, a sweep or a comparison, to open offline or mail."""
    from icl_gd import report as report_lib

    try:
        written = report_lib.write(path, out)
    except report_lib.ReportError as err:
        _fail(str(err))
    console.print(f"written: {written} ({written.stat().st_size / 1e6:.2f} MB)", soft_wrap=True)

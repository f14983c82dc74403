"""Figures (PNG and PDF): training curves of a run against its references, the overlay of
several runs for `icl-gd compare`, and the figures of `icl-gd explain` (weight heatmaps, ranking,
per-layer agreement)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.stats

PANELS = (
    ("loss", "loss", "log"),
    ("preds_diff", "preds diff to GD", "log"),
    ("model_cos", "model cos to GD", "linear"),
    ("model_diff", "model diff to GD", "log"),
)


def band(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean over seeds and its Student-t 95% interval, per step."""
    grouped = df.groupby("step")[column]
    mean, std, count = cast(pd.Series, grouped.mean()), grouped.std(ddof=1), grouped.count()
    half = scipy.stats.t.ppf(0.975, np.maximum(count - 1, 1)) * std.fillna(0.0) / np.sqrt(count)
    return pd.DataFrame({"mean": mean, "lo": mean - half, "hi": mean + half})


def _plot_band(ax, df: pd.DataFrame, column: str, label: str, color=None, linestyle="-", seeds: bool = False):
    """Mean with its 95% band; with `seeds`, each seed as a thin line too (outliers stay visible)."""
    b = band(df, column)
    (line,) = ax.plot(b.index, b["mean"], label=label, color=color, linestyle=linestyle)
    ax.fill_between(b.index, b["lo"], b["hi"], color=line.get_color(), alpha=0.2, linewidth=0)
    if seeds and cast(pd.Series, df["seed"]).nunique() > 1:
        for _, per_seed in df.groupby("seed"):
            ax.plot(per_seed["step"], per_seed[column], color=line.get_color(), linewidth=0.6, alpha=0.35)
    return line


def run_title(summary: dict) -> str:
    """`<experiment> (task=<kind>)`, as a figure's title starts."""
    task = summary.get("task")
    return f"{summary.get('experiment', '')}" + (f" (task={task})" if task else "")


def save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def tracked_references(df: pd.DataFrame, summary: dict) -> list[str]:
    """The references a run tracked (columns `<name>_loss`), primary first (as in `summary.json`)."""
    return [name for name in summary.get("references", {}) if f"{name}_loss" in df]


def _column(metric: str, ref: str, primary: str) -> str:
    return metric if ref == primary else f"{metric}_{ref}"


REFERENCE_STYLES = ("-", "--", "-.", ":")


def training_curves(df: pd.DataFrame, summary: dict, stem: Path) -> list[Path]:
    """The loss (with each reference's loss and the interpolated model), then preds diff, model cos
    and model diff to each reference over training; mean over seeds, 95% band, each seed."""
    refs = tracked_references(df, summary)
    primary = refs[0]
    panels = [p for p in PANELS if p[0] in df]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.8), squeeze=False)
    axes = axes[0]
    _plot_band(axes[0], df, "loss", "trained model (thin: seeds)", seeds=True)
    for i, ref in enumerate(refs):
        entry = summary["references"][ref]
        steps = f", {entry['steps']} step(s)" if "steps" in entry else ""
        axes[0].axhline(
            entry["loss"],
            color=f"C{i + 1}",
            linestyle=REFERENCE_STYLES[i % 4],
            label=f"{ref}{steps}: {entry['loss']:.4g}",
        )
    if "interpolated_loss" in df and cast(pd.Series, df["interpolated_loss"]).notna().any():
        _plot_band(axes[0], df, "interpolated_loss", "interpolated", linestyle=":")
    # Keep the model in view: the interpolated model explodes while W_KQ's diagonal is near 0, and a
    # reference may be exact (OLS on noiseless tasks), far below it (its loss is in the legend).
    axes[0].set_yscale("log")
    loss = cast(pd.Series, df["loss"])
    axes[0].set_ylim(0.5 * float(loss.min()), 1.5 * float(loss.max()))
    for ax, (column, title, _scale) in zip(axes[1:], panels[1:], strict=True):
        for i, ref in enumerate(refs):
            _plot_band(
                ax,
                df,
                _column(column, ref, primary),
                f"to {ref}",
                color=f"C{i + 1}",
                linestyle=REFERENCE_STYLES[i % 4],
                seeds=ref == primary,
            )
        ax.set_title(title.replace("to GD", "to each reference"))
        ax.legend(fontsize=7)
    if "model_cos" in df:
        axes[[p[0] for p in panels].index("model_cos")].set_ylim(top=1.02)
    axes[0].set_title("loss")
    for ax, (_, _, scale) in zip(axes, panels, strict=True):
        ax.set_xlabel("training step")
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    seeds = summary.get("seeds", 1)
    fig.suptitle(f"{run_title(summary)}: {seeds} seed(s), mean and 95% interval", fontsize=10)
    return save(fig, stem)


def per_layer(df: pd.DataFrame, summary: dict, stem: Path) -> list[Path]:
    """Readout after layer k against k steps of each stepwise reference (and the others' final
    loss): loss and, with stepwise references, alignment per layer; then over training each
    layer's alignment with the last stepwise reference (its loss, when the task has none)."""
    layers = summary["per_layer"]
    ks = np.arange(1, len(layers) + 1)
    tracked = tracked_references(df, summary)
    stepwise = [r for r in tracked if f"{r}_loss" in layers[0]]
    align = "model_cos" if "model_cos" in layers[0] else "preds_diff"
    mean = lambda name: np.array([layer[name]["mean"] for layer in layers])
    fig, axes = plt.subplots(1, 3 if stepwise else 2, figsize=(14 if stepwise else 9.5, 3.8))
    by_layer, over_training = axes[0], axes[-1]
    by_layer.plot(ks, mean("loss"), "o-", label="trained model")
    for i, ref in enumerate(tracked):
        style = {"color": f"C{i + 1}", "linestyle": REFERENCE_STYLES[(i + 1) % 4]}
        if ref in stepwise:
            by_layer.plot(ks, mean(f"{ref}_loss"), marker="s^vo"[i % 4], label=f"{ref}, k steps", **style)
            axes[1].plot(ks, mean(_column(align, ref, tracked[0])), marker="s^vo"[i % 4], label=f"to {ref}", **style)
        else:
            loss = summary["references"][ref]["loss"]
            by_layer.axhline(loss, label=f"{ref}: {loss:.4g}", **style)
    by_layer.set_yscale("log")
    shown = np.concatenate([mean("loss"), *[mean(f"{ref}_loss") for ref in stepwise]])
    by_layer.set_ylim(0.5 * float(shown.min()), 1.5 * float(shown.max()))  # an exact reference (OLS) is in the legend
    by_layer.set_title("loss of the readout after layer k")
    for ax in axes[:-1]:
        ax.set_xlabel("layer k")
        ax.set_xticks(ks)
    if stepwise:
        axes[1].set_title(f"{align.replace('_', ' ')} after layer k")
        column = f"{_column(align, stepwise[-1], tracked[0])}"
        over_training.set_title(f"{align.replace('_', ' ')} to {stepwise[-1]} over training")
    else:
        column = "loss"
        over_training.set_title("loss over training")
        over_training.set_yscale("log")
    for k in ks:
        _plot_band(over_training, df, f"layer{k}_{column}", f"layer {k}")
    over_training.set_xlabel("training step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{run_title(summary)}: per-layer readouts against k reference steps", fontsize=10)
    return save(fig, stem)


def loss_by_position(summary: dict, stem: Path) -> list[Path]:
    """Sequence tasks: the trained model's final loss at each position (mean, 95% interval over
    seeds) against each reference's, and, when computed, its model cos with each reference by
    position (sensitivities to the last state, docs/science.md section 5)."""
    model = summary["final"]["loss_by_position"]
    aligned = summary.get("alignment_by_position", {})
    positions = np.arange(1, len(model["mean"]) + 1)
    fig, axes = plt.subplots(1, 2 if aligned else 1, figsize=(12.5 if aligned else 7, 4.2), squeeze=False)
    ax = axes[0, 0]
    ax.plot(positions, model["mean"], "o-", markersize=3, color="C0", label="trained model")
    if model["ci95"][0][0] is not None:
        ax.fill_between(positions, model["ci95"][0], model["ci95"][1], color="C0", alpha=0.2, linewidth=0)
    primary = next(iter(summary["references"]))
    for i, (name, entry) in enumerate(summary["references"].items()):
        if isinstance(entry, dict) and "loss_by_position" in entry:
            style = {"color": f"C{i + 1}", "linestyle": REFERENCE_STYLES[i % 4]}
            ax.plot(positions, entry["loss_by_position"], label=name, **style)
            cos = aligned.get(_column("model_cos", name, primary))
            if cos is not None:
                # From t = 2: at t = 1 the references predict 0 whatever s_1 (no pair seen).
                axes[0, 1].plot(positions[1:], cos["mean"][1:], label=name, **style)
                if cos["ci95"][0][0] is not None:
                    lo, hi = cos["ci95"]
                    axes[0, 1].fill_between(
                        positions[1:], lo[1:], hi[1:], color=style["color"], alpha=0.15, linewidth=0
                    )
    ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.set_title("loss by position", fontsize=10)
    if aligned:
        axes[0, 1].set_ylabel("model cos (sensitivity to s_t)")
        axes[0, 1].set_title("trained model's cos with each reference", fontsize=10)
    for a in axes[0]:
        a.set_xlabel("position t (predicting s_{t+1} from s_1..s_t)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(f"{run_title(summary)}, {summary.get('seeds', 1)} seed(s)", fontsize=10)
    return save(fig, stem)


def run_figures(df: pd.DataFrame, summary: dict, out: Path) -> list[Path]:
    """Every figure of a finished run: training curves, per-layer readouts for deep models, loss by
    position for sequence tasks."""
    paths = training_curves(df, summary, out / "curves")
    if len(summary["per_layer"]) > 1:
        paths += per_layer(df, summary, out / "per_layer")
    if "loss_by_position" in summary["final"]:
        paths += loss_by_position(summary, out / "loss_by_position")
    return paths


def compare(frames: dict[str, pd.DataFrame], primaries: dict[str, str], stem: Path) -> list[Path]:
    """Overlay the curves of several runs, one color per run; dashed: each run's primary
    reference's loss (`primaries`: run label -> reference name)."""
    panels = [p for p in PANELS if any(p[0] in df for df in frames.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.8), squeeze=False)
    axes = axes[0]
    for i, (label, df) in enumerate(frames.items()):
        color = f"C{i % 10}"
        for ax, (column, _, _) in zip(axes, panels, strict=True):
            if column in df:
                _plot_band(ax, df, column, label, color=color)
        reference_loss = f"{primaries[label]}_loss"
        if reference_loss in df:
            axes[0].plot(
                df["step"].unique(),
                df.groupby("step")[reference_loss].mean(),
                color=color,
                linestyle="--",
                linewidth=0.8,
            )
    for ax, (_, title, scale) in zip(axes, panels, strict=True):
        ax.set_title(title.replace("GD", "primary ref."))
        ax.set_xlabel("training step")
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
    axes[0].set_title("loss")
    axes[0].legend(fontsize=7)
    fig.suptitle("runs compared (dashed: each run's primary reference, e.g. GD)", fontsize=10)
    return save(fig, stem)


def compare_by_position(summaries: dict[str, dict], stem: Path) -> list[Path]:
    """Sequence runs side by side (docs/science.md section 8): each run's loss by position (one
    colour per run) with every reference (grey, one line style each; stepwise references once
    per depth), and each run's model cos by position with its primary reference (solid) and
    with its best reference by loss (dashed)."""
    fig, (loss_ax, cos_ax) = plt.subplots(1, 2, figsize=(13, 4.6))
    drawn: set[str] = set()
    for i, (label, summary) in enumerate(summaries.items()):
        color = f"C{i % 10}"
        model = summary["final"]["loss_by_position"]
        positions = np.arange(1, len(model["mean"]) + 1)
        loss_ax.plot(positions, model["mean"], "o-", markersize=2.5, color=color, label=label)
        refs = {n: e for n, e in summary["references"].items() if isinstance(e, dict) and "loss_by_position" in e}
        for j, (name, entry) in enumerate(refs.items()):
            ref_label = f"{name}, {entry['steps']} step(s)" if "steps" in entry else name
            if ref_label not in drawn:
                drawn.add(ref_label)
                style = {"color": str(0.15 + 0.6 * (j / max(len(refs) - 1, 1))), "linestyle": REFERENCE_STYLES[j % 4]}
                loss_ax.plot(positions, entry["loss_by_position"], linewidth=1, label=ref_label, **style)
        aligned = summary.get("alignment_by_position", {})
        primary = next(iter(refs))
        best = min(refs, key=lambda n: refs[n]["loss"])
        for name, linestyle in ((primary, "-"), (best, "--")):
            cos = aligned.get(_column("model_cos", name, primary))
            if cos is not None and (linestyle == "-" or best != primary):  # from t = 2, as in loss_by_position
                cos_ax.plot(
                    positions[1:], cos["mean"][1:], color=color, linestyle=linestyle, label=f"{label} vs {name}"
                )
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("loss by position (grey: references)", fontsize=10)
    cos_ax.set_ylabel("model cos (sensitivity to s_t)")
    cos_ax.set_title("model cos with the primary (solid) and best (dashed) reference", fontsize=10)
    for ax in (loss_ax, cos_ax):
        ax.set_xlabel("position t (predicting s_{t+1} from s_1..s_t)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("sequence runs compared", fontsize=10)
    return save(fig, stem)


OOD_PANELS = (
    ("input_scale", "inputs scaled by"),
    ("weight_scale", "weights scaled by"),
    ("input_law", "input law (training variance)"),
)
OOD_REFERENCES = (("gd", "GD", "--"), ("gdpp", "GD++", "-."), ("ols", "OLS", ":"), ("ridge", "ridge", (0, (1, 3))))


def ood_curves(df: pd.DataFrame, stem: Path) -> list[Path]:
    """Loss against each distribution shift: the trained model (mean, 95% band over seeds) and
    the references."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, (family, title) in zip(axes, OOD_PANELS, strict=True):
        part = cast(pd.DataFrame, df[df["shift"] == family])
        xs = np.arange(len(part)) if family == "input_law" else part["value"].astype(float).to_numpy()
        ax.plot(xs, part["model"], "o-", color="C0", label="trained model")
        if cast(pd.Series, part["model_lo"]).notna().all():
            ax.fill_between(xs, part["model_lo"], part["model_hi"], color="C0", alpha=0.2, linewidth=0)
        for i, (column, label, style) in enumerate(OOD_REFERENCES):
            ax.plot(xs, part[column], marker=".", linestyle=style, color=f"C{i + 1}", label=label)
        if family == "input_law":
            ax.set_xticks(xs, part["value"])
        ax.set_title(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=8)
    fig.suptitle("out-of-distribution evaluation (trained on the unshifted law)", fontsize=10)
    return save(fig, stem)


def sine_fits(net_ExG, gd_ExG, ctx_x_ExN, ctx_y_ExN, feats_GxF, grid_G, stem: Path, paper_ExG=None) -> list[Path]:
    """Example sine tasks (context points, the model's, MLP + GD's on the model's features and, when
    given, the paper's meta-learned MLP + GD's predictions over the query range) and the learned
    input-embedding features."""
    n: int = net_ExG.shape[0]
    fig, axes = plt.subplots(1, n + 1, figsize=(3.6 * (n + 1), 3.4))
    for e, ax in enumerate(axes[:n]):
        ax.plot(grid_G, net_ExG[e], color="C0", label="trained model")
        ax.plot(grid_G, gd_ExG[e], color="C1", linestyle="--", label="GD on its features")
        if paper_ExG is not None:
            ax.plot(grid_G, paper_ExG[e], color="C2", linestyle=":", label="MLP + GD (paper's)")
        ax.scatter(ctx_x_ExN[e], ctx_y_ExN[e], color="k", s=12, zorder=3, label="context")
        ax.set_xlabel("query x")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[-1].plot(grid_G, feats_GxF, linewidth=1)
    axes[-1].set_title("learned features phi(x)")
    axes[-1].set_xlabel("x")
    fig.suptitle("sine regression through an input embedding (seed 0)", fontsize=10)
    return save(fig, stem)


def token_dependence(norms_MxM: np.ndarray, shares: pd.DataFrame, stem: Path) -> list[Path]:
    """The copy layer's Jacobian norms between tokens (seed 0) and the shares of each kind of
    token's dependence on itself, its left neighbour and the rest (mean over seeds)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    image = left.imshow(np.log10(np.where(norms_MxM > 0, norms_MxM, np.nan)), cmap="viridis")  # blank: none (causal)
    fig.colorbar(image, ax=left, label="log10 ||d update_j / d token_i||")
    left.set_xlabel("token i (x_1, y_1, ..., query)")
    left.set_ylabel("updated token j")
    means = cast(pd.DataFrame, shares.groupby("token")[["self", "neighbour", "rest"]].mean())
    means.plot.bar(ax=right, rot=0)
    right.set_ylabel("share of squared dependence")
    right.set_ylim(0, 1)
    right.grid(alpha=0.3, axis="y")
    fig.suptitle("classic tokens: what the first layer's update of each token depends on", fontsize=10)
    return save(fig, stem)


def weight_heatmaps(w_kq: np.ndarray, w_pv: np.ndarray, stem: Path, title: str = "") -> list[Path]:
    """`W_KQ = W_K^T W_Q` and `W_PV = W_P W_V` of every layer (rows) and head, side by side, each
    on its own symmetric color scale (the last row and column are the label coordinate)."""
    w_kq, w_pv = np.asarray(w_kq), np.asarray(w_pv)
    layers, heads = w_kq.shape[:2]
    fig, axes = plt.subplots(layers, 2 * heads, figsize=(3.2 * 2 * heads, 2.9 * layers), squeeze=False)
    for layer in range(layers):
        for head in range(heads):
            for j, (name, w) in enumerate((("W_KQ", w_kq), ("W_PV", w_pv))):
                ax, m = axes[layer, 2 * head + j], w[layer, head]
                limit = max(float(np.abs(m).max()), 1e-12)
                image = ax.imshow(m, cmap="RdBu_r", vmin=-limit, vmax=limit)
                ax.set_title(f"{name}, layer {layer}, head {head}", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
                fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=10)
    return save(fig, stem)


def explain_ranking(report: dict, stem: Path) -> list[Path]:
    """Left: each family's penalised score above the winner's (BIC difference, 95% interval across
    seeds; `*`: within the noise floor). Right: its normalised discrepancy to the model (1 - R^2) on
    held-out and shifted tasks, and the noise floor on held-out tasks (dashed; 95% interval shaded)."""
    names = report["ranking"]["order"]
    fams = report["families"]
    within = set(report.get("within_floor", ()))
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 0.45 * len(names) + 2))
    y = np.arange(len(names))
    delta = report["ranking"]["delta"]
    means = np.array([delta[n]["mean"] for n in names])
    lo = np.array([delta[n]["ci95"][0] if delta[n]["ci95"][0] is not None else delta[n]["mean"] for n in names])
    hi = np.array([delta[n]["ci95"][1] if delta[n]["ci95"][1] is not None else delta[n]["mean"] for n in names])
    left.barh(y, means, xerr=[means - lo, hi - means], color="C0")
    left.set_yticks(y, [f"{n} ({fams[n]['n_params']}){' *' if n in within else ''}" for n in names])
    left.invert_yaxis()
    left.set_xscale("symlog", linthresh=10)
    left.set_xlabel("BIC above the winner (lower is better)")
    left.grid(alpha=0.3, axis="x")
    width = 0.8 / len(report["sets"])
    for i, name in enumerate(report["sets"]):
        nmse = [max(fams[n][name]["nmse"]["mean"], 1e-12) for n in names]
        right.barh(y + (i - (len(report["sets"]) - 1) / 2) * width, nmse, height=width, label=name, color=f"C{i}")
    floor = report.get("floor", {}).get("nmse")
    if floor is not None:  # the noise floor: other seeds (or checkpoints) of the model, held-out tasks
        lo_f, hi_f = floor["ci95"]
        if lo_f is not None:
            right.axvspan(max(lo_f, 1e-12), max(hi_f, 1e-12), color="0.5", alpha=0.2)
        right.axvline(max(floor["mean"], 1e-12), color="k", linestyle="--", label=f"{report['floor']['source']} floor")
    right.set_yticks(y, [])
    right.invert_yaxis()
    right.set_xscale("log")
    right.set_xlabel("1 - R^2 of the model's predictions (mean over seeds)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3, axis="x")
    fig.suptitle(textwrap.fill(report["verdict"], 160), fontsize=9)
    return save(fig, stem)


def explain_layers(report: dict, stem: Path) -> list[Path]:
    """Layer `k`'s readout against step `k` of each fitted family: 1 - R^2 and model cos."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    layers = np.arange(1, report["steps"] + 1)
    for i, name in enumerate(report["ranking"]["order"]):
        per_layer = report["families"][name]["per_layer"]
        style = {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--", "marker": "o", "markersize": 3}
        axes[0].plot(layers, np.maximum(1 - np.asarray(per_layer["r2"]), 1e-12), label=name, **style)
        axes[1].plot(layers, per_layer["model_cos"], label=name, **style)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("1 - R^2, held-out")
    axes[1].set_ylabel("model cos, held-out")
    for ax in axes:
        ax.set_xlabel("layer k vs step k")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("per layer: fitted on the last readout only", fontsize=10)
    return save(fig, stem)


def explain_bands(report: dict, stem: Path) -> list[Path]:
    """Sequence tasks: per position band (all positions first), each family's BIC above the band's
    winner (95% interval across seeds; families in the all-positions order) and its held-out R^2."""
    bands = {"all positions": report, **{f"positions {name}": band for name, band in report["bands"].items()}}
    names = report["ranking"]["order"]
    fig, axes = plt.subplots(
        1, len(bands), figsize=(5 * len(bands), 0.45 * len(names) + 2), squeeze=False, layout="constrained"
    )
    y = np.arange(len(names))
    for ax, (title, band) in zip(axes[0], bands.items(), strict=True):
        delta = band["ranking"]["delta"]
        means = np.array([delta[n]["mean"] for n in names])
        lo = np.array([delta[n]["ci95"][0] if delta[n]["ci95"][0] is not None else delta[n]["mean"] for n in names])
        hi = np.array([delta[n]["ci95"][1] if delta[n]["ci95"][1] is not None else delta[n]["mean"] for n in names])
        ax.barh(y, means, xerr=[means - lo, hi - means], color="C0")
        r2 = [f"R^2 {band['families'][n]['heldout']['r2']['mean']:.3f}" for n in names]
        if ax is axes[0, 0]:
            r2 = [f"{n} ({report['families'][n]['n_params']}), {r}" for n, r in zip(names, r2, strict=True)]
        ax.set_yticks(y, r2)
        ax.invert_yaxis()
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("BIC above the band's winner")
        ax.set_title(f"{title}: {band['ranking']['winner']}", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"which family explains the model, by position band; {report['verdict']}", fontsize=9)
    return save(fig, stem)


def depth_extrapolation(df: pd.DataFrame, trained: int, damping: float, stem: Path) -> list[Path]:
    """Loss and model cos of a recurrent layer iterated past its training depth, next to GD and GD++."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    df = df.rename(columns={"iterations": "step"})
    _plot_band(axes[0], df, "loss", f"trained layer (damping {damping:g})", seeds=True)
    first = df[df["seed"] == df["seed"].min()]
    axes[0].plot(first["step"], first["gd_loss"], "k--", label="GD, same number of steps")
    axes[0].plot(first["step"], first["gdpp_loss"], "-.", color="C3", label="GD++, same number of steps")
    axes[0].set_yscale("log")
    axes[0].set_title("loss")
    _plot_band(axes[1], df, "model_cos", "to GD", color="k")
    _plot_band(axes[1], df, "model_cos_gdpp", "to GD++", color="C3")
    axes[1].set_title("model cos")
    for ax in axes:
        ax.axvline(trained, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("iterations (dotted: trained depth)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, stem)


def fewshot_curves(curves: dict, least: np.ndarray, zero: np.ndarray, title: str, stem: Path) -> list[Path]:
    """Few-shot regression (docs/science.md section 8): the loss on `y_i` by pairs seen before, of
    the model (`curves["model"]`, mean and 95% band over seeds, as `metrics.mean_ci95` gives them)
    and, if tuned, of the model with its tuned separator / prefix (`curves["tuned"]`), against
    ridge least squares on the pairs seen and the zero predictor."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    pairs = np.arange(len(least))
    labels = {"model": "trained model: x_1, y_1, x_2, y_2, ...", "tuned": "trained model, tuned separator / prefix"}
    for i, (name, label) in enumerate(labels.items()):
        if name not in curves:
            continue
        entry, color = curves[name], ("C0", "C3")[i]
        ks = pairs[: len(entry["mean"])]
        ax.plot(ks, entry["mean"], "o-", markersize=3, color=color, label=label)
        if entry["ci95"][0][0] is not None:
            ax.fill_between(ks, entry["ci95"][0], entry["ci95"][1], color=color, alpha=0.2, linewidth=0)
    ax.plot(pairs, least, "s--", markersize=3, color="C1", label="ridge least squares on the pairs seen")
    ax.plot(pairs, zero, ":", color="0.3", linewidth=1.5, label="zero predictor")
    ax.set_yscale("log")
    ax.set_xlabel("pairs (x_j, y_j) seen before predicting y_i")
    ax.set_ylabel("loss 0.5 ||y_hat - y_i||^2")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return save(fig, stem)


def _mean_ci(ax, xs: np.ndarray, entry: dict, **style) -> None:
    """A `metrics.mean_ci95` entry (lists over `xs`): the mean, and its 95% band when there is one."""
    (line,) = ax.plot(xs, np.asarray(entry["mean"], dtype=float), **style)
    lo, hi = entry["ci95"]
    if lo[0] is not None:
        ax.fill_between(xs, np.asarray(lo, float), np.asarray(hi, float), color=line.get_color(), alpha=0.2, lw=0)


R2_FLOOR = -0.5  # R^2 axes stop here: a probe below it reads nothing (the tables keep every value)


def _r2_axis(ax, values: np.ndarray) -> None:
    low = float(np.nanmin(values)) if np.isfinite(values).any() else 0.0
    ax.set_ylim(max(min(low, 0.0) - 0.05, R2_FLOOR), 1.05)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.grid(alpha=0.3)


def _layer_names(n_layers: int) -> list[str]:
    return ["embedding", *(f"layer {k}" for k in range(1, n_layers))]


def probe_r2_by_layer(by_layer: dict[str, dict], labels: dict[str, str], title: str, stem: Path) -> list[Path]:
    """Held-out R^2 of each target's linear probes (mean over positions; mean and 95% band over
    seeds) along the residual stream: after the embedding, then after each layer (`labels`: the
    targets' legend entries)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    n_layers = len(next(iter(by_layer.values()))["mean"])
    xs = np.arange(n_layers)
    for i, (name, entry) in enumerate(by_layer.items()):
        _mean_ci(ax, xs, entry, marker="o", markersize=4, color=f"C{i}", label=labels[name])
    _r2_axis(ax, np.array([entry["mean"] for entry in by_layer.values()], dtype=float))
    ax.set_xticks(xs, _layer_names(n_layers))
    ax.set_xlabel("residual stream after")
    ax.set_ylabel(f"held-out R^2, mean over positions (floor {R2_FLOOR})")
    ax.legend(fontsize=8, title="probe target", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=9)
    return save(fig, stem)


def probe_r2_by_position(r2: dict[str, np.ndarray], labels: dict[str, str], title: str, stem: Path) -> list[Path]:
    """One panel per probe target (titled by `labels`): held-out R^2 (mean over seeds) by
    position, one line per point of the residual stream (`r2[target]`: `[L, T]`)."""
    fig, axes = plt.subplots(1, len(r2), figsize=(3.4 * len(r2), 3.6), sharey=True, squeeze=False)
    for ax, (name, values) in zip(axes[0], r2.items(), strict=True):
        positions = np.arange(1, values.shape[1] + 1)
        colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, values.shape[0]))
        for k, label in enumerate(_layer_names(values.shape[0])):
            ax.plot(positions, values[k], color=colors[k], label=label)
        _r2_axis(ax, np.stack(list(r2.values())))
        ax.set_title(labels[name], fontsize=8)
        ax.set_xlabel("position t")
    axes[0, 0].set_ylabel(f"held-out R^2 (floor {R2_FLOOR})")
    axes[0, -1].legend(fontsize=7, title="residual after", title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save(fig, stem)


def r2_by_lag(before: dict, after: dict, threshold: float, title: str, stem: Path) -> list[Path]:
    """Held-out R^2 of linear probes for `s_{t-k}` by lag `k`, before and after the first layer
    (`metrics.mean_ci95` entries over lags), with the threshold above which a lag counts as read."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lags = np.arange(len(before["mean"]))
    _mean_ci(ax, lags, before, marker="o", color="C0", label="before the first layer (embedding)")
    _mean_ci(ax, lags, after, marker="s", color="C1", linestyle="--", label="after the first layer")
    ax.axhline(threshold, color="k", linestyle=":", linewidth=0.8, label=f"read: R^2 >= {threshold}")
    _r2_axis(ax, np.array([before["mean"], after["mean"]], dtype=float))
    ax.set_xticks(lags)
    ax.set_xlabel("lag k: probe target s_{t-k}")
    ax.set_ylabel(f"held-out R^2, mean over positions t > k (floor {R2_FLOOR})")
    ax.legend(fontsize=8)
    ax.set_title(textwrap.fill(title, 95), fontsize=8)
    return save(fig, stem)


def layer_match(report: dict, title: str, stem: Path) -> list[Path]:
    """Per-layer algorithm matching (`icl_gd.layer_match`): per algorithm a heatmap of the seed-mean
    `1 - R^2` of each layer's readout against the algorithm after `j` steps (log colour, R^2
    written in the cells), the best `j` of each layer outlined, its R^2 and model cos beside the layer."""
    algorithms = report["algorithms"]
    widths = [a["steps"] + 2 for a in algorithms.values()]
    n_layers = len(report["layers"])
    fig, axes = plt.subplots(
        1,
        len(algorithms),
        figsize=(0.62 * sum(widths) + 3, 0.75 * n_layers + 2.2),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
        layout="constrained",
    )
    r2_of = {name: np.array([entry["mean"] for entry in alg["r2"]], dtype=float) for name, alg in algorithms.items()}
    shade_of = {name: np.log10(np.clip(1.0 - r2, 1e-4, 1.0)) for name, r2 in r2_of.items()}
    low = min(-2.0, float(np.floor(min(shade.min() for shade in shade_of.values()))))  # one scale for all panels
    image = None
    for ax, (name, alg) in zip(axes[0], algorithms.items(), strict=True):
        r2, shade = r2_of[name], shade_of[name]
        image = ax.imshow(shade, cmap="viridis", vmin=low, vmax=0, aspect="auto")
        for (k, j), value in np.ndenumerate(r2):
            text = "<0" if value < 0 else f"{value:.4f}" if value >= 0.99 else f"{value:.3f}"
            ax.text(j, k, text, ha="center", va="center", fontsize=6.5, color="w" if shade[k, j] < low / 2 else "k")
        labels = []
        for k, best in enumerate(alg["best"]):
            j = best["j_of_mean"] - 1
            ax.plot(j + np.array([-0.5, 0.5, 0.5, -0.5, -0.5]), k + np.array([-0.5, -0.5, 0.5, 0.5, -0.5]), "r-", lw=2)
            cos = alg["model_cos"][k]["mean"][j]
            labels.append(f"layer {k + 1}: j={j + 1}\nR^2 {r2[k, j]:.4f}, cos {cos:.4f}")
        ax.set_yticks(np.arange(n_layers), labels, fontsize=7)
        ax.set_xticks(np.arange(alg["steps"]), [str(j) for j in range(1, alg["steps"] + 1)], fontsize=7)
        neumann = " (2^j Neumann terms: GD with 2^j steps)" if name == "newton_schulz" else ""
        ax.set_xlabel(f"j steps{neumann}", fontsize=8)
        ax.set_title(alg["label"], fontsize=9)
    assert image is not None
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label="log10(1 - R^2), seed mean")
    fig.suptitle(textwrap.fill(f"{title}. Best per layer: {report['finding']}", 140), fontsize=8)
    return save(fig, stem)

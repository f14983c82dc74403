"""Named experiments, deep models against GD / GD++ per layer, and the depth extrapolation."""

import pandas as pd
import pytest

from icl_gd import analyses, config, experiment, runs
from icl_gd.config import load_config
from tests.conftest import SMALL_EVAL

TINY = [
    "task.dim=3",
    "task.n_context=6",
    "train.steps=4",
    "train.eval_every=2",
    "train.batch_size=32",
    "eval.n_tasks=200",
    "eval.line_search_tasks=2000",
    "eval.gdpp_steps=5",
    "eval.extrapolate_to=6",
]


# Sequence experiments: short sequences, narrow models, small analyses.
TINY_LDS = [
    "task.state_dim=3",
    "task.length=8",
    "train.steps=4",
    "train.eval_every=2",
    "train.batch_size=16",
    "train.warmup_steps=2",
    "eval.n_tasks=64",
    "eval.line_search_tasks=256",
    "eval.sensitivity_tasks=4",
    "eval.probe_tasks=64",
    "eval.probe_lags=3",
    "eval.fewshot_tasks=32",
    "eval.fewshot_batch=8",
]


def tiny_overrides(name: str) -> list[str]:
    cfg = load_config([f"experiment={name}"])
    if cfg.task.kind == "lds":
        # Two layers at most: the reference fits (K steps each) then compile once for every experiment.
        narrow = ["model.embed_dim=8", "model.key_size=4", "model.heads=2"] if cfg.model.embed_dim else []
        narrow += ["model.layers=2"] if cfg.model.layers > 2 else []
        # The separator tuning is exercised on the shared tiny run (tests/test_fewshot.py).
        untuned = ["eval.fewshot_tune_steps=0", "eval.fewshot_prefix=0"]
        return [*TINY_LDS, *narrow, *untuned, *(["task.hidden_dim=4"] if cfg.task.variant.name == "partial" else [])]
    mlpgd = ["eval.mlpgd_steps=5", "eval.mlpgd_batch=32"] if cfg.eval.mlpgd_steps else []  # sine_paper's comparator
    cov = cfg.task.get("x_cov")
    narrow = [f"task.x_cov=[{cov[0]},{cov[len(cov) // 2]},{cov[-1]}]"] if cov is not None else []  # TINY's 3 dims
    one_d = cfg.task.kind == "sine"  # sine: 1-d inputs
    return [o for o in TINY if not (one_d and o.startswith("task.dim="))] + mlpgd + narrow


@pytest.mark.parametrize("name", config.group_options("experiment"))
def test_every_named_experiment_runs_a_few_steps(tmp_path, name):
    tiny = tiny_overrides(name)
    result = experiment.train(load_config([f"experiment={name}", *tiny]), tmp_path / name, quiet=True)
    analyses.run_all(result)
    summary = result.summary
    assert summary["status"] == "completed" and summary["experiment"] == name
    layers = load_config([f"experiment={name}", *tiny]).model.layers
    assert len(summary["per_layer"]) == layers
    for analysis in load_config([f"experiment={name}"]).analyses:
        assert analysis in summary["analyses"]
        for file in analyses.REGISTRY[analysis].files:  # every file the analysis promises
            assert (result.run_dir / file).stat().st_size > 0, file
    if "copy" in summary.get("analyses", {}):
        for parts in summary["analyses"]["copy"]["shares"].values():
            assert sum(parts[p]["mean"] for p in ("self", "neighbour", "rest")) == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def recurrent_run(tmp_path_factory):
    cfg = load_config(
        [
            "experiment=recurrent",
            "model.layers=3",
            "task.dim=4",
            "task.n_context=8",
            "train.steps=300",
            "train.eval_every=150",
            "train.batch_size=256",
            "train.lr=3e-3",
            "train.seeds=2",
            "eval.gdpp_steps=300",
            "eval.extrapolate_to=8",
            *SMALL_EVAL,
        ]
    )
    return experiment.train(cfg, tmp_path_factory.mktemp("runs") / "recurrent", quiet=True)


def test_deep_runs_report_gdpp_and_per_layer_metrics(recurrent_run):
    summary = recurrent_run.summary
    refs = summary["references"]
    assert refs["gd"]["steps"] == 3 and refs["gdpp"]["shared"] and len(refs["gdpp"]["etas"]) == 1
    # Fitted GD++ beats plain GD with the same number of steps (docs/science.md section 6).
    assert refs["gdpp"]["loss"] < refs["gd"]["loss"]
    for key in ("gdpp_loss", "preds_diff_gdpp", "model_cos_gdpp", "model_diff_gdpp"):
        assert set(summary["final"][key]) == {"mean", "ci95", "per_seed"}
    layers = summary["per_layer"]
    assert len(layers) == 3
    assert set(layers[0]) == {"loss", "gd_loss", "gdpp_loss", "model_cos", "model_cos_gdpp"}
    # The last layer's readout is the model's prediction; GD improves with every step.
    assert layers[-1]["loss"]["mean"] == pytest.approx(summary["final"]["loss"]["mean"])
    assert layers[0]["gd_loss"]["mean"] > layers[1]["gd_loss"]["mean"] > layers[2]["gd_loss"]["mean"]
    df = pd.read_csv(recurrent_run.run_dir / runs.METRICS_FILE)
    assert {f"layer{k}_model_cos_gdpp" for k in (1, 2, 3)} <= set(df.columns)
    assert (recurrent_run.run_dir / "plots" / "per_layer.png").is_file()


def test_depth_extrapolation_agrees_with_the_run(recurrent_run):
    result = analyses.run("depth_extrapolation", recurrent_run)
    out = recurrent_run.run_dir / "analyses" / "depth_extrapolation"
    assert (out / "depth_extrapolation.png").is_file() and (out / "depth_extrapolation.pdf").is_file()
    df = pd.read_csv(out / "depth_extrapolation.csv")
    assert sorted(df["iterations"].unique()) == list(range(1, 9)) and sorted(df["seed"].unique()) == [0, 1]
    summary = recurrent_run.summary
    # At the trained depth the iterated layer is the trained model, and GD / GD++ are the references.
    at_trained = result["at"]["3"]
    assert at_trained["loss"] == pytest.approx(summary["final"]["loss"]["mean"], rel=1e-4)
    assert at_trained["gd_loss"] == pytest.approx(summary["references"]["gd"]["loss"], rel=1e-4)
    assert at_trained["gdpp_loss"] == pytest.approx(summary["references"]["gdpp"]["loss"], rel=1e-4)
    assert runs.load_summary(recurrent_run.run_dir)["analyses"]["depth_extrapolation"]["iterations"] == 8


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["eval.extrapolate_to=0"], "eval.extrapolate_to: got 0; allowed: an integer >= 1"),
        (["eval.damping=1.5"], "eval.damping: got 1.5; allowed: a number in (0, 1]"),
        (
            ["experiment=depth_extrapolation", "model.recurrent=false"],
            "model.recurrent: got False; allowed: true for the depth_extrapolation",
        ),
        (["model.heads=0"], "model.heads: got 0; allowed: an integer >= 1"),
        (["model.layers=0"], "model.layers: got 0; allowed: an integer >= 1"),
        (["model.init_scale=-1"], "model.init_scale: got -1.0; allowed: null (0.002 / layers) or a number > 0"),
        (["model.clip_activations=0"], "model.clip_activations: got 0.0; allowed: null or a number > 0"),
        (["model.mlp_width=0"], "model.mlp_width: got 0; allowed: an integer >= 1"),
        (["eval.gdpp_steps=-1"], "eval.gdpp_steps: got -1; allowed: an integer >= 0"),
        (["eval.gdpp_lr=0.05"], "eval.gdpp_lr: unknown field; allowed: n_tasks, seed, line_search_tasks, gdpp_steps"),
    ],
)
def test_model_and_eval_options_fail_clearly(overrides, message):
    with pytest.raises(config.ConfigError) as err:
        analyses.check(load_config(overrides))
    assert str(err.value).startswith(message)

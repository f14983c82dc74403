"""`icl-gd report`: one self-contained HTML page for a run, a sweep and a comparison, checked as
HTML and rendered in a real headless Chromium (the distribution's, driven by Selenium)."""

from __future__ import annotations

import base64
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from icl_gd import comparison, report, runs, sweeps
from icl_gd.cli import app

runner = CliRunner()
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # git-ignored: the browser's screenshots
# The distribution's browser and driver (Debian: chromium, Ubuntu: chromium-browser); env variables override.
CHROMIUM = Path(os.environ.get("ICL_GD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium-browser")
CHROMEDRIVER = Path(os.environ.get("ICL_GD_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver")
RUN_TABLES = {
    "final-metrics",
    "references",
    "explain-ranking",
    "explain-floor",
    "explain-weights",
    "explain-bands",
    "analysis-ood",
    "analysis-ood-ood",
    "config",
    "config-task",
    "config-model",
    "config-train",
    "config-eval",
    "versions",
}
SWEEP_TABLES = {"sweep-points", "point-0-final-metrics", "point-1-final-metrics", "compare"}
COMPARISON_TABLES = {"compare-groups", "compare-runs", "compare"}


class Page(HTMLParser):
    """A report as parsed: its tables (id -> rows of cell texts, header row first), its tags, and
    every `src` / `href` it holds."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: set[str] = set()
        self.links: list[str] = []
        self._rows: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.links += [v or "" for k, v in attrs.items() if k in ("src", "href")]
        if tag == "table":
            self._rows = self.tables.setdefault(attrs["id"] or "", [])
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th") and self._rows is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._rows is not None and self._cell is not None:
            self._rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._rows = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def fields(self, table_id: str) -> dict[str, str]:
        """A table of fields and values (first two columns) as a mapping."""
        return {row[0]: row[1] for row in self.tables[table_id] if len(row) > 1}


def _stats(mean: float) -> dict:
    return {"mean": mean, "ci95": [mean - 0.01, mean + 0.01], "per_seed": [mean - 0.005, mean + 0.005]}


def _explained(run_dir: Path) -> None:
    """An `explain` folder of the shape `icl-gd explain` writes (two families, one shifted set)."""
    families = {
        name: {
            "n_params": n,
            "heldout": {m: _stats(v) for m in ("nmse", "model_cos", "preds_diff", "model_diff", "loss")},
            "x_scale_x2": {"nmse": _stats(2 * v)},
            "nmse_over_floor": v / 0.1,
        }
        for name, n, v in (("gd", 1, 0.02), ("ridge", 1, 0.3))
    }
    explain = {
        "steps": 1,
        "n_tasks": 256,
        "seeds": 2,
        "sets": ["heldout", "x_scale_x2"],
        "families": families,
        "ranking": {"criterion": "BIC (lower is better)", "order": ["gd", "ridge"], "delta": {"gd": _stats(0.0)}},
        "floor": {"source": "seeds", "sources": {"seeds": {"nmse": _stats(0.1), "pairs": 2}}},
        "within_floor": ["gd"],
        "explains": True,
        "verdict": "gd explains the model: held-out R^2 0.98",
        "seed_ids": [0, 1],
        "weights": {"per_seed": [[{"layer": 0, "head": 0, "kq_outside_gd": 0.01, "implied_eta": 6.1}], []]},
        "bands": {"early": {"positions": [1, 3], "ranking": {"winner": "ridge", "order": ["ridge", "gd"]}}},
    }
    explain["bands"]["early"]["families"] = {"ridge": {"heldout": {"nmse": _stats(0.05)}}}
    explain["ranking"]["delta"]["ridge"] = _stats(40.0)
    folder = run_dir / "explain"
    folder.mkdir()
    (folder / "explain.json").write_text(json.dumps(explain))
    shutil.copy(run_dir / "plots" / "curves.png", folder / "ranking.png")


def _analysed(run_dir: Path) -> None:
    """An analysis's files and its entry in summary.json, as `analyses.run` leaves them."""
    folder = run_dir / "analyses" / "ood"
    folder.mkdir(parents=True)
    (folder / "ood.csv").write_text("shift,value,model,gd\ninput_scale,0.5,0.04,0.03\ninput_scale,2.0,0.7,4.2\n")
    shutil.copy(run_dir / "plots" / "curves.png", folder / "ood.png")
    summary = runs.load_summary(run_dir)
    summary["analyses"] = {"ood": {"rows": [{"shift": "input_scale"}], "worst_shift": "input_scale"}}
    runs.write_json(run_dir / runs.SUMMARY_FILE, summary)


def _copy_run(src: Path, dst: Path) -> Path:
    """The files a report reads (the checkpoints and anything analysed left out)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint", "explain", "analyses", "report.html"))
    return dst


@pytest.fixture(scope="module")
def lab(tiny_run, tmp_path_factory):
    """A run (with explain and an analysis), a sweep of two numbered runs (the second at another
    learning rate) with a comparison inside it, and a sweep indexed by sweep.json with a point missing;
    the report of each written next to it."""
    root = tmp_path_factory.mktemp("lab")
    run = _copy_run(tiny_run.run_dir, root / "run")
    _explained(run)
    _analysed(run)
    sweep = root / "sweep"
    for i in (0, 1):
        _copy_run(tiny_run.run_dir, sweep / str(i))
    config = sweep / "1" / runs.CONFIG_FILE
    config.write_text(config.read_text().replace("\n  lr: 0.001\n", "\n  lr: 0.003\n"))
    compared = runner.invoke(app, ["compare", str(sweep / "0"), str(sweep / "1"), "--out", str(sweep / "compare")])
    assert compared.exit_code == 0, compared.output
    indexed = root / "indexed"
    _copy_run(tiny_run.run_dir, indexed / "a")
    points = [
        {"dir": "a", "params": {"train.lr": 0.001}, "status": "completed"},
        {"dir": "b", "params": {"train.lr": 0.003}, "status": "failed"},
    ]
    index = {"command": "icl-gd train -m train.lr=0.001,0.003", "overrides": ["train.lr=0.001,0.003"], "points": points}
    (indexed / report.SWEEP_FILE).write_text(json.dumps(index))
    pages = {name: report.write(path) for name, path in (("run", run), ("sweep", sweep), ("indexed", indexed))}
    pages["comparison"] = report.write(sweep / "compare")
    return {"run": run, "sweep": sweep, "indexed": indexed, "comparison": sweep / "compare", "pages": pages}


def test_run_report_holds_every_table_and_figure_and_nothing_external(lab):
    run, text = lab["run"], lab["pages"]["run"].read_text()
    page = Page(text)
    assert set(page.tables) >= RUN_TABLES
    summary = runs.load_summary(run)
    final = {row[0]: row[1:] for row in page.tables["final-metrics"][1:]}
    assert final["loss"][0] == report.fmt(summary["final"]["loss"]["mean"])
    assert set(final) == set(summary["final"])
    assert page.fields("config-task")["n_context"] == "8" and page.fields("config-train")["steps"] == "200"
    assert page.fields("versions")["jax"] == summary["versions"]["jax"]
    assert page.fields("versions")["device"] == summary["device"]
    refs = {row[0]: row for row in page.tables["references"][1:]}
    assert (
        set(refs) == set(summary["references"])
        and f"eta={report.fmt(summary['references']['gd']['eta'])}" in refs["gd"][1]
    )
    assert [row[0] for row in page.tables["explain-ranking"][1:]] == ["gd", "ridge"]
    assert page.tables["explain-ranking"][1][4] == "0.2 *"  # within the floor
    assert page.tables["explain-weights"][1][:3] == ["0", "0", "0.01"] and "6.1" in page.tables["explain-weights"][1]
    assert page.tables["explain-bands"][1][:4] == ["early", "1-3", "ridge", "0.05"]
    assert "gd explains the model" in text and page.fields("analysis-ood")["worst_shift"] == "input_scale"
    # Every figure embedded byte for byte; nothing fetched from anywhere.
    pngs = sorted(run.rglob("*.png"))
    embedded = [base64.b64decode(link.split(",", 1)[1]) for link in page.links if link.startswith("data:image/png")]
    assert sorted(embedded) == sorted(p.read_bytes() for p in pngs) and len(embedded) == 3
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in page.links)
    assert "://" not in text and not page.tags & {"script", "link", "iframe", "object", "embed"}
    assert "completed" in text and "2 (base seed 0)" in text


def test_sweep_report_tabulates_points_and_embeds_each_run(lab):
    page = Page(lab["pages"]["sweep"].read_text())
    assert set(page.tables) >= SWEEP_TABLES
    header, *rows = page.tables["sweep-points"]
    assert "train.lr" in header and "model.layers" not in header  # the one field that differs
    lr = header.index("train.lr")
    assert [row[lr] for row in rows] == ["0.001", "0.003"]
    assert [row[header.index("status")] for row in rows] == ["completed", "completed"]

    indexed = Page(lab["pages"]["indexed"].read_text())
    header, *rows = indexed.tables["sweep-points"]
    assert [row[header.index("status")] for row in rows] == ["completed", "failed"]
    assert "point-0-final-metrics" in indexed.tables and "point-1-final-metrics" not in indexed.tables


def test_comparison_report_shows_its_tables_and_figures(lab):
    folder = lab["comparison"]
    page = Page(lab["pages"]["comparison"].read_text())
    assert set(page.tables) >= COMPARISON_TABLES
    index = json.loads((folder / report.COMPARE_INDEX).read_text())
    groups = {row[0]: row[1:] for row in page.tables["compare-groups"]}  # points as columns
    assert groups["train.lr"] == ["0.001", "0.003"] and groups["runs"] == ["1", "1"]
    assert groups["loss"][0] == report.fmt(index["groups"][0]["final"]["loss"])
    header, *rows = page.tables["compare"]
    assert len(header) == 3 and "loss" in [row[0] for row in rows]  # metrics as rows, the two runs as columns
    assert len([link for link in page.links if link.startswith("data:")]) == len(list(folder.glob("*.png")))


def test_file_names_are_those_the_writers_use():
    assert report.SWEEP_FILE == sweeps.SWEEP_FILE and report.COMPARE_INDEX == comparison.COMPARE_FILE
    assert report.COMPARE_TABLE == comparison.RUNS_TABLE


def test_cli_report_never_overwrites_and_names_a_bad_path(lab, tmp_path):
    run, written = lab["run"], lab["pages"]["run"]
    before = written.read_bytes()
    again = runner.invoke(app, ["report", str(run)])
    assert again.exit_code == 2 and again.output.startswith("error: --out:") and "already exists" in again.output
    assert len(again.output.strip().splitlines()) == 1 and written.read_bytes() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad in (empty, tmp_path / "absent", run / runs.SUMMARY_FILE):
        result = runner.invoke(app, ["report", str(bad)])
        assert result.exit_code == 2 and result.output.startswith(f"error: PATH: {bad} ")
        assert "allowed: a run directory" in result.output and len(result.output.strip().splitlines()) == 1
    assert list(empty.iterdir()) == []
    broken = _copy_run(run, tmp_path / "broken")
    (broken / runs.CONFIG_FILE).write_text("task: [1")
    result = runner.invoke(app, ["report", str(broken)])
    assert result.exit_code == 2 and result.output.startswith(f"error: PATH: {broken} cannot be read (")
    assert not (broken / report.REPORT_FILE).exists()
    out = tmp_path / "mail" / "run.html"
    result = runner.invoke(app, ["report", str(run), "--out", str(out)])
    assert result.exit_code == 0 and f"written: {out}" in " ".join(result.output.split()) and out.stat().st_size > 0


def _chromium():
    """The distribution's Chromium driven by Selenium, pointed at its binaries (Selenium Manager,
    which would download a browser, is never asked)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: the report's browser test needs Chromium and its driver; "
            "install them with `sudo apt-get install -y chromium chromium-driver` (.ci/run does)",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,900")
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def test_reports_render_in_chromium(lab):
    """Every figure decoded, every table there, and a full-page screenshot in test-artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    driver = _chromium()
    try:
        for name, tables in (("run", RUN_TABLES), ("sweep", SWEEP_TABLES), ("comparison", COMPARISON_TABLES)):
            driver.get(lab["pages"][name].resolve().as_uri())
            images = driver.execute_script(
                "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"
            )
            assert images and all(complete and width > 0 for _, complete, width in images), (name, images)
            found = driver.execute_script(
                "return Array.from(document.querySelectorAll('table')).map(t => [t.id, t.caption.textContent]);"
            )
            assert {table_id for table_id, _ in found} >= tables and all(caption for _, caption in found)
            height = driver.execute_script("return document.documentElement.scrollHeight;")
            driver.set_window_size(1280, min(height, 16000))
            shot = ARTIFACTS / f"report-{name}.png"
            assert driver.save_screenshot(str(shot))
            with Image.open(shot) as image:
                assert image.width >= 1000 and image.height >= min(height, 16000) - 200
                assert len(image.convert("RGB").getcolors(1 << 20) or ()) > 100  # drawn, not blank
            driver.set_window_size(1280, 900)
    finally:
        driver.quit()

"""`make paper` resumes: a completed run is not trained again, an interrupted one is continued, a
missing one is trained, a failed one is left alone, and what is already explained is not explained
again."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paper.py"


def plan(root: Path, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--root", str(root), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.removeprefix("$ icl-gd ") for line in done.stdout.splitlines() if line.startswith("$ ")]


def test_paper_runs_only_what_is_missing(tmp_path, tiny_run):
    root = tmp_path / "paper"
    unexplained = shutil.ignore_patterns("explain")  # other tests may have explained the shared run
    shutil.copytree(tiny_run.run_dir, root / "single_layer", ignore=unexplained)  # completed, not explained
    shutil.copytree(tiny_run.run_dir, root / "multi_layer", ignore=unexplained)  # explained: nothing to do
    (root / "multi_layer" / "explain").mkdir()
    shutil.copytree(tiny_run.run_dir, root / "ood", ignore=unexplained)  # interrupted
    summary = json.loads((root / "ood" / "summary.json").read_text())
    (root / "ood" / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    shutil.copytree(tiny_run.run_dir, root / "label_noise", ignore=unexplained)  # diverged: left as it is
    (root / "label_noise" / "summary.json").write_text(json.dumps({**summary, "status": "failed"}))
    commands = plan(root, "--only", "single_layer,multi_layer,ood,recurrent,label_noise", "train.steps=10")
    assert commands[:4] == [
        f"explain {root / 'single_layer'} --seed-all",
        f"train -m experiment=recurrent model.layers=2,3,4,5 train.seeds=5 train.steps=10 --out {root / 'recurrent'}",
        f"train --resume {root / 'ood'}",
        f"compare {root / 'single_layer'} {root / 'recurrent'} {root / 'multi_layer'} {root / 'ood'} "
        f"{root / 'label_noise'} --out " + commands[3].rsplit("--out ", 1)[1],
    ]
    assert commands[4].startswith(f"report {root}/compare-")


def test_paper_names_the_allowed_experiments(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--root", str(tmp_path), "--only", "singel_layer"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "--only: unknown experiment(s) singel_layer; allowed: single_layer, recurrent," in done.stderr

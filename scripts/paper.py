"""The whole study in one command (`make paper`): every named experiment at the papers' sizes
(five seeds where the papers show spread), then `explain` on the runs it applies to, one
`icl-gd compare` over all of them and one `icl-gd report` of that comparison.

Resumable: each experiment has a fixed folder under `--root` (default `runs/paper`); a completed
run or sweep is not run again, an interrupted one is continued (`icl-gd train --resume`), a failed
(diverged) one is left as it is, and a run already explained is not explained again. Each
invocation writes a new `compare-<timestamp>` folder (with `report.html` inside), so nothing written
before is overwritten. Wall times per step go to `ROOT/paper.json`. Every step is the `icl-gd`
command a researcher would type.
Usage: `python scripts/paper.py [--root DIR] [--only a,b] [--dry-run] [OVERRIDES...]`; overrides
(e.g. `train.steps=200` for a rehearsal) go to every training run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from icl_gd import sweeps

FIVE = "train.seeds=5"


@dataclass(frozen=True)
class Step:
    """One experiment of the study: `icl-gd train` with these overrides (a sweep when `sweep`)."""

    name: str
    overrides: tuple[str, ...]
    sweep: bool = False
    explain: bool = False


# The Makefile's targets at the papers' sizes (README, "Paper figures"; docs/experiments_tasks.md).
PLAN = (
    Step("single_layer", ("experiment=single_layer", FIVE), explain=True),
    Step("recurrent", ("experiment=recurrent", "model.layers=2,3,4,5", FIVE), sweep=True),
    Step("multi_layer", ("experiment=multi_layer", FIVE), explain=True),
    Step("depth_extrapolation", ("experiment=depth_extrapolation",)),
    Step("layernorm_mlp", ("experiment=layernorm_mlp",)),
    Step("ood", ("experiment=ood", FIVE)),
    Step("distractors", ("experiment=distractors", FIVE)),
    Step("label_noise", ("experiment=label_noise", FIVE)),
    Step("preconditioned", ("experiment=preconditioned", FIVE), explain=True),
    Step("softmax", ("experiment=softmax", FIVE), explain=True),
    Step("softmax_2heads", ("experiment=softmax_2heads", FIVE), explain=True),
    Step("layernorm", ("experiment=layernorm", FIVE)),
    Step("layernorm_2layers", ("experiment=layernorm_2layers", FIVE)),
    Step("sine", ("experiment=sine", FIVE)),
    Step("sine_paper", ("experiment=sine_paper", FIVE)),
    Step("classic_tokens_small", ("experiment=classic_tokens_small", FIVE)),
    Step("classic_tokens", ("experiment=classic_tokens", FIVE, "train.steps=40000")),
    Step("lds_linear", ("experiment=lds_linear", "model.layers=1,2,4,6"), sweep=True),
    Step("lds_softmax", ("experiment=lds_softmax",)),
    Step("lds_mesa", ("experiment=lds_mesa",)),
    Step("lds_compare", ("experiment=lds_mesa", "model.attention=linear,softmax,mesa"), sweep=True),
    Step("lds_probes", ("experiment=lds_probes",)),
    Step("lds_fewshot", ("experiment=lds_fewshot",)),
    Step("lds_softmax_partial", ("experiment=lds_softmax_partial",)),
    Step("lds_mesa_partial", ("experiment=lds_mesa_partial",)),
)


def icl_gd() -> str:
    """The `icl-gd` of this interpreter's environment."""
    beside = Path(sys.executable).with_name("icl-gd")
    return str(beside) if beside.exists() else (shutil.which("icl-gd") or "icl-gd")


def status(folder: Path, sweep: bool) -> str:
    """`new`, or the run's status (`sweeps.point_status`); a sweep is `completed` when every point
    is, `failed` when every point has ended and one failed, else `running` (to be relaunched)."""
    if not folder.exists():
        return "new"
    if not sweep:
        return sweeps.point_status(folder)
    if not (folder / sweeps.SWEEP_FILE).exists():
        return "running"  # killed before its index was written: relaunching says what it can
    states = {point["status"] for point in sweeps.load_index(folder)["points"]}
    if states == {"completed"}:
        return "completed"
    return "failed" if states <= {"completed", "failed"} else "running"


def commands(step: Step, root: Path, overrides: list[str]) -> list[list[str]]:
    """The `icl-gd` commands that bring `step` to completed, then explained."""
    folder, state = root / step.name, status(root / step.name, step.sweep)
    out: list[list[str]] = []
    if state == "new":
        out.append(["train", *(["-m"] if step.sweep else []), *step.overrides, *overrides, "--out", str(folder)])
    elif state not in ("completed", "failed"):  # interrupted, killed while running, or pending points
        out.append(["train", "--resume", str(folder)])
    if step.explain and state != "failed" and not (folder / "explain").exists():
        out.append(["explain", str(folder), "--seed-all"])
    return out


def run(command: list[str], dry_run: bool) -> tuple[int, float]:
    print(f"$ icl-gd {' '.join(command)}", flush=True)
    if dry_run:
        return 0, 0.0
    start = time.perf_counter()
    code = subprocess.run([icl_gd(), *command], check=False).returncode
    return code, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/paper"), help="where the study lives")
    parser.add_argument("--only", default="", help="comma-separated experiments of the plan (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands that would run, run nothing")
    parser.add_argument("overrides", nargs="*", help="overrides for every training run")
    args = parser.parse_args()
    names = [s.name for s in PLAN]
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"--only: unknown experiment(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
    steps = [s for s in PLAN if s.name in chosen]
    started, timings, failed = time.perf_counter(), {}, []
    for step in steps:
        for command in commands(step, args.root, args.overrides):
            code, wall = run(command, args.dry_run)
            timings[f"{step.name}: {command[0]}"] = round(wall, 1)
            if code != 0:
                failed.append(f"{step.name} ({command[0]}, exit {code})")
                break
    done = [
        str(args.root / s.name) for s in steps if args.dry_run or status(args.root / s.name, s.sweep) == "completed"
    ]
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    compare = args.root / f"compare-{stamp}"
    if done:
        for command in (["compare", *done, "--out", str(compare)], ["report", str(compare)]):
            code, wall = run(command, args.dry_run)
            timings[command[0]] = round(wall, 1)
            if code != 0:
                failed.append(f"{command[0]} (exit {code})")
                break
    total = time.perf_counter() - started
    if not args.dry_run:
        args.root.mkdir(parents=True, exist_ok=True)
        log = args.root / "paper.json"
        history = json.loads(log.read_text()) if log.exists() else []
        history.append({"started": stamp, "wall_time_s": round(total, 1), "steps": timings, "failed": failed})
        log.write_text(json.dumps(history, indent=2) + "\n")
        print(f"study: {total / 60:.1f} min this time; report: {compare / 'report.html'}; timings: {log}")
    if failed:
        print(f"error: failed: {'; '.join(failed)} (run `make paper` again to continue)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

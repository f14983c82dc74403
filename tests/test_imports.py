"""Data flows one way: cli -> config / experiment / analyses -> runs -> numerics (import-linter
contracts in pyproject.toml); validating a config loads no numerics."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports is not None, "import-linter is part of the dev extra"
    result = subprocess.run([lint_imports, "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_validating_a_config_loads_no_numerics():
    code = (
        "import sys; from icl_gd import config; config.load_config(['task=lds']); "
        "print(sorted(m for m in ('jax', 'pandas', 'matplotlib', 'flax') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

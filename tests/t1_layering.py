"""The architecture's dependency rules (import-linter contracts in pyproject.toml) hold."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    p = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "broken" not in p.stdout.split("Contracts:")[-1].lower().replace("0 broken", "")

"""The README's main job, `lazyfs demo`, runs end to end (it mounts, so it runs as root)."""

import subprocess
import sys

from tests.fixtures.common import require_root


def test_demo_runs_end_to_end(tmp_path):
    require_root()
    p = subprocess.run([sys.executable, "-m", "lazyfs.cli", "demo", "--dir", str(tmp_path / "demo")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "every byte matches the source" in p.stdout
    assert "demo finished" in p.stdout
    assert not (tmp_path / "demo").exists()
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()

"""Suite-wide test policy.

* Unexpected skips fail the run when LAZYFS_FAIL_ON_SKIP=1 (CI): every part a test needs
  is installed by tools/install.sh, so a skip means a missing install step.
* A test that logs a WARNING or worse fails unless it is marked ``expected_log`` (the
  s3ql rule: silent degradation must not hide).
"""

import logging
import os

import pytest

pytest_plugins = [
    "tests.fixtures.common",
    "tests.fixtures.containerd",
    "tests.fixtures.registry",
]

_skipped: list[str] = []


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "expected_log: the test provokes WARNING/ERROR log records on purpose"
    )


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("LAZYFS_FAIL_ON_SKIP") == "1" and _skipped:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"FAIL: {len(_skipped)} unexpected skipped test(s):", red=True)
            for nodeid in _skipped:
                tr.write_line(f"  {nodeid}", red=True)
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _fail_on_unexpected_log(request, caplog):
    caplog.set_level(logging.INFO)
    yield
    if request.node.get_closest_marker("expected_log"):
        return
    bad = [
        r for r in caplog.get_records("call") + caplog.get_records("setup")
        if r.levelno >= logging.WARNING and r.name.split(".")[0] in ("lazyfs", "snapshotter")
    ]
    if bad:
        lines = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in bad)
        pytest.fail(f"unexpected log records (mark the test expected_log if intended):\n{lines}")

"""`lazyfs bench` pure parts: experiment files, run order, registry access-log accounting,
the results store (torn lines, last record wins), the summary statistics, unavailable modes."""

from __future__ import annotations

import json

import pytest

from lazyfs.bench.experiment import (
    BUILTIN_DIR, ExperimentError, load_experiment, parse_experiment, parse_size, resolve_experiment_path,
)
from lazyfs.bench.modes import MODES, LazyOrderedMode, make_mode
from lazyfs.bench.registrylog import traffic_since
from lazyfs.bench.report import _quantile, ideal_times, summarise
from lazyfs.bench.results import FIELDS, ResultStore
from lazyfs.bench.runner import ExperimentRefused, Runner

MINIMAL = """
name = "x"
repetitions = 2
modes = ["overlayfs", "lazy"]
[[images]]
name = "a"
recipe = "busybox-python"
[[images]]
name = "b"
ref = "oci:/somewhere:v1"
[[workloads]]
name = "w"
command = ["/bin/true"]
ready = "exit"
[[profiles]]
name = "fast"
rate_mbit = 1000
[[profiles]]
name = "loopback"
"""


def test_builtin_experiments_parse():
    for name in ("ci-small", "coldstart"):
        experiment = load_experiment(resolve_experiment_path(name), set(MODES))
        assert experiment.runs()
    coldstart = load_experiment(BUILTIN_DIR / "coldstart.toml", set(MODES))
    assert set(coldstart.modes) == set(MODES)
    assert {i.recipe for i in coldstart.images} == {"debian-python", "debian-scipy"}
    assert [(p.rate_mbit, p.rtt_ms) for p in coldstart.profiles] == [(100.0, 20.0)]


def test_matrix_order_and_ids():
    e = parse_experiment(MINIMAL, set(MODES))
    runs = e.runs()
    assert len(runs) == 2 * 1 * 2 * 2 * 2  # images x workloads x modes x profiles x reps
    assert len({r.run_id for r in runs}) == len(runs)
    # modes alternate innermost, profiles outermost
    assert [r.mode for r in runs[:4]] == ["overlayfs", "lazy", "overlayfs", "lazy"]
    assert [r.profile for r in runs[:8]] == ["fast"] * 8
    assert e.profiles[1].shaped is False and e.profiles[0].rtt_ms == 0.0
    assert e.fingerprint() == parse_experiment(MINIMAL + "\n# comment\n", set(MODES)).fingerprint()
    assert e.fingerprint() != parse_experiment(MINIMAL.replace("repetitions = 2", "repetitions = 3")).fingerprint()


@pytest.mark.parametrize("text, message", [
    ("modes = ['lazy']", "no \\[\\[images\\]\\]"),
    ("[[images]]\nname='a'\n", "exactly one of recipe"),
    ("[[images]]\nname='a'\nrecipe='r'\nref='oci:/x'\n", "exactly one of recipe"),
    ("[[images]]\nname='a'\nref='docker.io/x'\n", "OCI layout"),
    ("[[images]]\nname='a'\nref='oci:/x'\n", "need \\[\\[workloads\\]\\]"),
    ("modes=['fast']\n[[images]]\nname='a'\nrecipe='r'\n", "unknown modes fast"),
    ("[[images]]\nname='a'\nrecipe='r'\n[[workloads]]\nname='w'\ncommand=['x']\n", "needs ready"),
    ("[[images]]\nname='a'\nrecipe='r'\n[[workloads]]\nname='w'\ncommand=['x']\nready='('\n", "not a regex"),
    ("[[images]]\nname='a'\nrecipe='r'\n[[profiles]]\nname='p'\nrate_mbit=-1\n", "positive"),
    ("[[images]]\nname='a'\nrecipe='r'\ncolour='red'\n", "unknown keys colour"),
    ("repetitions = 0\n[[images]]\nname='a'\nrecipe='r'\n", "repetitions"),
    ("name = '../x'\n[[images]]\nname='a'\nrecipe='r'\n", "not a valid name"),
    ("[[images]\n", "not valid TOML"),
])
def test_bad_experiments_are_refused_clearly(text, message):
    with pytest.raises(ExperimentError, match=message):
        parse_experiment(text, set(MODES))


def test_sizes():
    assert parse_size("1M") == 1 << 20 and parse_size("64KiB") == 64 << 10 and parse_size(4096) == 4096
    with pytest.raises(ExperimentError):
        parse_size("lots")


def test_registry_traffic_from_access_log(tmp_path):
    log = tmp_path / "registry.log"
    log.write_text(
        '169.254.200.1 - - [23/Nov/2026:16:35:56 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "ctr"\n')
    start = log.stat().st_size
    with open(log, "a") as f:
        f.write('time="2026-11-23T16:35:56Z" level=info msg="response completed" http.request.method=GET\n'
                '169.254.200.1 - - [23/Nov/2026:16:35:57 +0000] "HEAD /v2/r/manifests/t HTTP/1.1" 200 0 "" "ctr"\n'
                '169.254.200.1 - - [23/Nov/2026:16:35:57 +0000] "GET /v2/r/blobs/sha256:ab?x=1 HTTP/1.1" 206 1048576 "" "h"\n'
                '169.254.200.1 - - [23/Nov/2026:16:35:57 +0000] "GET /v2/r/blobs/sha256:cd HTTP/1.1" 200 500 "" "h"\n'
                '169.254.200.1 - - [23/Nov/2026:16:35:58 +0000] "GET /v2/r/manifests/t HTTP/1.1" 404 - "" "h"\n')
    t = traffic_since(log, start)
    assert (t.requests, t.bytes, t.blob_requests, t.blob_bytes, t.manifest_requests) == (4, 1049076, 2, 1049076, 2)
    assert t.by_status == {"200": 2, "206": 1, "404": 1}


def test_results_store_torn_line_and_last_record_wins(tmp_path):
    store = ResultStore(tmp_path / "r")
    store.create("name='x'", {"fingerprint": "f"})
    store.append({"run_id": "a", "status": "failed"})
    with open(store.runs_path, "a") as f:
        f.write('{"run_id": "b", "sta')  # crash in the middle of a write
    store.append({"run_id": "a", "status": "ok", "ready_s": 1.5}, events=[{"start": 0, "end": 1}])
    runs = store.runs()
    assert runs == [{"run_id": "a", "status": "ok", "ready_s": 1.5}]
    assert store.events("a") == [{"start": 0, "end": 1}] and store.events("b") == []
    csv_lines = (store.dir / "runs.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(FIELDS) and len(csv_lines) == 2
    assert json.loads((store.dir / "results.json").read_text())["runs"] == runs


def test_summary_statistics():
    assert _quantile([1, 2, 3, 4], 0.25) == 1.75 and _quantile([5], 0.75) == 5
    base = {"image": "i", "workload": "w", "profile": "p", "pull_s": 1.0, "registry_bytes": 10}
    runs = [{**base, "mode": "overlayfs", "status": "ok", "ready_s": s} for s in (8.0, 10.0, 12.0)]
    runs += [{**base, "mode": "lazy", "status": "ok", "ready_s": s} for s in (2.0, 2.5)]
    runs += [{**base, "mode": "lazy", "status": "failed", "ready_s": None}]
    runs += [{**base, "mode": "lazy-ordered", "status": "unavailable", "ready_s": None}]
    rows = {r["mode"]: r for r in summarise(runs)}
    assert [r["mode"] for r in summarise(runs)] == ["overlayfs", "lazy", "lazy-ordered"]
    assert rows["overlayfs"]["ready_s"] == 10.0 and rows["overlayfs"]["ready_q1"] == 9.0
    assert rows["lazy"]["ok"] == 2 and rows["lazy"]["runs"] == 3 and rows["lazy"]["ready_s"] == 2.25
    assert rows["lazy"]["speedup"] == pytest.approx(10.0 / 2.25)
    assert rows["lazy-ordered"]["ok"] == 0 and rows["lazy-ordered"]["status"] == "unavailable"


def test_modes_this_build_cannot_run_are_refused(tmp_path, monkeypatch):
    for name in MODES:  # this build has trace recording, --trace and --keep-order
        assert make_mode(name).unavailable_reason() is None
    monkeypatch.setattr(LazyOrderedMode, "unavailable_reason",
                        lambda self: "mode lazy-ordered is not available: it needs X")
    e = parse_experiment(MINIMAL.replace('modes = ["overlayfs", "lazy"]', 'modes = ["lazy", "lazy-ordered"]'),
                         set(MODES))
    with pytest.raises(ExperimentRefused, match="lazy-ordered is not available.*--skip-unavailable"):
        Runner(e, tmp_path / "results").run()
    assert not (tmp_path / "results").exists()  # refused before anything was written


def test_ideal_time_is_warm_plus_fetched_bytes_at_link_rate():
    base = {"image": "i", "workload": "w", "profile": "p", "status": "ok", "pull_s": 0.1,
            "registry_bytes": 1}
    runs = [{**base, "mode": "warm", "ready_s": 1.0, "lazyfs_fetched_bytes": 0},
            {**base, "mode": "lazy", "ready_s": 9.0, "lazyfs_fetched_bytes": 25_000_000}]
    config = {"experiment": {"profiles": [{"name": "p", "rate_mbit": 100.0, "rtt_ms": 20.0}]}}
    (ideal,) = ideal_times(summarise(runs), config)
    assert ideal["transfer_s"] == pytest.approx(2.0) and ideal["ideal_s"] == pytest.approx(3.0)
    unshaped = {"experiment": {"profiles": [{"name": "p", "rate_mbit": None, "rtt_ms": None}]}}
    assert ideal_times(summarise(runs), unshaped) == []
    assert ideal_times(summarise(runs[:1]), config) == []  # no lazy run to take the bytes from

"""`lazyfs bench` pure parts: experiment files, run order, registry access-log accounting,
the results store (torn lines, last record wins), the summary statistics, unavailable modes."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs.bench.experiment import (
    BUILTIN_DIR, NOT_LAZYFS_MODES, ExperimentError, Profile, apply_overrides, load_experiment,
    parse_experiment, parse_size, resolve_experiment_path,
)
from lazyfs.bench.modes import MODES, LazyOrderedMode, make_mode
from lazyfs.bench.registrylog import traffic_since
from lazyfs.bench.report import CellLabels, _quantile, build_report, ideal_times, summarise, timeline_cells
from lazyfs.bench.results import FIELDS, ResultStore
from lazyfs.bench.runner import ExperimentRefused, Runner, link_utilisation
from lazyfs.bench.system import DaemonSettings
from snapshotter import config as snapshotter_config

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
    for name in ("ci-small", "coldstart", "readall"):
        experiment = load_experiment(resolve_experiment_path(name), set(MODES))
        assert experiment.runs()
    coldstart = load_experiment(BUILTIN_DIR / "coldstart.toml", set(MODES))
    assert set(coldstart.modes) == set(MODES)
    assert coldstart.serve == ("fuse", "kernel")
    assert {i.recipe for i in coldstart.images} == {"debian-python", "debian-scipy"}
    assert [(p.rate_mbit, p.rtt_ms) for p in coldstart.profiles] == [(100.0, 20.0)]
    readall = load_experiment(BUILTIN_DIR / "readall.toml", set(MODES))
    assert readall.modes == ("overlayfs", "lazy") and readall.policies[0] == ()  # the default first
    assert {("none",), ("locality",)} <= set(readall.policies)
    (workload,) = readall.workloads
    assert "find / -xdev -type f -exec cat {} +" in workload.command[-1] and workload.ready == "^ready$"


def test_modes_outside_lazyfs_are_the_ones_the_dimensions_skip():
    assert NOT_LAZYFS_MODES == {name for name, mode in MODES.items() if mode.snapshotter != "lazyfs"}


DIMENSIONS = MINIMAL.replace('modes = ["overlayfs", "lazy"]', '''modes = ["overlayfs", "lazy", "warm"]
serve = ["fuse", "kernel"]
policies = ["default", ["none"], "trace,locality", ["mypkg.policy:Mine"]]''')


def test_serving_modes_and_policies_multiply_lazyfs_modes_only():
    e = parse_experiment(DIMENSIONS, set(MODES))
    assert e.serve == ("fuse", "kernel")
    assert e.policies == ((), ("none",), ("trace", "locality"), ("mypkg.policy:Mine",))
    cells = e.cells()
    assert cells[0] == ("overlayfs", None, None) and len(cells) == 1 + 2 * 2 * 4
    assert cells[1:3] == [("lazy", "fuse", ()), ("lazy", "kernel", ())]  # serving modes side by side
    runs = e.runs()
    assert len(runs) == 2 * 2 * 2 * len(cells) and len({r.run_id for r in runs}) == len(runs)
    ids = {r.run_id for r in runs}
    assert "a.w.overlayfs.fast.0" in ids and "a.w.lazy.kernel.default.fast.1" in ids
    assert "a.w.warm.fuse.trace_locality.fast.0" in ids
    assert "a.w.lazy.fuse.mypkg_policy_Mine.loopback.0" in ids  # no dots in a part of the id
    # without the new keys, ids and fingerprints are what they were
    plain = parse_experiment(MINIMAL, set(MODES))
    assert plain.serve is None and plain.policies is None and plain.runs()[1].run_id == "a.w.lazy.fast.0"
    assert "serve" not in plain.to_json() and "policies" not in plain.to_json()
    assert plain.fingerprint() != e.fingerprint()


def test_command_line_overrides_replace_top_level_keys(tmp_path):
    path = tmp_path / "e.toml"
    path.write_text(DIMENSIONS)
    e = load_experiment(path, set(MODES), ["repetitions=1", 'serve=["kernel"]', 'policies=[["none"]]',
                                           'modes = ["lazy"]'])
    assert (e.repetitions, e.serve, e.policies, e.modes) == (1, ("kernel",), (("none",),), ("lazy",))
    assert [r.run_id for r in e.runs()[:2]] == ["a.w.lazy.kernel.none.fast.0", "b.w.lazy.kernel.none.fast.0"]
    assert e.source.startswith("# overridden on the command line:\nrepetitions = 1\n")
    assert parse_experiment(e.source, set(MODES)) == e  # what the results directory keeps
    assert apply_overrides(DIMENSIONS, []) == DIMENSIONS
    for bad, message in (("repetitions", "KEY=VALUE"), ("images=[]", "KEY=VALUE"),
                         ("modes=[lazy]", "not TOML"), ("repetitions=0", "repetitions")):
        with pytest.raises(ExperimentError, match=message):
            load_experiment(path, set(MODES), [bad])
    path.write_text(DIMENSIONS.replace('serve = ["fuse", "kernel"]', 'serve = [\n  "fuse",\n  "kernel",\n]'))
    with pytest.raises(ExperimentError, match="spans several lines"):
        load_experiment(path, set(MODES), ['serve=["fuse"]'])


def test_a_run_for_some_images_only():
    e = parse_experiment(DIMENSIONS, set(MODES))
    only = e.only_images(["b"])
    assert [i.name for i in only.images] == ["b"] and {r.image for r in only.runs()} == {"b"}
    assert only.source.startswith("# run for the images b only (--image)\n")
    assert parse_experiment(only.source, set(MODES)) != only  # the file names both; config.json has the truth
    assert only.fingerprint() != e.fingerprint()
    with pytest.raises(ExperimentError, match="no image c in the experiment"):
        e.only_images(["c"])


def test_cli_refuses_a_bad_override_before_anything_runs():
    lazyfs = str(Path(sys.executable).parent / "lazyfs")
    bad = subprocess.run([lazyfs, "bench", "run", "ci-small", "--set", "serve=['ext4']"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "serving modes (fuse, kernel)" in bad.stderr, bad.stderr


def test_daemon_settings_are_what_the_snapshotter_reads(tmp_path):
    for settings, serve, policies in ((DaemonSettings(), snapshotter_config.DaemonConfig().serve, []),
                                      (DaemonSettings("kernel", ()), "kernel", []),
                                      (DaemonSettings("fuse", ("trace", "locality")), "fuse", ["trace", "locality"])):
        path = tmp_path / "snapshotter.toml"
        path.write_text(f'root = "{tmp_path}"\n[daemon]\nprefetch = true\n{settings.toml()}')
        cfg = snapshotter_config.load(path)
        assert cfg.daemon.serve == serve and cfg.daemon.policies == policies
        if settings.serve is None:  # nothing written: the snapshotter's own default
            assert cfg.daemon.serve == snapshotter_config.DaemonConfig().serve


def test_link_utilisation():
    profile = Profile("p", 100.0, 20.0)
    assert link_utilisation(25_000_000, profile, 4.0) == 0.5  # 200 Mbit in 4 s of a 100 Mbit/s link
    assert link_utilisation(1, Profile("loopback"), 1.0) is None


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
    ("serve = ['ext4']\n[[images]]\nname='a'\nrecipe='r'\n", "serving modes \\(fuse, kernel\\)"),
    ("serve = []\n[[images]]\nname='a'\nrecipe='r'\n", "serve must be a non-empty"),
    ("serve = ['fuse', 'fuse']\n[[images]]\nname='a'\nrecipe='r'\n", "distinct"),
    ("policies = [['bogus']]\n[[images]]\nname='a'\nrecipe='r'\n", "unknown fetch policy 'bogus'"),
    ("policies = []\n[[images]]\nname='a'\nrecipe='r'\n", "non-empty array of policy sets"),
    ("policies = [[]]\n[[images]]\nname='a'\nrecipe='r'\n", "no fetch policy named"),
    ("policies = [3]\n[[images]]\nname='a'\nrecipe='r'\n", "not a policy set"),
    ("policies = [['trace', 1]]\n[[images]]\nname='a'\nrecipe='r'\n", "not a list of policy names"),
    ("policies = ['none', ['none']]\n[[images]]\nname='a'\nrecipe='r'\n", "listed twice"),
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


def _run(mode, ready, serve=None, policies=None, image="i", **extra):
    record = {"image": image, "workload": "w", "profile": "p", "mode": mode, "serve": serve,
              "policies": policies, "status": "ok", "ready_s": ready, "pull_s": 0.5,
              "registry_bytes": 12_500_000, "registry_requests": 10, "rate_mbit": 100.0,
              "run_id": f"{image}.{mode}.{serve}.{policies}.{ready}", "repetition": 0,
              "workload_read_bytes": None, "daemon_cpu_s": 0.1, "containerd_cpu_s": 0.2,
              "fetch_events": 0, "lazyfs_fetched_bytes": 0, "image_layer_bytes": None}
    record.update(extra)
    return record


def test_summary_by_serving_mode_and_policies():
    runs = [_run("overlayfs", s) for s in (10.0, 12.0)]
    runs += [_run("lazy", s, "fuse", "default") for s in (4.0, 5.0)]
    runs += [_run("lazy", s, "kernel", "default") for s in (2.0, 3.0)]
    runs += [_run("lazy", 8.0, "kernel", "none", link_utilisation=0.25)]
    runs += [_run("warm", 1.0, "kernel", "none", lazyfs_fetched_bytes=0)]
    rows = summarise(runs)
    assert [(r["mode"], r["serve"], r["policies"]) for r in rows] == [
        ("overlayfs", None, None), ("lazy", "fuse", "default"), ("lazy", "kernel", "default"),
        ("lazy", "kernel", "none"), ("warm", "kernel", "none")]
    by = {(r["mode"], r["serve"], r["policies"]): r for r in rows}
    assert by[("lazy", "kernel", "default")]["ready_s"] == 2.5
    assert by[("lazy", "kernel", "default")]["speedup"] == pytest.approx(11.0 / 2.5)  # against overlayfs
    # recorded utilisation is kept; older records get it from bytes, rate and time to ready
    assert by[("lazy", "kernel", "none")]["link_utilisation"] == 0.25
    assert by[("overlayfs", None, None)]["link_utilisation"] == pytest.approx(
        statistics.median([100e6 / (100e6 * s) for s in (10.0, 12.0)]))
    label = CellLabels(runs)
    assert label(("lazy", "kernel", "none")) == "lazy kernel none" and label(("overlayfs", None, None)) == "overlayfs"
    assert CellLabels(runs[:4])(("lazy", "fuse", "default")) == "lazy"  # nothing varies: the mode alone
    # records from before the dimensions existed have neither key
    old = [{k: v for k, v in r.items() if k not in ("serve", "policies")} for r in runs[:4]]
    assert [(r["mode"], r["serve"]) for r in summarise(old)] == [("overlayfs", None), ("lazy", None)]


def test_table_shows_serving_mode_policies_requests_and_link_use():
    from rich.console import Console
    runs = [_run("overlayfs", 10.0), _run("lazy", 4.0, "fuse", "default"), _run("lazy", 2.0, "kernel", "none")]
    report = build_report_from(runs)
    console = Console(width=250, record=True)
    console.print(report.table())
    text = console.export_text()
    lines = [line for line in text.splitlines() if "lazy" in line and "│" in line]
    assert any("kernel" in line and "none" in line and "│       10 │" in line for line in lines), text
    assert "link %" in text and "requests" in text and "serve" in text and "policies" in text
    assert "image i, workload w, profile p" in text  # one value in every row: in the title
    assert "│ 25 │" in text.replace("     25 │", " 25 │")  # 12.5 MB in 4 s of 100 Mbit/s: 25 %


def build_report_from(runs):
    from lazyfs.bench.report import Report
    return Report({"experiment": {"name": "x", "profiles": [{"name": "p", "rate_mbit": 100.0}]}}, summarise(runs))


def test_report_plots_a_fetch_timeline_per_policy(tmp_path):
    store = ResultStore(tmp_path / "results")
    store.create("name='x'", {"experiment": {"name": "x", "profiles": [{"name": "p", "rate_mbit": 100.0}]},
                              "images": {}})
    events = [{"start": 0.1 * i, "end": 0.1 * i + 0.05, "bytes": 1 << 20, "chunks": 1,
               "priority": "on_demand", "source": "r"} for i in range(5)]
    store.append(_run("overlayfs", 10.0, run_id="ov"), [])
    for n, (serve, policies, ready) in enumerate((("fuse", "default", 3.0), ("fuse", "default", 1.0),
                                                  ("fuse", "default", 2.0), ("kernel", "none", 2.5))):
        store.append(_run("lazy", ready, serve, policies, run_id=f"lazy{n}", fetch_events=5), events)
    store.append(_run("warm", 1.0, "fuse", "default", run_id="warm0", fetch_events=1), events[:1])
    ok = store.runs()
    chosen = timeline_cells(ok)["i"]
    assert [(cell, run["run_id"]) for cell, run in chosen] == [
        (("lazy", "fuse", "default"), "lazy2"), (("lazy", "kernel", "none"), "lazy3")]  # median runs
    report = build_report(store.dir, tmp_path / "report")
    names = {p.name for p in report.plots}
    assert {"timelines-i.png", "timeline-i-lazy-fuse-default.png", "timeline-i-lazy-kernel-none.svg",
            "readiness.png", "bytes.png"} <= names
    for path in report.plots:
        assert path.stat().st_size > 1000

"""`lazyfs bench` end to end: a small experiment with the real containerd, runc, lazyfs-snapshotter,
lazyfs daemon and docker-registry behind a shaped link; its results, resume and report. Then
the built-in ci-small experiment: the lazy mode in both serving modes under two policy sets.

The image is made here: a busybox layer and a layer with a 24 MiB file the workload barely
touches, so a lazy start must fetch far less than a full pull. Modes: overlayfs (full pull),
lazy, lazy-prefetch (trace recorded, embedded by `lazyfs convert --trace --keep-order`,
prefetched) and lazy-ordered (the same with the trace-ordered layout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from lazyfs.bench.experiment import load_experiment, resolve_experiment_path
from lazyfs.bench.modes import MODES
from lazyfs.bench.report import build_report
from lazyfs.bench.results import FIELDS
from lazyfs.bench.runner import ExperimentRefused, Runner
from tests.fixtures.common import require_root, require_tool
from tests.fixtures.images import build_image, busybox_layer, directory, file
from tests.fixtures.lazyimage import push_to_store

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BIG = 24 << 20


def make_image(oci_dir: Path) -> str:
    image = build_image([busybox_layer(("sh", "cat", "head")),
                         [directory("data"), file("data/big.bin", os.urandom(BIG)),
                          file("data/ready.txt", b"ready\n")]])
    push_to_store(f"oci:{oci_dir}:v1", image)
    return f"oci:{oci_dir}:v1"


EXPERIMENT = """\
name = "t5-small"
repetitions = 2
modes = ["overlayfs", "lazy", "lazy-prefetch", "lazy-ordered", "learned"]
timeout_s = 60
registry_root = "{registry}"

[[images]]
name = "tiny"
ref = "{ref}"

[[workloads]]
name = "head"
command = ["/bin/sh", "-c", "head -c 4096 /data/big.bin >/dev/null && cat /data/ready.txt"]
ready = "^ready$"

[[profiles]]
name = "100mbit-10ms"
rate_mbit = 100
rtt_ms = 10
"""


@pytest.fixture
def bench_tools():
    require_root()
    for name in ("containerd", "runc", "ctr", "ctr-remote", "docker-registry", "skopeo", "ip", "tc"):
        require_tool(name)


def test_small_experiment_end_to_end(bench_tools, tmp_path):
    ref = make_image(tmp_path / "image")
    toml = tmp_path / "small.toml"
    toml.write_text(EXPERIMENT.format(registry=tmp_path / "registry", ref=ref))
    experiment = load_experiment(toml, set(MODES))
    results = tmp_path / "results"

    records = Runner(experiment, results, cache_dir=tmp_path / "cache").run()

    assert len(records) == 10
    for r in records:
        assert r["status"] == "ok", r["error"]
        assert set(FIELDS) <= set(r)
        assert 0 < r["pull_s"] < r["ready_s"] <= r["total_s"]
        assert r["registry_requests"] > 0 and r["registry_bytes"] > 0
        assert r["cache_files_at_start"] == 0  # cold: the check ran and found the cache empty
        assert r["page_cache_after_kib"] <= r["page_cache_before_kib"]
        assert r["output_tail"].endswith("ready")
    assert len({r["daemon_pid"] for r in records}) == 10  # a new daemon for every run
    by_mode = {m: [r for r in records if r["mode"] == m]
               for m in ("overlayfs", "lazy", "lazy-prefetch", "lazy-ordered", "learned")}
    full = max(r["registry_blob_bytes"] for r in by_mode["overlayfs"])
    assert full >= BIG  # random data does not compress: a full pull moves all of it
    for r in by_mode["lazy"]:
        assert r["registry_blob_bytes"] < full / 3, (r["registry_blob_bytes"], full)
    for r in by_mode["lazy"] + by_mode["lazy-prefetch"] + by_mode["lazy-ordered"]:
        assert r["lazyfs_fetched_bytes"] > 0 and r["workload_read_bytes"] > 0
        assert r["fetch_events"] >= 1 and r["daemon_cpu_s"] is not None
        assert r["lazyfs_stats"]["fetch"]["failed_chunks"] == 0
    # the trace of the workload was recorded once, embedded, and prefetched on attach
    traces = list((tmp_path / "cache" / "traces").glob("tiny-*.trace"))
    assert len(traces) == 1 and "data/big.bin" in traces[0].read_text()
    for r in by_mode["lazy-prefetch"] + by_mode["lazy-ordered"]:
        # an embedded trace is followed by path: all of big.bin is prefetched, not just 4 KiB
        assert r["lazyfs_stats"]["prefetch"]["queued"] >= BIG >> 20
        assert any(e["priority"] == "prefetch" for e in json.loads(
            (results / "events" / f"{r['run_id']}.json").read_text()))
    for r in by_mode["learned"]:
        # the image without a trace; the trace attached to it in the registry is found and
        # its chunks (by number: the 4 KiB read of big.bin is one chunk) prefetched
        assert r["lazyfs_stats"]["learned"]["found"] == 1
        assert r["lazyfs_stats"]["prefetch"]["queued"] >= 1
    for r in by_mode["lazy"]:
        assert r["lazyfs_stats"]["learned"]["found"] == 0  # its repository has no trace
    for r in by_mode["overlayfs"]:
        assert r["workload_read_bytes"] is None  # no FUSE layer to count reads on
        assert r["lazyfs_fetched_bytes"] == 0

    # CSV and JSON agree with the run records; configuration and versions are recorded
    csv_lines = (results / "runs.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == list(FIELDS) and len(csv_lines) == 11
    saved = json.loads((results / "results.json").read_text())
    assert len(saved["runs"]) == 10 and saved["config"]["fingerprint"] == experiment.fingerprint()
    env = saved["config"]["environments"][0]
    assert env["tools"]["containerd"] and env["kernel"] and env["packages"]["trio"]
    variants = saved["config"]["images"]["tiny"]
    assert variants["lazy"]["manifest_digest"].startswith("sha256:")
    digests = {v: variants[v]["manifest_digest"] for v in ("original", "lazy", "lazy-trace/head",
                                                            "lazy-ordered/head")}
    assert len(set(digests.values())) == 4  # trace embedded; trace-ordered layout: new images

    # an interrupted experiment resumes without repeating finished runs; results are never
    # overwritten by accident
    lines_before = (results / "runs.jsonl").read_text()
    with open(results / "runs.jsonl", "a") as f:
        f.write('{"run_id": "torn')  # a crash in the middle of appending
    again = Runner(experiment, results, resume=True, cache_dir=tmp_path / "cache").run()
    assert sorted(r["run_id"] for r in again) == sorted(r["run_id"] for r in records)
    assert (results / "runs.jsonl").read_text().startswith(lines_before)
    with pytest.raises(ExperimentRefused, match="--resume"):
        Runner(experiment, results, cache_dir=tmp_path / "cache").run()

    # the report: summary and valid plots
    report = build_report(results, tmp_path / "report")
    rows = {row["mode"]: row for row in report.summary}
    assert all(rows[m]["ok"] == 2 for m in ("overlayfs", "lazy", "lazy-prefetch", "lazy-ordered", "learned"))
    assert rows["lazy"]["registry_bytes"] < rows["overlayfs"]["registry_bytes"]
    assert rows["lazy"]["ready_min"] <= rows["lazy"]["ready_s"] <= rows["lazy"]["ready_max"]
    names = {p.name for p in report.plots}
    assert {"readiness.png", "bytes.png", "timeline.png", "readiness.svg"} <= names
    for path in report.plots:
        assert path.stat().st_size > 1000
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_SIGNATURE
    cli = subprocess.run([str(Path(sys.executable).parent / "lazyfs"), "bench", "report", str(results),
                          "--out", str(tmp_path / "report2")], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "overlayfs" in cli.stdout and "lazy" in cli.stdout


def test_ci_small_serving_modes_and_policies(bench_tools, tmp_path):
    # ci-small as it is, but one repetition of the lazy cells only (overlayfs is the first test's)
    experiment = load_experiment(resolve_experiment_path("ci-small"), set(MODES),
                                 ["repetitions=1", 'modes=["lazy"]'])
    assert experiment.serve == ("fuse", "kernel") and experiment.policies == ((), ("none",))
    results = tmp_path / "results"

    records = Runner(experiment, results, cache_dir=tmp_path / "cache").run()

    assert len(records) == 4
    lazy = {(r["serve"], r["policies"]): r for r in records}
    assert set(lazy) == {("fuse", "default"), ("kernel", "default"), ("fuse", "none"), ("kernel", "none")}
    for (serve, policies), r in lazy.items():
        assert r["status"] == "ok", r["error"]
        # every layer served as asked (no fallback), by a daemon started with the policies asked
        assert set(r["layers_served"]) == {serve} and sum(r["layers_served"].values()) == 2, r["layers_served"]
        assert r["daemon_policy_arg"] == (None if policies == "default" else policies)
        assert r["run_id"] == f"busybox-python.default.lazy.{serve}.{policies}.100mbit-20ms.0"
        assert r["lazyfs_fetched_bytes"] > 0 and r["workload_read_bytes"] > 0
        assert 0 < r["link_utilisation"] < 1.5

    report = build_report(results, tmp_path / "report")
    assert {(row["serve"], row["policies"]) for row in report.summary} == set(lazy)
    names = {p.name for p in report.plots}
    assert {"timelines-busybox-python.png", "timeline-busybox-python-lazy-kernel-none.png",
            "timeline-busybox-python-lazy-fuse-default.png"} <= names
    console = Console(width=250, record=True)
    console.print(report.table())
    assert [line for line in console.export_text().splitlines() if "kernel" in line and "none" in line]

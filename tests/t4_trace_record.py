"""`lazyfs trace record|show|stats|merge`, `lazyfs mount --record-trace`, and replaying a
recorded start: real FUSE mounts of a converted image in a real registry, a real sandbox."""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
import time
from pathlib import Path


from lazyfs.daemon.control import request
from lazyfs.layer.reader import open_blob_file
from lazyfs.daemon.mountstate import MountState
from lazyfs.trace.sandbox import run_workload
from lazyfs.trace.format import Access, FileEvent, Trace
from tests.faultproxy import Fault, FaultProxy
from tests.fixtures.common import require_root, require_tool
from tests.fixtures.images import build_image, directory, file, symlink
from tests.fixtures.lazyimage import convert_image, push_to_registry
from tests.fixtures.lazymount import lazy_mount, lazyfs_cli

CHUNK = 65536
rng = random.Random(55)
DATA = {"data/a": rng.randbytes(200_000), "data/b": rng.randbytes(130_000), "data/small": b"tiny\n",
        "data/unused": rng.randbytes(300_000)}
READS = ("data/a", "data/b", "data/small")
WORKLOAD = ["/bin/sh", "-c", "/bin/busybox cat /data/a >/dev/null; /bin/busybox head -c 10 /data/b; "
                             "/bin/busybox cat /data/small"]


def _busybox() -> bytes:
    return Path(require_tool("busybox")).read_bytes()


def _layers() -> list[list]:
    return [[directory("bin"), file("bin/busybox", _busybox(), mode=0o755), symlink("bin/sh", "busybox"),
             directory("etc"), file("etc/hostname", b"box\n")],
            [directory("data"), *(file(p, d) for p, d in DATA.items())]]


def _push(registry, repo: str, layers: list[list]):
    image = convert_image(build_image(layers), chunk_size=CHUNK)
    push_to_registry(registry, repo, image)
    return image


def _regular_files(trace: Trace) -> set[str]:
    known = {f"/{p}" for p in DATA} | {"/bin/busybox", "/etc/hostname"}
    return trace.paths() & known


def _strace_regular_files(log: Path, root: Path) -> set[str]:
    """Regular files of the image that the workload opened or executed, from ``strace -f``:
    every successful open/execve from the workload's first execve on, symlinks resolved."""
    lines = log.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if 'execve("/bin/sh"' in line and line.endswith("= 0"))
    found: set[str] = set()
    for line in lines[start:]:
        match = re.search(r'(?:openat|open|execve)\((?:AT_FDCWD, )?"(/[^"]*)".* = (\d+)', line)
        if match is None:
            continue
        inside = os.path.realpath(root / match.group(1).lstrip("/"))
        if inside.startswith(f"{root}/") and os.path.isfile(inside):
            found.add(inside[len(str(root)):])
    return found


def _wait(mount, done, what: str, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        stats = mount.stats()
        if done(stats):
            return stats
        assert time.monotonic() < deadline, f"{what} did not finish: {stats}"
        time.sleep(0.05)


def _prefetch_done(stats: dict) -> bool:
    # Totals over priorities: a queued prefetch chunk that an on-demand read promotes is
    # counted done at on-demand priority.
    # A layer's trace chunks are queued after its attach, once attaches settle: none pending.
    fetch = stats["fetch"]
    queued = sum(fetch["queued"].values())
    return (stats["prefetch"]["layers_pending"] == 0
            and sum(fetch["done"].values()) + fetch["failed_chunks"] >= queued and fetch["inflight"] == 0)


def _fetch_log(mount) -> list[dict]:
    socket = MountState.for_mountpoint(mount.path, mount.run_dir).socket
    return request(str(socket), "fetch-log")["events"]


def _blob_requests(proxy) -> list:
    return [r for r in proxy.requests if "/blobs/" in r.path and r.range is not None]


def test_record_names_exactly_the_files_read_and_prefetch_leaves_no_on_demand_fetch(registry, tmp_path):
    require_root()
    converted = _push(registry, "t/trace-record:v1", _layers())
    image = f"{registry.host}/t/trace-record:v1"
    out = tmp_path / "start.trace"
    # The order the docs give: IMAGE, then the options, then the workload after --.
    result = lazyfs_cli("trace", "record", image, "-o", str(out), "--timeout", "60",
                        "--cache-dir", str(tmp_path / "cache-rec"), "--", *WORKLOAD)
    assert "exited with status 0" in result.stdout, result.stdout + result.stderr
    trace = Trace.decode(out.read_bytes())
    assert _regular_files(trace) == {"/bin/busybox", *(f"/{p}" for p in READS)}
    opened = {f.path for f in trace.files if f.kind == "open"}
    assert {f"/{p}" for p in READS} <= opened
    read = {a.path for a in trace.accesses}
    assert {"/data/a", "/data/b", "/bin/busybox"} <= read and "/data/unused" not in read
    chunks_a = {n for a in trace.accesses if a.path == "/data/a" for n in range(a.first, a.last + 1)}
    assert len(chunks_a) == -(-len(DATA["data/a"]) // CHUNK)

    summary = trace.stats()
    assert summary.files_read == 3 and summary.chunks == len({(a.layer, n) for a in trace.accesses
                                                             for n in range(a.first, a.last + 1)})
    assert f"{summary.chunks}" in lazyfs_cli("trace", "stats", str(out)).stdout
    # With the image: the stored bytes a prefetch of this trace fetches (distinct frames of
    # its chunks) and the file bytes those chunks hold, from the layers' chunk tables.
    [row] = json.loads(lazyfs_cli("trace", "stats", "--json", "--image", image, str(out)).stdout)
    expected_stored = expected_file = 0
    for layer in converted.layers:
        blob = tmp_path / "blob"
        blob.write_bytes(layer.blob)
        with open(blob, "rb") as f:
            table = open_blob_file(f).table
        wanted = set(trace.chunks_of(layer.digest))
        expected_file += sum(table[n].length for n in wanted)
        expected_stored += sum(stored for _, stored in {(table[n].offset, table[n].stored_length) for n in wanted})
    assert (row["stored_bytes"], row["file_bytes"]) == (expected_stored, expected_file) and expected_stored > 0
    assert row["file_bytes"] < summary.chunks * CHUNK  # the old "bytes": chunks x chunk size
    shown = lazyfs_cli("trace", "show", str(out)).stdout
    assert "/data/b" in shown and "open" in shown
    assert lazyfs_cli("trace", "show", "--raw", str(out)).stdout.encode() == trace.encode()

    # Replay: prefetch the recorded trace on a cold cache, then run the same workload. In FUSE
    # mode, as recorded: in kernel mode the kernel reads ahead on the chunk device past what
    # the workload reads (the rest of data/b), which is then fetched on demand.
    with lazy_mount(tmp_path / "mnt", "--serve", "fuse", "--trace", str(out), image, run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache-replay") as mount:
        stats = _wait(mount, _prefetch_done, "prefetch")
        assert stats["fetch"]["done"]["prefetch"] > 0
        strace_log = tmp_path / "strace.log"
        outcome = run_workload(mount.path, WORKLOAD, timeout=60, wrapper=[
            require_tool("strace"), "-f", "-qq", "-e", "trace=openat,open,execve", "-o", str(strace_log)])
        assert outcome.reason == "exited" and outcome.status == 0, outcome.output
        # The same command under strace opens exactly the regular files the trace names.
        assert _strace_regular_files(strace_log, mount.path) == _regular_files(trace)
        stats = mount.stats()
        assert stats["fetch"]["queued"]["on_demand"] == 0, stats["fetch"]
        assert stats["fetch"]["misses"] == 0, stats["fetch"]
        assert [e for e in _fetch_log(mount) if e["priority"] == "on_demand"] == []


def test_ready_line_stops_the_workload_and_the_trace(registry, tmp_path):
    require_root()
    _push(registry, "t/trace-ready:v1", _layers())
    out = tmp_path / "ready.trace"
    began = time.monotonic()
    result = lazyfs_cli("trace", "record", "-o", str(out), "--ready-line", "^rea[d]y$", "--timeout", "60",
                        "--cache-dir", str(tmp_path / "cache"), f"{registry.host}/t/trace-ready:v1", "--",
                        "/bin/sh", "-c", "/bin/busybox cat /data/a >/dev/null; echo ready; sleep 50; "
                                         "/bin/busybox cat /data/unused")
    assert time.monotonic() - began < 40
    assert "ready line appeared" in result.stdout, result.stdout + result.stderr
    paths = Trace.decode(out.read_bytes()).paths()
    assert "/data/a" in paths and "/data/unused" not in paths

    timed_out = lazyfs_cli("trace", "record", "-o", str(tmp_path / "t.trace"), "--ready-line", "never",
                           "--timeout", "1", "--cache-dir", str(tmp_path / "cache"),
                           f"{registry.host}/t/trace-ready:v1", "--", "/bin/sh", "-c", "sleep 50", check=False)
    assert timed_out.returncode == 1 and "timeout passed" in timed_out.stdout


def test_mount_record_trace_is_written_at_unmount(registry, tmp_path):
    require_root()
    _push(registry, "t/trace-mount-record:v1", _layers())
    out = tmp_path / "mount.trace"
    with lazy_mount(tmp_path / "mnt", "--record-trace", str(out), f"{registry.host}/t/trace-mount-record:v1",
                    run_dir=tmp_path / "run", cache_dir=tmp_path / "cache") as mount:
        assert (mount.path / "data/b").read_bytes() == DATA["data/b"]
        assert (mount.path / "data/small").read_bytes() == DATA["data/small"]
        assert not out.exists()
    trace = Trace.decode(out.read_bytes())
    assert _regular_files(trace) == {"/data/b", "/data/small"}
    assert [a.path for a in trace.accesses] == ["/data/b"]


def test_merge_keeps_earliest_first_use_order(tmp_path):
    layer = "sha256:" + "1" * 64
    first = Trace({layer: CHUNK})
    second = Trace({layer: CHUNK})
    first.accesses = [Access(0, layer, 5, 0, 1, "/a"), Access(30, layer, 6, 4, 4, "/c")]
    first.files = [FileEvent(0, "open", layer, 5, "/a")]
    second.accesses = [Access(0, layer, 7, 9, 9, "/x"), Access(10, layer, 6, 4, 5, "/c"),
                       Access(40, layer, 5, 1, 2, "/a")]
    (tmp_path / "1.trace").write_bytes(first.encode())
    (tmp_path / "2.trace").write_bytes(second.encode())
    lazyfs_cli("trace", "merge", "-o", str(tmp_path / "m.trace"), str(tmp_path / "1.trace"), str(tmp_path / "2.trace"))
    merged = Trace.decode((tmp_path / "m.trace").read_bytes())
    order = [(a.path, n) for a in merged.accesses for n in range(a.first, a.last + 1)]
    assert order == [("/a", 0), ("/a", 1), ("/x", 9), ("/c", 4), ("/c", 5), ("/a", 2)]
    assert merged.stats().chunks == 6 and [f.path for f in merged.files] == ["/a"]
    bad = tmp_path / "bad.trace"
    bad.write_bytes(b"lazyfs-trace\t9\n")
    result = lazyfs_cli("trace", "stats", str(bad), check=False)
    assert result.returncode == 1 and "version" in result.stderr


# ---------------------------------------------------------------------- priorities, background, dedup

SPREAD = {f"spread/{i:02d}": random.Random(i).randbytes(CHUNK) for i in range(24)}
GAPS = {f"spread/{i:02d}-gap": random.Random(100 + i).randbytes(2 * CHUNK) for i in range(24)}
LATE = random.Random(7).randbytes(3 * CHUNK)


def _spread_layers() -> list[list]:
    # Traced files with untraced ones between them: no two traced chunks coalesce, so a
    # prefetch of the traced ones is many separate range requests.
    entries = [directory("spread")]
    for i in range(24):
        entries += [file(f"spread/{i:02d}", SPREAD[f"spread/{i:02d}"]),
                    file(f"spread/{i:02d}-gap", GAPS[f"spread/{i:02d}-gap"])]
    return [entries + [file("spread/late", LATE)]]


def _open_layer(image, index: int = 0):
    """A layer of a converted image, opened from its blob bytes."""
    blob = image.layers[index]
    with tempfile.TemporaryFile() as f:
        f.write(blob.blob)
        f.flush()
        return open_blob_file(f, blob.descriptor.annotations)


def _file_chunks(layer, path: str) -> list[int]:
    nid = layer.image.resolve(path)
    return [p.chunk for p in layer.chunks_for(nid, 0, layer.image.inode(nid).size) if p.chunk is not None]


def _range_start(header: str) -> int:
    return int(header.partition("=")[2].partition("-")[0])


def test_on_demand_read_overtakes_the_prefetch_queue(registry, tmp_path):
    require_root()
    image = _push(registry, "t/trace-priority:v1", _spread_layers())
    digest = image.layers[0].descriptor.digest
    trace = Trace({digest: CHUNK})
    layer = _open_layer(image)
    for i in range(24):
        path = f"/spread/{i:02d}"
        [chunk] = _file_chunks(layer, path)
        trace.accesses.append(Access(i, digest, layer.image.resolve(path), chunk, chunk, path))
    (tmp_path / "spread.trace").write_bytes(trace.encode())
    late = {layer.chunk_ref(n).offset for n in _file_chunks(layer, "/spread/late")}

    with FaultProxy(registry.host) as proxy:
        # Every range request of the blob takes a while, so most of the prefetch is still
        # queued when the on-demand read comes.
        proxy.add(Fault.delay(0.3), path=r"/blobs/", ranged=True, times=None)
        with lazy_mount(tmp_path / "mnt", "--trace", str(tmp_path / "spread.trace"),
                        f"{proxy.host}/t/trace-priority:v1", run_dir=tmp_path / "run",
                        cache_dir=tmp_path / "cache") as mount:
            deadline = time.monotonic() + 10
            while mount.stats()["fetch"]["done"]["prefetch"] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert (mount.path / "spread/late").read_bytes() == LATE
            stats = _wait(mount, _prefetch_done, "prefetch", 60)
        requests = _blob_requests(proxy)
    on_demand = [i for i, r in enumerate(requests) if _range_start(r.range) in late]
    assert on_demand, "the on-demand read made no request"
    first = on_demand[0]
    prefetch_after = [r for r in requests[first + 1:] if _range_start(r.range) not in late]
    assert stats["fetch"]["queued"]["prefetch"] == 24
    # The prefetch still had requests queued behind the on-demand one: they went out after it.
    assert len(prefetch_after) >= 5, [r.range for r in requests]


def test_background_fetch_makes_the_image_local_within_the_rate(registry, tmp_path):
    require_root()
    _push(registry, "t/trace-background:v1", _spread_layers())
    rate = 2 << 20
    with FaultProxy(registry.host) as proxy:
        with lazy_mount(tmp_path / "mnt", "--background-fetch", "--background-rate", str(rate),
                        f"{proxy.host}/t/trace-background:v1", run_dir=tmp_path / "run",
                        cache_dir=tmp_path / "cache") as mount:
            stats = _wait(mount, lambda s: s["background"]["done"] and s["background"]["chunks"] > 0,
                          "background fetch", 60)
            background = stats["background"]
            job = background["layers"][0]
            assert background["chunks_done"] == background["chunks"]
            assert stats["fetch"]["done"]["background"] == background["chunks"]
            # Lenient rate bound: what was requested fits the rate over the fill's time, plus one batch.
            assert job["bytes_requested"] <= rate * job["seconds"] * 1.1 + max(256 << 10, rate // 4)
            assert job["seconds"] >= (job["bytes_requested"] - max(256 << 10, rate // 4)) / rate * 0.9
            shown = mount.lazyfs("stats", "--run-dir", str(mount.run_dir), str(mount.path)).stdout
            assert f"{background['chunks']} / {background['chunks']} chunks" in shown
            proxy.clear_requests()
            for path in sorted((mount.path / "spread").iterdir()):
                expected = {**SPREAD, **GAPS, "spread/late": LATE}[f"spread/{path.name}"]
                assert path.read_bytes() == expected
            assert _blob_requests(proxy) == [], "a full read after the background fill fetched nothing"
            assert mount.stats()["fetch"]["misses"] == 0


def test_prefetch_skips_chunks_already_cached_from_another_image(registry, tmp_path):
    require_root()
    image = _push(registry, "t/trace-dedup-a:v1", _spread_layers())
    other = _spread_layers()
    other[0].append(file("spread/extra", b"only in the second image" * 1000))
    second = _push(registry, "t/trace-dedup-b:v1", other)
    assert second.layers[0].descriptor.digest != image.layers[0].descriptor.digest
    digest = second.layers[0].descriptor.digest
    layer = _open_layer(second)
    trace = Trace({digest: CHUNK})
    for i, name in enumerate(("/spread/00", "/spread/01", "/spread/extra")):
        chunks = _file_chunks(layer, name)
        trace.accesses.append(Access(i, digest, layer.image.resolve(name), min(chunks), max(chunks), name))
    (tmp_path / "b.trace").write_bytes(trace.encode())
    cache = tmp_path / "cache"
    with lazy_mount(tmp_path / "mnt", f"{registry.host}/t/trace-dedup-a:v1", run_dir=tmp_path / "run",
                    cache_dir=cache) as mount:
        for name in ("00", "01"):
            assert (mount.path / f"spread/{name}").read_bytes() == SPREAD[f"spread/{name}"]
    with FaultProxy(registry.host) as proxy:
        with lazy_mount(tmp_path / "mnt", "--trace", str(tmp_path / "b.trace"), f"{proxy.host}/t/trace-dedup-b:v1",
                        run_dir=tmp_path / "run", cache_dir=cache) as mount:
            stats = _wait(mount, _prefetch_done, "prefetch")
            assert stats["prefetch"]["skipped_cached"] == 2, stats["prefetch"]
            assert stats["fetch"]["queued"]["prefetch"] == 1  # only the chunk of spread/extra
            print(json.dumps(stats["prefetch"]))


def test_record_succeeds_when_the_registry_damages_manifest_metadata_and_chunk_fetches(registry, tmp_path):
    require_root()
    image = _push(registry, "t/trace-faults:v1", _layers())
    with FaultProxy(registry.host) as proxy:
        for fault in (Fault.corrupt(at=3), Fault.status(503)):
            proxy.add(fault, method="GET", path=r"/manifests/", times=1)
        for layer in image.layers:  # its first two range reads: the metadata fetch, then its retry
            for fault in (Fault.corrupt(at=5), Fault.reset(after_bytes=10)):
                proxy.add(fault, method="GET", path=f"/blobs/{layer.descriptor.digest}", ranged=True, times=1)
        proxy.add(Fault.truncate(100), method="GET", path=r"/blobs/", ranged=True, times=3)  # chunk reads
        out = tmp_path / "start.trace"
        result = lazyfs_cli("trace", "record", "--cache-dir", str(tmp_path / "cache"), "-o", str(out),
                            "--timeout", "60", f"{proxy.host}/t/trace-faults:v1", "--", *WORKLOAD)
        assert not proxy.unused_rules()
    assert "exited with status 0" in result.stdout, result.stdout + result.stderr
    assert _regular_files(Trace.decode(out.read_bytes())) == {"/bin/busybox", *(f"/{p}" for p in READS)}

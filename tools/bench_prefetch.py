"""Time from `lazyfs mount` to a workload's readiness line, with and without trace prefetch.

    .venv/bin/python tools/bench_prefetch.py [--image debian-python] [--runs 3]

The image is built from its recipe (lazyfs.bench.images, cached) and converted (1 MiB chunks);
the registry sits behind a shaped link (lazyfs.bench.netshape: 100 Mbit/s tbf + 20 ms RTT
delay proxy). The workload runs chrooted in a private overlay of the mount (lazyfs.trace.sandbox),
as `lazyfs trace record` runs it. Cells, each started from a cold state (empty lazyfs cache,
page cache dropped) unless said otherwise:

    (a) lazy        no prefetch, no recording (--learned-trace off)
    (r) recording   as (a), but the daemon records the start (the default of `lazyfs mount`):
                    (r)/(a) is the cost of recording
    (b) prefetch    the trace recorded by `lazyfs trace record`, given with --trace
    (c) ordered     the image converted with --trace (trace embedded; traced files first when
                    the converter lays layers out in trace order), embedded trace prefetched
    (e) learned     the image of (a), in a repository where that trace is attached to it as a
                    learned trace (`lazyfs trace push`): the daemon finds it and prefetches
    (d) warm        the chunk cache from an earlier start kept, page cache dropped
    ideal           (d) + the stored bytes of the chunks the trace names / link rate

Prints one table: median and all runs of each cell, ratios to the ideal and to (a).

With --policies SET [SET ...] (e.g. `none readahead,trace locality readahead,trace,locality`),
the image is started without any trace under each set of fetch policies instead (one cell per
set, `lazyfs mount --policy SET`, cold each time, cells alternating), and the table also shows
the daemon's range requests and fetched bytes per start.

With --shared-daemon, each start mounts through a `lazyfs daemon` that was started (with the
cell's cache) before the clock starts and before the page cache is dropped, as a daemon
started at boot would be: the time is then `lazyfs mount --daemon` and the workload, without
the daemon's own process start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lazyfs.bench.images import build_image  # noqa: E402
from lazyfs.daemon.control import ControlError, request  # noqa: E402
from lazyfs.daemon.mountstate import MountState  # noqa: E402
from lazyfs.bench.netshape import LinkShape, ShapedRegistry  # noqa: E402
from lazyfs.bench.prepare import SourceImage, convert_cached, push  # noqa: E402
from lazyfs.layer.reader import open_blob_file  # noqa: E402
from lazyfs.trace.sandbox import run_workload  # noqa: E402
from lazyfs.trace.format import Trace  # noqa: E402

CHUNK = 1 << 20
LAZYFS = [sys.executable, "-m", "lazyfs.cli"]


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def lazyfs(*args: str) -> None:
    proc = subprocess.run([*LAZYFS, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"lazyfs {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}")


def start_once(image: str, work: Path, cache: Path, ready: re.Pattern, workload: list[str],
               mount_args: list[str], timeout: float, shared_daemon: bool = False,
               fetch_stats: list | None = None, policy: str | None = None,
               on_mounted: Callable[[Path, Path], None] | None = None) -> tuple[float, float]:
    """Seconds from the start of `lazyfs mount` to the ready line, and of those the mount.
    With ``fetch_stats``, the daemon's fetch statistics at the ready line are appended to it.
    ``on_mounted(mountpoint, run_dir)`` is called once the workload is ready, before the unmount."""
    mnt, run = work / "mnt", work / "run"
    mnt.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        if shared_daemon:
            socket = stack.enter_context(running_daemon(work, cache, policy))
            mount_args = ["--daemon", str(socket), *mount_args]
        else:
            mount_args = ["--cache-dir", str(cache), *(["--policy", policy] if policy else []), *mount_args]
        drop_page_cache()
        began = time.monotonic()
        lazyfs("mount", "--run-dir", str(run), *mount_args, image, str(mnt))
        mounted = time.monotonic() - began
        try:
            outcome = run_workload(mnt, workload, ready=ready, timeout=timeout)
            if outcome.reason != "ready":
                raise SystemExit(f"workload did not get ready ({outcome.reason}): {outcome.output[-5:]}")
            total = time.monotonic() - began
            if on_mounted is not None:
                on_mounted(mnt, run)
            if fetch_stats is not None:
                control = socket if shared_daemon else MountState.for_mountpoint(mnt, run).socket
                fetch = request(str(control), "stats")["fetch"]
                fetch["events"] = request(str(control), "fetch-log")["events"]
                fetch_stats.append(fetch)
            return total, mounted
        finally:
            lazyfs("umount", "--lazy", "--run-dir", str(run), str(mnt))


@contextlib.contextmanager
def running_daemon(work: Path, cache: Path, policy: str | None = None):
    """A `lazyfs daemon` with this cache, ready before the clock starts; stopped afterwards."""
    socket = work / "shared.sock"
    with open(work / "shared-daemon.log", "ab") as log:
        proc = subprocess.Popen([*LAZYFS, "daemon", "--socket", str(socket), "--fuse-dir", str(work / "shared-fuse"),
                                 "--cache-dir", str(cache), *(["--policy", policy] if policy else [])],
                                stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(str(socket), "ping", timeout=1.0)["ready"]:
                    break
            except ControlError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"lazyfs daemon did not start: {(work / 'shared-daemon.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield socket
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def needed_stored_bytes(oci_dir: Path, trace: Trace) -> int:
    """Stored (compressed) bytes of every chunk the trace names, from the layers' chunk tables."""
    total = 0
    for digest in trace.layers:
        blob = oci_dir / "blobs" / "sha256" / digest.partition(":")[2]
        with open(blob, "rb") as f:
            layer = open_blob_file(f)
        refs = {layer.chunk_ref(n) for n in trace.chunks_of(digest)}
        total += sum(ref.stored_length for ref in {(r.offset, r.stored_length): r for r in refs}.values())
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="debian-python")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--rate-mbit", type=float, default=100)
    parser.add_argument("--rtt-ms", type=float, default=20)
    parser.add_argument("--shared-daemon", action="store_true",
                        help="mount through a `lazyfs daemon` started before the clock (see above)")
    parser.add_argument("--policies", nargs="+", metavar="SET", default=None,
                        help="compare these fetch policy sets without a trace (see above)")
    args = parser.parse_args()
    if args.policies:
        return compare_policies(args)

    built = build_image(args.image)
    source = SourceImage(args.image, built.oci_dir, built.tag, built.manifest_digest, built.workload,
                         built.ready_line)
    workload = list(built.workload)
    ready = re.compile(built.ready_line or "^ready$")
    lazy = convert_cached(source, CHUNK)
    shape = LinkShape(rate_mbit=args.rate_mbit, rtt_ms=args.rtt_ms)
    work = Path(tempfile.mkdtemp(prefix="bench-prefetch-"))
    times: dict[str, list[tuple[float, float]]] = {}
    try:
        with ShapedRegistry(work / "registry", shape) as registry:
            push(lazy, registry.endpoint, "bench/prefetch", "lazy")
            image = lazy.registry_ref(registry.endpoint)
            trace_file = work / "start.trace"
            proc = subprocess.run([*LAZYFS, "trace", "record", "-q", "--cache-dir", str(work / "cache-record"),
                                   "--ready-line", ready.pattern, "--timeout", str(args.timeout),
                                   "-o", str(trace_file), image, "--", *workload],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"lazyfs trace record failed:\n{proc.stderr}{proc.stdout}")
            shutil.rmtree(work / "cache-record", ignore_errors=True)
            trace = Trace.decode(trace_file.read_bytes())
            push(lazy, registry.endpoint, "bench/prefetch-learned", "lazy")
            learned_ref = lazy.registry_ref(registry.endpoint)
            lazyfs("trace", "push", learned_ref, str(trace_file))
            lazy.repository, lazy.registry_tag = "bench/prefetch", "lazy"
            ordered = convert_cached(source, CHUNK, trace=trace_file)
            push(ordered, registry.endpoint, "bench/prefetch", "ordered")
            ordered_ref = ordered.registry_ref(registry.endpoint)

            cells = {"(a) lazy": (image, ["--no-prefetch", "--learned-trace", "off"]),
                     "(r) recording": (image, ["--no-prefetch"]),
                     "(b) prefetch": (image, ["--trace", str(trace_file)]),
                     "(c) ordered": (ordered_ref, []),
                     "(e) learned": (learned_ref, [])}
            warm_cache = work / "cache-warm"
            start_once(image, work, warm_cache, ready, workload, ["--no-prefetch"], args.timeout,
                       args.shared_daemon)  # fills it
            for _ in range(args.runs):
                for name, (ref, mount_args) in cells.items():
                    cache = work / "cache"
                    shutil.rmtree(cache, ignore_errors=True)
                    times.setdefault(name, []).append(
                        start_once(ref, work, cache, ready, workload, mount_args, args.timeout, args.shared_daemon))
                # (d): the chunk cache of an earlier start stays; only the page cache is dropped.
                times.setdefault("(d) warm", []).append(
                    start_once(image, work, warm_cache, ready, workload, ["--no-prefetch"], args.timeout,
                               args.shared_daemon))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    needed = needed_stored_bytes(lazy.oci_dir, trace)
    stats = trace.stats()
    rate = args.rate_mbit * 1e6 / 8
    totals = {name: [total for total, _ in values] for name, values in times.items()}
    warm = statistics.median(totals["(d) warm"])
    ideal = warm + needed / rate
    cold = statistics.median(totals["(a) lazy"])
    print(f"image {args.image}, workload {' '.join(workload)!r}, link {args.rate_mbit:g} Mbit/s + "
          f"{args.rtt_ms:g} ms RTT, {args.runs} run(s) per cell"
          + (", mounts through a running `lazyfs daemon`" if args.shared_daemon else ""))
    print(f"trace: {stats.files_read} files read, {stats.chunks} chunks ({stats.bytes / 2**20:.1f} MiB "
          f"uncompressed, {needed / 2**20:.1f} MiB stored); ordered layout: {'yes' if ordered_layout() else 'no'}")
    print(f"{'cell':<14} {'median s':>9} {'x ideal':>8} {'(a)/cell':>9} {'mount s':>8} {'workload s':>11}  runs")
    for name, values in times.items():
        median = statistics.median(totals[name])
        mount = statistics.median(m for _, m in values)
        after = statistics.median(t - m for t, m in values)
        print(f"{name:<14} {median:9.2f} {median / ideal:8.2f} {cold / median:9.2f} {mount:8.2f} {after:11.2f}  "
              + " ".join(f"{t:.2f}" for t, _ in values))
    print(f"{'ideal':<14} {ideal:9.2f} {1:8.2f} {cold / ideal:9.2f}  (d) + {needed / 2**20:.1f} MiB / "
          f"{args.rate_mbit:g} Mbit/s")
    return 0


def compare_policies(args: argparse.Namespace) -> int:
    """Cold starts without any trace, one cell per set of fetch policies, alternating."""
    built = build_image(args.image)
    source = SourceImage(args.image, built.oci_dir, built.tag, built.manifest_digest, built.workload,
                         built.ready_line)
    workload = list(built.workload)
    ready = re.compile(built.ready_line or "^ready$")
    lazy = convert_cached(source, CHUNK)
    work = Path(tempfile.mkdtemp(prefix="bench-policies-"))
    results: dict[str, list[tuple[float, dict]]] = {name: [] for name in args.policies}
    try:
        with ShapedRegistry(work / "registry", LinkShape(rate_mbit=args.rate_mbit, rtt_ms=args.rtt_ms)) as registry:
            push(lazy, registry.endpoint, "bench/policies", "lazy")
            image = lazy.registry_ref(registry.endpoint)
            for _ in range(args.runs):
                for name in args.policies:
                    cache = work / "cache"
                    shutil.rmtree(cache, ignore_errors=True)
                    stats: list[dict] = []
                    total, _ = start_once(image, work, cache, ready, workload, ["--no-prefetch"], args.timeout,
                                          args.shared_daemon, fetch_stats=stats, policy=name)
                    results[name].append((total, stats[0]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"image {args.image} without a trace, workload {' '.join(workload)!r}, link {args.rate_mbit:g} Mbit/s + "
          f"{args.rtt_ms:g} ms RTT, {args.runs} run(s) per cell, cells alternating"
          + (", mounts through a running `lazyfs daemon`" if args.shared_daemon else ""))
    print(f"{'policies':<28} {'median s':>9} {'requests':>9} {'on-demand':>10} {'od wait s':>10} "
          f"{'MiB fetched':>12} {'speculative':>12}  runs")
    for name, values in results.items():
        median = statistics.median(t for t, _ in values)
        requests = statistics.median(s["requests"] for _, s in values)
        on_demand = [[e for e in s["events"] if e["priority"] == "on_demand"] for _, s in values]
        od_requests = statistics.median(len(events) for events in on_demand)
        # Time reads spent in on-demand requests (summed over requests; concurrent ones overlap).
        od_wait = statistics.median(sum(e["end"] - e["start"] for e in events) for events in on_demand)
        fetched = statistics.median(s["bytes_fetched"] for _, s in values) / 2**20
        speculative = statistics.median(s["done"].get("speculative", 0) for _, s in values)
        print(f"{name:<28} {median:9.2f} {requests:9.0f} {od_requests:10.0f} {od_wait:10.2f} {fetched:12.1f} "
              f"{speculative:12.0f}  " + " ".join(f"{t:.2f}" for t, _ in values))
    return 0


def ordered_layout() -> bool:
    """Whether this build's converter writes traced files first (lazyfs.layer.layout exists)."""
    import importlib.util
    return importlib.util.find_spec("lazyfs.layer.layout") is not None


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Reading one big file through each serving mode (FUSE tree; kernel EROFS over a loop device
with and without direct I/O), chunk cache warm; prints a table. With --image, warm starts of a
benchmark image in each serving mode instead.

    .venv/bin/python tools/bench_serve_modes.py [--big-mib 512] [--chunk-kib 1024]
    .venv/bin/python tools/bench_serve_modes.py --image debian-python [--runs 5] [--count-requests]

For each mode a daemon (`python -m lazyfs.daemon`, its own empty chunk cache) serves the layer
through `lazyfs mount --daemon` from a registry on loopback; per mode: a cold read (every chunk
fetched), then all page caches dropped (`echo 3 > /proc/sys/vm/drop_caches`), a first
sequential read in 1 MiB pieces with the chunk cache warm, the growth of
the page cache it caused (`Cached` in /proc/meminfo: a file cached twice shows twice its size),
the best of three second reads (page cache), and the kernel read requests that reached the
daemon.

Warm starts (--image): the image is built from its recipe and converted (1 MiB chunks, both
cached by lazyfs.bench), served by a registry on loopback; one start per mode fills the chunk
cache, then each run drops the page cache and times `lazyfs mount --serve MODE` plus the
workload until its readiness line (tools/bench_prefetch.py's start, cell (d)); the reference
is the same workload in an overlay over the image unpacked by umoci (page cache dropped too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mount import big_file_tar, convert, push, timed_read  # noqa: E402
from tests.fixtures.registry import start_registry  # noqa: E402

MiB = 1 << 20
MODES = {  # name -> daemon arguments
    "fuse": ["--serve", "fuse"],
    "kernel, loop direct I/O on": ["--serve", "kernel", "--loop-direct-io", "on"],
    "kernel, loop direct I/O off": ["--serve", "kernel", "--loop-direct-io", "off"],
}


def cli(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "lazyfs.cli", *args], check=True, capture_output=True,
                          text=True).stdout


def cached_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Cached in /proc/meminfo")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Daemon:
    def __init__(self, work: Path, name: str, args: list[str], cache: Path, registry_host: str):
        self.dir = work / name.replace(" ", "-").replace(",", "").replace("/", "")
        self.dir.mkdir()
        self.socket = self.dir / "control.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lazyfs.daemon", "--fuse-dir", str(self.dir / "fuse"), "--socket",
             str(self.socket), "--cache-dir", str(cache), "--insecure-registry", registry_host, *args],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "daemon.log", "wb"))
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {(self.dir / 'daemon.log').read_text()}")
            time.sleep(0.05)
        self.mnt = self.dir / "mnt"
        self.mnt.mkdir()

    def mount(self, image: str, digest: str) -> None:
        cli("mount", "--run-dir", str(self.dir / "run"), "--daemon", str(self.socket), "--layer", digest, image,
            str(self.mnt))

    def reads(self) -> int:
        return json.loads(cli("stats", "--json", "--socket", str(self.socket), str(self.mnt)))["reads"]["requests"]

    def close(self) -> None:
        cli("umount", "--run-dir", str(self.dir / "run"), str(self.mnt))
        self.proc.terminate()
        self.proc.wait(30)


TRACEFS = Path("/sys/kernel/tracing")
FUSE_SEND = TRACEFS / "events/fuse/fuse_request_send/enable"


class FuseRequestCounter:
    """Counts FUSE requests by opcode with the kernel's fuse:fuse_request_send tracepoint, of one
    FUSE connection: the one of the daemon serving the mount, named by :meth:`mounted` while it
    is mounted (the machine's other FUSE filesystems send requests meanwhile too)."""

    def __init__(self) -> None:
        if not FUSE_SEND.exists():
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=False, capture_output=True)
        if not FUSE_SEND.exists():
            raise SystemExit("no fuse:fuse_request_send tracepoint (tracefs, CONFIG_FUSE_FS tracing)")

    def mounted(self, mountpoint: Path, run_dir: Path) -> None:
        """The connection number is the FUSE mount's device number (its minor; major 0)."""
        from lazyfs.daemon.mountstate import MountState

        self.connection = str(os.minor(os.stat(MountState.for_mountpoint(mountpoint, run_dir).fuse_dir).st_dev))

    def __enter__(self) -> "FuseRequestCounter":
        self.connection: str | None = None
        (TRACEFS / "tracing_on").write_text("0\n")
        (TRACEFS / "buffer_size_kb").write_text("32768\n")
        (TRACEFS / "trace").write_text("")
        FUSE_SEND.write_text("1\n")
        (TRACEFS / "tracing_on").write_text("1\n")
        self.by_opcode: dict[str, int] = {}
        return self

    def __exit__(self, *exc) -> None:
        (TRACEFS / "tracing_on").write_text("0\n")
        FUSE_SEND.write_text("0\n")
        if self.connection is None and exc[0] is None:
            raise SystemExit("the FUSE connection of the mount was never named")
        for line in (TRACEFS / "trace").read_text().splitlines():
            if f"connection {self.connection} " not in line or "(" not in line:
                continue
            opcode = line.rsplit("(", 1)[1].split(")", 1)[0]
            self.by_opcode[opcode] = self.by_opcode.get(opcode, 0) + 1
        lost = sum(int(line.split()[-1]) for cpu in (TRACEFS / "per_cpu").iterdir()
                   for line in (cpu / "stats").read_text().splitlines() if line.startswith("overrun"))
        if lost:
            raise SystemExit(f"the trace buffer overran ({lost} events lost): counts would be low")
        (TRACEFS / "trace").write_text("")

    @property
    def total(self) -> int:
        return sum(self.by_opcode.values())


def warm_starts(image_name: str, runs: int, count_requests: bool = False) -> int:
    import re
    import statistics

    from bench_prefetch import drop_page_cache, start_once
    from lazyfs.bench.images import build_image
    from lazyfs.bench.prepare import SourceImage, convert_cached
    from lazyfs.bench.prepare import push as push_layout
    from lazyfs.trace.sandbox import run_workload

    built = build_image(image_name)
    source = SourceImage(image_name, built.oci_dir, built.tag, built.manifest_digest, built.workload,
                         built.ready_line)
    workload = list(built.workload)
    ready = re.compile(built.ready_line or "^ready$")
    lazy = convert_cached(source, 1 << 20)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        subprocess.run(["umoci", "unpack", "--image", f"{built.oci_dir}:{built.tag}", str(work / "bundle")],
                       check=True, capture_output=True)
        with start_registry(work / "registry") as registry:
            push_layout(lazy, registry.host, "bench/serve", "lazy")
            ref = lazy.registry_ref(registry.host)
            modes = {"fuse": ["--serve", "fuse"], "kernel": ["--serve", "kernel"]}
            for name, mount_args in modes.items():  # fill each mode's chunk cache
                start_once(ref, work, work / f"cache-{name}", ready, workload, [*mount_args, "--no-prefetch"], 300)
            requests: dict[str, dict[str, int]] = {}
            for _ in range(runs):
                for name, mount_args in modes.items():
                    with contextlib.ExitStack() as stack:
                        counter = stack.enter_context(FuseRequestCounter()) if count_requests else None
                        total, mount = start_once(ref, work, work / f"cache-{name}", ready, workload,
                                                  [*mount_args, "--no-prefetch"], 300,
                                                  on_mounted=counter.mounted if counter is not None else None)
                    if counter is not None:
                        requests[name] = counter.by_opcode  # the last run's (every run sends about as many)
                    times.setdefault(f"lazyfs mount --serve {name}", []).append(total)
                    times.setdefault(f"  its workload alone ({name})", []).append(total - mount)
                drop_page_cache()
                began = time.monotonic()
                outcome = run_workload(work / "bundle" / "rootfs", workload, ready=ready, timeout=300)
                assert outcome.reason == "ready", outcome.output[-5:]
                times.setdefault("overlay over the unpacked tree", []).append(time.monotonic() - began)
    reference = statistics.median(times["overlay over the unpacked tree"])
    print(f"image {image_name}, workload {' '.join(workload)!r}, warm chunk cache, page cache dropped, "
          f"{runs} run(s)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<32} median {median:6.2f} s  {median / reference:5.2f}x  runs "
              + " ".join(f"{v:.2f}" for v in values))
    for name, by_opcode in requests.items():
        top = ", ".join(f"{op.removeprefix('FUSE_')} {n}" for op, n in
                        sorted(by_opcode.items(), key=lambda item: -item[1]))
        print(f"FUSE requests per start ({name}, mount + workload): {sum(by_opcode.values())}  ({top})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=512)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--image", default=None, help="warm starts of this benchmark image instead")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--count-requests", action="store_true",
                        help="with --image: count the FUSE requests of each start (fuse:fuse_request_send)")
    args = parser.parse_args()
    if args.image:
        return warm_starts(args.image, args.runs, args.count_requests)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        big_file_tar(work / "big.tar", args.big_mib * MiB)
        big = convert(work / "big.tar", work / "big.blob", args.chunk_kib * 1024)
        (work / "big.tar").unlink()
        with start_registry(work / "registry") as registry:
            trio.run(push, registry.host, "bench/serve", [(work / "big.blob", big)])
            image = f"{registry.host}/bench/serve:v1"
            for name, daemon_args in MODES.items():
                daemon = Daemon(work, name, daemon_args, work / f"cache-{len(rows)}", registry.host)
                try:
                    daemon.mount(image, big.digest)
                    path = daemon.mnt / "big.bin"
                    drop_caches()
                    cold_s, _ = timed_read(path)  # fills this mode's chunk cache
                    drop_caches()
                    before_cached, before_reads = cached_mib(), daemon.reads()
                    first_s, n = timed_read(path)
                    grown = cached_mib() - before_cached
                    assert n == args.big_mib * MiB
                    second_s = min(timed_read(path)[0] for _ in range(3))
                    rows.append((name, f"{args.big_mib / cold_s:.0f} MiB/s", f"{args.big_mib / first_s:.0f} MiB/s",
                                 f"{grown:.0f} MiB",
                                 f"{args.big_mib / second_s:.0f} MiB/s", str(daemon.reads() - before_reads)))
                finally:
                    daemon.close()
    header = ("mode", "cold read", "first read (warm chunk cache)", "page cache growth", "second read",
              "daemon reads")
    width = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(f"{args.big_mib} MiB file, {args.chunk_kib} KiB chunks")
    print(" | ".join(h.ljust(w) for h, w in zip(header, width)))
    print("-+-".join("-" * w for w in width))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, width)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A lazyfs mount whose registry misbehaves, and whose daemon is killed mid-read.

Every read must return the right bytes or fail with EIO -- never wrong bytes -- and the mount
must stay up; a daemon killed with SIGKILL leaves a stale mount that the next mount cleans.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from lazyfs.daemon.control import ControlError, request
from lazyfs.daemon.mountstate import MountState
from lazyfs.layer.annotations import from_annotations
from lazyfs.layer.format import FOOTER_FRAME_SIZE
from lazyfs.serve.mounts import is_mounted
from tests.faultproxy import Fault, FaultProxy
from tests.fixtures.common import require_root
from tests.fixtures.images import build_image, directory, file
from tests.fixtures.lazyimage import convert_image, push_to_registry
from tests.fixtures.lazymount import lazy_mount, lazyfs_cli

CHUNK = 65536
rng = random.Random(11)
FILES = {
    "data/one": rng.randbytes(1_000_003),
    "data/two": rng.randbytes(700_000),
    "data/three": rng.randbytes(3 * CHUNK),
    "small/a": rng.randbytes(100),
    "small/b": rng.randbytes(6000),
}
LAYERS = [
    [directory("data"), directory("small"), file("data/one", FILES["data/one"]), file("small/a", FILES["small/a"])],
    [directory("data"), directory("small"), file("data/two", FILES["data/two"]),
     file("data/three", FILES["data/three"]), file("small/b", FILES["small/b"])],
]
BLOB_RANGES = r"/blobs/sha256:"


@pytest.fixture(scope="module")
def converted():
    return convert_image(build_image(LAYERS), chunk_size=CHUNK)


@pytest.fixture(scope="module")
def repo(registry, converted):
    require_root()
    push_to_registry(registry, "t/mount-faults", converted)
    return "t/mount-faults:v1"


def _section_range(layer, section: str) -> str:
    """The Range header of a layer's metadata or chunk table fetch (from its annotations)."""
    index = from_annotations(layer.descriptor.annotations, layer.descriptor.size)
    part = getattr(index, section)
    return f"^bytes={part.offset}-{part.offset + part.stored_size - 1}$"


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.host) as running:
        yield running


def _read_or_eio(path) -> bytes | None:
    """The file's bytes, or None when the read failed with EIO (any other error fails the test)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        assert e.errno == errno.EIO, f"{path}: {e}"
        return None


def _drop_page_cache(root) -> None:
    """Forget cached pages of every file so the next read goes to the daemon again."""
    for rel in FILES:
        fd = os.open(os.path.join(root, rel), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.expected_log
def test_faulty_registry_gives_right_bytes_or_eio_and_the_mount_survives(repo, proxy, tmp_path):
    # A read of a chunk that cannot be fetched fails after 3 s (a chunk is retried that long).
    with lazy_mount(tmp_path / "mnt", "--read-timeout", "3", f"{proxy.host}/{repo}", run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache") as mount:
        # Transient faults of every kind: retries must hide them, verification must catch them.
        for fault in (Fault.reset(), Fault.reset(after_bytes=1000), Fault.status(503), Fault.status(500),
                      Fault.truncate(777), Fault.corrupt(at=5), Fault.corrupt(at=40000), Fault.delay(0.3),
                      Fault.ignore_range(), Fault.other_range(CHUNK), Fault.other_range(4096, lie=True)):
            proxy.add(fault, method="GET", path=BLOB_RANGES, ranged=True, times=1)
        for rel, want in FILES.items():
            got = _read_or_eio(mount.path / rel)
            assert got is None or got == want, f"{rel}: wrong bytes"
        assert not proxy.unused_rules()

        # A registry that fails for good: uncached reads fail with EIO, nothing else breaks.
        _drop_page_cache(mount.path)
        proxy.clear_rules()
        proxy.add(Fault.status(500), path=BLOB_RANGES, ranged=True, times=None)
        stats_before = mount.stats()
        outcomes = {rel: _read_or_eio(mount.path / rel) for rel in FILES}
        for rel, got in outcomes.items():
            assert got is None or got == FILES[rel], f"{rel}: wrong bytes"
        assert sorted(os.listdir(mount.path / "data")) == ["one", "three", "two"]
        assert mount.stats()["fetch"]["failed_chunks"] >= stats_before["fetch"]["failed_chunks"]

        # The registry recovers: the same reads now succeed (failures are not cached).
        proxy.clear_rules()
        for rel, want in FILES.items():
            assert (mount.path / rel).read_bytes() == want


def test_mount_survives_damaged_manifest_metadata_and_chunk_table_fetches(repo, converted, proxy, tmp_path):
    # The manifest and, for each layer, its metadata and chunk table fetches: each fails a few
    # times in a different way (a flipped byte, a cut body, a 5xx, a reset) before it is right.
    for fault in (Fault.corrupt(at=3), Fault.status(503, {"Retry-After": "1"}), Fault.reset()):
        proxy.add(fault, method="GET", path=r"/manifests/", times=1)
    for layer in converted.layers:
        digest = layer.descriptor.digest
        for section, faults in (("meta", (Fault.corrupt(at=5), Fault.truncate(10), Fault.status(500))),
                                ("table", (Fault.corrupt(at=0), Fault.reset(after_bytes=3)))):
            for fault in faults:
                proxy.add(fault, method="GET", path=f"/blobs/{digest}", range=_section_range(layer, section))
    with lazy_mount(tmp_path / "mnt", f"{proxy.host}/{repo}", run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache") as mount:
        assert not proxy.unused_rules()
        for layer in converted.layers:
            asked = [r.range for r in proxy.requests if r.path.endswith(layer.descriptor.digest)]
            # Four tries of the metadata (three damaged) and three of the chunk table (side by side).
            assert sum(re.fullmatch(_section_range(layer, "meta"), r) is not None for r in asked[:7]) == 4
            assert sum(re.fullmatch(_section_range(layer, "table"), r) is not None for r in asked[:7]) == 3
        for rel, want in FILES.items():
            assert (mount.path / rel).read_bytes() == want


def test_metadata_that_stays_wrong_fails_the_mount_with_one_clear_error(repo, converted, proxy, tmp_path):
    digest = converted.layers[1].descriptor.digest
    proxy.add(Fault.corrupt(at=7), method="GET", path=f"/blobs/{digest}", ranged=True, times=None)
    (tmp_path / "mnt").mkdir()
    result = lazyfs_cli("mount", "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                        f"{proxy.host}/{repo}", str(tmp_path / "mnt"), check=False)
    assert result.returncode != 0
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1, error
    for part in ("layer metadata", "failed verification", "5 attempts", proxy.host, "t/mount-faults", digest):
        assert part in error, error
    assert not is_mounted(tmp_path / "mnt")


def test_blob_reads_follow_redirects_to_expiring_storage_urls(repo, proxy, tmp_path):
    # Every blob GET at the registry is redirected to "storage" (/_cdn/, no credentials); the
    # storage URLs expire now and then (403): the registry is asked again for a fresh one.
    proxy.add(Fault.status(403), path=r"^/_cdn/", times=2)
    proxy.add(Fault.redirect(), method="GET", path=r"^/v2/.*/blobs/", times=None)
    # FUSE mode: its reads come one at a time, so "the next request of that blob" below is the
    # one after the expiry (a kernel-mode loop device reads ahead concurrently).
    with lazy_mount(tmp_path / "mnt", "--serve", "fuse", f"{proxy.host}/{repo}", run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache") as mount:
        assert (mount.path / "data/one").read_bytes() == FILES["data/one"]
        proxy.add(Fault.status(403), path=r"^/_cdn/", times=1)  # expires while mounted
        for rel, want in FILES.items():
            assert (mount.path / rel).read_bytes() == want
    assert not proxy.unused_rules()
    blob_requests = [r for r in proxy.requests if "/blobs/" in r.path]
    expired = [i for i, r in enumerate(blob_requests) if r.status == 403]
    assert len(expired) == 3
    blob_of = lambda r: r.path.split("/blobs/")[1]  # noqa: E731
    refreshed = 0
    for i in expired:  # each expired range is read again, through a fresh URL from the registry
        later = [j for j in range(i + 1, len(blob_requests)) if blob_of(blob_requests[j]) == blob_of(blob_requests[i])
                 and blob_requests[j].range == blob_requests[i].range]
        assert later and blob_requests[later[-1]].status == 206
        # A layer's sections are read side by side: a URL fetched just before the expiry by the
        # other section's read may serve the retry, so only some retries ask the registry.
        refreshed += any(r.path.startswith("/v2/") and blob_of(r) == blob_of(blob_requests[i])
                         for r in blob_requests[i + 1:later[0] + 1])
    assert refreshed >= 1
    assert not any(r.has_authorization for r in blob_requests if r.path.startswith("/_cdn/"))


@pytest.mark.expected_log
def test_attach_without_annotations_reads_the_footer_again_until_it_decodes(repo, converted, proxy, tmp_path):
    with lazy_mount(tmp_path / "mnt", f"{proxy.host}/{repo}", run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache") as mount:
        socket = str(MountState.for_mountpoint(mount.path, mount.run_dir).socket)
        layer = converted.layers[0].descriptor
        footer = f"^bytes={layer.size - FOOTER_FRAME_SIZE}-{layer.size - 1}$"
        for fault in (Fault.corrupt(at=100), Fault.truncate(50), Fault.other_range(-1, lie=True)):
            proxy.add(fault, method="GET", path=f"/blobs/{layer.digest}", range=footer)
        reply = request(socket, "attach", name="bare", kind="lazyfs", ref=f"{proxy.host}/{repo}",
                        digest=layer.digest, size=layer.size, annotations={})
        assert not proxy.unused_rules()
        assert (Path(reply["path"]) / "data/one").read_bytes() == FILES["data/one"]

        # A blob without a footer at all is still refused with the reason, after the retries.
        config = converted.config_descriptor
        with pytest.raises(ControlError) as excinfo:
            request(socket, "attach", name="config", kind="lazyfs", ref=f"{proxy.host}/{repo}",
                    digest=config.digest, size=config.size, annotations={})
        assert "lazyfs" in str(excinfo.value) and config.digest in str(excinfo.value)


def _wait_until_no_fetch_pending(mount, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while mount.stats()["fetch"]["pending"]:
        assert time.monotonic() < deadline, "chunk fetches still pending"
        time.sleep(0.05)


@pytest.mark.parametrize("fault", [Fault.stall(), Fault.drip(1.0), Fault.reset()], ids=["stall", "drip", "down"])
def test_reads_fail_within_the_read_bound_and_succeed_once_the_registry_is_back(repo, proxy, tmp_path, fault):
    # Small bounds keep the test quick: a read waits 2 s for chunks, a request 0.5 s for an answer.
    with lazy_mount(tmp_path / "mnt", "--read-timeout", "2", "--request-timeout", "0.5", f"{proxy.host}/{repo}",
                    run_dir=tmp_path / "run", cache_dir=tmp_path / "cache") as mount:
        proxy.add(fault, method="GET", path=BLOB_RANGES, ranged=True, times=None)
        # Nothing but chunk data needs the registry once the layers are attached.
        assert sorted(os.listdir(mount.path / "data")) == ["one", "three", "two"]
        assert {rel: os.stat(mount.path / rel).st_size for rel in FILES} == {rel: len(b) for rel, b in FILES.items()}
        assert (mount.path / "small/a").read_bytes() == FILES["small/a"]  # inline in the metadata
        for rel in ("data/one", "data/two"):
            with pytest.raises(OSError) as excinfo:
                (mount.path / rel).read_bytes()
            assert excinfo.value.errno == errno.EIO
        assert mount.stats()["fetch"]["read_timeouts"] + mount.stats()["fetch"]["failed_chunks"] > 0

        # The registry is back: the same reads succeed (nothing failed is remembered).
        proxy.clear_rules()
        _wait_until_no_fetch_pending(mount)
        for rel, want in FILES.items():
            assert (mount.path / rel).read_bytes() == want
        assert any(r.fault == fault.name for r in proxy.requests)


def test_a_read_rides_out_an_outage_shorter_than_the_read_bound(repo, proxy, tmp_path):
    with lazy_mount(tmp_path / "mnt", "--read-timeout", "120", "--request-timeout", "1", f"{proxy.host}/{repo}",
                    run_dir=tmp_path / "run", cache_dir=tmp_path / "cache") as mount:
        proxy.add(Fault.reset(), method="GET", path=BLOB_RANGES, ranged=True, times=None)  # down
        outcome: dict = {}

        def read() -> None:
            try:
                outcome["data"] = (mount.path / "data/one").read_bytes()
            except OSError as e:
                outcome["error"] = e

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 60
        while sum(1 for r in proxy.requests if r.fault == "reset") < 6:  # refused again and again
            assert time.monotonic() < deadline and reader.is_alive(), outcome
            time.sleep(0.05)
        proxy.clear_rules()  # back up: the waiting read gets its bytes
        reader.join(timeout=120)
        assert not reader.is_alive()
        assert outcome.get("data") == FILES["data/one"], outcome.get("error")


@pytest.mark.expected_log
def test_corrupt_chunks_are_never_served(repo, proxy, tmp_path):
    with lazy_mount(tmp_path / "mnt", "--read-timeout", "3", f"{proxy.host}/{repo}", run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache") as mount:
        proxy.add(Fault.corrupt(at=100), method="GET", path=BLOB_RANGES, ranged=True, times=None)
        for rel in ("data/one", "data/two", "data/three"):
            assert _read_or_eio(mount.path / rel) is None
        stats = mount.stats()
        assert stats["fetch"]["verify_failures"] > 0 and stats["fetch"]["failed_chunks"] > 0
        proxy.clear_rules()
        _drop_page_cache(mount.path)
        assert (mount.path / "data/one").read_bytes() == FILES["data/one"]


def test_killed_daemon_leaves_a_stale_mount_that_the_next_mount_cleans(repo, proxy, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    mnt = tmp_path / "mnt"
    # FUSE mode: no supervisor, a dead daemon's mount stays dead (kernel mode: t4_mount_supervisor).
    with lazy_mount(mnt, "--serve", "fuse", f"{proxy.host}/{repo}", run_dir=run_dir, cache_dir=cache) as mount:
        proxy.add(Fault.delay(0.05), path=BLOB_RANGES, ranged=True, times=None)  # keep reads in flight
        stop = threading.Event()
        errors: list[BaseException] = []

        def reader(seed: int) -> None:
            local = random.Random(seed)
            while not stop.is_set():
                rel = local.choice(list(FILES))
                try:
                    with open(mnt / rel, "rb") as f:
                        offset = local.randrange(len(FILES[rel]))
                        f.seek(offset)
                        data = f.read(200_000)
                    if data != FILES[rel][offset:offset + 200_000]:
                        errors.append(AssertionError(f"wrong bytes from {rel} at {offset}"))
                except OSError as e:
                    if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENOENT):
                        errors.append(e)
                    return

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # let the readers get going (they run until the kill breaks the mount)
        os.kill(mount.daemon_pid(), signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
        assert not errors, errors

        # The mount point is now stale; mounting again cleans it up and serves correct content.
        proxy.clear_rules()
        lazyfs_cli("mount", "--serve", "fuse", "--run-dir", str(run_dir), "--cache-dir", str(cache),
                   f"{proxy.host}/{repo}", str(mnt))
        for rel, want in FILES.items():
            assert (mnt / rel).read_bytes() == want

        # `lazyfs umount` also cleans up after a dead daemon.
        pid = mount.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lazyfs_cli("umount", "--run-dir", str(run_dir), str(mnt))
        assert not is_mounted(mnt)
        assert not any(run_dir.iterdir())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False

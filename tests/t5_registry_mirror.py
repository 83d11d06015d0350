"""Registry mirrors from containerd's hosts.toml, proven with the distribution registry as a
pull-through cache (`proxy.remoteurl`) in front of an origin registry: real registries, real
`lazyfs mount`s (each a fresh node: its own daemon and cache).

1. A node's lazy start fetches its ranges from the mirror, none from the origin.
2. With the origin stopped, a second node (fresh cache) still starts from the mirror.
3. With the mirror down, a node falls back to the origin.

And the pull-through cache's answer to the first Range request for a blob it has not cached
yet -- 200 with the whole blob -- is used, not refetched: later ranges within the bytes it
brought need no request.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio

from lazyfs.registry import open_store
from tests.faultproxy import Fault
from tests.fixtures.common import require_root, require_tool
from tests.fixtures.images import build_image, directory, file
from tests.fixtures.lazyimage import convert_image, push_to_registry
from tests.fixtures.lazymount import lazy_mount
from tests.fixtures.registry import free_port, start_registry

CHUNK = 65536
rng = random.Random(15)
FILES = {"app/big": rng.randbytes(600_000), "app/small": b"hello from the mirror\n",
         "app/other": rng.randbytes(150_000)}
LAZYFS_AGENT = "python-httpx"


def _image():
    return convert_image(build_image([[directory("app"), *(file(p, d) for p, d in FILES.items())]]),
                         chunk_size=CHUNK)


def _hosts_dir(tmp_path: Path, origin: str, mirror: str) -> Path:
    certs = tmp_path / "certs.d"
    (certs / origin).mkdir(parents=True)
    (certs / origin / "hosts.toml").write_text(
        f'server = "http://{origin}"\n\n[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n')
    return certs


def _start(tmp_path: Path, name: str, ref: str, certs: Path) -> str:
    """A fresh node's start: mount, read every file, compare, unmount; the daemon's log."""
    with lazy_mount(tmp_path / name / "mnt", "--no-prefetch", "--hosts-dir", str(certs), ref,
                    run_dir=tmp_path / name / "run", cache_dir=tmp_path / name / "cache") as mount:
        for path, data in FILES.items():
            assert (mount.path / path).read_bytes() == data, path
        log = (mount.state_root() / "daemon.log").read_text()
    assert "attached 000-" in log  # the daemon logs at INFO by default
    return log


def _lazyfs_blob_gets(registry, since: int) -> list:
    return [r for r in registry.requests(since)
            if r.method == "GET" and "/blobs/" in r.path and r.user_agent.startswith(LAZYFS_AGENT)]


def _wait_cached(mirror, repo: str, digests: list[str]) -> None:
    """Until the pull-through cache has each blob (it answers a Range request with 206)."""
    deadline = time.monotonic() + 30
    for digest in digests:
        while httpx.get(f"{mirror.url}/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=0-0"},
                        timeout=10).status_code != 206:
            assert time.monotonic() < deadline, f"the mirror did not cache {digest}"
            time.sleep(0.1)


def test_lazy_start_through_a_pull_through_mirror(tmp_path):
    require_root()
    image = _image()
    repo = "t/mirrored"
    origin_port, mirror_port = free_port(), free_port()
    with contextlib.ExitStack() as origin_up:
        origin = origin_up.enter_context(start_registry(tmp_path / "origin", port=origin_port))
        push_to_registry(origin, repo, image)
        ref = f"{origin.host}/{repo}:v1"
        with start_registry(tmp_path / "mirror", port=mirror_port,
                            extra={"proxy": {"remoteurl": origin.url}}) as mirror:
            certs = _hosts_dir(tmp_path, origin.host, mirror.host)

            # 1. Everything comes from the mirror; the origin sees only the mirror's requests.
            # (The mirror has not cached the blob yet: it answers the first read with 200 and
            # the whole blob, which the node keeps and reads its chunks from.)
            origin_mark, mirror_mark = origin.mark(), mirror.mark()
            _start(tmp_path, "node1", ref, certs)
            assert _lazyfs_blob_gets(origin, origin_mark) == []
            from_mirror = _lazyfs_blob_gets(mirror, mirror_mark)
            assert from_mirror and all(r.status in (200, 206) for r in from_mirror)
            blob_sizes = {layer.digest: len(layer.blob) for layer in image.layers}
            _wait_cached(mirror, repo, list(blob_sizes))

            # 2. The origin goes away; a fresh node starts from the mirror alone, by ranges.
            origin_up.close()
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://{origin.host}/v2/", timeout=2)
            mirror_mark = mirror.mark()
            _start(tmp_path, "node2", ref, certs)
            from_mirror = _lazyfs_blob_gets(mirror, mirror_mark)
            assert from_mirror and all(r.status == 206 for r in from_mirror)
            assert all(r.bytes_written < blob_sizes[r.path.split("/blobs/")[1].split("?")[0]] for r in from_mirror)

    # 3. The mirror is down and the origin is back: a fresh node falls back to the origin.
    with start_registry(tmp_path / "origin", port=origin_port) as origin:
        origin_mark = origin.mark()
        log = _start(tmp_path, "node3", ref, certs)
        assert _lazyfs_blob_gets(origin, origin_mark)
        assert f"via {mirror.host} failed" in log and "trying the next host" in log


async def _read_ranges(store, digest: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    try:
        return [await store.read_range(digest, offset, length) for offset, length in ranges]
    finally:
        await store.aclose()


def test_whole_blob_answer_to_a_range_request_is_kept(fault_proxy, registry, registry_repo):
    """A ranged read answered with 200 and the whole blob (as from a cold pull-through cache):
    the bytes up to the range are kept, so reads within them make no request; near the blob's
    end (where a lazy layer's metadata is) the answer is read on to the end."""
    size = 12 * 1024 * 1024
    data = random.Random(3).randbytes(size)

    async def push() -> str:
        store = open_store(f"{registry.host}/{registry_repo}:x")
        try:
            return (await store.push_blob(data)).digest
        finally:
            await store.aclose()

    digest = trio.run(push)
    fault_proxy.add(Fault.ignore_range(), path=digest, times=1)
    ranges = [(2_000_000, 1000), (0, 65536), (1_000_000, 500_000), (1_999_000, 2000), (5_000_000, 100)]
    store = open_store(f"{fault_proxy.host}/{registry_repo}:x")
    assert trio.run(_read_ranges, store, digest, ranges) == [data[o:o + n] for o, n in ranges]
    # One whole-blob answer for the first range, the three within it kept, the one beyond
    # it an ordinary 206.
    assert [r.status for r in fault_proxy.requests if "/blobs/" in r.path] == [200, 206]

    fault_proxy.clear_requests()
    fault_proxy.add(Fault.ignore_range(), path=digest, times=1)
    ranges = [(size - 6_000_000, 100), (size - 1000, 1000), (size - 3_000_000, 4096)]
    store = open_store(f"{fault_proxy.host}/{registry_repo}:x")
    assert trio.run(_read_ranges, store, digest, ranges) == [data[o:o + n] for o, n in ranges]
    assert [r.status for r in fault_proxy.requests if "/blobs/" in r.path] == [200]


def test_hosts_by_capability_and_fallback(fault_proxy, registry, registry_repo, tmp_path):
    """A mirror with only `pull` (the fault proxy in front of the registry, recording what it
    is asked): tags resolve at the server, digests and ranges come from the mirror with
    ?ns=; a mirror that lacks a blob (404) or resets is passed over for the server, and one
    that reset is not asked again for a while."""
    image = _image()
    push_to_registry(registry, registry_repo, image)
    certs = tmp_path / "certs.d"
    (certs / registry.host).mkdir(parents=True)
    (certs / registry.host / "hosts.toml").write_text(
        f'server = "http://{registry.host}"\n[host."http://{fault_proxy.host}"]\n  capabilities = ["pull"]\n'
        f'  dial_timeout = "2s"\n')  # a client of the mirror's own
    digest = image.layers[0].digest

    async def reads() -> list:
        store = open_store(f"{registry.host}/{registry_repo}:v1", hosts_dir=certs)
        try:
            by_tag = await store.get_manifest()
            by_digest = await store.get_manifest(by_tag.digest)
            first = await store.read_range(digest, 0, 100)
            fault_proxy.add(Fault.status(404), path=digest, times=1)
            second = await store.read_range(digest, 100, 100)
            fault_proxy.add(Fault.reset(), path=digest, times=1)
            third = await store.read_range(digest, 200, 100)
            asked = len(fault_proxy.requests)
            fourth = await store.read_range(digest, 300, 100)  # the mirror sits out its penalty
            return [by_tag.digest == by_digest.digest == image.digest, first + second + third + fourth, asked]
        finally:
            await store.aclose()

    same, data, asked = trio.run(reads)
    assert same and data == image.layers[0].blob[:400]
    paths = [r.path for r in fault_proxy.requests]
    assert not any("/manifests/v1" in p for p in paths)  # no resolve capability
    assert any(f"/manifests/{image.digest}?ns={registry.host}" in p for p in paths)
    assert any(f"/blobs/{digest}?ns={registry.host}" in p for p in paths)
    assert len(fault_proxy.requests) == asked


def test_convert_and_inspect_follow_the_hosts_dir(fault_proxy, registry, registry_repo, tmp_path, capsys):
    """`lazyfs convert` and `lazyfs inspect` take the same --hosts-dir as the daemon: their
    reads of the source go through the mirror."""
    from lazyfs import cli

    plain = build_image([[directory("app"), file("app/x", b"x" * 100_000)]])
    push_to_registry(registry, registry_repo, plain, tag="plain")
    certs = tmp_path / "certs.d"
    (certs / registry.host).mkdir(parents=True)
    (certs / registry.host / "hosts.toml").write_text(f'[host."http://{fault_proxy.host}"]\n')
    source = f"{registry.host}/{registry_repo}:plain"
    assert cli.main(["convert", "-q", "--hosts-dir", str(certs), source, f"oci:{tmp_path / 'out'}:v1"]) == 0
    layer = plain.layers[0].digest
    assert any(f"/blobs/{layer}" in r.path for r in fault_proxy.requests)
    fault_proxy.clear_requests()
    assert cli.main(["inspect", "--json", "--hosts-dir", str(certs), source]) == 0
    assert fault_proxy.requests[0].path.endswith(f"/manifests/plain?ns={registry.host}")
    capsys.readouterr()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "mirror.crt", directory / "mirror.key"
    subprocess.run([require_tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", "/CN=lazyfs-test-mirror",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def test_tls_mirror_with_its_ca_or_skip_verify(tmp_path):
    """A pull-through mirror over HTTPS with a self-signed certificate: used with `ca` (a path
    relative to the hosts.toml) or `skip_verify`; without either, verification fails and the
    reads fall back to the origin."""
    image = _image()
    cert, key = _self_signed(tmp_path / "tls")
    with start_registry(tmp_path / "origin") as origin, \
            start_registry(tmp_path / "mirror", extra={"proxy": {"remoteurl": origin.url}}, tls=(cert, key)) as mirror:
        push_to_registry(origin, "t/tls", image)
        certs = tmp_path / "certs.d"
        (certs / origin.host).mkdir(parents=True)
        shutil.copy(cert, certs / origin.host / "mirror.crt")
        layer = image.layers[0]

        async def read() -> bytes:
            store = open_store(f"{origin.host}/t/tls:v1", hosts_dir=certs)
            try:
                manifest = await store.get_manifest()
                assert manifest.digest == image.digest
                return await store.read_range(layer.digest, 10, 1000)
            finally:
                await store.aclose()

        for setting, via_mirror in (('ca = "mirror.crt"', True), ("skip_verify = true", True), ("", False)):
            (certs / origin.host / "hosts.toml").write_text(
                f'server = "http://{origin.host}"\n[host."{mirror.url}"]\n  {setting}\n')
            origin_mark, mirror_mark = origin.mark(), mirror.mark()
            assert trio.run(read) == layer.blob[10:1010]
            assert bool(_lazyfs_blob_gets(mirror, mirror_mark)) == via_mirror, setting
            assert bool(_lazyfs_blob_gets(origin, origin_mark)) != via_mirror, setting


def test_a_mirror_sending_corrupt_bytes_is_passed_over(fault_proxy, registry, registry_repo, tmp_path):
    """Bytes from a mirror are verified like the registry's: a corrupt answer puts the mirror
    last, the retry reads from the server, and later reads do not ask the mirror first."""
    image = _image()
    push_to_registry(registry, registry_repo, image)
    certs = tmp_path / "certs.d"
    (certs / registry.host).mkdir(parents=True)
    (certs / registry.host / "hosts.toml").write_text(f'[host."http://{fault_proxy.host}"]\n')
    blob = image.layers[0].blob
    fault_proxy.add(Fault.corrupt(at=5), path="/blobs/", times=None)

    async def reads() -> list[bytes]:
        store = open_store(f"{registry.host}/{registry_repo}:v1", hosts_dir=certs)
        try:
            return [await store.read_range(image.layers[0].digest, offset, 100,
                                           verify=lambda data, offset=offset: data == blob[offset:offset + 100])
                    for offset in (0, 100, 200)]
        finally:
            await store.aclose()

    assert trio.run(reads) == [blob[0:100], blob[100:200], blob[200:300]]
    assert len([r for r in fault_proxy.requests if "/blobs/" in r.path]) == 1

"""Traces carried by the registry (lazyfs.trace.share, `lazyfs trace push|pull`): the artifact
and the referrers tag on the real distribution registry and on OCI layouts, several pushes,
and hostile traces (another image's layers, oversized, garbage) that a pull refuses."""

from __future__ import annotations

import json
import os
import time

import pytest

from lazyfs.registry import open_store
from lazyfs.registry.manifest import OCI_INDEX, OCI_MANIFEST, sha256_digest
from lazyfs.trace import share
from lazyfs.trace.format import MAX_UNTRUSTED_SIZE, Access, FileEvent, Trace
from tests.fixtures.images import build_image, build_index, directory, file, push_image, push_index
from tests.fixtures.lazyimage import convert_image
from tests.fixtures.lazymount import lazyfs_cli

CHUNK = 65536


def _image(salt: bytes = b""):
    return convert_image(build_image([
        [directory("bin"), file("bin/tool", b"#!tool\n" + salt * 100 + bytes(200_000))],
        [directory("data"), file("data/a", salt + bytes(300_000)), file("data/b", b"b" * 1000)],
    ]), chunk_size=CHUNK)


def _trace(image, first: int = 0, ms: int = 5) -> Trace:
    top, base = image.layers[1].digest, image.layers[0].digest
    trace = Trace(layers={base: CHUNK, top: CHUNK})
    trace.files.append(FileEvent(ms, "open", base, 40, "bin/tool"))
    trace.accesses.append(Access(ms, base, 40, 0, 1, "bin/tool"))
    trace.accesses.append(Access(ms + 3, top, 41, first, first + 2, "data/a"))
    return trace


async def _stores(registry, registry_repo, tmp_path):
    """The same image in a registry repository and in an OCI layout."""
    image = _image()
    stores = [open_store(f"{registry.host}/{registry_repo}:v1", insecure_registries=[registry.host]),
              open_store(f"oci:{tmp_path / 'layout'}:v1")]
    for store in stores:
        await push_image(store, image, tag="v1")
    return image, stores


@pytest.mark.parametrize("where", ["registry", "layout"])
async def test_push_pull_round_trip_and_several_pushes(registry, registry_repo, tmp_path, where):
    image, stores = await _stores(registry, registry_repo, tmp_path)
    store = stores[0] if where == "registry" else stores[1]
    try:
        subject = await share.image_manifest(store)
        assert subject.digest == image.digest
        # no referrers API on either (distribution 2.8, a layout): the tag schema is used
        assert await store.list_referrers(subject.digest) is None
        with pytest.raises(share.ShareError, match="no lazyfs trace"):
            await share.pull_trace(store, subject)

        # someone else's referrer is already in the tag index: it must survive our pushes
        foreign = {"mediaType": OCI_MANIFEST, "digest": sha256_digest(b"x"), "size": 1,
                   "artifactType": "application/vnd.example.sbom"}
        if where == "layout":  # a layout's index entries need not exist as blobs; a registry's must
            await store.push_manifest(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                  "manifests": [foreign]}).encode(),
                                      OCI_INDEX, tag=share.referrers_tag(subject.digest))
        first = _trace(image, first=0)
        d1 = await share.push_trace(store, subject, first, created="2026-01-01T00:00:00.000000Z")
        pulled = await share.pull_trace(store, subject)
        assert (pulled.artifact, pulled.data) == (d1, first.encode())

        manifest = (await store.get_manifest(d1)).json
        assert manifest["artifactType"] == share.ARTIFACT_TYPE
        assert manifest["subject"] == {"mediaType": OCI_MANIFEST, "digest": image.digest,
                                       "size": len(image.manifest)}
        assert manifest["config"] == {"mediaType": "application/vnd.oci.empty.v1+json",
                                      "digest": sha256_digest(b"{}"), "size": 2, "data": "e30="}
        assert [layer["mediaType"] for layer in manifest["layers"]] == [share.TRACE_MEDIA_TYPE]

        # a second, newer push: both listed under the tag, the pull takes the newer
        second = _trace(image, first=3)
        d2 = await share.push_trace(store, subject, second, created="2026-02-01T00:00:00.000000Z")
        tagged = (await store.get_manifest(share.referrers_tag(subject.digest))).json["manifests"]
        digests = [entry["digest"] for entry in tagged]
        assert {d1, d2} <= set(digests)
        assert (foreign["digest"] in digests) == (where == "layout")
        assert (await share.pull_trace(store, subject)).data == second.encode()
        # an older one pushed later does not win
        await share.push_trace(store, subject, _trace(image, first=6), created="2025-06-01T00:00:00.000000Z")
        assert (await share.pull_trace(store, subject)).artifact == d2

        # many pushes: the tag index keeps our newest few, and the foreign entry
        for month in range(3, 3 + share.KEEP_IN_TAG_INDEX + 2):
            await share.push_trace(store, subject, _trace(image, first=month),
                                   created=f"2026-{month:02d}-01T00:00:00.000000Z")
        tagged = (await store.get_manifest(share.referrers_tag(subject.digest))).json["manifests"]
        ours = [e for e in tagged if e["artifactType"] == share.ARTIFACT_TYPE]
        assert len(ours) == share.KEEP_IN_TAG_INDEX
        assert (foreign["digest"] in [e["digest"] for e in tagged]) == (where == "layout")
        assert (await share.pull_trace(store, subject)).data == _trace(image, first=3 + share.KEEP_IN_TAG_INDEX + 1).encode()
    finally:
        for s in stores:
            await s.aclose()


async def test_index_image_trace_attaches_to_the_platform_manifest(registry, registry_repo):
    amd, arm = _image(b"amd"), _image(b"arm")
    from dataclasses import replace
    from lazyfs.registry import Platform
    arm = replace(arm, platform=Platform("linux", "arm64", "v8"))
    amd = replace(amd, platform=Platform("linux", "amd64"))
    index = build_index([amd, arm])
    store = open_store(f"{registry.host}/{registry_repo}:multi", insecure_registries=[registry.host])
    try:
        await push_index(store, index, tag="multi")
        subject = await share.image_manifest(store, platform=Platform("linux", "arm64", "v8"))
        assert subject.digest == arm.digest
        await share.push_trace(store, subject, _trace(arm))
        assert (await share.pull_trace(store, subject)).data == _trace(arm).encode()
        other = await share.image_manifest(store, platform=Platform("linux", "amd64"))
        with pytest.raises(share.ShareError, match="no lazyfs trace"):
            await share.pull_trace(store, other)
    finally:
        await store.aclose()


def test_cli_push_and_pull(registry, registry_repo, tmp_path):
    import trio

    image = _image()
    ref = f"{registry.host}/{registry_repo}:v1"

    async def push() -> None:
        store = open_store(ref, insecure_registries=[registry.host])
        try:
            await push_image(store, image, tag="v1")
        finally:
            await store.aclose()

    trio.run(push)
    trace_file = tmp_path / "start.trace"
    trace_file.write_bytes(_trace(image).encode())
    pushed = lazyfs_cli("trace", "push", ref, str(trace_file))
    assert "attached to " + image.digest in pushed.stdout
    out = tmp_path / "pulled.trace"
    pulled = lazyfs_cli("trace", "pull", ref, "-o", str(out))
    assert out.read_bytes() == trace_file.read_bytes()
    assert "verified" in pulled.stdout
    assert lazyfs_cli("trace", "pull", ref).stdout.encode() == trace_file.read_bytes()

    # a trace of another image is refused before anything is pushed
    other = tmp_path / "other.trace"
    other.write_bytes(_trace(_image(b"other")).encode())
    refused = lazyfs_cli("trace", "push", ref, str(other), check=False)
    assert refused.returncode == 1 and "not a layer of the image" in refused.stderr
    # a layout works the same way
    layout = f"oci:{tmp_path / 'layout'}:v1"
    from tests.fixtures.lazyimage import push_to_store
    push_to_store(layout, image)
    lazyfs_cli("trace", "push", layout, str(trace_file))
    assert lazyfs_cli("trace", "pull", layout).stdout.encode() == trace_file.read_bytes()
    missing = lazyfs_cli("trace", "pull", f"oci:{tmp_path / 'layout'}:nope", check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("lazyfs trace pull: ")


# -- hostile traces --------------------------------------------------------------------------

async def _push_raw(store, subject, data: bytes, created: str) -> str:
    """An artifact with arbitrary trace bytes, as a hostile or broken pusher would store it."""
    await store.push_blob(share.EMPTY_BLOB, media_type=share.EMPTY_MEDIA_TYPE)
    blob = await store.push_blob(data, media_type=share.TRACE_MEDIA_TYPE)
    manifest = share.artifact_manifest(subject, blob.digest, blob.size, created)
    digest = await store.push_manifest(manifest, OCI_MANIFEST)
    entry = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest),
             "artifactType": share.ARTIFACT_TYPE, "annotations": {share.CREATED: created}}
    await share._add_to_tag_index(store, subject.digest, entry)
    return digest


@pytest.mark.expected_log
@pytest.mark.parametrize("where", ["registry", "layout"])
async def test_hostile_traces_are_refused(registry, registry_repo, tmp_path, where, caplog):
    image, stores = await _stores(registry, registry_repo, tmp_path)
    store = stores[0] if where == "registry" else stores[1]
    try:
        subject = await share.image_manifest(store)
        good = _trace(image)
        await share.push_trace(store, subject, good, created="2026-01-01T00:00:00.000000Z")
        other_image = _image(b"someone else")
        oversized = good.encode() + b"\n" * (MAX_UNTRUSTED_SIZE - len(good.encode()) + 1)
        out_of_range = Trace(layers={image.layers[0].digest: CHUNK})
        out_of_range.accesses.append(Access(-5, image.layers[0].digest, 1, 0, 0, "x"))
        hostile = {
            "another image's layers": _trace(other_image).encode(),
            "oversized": oversized,
            "garbage": bytes(range(256)) * 4,
            "not a trace": b"lazyfs-trace\t2\n",
            "negative time": out_of_range.encode(),
        }
        for month, (name, data) in enumerate(hostile.items(), start=2):
            caplog.clear()
            digest = await _push_raw(store, subject, data, f"2026-{month:02d}-01T00:00:00.000000Z")
            pulled = await share.pull_trace(store, subject, max_size=MAX_UNTRUSTED_SIZE)
            # the newest is refused with a log line; the older good one is still found
            assert pulled.data == good.encode(), name
            warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
            assert any(digest in w for w in warnings), (name, warnings)
        # a trace manifest attached to another image but listed under this image's tag
        other_subject = await _push_other(store, other_image)
        caplog.clear()
        digest = await _push_raw(store, other_subject, good.encode(), "2026-12-01T00:00:00.000000Z")
        entry = {"mediaType": OCI_MANIFEST, "digest": digest,
                 "size": len((await store.get_manifest(digest)).data),
                 "artifactType": share.ARTIFACT_TYPE, "annotations": {share.CREATED: "2026-12-01T00:00:00Z"}}
        await share._add_to_tag_index(store, subject.digest, entry)
        assert (await share.pull_trace(store, subject)).data == good.encode()
        assert any("attached to another image" in r.getMessage() for r in caplog.records)
    finally:
        for s in stores:
            await s.aclose()


async def _push_other(store, image):
    await push_image(store, image, tag="other")
    return await store.get_manifest("other")


# -- look-up at attach (`lazyfs mount`) --------------------------------------------------------

def _random_image():
    import random
    rng = random.Random(14)
    return convert_image(build_image([
        [directory("bin"), file("bin/tool", rng.randbytes(150_000))],
        [directory("data"), file("data/a", rng.randbytes(400_000)), file("data/b", rng.randbytes(200_000)),
         file("data/unused", rng.randbytes(300_000))],
    ]), chunk_size=CHUNK)


def _read_files(root, *paths):
    for path in paths:
        (root / path).read_bytes()


def test_mount_prefetches_a_learned_trace(registry, registry_repo, tmp_path):
    """Mount 1 records its start and pushes the trace; mount 2, cold, finds it in the registry
    and prefetches exactly those chunks, so the same reads make no on-demand fetch."""
    from tests.fixtures.lazyimage import push_to_registry
    from tests.fixtures.lazymount import lazy_mount, wait_for_prefetch

    image = _random_image()
    push_to_registry(registry, registry_repo, image)
    ref = f"{registry.host}/{registry_repo}:v1"
    trace_file = tmp_path / "start.trace"
    with lazy_mount(tmp_path / "mnt", "--record-trace", str(trace_file), ref, run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache-1") as mount:
        first = _wait_lookups(mount)
        assert first["learned"]["found"] == 0
        assert all("learned_trace" not in layer for layer in first["attached"])  # none yet
        _read_files(mount.path, "data/a", "bin/tool")
        misses_1 = mount.stats()["fetch"]["misses"]
    recorded = Trace.decode(trace_file.read_bytes())
    assert recorded.chunks_of(image.layers[1].digest)
    lazyfs_cli("trace", "push", ref, str(trace_file))

    with lazy_mount(tmp_path / "mnt", ref, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache-2") as mount:
        stats = wait_for_prefetch(mount, layers=2)
        by_digest = {layer["digest"]: layer for layer in stats["attached"]}
        for blob in image.layers:
            wanted = recorded.chunks_of(blob.digest)
            assert by_digest[blob.digest]["prefetch_chunks"] == len(wanted)
            assert by_digest[blob.digest]["learned_trace"].startswith("sha256:")
        _read_files(mount.path, "data/a", "bin/tool")
        after = mount.stats()["fetch"]
        assert after["queued"]["on_demand"] == 0 and after["misses"] == 0, after
        assert misses_1 > 0


@pytest.mark.expected_log
def test_mount_ignores_a_learned_trace_that_does_not_fit(registry, registry_repo, tmp_path):
    """A trace that passes the pull's checks but names chunks the layer does not have (or
    gives it another chunk size) is logged and ignored; the mount serves as without one."""
    import trio

    from lazyfs.daemon.mountstate import MountState
    from tests.fixtures.lazyimage import push_to_registry
    from tests.fixtures.lazymount import lazy_mount

    image = _random_image()
    push_to_registry(registry, registry_repo, image)
    ref = f"{registry.host}/{registry_repo}:v1"
    top, base = image.layers[1].digest, image.layers[0].digest
    bad = Trace(layers={top: CHUNK, base: CHUNK * 2})
    bad.accesses.append(Access(1, top, 40, 0, 100_000, "data/a"))
    bad.accesses.append(Access(2, base, 40, 0, 0, "bin/tool"))

    async def push_bad() -> None:
        store = open_store(ref, insecure_registries=[registry.host])
        try:
            await share.push_trace(store, await share.image_manifest(store), bad)
        finally:
            await store.aclose()

    trio.run(push_bad)
    with lazy_mount(tmp_path / "mnt", ref, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache") as mount:
        log_file = MountState.for_mountpoint(mount.path, mount.run_dir).log_file
        expected = [f"names chunk 100000 of layer {top}", f"gives layer {base} chunk size {CHUNK * 2}"]
        deadline = time.monotonic() + 30  # the look-up runs after the attach, in the background
        while not all(line in log_file.read_text() for line in expected):
            assert time.monotonic() < deadline, log_file.read_text()
            time.sleep(0.05)
        stats = mount.stats()
        assert stats["fetch"]["queued"]["prefetch"] == 0
        assert all("learned_trace" not in layer for layer in stats["attached"])
        assert (mount.path / "data/b").read_bytes() == image_file(image, "data/b")


def image_file(image, path: str) -> bytes:
    import io
    import tarfile
    for layer in reversed(image.layers):
        with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tar:
            try:
                member = tar.getmember(path)
            except KeyError:
                continue
            return tar.extractfile(member).read()
    raise KeyError(path)


# -- automatic recording (`lazyfs mount --learned-trace pull|push`) -----------------------------

def _wait_lookups(mount, timeout: float = 30) -> dict:
    """The mount's stats once the learned-trace look-up (after the attach) has happened."""
    deadline = time.monotonic() + timeout
    while True:
        stats = mount.stats()
        if stats["learned"]["lookups"] >= 1 and \
                all("image_manifest" in layer for layer in stats["attached"]):
            return stats
        assert time.monotonic() < deadline, stats["learned"]
        time.sleep(0.05)


def _wait_recordings(mount, states: set[str], count: int, timeout: float = 60) -> list[dict]:
    import time
    deadline = time.monotonic() + timeout
    while True:
        recordings = mount.stats()["learned"]["recordings"]
        done = [r for r in recordings if r["state"] in states]
        if len(done) >= count:
            return done
        assert time.monotonic() < deadline, recordings
        time.sleep(0.1)


def test_mount_records_starts_merges_them_and_pushes(registry, registry_repo, tmp_path):
    """Each mount records the start that follows its attach until reads fall quiet; the starts
    of one image merge into the cache's trace of it; with push the merged trace is attached to
    the image in the registry, where a cold mount elsewhere finds it."""
    from tests.fixtures.lazyimage import push_to_registry
    from tests.fixtures.lazymount import lazy_mount, wait_for_prefetch

    image = _random_image()
    push_to_registry(registry, registry_repo, image)
    ref = f"{registry.host}/{registry_repo}:v1"
    top = image.layers[1].digest
    cache = tmp_path / "cache-1"
    with lazy_mount(tmp_path / "mnt", ref, run_dir=tmp_path / "run", cache_dir=cache) as mount:
        _read_files(mount.path, "data/a")
        (saved,) = _wait_recordings(mount, {"saved"}, 1)
        assert saved["image"] == image.digest and saved["pushed"] is None
    local = cache / "traces" / f"{image.digest.partition(':')[2]}.trace"
    first = Trace.decode(local.read_bytes())
    assert {a.path for a in first.accesses} == {"/data/a"}
    a_chunks = first.chunks_of(top)

    with lazy_mount(tmp_path / "mnt", "--learned-trace", "push", ref, run_dir=tmp_path / "run",
                    cache_dir=cache) as mount:
        _read_files(mount.path, "data/b")
        (pushed,) = _wait_recordings(mount, {"pushed"}, 1)
        assert pushed["pushed"].startswith("sha256:")
    merged = Trace.decode(local.read_bytes())
    assert {a.path for a in merged.accesses} == {"/data/a", "/data/b"}
    assert set(a_chunks) < set(merged.chunks_of(top))
    out = tmp_path / "pulled.trace"
    lazyfs_cli("trace", "pull", ref, "-o", str(out))
    assert out.read_bytes() == local.read_bytes()

    # another node, cold: prefetches both files' chunks from the pushed trace
    with lazy_mount(tmp_path / "mnt", ref, run_dir=tmp_path / "run2", cache_dir=tmp_path / "cache-2") as mount:
        stats = wait_for_prefetch(mount, layers=2)
        assert {layer["learned_trace"] for layer in stats["attached"] if "learned_trace" in layer} == \
            {pushed["pushed"]}
        _read_files(mount.path, "data/a", "data/b")
        assert mount.stats()["fetch"]["misses"] == 0


def test_mount_learned_trace_off(registry, registry_repo, tmp_path):
    from tests.fixtures.lazyimage import push_to_registry
    from tests.fixtures.lazymount import lazy_mount

    image = _random_image()
    push_to_registry(registry, registry_repo, image)
    ref = f"{registry.host}/{registry_repo}:v1"
    with lazy_mount(tmp_path / "mnt", "--learned-trace", "off", ref, run_dir=tmp_path / "run",
                    cache_dir=tmp_path / "cache") as mount:
        _read_files(mount.path, "data/a")
        stats = mount.stats()
        assert stats["learned"] == {"lookups": 0, "found": 0, "recordings": []}
    assert not (tmp_path / "cache" / "traces").exists()


def test_unmount_saves_the_start_recorded_so_far(registry, registry_repo, tmp_path):
    """A mount unmounted before its reads fell quiet still saves what it recorded."""
    from tests.fixtures.lazyimage import push_to_registry
    from tests.fixtures.lazymount import lazy_mount

    image = _random_image()
    push_to_registry(registry, registry_repo, image)
    ref = f"{registry.host}/{registry_repo}:v1"
    cache = tmp_path / "cache"
    with lazy_mount(tmp_path / "mnt", ref, run_dir=tmp_path / "run", cache_dir=cache) as mount:
        _wait_lookups(mount)
        _read_files(mount.path, "data/b")  # and unmounted well before 5 s of quiet, as a rule
    saved = Trace.decode((cache / "traces" / f"{image.digest.partition(':')[2]}.trace").read_bytes())
    assert {a.path for a in saved.accesses} == {"/data/b"}


def test_push_uses_the_credentials_the_attach_names(tmp_path):
    """The snapshotter's [traces] username/password reach the push: on a registry with two
    users, the daemon reads as the Docker config's user and pushes the trace as the other."""
    import base64
    import subprocess
    import sys

    import trio

    from lazyfs.daemon.control import ControlError, request
    from lazyfs.registry import Authenticator, CredentialStore, Credentials, Secret
    from tests.fixtures.common import require_root
    from tests.fixtures.registry import start_registry, write_htpasswd

    require_root()
    users = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}
    htpasswd = write_htpasswd(tmp_path / "htpasswd", users)
    docker_config = tmp_path / "docker"
    docker_config.mkdir()
    image = _random_image()
    with start_registry(tmp_path / "reg", auth={"htpasswd": {"realm": "lazyfs-test", "path": str(htpasswd)}}) as reg:
        encoded = base64.b64encode(f"alice:{users['alice']}".encode()).decode()
        (docker_config / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": encoded}}}))
        ref = f"{reg.host}/private/app:v1"

        async def push() -> None:
            credentials = CredentialStore()
            credentials.add(reg.host, Credentials("alice", Secret(users["alice"])))
            store = open_store(ref, authenticator=Authenticator(credentials))
            try:
                await push_image(store, image, tag="v1")
            finally:
                await store.aclose()

        trio.run(push)
        socket, fuse = tmp_path / "daemon.sock", tmp_path / "fuse"
        log = open(tmp_path / "daemon.log", "wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lazyfs.daemon", "--fuse-dir", str(fuse), "--socket", str(socket),
             "--cache-dir", str(tmp_path / "cache"), "--record-quiet", "0.5"],
            stdout=log, stderr=log, env={**os.environ, "DOCKER_CONFIG": str(docker_config)})
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if request(str(socket), "ping", timeout=2)["ready"]:
                        break
                except ControlError:
                    pass
                assert daemon.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
                time.sleep(0.05)
            for n, layer in enumerate(image.layers):
                request(str(socket), "attach", name=f"l{n}", kind="lazyfs", ref=ref, digest=layer.digest,
                        size=layer.descriptor.size, annotations=dict(layer.descriptor.annotations),
                        image_manifest=image.digest, record_trace=True, share="push",
                        push_credentials={"username": "bob", "password": users["bob"]})
            (fuse / "l1" / "data" / "a").read_bytes()
            deadline = time.monotonic() + 60
            while True:
                recordings = request(str(socket), "stats")["learned"]["recordings"]
                if any(r["state"] in ("pushed", "push-failed") for r in recordings):
                    break
                assert time.monotonic() < deadline, recordings
                time.sleep(0.1)
            assert [r["state"] for r in recordings] == ["pushed"], (tmp_path / "daemon.log").read_text()
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
            log.close()
        # The reads (as alice: the only credentials the daemon's Docker config has) served the
        # file. The registry's log names the user on answers with an error status: the push's
        # probes (HEAD of a blob before uploading it, GET of the referrers tag) were bob's.
        named = [(e["auth.user.name"], e.get("http.request.method"), e.get("http.request.uri", ""))
                 for e in (json.loads(line) for line in reg.log_path.read_text().splitlines()
                           if line.startswith("{")) if "auth.user.name" in e]
        empty = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        assert ("bob", "HEAD", f"/v2/private/app/blobs/{empty}") in named, named
        assert ("bob", "GET", f"/v2/private/app/manifests/{share.referrers_tag(image.digest)}") in named, named
        assert {user for user, _, uri in named if empty in uri or "sha256-" in uri} == {"bob"}

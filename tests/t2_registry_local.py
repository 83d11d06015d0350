"""Registry-package behaviour that needs no registry: the OCI image layout store, and the
client's retry timing and token sharing over httpx.MockTransport (trio MockClock)."""

import hashlib
import io
import json
import os
import tarfile

import httpx
import pytest
import trio

from lazyfs.registry import (
    Authenticator, BlobNotFound, DigestMismatch, ImageStore, InvalidReference, ManifestNotFound, OCILayoutStore,
    Platform, RegistryClient, RegistryError, RetryPolicy, open_store, parse_reference,
)
from lazyfs.registry.manifest import OCI_INDEX, OCI_MANIFEST
from tests.fixtures.images import (
    build_image, build_index, directory, entries_from_tree, file, hardlink, layer_tar, opaque, push_image, push_index,
    symlink, whiteout,
)


def test_both_stores_implement_the_protocol(tmp_path):
    assert isinstance(OCILayoutStore(tmp_path), ImageStore)
    client = RegistryClient(parse_reference("127.0.0.1:1/x"), httpx.AsyncClient())
    assert isinstance(client, ImageStore)


async def test_layout_push_and_read(tmp_path):
    store = open_store(f"oci:{tmp_path / 'img'}:v1")
    image = build_image([[file("a", b"A" * 10_000)], [file("b", b"B")]])
    digest = await push_image(store, image, tag="v1")
    assert digest == image.digest
    root = tmp_path / "img"
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_text())
    assert index["mediaType"] == OCI_INDEX
    assert index["manifests"] == [{"mediaType": OCI_MANIFEST, "digest": digest, "size": len(image.manifest),
                                   "annotations": {"org.opencontainers.image.ref.name": "v1"}}]
    for layer in image.layers:
        assert (root / "blobs" / "sha256" / layer.digest.split(":")[1]).read_bytes() == layer.blob
    assert not [p for p in root.rglob(".*tmp-*")]

    manifest = await store.resolve_manifest()
    assert manifest.digest == digest and manifest.data == image.manifest
    assert (await store.get_manifest(digest)).digest == digest
    assert (await store.get_config(manifest))["rootfs"]["diff_ids"] == [x.diff_id for x in image.layers]
    layer = image.layers[0]
    assert await store.read_range(layer.digest, 3, 40) == layer.blob[3:43]
    assert await store.blob_size(layer.digest) == len(layer.blob)
    assert b"".join([chunk async for chunk in store.iter_blob(layer.digest)]) == layer.blob
    assert await store.download_blob(layer.digest, tmp_path / "copy") == len(layer.blob)


async def test_layout_tags_move_and_indexes_resolve(tmp_path):
    store = OCILayoutStore(tmp_path / "img")
    first = build_image([[file("v", b"1")]])
    second = build_image([[file("v", b"2")]])
    await push_image(store, first, tag="latest")
    await push_image(store, second, tag="latest")
    await push_image(store, first, tag="old")
    assert sorted(store.tags()) == ["latest", "old"]
    assert (await store.get_manifest("latest")).digest == second.digest
    with pytest.raises(ManifestNotFound, match="name one"):
        await store.get_manifest()
    with pytest.raises(ManifestNotFound):
        await store.get_manifest("nope")

    images = [build_image([[file("arch", a.encode())]], platform=Platform("linux", a)) for a in ("amd64", "arm64")]
    await push_index(store, build_index(images), tag="multi")
    resolved = await store.resolve_manifest("multi", Platform("linux", "arm64"))
    assert resolved.digest == images[1].digest


async def test_layout_detects_corruption_and_missing_blobs(tmp_path):
    store = OCILayoutStore(tmp_path / "img")
    image = build_image([[file("a", b"data" * 100)]])
    await push_image(store, image, tag="v1")
    layer = image.layers[0]
    path = store.blob_path(layer.digest)
    path.write_bytes(b"X" + layer.blob[1:])
    with pytest.raises(DigestMismatch):
        await store.get_blob(layer.digest)
    with pytest.raises(DigestMismatch):
        await store.download_blob(layer.digest, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    good = hashlib.sha256(layer.blob[:10]).digest()
    with pytest.raises(DigestMismatch):
        await store.read_range(layer.digest, 0, 10, verify=lambda b: hashlib.sha256(b).digest() == good)
    missing = "sha256:" + "9" * 64
    with pytest.raises(BlobNotFound):
        await store.read_range(missing, 0, 1)
    assert await store.blob_size(missing) is None
    (tmp_path / "img" / "index.json").write_text("{broken")
    with pytest.raises(RegistryError, match="index.json"):
        await store.get_manifest("v1")


async def test_push_source_must_match_its_digest(tmp_path):
    store = OCILayoutStore(tmp_path / "img")
    with pytest.raises(DigestMismatch):
        await store.push_blob(b"abc", digest="sha256:" + "0" * 64)


async def test_client_backoff_follows_the_policy_on_a_mock_clock(autojump_clock):
    """Timing of the client's own retry loop: 503, 429 + Retry-After, then 206 (trio MockClock)."""
    data = bytes(range(256))
    answers = [httpx.Response(503), httpx.Response(429, headers={"Retry-After": "30"}),
               httpx.Response(206, content=data[10:20], headers={"Content-Range": "bytes 10-19/256"})]
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((trio.current_time(), request.headers.get("range")))
        return answers[len(seen) - 1]

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = RegistryClient(parse_reference("127.0.0.1:5000/x"), http,
                                retry=RetryPolicy(attempts=5, base_delay=2.0, max_delay=60.0, deadline=None))
        start = trio.current_time()
        assert await client.read_range("sha256:" + "a" * 64, 10, 10) == data[10:20]
    times = [t - start for t, _ in seen]
    assert times[0] == 0
    assert 1.0 <= times[1] <= 2.0                 # base_delay * [0.5, 1]
    assert times[2] - times[1] == 30.0            # Retry-After exceeds the 2-4 s backoff
    assert all(r == "bytes=10-19" for _, r in seen)



async def test_an_attempt_that_gets_no_answer_is_bounded_on_a_mock_clock(autojump_clock):
    data = bytes(range(256))
    seen = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(trio.current_time())
        if len(seen) == 1:
            await trio.sleep_forever()  # accepted, never answered
        return httpx.Response(206, content=data[:10], headers={"Content-Range": "bytes 0-9/256"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = RegistryClient(parse_reference("127.0.0.1:5000/x"), http,
                                retry=RetryPolicy(attempts=2, base_delay=1.0, attempt_timeout=7.0))
        start = trio.current_time()
        assert await client.read_range("sha256:" + "a" * 64, 0, 10) == data[:10]
    assert 7.5 <= seen[1] - start <= 8.0  # the attempt's bound, then base_delay * [0.5, 1]


async def test_concurrent_refusals_share_one_new_token():
    """N readers refused with the same expired token trigger one token request, not N."""
    token_requests = []

    def handler(request: httpx.Request) -> httpx.Response:
        token_requests.append(request.url.params.get_list("scope"))
        return httpx.Response(200, json={"token": f"tok-{len(token_requests)}", "expires_in": 300})

    challenge = 'Bearer realm="http://127.0.0.1:9/token",service="svc",scope="repository:a:pull"'
    auth = Authenticator()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        first = await auth.respond(http, "r:1", challenge, ["repository:a:pull"])
        assert first == "Bearer tok-1"
        results = []

        async def refused():
            results.append(await auth.respond(http, "r:1", challenge, ["repository:a:pull"], rejected=first))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(refused)
    assert results == ["Bearer tok-2"] * 5
    assert token_requests == [["repository:a:pull"], ["repository:a:pull"]]
    assert auth.authorization("r:1", ["repository:a:pull"]) == "Bearer tok-2"


async def test_only_tags_and_digests_reach_manifest_urls():
    requests = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(404)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = RegistryClient(parse_reference("127.0.0.1:5000/x"), http)
        for bad in ("../../v2/other/manifests/x", "a b", "sha256:zz"):
            with pytest.raises(InvalidReference):
                await client.get_manifest(bad)
            with pytest.raises(InvalidReference):
                await client.push_manifest(b"{}", "application/json", tag=bad)
    assert requests == []


@pytest.mark.parametrize("index", [
    {"manifests": "x"}, {"manifests": [1]}, {"manifests": [{"digest": "sha256:1", "mediaType": "m", "size": 1}]},
    {"manifests": [{"mediaType": OCI_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 1, "annotations": "t"}]},
    [], "text",
])
async def test_layout_rejects_a_bad_index(tmp_path, index):
    store = OCILayoutStore(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(RegistryError):
        await store.get_manifest("v1")
    with pytest.raises(RegistryError):
        store.tags()
    with pytest.raises(RegistryError):
        await store.push_manifest(b"{}", OCI_MANIFEST, "v1")


def test_image_builder_writes_whiteouts_links_and_pax_xattrs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "conf").write_bytes(b"conf")
    os_link = root / "etc" / "conf.link"
    os_link.hardlink_to(root / "etc" / "conf")
    (root / "bin").symlink_to("usr/bin")
    os.setxattr(root / "etc" / "conf", "user.origin", b"\xff\x00bin")
    entries = entries_from_tree(root)
    assert [(e.name, e.kind) for e in entries] == [
        ("bin", "symlink"), ("etc", "dir"), ("etc/conf", "file"), ("etc/conf.link", "hardlink")]
    assert entries[2].xattrs == {"user.origin": b"\xff\x00bin"}

    tar = layer_tar(entries + [whiteout("etc/old"), opaque("var"), directory("d"), symlink("s", "t"),
                               hardlink("h", "etc/conf")])
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        members = {m.name: m for m in archive.getmembers()}
    assert members["etc/conf"].pax_headers["SCHILY.xattr.user.origin"].encode("utf-8", "surrogateescape") \
        == b"\xff\x00bin"
    assert members["etc/conf.link"].islnk() and members["etc/conf.link"].linkname == "etc/conf"
    assert members["etc/.wh.old"].isfile() and members["var/.wh..wh..opq"].isfile()
    assert members["s"].issym() and members["d"].isdir()

    image = build_image([root])
    assert image.layers[0].tar == layer_tar(entries)
    assert json.loads(image.config)["rootfs"]["diff_ids"] == [image.layers[0].diff_id]

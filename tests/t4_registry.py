"""The registry client against the real distribution registry (docker-registry 2.8), checked
with skopeo as an independent client: push/pull, chunked uploads, mounts, both media-type
families, ranged reads, auth (htpasswd + config.json, bearer tokens), OCI layouts."""

import base64
import json
import logging
import os
import subprocess

import httpx
import pytest

from lazyfs.registry import (
    AuthenticationError, Authenticator, BlobNotFound, Credentials, CredentialStore, ManifestNotFound, OCILayoutStore,
    Platform, RegistryClient, RegistryError, Secret, open_store, parse_reference,
)
from lazyfs.registry.manifest import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from tests.fixtures.common import require_tool, run
from tests.fixtures.images import (
    build_image, build_index, directory, file, hardlink, opaque, push_image, push_index, symlink, whiteout,
)
from tests.fixtures.registry import TokenServer, start_registry, write_htpasswd

ROOT_LAYER = [
    directory("etc"), file("etc/hostname", b"box\n"), file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    directory("usr"), directory("usr/bin"), file("usr/bin/tool", b"\x7fELF" + bytes(range(256)) * 64, mode=0o755),
    symlink("bin", "usr/bin"), hardlink("etc/hostname.bak", "etc/hostname"),
    file("etc/caps", b"cap", xattrs={"user.comment": b"hello", "security.capability": b"\x01\x00\x00\x02"}),
    directory("var"), directory("var/lib"), file("var/lib/state", b"old"),
]
UPPER_LAYER = [directory("etc"), whiteout("etc/passwd"), directory("var/lib"), opaque("var/lib"),
               file("var/lib/new", b"new")]


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def client(host: str, repository: str, http: httpx.AsyncClient, **kw) -> RegistryClient:
    return RegistryClient(parse_reference(f"{host}/{repository}:latest"), http, **kw)


def skopeo_inspect(target: str, raw: bool = False) -> dict:
    skopeo = require_tool("skopeo")
    args = [skopeo, "inspect", "--tls-verify=false"] + (["--raw"] if raw else []) + [target]
    return json.loads(run(args).stdout)


async def test_push_pull_round_trip_seen_by_skopeo(registry, registry_repo, http):
    image = build_image([ROOT_LAYER, UPPER_LAYER])
    store = client(registry.host, registry_repo, http)
    digest = await push_image(store, image, tag="v1")
    assert digest == image.digest

    manifest = await store.get_manifest("v1")
    assert (manifest.data, manifest.media_type, manifest.digest) == (image.manifest, OCI_MANIFEST, image.digest)
    assert (await store.get_manifest(digest)).data == image.manifest
    config = await store.get_config(manifest)
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]
    for layer in image.layers:
        assert await store.get_blob(layer.digest) == layer.blob
        assert await store.blob_size(layer.digest) == len(layer.blob)

    inspected = skopeo_inspect(f"docker://{registry.host}/{registry_repo}:v1")
    assert inspected["Digest"] == image.digest
    assert inspected["Layers"] == [layer.digest for layer in image.layers]
    assert skopeo_inspect(f"docker://{registry.host}/{registry_repo}:v1", raw=True) == json.loads(image.manifest)


async def test_existing_blobs_are_not_uploaded_again(registry, registry_repo, http):
    image = build_image([ROOT_LAYER])
    store = client(registry.host, registry_repo, http)
    await push_image(store, image, tag="v1")
    mark = registry.mark()
    await push_image(store, image, tag="v2")
    methods = [r.method for r in registry.requests(mark) if "/blobs/" in r.path]
    assert methods == ["HEAD", "HEAD"]  # layer and config exist: no POST/PUT


async def test_chunked_upload(registry, registry_repo, http, tmp_path):
    blob = os.urandom(300_000)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    store = client(registry.host, registry_repo, http, monolithic_limit=64 * 1024, upload_chunk_size=64 * 1024)
    mark = registry.mark()
    descriptor = await store.push_blob(path)
    uploads = [r for r in registry.requests(mark) if "/blobs/uploads/" in r.path]
    assert [r.method for r in uploads] == ["POST"] + ["PATCH"] * 5 + ["PUT"]
    assert all(r.status in (201, 202) for r in uploads)
    assert descriptor.size == len(blob)
    assert await store.get_blob(descriptor.digest) == blob
    downloaded = tmp_path / "copy"
    assert await store.download_blob(descriptor.digest, downloaded) == len(blob)
    assert downloaded.read_bytes() == blob
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "copy"]  # no temporary left behind


async def test_cross_repository_mount(registry, registry_repo, http):
    image = build_image([ROOT_LAYER, UPPER_LAYER])
    source = client(registry.host, registry_repo, http)
    await push_image(source, image, tag="v1")
    target = client(registry.host, registry_repo + "-mounted", http)
    mark = registry.mark()
    await push_image(target, image, tag="v1", mount_from=registry_repo)
    requests = [r for r in registry.requests(mark) if "/blobs/uploads/" in r.path]
    mounts = [r for r in requests if "mount=" in r.path]
    assert len(mounts) == 2 and all(r.status == 201 for r in mounts)
    assert not [r for r in requests if r.method in ("PATCH",)]
    # The config was pushed without mount_from: one ordinary upload.
    assert [r.method for r in requests if "mount=" not in r.path] == ["POST", "PUT"]
    assert (await target.resolve_manifest("v1")).digest == image.digest


@pytest.mark.parametrize("media_types", ["oci", "docker"])
async def test_index_platform_selection(registry, registry_repo, http, media_types):
    images = [build_image([[file("arch", arch.encode())]], media_types=media_types,
                          platform=Platform("linux", arch, variant))
              for arch, variant in [("amd64", None), ("arm64", "v8"), ("arm", "v7")]]
    index = build_index(images, media_types=media_types)
    store = client(registry.host, registry_repo, http)
    await push_index(store, index, tag="multi")

    top = await store.get_manifest("multi")
    assert top.is_index and top.media_type == (OCI_INDEX if media_types == "oci" else DOCKER_MANIFEST_LIST)
    for image in images:
        resolved = await store.resolve_manifest("multi", image.platform)
        assert resolved.digest == image.digest
        assert resolved.media_type == (OCI_MANIFEST if media_types == "oci" else DOCKER_MANIFEST)
        assert (await store.get_blob(resolved.layers[0].digest)) == image.layers[0].blob
    host = await store.resolve_manifest("multi")
    assert host.digest == next(i.digest for i in images if i.platform.architecture == Platform.host().architecture)
    inspected = skopeo_inspect(f"docker://{registry.host}/{registry_repo}:multi", raw=True)
    assert len(inspected["manifests"]) == 3


async def test_ranged_reads_fetch_only_the_range(registry, registry_repo, http):
    blob = os.urandom(4 * 1024 * 1024)
    store = client(registry.host, registry_repo, http)
    descriptor = await store.push_blob(blob)
    mark = registry.mark()
    for offset, length in [(0, 1), (1000, 4096), (len(blob) - 10, 10), (2_000_000, 1_000_000)]:
        assert await store.read_range(descriptor.digest, offset, length) == blob[offset:offset + length]
    # A range running past the end returns what there is.
    assert await store.read_range(descriptor.digest, len(blob) - 5, 100) == blob[-5:]
    reads = [r for r in registry.blob_requests(descriptor.digest, mark) if r.method == "GET"]
    assert [r.status for r in reads] == [206] * 5
    assert sum(r.bytes_written for r in reads) == 1 + 4096 + 10 + 1_000_000 + 5
    with pytest.raises(RegistryError) as excinfo:
        await store.read_range(descriptor.digest, len(blob) + 1, 10)
    assert excinfo.value.status == 416


async def test_not_found_errors_name_what_was_missing(registry, registry_repo, http):
    store = client(registry.host, registry_repo, http)
    missing = "sha256:" + "0" * 64
    with pytest.raises(BlobNotFound) as excinfo:
        await store.read_range(missing, 0, 10)
    error = excinfo.value
    assert (error.status, error.registry, error.repository, error.digest) == (404, registry.host, registry_repo, missing)
    assert registry_repo in str(error) and missing in str(error) and "404" in str(error)
    with pytest.raises(BlobNotFound):
        await store.get_blob(missing)
    assert await store.blob_size(missing) is None
    with pytest.raises(ManifestNotFound) as excinfo:
        await store.get_manifest("no-such-tag")
    assert excinfo.value.status == 404


async def test_oci_layout_round_trip_and_copy_from_registry(registry, registry_repo, http, tmp_path):
    # OCI media types: skopeo's layout reader only looks at OCI manifests in index.json.
    image = build_image([ROOT_LAYER, UPPER_LAYER], media_types="oci")
    remote = client(registry.host, registry_repo, http)
    await push_image(remote, image, tag="v1")

    # Copy registry -> layout with the common interface only.
    layout = open_store(f"oci:{tmp_path / 'layout'}:v1")
    manifest = await remote.resolve_manifest("v1")
    for descriptor in [manifest.config, *manifest.layers]:
        path = tmp_path / "blob"
        await remote.download_blob(descriptor.digest, path)
        await layout.push_blob(path, digest=descriptor.digest, media_type=descriptor.media_type)
    await layout.push_manifest(manifest.data, manifest.media_type, "v1")

    assert isinstance(layout, OCILayoutStore)
    got = await layout.resolve_manifest()
    assert (got.digest, got.media_type) == (image.digest, OCI_MANIFEST)
    layer = image.layers[1]
    assert await layout.read_range(layer.digest, 5, 50) == layer.blob[5:55]
    assert await layout.get_blob(layer.digest) == layer.blob
    assert json.loads((tmp_path / "layout" / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    inspected = skopeo_inspect(f"oci:{tmp_path / 'layout'}:v1")
    assert inspected["Layers"] == [layer.digest for layer in image.layers]

    # ... and layout -> another registry repository.
    other = client(registry.host, registry_repo + "-copy", http)
    for descriptor in [got.config, *got.layers]:
        await other.push_blob(await layout.get_blob(descriptor.digest), digest=descriptor.digest)
    await other.push_manifest(got.data, got.media_type, "v1")
    assert skopeo_inspect(f"docker://{registry.host}/{registry_repo}-copy:v1")["Digest"] == image.digest


async def test_htpasswd_registry_with_docker_config(tmp_path, http, monkeypatch, caplog):
    password = "pw-Secret-9f3a"
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": password})
    docker_config = tmp_path / "docker"
    docker_config.mkdir()
    with start_registry(tmp_path / "reg", auth={"htpasswd": {"realm": "lazyfs-test", "path": str(htpasswd)}}) as reg:
        encoded = base64.b64encode(f"alice:{password}".encode()).decode()
        (docker_config / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": encoded}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(docker_config))
        caplog.set_level(logging.DEBUG)

        image = build_image([ROOT_LAYER])
        async with open_store(f"{reg.host}/private/app:v1", http=http) as store:
            await push_image(store, image, tag="v1")
            assert (await store.resolve_manifest()).digest == image.digest
            assert await store.read_range(image.layers[0].digest, 0, 16) == image.layers[0].blob[:16]
            assert password not in repr(store) and encoded not in repr(store)

        anonymous = client(reg.host, "private/app", http, authenticator=Authenticator())
        with pytest.raises(AuthenticationError) as excinfo:
            await anonymous.get_manifest("v1")
        assert excinfo.value.status == 401

        wrong = CredentialStore()
        wrong.add(reg.host, Credentials("alice", Secret("wrong-Secret-77")))
        refused = client(reg.host, "private/app", http, authenticator=Authenticator(wrong))
        with pytest.raises(AuthenticationError) as excinfo:
            await refused.get_manifest("v1")
        for text in (str(excinfo.value), repr(excinfo.value), repr(refused), repr(wrong)):
            assert "wrong-Secret-77" not in text and password not in text

        env = dict(os.environ, DOCKER_CONFIG=str(docker_config))
        inspected = json.loads(subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", "--authfile", str(docker_config / "config.json"),
             f"docker://{reg.host}/private/app:v1"], capture_output=True, text=True, check=True, env=env).stdout)
        assert inspected["Digest"] == image.digest
    assert password not in caplog.text and encoded not in caplog.text and "wrong-Secret-77" not in caplog.text


async def test_bearer_token_registry(tmp_path, http, caplog):
    caplog.set_level(logging.DEBUG)
    with TokenServer(tmp_path / "tokens", users={"bob": "tok-pass-5521"}) as tokens, \
            start_registry(tmp_path / "reg", auth=tokens.registry_auth_config()) as reg:
        credentials = CredentialStore()
        credentials.add(reg.host, Credentials("bob", Secret("tok-pass-5521")))
        auth = Authenticator(credentials)
        store = client(reg.host, "team/app", http, authenticator=auth)
        image = build_image([ROOT_LAYER, UPPER_LAYER])
        await push_image(store, image, tag="v1")
        pushes = auth.token_requests
        assert pushes >= 1
        assert all(authenticated for _, _, authenticated in tokens.requests)
        assert any("repository:team/app:pull,push" in scopes for _, scopes, _ in tokens.requests)

        # Reads reuse the pull token cached by the push's existence checks.
        before = auth.token_requests
        manifest = await store.resolve_manifest("v1")
        for layer in manifest.layers:
            assert await store.read_range(layer.digest, 0, 10) == next(
                x.blob for x in image.layers if x.digest == layer.digest)[:10]
        assert auth.token_requests == before

        # Cross-repository mount asks for both scopes in one token.
        other = client(reg.host, "team/copy", http, authenticator=auth)
        await push_image(other, image, tag="v1", mount_from="team/app")
        assert any({"repository:team/app:pull", "repository:team/copy:pull,push"} <= set(scopes)
                   for _, scopes, _ in tokens.requests)

        stranger = client(reg.host, "team/app", http, authenticator=Authenticator())
        with pytest.raises(AuthenticationError) as excinfo:
            await stranger.get_manifest("v1")
        assert excinfo.value.status == 401
    assert "tok-pass-5521" not in caplog.text
    # Every logger at DEBUG (httpx and httpcore included): no password, no token.
    assert tokens.issued and not any(token in caplog.text for token in tokens.issued)
    assert "eyJ" not in caplog.text  # the start of any JWT


async def test_identity_token_from_docker_config(tmp_path, http, monkeypatch):
    with TokenServer(tmp_path / "tokens", users={}, refresh_tokens={"refresh-abc-123"}) as tokens, \
            start_registry(tmp_path / "reg", auth=tokens.registry_auth_config()) as reg:
        (tmp_path / "config.json").write_text(json.dumps({"auths": {reg.host: {"identitytoken": "refresh-abc-123"}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
        async with open_store(f"{reg.host}/team/app:v1", http=http) as store:
            image = build_image([ROOT_LAYER])
            await push_image(store, image, tag="v1")
            assert (await store.get_manifest()).digest == image.digest
        assert tokens.requests and all(method == "POST" and ok for method, _, ok in tokens.requests)

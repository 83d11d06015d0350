"""`lazyfs convert` / `lazyfs inspect` against a real registry, containerd + runc, and the kernel.

The source images are ordinary gzip images pushed to the test registry. After conversion:
(a) containerd pulls the converted image with the stock overlayfs snapshotter and runc runs it;
(b) each converted layer's metadata, with its chunk device materialised from the chunk table and
attached by loop, is mounted by the kernel's EROFS and compared with that layer's source tar
(unpacked independently here, whiteouts converted the overlayfs way);
(c) every chunk, read by range from the registry, matches its digest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
import trio

from lazyfs import cli
from lazyfs.image.convert import ConvertError, ConvertOptions, convert_image
from lazyfs.layer.chunks import decode_chunk
from lazyfs.image.info import inspect_image
from lazyfs.layer.annotations import is_lazyfs
from lazyfs.layer.reader import Layer, materialise_chunk_device, open_blob_file
from lazyfs.registry import Platform, RegistryError, open_store
from lazyfs.registry.manifest import OCI_INDEX, OCI_LAYER_ZSTD, OCI_MANIFEST, Manifest
from lazyfs.registry.retry import RetryPolicy
from tests.faultproxy import Fault, FaultProxy
from tests.fixtures.common import require_root, require_tool
from tests.fixtures.erofs_images import mounted_erofs
from tests.fixtures.images import (
    build_image, build_index, device, directory, file, hardlink, opaque, push_image, push_index, symlink, whiteout,
)

BIG_SIZE = 20 << 20
CHUNK = 1 << 20


def big_content() -> bytes:
    """~20 MiB, compressible, no two chunks alike; one chunk repeated to exercise dedup."""
    piece = b"".join(hashlib.sha256(i.to_bytes(4, "big")).hexdigest().encode() for i in range(BIG_SIZE // 64))
    return piece[: 5 * CHUNK] + piece[:CHUNK] + piece[6 * CHUNK:]


def busybox_bytes() -> bytes:
    path = require_tool("busybox")
    return Path(path).read_bytes()


def image_layers(with_busybox: bool = True):
    base = [
        directory("bin"), directory("etc"), directory("var"), directory("var/cache"), directory("usr"),
        directory("usr/share"), directory("usr/share/many"),
        file("etc/hello", b"hello from lazyfs\n"),
        file("etc/removed", b"to be whited out\n"),
        file("etc/empty", b""),
        file("etc/xattr", b"with xattrs\n", xattrs={"user.lazyfs": b"yes", "user.bin": b"\x00\x01\xff"}),
        file("var/cache/old1", b"old cache 1\n"), file("var/cache/old2", b"old cache 2\n"),
        file("usr/share/big", big_content(), mode=0o640, uid=1000, gid=100),
        hardlink("usr/share/big-link", "usr/share/big"),
        symlink("usr/share/hello-link", "../../etc/hello"),
        device("dev-null", "char", 1, 3),
        file("setuid", b"#!/bin/sh\n", mode=0o4755),
    ]
    base += [file(f"usr/share/many/f{i:04d}", (b"small file %d\n" % i) * (1 + i % 50)) for i in range(400)]
    if with_busybox:
        base += [file("bin/busybox", busybox_bytes(), mode=0o755), symlink("bin/sh", "busybox"),
                 symlink("bin/cat", "busybox"), symlink("bin/ls", "busybox"), symlink("bin/test", "busybox")]
    upper = [
        whiteout("etc/removed"), opaque("var/cache"), directory("var/cache"),
        file("var/cache/new", b"new cache\n"),
        file("etc/hello", b"hello again from the upper layer\n", mode=0o600),
        file("etc/hello-hard", b"", mode=0o644), hardlink("etc/hello-hard2", "etc/hello-hard"),
    ]
    return [base, upper]


def convert_cli(src: str, dst: str, *extra: str) -> int:
    return cli.main(["convert", "-q", *extra, src, dst])


async def get_store_manifest(ref: str) -> Manifest:
    store = open_store(ref)
    try:
        return await store.get_manifest()
    finally:
        await store.aclose()


def manifest_of(ref: str) -> Manifest:
    return trio.run(get_store_manifest, ref)


async def push(ref: str, image) -> str:
    store = open_store(ref)
    try:
        return await push_image(store, image, tag=ref.rsplit(":", 1)[1])
    finally:
        await store.aclose()


@pytest.fixture(scope="module")
def source_image():
    return build_image(image_layers())


# -- expected trees from the source tars (an independent applier) ---------------------------------


def expected_tree(tar_bytes: bytes) -> dict[str, dict]:
    """path -> attributes, as a layer's lowerdir must look (whiteouts in overlayfs form)."""
    tree: dict[str, dict] = {}
    links: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as t:
        for m in t:
            name = m.name.rstrip("/")
            parent, _, base = name.rpartition("/")
            if base == ".wh..wh..opq":
                tree.setdefault(parent, {"type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "xattrs": {}})
                tree[parent]["opaque"] = True
                continue
            if base.startswith(".wh."):
                target = (parent + "/" if parent else "") + base[4:]
                tree[target] = {"type": "chr", "rdev": (0, 0), "uid": m.uid, "gid": m.gid, "mode": 0,
                                "xattrs": {}}
                continue
            attrs = {"mode": m.mode, "uid": m.uid, "gid": m.gid, "mtime": int(m.mtime),
                     "xattrs": {k[len("SCHILY.xattr."):].encode(): v.encode("utf-8", "surrogateescape")
                                for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}}
            if m.isdir():
                old = tree.get(name, {})
                attrs.update(type="dir", opaque=old.get("opaque", False))
            elif m.isreg():
                attrs.update(type="reg", data=t.extractfile(m).read())
            elif m.issym():
                attrs.update(type="lnk", target=m.linkname)
            elif m.islnk():
                tree[name] = tree[m.linkname]
                links[name] = m.linkname
                continue
            elif m.ischr():
                attrs.update(type="chr", rdev=(m.devmajor, m.devminor))
            else:
                raise AssertionError(f"unexpected member {m.name}")
            tree[name] = attrs
    for path in list(tree):  # parents the tar does not list exist as plain directories
        parent = path.rpartition("/")[0]
        while parent and parent not in tree:
            tree[parent] = {"type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "xattrs": {}}
            parent = parent.rpartition("/")[0]
    return tree


def compare_mount(mnt: str, tree: dict[str, dict]) -> None:
    found = set()
    for dirpath, dirnames, filenames in os.walk(mnt):
        for n in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, n), mnt))
    assert found == set(tree), (found ^ set(tree))
    inodes: dict[int, int] = {}
    for path, want in tree.items():
        host = os.path.join(mnt, path)
        st = os.lstat(host)
        assert (st.st_uid, st.st_gid) == (want["uid"], want["gid"]), path
        kind = want["type"]
        if kind != "lnk":
            assert stat.S_IMODE(st.st_mode) == want["mode"], (path, oct(st.st_mode))
        if "mtime" in want:
            assert st.st_mtime_ns == want["mtime"] * 10**9, path
        if kind == "dir":
            assert stat.S_ISDIR(st.st_mode)
            opaque = os.getxattr(host, "trusted.overlay.opaque") if want.get("opaque") else None
            assert opaque == (b"y" if want.get("opaque") else None), path
        elif kind == "reg":
            assert stat.S_ISREG(st.st_mode)
            assert Path(host).read_bytes() == want["data"], path
            inodes[id(want)] = inodes.get(id(want), 0) + 1
        elif kind == "lnk":
            assert os.readlink(host) == want["target"], path
        elif kind == "chr":
            assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == want["rdev"], path
        user_xattrs = {os.fsencode(n): os.getxattr(host, n, follow_symlinks=False)
                       for n in os.listxattr(host, follow_symlinks=False) if n.startswith("user.")}
        assert user_xattrs == want["xattrs"], path
    for path, want in tree.items():
        if want["type"] == "reg":
            assert os.lstat(os.path.join(mnt, path)).st_nlink == inodes[id(want)], path


# -- tests -----------------------------------------------------------------------------------


def test_convert_registry_to_registry(registry, registry_repo, source_image, tmp_path):
    require_root()
    src = f"{registry.host}/{registry_repo}:gzip"
    dst = f"{registry.host}/{registry_repo}:lazyfs"
    source_digest = trio.run(push, src, source_image)
    assert convert_cli(src, dst) == 0
    assert manifest_of(src).digest == source_digest  # the source is untouched
    converted = manifest_of(dst)
    assert converted.media_type == OCI_MANIFEST
    layers = converted.layers
    assert len(layers) == 2 and all(d.media_type == OCI_LAYER_ZSTD and is_lazyfs(d.annotations) for d in layers)

    async def fetch_all():
        store = open_store(dst)
        try:
            config = await store.get_config(converted)
            blobs = [await store.get_blob(d.digest, max_size=64 << 20) for d in layers]
            checked = 0
            for desc, blob in zip(layers, blobs):
                layer = layer_from_bytes(blob, desc.annotations, tmp_path)
                for n in range(layer.chunk_count):  # (c) every chunk by range
                    ref = layer.chunk_ref(n)
                    stored = await store.read_range(desc.digest, ref.offset, ref.stored_length)
                    decode_chunk(ref, stored)
                    checked += 1
                layer.close()
            return config, blobs, checked
        finally:
            await store.aclose()

    config, blobs, checked = trio.run(fetch_all)
    assert checked >= BIG_SIZE // CHUNK
    for blob, diff_id in zip(blobs, config["rootfs"]["diff_ids"]):
        tar = zstd_decompress(blob)
        assert diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()

    # (b) the kernel mounts each layer's metadata with its materialised chunk device.
    for i, (desc, blob) in enumerate(zip(layers, blobs)):
        blob_path = tmp_path / f"layer{i}.blob"
        blob_path.write_bytes(blob)
        with open(blob_path, "rb") as f:
            layer = open_blob_file(f, desc.annotations)
            meta_path = tmp_path / f"layer{i}.meta"
            meta_path.write_bytes(bytes(layer.image._mv))
            device_path = None
            if layer.chunk_count:
                device_path = str(tmp_path / f"layer{i}.chunks")
                materialise_chunk_device(f, layer, device_path)
            layer.close()
        with mounted_erofs(str(meta_path), device_path) as mnt:
            compare_mount(mnt, expected_tree(source_image.layers[i].tar))

    # (a) containerd + runc run the converted image from the stock overlayfs snapshotter.
    run_in_containerd(registry, dst, tmp_path)

    # lazyfs inspect reads the same numbers back by range.
    report = inspect_json(dst)
    lay = report["images"][0]["layers"]
    assert [x["lazyfs"] for x in lay] == [True, True]
    assert lay[0]["chunk_size"] == CHUNK and lay[0]["chunks"] >= 20 and lay[0]["dedup_savings"] == CHUNK
    assert lay[0]["files"] >= 400 and lay[0]["trace"] is False


def zstd_decompress(blob: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()


def layer_from_bytes(blob: bytes, annotations, tmp_path) -> Layer:
    from lazyfs.layer.annotations import from_annotations

    index = from_annotations(annotations, len(blob))
    return Layer.load(index, blob[index.meta.offset:index.meta.offset + index.meta.stored_size],
                      blob[index.table.offset:index.table.offset + index.table.stored_size])


def inspect_json(ref: str) -> dict:
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["inspect", "--json", ref]) == 0
    return json.loads(out.getvalue())


def run_in_containerd(registry, ref: str, tmp_path) -> None:
    from tests.fixtures.containerd import Containerd

    require_root()
    require_tool("runc")
    instance = Containerd(tmp_path / "containerd")
    try:
        instance.start()
        instance.trust_http_registry(registry.host)
        instance.pull(ref, snapshotter="overlayfs")
        script = ("cat /etc/hello; test -e /etc/removed || echo removed-gone; ls /var/cache; "
                  "cat /usr/share/hello-link; cat /etc/xattr")
        out = instance.run(ref, "lazyfs-convert-test", "/bin/sh", "-c", script).stdout
        assert out.split("\n") == [
            "hello again from the upper layer", "removed-gone", "new",
            "hello again from the upper layer", "with xattrs", "",
        ], out
    finally:
        instance.stop()


async def test_layer_used_twice_is_converted_once(tmp_path):
    same = [file("shared", b"same bytes\n" * 1000)]
    image = build_image([same, [file("x", b"x")], same])
    src = open_store(f"oci:{tmp_path / 'src'}:v1")
    dst = open_store(f"oci:{tmp_path / 'dst'}:v1")
    try:
        await push_image(src, image, tag="v1")
        result = await convert_image(src, dst, tag="v1")
        layers = result.images[0].layers
        assert layers[0].target == layers[2].target and layers[0].build is layers[2].build
        converted = await dst.get_manifest()
        assert [d.digest for d in converted.layers][0] == [d.digest for d in converted.layers][2]
    finally:
        await src.aclose()
        await dst.aclose()


async def test_convert_index_and_docker_media_types(registry, registry_repo, tmp_path):
    amd = build_image([[file("a", b"amd64\n")], [file("b", b"x" * 10000)]], media_types="docker",
                      platform=Platform("linux", "amd64"))
    arm = build_image([[file("a", b"arm64\n")]], media_types="docker", platform=Platform("linux", "arm64", "v8"))
    index = build_index([amd, arm], media_types="docker")
    src_ref = f"{registry.host}/{registry_repo}:multi"
    src = open_store(src_ref)
    dst = open_store(f"oci:{tmp_path / 'layout'}:conv")
    try:
        source_digest = await push_index(src, index, tag="multi")
        result = await convert_image(src, dst, tag="conv", options=ConvertOptions(chunk_size=1 << 16))
        assert result.media_type == OCI_INDEX and len(result.images) == 2
        top = await dst.get_manifest()
        assert top.digest == result.digest and top.is_index
        platforms = [d.platform["architecture"] for d in top.manifests]
        assert platforms == ["amd64", "arm64"]
        for entry in top.manifests:
            image = await dst.get_manifest(entry.digest)
            assert image.media_type == OCI_MANIFEST
            assert all(d.media_type == OCI_LAYER_ZSTD and is_lazyfs(d.annotations) for d in image.layers)
            assert image.config.media_type == "application/vnd.oci.image.config.v1+json"
        # Converting the converted image passes every layer through unchanged.
        again = await convert_image(dst, dst, tag="again", options=ConvertOptions(chunk_size=1 << 16))
        assert all(not layer.converted for image in again.images for layer in image.layers)
        assert [i.manifest_digest for i in again.images] == [i.manifest_digest for i in result.images]
        # --platform converts one image of the index.
        one = await convert_image(src, dst, tag="one", options=ConvertOptions(platform=Platform("linux", "arm64")))
        assert one.media_type == OCI_MANIFEST and len(one.images) == 1
        assert (await src.get_manifest()).digest == source_digest
    finally:
        await src.aclose()
        await dst.aclose()


async def test_index_with_attestation_manifest(registry, registry_repo, tmp_path):
    """A buildx-style attestation (not a tar layer, config without rootfs) is copied unchanged."""
    image = build_image([[file("a", b"amd64\n")]])
    src = open_store(f"{registry.host}/{registry_repo}:att")
    dst = open_store(f"oci:{tmp_path / 'out'}:x")
    try:
        await push_image(src, image)
        statement, config = b'{"_type": "https://in-toto.io/Statement/v0.1"}', b"{}"
        for blob in (statement, config):
            await src.push_blob(blob, media_type="application/octet-stream")
        attestation = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.in-toto+json",
                        "digest": "sha256:" + hashlib.sha256(statement).hexdigest(), "size": len(statement)}],
        }).encode()
        att_digest = await src.push_manifest(attestation, OCI_MANIFEST)
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            image.descriptor.to_json(),
            {"mediaType": OCI_MANIFEST, "digest": att_digest, "size": len(attestation),
             "platform": {"os": "unknown", "architecture": "unknown"},
             "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
        ]}).encode()
        await src.push_manifest(index, OCI_INDEX, "att")
        result = await convert_image(src, dst, tag="x")
        top = await dst.get_manifest()
        assert top.digest == result.digest and [m.digest for m in top.manifests][1] == att_digest
        converted = await dst.get_manifest(top.manifests[0].digest)
        assert is_lazyfs(converted.layers[0].annotations)
        assert (await dst.get_manifest(att_digest)).data == attestation
    finally:
        await src.aclose()
        await dst.aclose()


async def test_convert_is_deterministic_and_checks_diff_ids(registry, registry_repo, tmp_path):
    image = build_image([[file("f", b"content\n" * 1000)]])
    store = open_store(f"{registry.host}/{registry_repo}:v1")
    layout = open_store(f"oci:{tmp_path / 'out'}:x")
    try:
        await push_image(store, image, tag="v1")
        first = await convert_image(store, layout, tag="x")
        second = await convert_image(store, layout, tag="y")
        assert first.digest == second.digest
        # Without its annotations a lazyfs layer is still recognised, by its footer.
        doc = json.loads(first.images[0].manifest)
        for layer in doc["layers"]:
            del layer["annotations"]
        await layout.push_manifest(json.dumps(doc).encode(), OCI_MANIFEST, "bare")
        bare = open_store(f"oci:{tmp_path / 'out'}:bare")
        try:
            info = (await inspect_image(bare))["images"][0]["layers"][0]
        finally:
            await bare.aclose()
        assert info["lazyfs"] and info["index_from"] == "footer (trusted)" and info["files"] == 1
        # A config whose diff_id does not match the layer is refused before anything is pushed.
        bad = build_image([[file("f", b"content\n")]], config_extra={"rootfs": {"type": "layers",
                                                                               "diff_ids": ["sha256:" + "0" * 64]}})
        await push_image(store, bad, tag="bad")
        bad_src = open_store(f"{registry.host}/{registry_repo}:bad")
        empty = open_store(f"oci:{tmp_path / 'empty'}:x")
        try:
            with pytest.raises(ConvertError, match="config says"):
                await convert_image(bad_src, empty, tag="x")
            assert not (tmp_path / "empty").exists() or not list((tmp_path / "empty").rglob("sha256/*"))
        finally:
            await bad_src.aclose()
            await empty.aclose()
    finally:
        await store.aclose()
        await layout.aclose()


@pytest.mark.expected_log
async def test_convert_through_fault_proxy(registry, registry_repo, tmp_path):
    image = build_image([[file("big", big_content()[: 6 * CHUNK])], [file("small", b"s\n")]])
    direct = open_store(f"{registry.host}/{registry_repo}:src")
    reference_out = open_store(f"oci:{tmp_path / 'ref'}:x")
    try:
        source_digest = await push_image(direct, image, tag="src")
        expected = (await convert_image(direct, reference_out, tag="x")).digest
    finally:
        await reference_out.aclose()
    config = image.config_descriptor.digest
    faults = [
        # A flipped byte or a cut body in the manifest and the image config is fetched again.
        (Fault.corrupt(at=20), dict(method="GET", path=r"/manifests/", times=2)),
        (Fault.corrupt(at=10), dict(method="GET", path=config, times=2)),
        (Fault.truncate(30), dict(method="GET", path=config, times=2)),
        (Fault.reset(after_bytes=100000), dict(method="GET", path=r"/blobs/sha256:", times=2)),
        (Fault.status(503), dict(method="GET", path=r"/manifests/", times=1)),
        (Fault.truncate(50000), dict(method="GET", path=r"/blobs/sha256:", times=1)),
        (Fault.corrupt(at=1000), dict(method="GET", path=r"/blobs/sha256:", times=1)),
        (Fault.status(500), dict(method="GET", path=r"/blobs/sha256:", times=None)),
    ]
    fast_retry = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)
    try:
        for i, (fault, rule) in enumerate(faults):
            with FaultProxy(registry.host) as proxy:
                proxy.add(fault, **rule)
                src = open_store(f"{proxy.host}/{registry_repo}:src", retry=fast_retry)
                out = open_store(f"oci:{tmp_path / f'out{i}'}:x")
                try:
                    result = await convert_image(src, out, tag="x")
                    assert not proxy.unused_rules(), f"{fault} was never applied"
                    assert result.digest == expected, fault
                except (RegistryError, ConvertError) as e:
                    assert str(e), fault
                    assert rule["times"] is None, f"{fault} should have been retried: {e}"
                    assert not list((tmp_path / f"out{i}").rglob("sha256/*")), "nothing may be pushed"
                finally:
                    await src.aclose()
                    await out.aclose()
        assert (await direct.get_manifest()).digest == source_digest
    finally:
        await direct.aclose()


async def test_hostile_layer_refused_and_inspect_plain_image(registry, registry_repo, tmp_path):
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("../../etc/cron.d/evil")
        info.size = 4
        t.addfile(info, io.BytesIO(b"evil"))
    image = build_image([[file("ok", b"fine\n")], evil.getvalue()])
    src = open_store(f"{registry.host}/{registry_repo}:evil")
    out = open_store(f"oci:{tmp_path / 'out'}:x")
    try:
        await push_image(src, image, tag="evil")
        with pytest.raises(ConvertError, match=r"\.\./\.\./etc/cron\.d/evil.*'\.\.'"):
            await convert_image(src, out, tag="x")
        assert not list((tmp_path / "out").rglob("sha256/*"))
        report = await inspect_image(src)
        assert [layer["lazyfs"] for layer in report["images"][0]["layers"]] == [False, False]
    finally:
        await src.aclose()
        await out.aclose()


def test_convert_cli_embeds_a_trace(tmp_path, capsys):
    from lazyfs.trace.format import Trace

    trace = b"lazyfs-trace\t1\nlayer\tsha256:" + b"0" * 64 + b"\t65536\naccess\t5\tsha256:" + b"0" * 64 + \
        b"\t40\t0\t0\tf\n"
    (tmp_path / "trace").write_bytes(trace)
    (tmp_path / "bad-trace").write_bytes(b"not a trace\n")
    image = build_image([[file("f", b"traced\n" * 10000)]])
    trio.run(push, f"oci:{tmp_path / 'src'}:v1", image)
    dst = f"oci:{tmp_path / 'dst'}:v1"
    assert convert_cli(f"oci:{tmp_path / 'src'}:v1", dst, "--trace", str(tmp_path / "bad-trace")) == 2
    assert "--trace" in capsys.readouterr().err and not (tmp_path / "dst").exists()
    assert convert_cli(f"oci:{tmp_path / 'src'}:v1", dst, "--trace", str(tmp_path / "trace")) == 0
    layer_desc = manifest_of(dst).layers[0]
    blob = (tmp_path / "dst" / "blobs" / "sha256" / layer_desc.digest[7:]).read_bytes()
    from lazyfs.layer.annotations import from_annotations

    index = from_annotations(layer_desc.annotations, len(blob))
    embedded = index.trace.open("trace", blob[index.trace.offset:index.trace.offset + index.trace.stored_size])
    assert embedded == trace and Trace.decode(embedded).accesses[0].path == "f"
    assert inspect_json(dst)["images"][0]["layers"][0]["trace"] is True


def test_inspect_piped_shows_full_values(tmp_path):
    import subprocess
    import sys

    image = build_image([[file("f", b"x" * 100_000)], [file("g", b"y" * 5)]])
    trio.run(push, f"oci:{tmp_path / 'src'}:v1", image)
    dst = f"oci:{tmp_path / 'a-long-directory-name-that-would-not-fit' / 'dst'}:v1"
    assert convert_cli(f"oci:{tmp_path / 'src'}:v1", dst) == 0
    shown = subprocess.run([sys.executable, "-m", "lazyfs.cli", "inspect", dst], capture_output=True, text=True,
                           check=True, env={**os.environ, "COLUMNS": "80"}).stdout
    for desc in manifest_of(dst).layers:  # whole digests, on one line each
        assert any(desc.digest[7:] in line and "lazyfs v1" in line for line in shown.splitlines()), shown
    assert "…" not in shown and max(len(line) for line in shown.splitlines()) > 80


def test_convert_cli_errors(registry, registry_repo, tmp_path, capsys):
    assert convert_cli(f"{registry.host}/{registry_repo}:missing", f"oci:{tmp_path / 'o'}:x") == 1
    assert "lazyfs convert:" in capsys.readouterr().err
    assert convert_cli("UPPER/bad::ref", f"oci:{tmp_path / 'o'}:x") == 2
    assert not (tmp_path / "o").exists()

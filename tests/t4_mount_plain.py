"""`lazyfs mount --meta --blob` of a mkfs.erofs chunk-based image equals the kernel's own mount."""

from __future__ import annotations

import errno
import http.server
import os
import re
import threading

import pytest

from tests.fixtures.erofs_images import mounted_erofs
from tests.fixtures.erofs_trees import make_plain_image
from tests.fixtures.lazymount import assert_same_tree, lazy_mount, lazyfs_cli
from tests.fixtures.common import require_root


@pytest.fixture(scope="module")
def plain_image(tmp_path_factory):
    require_root()
    return make_plain_image(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def kernel_mount(plain_image):
    with mounted_erofs(str(plain_image.meta), str(plain_image.blob)) as mnt:
        yield mnt


class _BlobHandler(http.server.BaseHTTPRequestHandler):
    """Serves one file, honouring single Range requests (what HttpBlobSource sends)."""

    protocol_version = "HTTP/1.1"
    path_on_disk = ""
    ranges_served: list[str] = []

    def log_message(self, *args):
        pass

    def _head(self, status: int, length: int, extra: dict) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()

    def do_HEAD(self):
        self._head(200, os.path.getsize(self.path_on_disk), {})

    def do_GET(self):
        size = os.path.getsize(self.path_on_disk)
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        with open(self.path_on_disk, "rb") as f:
            if match is None:
                self._head(200, size, {})
                self.wfile.write(f.read())
                return
            first, last = int(match[1]), min(int(match[2]), size - 1)
            self.ranges_served.append(f"{first}-{last}")
            f.seek(first)
            body = f.read(last - first + 1)
        self._head(206, len(body), {"Content-Range": f"bytes {first}-{last}/{size}"})
        self.wfile.write(body)


@pytest.fixture(params=["fuse", "kernel"])
def serve(request):
    """The serving mode of the mount under test (lazyfs.serve.kernel for "kernel")."""
    return request.param


def assert_served_as(mount, serve: str) -> None:
    layers = mount.stats()["attached"]
    assert [layer["serve"] for layer in layers] == [serve] * len(layers)
    if serve == "kernel":
        assert all(layer["loop"].startswith("/dev/loop") for layer in layers)


@pytest.fixture
def blob_url(plain_image):
    handler = type("Handler", (_BlobHandler,), {"path_on_disk": str(plain_image.blob), "ranges_served": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/blob", handler
    finally:
        server.shutdown()
        server.server_close()


def test_plain_image_from_a_file_equals_the_kernel_mount(plain_image, kernel_mount, serve, tmp_path):
    with lazy_mount(tmp_path / "mnt", "--serve", serve, "--meta", str(plain_image.meta), "--blob",
                    str(plain_image.blob), run_dir=tmp_path / "run", cache_dir=tmp_path / "cache") as mount:
        assert_same_tree(kernel_mount, mount.path)
        assert_served_as(mount, serve)
        # Read-only, with the errno a read-only filesystem gives.
        with pytest.raises(OSError) as e:
            (mount.path / "new-file").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
        with pytest.raises(OSError) as e:
            os.setxattr(mount.path / "small.txt", "user.x", b"1")
        assert e.value.errno == errno.EROFS
        stats = mount.stats()
        assert stats["layers"] == 1 and stats["reads"]["bytes"] > 0
        assert [layer["kind"] for layer in stats["attached"]] == ["plain"]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    assert not os.path.ismount(tmp_path / "mnt")


def test_plain_image_from_a_url_equals_the_kernel_mount(plain_image, kernel_mount, blob_url, serve, tmp_path):
    url, handler = blob_url
    with lazy_mount(tmp_path / "mnt", "--serve", serve, "--meta", str(plain_image.meta), "--blob", url,
                    run_dir=tmp_path / "run", cache_dir=tmp_path / "cache") as mount:
        assert_same_tree(kernel_mount, mount.path)
        assert_served_as(mount, serve)
        assert handler.ranges_served, "the blob was read by range over HTTP"


def test_mount_reports_a_bad_image_and_leaves_nothing_behind(plain_image, tmp_path):
    bogus = tmp_path / "bogus.erofs"
    bogus.write_bytes(b"\0" * 8192)
    (tmp_path / "mnt").mkdir()
    result = lazyfs_cli("mount", "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                        "--meta", str(bogus), "--blob", str(plain_image.blob), str(tmp_path / "mnt"), check=False)
    assert result.returncode == 1
    assert "bad magic" in result.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    assert not any((tmp_path / "run").iterdir())


def test_second_mount_on_the_same_point_is_refused(plain_image, tmp_path):
    args = ("--meta", str(plain_image.meta), "--blob", str(plain_image.blob))
    with lazy_mount(tmp_path / "mnt", *args, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache"):
        again = lazyfs_cli("mount", "--run-dir", str(tmp_path / "run"), *args, str(tmp_path / "mnt"), check=False)
        assert again.returncode == 1 and "already mounted" in again.stderr

"""The daemon on its own: control protocol, socket permissions, metrics, SIGTERM unmount."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request

import pytest

from lazyfs.daemon.control import ControlClient, ControlError, request
from lazyfs.serve.mounts import is_mounted
from tests.fixtures.common import require_root
from tests.fixtures.erofs_trees import make_plain_image
from tests.fixtures.registry import free_port
from tests.fixtures.lazymount import stop_daemon


@pytest.fixture
def daemon(tmp_path):
    require_root()
    image = make_plain_image(tmp_path / "image")
    fuse_dir, sock = tmp_path / "fuse", tmp_path / "control.sock"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lazyfs.daemon", "--fuse-dir", str(fuse_dir), "--socket", str(sock),
         "--cache-dir", str(tmp_path / "cache"), "--metrics", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                if request(str(sock), "ping", timeout=2)["ready"]:
                    break
            except ControlError:
                pass
            assert time.monotonic() < deadline, "daemon did not become ready"
            time.sleep(0.05)
        yield proc, fuse_dir, sock, image, port
    finally:
        stop_daemon(proc, fuse_dir)


def test_control_protocol(daemon):
    proc, fuse_dir, sock, image, port = daemon
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    with ControlClient(str(sock)) as client:
        ping = client.request("ping")
        assert ping["ready"] is True and ping["pid"] == proc.pid and ping["fuse"] == str(fuse_dir)
        reply = client.request("attach", name="one", kind="plain", meta=str(image.meta), blob=str(image.blob))
        assert reply == {"path": str(fuse_dir / "one")}
        client.request("attach", name="two", kind="plain", meta=str(image.meta), blob=str(image.blob))
        assert sorted(os.listdir(fuse_dir)) == ["one", "two"]
        assert (fuse_dir / "two" / "small.txt").read_bytes() == b"hello lazyfs\n"
        names = [layer["name"] for layer in client.request("list")["layers"]]
        assert names == ["one", "two"]
        # Errors carry a kind the snapshotter can act on.
        for args, kind in [
            (dict(op="attach", name="one", kind="plain", meta=str(image.meta), blob=str(image.blob)), "exists"),
            (dict(op="attach", name="x", kind="nope"), "bad-request"),
            (dict(op="attach", name="x", kind="plain", meta="/nonexistent", blob=str(image.blob)), "attach-failed"),
            (dict(op="attach", name="a/b", kind="plain", meta=str(image.meta), blob=str(image.blob)), "bad-request"),
            (dict(op="detach", name="missing"), "not-found"),
            (dict(op="frobnicate"), "bad-request"),
        ]:
            with pytest.raises(ControlError) as e:
                client.request(args.pop("op"), **args)
            assert e.value.kind == kind, (args, e.value)
        client.request("detach", name="one")
        assert os.listdir(fuse_dir) == ["two"]
        assert not (fuse_dir / "one").exists()
        stats = client.request("stats")
        assert stats["layers"] == 1 and stats["reads"]["bytes"] >= 13
        assert set(stats) >= {"fetch", "cache", "prefetch", "uptime", "pid"}
        events = client.request("fetch-log")["events"]
        assert events and all(e["end"] >= e["start"] and e["bytes"] > 0 for e in events)
    # Invalid JSON gets an answer, and the connection stays usable.
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(sock))
        raw.sendall(b"{not json\n{\"op\": \"ping\"}\n")
        answer = b""
        while answer.count(b"\n") < 2:
            answer += raw.recv(4096)
        first, second = answer.splitlines()[:2]
        assert b'"ok": false' in first and b'"ok": true' in second
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "lazyfs_layers 1" in metrics and "lazyfs_read_bytes_total" in metrics


def test_sigterm_unmounts_cleanly(daemon):
    proc, fuse_dir, sock, image, _ = daemon
    request(str(sock), "attach", name="one", kind="plain", meta=str(image.meta), blob=str(image.blob))
    assert is_mounted(fuse_dir)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not is_mounted(fuse_dir)
    assert not sock.exists()

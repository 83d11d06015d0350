"""The shaped registry link: the delay proxy's stream semantics, and that shaping shapes.

The bounds are lenient rates (a shaper that does not shape, or a proxy that stalls a
connection per chunk, fails them by a wide margin); they are correctness checks of the
emulated link, not benchmarks.
"""

import json
import os
import socket
import socketserver
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lazyfs.bench import netshape
from lazyfs.bench.delayproxy import DelayProxy
from lazyfs.bench.images import build_image, push_image
from lazyfs.bench.netshape import (LinkShape, ShapedRegistry, check_link, cleanup_leftovers,
                                   shaped_registry, time_blob_download, time_round_trips,
                                   upload_blob)
from lazyfs.bench.recipes import busybox_python_recipe
from tests.fixtures.common import require_root, require_tool, run

DELAY = 0.05  # one way: each round trip through the proxy gains 100 ms


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 would drop concurrent connects


@pytest.fixture
def echo_proxy():
    server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with DelayProxy(server.server_address, DELAY) as proxy:
            yield proxy
    finally:
        server.shutdown()
        server.server_close()


def _connect(proxy) -> socket.socket:
    host, port = proxy.endpoint.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = sock.recv(min(65536, n - got))
        if not part:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def test_proxy_delays_each_chunk_from_its_arrival(echo_proxy):
    """Pipelined messages each take one round trip, not one round trip per message queued."""
    sock = _connect(echo_proxy)
    sent_at, latencies = [], []
    with sock:
        def receive():
            for _ in range(5):
                _recv_exactly(sock, 8)
                latencies.append(time.monotonic() - sent_at[len(latencies)])
        receiver = threading.Thread(target=receive)
        receiver.start()
        for i in range(5):
            sent_at.append(time.monotonic())
            sock.sendall(b"msg%05d" % i)
            time.sleep(0.03)
        receiver.join(10)
    assert len(latencies) == 5
    assert all(2 * DELAY * 0.95 <= t < 2 * DELAY + 0.08 for t in latencies), latencies


def test_proxy_keeps_the_stream_and_half_close(echo_proxy):
    data = os.urandom(8 << 20)
    sock = _connect(echo_proxy)
    with sock:
        sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = _recv_exactly(sock, len(data))
        assert sock.recv(1) == b""  # the echo server's EOF came through
        sender.join(10)
    assert echoed == data
    assert echo_proxy.server.stats.bytes_up == echo_proxy.server.stats.bytes_down == len(data)


def test_proxy_serves_connections_concurrently(echo_proxy):
    def round_trip(i: int) -> float:
        started = time.monotonic()
        with _connect(echo_proxy) as sock:
            sock.sendall(b"%08d" % i)
            assert _recv_exactly(sock, 8) == b"%08d" % i
        return time.monotonic() - started

    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        times = list(pool.map(round_trip, range(32)))
    wall = time.monotonic() - started
    # Each sees at least one delayed round trip (the connect adds none: the proxy accepts
    # at once), and 32 of them together take about one, not 32.
    assert min(times) >= 2 * DELAY * 0.95
    assert wall < 8 * 2 * DELAY, (wall, times)
    assert echo_proxy.server.stats.connections == 32


# --- the shaped registry ---------------------------------------------------------------

@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    require_root()
    for tool in ("ip", "tc", "docker-registry"):
        require_tool(tool)
    registry = ShapedRegistry(tmp_path_factory.mktemp("registry"), LinkShape(100, 20))
    try:
        registry.start()
        yield registry
    finally:
        registry.stop()


def test_shaped_link_limits_throughput(shaped):
    data = os.urandom(20 << 20)
    digest = upload_blob(shaped.endpoint, "bench/blob", data)
    size, seconds = time_blob_download(shaped.endpoint, "bench/blob", digest)
    assert size == len(data)
    # 20 MiB at 100 Mbit/s take 1.68 s; unshaped, this machine moves it in well under 0.5 s.
    assert 1.2 <= seconds < 10, seconds


def test_shaped_link_adds_round_trip_time(shaped):
    shaped_times = time_round_trips(shaped.endpoint, 20)
    assert sum(shaped_times) >= 20 * 0.020, shaped_times
    assert sum(shaped_times) < 20 * 0.200, shaped_times
    # The registry's own address (tbf, no proxy) answers without the added delay.
    assert sum(time_round_trips(shaped.registry_addr, 20)) < 20 * 0.015


def test_push_an_image_through_the_shaped_link(shaped, tmp_path):
    require_tool("skopeo")
    image = build_image(busybox_python_recipe(), tmp_path / "cache")
    digest = push_image(image, shaped.endpoint, "bench/busybox-python")
    assert digest == image.manifest_digest
    info = json.loads(run(["skopeo", "inspect", "--tls-verify=false",
                           f"docker://{shaped.endpoint}/bench/busybox-python:latest"]).stdout)
    assert info["Digest"] == image.manifest_digest
    assert info["Layers"] == [layer.digest for layer in image.layers]


def test_registry_lives_in_its_own_namespace(shaped):
    assert shaped.namespace in netshape.list_namespaces()
    qdiscs = run(["tc", "-n", shaped.namespace, "qdisc", "show"]).stdout
    assert "tbf" in qdiscs and "rate 100Mbit" in qdiscs
    # Nothing but our /30 is reachable from inside: there is no default route.
    routes = run(["ip", "-n", shaped.namespace, "route", "show"]).stdout
    assert "default" not in routes and routes.strip().startswith("169.254.")


def test_teardown_removes_everything(tmp_path):
    require_root()
    registry = ShapedRegistry(tmp_path / "storage", LinkShape(100, 20))
    with registry:
        pids = [registry._proxy.pid, registry._registry.pid]
        namespace = registry.namespace
        host, port = registry.endpoint.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()
    assert namespace not in netshape.list_namespaces()
    assert not (netshape.STATE_DIR / f"{namespace}.json").exists()
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2)
    assert (tmp_path / "storage").is_dir()  # the registry's content stays
    registry.stop()  # a second stop is harmless


def test_shaped_registry_yields_a_loopback_endpoint(tmp_path):
    require_root()
    with shaped_registry(rate_mbit=50, rtt_ms=10, root=tmp_path) as endpoint:
        host, _, port = endpoint.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
        assert 0.010 <= min(time_round_trips(endpoint, 3)) < 0.2


def test_cleanup_removes_leftovers_of_dead_owners_only(tmp_path):
    require_root()
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftovers = {"lazyfs-bench-deadbe": dead.pid, "lazyfs-bench-a1ive0": os.getpid()}
    try:
        for namespace, owner in leftovers.items():
            run(["ip", "netns", "add", namespace])
            netshape._State(namespace=namespace, owner_pid=owner,
                            owner_start=netshape._process_start(owner) or "gone",
                            host_veth="", ns_veth="", host_addr="", ns_addr="").save()
        removed = cleanup_leftovers()
        assert "lazyfs-bench-deadbe" in removed and "lazyfs-bench-a1ive0" not in removed
        assert netshape.list_namespaces().count("lazyfs-bench-a1ive0") == 1
        assert "lazyfs-bench-deadbe" not in netshape.list_namespaces()
        assert "lazyfs-bench-a1ive0" not in cleanup_leftovers()
        assert "lazyfs-bench-a1ive0" in cleanup_leftovers(include_live=True)
        assert "lazyfs-bench-a1ive0" not in netshape.list_namespaces()
    finally:
        for namespace in leftovers:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
            (netshape.STATE_DIR / f"{namespace}.json").unlink(missing_ok=True)


def test_check_link_reports_the_shaped_figures():
    require_root()
    require_tool("curl")
    report = check_link(LinkShape(100, 20), blob_mib=4)
    assert 20 <= report["curl_mbit_s"] <= 101 and 20 <= report["download_mbit_s"] <= 101
    assert report["rtt_min_ms"] >= 20 > report["rtt_unproxied_median_ms"]

"""Blob sources against real I/O: a local file, and a local HTTP server answering ranges."""

import hashlib
import http.server
import os
import re
import sys
import threading
import time

import httpx
import pytest
import trio
import xxhash
import zstandard

from lazyfs.fetch.cache import ChunkCache
from lazyfs.fetch.scheduler import ChunkFetcher, FetchError, Priority, RetryPolicy
from lazyfs.layer.chunks import ChunkRef
from lazyfs.registry import OCILayoutStore, RegistryClient, parse_reference
from lazyfs.fetch.sources import FileBlobSource, HttpBlobSource, RegistryBlobSource, SourceError

BLOB = os.urandom(300_000)


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves BLOB; the path picks the behaviour: /blob honours Range, /norange ignores it,
    /badrange answers a wrong Content-Range, /error answers 500, /short cuts the body, /drip
    sends the body a byte every 50 ms."""

    protocol_version = "HTTP/1.1"
    requests_seen: list[tuple[str, str | None]] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        range_header = self.headers.get("Range")
        self.requests_seen.append((self.path, range_header))
        if self.path == "/redirect":
            self._send(302, b"", {"Location": "/blob"})
            return
        if self.path == "/error":
            self._send(500, b"internal error")
            return
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", range_header or "")
        if self.path == "/norange" or match is None:
            self._send(200, BLOB)
            return
        first, last = int(match[1]), min(int(match[2]), len(BLOB) - 1)
        if first >= len(BLOB):
            self._send(416, b"", {"Content-Range": f"bytes */{len(BLOB)}"})
            return
        body = BLOB[first:last + 1]
        if self.path == "/badrange":
            first += 1
        headers = {"Content-Range": f"bytes {first}-{first + len(body) - 1}/{len(BLOB)}"}
        if self.path == "/drip":
            self.send_response(206)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Range", headers["Content-Range"])
            self.end_headers()
            for i in range(len(body)):  # until the client hangs up (a broken pipe ends it)
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(0.05)
            return
        if self.path == "/short":
            self.send_response(206)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Range", headers["Content-Range"])
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self._send(206, body, headers)

    def _send(self, status, body, headers=None):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A client that stops reading once it has its range (the 200 case) resets the
        # connection while the server is still writing: expected, not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def http_server():
    server = QuietServer(("127.0.0.1", 0), RangeHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    RangeHandler.requests_seen = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def test_http_range_read(http_server, client):
    source = HttpBlobSource(f"{http_server}/blob", client)
    assert source.host == http_server.removeprefix("http://")
    assert await source.read_range(1000, 5000) == BLOB[1000:6000]
    assert await source.read_range(len(BLOB) - 10, 10) == BLOB[-10:]
    assert await source.read_range(0, 0) == b""
    assert RangeHandler.requests_seen[0] == ("/blob", "bytes=1000-5999")


async def test_http_redirect_is_followed(http_server, client):
    source = HttpBlobSource(f"{http_server}/redirect", client)
    assert await source.read_range(100, 900) == BLOB[100:1000]
    assert [path for path, _ in RangeHandler.requests_seen] == ["/redirect", "/blob"]


async def test_http_server_ignoring_range_is_handled(http_server, client):
    source = HttpBlobSource(f"{http_server}/norange", client)
    assert await source.read_range(123_456, 1000) == BLOB[123_456:124_456]


@pytest.mark.parametrize("path, message", [
    ("/badrange", "Content-Range"),
    ("/error", "HTTP 500"),
    ("/short", "RemoteProtocolError|ReadError|body"),
])
async def test_http_bad_answers_raise_source_error(http_server, client, path, message):
    source = HttpBlobSource(f"{http_server}{path}", client)
    with pytest.raises(SourceError, match=message):
        await source.read_range(10, 20_000)


async def test_http_body_that_drips_fails_its_read(http_server, client):
    source = HttpBlobSource(f"{http_server}/drip", client, progress_timeout=0.5)
    with pytest.raises(SourceError, match="too slow"):
        await source.read_range(10, 20_000)


async def test_http_range_past_the_end(http_server, client):
    source = HttpBlobSource(f"{http_server}/blob", client)
    with pytest.raises(SourceError, match="416"):
        await source.read_range(len(BLOB) + 5, 10)
    with pytest.raises(SourceError):
        await source.read_range(len(BLOB) - 5, 10)  # a short 206


async def test_http_connection_refused_is_source_error(client):
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = HttpBlobSource(f"http://127.0.0.1:{port}/blob", client)
    with pytest.raises(SourceError, match="ConnectError"):
        await source.read_range(0, 10)


async def test_file_source(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(BLOB)
    with FileBlobSource(path) as source:
        assert source.size == len(BLOB)
        assert await source.read_range(7, 70_000) == BLOB[7:70_007]
        with pytest.raises(SourceError, match="end of file"):
            await source.read_range(len(BLOB) - 3, 10)
    with pytest.raises(SourceError, match="closed"):
        await source.read_range(0, 1)


def zstd_blob(count: int, size: int):
    compressor = zstandard.ZstdCompressor(level=3)
    blob = bytearray()
    refs, datas = [], []
    for i in range(count):
        data = os.urandom(size // 2) + bytes([i]) * (size // 2)
        frame = compressor.compress(data)
        refs.append(ChunkRef(len(blob), len(frame), len(data), xxhash.xxh3_128_digest(data), "zstd"))
        datas.append(data)
        blob += frame
    return bytes(blob), refs, datas


async def test_fetcher_over_http_and_file(http_server, client, tmp_path):
    global BLOB
    blob, refs, datas = zstd_blob(12, 64 << 10)
    saved, BLOB = BLOB, blob
    try:
        path = tmp_path / "blob"
        path.write_bytes(blob)
        cache = ChunkCache(tmp_path / "cache")
        http_source = HttpBlobSource(f"{http_server}/blob", client)
        async with ChunkFetcher(cache, max_coalesce=256 << 10) as fetcher:
            assert await fetcher.get(http_source, refs) == datas
            await fetcher.wait_idle()
            requests = len(RangeHandler.requests_seen)
            assert refs[-1].end > 256 << 10 and 2 <= requests <= 4  # coalesced, at most 256 KiB each
            with FileBlobSource(path) as file_source:
                assert await fetcher.get(file_source, refs[::-1]) == datas[::-1]  # all hits
            assert len(RangeHandler.requests_seen) == requests
            assert fetcher.stats.hits == 12
    finally:
        BLOB = saved


@pytest.mark.expected_log
async def test_fetcher_gives_fetch_error_for_http_500(http_server, client, tmp_path):
    cache = ChunkCache(tmp_path / "cache")
    source = HttpBlobSource(f"{http_server}/error", client)
    ref = ChunkRef(0, 100, 100, xxhash.xxh3_128_digest(BLOB[:100]), "none")
    async with ChunkFetcher(cache, retry=RetryPolicy(attempts=2, initial_delay=0.01)) as fetcher:
        with pytest.raises(FetchError, match="HTTP 500"):
            await fetcher.get(source, [ref])
    assert len(RangeHandler.requests_seen) == 2


async def test_fetcher_over_a_real_registry_and_an_oci_layout(registry, registry_repo, tmp_path):
    blob, refs, datas = zstd_blob(6, 32 << 10)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    async with httpx.AsyncClient(timeout=10) as http:
        store = RegistryClient(parse_reference(f"{registry.host}/{registry_repo}:v1"), http)
        await store.push_blob(blob, digest=digest)
        source = RegistryBlobSource(store, digest)
        assert source.host == registry.host and digest in source.name
        mark = registry.mark()
        async with ChunkFetcher(ChunkCache(tmp_path / "cache"), max_coalesce=64 << 10) as fetcher:
            assert await fetcher.get(source, refs[2:5]) == datas[2:5]
            await fetcher.wait_idle()
            assert await fetcher.get(source, refs) == datas
        fetched = fetcher.stats.requests
        assert 2 <= fetched < 6  # coalesced ranges, the hits not refetched
        assert len(registry.blob_requests(digest, since=mark)) == fetched

    layout = OCILayoutStore(tmp_path / "layout")
    await layout.push_blob(blob, digest=digest)
    local = RegistryBlobSource(layout, digest)
    async with ChunkFetcher(ChunkCache(tmp_path / "cache2")) as fetcher:
        assert await fetcher.get(local, refs[::2]) == datas[::2]


async def test_registry_streams_chunks_before_the_request_ends_and_resumes_a_broken_body(
        registry, registry_repo, tmp_path):
    """Over the real registry: the first chunk of a long request reaches its reader while the
    rest is still arriving; a body cut off half-way is resumed where it stopped (same request
    for the fetcher, a second ranged GET on the wire), and every chunk verifies."""
    from tests.faultproxy import Fault, FaultProxy

    chunk = 512 << 10
    datas = [os.urandom(chunk) for _ in range(64)]  # 32 MiB, stored plain: decoding is cheap
    blob = b"".join(datas)
    refs = [ChunkRef(i * chunk, chunk, chunk, xxhash.xxh3_128_digest(d), "none") for i, d in enumerate(datas)]
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with FaultProxy(registry.host) as proxy:
        async with httpx.AsyncClient(timeout=30) as http:
            await RegistryClient(parse_reference(f"{registry.host}/{registry_repo}:v1"), http).push_blob(
                blob, digest=digest)
            store = RegistryClient(parse_reference(f"{proxy.host}/{registry_repo}:v1"), http)
            pieces = []
            async for piece in store.iter_range(digest, 1000, 3 * chunk):
                pieces.append(piece)
            assert b"".join(pieces) == blob[1000:1000 + 3 * chunk] and len(pieces) > 1

            proxy.clear_requests()
            proxy.add(Fault.reset(after_bytes=20 * chunk + 123), path=r"/blobs/sha256:", ranged=True)
            source = RegistryBlobSource(store, digest)
            async with ChunkFetcher(ChunkCache(tmp_path / "cache"), max_coalesce=64 << 20, background_coalesce=64 << 20,
                                    background_window=64 << 20) as fetcher:
                fetcher.enqueue(source, refs, Priority.PREFETCH)
                assert await fetcher.get(source, refs[:1]) == datas[:1]
                assert fetcher.stats.inflight == 1  # the request is still receiving the rest
                await fetcher.wait_idle()
                assert await fetcher.get(source, refs) == datas
            assert fetcher.stats.requests == 1 and fetcher.stats.retries == 0
    ranges = [request.range for request in proxy.requests if request.range]
    assert len(ranges) == 2 and ranges[0] == f"bytes=0-{len(blob) - 1}"
    resumed_at, resumed_end = map(int, ranges[1].removeprefix("bytes=").split("-"))
    # A reset discards what the client had not read yet: it resumes where its bytes stopped.
    assert 0 < resumed_at <= 20 * chunk + 123 and resumed_end == len(blob) - 1

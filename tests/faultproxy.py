"""A fault-injecting HTTP/1.1 proxy for tests: forwards to an upstream (the test registry) and
misbehaves on request.

It runs its own threads (a ThreadingHTTPServer in a background thread), so sync tests, trio
tests and code under test in another process can all use it; every method is thread-safe.

    with FaultProxy("127.0.0.1:5000") as proxy:         # upstream host:port
        proxy.host                                       # "127.0.0.1:PORT" to point clients at
        proxy.add(Fault.reset(), method="GET", path=r"/blobs/sha256:", times=2)
        proxy.add(Fault.status(429, {"Retry-After": "3"}), path=r"/manifests/")
        ...
        proxy.requests                                   # [ProxiedRequest, ...] in arrival order
        proxy.unused_rules()                             # rules whose `times` were not all used

Faults (each applies to one request):
    Fault.reset(after_bytes=None)   TCP reset: before any answer, or after the headers and
                                    `after_bytes` bytes of the (real) body
    Fault.delay(seconds)            wait, then forward normally
    Fault.status(code, headers={}, body=b"")
                                    answer `code` without forwarding (500, 503, 429 + Retry-After...)
    Fault.truncate(keep_bytes)      forward; send the real headers (full Content-Length) but only
                                    `keep_bytes` of the body, then close the connection
    Fault.corrupt(at=0)             forward; flip every bit of body byte `at`
    Fault.ignore_range()            forward without the Range header, so the upstream answers 200
                                    with the whole blob to a ranged request
    Fault.redirect()                answer 307 to /_cdn/<same path and query> on this proxy
    Fault.stall()                   accept the request and never answer (until the proxy closes,
                                    then reset)
    Fault.drip(interval)            forward; send the headers, then the body one byte every
                                    `interval` seconds
    Fault.other_range(shift, lie=False)
                                    forward with the Range moved `shift` bytes on (back, if
                                    that one is past the blob's end): the answer is 206 for
                                    another range (with its true Content-Range, or with
                                    lie=True the Content-Range that was asked for)

The "CDN": a request whose path starts with /_cdn/ is forwarded to the upstream with the prefix
removed and without its Authorization header (like a pre-signed CDN URL). Rules can match CDN
requests by path (r"^/_cdn/") to make the CDN fail.

Rules: add(fault, method=None, path=None, ranged=None, times=1, range=None). `path` is a regex
searched in the request path (with query); `ranged` True/False matches requests with/without a
Range header; `range` is a regex searched in the Range header (only ranged requests match it);
`times=None` applies the rule to every match. Rules are tried in the order added; the
first matching rule with uses left applies.

ProxiedRequest: seq, method, path, range (the Range header or None), fault (its name or None),
status (what the proxy answered, None after a reset), body_bytes (body bytes handed to the
socket, counted before each write so that a client which has read them never sees a stale
count), time (time.monotonic() at arrival), has_authorization.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_CDN_PREFIX = "/_cdn"
_BLOCK = 64 * 1024


@dataclass(frozen=True)
class Fault:
    kind: str
    seconds: float = 0.0
    code: int = 0
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    byte_count: int | None = None

    @classmethod
    def reset(cls, after_bytes: int | None = None) -> "Fault":
        return cls("reset", byte_count=after_bytes)

    @classmethod
    def delay(cls, seconds: float) -> "Fault":
        return cls("delay", seconds=seconds)

    @classmethod
    def status(cls, code: int, headers: dict | None = None, body: bytes = b"") -> "Fault":
        return cls("status", code=code, headers=dict(headers or {}), body=body)

    @classmethod
    def truncate(cls, keep_bytes: int) -> "Fault":
        return cls("truncate", byte_count=keep_bytes)

    @classmethod
    def corrupt(cls, at: int = 0) -> "Fault":
        return cls("corrupt", byte_count=at)

    @classmethod
    def ignore_range(cls) -> "Fault":
        return cls("ignore_range")

    @classmethod
    def redirect(cls) -> "Fault":
        return cls("redirect")

    @classmethod
    def stall(cls) -> "Fault":
        return cls("stall")

    @classmethod
    def drip(cls, interval: float = 1.0) -> "Fault":
        return cls("drip", seconds=interval)

    @classmethod
    def other_range(cls, shift: int, lie: bool = False) -> "Fault":
        return cls("lie_range" if lie else "other_range", byte_count=shift)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.code}" if self.kind == "status" else self.kind


@dataclass
class Rule:
    fault: Fault
    method: str | None = None
    path: str | None = None
    ranged: bool | None = None
    times: int | None = 1
    range: str | None = None
    used: int = 0

    def matches(self, method: str, path: str, range_header: str | None) -> bool:
        if self.times is not None and self.used >= self.times:
            return False
        if self.method is not None and self.method != method:
            return False
        if self.path is not None and not re.search(self.path, path):
            return False
        if self.range is not None and (range_header is None or not re.search(self.range, range_header)):
            return False
        return self.ranged is None or self.ranged == (range_header is not None)


@dataclass
class ProxiedRequest:
    seq: int
    method: str
    path: str
    range: str | None
    fault: str | None
    time: float
    has_authorization: bool
    status: int | None = None
    body_bytes: int = 0


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._requests: list[ProxiedRequest] = []
        self._connections: set[socket.socket] = set()
        self.closing = threading.Event()  # releases stalled requests
        self._server = _QuietServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.closing.set()
        self._server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._thread.join(timeout=10)

    def add(self, fault: Fault, *, method: str | None = None, path: str | None = None,
            ranged: bool | None = None, times: int | None = 1, range: str | None = None) -> Rule:
        rule = Rule(fault, method, path, ranged, times, range)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def unused_rules(self) -> list[Rule]:
        with self._lock:
            return [r for r in self._rules if r.times is not None and r.used < r.times]

    @property
    def requests(self) -> list[ProxiedRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- used by the handler threads -----------------------------------------------------------

    def _arrive(self, method: str, path: str, range_header: str | None, authorized: bool) -> tuple[ProxiedRequest, Fault | None]:
        with self._lock:
            fault = None
            for rule in self._rules:
                if rule.matches(method, path, range_header):
                    rule.used += 1
                    fault = rule.fault
                    break
            record = ProxiedRequest(len(self._requests), method, path, range_header,
                                    fault.name if fault else None, time.monotonic(), authorized)
            self._requests.append(record)
            return record, fault

    def _track(self, connection: socket.socket, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(connection)


def _shift_range(header: str, shift: int) -> str:
    start, _, end = header.removeprefix("bytes=").partition("-")
    return f"bytes={int(start) + shift}-{int(end) + shift if end else ''}"


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """Clients that drop connections (as the code under test does on purpose) are normal."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.proxy._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._track(self.connection, False)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the request log is the record."""

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy
        body = self._read_request_body()
        record, fault = proxy._arrive(self.command, self.path, self.headers.get("Range"),
                                      "Authorization" in self.headers)
        kind = fault.kind if fault else None
        if kind == "reset" and fault.byte_count is None:
            self._reset()
            return
        if kind == "delay":
            time.sleep(fault.seconds)
        if kind == "stall":
            proxy.closing.wait()
            self._reset()
            return
        if kind == "status":
            self._answer(record, fault.code, fault.headers, fault.body)
            return
        if kind == "redirect":
            self._answer(record, 307, {"Location": f"{proxy.url}{_CDN_PREFIX}{self.path}"}, b"")
            return
        self._forward(record, body, fault)

    def _forward(self, record: ProxiedRequest, body: bytes | None, fault: Fault | None) -> None:
        proxy: FaultProxy = self.server.proxy
        path, is_cdn = self.path, self.path.startswith(_CDN_PREFIX + "/")
        if is_cdn:
            path = self.path[len(_CDN_PREFIX):]
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if is_cdn:
            headers.pop("Authorization", None)
        if fault is not None and fault.kind == "ignore_range":
            headers.pop("Range", None)
        asked_range = headers.get("Range")
        if fault is not None and fault.kind in ("other_range", "lie_range") and asked_range:
            headers["Range"] = _shift_range(asked_range, fault.byte_count)
        if body is not None:
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
            upstream.request(self.command, path, body=body, headers=headers)
            response = upstream.getresponse()
            if response.status == 416 and headers.get("Range") != asked_range:
                # Moved past the blob's end: another range of the blob is the other way.
                upstream.close()  # (not reading the 416's body: its Content-Length is the blob's)
                headers["Range"] = _shift_range(asked_range, -fault.byte_count)
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                upstream.request(self.command, path, body=body, headers=headers)
                response = upstream.getresponse()
            self._relay(record, response, fault, asked_range)
        except OSError:
            self._reset()
        finally:
            upstream.close()

    def _relay(self, record: ProxiedRequest, response: http.client.HTTPResponse, fault: Fault | None,
               asked_range: str | None) -> None:
        kind = fault.kind if fault else None
        out_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
        if kind == "lie_range" and asked_range and response.status == 206:
            start, _, end = asked_range.removeprefix("bytes=").partition("-")
            total = (response.getheader("Content-Range") or "/*").rpartition("/")[2]
            out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-range"]
            out_headers.append(("Content-Range", f"bytes {start}-{end}/{total}"))
        length = response.getheader("Content-Length")
        prebuffered = None
        if length is None and self.command != "HEAD":
            prebuffered = response.read()
            out_headers.append(("Content-Length", str(len(prebuffered))))
        record.status = response.status
        self.send_response_only(response.status)
        for k, v in out_headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        limit = fault.byte_count if kind in ("truncate", "reset") else None
        sent = 0
        while True:
            block = prebuffered if prebuffered is not None else response.read(_BLOCK)
            prebuffered = b"" if prebuffered is not None else None
            if not block:
                break
            if kind == "drip":
                for i in range(len(block)):
                    record.body_bytes = sent + i + 1
                    self.wfile.write(block[i:i + 1])
                    self.wfile.flush()
                    if self.server.proxy.closing.wait(fault.seconds):
                        self._reset()
                        return
                sent += len(block)
                continue
            if kind == "corrupt" and sent <= fault.byte_count < sent + len(block):
                i = fault.byte_count - sent
                block = block[:i] + bytes([block[i] ^ 0xFF]) + block[i + 1:]
            if limit is not None and sent + len(block) >= limit:
                record.body_bytes = limit
                self.wfile.write(block[:limit - sent])
                if kind == "reset":
                    self._reset()
                else:
                    self.close_connection = True
                return
            sent += len(block)
            record.body_bytes = sent
            self.wfile.write(block)
        if limit is not None:
            self.close_connection = True

    def _answer(self, record: ProxiedRequest, status: int, headers: dict, body: bytes) -> None:
        record.status = status
        self.send_response_only(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            record.body_bytes = len(body)
            self.wfile.write(body)

    def _read_request_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length is not None else None

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0 then close)."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.server.proxy._track(self.connection, False)
            socket.close(self.connection.detach())
        except OSError:
            pass

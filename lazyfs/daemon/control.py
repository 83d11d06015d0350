"""The daemon's control protocol, client side (blocking sockets; no trio, no pyfuse3).

Transport: a unix stream socket (mode 0600). Each request is one line of JSON, an object
with ``"op"`` and the operation's arguments; each answer is one line of JSON, either
``{"ok": true, ...results}`` or ``{"ok": false, "error": "<message>", "type": "<kind>"}``.
A connection may carry any number of request/answer pairs, strictly in turn.
docs/parts/daemon.md lists the operations.

The snapshotter and the ``lazyfs`` commands use :class:`ControlClient`.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

MAX_LINE = 1 << 20
# A daemon handing over to its successor (hot upgrade) answers requests that would change what
# it serves with the error type "upgrading": they are sent again, on a new connection (which
# reaches the successor once it owns the socket), for at most the client's timeout.
UPGRADING = "upgrading"
UPGRADING_RETRY = 0.05


class ControlError(Exception):
    """The daemon refused a request or could not be reached."""

    def __init__(self, message: str, *, kind: str = "error"):
        super().__init__(message)
        self.kind = kind


class ControlClient:
    def __init__(self, path: str, timeout: float | None = 120.0):
        self.path = str(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except OSError as e:
                sock.close()
                raise ControlError(f"cannot connect to the daemon at {self.path}: {e}", kind="unreachable") from e
            self._sock = sock
        return self._sock

    def request(self, op: str, /, **args: Any) -> dict:
        """Send one request; return the answer's fields, or raise ControlError."""
        deadline = time.monotonic() + (self.timeout if self.timeout is not None else 600.0)
        while True:
            try:
                return self._request_once(op, args)
            except ControlError as e:
                if e.kind != UPGRADING or time.monotonic() > deadline:
                    raise
            self.close()
            time.sleep(UPGRADING_RETRY)

    def _request_once(self, op: str, args: dict) -> dict:
        sock = self._connect()
        line = json.dumps({"op": op, **args}).encode() + b"\n"
        try:
            sock.sendall(line)
            answer = self._read_line(sock)
        except OSError as e:
            self.close()
            raise ControlError(f"daemon connection failed during {op!r}: {e}", kind="unreachable") from e
        try:
            reply = json.loads(answer)
        except ValueError as e:
            raise ControlError(f"daemon sent an invalid answer to {op!r}: {answer[:200]!r}") from e
        if not isinstance(reply, dict) or "ok" not in reply:
            raise ControlError(f"daemon sent an invalid answer to {op!r}: {reply!r}")
        if not reply["ok"]:
            raise ControlError(str(reply.get("error", "unknown error")), kind=str(reply.get("type", "error")))
        reply.pop("ok")
        return reply

    def _read_line(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                raise ControlError("daemon answer too long")
            block = sock.recv(65536)
            if not block:
                raise ConnectionResetError("daemon closed the connection")
            self._buffer += block
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


def request(socket_path: str, op: str, /, timeout: float | None = 120.0, **args: Any) -> dict:
    """One request on a fresh connection."""
    with ControlClient(socket_path, timeout=timeout) as client:
        return client.request(op, **args)

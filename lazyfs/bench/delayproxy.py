"""A TCP proxy that adds a fixed one-way delay to each direction (netem's delay, in user space).

Every chunk of bytes is forwarded ``delay`` seconds after it *arrived*, not after the
previous chunk was sent, so the stream keeps its order and its pipelining: a connection
carrying a steady flow sees the same throughput and a round trip ``2 * delay`` longer.
Each direction of each connection has a reader task that timestamps chunks into a queue
and a writer task that releases them on time. The queue is bounded in bytes (well above
the bandwidth-delay product of the links we emulate), so a slow receiver still pushes back
on the sender through TCP flow control.

Run as ``python -m lazyfs.bench.delayproxy --upstream HOST:PORT --delay-ms 10`` (prints
``listening 127.0.0.1:PORT``), or in-process with ``DelayProxy``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
QUEUE_BYTES = 16 * 1024 * 1024
_EOF = b""


@dataclass
class ProxyStats:
    connections: int = 0
    bytes_up: int = 0     # client -> upstream
    bytes_down: int = 0   # upstream -> client


class _DelayedPipe:
    """One direction of one connection: reader stamps chunks, writer releases them late."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 delay: float, count) -> None:
        self._reader = reader
        self._writer = writer
        self._delay = delay
        self._count = count
        self._queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._queued_bytes = 0
        self._room = asyncio.Event()
        self._room.set()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._room.wait()
                data = await self._reader.read(CHUNK)
                self._queue.put_nowait((loop.time(), data))
                if not data:
                    return
                self._queued_bytes += len(data)
                if self._queued_bytes >= QUEUE_BYTES:
                    self._room.clear()
        except (ConnectionError, OSError):
            self._queue.put_nowait((loop.time(), _EOF))

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            arrived, data = await self._queue.get()
            wait = arrived + self._delay - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return
            self._writer.write(data)
            await self._writer.drain()
            self._count(len(data))
            self._queued_bytes -= len(data)
            if self._queued_bytes < QUEUE_BYTES:
                self._room.set()

    async def run(self) -> None:
        reader = asyncio.ensure_future(self._read())
        try:
            await self._write()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


class DelayProxyServer:
    """The asyncio server; ``serve_forever`` it, or use DelayProxy for a background thread."""

    def __init__(self, upstream: tuple[str, int], delay: float,
                 listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.upstream = upstream
        self.delay = delay
        self.listen = listen
        self.stats = ProxyStats()
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, *self.listen, backlog=1024)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def _count_up(self, n: int) -> None:
        self.stats.bytes_up += n

    def _count_down(self, n: int) -> None:
        self.stats.bytes_down += n

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.stats.connections += 1
        upstream_writer = None
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            except OSError as e:
                log.info("delay proxy: upstream %s:%d unreachable: %s", *self.upstream, e)
                return
            up = _DelayedPipe(client_reader, upstream_writer, self.delay, self._count_up)
            down = _DelayedPipe(upstream_reader, client_writer, self.delay, self._count_down)
            pipes = [asyncio.ensure_future(up.run()), asyncio.ensure_future(down.run())]
            try:
                await asyncio.gather(*pipes)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except (ConnectionError, OSError):
            pass  # a reset on either side ends the connection, as it would without us
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()
            self._connections.discard(task)


class DelayProxy:
    """A DelayProxyServer on its own event loop in a background thread (a context manager)."""

    def __init__(self, upstream: tuple[str, int], delay: float,
                 listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.server = DelayProxyServer(upstream, delay, listen)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy",
                                        daemon=True)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def start(self) -> DelayProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _serve(args: argparse.Namespace) -> None:
    server = DelayProxyServer(_parse_hostport(args.upstream), args.delay_ms / 1000,
                              _parse_hostport(args.listen))
    await server.start()
    print(f"listening {server.listen[0]}:{server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    started = time.monotonic()
    await server.close()
    log.info("delay proxy stopped in %.2f s: %s", time.monotonic() - started, server.stats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lazyfs.bench.delayproxy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True,
                        help="one-way delay added to each direction (RTT grows by twice this)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default: a free port)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

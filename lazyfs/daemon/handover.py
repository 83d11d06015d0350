"""Hot upgrade, daemon side: a new daemon takes over the layers, stacked mounts and control
socket of a running one in kernel serving mode, and not one read fails.

The new daemon is started with ``--take-over`` and the running daemon's ``--socket``, but its
own ``--fuse-dir`` (one FUSE mount per process). It binds its control socket at a private name
beside the old one and holds one connection to the old daemon for the whole handover::

    new -> old  {"op": "handover-begin", "pid": N}
    old -> new  {"ok": true, "pid", "serve", "layers": [attach requests], "roots": {name: root},
                 "stacked": [mount points], "image_mounts": {mount point: [names]}}
                The old daemon is frozen: requests that would change what it serves (attach,
                detach, image mounts, traces, shutdown) get {"ok": false, "type": "upgrading"};
                the control client retries them, and they reach the new daemon once it owns the
                socket. Reads go on as before.
    new         attaches every layer (one at a time, in name order) under the same name and
                root: each root is an EROFS mount already, so it takes the mount over --
                LOOP_CHANGE_FD points the layer's chunk loop at the new daemon's chunk-device
                file; the kernel drains the reads in flight on the old file first, and the old
                daemon still answers them
    new -> old  {"op": "handover-commit"}
    old         forgets its mounts without unmounting them and answers
    new         renames its socket onto the old one's path (clients connecting from then on
                reach the new daemon) and closes the connection
    old         exits (its FUSE mount, which no loop reads any more, goes with it)

If anything fails before the commit, the new daemon sends ``handover-abort`` (or just closes
the connection, or dies; or the old daemon gives up waiting for the commit): the old daemon
points every loop back at its own files and serves on, unfrozen. The new daemon, which still
serves its files until that answer, then exits.

Layers served by the FUSE tree (``--serve fuse``, or kernel-mode layers that fell back) cannot
be handed over: overlays hold the old daemon's FUSE mount itself, which dies with it. The old
daemon refuses ``handover-begin`` listing them, and nothing changes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from lazyfs.daemon.control import MAX_LINE
from lazyfs.serve import kernel

if TYPE_CHECKING:
    from lazyfs.daemon.server import Daemon

log = logging.getLogger(__name__)

# Requests that change what a daemon serves: a frozen daemon refuses them ("upgrading").
CHANGING_OPS = frozenset({"attach", "detach", "mount-image", "unmount-image", "trace-start", "trace-stop",
                          "shutdown"})
# How long the old daemon stays frozen waiting for the commit (the new daemon attaches every
# layer meanwhile: metadata from the cache, one ioctl each) before it takes its loops back.
HANDOVER_BOUND = 600.0
CHANGES_POLL = 0.01
# Attach request fields that belong to one container start, not to the layer.
NOT_HANDED_OVER = ("record_trace", "push_credentials")


class HandoverError(Exception):
    """The takeover cannot go on; the message says why (for the user who asked for it)."""


def layer_identity(info: dict) -> str:
    """What a daemon must attach under a layer's name to take its EROFS mount over (the
    blob digest; meta and blob of a plain image)."""
    return info.get("digest") or f"{info.get('meta')}|{info.get('blob')}"


class LineReader:
    """Newline-delimited requests from one control connection."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buffer = b""

    async def next(self) -> bytes | None:
        """The next non-empty line; None at the end of the stream. ValueError if too long."""
        while True:
            while b"\n" not in self.buffer:
                if len(self.buffer) > MAX_LINE:
                    raise ValueError("request line too long")
                try:
                    block = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                if not block:
                    return None
                self.buffer += block
            line, _, self.buffer = self.buffer.partition(b"\n")
            if line.strip():
                return line


async def send(stream: trio.SocketStream, reply: dict) -> None:
    await stream.send_all(json.dumps(reply).encode() + b"\n")


# ---------------------------------------------------------------------- the old daemon


def refusal(daemon: Daemon) -> str | None:
    """Why this daemon cannot hand its layers over, or None."""
    tree = sorted(layer.name for layer in daemon.fs.layers() if layer.info.get("serve") != "kernel")
    if not tree:
        return None
    shown = ", ".join(tree[:10]) + (f" and {len(tree) - 10} more" if len(tree) > 10 else "")
    return (f"cannot hand over: {len(tree)} layer(s) are served by the FUSE tree, which a new daemon cannot take "
            f"over (the mounts above them hold this daemon's FUSE mount): {shown}; detach them first")


async def hand_over(daemon: Daemon, stream: trio.SocketStream, lines: LineReader, request: dict) -> bool:
    """Answer ``handover-begin`` on this connection and see the handover through. True when
    the daemon has handed everything over and is stopping (the connection is then done)."""
    if daemon.handing_over:
        await send(stream, {"ok": False, "error": "a handover is already under way", "type": "refused"})
        return False
    daemon.handing_over = True
    # An attach or detach that began before the freeze ends first: what we hand over is then
    # all there is (each is bounded by the read and request timeouts).
    while daemon.changes_in_flight:
        await trio.sleep(CHANGES_POLL)
    why = refusal(daemon)
    if why is not None:
        daemon.handing_over = False
        await send(stream, {"ok": False, "error": why, "type": "refused"})
        return False
    committed = aborted = False
    try:
        layers = [daemon.fs.layer(name) for name in daemon.layer_mounts]
        await send(stream, {
            "ok": True, "pid": os.getpid(), "serve": daemon.options.serve,
            "layers": [{k: v for k, v in daemon.attach_requests[layer.name].items() if k not in NOT_HANDED_OVER}
                       for layer in layers],
            "roots": {name: str(root) for name, root in daemon.layer_mounts.items()},
            "stacked": [str(path) for path in daemon.stacked],
            "image_mounts": daemon.image_mounts})
        log.info("handing over to the daemon with pid %s", request.get("pid"))
        with trio.move_on_after(HANDOVER_BOUND):
            line = await lines.next()
            op = json.loads(line).get("op") if line is not None else None
            if op == "handover-commit":
                daemon.forget_mounts()
                committed = True
                await send(stream, {"ok": True})
                log.info("handed over to the daemon with pid %s", request.get("pid"))
            aborted = op == "handover-abort"
        if committed:
            # Serve on (frozen) until the successor, which now renames its socket onto ours,
            # closes the connection: a client connecting meanwhile still gets an answer.
            with trio.move_on_after(HANDOVER_BOUND):
                await lines.next()
            log.info("stopping: the daemon with pid %s serves in our place", request.get("pid"))
            return True
    except (ValueError, AttributeError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # a broken conversation is an abort
    finally:
        if not committed:
            with trio.CancelScope(shield=True):
                await reclaim(daemon)
                daemon.handing_over = False
    log.warning("handover abandoned: serving on")
    if aborted:
        try:
            await send(stream, {"ok": True})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    return False


async def reclaim(daemon: Daemon) -> None:
    """Point every layer's chunk loop that the new daemon took back at this daemon's own
    chunk-device file."""
    for name in list(daemon.layer_mounts):
        loop = daemon.fs.layer(name).info.get("loop")
        if loop is None or kernel.loop_backing_file(loop) == str(daemon.options.fuse_dir / name):
            continue  # not a loop-served layer, or never taken: no swap needed
        try:
            await trio.to_thread.run_sync(kernel.change_backing_file, loop, daemon.options.fuse_dir / name)
        except kernel.KernelServeError as e:
            log.error("layer %s: cannot take its loop device back: %s", name, e)
        else:
            log.info("layer %s: %s reads %s again", name, loop, daemon.options.fuse_dir / name)


# ---------------------------------------------------------------------- the new daemon


class _Old:
    """The connection to the daemon being taken over."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.lines = LineReader(stream)

    async def ask(self, op: str, **args: Any) -> dict:
        await send(self.stream, {"op": op, **args})
        line = await self.lines.next()
        if line is None:
            raise HandoverError(f"the running daemon closed the connection during {op}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise HandoverError(str(reply.get("error")))
        return reply


async def take_over(daemon: Daemon, publish_socket) -> dict:
    """Take over the daemon serving ``daemon.options.socket_path``; ``publish_socket()`` moves
    this daemon's control socket onto that path. Returns what the old daemon handed over
    (its pid among it). HandoverError when the takeover is impossible (nothing changed)."""
    path = daemon.options.socket_path
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError as e:
        raise HandoverError(f"no daemon to take over at {path}: {e.strerror or e}") from e
    async with stream:  # closing it after the commit lets the old daemon exit
        old = _Old(stream)
        state = await old.ask("handover-begin", pid=os.getpid())
        try:
            _check_compatible(daemon, state)
            daemon.taking_over = True
            # One at a time, in name order: a failure stops the takeover at a known point.
            for request in sorted(state["layers"], key=lambda r: r["name"]):
                await daemon.attach(request)
            daemon.stacked = [Path(p) for p in state["stacked"]]
            daemon.image_mounts = {mountpoint: list(names) for mountpoint, names in state["image_mounts"].items()}
            # Once answered, the old daemon has let go of everything. (One that gave up waiting
            # has taken its loops back and closed the connection: the ask fails, and the
            # takeover is abandoned below.)
            await old.ask("handover-commit")
        except BaseException as e:
            with trio.CancelScope(shield=True):
                daemon.forget_mounts()  # they are the old daemon's again, not ours to unmount
                try:  # answered once every loop reads the old daemon's files again
                    await old.ask("handover-abort")
                except (HandoverError, OSError, ValueError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # it takes its loops back when the connection closes
                for name in [layer.name for layer in daemon.fs.layers()]:  # only then are our files unused
                    await daemon.detach({"name": name})
            if isinstance(e, HandoverError):
                raise
            if isinstance(e, Exception):
                raise HandoverError(f"taking over failed: {_messages(e)}") from e
            raise
        finally:
            daemon.taking_over = False
        publish_socket()
    log.info("took over %d layer(s) from the daemon with pid %s", len(state["layers"]), state["pid"])
    return state


def _check_compatible(daemon: Daemon, state: dict) -> None:
    if state.get("serve") != daemon.options.serve:
        raise HandoverError(f"the running daemon serves in {state.get('serve')} mode, this one in "
                            f"{daemon.options.serve} mode: a takeover needs the same mode")
    for name, root in state["roots"].items():
        if str(daemon.options.layer_root(name)) != root:
            raise HandoverError(f"layer {name} is mounted at {root}, this daemon would serve it at "
                                f"{daemon.options.layer_root(name)}: start it with the same --layers-dir")


def _messages(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_messages(inner) for inner in exc.exceptions)
    return str(exc)

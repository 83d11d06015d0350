"""`lazyfs trace`: record which chunks a workload reads first, on a running mount."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lazyfs.control import ControlError, request
from lazyfs.mountstate import DEFAULT_RUN_DIR, MountState

NAME = "trace"
HELP = "start or stop recording an access trace on a lazyfs mount"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("mountpoint", help="the directory given to `lazyfs mount`")
    parser.add_argument("-o", "--output", type=Path, help="stop: write the trace here")
    parser.add_argument("--socket", type=Path, default=None, help="talk to this control socket instead")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="where per-mount state lives")


def run(args: argparse.Namespace) -> int:
    socket = args.socket or MountState.for_mountpoint(args.mountpoint, args.run_dir).socket
    try:
        if args.action == "start":
            request(str(socket), "trace-start")
            return 0
        if args.output is None:
            print("lazyfs trace stop: give -o FILE", file=sys.stderr)
            return 2
        reply = request(str(socket), "trace-stop", path=os.path.abspath(args.output))
    except ControlError as e:
        print(f"lazyfs trace: {e}", file=sys.stderr)
        return 1
    print(f"{reply['records']} records over {len(reply['layers'])} layer(s) written to {args.output}")
    return 0

"""`lazyfs demo`: the whole pipeline on an embedded sample image, with no external registry.

It builds an ordinary two-layer gzip image into a local OCI layout, converts it with
`lazyfs convert`, shows it with `lazyfs inspect`, mounts it lazily with `lazyfs mount`, reads
part of it and checks every byte against the source, shows what was fetched with
`lazyfs stats`, and unmounts. Each step runs the real command, as a user would.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import trio

from lazyfs.registry import open_store

NAME = "demo"
HELP = "run convert, inspect, a lazy mount and stats on an embedded sample image (no registry needed)"

_BIG_FILE = "opt/data/model.bin"
_BIG_SIZE = 48 << 20
_DELETED = "etc/obsolete.conf"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", help="work directory (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")


def run(args: argparse.Namespace) -> int:
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="lazyfs-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _demo(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _lazyfs(*argv: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "lazyfs.cli", *argv]
    print("$ lazyfs " + " ".join(argv), flush=True)
    p = subprocess.run(cmd, text=True, capture_output=capture)
    if p.returncode != 0:
        raise SystemExit(f"lazyfs {argv[0]} failed ({p.returncode}){': ' + p.stderr if capture else ''}")
    return p.stdout if capture else ""


def _demo(work: Path) -> int:
    source_dir = work / "source"
    _step("building an ordinary two-layer gzip image from embedded sample content")
    files = _sample_files()
    trio.run(_write_source_image, source_dir, files)
    total = sum(len(d) for d in files.values())
    print(f"source image: {len(files)} files, {total / 2**20:.1f} MiB, in oci:{source_dir}:demo")

    _step("converting it to lazyfs layers")
    lazy_ref = f"oci:{work / 'lazy'}:demo"
    _lazyfs("convert", "-q", f"oci:{source_dir}:demo", lazy_ref)
    _lazyfs("inspect", lazy_ref)

    _step("mounting it lazily and reading part of it")
    mnt = work / "mnt"
    mnt.mkdir()
    cache = work / "cache"
    _lazyfs("mount", "--cache-dir", str(cache), lazy_ref, str(mnt))
    try:
        # The workload: every small file and the first MiB of the large one, as a start would.
        read = 0
        for path, data in sorted(files.items()):
            if path == _DELETED:
                continue
            with open(mnt / path, "rb") as f:
                got = f.read(1 << 20) if path == _BIG_FILE else f.read()
            want = data[: len(got)] if path == _BIG_FILE else data
            if got != want:
                raise SystemExit(f"content of {path} differs from the source image")
            read += len(got)
        if (mnt / _DELETED).exists():
            raise SystemExit(f"{_DELETED} was deleted by the upper layer but is visible")
        print(f"read {read / 2**20:.1f} MiB from {len(files) - 1} files: every byte matches the source;")
        print(f"{_DELETED} (removed by the upper layer) is hidden, as in the unpacked image")
        stats = json.loads(_lazyfs("stats", "--json", str(mnt), capture=True))
        fetched = _fetched_bytes(stats)
        print(f"fetched {fetched / 2**20:.1f} MiB of {total / 2**20:.1f} MiB of file content"
              " (chunks are compressed; the rest of the image was never downloaded)")
        _lazyfs("stats", str(mnt))
    finally:
        _lazyfs("umount", str(mnt))
    print("\ndemo finished: convert, inspect, lazy mount, verified reads, stats, umount")
    return 0


def _fetched_bytes(stats: dict) -> int:
    fetch = stats.get("stats", stats).get("fetch", stats.get("fetch", {}))
    return int(fetch.get("bytes_fetched", 0))


def _sample_files() -> dict[str, bytes]:
    """Deterministic sample content: lazyfs's own sources as small files, plus one large file."""
    package = Path(__file__).resolve().parent.parent
    files: dict[str, bytes] = {}
    for src in sorted(package.rglob("*.py")):
        files["usr/lib/lazyfs/" + src.relative_to(package).as_posix()] = src.read_bytes()
    files["etc/app.conf"] = b"mode = demo\n"
    files[_DELETED] = b"this file is removed by the second layer\n"
    # Poorly compressible data, like a model or a packed asset.
    rng = random.Random(7)
    files[_BIG_FILE] = rng.randbytes(_BIG_SIZE)
    return files


def _tar_layer(entries: list[tuple[str, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for path, data in entries:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                    tar.addfile(info)
            info = tarfile.TarInfo(path)
            info.mode, info.mtime = 0o644, 1_700_000_000
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data or b""))
    return raw.getvalue()


async def _write_source_image(layout: Path, files: dict[str, bytes]) -> None:
    lower = [(p, d) for p, d in sorted(files.items())]
    upper_name = _DELETED.rsplit("/", 1)
    upper = [(f"{upper_name[0]}/.wh.{upper_name[1]}", b"")]
    tars = [_tar_layer(lower), _tar_layer(upper)]
    async with open_store(f"oci:{layout}:demo") as store:
        layers = []
        for tar in tars:
            blob = gzip.compress(tar, compresslevel=6, mtime=0)
            desc = await store.push_blob(blob, media_type="application/vnd.oci.image.layer.v1.tar+gzip")
            layers.append({"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size})
        config = {
            "architecture": _host_arch(), "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers",
                       "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]},
        }
        config_blob = json.dumps(config, sort_keys=True).encode()
        cdesc = await store.push_blob(config_blob, media_type="application/vnd.oci.image.config.v1+json")
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": cdesc.media_type, "digest": cdesc.digest, "size": cdesc.size},
            "layers": layers,
        }
        await store.push_manifest(json.dumps(manifest).encode(),
                                  "application/vnd.oci.image.manifest.v1+json", tag="demo")


def _host_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)

"""`lazyfs convert` on hostile layers, as a user runs it: one clear line and a non-zero exit for
every refused layer (never a traceback, never wrapped), memory bounded, and SIGINT/SIGTERM stop
a conversion and leave no staging file behind."""

from __future__ import annotations

import gzip
import os
import resource
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests import hostile_tars as h
from tests.fixtures.images import build_image
from tests.fixtures.lazyimage import push_to_store

REFUSED = [c for c in h.cases() if c.tree is None]
MEMORY_LIMIT = 1 << 30  # address space for the hostile conversions (a 1 GiB PAX record included)


def convert_cli(src: str, dst: str, *args: str, env: dict | None = None, limit_memory: bool = False,
                timeout: float = 300) -> subprocess.CompletedProcess:
    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run([sys.executable, "-m", "lazyfs.cli", "convert", "-q", *args, src, dst],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=limits if limit_memory else None)


def oci_image(tmp_path: Path, name: str, tar_or_blob: bytes, compression: str = "gzip") -> str:
    ref = f"oci:{tmp_path / name}:v1"
    push_to_store(ref, build_image([tar_or_blob], compression=compression))
    return ref


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazyfs convert: "), result.stderr
    assert "Traceback" not in result.stderr and expected in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("ordered", [False, True], ids=["stream", "trace-ordered"])
def test_every_refused_case_is_one_line(tmp_path, ordered):
    trace = tmp_path / "trace"
    if ordered:
        from tests.t1_tar_hostile import trace_bytes

        trace.write_bytes(trace_bytes(["/a"]))
    for case in REFUSED:
        src = oci_image(tmp_path, case.name, case.tar)
        args = ("--trace", str(trace)) if ordered else ()
        result = convert_cli(src, f"oci:{tmp_path / ('out-' + case.name)}:v1", *args, limit_memory=True)
        assert_one_line_error(result, case.refusal)
        # A long message stays on one line off a terminal (rich used to wrap it at 80 columns).
        assert len(result.stderr.strip()) > 80


def _gzip_stream(pieces) -> bytes:
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    return b"".join(compressor.compress(p) for p in pieces) + compressor.flush()


@pytest.mark.parametrize("ordered", [False, True], ids=["stream", "trace-ordered"])
def test_big_hostile_layers_bounded(tmp_path, ordered):
    """The issue's layers, full size, under a 1 GiB address-space limit: a PAX record with a
    1 GiB body (was 3.24 GB peak), a PAX header of digits (was quadratic), 30,000 components
    (was 1.1 GB), a size of -512 and a PAX size of 2**62 (looped or raised MemoryError)."""
    giant = _gzip_stream([h.header(b"PaxHeader", type=b"x", size=1 << 30)]
                         + [b"y" * (1 << 20)] * 1024 + [h.reg(b"a", b"x"), h.END])
    layers = {
        "pax-1GiB": (giant, "header field too long"),
        "pax-digits": (gzip.compress(h.pax(b"9" * (h.MAX_SPECIAL - 1)) + h.reg(b"a", b"x") + h.END),
                       "PAX record"),
        "deep-path": (gzip.compress(h.pax([(b"path", b"a/" * 30000 + b"f")]) + h.reg(b"s", b"x") + h.END),
                      "file name too long"),
        "size-minus-512": (gzip.compress(h.header(b"a", size_field=h.base256(-512, 12)) + h.END), "negative size"),
        "pax-size-2^62": (gzip.compress(h.pax([(b"size", str(1 << 62).encode())]) + h.reg(b"a", b"x") + h.END),
                          "truncated"),
    }
    args: tuple[str, ...] = ()
    if ordered:
        from tests.t1_tar_hostile import trace_bytes

        (tmp_path / "trace").write_bytes(trace_bytes(["/a"]))
        args = ("--trace", str(tmp_path / "trace"))
    for name, (blob, expected) in layers.items():
        src = f"oci:{tmp_path / name}:v1"
        image = build_image([b""], compression="none")
        push_to_store(src, _with_layer_blob(image, blob))
        result = convert_cli(src, f"oci:{tmp_path / ('out-' + name)}:v1", *args, limit_memory=True)
        assert_one_line_error(result, expected)


def _with_layer_blob(image, blob: bytes):
    """image with its single layer replaced by an already compressed gzip blob."""
    import dataclasses
    import hashlib
    import json

    from lazyfs.registry.manifest import OCI_LAYER_GZIP, Descriptor, sha256_digest

    tar = zlib.decompressobj(31)
    diff_id = hashlib.sha256()
    for i in range(0, len(blob), 1 << 20):
        diff_id.update(tar.decompress(blob[i:i + (1 << 20)], 0))
    diff_id.update(tar.flush())
    layer = dataclasses.replace(image.layers[0], tar=b"", blob=blob,
                                descriptor=Descriptor(OCI_LAYER_GZIP, sha256_digest(blob), len(blob)),
                                diff_id="sha256:" + diff_id.hexdigest())
    config = json.loads(image.config)
    config["rootfs"]["diff_ids"] = [layer.diff_id]
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_desc = Descriptor(image.config_descriptor.media_type, sha256_digest(config_bytes), len(config_bytes))
    manifest = json.loads(image.manifest)
    manifest["config"] = config_desc.to_json()
    manifest["layers"] = [layer.descriptor.to_json()]
    return dataclasses.replace(image, manifest=json.dumps(manifest).encode(), config=config_bytes,
                               config_descriptor=config_desc, layers=[layer])


# -- signals ----------------------------------------------------------------------------------------

def _slow_image(tmp_path: Path) -> str:
    """An uncompressed layer of 256 MiB of distinct chunks: several seconds of work on one thread."""
    data = os.urandom(256 << 20)
    tar = h.reg(b"big", data) + h.END
    return oci_image(tmp_path, "slow", tar, compression="none")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("ordered", [False, True], ids=["stream", "trace-ordered"])
def test_signal_stops_conversion_and_removes_staging(tmp_path, signum, ordered):
    src = _slow_image(tmp_path)
    staging_parent = tmp_path / "tmp"
    staging_parent.mkdir()
    env = dict(os.environ, TMPDIR=str(staging_parent))
    args = ["--threads", "1"]
    if ordered:
        from tests.t1_tar_hostile import trace_bytes

        (tmp_path / "trace").write_bytes(trace_bytes(["/big"]))
        args += ["--trace", str(tmp_path / "trace")]
    process = subprocess.Popen([sys.executable, "-m", "lazyfs.cli", "convert", "-q", *args, src,
                                f"oci:{tmp_path / 'out'}:v1"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        # Wait until the build is under way: its output file in the staging directory grows.
        deadline = time.monotonic() + 120
        while not any(p.name.startswith("new-") and p.stat().st_size > 0
                      for p in staging_parent.glob("lazyfs-convert-*/*")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signum, err
    assert err.strip() == f"lazyfs convert: interrupted by {signum.name}", err
    assert list(staging_parent.iterdir()) == []
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("index.json"))

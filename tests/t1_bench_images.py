"""Benchmark images: the .pyc check, layer diffs, and a tiny recipe end to end.

The tiny recipe (busybox-static + a byte-compiled copy of the json package) goes through
the same code path as the Debian images: stages, layer diff, packing, .pyc check, OCI
layout. Python itself is the oracle for .pyc validity (``python -v`` says "bytecode is
stale" when it would recompile).
"""

import io
import json
import os
import py_compile
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lazyfs.bench.errors import StalePycError
from lazyfs.bench.images import build_image
from lazyfs.bench.ocilayout import layer_entries, write_layer
from lazyfs.bench.pyccheck import check_layers, verify_layers
from lazyfs.bench.recipes import busybox_python_recipe, image_key
from lazyfs.bench.rootfs import debian_mirror, truncate_mtimes
from tests.fixtures.common import require_tool, run

FRACTIONAL_MTIME_NS = 1_700_000_000_700_000_000  # x.7 s: truncates to x, rounds to x+1
SOURCE = "def answer():\n    return 42\n"


def _compiled_module(tmp_path: Path, mode=py_compile.PycInvalidationMode.TIMESTAMP) -> Path:
    """A rootfs dir holding mod.py (mtime x.7 s) and its .pyc compiled by this Python."""
    root = tmp_path / "root"
    (root / "app").mkdir(parents=True)
    source = root / "app" / "mod.py"
    source.write_text(SOURCE)
    os.utime(source, ns=(FRACTIONAL_MTIME_NS, FRACTIONAL_MTIME_NS))
    py_compile.compile(str(source), cfile=str(_pyc_path(source)), invalidation_mode=mode,
                       doraise=True)
    return root


def _pyc_path(source: Path) -> Path:
    tag = sys.implementation.cache_tag
    return source.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"


def _tar_rootfs(root: Path, dest: Path, *, mtime_rule) -> Path:
    """Tar the rootfs as a tar writer with the given mtime rule would (round or truncate)."""
    with tarfile.open(dest, "w:gz") as tar:
        for path in sorted(root.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.mtime = mtime_rule(os.lstat(path).st_mtime_ns / 1e9)
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return dest


def _tar_members(dest: Path, members: dict[str, bytes | str | None]) -> Path:
    """A layer from {name: file bytes | symlink target (str) | None for a directory}."""
    with tarfile.open(dest, "w:gz") as tar:
        for name, value in members.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if value is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(value, str):
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return dest


# --- the .pyc check --------------------------------------------------------------------

def test_truncated_mtimes_pass_the_pyc_check(tmp_path):
    root = _compiled_module(tmp_path)
    layer = _tar_rootfs(root, tmp_path / "layer.tar.gz", mtime_rule=int)
    report = verify_layers([layer])
    assert report.checked == 1 and report.ok and report.uncompiled == 0


def test_pyc_check_catches_a_rounded_mtime(tmp_path):
    root = _compiled_module(tmp_path)
    layer = _tar_rootfs(root, tmp_path / "layer.tar.gz", mtime_rule=round)
    report = check_layers([layer])
    assert report.checked == 1 and not report.ok
    (mismatch,) = report.mismatches
    assert mismatch.pyc.endswith(f"app/__pycache__/mod.{sys.implementation.cache_tag}.pyc")
    assert mismatch.source == "app/mod.py"
    assert (mismatch.pyc_mtime, mismatch.tar_mtime) == (1_700_000_000, 1_700_000_001)
    assert mismatch.pyc_size == mismatch.tar_size == len(SOURCE)
    with pytest.raises(StalePycError, match="mod.py"):
        verify_layers([layer])


def test_pyc_check_catches_a_changed_size(tmp_path):
    root = _compiled_module(tmp_path)
    (root / "app" / "mod.py").write_text(SOURCE + "# edited\n")
    os.utime(root / "app" / "mod.py", ns=(FRACTIONAL_MTIME_NS, FRACTIONAL_MTIME_NS))
    report = check_layers([_tar_rootfs(root, tmp_path / "layer.tar.gz", mtime_rule=int)])
    assert [m.tar_size - m.pyc_size for m in report.mismatches] == [len("# edited\n")]


def test_hash_based_pyc_is_not_a_mismatch(tmp_path):
    root = _compiled_module(tmp_path, py_compile.PycInvalidationMode.CHECKED_HASH)
    report = check_layers([_tar_rootfs(root, tmp_path / "layer.tar.gz", mtime_rule=round)])
    assert (report.hash_based, report.checked, report.ok) == (1, 0, True)


def test_pyc_check_reads_layers_as_an_unpacker(tmp_path):
    """Upper layers replace, white out and symlink sources of .pyc files in lower layers."""
    root = _compiled_module(tmp_path)
    lower = _tar_rootfs(root, tmp_path / "lower.tar.gz", mtime_rule=int)
    assert check_layers([lower]).ok

    replaced = _tar_members(tmp_path / "replaced.tar.gz", {"app/mod.py": b"x = 1\n"})
    assert len(check_layers([lower, replaced]).mismatches) == 1

    whiteout = _tar_members(tmp_path / "whiteout.tar.gz", {"app/.wh.mod.py": b""})
    report = check_layers([lower, whiteout])
    assert (report.sourceless, report.checked) == (1, 0)

    opaque = _tar_members(tmp_path / "opaque.tar.gz", {"app/.wh..wh..opq": b""})
    report = check_layers([lower, opaque])
    assert (report.sourceless, report.checked) == (0, 0)

    # The source moved elsewhere and a symlink took its place: stat() follows the link.
    moved = _tar_members(tmp_path / "moved.tar.gz", {
        "app/.wh.mod.py": b"", "lib": None, "lib/real.py": SOURCE.encode(),
        "app/mod.py": "../lib/real.py"})
    report = check_layers([lower, moved])
    assert (report.checked, report.ok) == (1, True)
    moved_bigger = _tar_members(tmp_path / "moved2.tar.gz", {
        "app/.wh.mod.py": b"", "lib": None, "lib/real.py": SOURCE.encode() + b"\n",
        "app/mod.py": "/lib/real.py"})
    assert [m.source for m in check_layers([lower, moved_bigger]).mismatches] == ["app/mod.py"]


def test_truncate_mtimes(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    (tmp_path / "d" / "l").symlink_to("f")
    for p in (tmp_path / "d" / "f", tmp_path / "d"):
        os.utime(p, ns=(FRACTIONAL_MTIME_NS, FRACTIONAL_MTIME_NS))
    os.utime(tmp_path / "d" / "l", ns=(FRACTIONAL_MTIME_NS,) * 2, follow_symlinks=False)
    assert truncate_mtimes(tmp_path) >= 3
    for p in ("d", "d/f", "d/l"):
        assert os.lstat(tmp_path / p).st_mtime_ns == 1_700_000_000 * 10**9
    assert truncate_mtimes(tmp_path) == 0


# --- layer diffs -------------------------------------------------------------------------

def test_layer_entries_pack_changes_and_white_out_removals(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for root in (old, new):
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "same").write_text("same")
        (root / "dev").mkdir()
        (root / "dev" / "null-ish").write_text("runtime")
        os.utime(root / "etc" / "same", (1000, 1000))
    (old / "etc" / "changed").write_text("old!")
    (new / "etc" / "changed").write_text("new!")  # same size and, below, same mtime
    (old / "etc" / "gone").write_text("bye")
    (old / "olddir" / "sub").mkdir(parents=True)
    (new / "dev" / "added-by-a-runtime").write_text("not part of an image")
    (new / "usr" / "lib").mkdir(parents=True)
    (new / "usr" / "lib" / "added").write_text("hi")
    for root in (old, new):
        os.utime(root / "etc" / "changed", (1000, 1000))
        for directory in ("etc", "dev"):
            os.utime(root / directory, (1000, 1000))

    packed, removed = layer_entries(old, new)
    assert packed == ["etc", "etc/changed", "usr", "usr/lib", "usr/lib/added"]
    assert removed == ["etc/gone", "olddir"]

    blob = write_layer(old, new, tmp_path / "blobs")
    path = tmp_path / "blobs" / blob.digest.split(":", 1)[1]
    with tarfile.open(path, "r:gz") as tar:
        names = tar.getnames()
        mtimes = {m.name: m.mtime for m in tar}
    assert names == [".wh.olddir", "etc", "etc/.wh.gone", "etc/changed", "usr", "usr/lib",
                     "usr/lib/added"]
    assert all(isinstance(m, int) for m in mtimes.values())
    assert (blob.entries, blob.whiteouts) == (7, 2)
    # Same input, same blob: the layer is reproducible.
    assert write_layer(old, new, tmp_path / "again") == blob


def test_debian_mirror_from_deb822_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("LAZYFS_BENCH_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n")
    (tmp_path / "sources.list.d" / "other.sources").write_text(
        "Types: deb\nURIs: https://packages.example/apt\n")
    assert debian_mirror(tmp_path) == "http://mirror.example/debian"


# --- the tiny recipe end to end ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory):
    require_tool("busybox")
    cache = tmp_path_factory.mktemp("bench-cache")
    return build_image(busybox_python_recipe(), cache)


def test_tiny_image_is_an_oci_image_skopeo_reads(tiny_image):
    require_tool("skopeo")
    info = json.loads(run(["skopeo", "inspect", tiny_image.ref]).stdout)
    assert info["Layers"] == [layer.digest for layer in tiny_image.layers]
    assert info["Digest"] == tiny_image.manifest_digest
    config = json.loads(run(["skopeo", "inspect", "--config", tiny_image.ref]).stdout)
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in tiny_image.layers]
    assert config["config"]["Cmd"] == list(tiny_image.workload)
    assert tiny_image.pyc["checked"] >= 4 and tiny_image.pyc["mismatches"] == 0


def test_tiny_image_build_is_cached(tiny_image):
    again = build_image(busybox_python_recipe(), tiny_image.oci_dir.parents[2])
    assert again.cached and not tiny_image.cached
    assert again.manifest_digest == tiny_image.manifest_digest
    assert tiny_image.oci_dir.parent.name.endswith(image_key(busybox_python_recipe())[:16])


def test_tiny_image_layers_unpack_and_python_trusts_the_pyc(tiny_image, tmp_path):
    """Unpack with tar (as a runtime would) and let Python judge the .pyc files."""
    for layer in tiny_image.layer_paths():
        run(["tar", "-xzf", str(layer), "-C", str(tmp_path)])
    assert (tmp_path / "bin" / "busybox").is_file()
    assert run([str(tmp_path / "bin" / "busybox"), "echo", "ready"]).stdout.strip() == "ready"
    stdlib_copy = next((tmp_path / "usr" / "lib").glob("python3.*"))
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-v", "-c",
         f"import sys; sys.path.insert(0, {str(stdlib_copy)!r}); import json; print(json.__file__)"],
        capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == str(stdlib_copy / "json" / "__init__.py")
    assert "bytecode is stale" not in proc.stderr
    assert f"code object from '{stdlib_copy}/json/__pycache__/decoder." in proc.stderr


def test_python_agrees_a_rounded_mtime_makes_the_pyc_stale(tmp_path):
    """The oracle for the check above: Python recompiles exactly when the check says so."""
    root = _compiled_module(tmp_path)
    verdicts = {}
    for rule in (int, round):
        layer = _tar_rootfs(root, tmp_path / f"{rule.__name__}.tar.gz", mtime_rule=rule)
        unpacked = tmp_path / f"unpacked-{rule.__name__}"
        unpacked.mkdir()
        run(["tar", "-xzf", str(layer), "-C", str(unpacked)])
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-B", "-v", "-c",
             f"import sys; sys.path.insert(0, {str(unpacked / 'app')!r}); import mod"],
            capture_output=True, text=True, check=True)
        verdicts[rule.__name__] = ("bytecode is stale" in proc.stderr, check_layers([layer]).ok)
    assert verdicts == {"int": (False, True), "round": (True, False)}


def test_unmount_below_releases_mounts_left_by_a_killed_build(tmp_path):
    from lazyfs.bench.rootfs import unmount_below
    from tests.fixtures.common import require_root
    require_root()
    proc_dir = tmp_path / "stage" / "rootfs" / "proc"
    proc_dir.mkdir(parents=True)
    run(["mount", "-t", "tmpfs", "tmpfs", str(proc_dir)])
    try:
        unmount_below(tmp_path / "stage")
        assert not os.path.ismount(proc_dir)
    finally:
        subprocess.run(["umount", "-l", str(proc_dir)], capture_output=True)

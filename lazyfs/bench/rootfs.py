"""Build steps that turn recipe steps into a root filesystem directory.

Each Debian step cleans up after itself (apt lists and caches, logs, resolv.conf), so a
layer never carries what only the build needed. ``finish_rootfs`` truncates every mtime to
whole seconds: tar records whole seconds, and a .pyc records its source's mtime truncated,
so after this the tar, the .pyc headers and the directory all agree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import ImageBuildError
from .recipes import AptInstall, Busybox, CompilePyc, CopyFiles, Debootstrap, Step

log = logging.getLogger(__name__)

_CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "HOME": "/root",
}
_DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Removed after every Debian step: state that only the build needed.
_BUILD_LEFTOVERS = (
    "var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
    "var/cache/apt/archives/partial/*", "var/cache/debconf/*-old", "var/lib/dpkg/*-old",
    "var/log/apt/*", "var/log/dpkg.log", "var/log/alternatives.log", "var/log/bootstrap.log",
    "var/cache/ldconfig/aux-cache", "tmp/*", "var/tmp/*", "root/.cache",
    "usr/sbin/policy-rc.d", "debootstrap",
)


def _run(cmd: list[str], *, what: str, env: dict[str, str] | None = None,
         timeout: float = 3600) -> str:
    log.info("%s: %s", what, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ImageBuildError(f"{what} failed: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise ImageBuildError(f"{what} failed with exit code {proc.returncode}:\n{tail}")
    return proc.stdout


def debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian archive this machine's apt uses (deb822 or one-line sources)."""
    override = os.environ.get("LAZYFS_BENCH_DEBIAN_MIRROR")
    if override:
        return override
    files = sorted(sources_dir.glob("sources.list.d/*")) + [sources_dir / "sources.list"]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri in re.findall(r"^URIs:\s*(\S+)", text, re.M) + \
                re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.M):
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return _DEFAULT_MIRROR


@contextlib.contextmanager
def _chroot_mounts(root: Path) -> Iterator[None]:
    """/proc inside the rootfs and the host's resolv.conf while apt runs in it."""
    proc = root / "proc"
    proc.mkdir(exist_ok=True)
    _run(["mount", "-t", "proc", "proc", str(proc)], what="mount /proc in the rootfs")
    resolv = root / "etc" / "resolv.conf"
    try:
        if resolv.is_symlink():
            resolv.unlink()
        shutil.copyfile("/etc/resolv.conf", resolv)
        yield
    finally:
        resolv.write_text("")  # a container runtime provides its own
        subprocess.run(["umount", "-l", str(proc)], check=False)


def _chroot(root: Path, args: list[str], *, what: str) -> str:
    return _run(["chroot", str(root), *args], what=what, env=dict(_CHROOT_ENV))


def _clean(root: Path) -> None:
    for pattern in _BUILD_LEFTOVERS:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _debootstrap(step: Debootstrap, root: Path) -> None:
    cmd = ["debootstrap", f"--variant={step.variant}"]
    if step.include:
        cmd.append("--include=" + ",".join(step.include))
    cmd += [step.suite, str(root), debian_mirror()]
    _run(cmd, what="debootstrap", env={**os.environ, "LANG": "C.UTF-8"})
    _clean(root)
    (root / "etc" / "resolv.conf").write_text("")


def _apt_install(step: AptInstall, root: Path) -> None:
    # Nothing a package installs may start a service inside the build chroot.
    policy = root / "usr" / "sbin" / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    with _chroot_mounts(root):
        _chroot(root, ["apt-get", "update", "-q"], what="apt-get update")
        _chroot(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                       *step.packages], what=f"apt-get install {' '.join(step.packages)}")
        _chroot(root, ["apt-get", "clean"], what="apt-get clean")
    _clean(root)


def _inside(root: Path, image_path: str) -> Path:
    rel = Path(image_path.lstrip("/"))
    if ".." in rel.parts:
        raise ImageBuildError(f"image path {image_path!r} leaves the rootfs")
    return root / rel


def _copy_files(step: CopyFiles, root: Path) -> None:
    for src, dest in step.files:
        target = _inside(root, dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).is_dir():
            shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)


def _busybox(step: Busybox, root: Path) -> None:
    if not Path(step.host_binary).is_file():
        raise ImageBuildError(f"{step.host_binary} not found: install busybox-static")
    bindir = root / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(step.host_binary, bindir / "busybox")
    for applet in step.applets:
        link = bindir / applet
        if not link.exists():
            link.symlink_to("busybox")


def _compile_pyc(step: CompilePyc, root: Path) -> None:
    dirs = [d for d in step.dirs if _inside(root, d).is_dir()]
    if not dirs:
        raise ImageBuildError(f"none of {step.dirs} exists in the rootfs to byte-compile")
    # -j0: all cores; timestamp mode explicitly, since SOURCE_DATE_EPOCH would switch
    # compileall to hash-based .pyc files.
    flags = ["-m", "compileall", "-q", "-j0", "--invalidation-mode", "timestamp"]
    if step.interpreter == "chroot":
        cmd = ["chroot", str(root), "/usr/bin/python3", *flags, *dirs]
        with _chroot_mounts(root):
            _report_compile(cmd, dict(_CHROOT_ENV))
        return
    elif step.interpreter == "host":
        # Strip the build directory from the paths recorded in the code objects.
        cmd = [sys.executable, *flags, "-s", str(root), "-p", "/",
               *[str(_inside(root, d)) for d in dirs]]
        env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    else:
        raise ImageBuildError(f"unknown CompilePyc interpreter {step.interpreter!r}")
    _report_compile(cmd, env)


def _report_compile(cmd: list[str], env: dict[str, str]) -> None:
    log.info("byte-compile: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        # Some packages ship sources that do not compile on purpose (templates, py2
        # leftovers); the rest is compiled, and the .pyc check still guards the image.
        log.info("compileall could not compile some files:\n%s", proc.stdout[-2000:])


def run_step(step: Step, root: Path) -> None:
    """Apply one recipe step to the rootfs directory ``root``."""
    if isinstance(step, Debootstrap):
        _debootstrap(step, root)
    elif isinstance(step, AptInstall):
        _apt_install(step, root)
    elif isinstance(step, CopyFiles):
        _copy_files(step, root)
    elif isinstance(step, Busybox):
        _busybox(step, root)
    elif isinstance(step, CompilePyc):
        _compile_pyc(step, root)
    else:
        raise ImageBuildError(f"unknown recipe step {step!r}")


def truncate_mtimes(root: Path) -> int:
    """Truncate every mtime under root to whole seconds; return how many changed."""
    changed = 0
    paths = [str(root)]
    for dirpath, dirnames, filenames in os.walk(root):
        paths.extend(os.path.join(dirpath, name) for name in (*dirnames, *filenames))
    for path in paths:
        mtime_ns = os.lstat(path).st_mtime_ns
        if mtime_ns % 1_000_000_000:
            whole = mtime_ns - mtime_ns % 1_000_000_000
            os.utime(path, ns=(whole, whole), follow_symlinks=False)
            changed += 1
    return changed


def unmount_below(path: Path) -> None:
    """Lazily unmount anything mounted at or below path (a build killed mid-step leaves /proc)."""
    prefix = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].replace("\\040", " ") for line in mounts]
    for point in sorted(points, key=len, reverse=True):
        if point == prefix or point.startswith(prefix + "/"):
            subprocess.run(["umount", "-l", point], check=False)

#!/usr/bin/env bash
# Install everything lazyfs needs on a fresh Debian machine (run as root), idempotently:
# the system packages (FUSE, EROFS tools, containerd, runc, the distribution registry, ...)
# and a virtualenv in .venv holding the lazyfs package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  fuse3 libfuse3-dev pkg-config gcc python3-dev
  erofs-utils kmod util-linux iproute2 curl zstd strace
  containerd runc docker-registry skopeo umoci
  golang-github-containerd-containerd-dev stargz-snapshotter busybox-static debootstrap
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian registry package starts a system registry on :5000; lazyfs tests start their own.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now docker-registry >/dev/null 2>&1 || true; fi

# Kernel parts used by the tests: FUSE, EROFS (the oracle), overlayfs, loop devices.
for m in fuse erofs overlay loop; do modprobe "$m" 2>/dev/null || true; done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.lazyfs-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
# Generated code (containerd API stubs, the tests' CRI client) is rebuilt every time: cheap,
# and never stale.
if [ -f snapshotter/api/build.py ]; then .venv/bin/python snapshotter/api/build.py; fi
if [ -f tests/cri/build.py ]; then .venv/bin/python tests/cri/build.py; fi
echo "lazyfs installed in .venv"

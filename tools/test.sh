#!/usr/bin/env bash
# Run the whole lazyfs test suite (as root: it mounts FUSE and EROFS, starts a registry and containerd).
# Installs what is missing first, so it works on a fresh machine. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export LAZYFS_FAIL_ON_SKIP=1
exec .venv/bin/python -m pytest -ra --durations=20 "$@"

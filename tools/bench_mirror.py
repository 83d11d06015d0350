"""A lazy start through a pull-through cache, cold and warm: what the mirror sends.

    sudo .venv/bin/python tools/bench_mirror.py [--files N] [--size BYTES]

An origin docker-registry and a second one in pull-through-cache mode (`proxy: remoteurl:`)
in front of it, on loopback; a converted image of N random files in the origin; a hosts.toml
naming the mirror. Two fresh nodes (`lazyfs mount`, own daemon and cache) each read two of
the files: the first while the mirror has not cached the blob (it answers the first Range
request with 200 and the whole blob), the second once it has. Prints, per node, lazyfs's
blob requests at the mirror (by status), the bytes the mirror sent, and the daemon's own
range requests and bytes.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.images import build_image, directory, file  # noqa: E402
from tests.fixtures.lazyimage import convert_image, push_to_registry  # noqa: E402
from tests.fixtures.lazymount import lazy_mount  # noqa: E402
from tests.fixtures.registry import start_registry  # noqa: E402


def _wait_cached(mirror, repo: str, digests: list[str], timeout: float = 60) -> None:
    """Until the mirror has each blob (it answers a Range request with 206)."""
    deadline = time.monotonic() + timeout
    for digest in digests:
        while httpx.get(f"{mirror.url}/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=0-0"},
                        timeout=10).status_code != 206:
            if time.monotonic() > deadline:
                raise SystemExit(f"the mirror did not cache {digest} within {timeout:.0f}s")
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--size", type=int, default=4_000_000, help="bytes per file")
    args = parser.parse_args()
    rng = random.Random(1)
    files = {f"app/f{i}": rng.randbytes(args.size) for i in range(args.files)}
    image = convert_image(build_image([[directory("app"), *(file(p, d) for p, d in files.items())]]),
                          chunk_size=1 << 20)
    blob = sum(len(layer.blob) for layer in image.layers)
    read = sorted(files)[1:3]
    with tempfile.TemporaryDirectory() as work:
        tmp = Path(work)
        with start_registry(tmp / "origin") as origin, \
                start_registry(tmp / "mirror", extra={"proxy": {"remoteurl": origin.url}}) as mirror:
            push_to_registry(origin, "bench/mirror", image)
            certs = tmp / "certs.d"
            (certs / origin.host).mkdir(parents=True)
            (certs / origin.host / "hosts.toml").write_text(
                f'server = "http://{origin.host}"\n[host."http://{mirror.host}"]\n'
                f'  capabilities = ["pull", "resolve"]\n')
            print(f"image: {args.files} files of {args.size} B, layer blob {blob} B; each node reads {len(read)} files")
            print(f"{'node':<12} {'GETs':>5} {'200':>4} {'206':>4} {'mirror sent B':>14} "
                  f"{'daemon ranges':>13} {'daemon B':>10}")
            for node in ("cold-mirror", "warm-mirror"):
                mark = mirror.mark()
                with lazy_mount(tmp / node / "mnt", "--no-prefetch", "--hosts-dir", str(certs),
                                f"{origin.host}/bench/mirror:v1", run_dir=tmp / node / "run",
                                cache_dir=tmp / node / "cache") as mount:
                    for path in read:
                        assert (mount.path / path).read_bytes() == files[path]
                    fetch = mount.stats()["fetch"]
                gets = [r for r in mirror.requests(mark) if r.method == "GET" and "/blobs/" in r.path
                        and r.user_agent.startswith("python-httpx")]
                print(f"{node:<12} {len(gets):>5} {sum(r.status == 200 for r in gets):>4} "
                      f"{sum(r.status == 206 for r in gets):>4} {sum(r.bytes_written for r in gets):>14} "
                      f"{fetch['requests']:>13} {fetch['bytes_fetched']:>10}")
                _wait_cached(mirror, "bench/mirror", [layer.digest for layer in image.layers])
    return 0


if __name__ == "__main__":
    sys.exit(main())

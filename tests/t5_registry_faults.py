"""The registry client when the network or the registry misbehaves (fault proxy in front of the
real docker-registry): every read returns the right bytes or raises RegistryError."""

import hashlib
import os
import random
import tracemalloc

import httpx
import pytest

from lazyfs.registry import (
    Authenticator, BlobNotFound, Credentials, CredentialStore, DigestMismatch, RegistryClient, RegistryError,
    RetryPolicy, Secret, parse_reference, sha256_check,
)
from tests.faultproxy import Fault, FaultProxy
from tests.fixtures.images import build_image, file, push_image
from tests.fixtures.registry import TokenServer, start_registry

FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, deadline=30)
BLOB_SIZE = 1024 * 1024


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


@pytest.fixture
async def blob(registry, registry_repo, http):
    """A 1 MiB random blob and a small image, pushed straight to the registry (no proxy)."""
    data = os.urandom(BLOB_SIZE)
    direct = RegistryClient(parse_reference(f"{registry.host}/{registry_repo}:latest"), http)
    descriptor = await direct.push_blob(data)
    image = build_image([[file("hello", b"hello world\n" * 100)]])
    await push_image(direct, image, tag="v1")
    return descriptor.digest, data, image


def through(proxy: FaultProxy, repository: str, http, **kw) -> RegistryClient:
    kw.setdefault("retry", FAST_RETRY)
    return RegistryClient(parse_reference(f"{proxy.host}/{repository}:latest"), http, **kw)


def blob_gets(proxy: FaultProxy, digest: str):
    return [r for r in proxy.requests if r.method == "GET" and r.path.endswith(f"/blobs/{digest}")]


async def test_connection_resets_are_retried(fault_proxy, registry_repo, http, blob):
    digest, data, image = blob
    fault_proxy.add(Fault.reset(), method="GET", path="/manifests/", times=2)
    fault_proxy.add(Fault.reset(), method="GET", path=digest, times=1)
    fault_proxy.add(Fault.reset(after_bytes=1000), method="GET", path=digest, times=1)
    store = through(fault_proxy, registry_repo, http)
    assert (await store.get_manifest("v1")).digest == image.digest
    assert await store.read_range(digest, 4096, 8192) == data[4096:4096 + 8192]
    assert await store.read_range(digest, 0, 100_000) == data[:100_000]
    assert not fault_proxy.unused_rules()
    assert len([r for r in fault_proxy.requests if "/manifests/" in r.path]) == 3
    assert len(blob_gets(fault_proxy, digest)) == 4


async def test_server_errors_then_success_and_final_error(fault_proxy, registry, registry_repo, http, blob):
    digest, data, _ = blob
    fault_proxy.add(Fault.status(500), path=digest, times=1)
    fault_proxy.add(Fault.status(503), path=digest, times=1)
    store = through(fault_proxy, registry_repo, http)
    assert await store.get_blob(digest) == data

    fault_proxy.clear_requests()
    fault_proxy.add(Fault.status(502), path=digest, times=None)
    with pytest.raises(RegistryError) as excinfo:
        await store.read_range(digest, 0, 10)
    error = excinfo.value
    assert (error.status, error.registry, error.repository, error.digest) == (502, fault_proxy.host, registry_repo, digest)
    for part in (fault_proxy.host, registry_repo, digest, "502", "4 attempts"):
        assert part in str(error)
    assert len(blob_gets(fault_proxy, digest)) == FAST_RETRY.attempts


async def test_not_found_is_not_retried(fault_proxy, registry_repo, http):
    store = through(fault_proxy, registry_repo, http)
    with pytest.raises(BlobNotFound):
        await store.read_range("sha256:" + "1" * 64, 0, 1)
    assert len(fault_proxy.requests) == 1


async def test_429_retry_after_is_honoured(fault_proxy, registry_repo, http, blob):
    digest, data, _ = blob
    fault_proxy.add(Fault.status(429, {"Retry-After": "1"}), path=digest, times=1)
    store = through(fault_proxy, registry_repo, http)
    assert await store.read_range(digest, 10, 10) == data[10:20]
    first, second = blob_gets(fault_proxy, digest)
    assert first.status == 429 and second.status == 206
    assert second.time - first.time >= 1.0  # the policy alone would wait at most 0.05 s


async def test_truncated_full_blob_resumes_with_range(fault_proxy, registry_repo, http, blob):
    digest, data, _ = blob
    fault_proxy.add(Fault.truncate(300_000), path=digest, ranged=False, times=1)
    store = through(fault_proxy, registry_repo, http)
    assert await store.get_blob(digest) == data
    first, second = blob_gets(fault_proxy, digest)
    assert (first.range, first.body_bytes) == (None, 300_000)
    assert second.range == "bytes=300000-" and second.status == 206


async def test_truncated_range_is_retried(fault_proxy, registry_repo, http, blob):
    digest, data, _ = blob
    fault_proxy.add(Fault.truncate(100), path=digest, ranged=True, times=2)
    store = through(fault_proxy, registry_repo, http)
    assert await store.read_range(digest, 1000, 50_000) == data[1000:51_000]
    assert [r.body_bytes for r in blob_gets(fault_proxy, digest)] == [100, 100, 50_000]


async def test_corrupt_blob_is_refetched_or_rejected(fault_proxy, registry_repo, http, blob, tmp_path):
    digest, data, _ = blob
    store = through(fault_proxy, registry_repo, http)
    fault_proxy.add(Fault.corrupt(at=12345), path=digest, times=1)
    assert await store.get_blob(digest) == data

    fault_proxy.add(Fault.corrupt(at=7), path=digest, times=None)
    with pytest.raises(DigestMismatch) as excinfo:
        await store.get_blob(digest)
    assert excinfo.value.digest == digest
    with pytest.raises(DigestMismatch):
        await store.download_blob(digest, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary


async def test_corrupt_range_is_caught_by_the_callers_check(fault_proxy, registry_repo, http, blob):
    digest, data, _ = blob
    wanted = hashlib.sha256(data[5000:9000]).digest()

    def verify(chunk: bytes) -> bool:
        return hashlib.sha256(chunk).digest() == wanted

    store = through(fault_proxy, registry_repo, http)
    fault_proxy.add(Fault.corrupt(at=10), path=digest, ranged=True, times=2)
    assert await store.read_range(digest, 5000, 4000, verify=verify) == data[5000:9000]
    assert len(blob_gets(fault_proxy, digest)) == 3
    fault_proxy.add(Fault.corrupt(at=10), path=digest, ranged=True, times=None)
    with pytest.raises(DigestMismatch):
        await store.read_range(digest, 5000, 4000, verify=verify)


async def test_corrupt_manifest_is_refetched(fault_proxy, registry_repo, http, blob):
    _, _, image = blob
    store = through(fault_proxy, registry_repo, http)
    fault_proxy.add(Fault.corrupt(at=3), path="/manifests/", times=1)
    assert (await store.get_manifest("v1")).data == image.manifest  # Docker-Content-Digest check
    fault_proxy.add(Fault.corrupt(at=3), path="/manifests/", times=1)
    assert (await store.get_manifest(image.digest)).data == image.manifest
    fault_proxy.add(Fault.corrupt(at=3), path="/manifests/", times=None)
    with pytest.raises(DigestMismatch):
        await store.get_manifest(image.digest)


async def test_full_answer_to_a_ranged_request_is_sliced(fault_proxy, registry_repo, http, blob):
    digest, data, _ = blob
    fault_proxy.add(Fault.ignore_range(), path=digest, times=None)
    store = through(fault_proxy, registry_repo, http)
    for offset, length in [(0, 10), (70_000, 200_000), (BLOB_SIZE - 100, 100), (BLOB_SIZE - 3, 50)]:
        assert await store.read_range(digest, offset, length) == data[offset:offset + length]
    assert all(r.status == 200 and r.range for r in blob_gets(fault_proxy, digest))


async def test_full_answer_to_a_ranged_request_is_not_buffered(fault_proxy, registry, registry_repo, http):
    big = random.Random(7).randbytes(16 * 1024 * 1024)
    direct = RegistryClient(parse_reference(f"{registry.host}/{registry_repo}:latest"), http)
    digest = (await direct.push_blob(big)).digest
    fault_proxy.add(Fault.ignore_range(), path=digest, times=None)
    store = through(fault_proxy, registry_repo, http)
    offset = 12 * 1024 * 1024
    expected = big[offset:offset + 4096]
    tracemalloc.start()
    try:
        got = await store.read_range(digest, offset, 4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == expected
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes while skipping 12 MiB of a 200 answer"


async def test_slow_answers_time_out_and_are_retried(fault_proxy, registry_repo, blob):
    digest, data, _ = blob
    fault_proxy.add(Fault.delay(2.0), path=digest, times=1)
    async with httpx.AsyncClient(timeout=0.5) as quick:
        store = through(fault_proxy, registry_repo, quick)
        assert await store.read_range(digest, 0, 1000) == data[:1000]
    assert len(blob_gets(fault_proxy, digest)) == 2


async def test_stalled_and_dripping_answers_fail_their_attempt_and_are_retried(fault_proxy, registry_repo, blob):
    digest, data, image = blob
    policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, attempt_timeout=1.0)
    fault_proxy.add(Fault.stall(), path="/manifests/", times=1)  # accepts, never answers
    fault_proxy.add(Fault.drip(0.05), path=digest, ranged=True, times=1)  # a byte every 50 ms
    fault_proxy.add(Fault.drip(0.05), path=image.config_descriptor.digest, times=1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
        store = through(fault_proxy, registry_repo, client, retry=policy)
        manifest = await store.get_manifest("v1")
        assert manifest.digest == image.digest
        assert await store.read_range(digest, 0, 1000) == data[:1000]
        assert (await store.get_config(manifest))["rootfs"]
        assert not fault_proxy.unused_rules()

        # A registry that never answers: one clear error after the attempts, not a hang.
        fault_proxy.add(Fault.stall(), path=digest, times=None)
        with pytest.raises(RegistryError) as excinfo:
            await store.read_range(digest, 0, 10, what="chunk range")
        for part in ("chunk range (bytes 0-9)", "3 attempts", "no answer within 1s", digest):
            assert part in str(excinfo.value)


async def test_dripping_blob_stream_resumes_where_it_stopped(fault_proxy, registry_repo, blob, tmp_path):
    digest, data, _ = blob
    fault_proxy.add(Fault.drip(0.05), path=digest, ranged=False, times=1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
        store = through(fault_proxy, registry_repo, client,
                        retry=RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, attempt_timeout=1.0))
        assert await store.download_blob(digest, tmp_path / "blob") == BLOB_SIZE
    assert (tmp_path / "blob").read_bytes() == data
    gets = blob_gets(fault_proxy, digest)
    assert [r.fault for r in gets] == ["drip", None]
    resumed_at = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= gets[0].body_bytes  # the bytes that came are not asked for again


async def test_another_range_than_asked_is_never_returned(fault_proxy, registry_repo, http, blob):
    digest, data, _ = blob
    store = through(fault_proxy, registry_repo, http)
    # A true Content-Range for other bytes is noticed by the client and the read repeated.
    fault_proxy.add(Fault.other_range(100), path=digest, times=1)
    assert await store.read_range(digest, 1000, 500) == data[1000:1500]
    # A Content-Range that lies is caught by the caller's check (here the bytes' sha256).
    fault_proxy.add(Fault.other_range(100, lie=True), path=digest, times=1)
    check = sha256_check(hashlib.sha256(data[2000:2500]).digest())
    assert await store.read_range(digest, 2000, 500, verify=check) == data[2000:2500]
    assert not fault_proxy.unused_rules()
    fault_proxy.add(Fault.other_range(100), path=digest, times=None)
    with pytest.raises(RegistryError) as excinfo:
        await store.read_range(digest, 3000, 500)
    assert "asked for bytes 3000-3499, got 3100-3599" in str(excinfo.value)


async def test_verified_reads_retry_until_right_and_name_what_failed(fault_proxy, registry_repo, http, blob):
    digest, data, image = blob
    store = through(fault_proxy, registry_repo, http)
    check = sha256_check(hashlib.sha256(data[:4096]).digest())
    for fault in (Fault.corrupt(at=9), Fault.truncate(100), Fault.status(429, {"Retry-After": "0"})):
        fault_proxy.add(fault, path=digest, ranged=True, times=1)
    assert await store.read_range(digest, 0, 4096, verify=check, what="layer metadata") == data[:4096]
    assert not fault_proxy.unused_rules()

    fault_proxy.add(Fault.corrupt(at=9), path=digest, ranged=True, times=None)
    with pytest.raises(DigestMismatch) as excinfo:
        await store.read_range(digest, 0, 4096, verify=check, what="layer metadata")
    message = str(excinfo.value)
    for part in ("layer metadata (bytes 0-4095) failed after 4 attempts", "failed verification",
                 f"registry={fault_proxy.host}", f"repository={registry_repo}", f"digest={digest}"):
        assert part in message, message

    config = image.config_descriptor.digest
    fault_proxy.add(Fault.corrupt(at=9), path=config, times=None)
    manifest = await store.get_manifest("v1")
    with pytest.raises(DigestMismatch) as excinfo:
        await store.get_config(manifest)
    assert f"GET image config {config} failed after 4 attempts" in str(excinfo.value)


async def test_redirect_target_is_remembered_until_it_fails(fault_proxy, registry_repo, http, blob):
    digest, data, _ = blob
    fault_proxy.add(Fault.redirect(), method="GET", path=rf"^/v2/.*/blobs/{digest}", times=1)
    store = through(fault_proxy, registry_repo, http)
    assert await store.read_range(digest, 0, 100) == data[:100]
    assert await store.read_range(digest, 100, 100) == data[100:200]
    assert await store.get_blob(digest) == data
    paths = [r.path.split("/blobs/")[0] for r in fault_proxy.requests]
    assert paths == [f"/v2/{registry_repo}", f"/_cdn/v2/{registry_repo}", f"/_cdn/v2/{registry_repo}",
                     f"/_cdn/v2/{registry_repo}"]
    assert store.remembered_location(digest).startswith(f"{fault_proxy.url}/_cdn/")

    # The CDN URL expires: back to the registry, which redirects again.
    fault_proxy.clear_requests()
    fault_proxy.add(Fault.status(403), path="^/_cdn/", times=1)
    fault_proxy.add(Fault.redirect(), method="GET", path=rf"^/v2/.*/blobs/{digest}", times=1)
    assert await store.read_range(digest, 500, 10) == data[500:510]
    assert [(r.path.startswith("/_cdn/"), r.status) for r in fault_proxy.requests] == [
        (True, 403), (False, 307), (True, 206)]
    assert not any(r.has_authorization for r in fault_proxy.requests if r.path.startswith("/_cdn/"))

    # A fresh CDN URL that fails at once: the attempt fails, the next one asks the registry again.
    fault_proxy.clear_requests()
    fault_proxy.add(Fault.status(503), path="^/_cdn/", times=2)
    fault_proxy.add(Fault.redirect(), method="GET", path=rf"^/v2/.*/blobs/{digest}", times=2)
    assert await store.read_range(digest, 900, 10) == data[900:910]
    assert [(r.path.startswith("/_cdn/"), r.status) for r in fault_proxy.requests] == [
        (True, 503), (False, 307), (True, 503), (False, 307), (True, 206)]


async def test_token_refreshed_when_rejected_mid_series(tmp_path, http):
    with TokenServer(tmp_path / "tokens", users={"carol": "carol-pass-31"}) as tokens, \
            start_registry(tmp_path / "reg", auth=tokens.registry_auth_config()) as reg, \
            FaultProxy(reg.host) as proxy:
        credentials = CredentialStore()
        credentials.add(proxy.host, Credentials("carol", Secret("carol-pass-31")))
        auth = Authenticator(credentials)
        store = through(proxy, "team/app", http, authenticator=auth)
        data = os.urandom(200_000)
        digest = (await store.push_blob(data)).digest
        reads = [(offset, 10_000) for offset in range(0, 200_000, 20_000)]
        for offset, length in reads[:3]:
            assert await store.read_range(digest, offset, length) == data[offset:offset + length]
        before = auth.token_requests
        # What the registry says when a token has expired: 401 with a fresh challenge.
        challenge = (f'Bearer realm="{tokens.realm}",service="{tokens.service}",'
                     f'scope="repository:team/app:pull",error="invalid_token"')
        proxy.add(Fault.status(401, {"WWW-Authenticate": challenge}), path=digest, times=1)
        for offset, length in reads[3:]:
            assert await store.read_range(digest, offset, length) == data[offset:offset + length]
        assert auth.token_requests == before + 1
        assert not proxy.unused_rules()


async def test_random_faults_never_give_wrong_bytes(fault_proxy, registry_repo, http, blob):
    """Whatever the proxy does, a read returns exactly the right bytes or raises RegistryError."""
    digest, data, _ = blob
    rng = random.Random(20261123)
    store = through(fault_proxy, registry_repo, http, retry=RetryPolicy(attempts=3, base_delay=0, max_delay=0))
    faults = [Fault.reset(), Fault.reset(after_bytes=10), Fault.truncate(1), Fault.status(503), Fault.status(500),
              Fault.ignore_range(), Fault.corrupt(at=0), Fault.delay(0.01)]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(40):
        for _ in range(rng.randint(0, 4)):
            fault_proxy.add(rng.choice(faults), path=digest, times=1)
        offset = rng.randrange(0, BLOB_SIZE)
        length = rng.randint(1, 64 * 1024)
        expected = data[offset:offset + length]
        try:
            got = await store.read_range(digest, offset, length,
                                         verify=lambda b, e=expected: hashlib.sha256(b).digest() == hashlib.sha256(e).digest())
        except RegistryError:
            outcomes["error"] += 1
        else:
            assert got == expected
            outcomes["ok"] += 1
        fault_proxy.clear_rules()
    assert outcomes["ok"] > 20

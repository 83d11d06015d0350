"""Pure registry-client logic: references, digests, platforms, auth parsing, retry timing."""

import base64
import json

import pytest
import trio

from lazyfs.registry import (
    Credentials, CredentialStore, InvalidReference, Manifest, NoMatchingPlatform, Platform, RegistryError,
    RetryPolicy, Secret, is_insecure_registry, parse_any_reference, parse_layout_reference, parse_reference,
)
from lazyfs.registry.auth import parse_challenge
from lazyfs.registry.manifest import DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from lazyfs.registry.retry import TransientFailure, parse_retry_after, run_with_retries

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, registry, repository, tag, digest", [
    ("alpine", "docker.io", "library/alpine", "latest", None),
    ("library/alpine:3", "docker.io", "library/alpine", "3", None),
    ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
    ("index.docker.io/user/app:v1", "docker.io", "user/app", "v1", None),
    ("user/app", "docker.io", "user/app", "latest", None),
    ("localhost/x", "localhost", "x", "latest", None),
    ("localhost:5000/ns/repo:tag-1.2", "localhost:5000", "ns/repo", "tag-1.2", None),
    (f"127.0.0.1:5000/ns/repo@{DIGEST}", "127.0.0.1:5000", "ns/repo", None, DIGEST),
    (f"ghcr.io/org/app:v2@{DIGEST}", "ghcr.io", "org/app", "v2", DIGEST),
    ("quay.io/a/b/c/d", "quay.io", "a/b/c/d", "latest", None),
    ("[::1]:5000/repo", "[::1]:5000", "repo", "latest", None),
    ("my-registry.example.com/a__b/c-d.e", "my-registry.example.com", "a__b/c-d.e", "latest", None),
])
def test_parse_reference(text, registry, repository, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)
    assert parse_reference(str(ref)) == ref


def test_reference_endpoint_and_object():
    assert parse_reference("alpine").endpoint == "registry-1.docker.io"
    assert parse_reference("ghcr.io/a/b").endpoint == "ghcr.io"
    assert str(parse_reference("alpine")) == "docker.io/library/alpine:latest"
    assert parse_reference(f"a/b:v1@{DIGEST}").object == DIGEST
    assert parse_reference("a/b:v1").object == "v1"
    ref = parse_reference("127.0.0.1:5000/a:v1")
    assert ref.with_digest(DIGEST).object == DIGEST
    assert ref.with_repository("other/b").repository == "other/b"


@pytest.mark.parametrize("text", [
    "", " alpine", "Alpine", "UPPER/case", "a//b", "a/b:", "a/b:-tag", "a/b:" + "t" * 129,
    "a@sha256:1234", "a@md5:" + "0" * 32, f"a@sha256:{'AB' * 32}", "a/-b", "a/b_", "host:port:5000/x",
    "a/" + "b" * 260, "my_registry.example.com/x",
])
def test_invalid_references(text):
    with pytest.raises(InvalidReference):
        parse_reference(text)


def test_layout_references(tmp_path):
    assert parse_layout_reference("oci:dir").path.as_posix() == "dir"
    ref = parse_layout_reference("oci:some/dir:v1")
    assert (ref.path.as_posix(), ref.tag, ref.digest) == ("some/dir", "v1", None)
    ref = parse_layout_reference(f"oci:/abs/dir@{DIGEST}")
    assert (ref.path.as_posix(), ref.tag, ref.object) == ("/abs/dir", None, DIGEST)
    assert parse_layout_reference("oci:a:b/c").path.as_posix() == "a:b/c"
    assert str(parse_any_reference("oci:x:t")) == "oci:x:t"
    with pytest.raises(InvalidReference):
        parse_layout_reference("oci:")
    with pytest.raises(InvalidReference):
        parse_layout_reference("oci:x:bad tag")


def test_insecure_registries():
    assert is_insecure_registry("127.0.0.1:5000")
    assert is_insecure_registry("localhost")
    assert is_insecure_registry("[::1]:5000")
    assert not is_insecure_registry("registry.example.com")
    assert is_insecure_registry("registry.example.com:5000", ["registry.example.com"])
    assert not is_insecure_registry("10.0.0.1:5000")


def _index(media_type, platforms):
    return json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + f"{i:064x}", "size": 10, "platform": p}
        for i, p in enumerate(platforms)
    ]}).encode()


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_MANIFEST_LIST])
def test_platform_selection(media_type):
    index = Manifest.from_bytes(_index(media_type, [
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm", "variant": "v7"},
        {"os": "linux", "architecture": "arm64"},
        {"os": "windows", "architecture": "amd64"},
    ]))
    assert index.is_index and index.media_type == media_type
    assert index.select_platform(Platform("linux", "amd64")).digest.endswith("0")
    assert index.select_platform(Platform("linux", "arm", "v7")).digest.endswith("1")
    assert index.select_platform(Platform("linux", "arm64", "v8")).digest.endswith("2")
    assert index.select_platform(Platform.parse("windows/amd64")).digest.endswith("3")
    with pytest.raises(NoMatchingPlatform, match="linux/arm/v6"):
        index.select_platform(Platform("linux", "arm", "v6"))
    assert index.select_platform().platform["architecture"] == Platform.host().architecture


def test_manifest_media_type_from_body_and_bad_json():
    body = json.dumps({"schemaVersion": 2, "config": {"mediaType": "x", "digest": DIGEST, "size": 3},
                       "layers": []}).encode()
    manifest = Manifest.from_bytes(body, "text/plain")
    assert manifest.media_type == OCI_MANIFEST and manifest.config.digest == DIGEST
    with pytest.raises(RegistryError):
        Manifest.from_bytes(b"{not json")
    bad = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"digest": "nope"},
                      "layers": []}).encode()
    with pytest.raises(RegistryError, match="config"):
        Manifest.from_bytes(bad).config


def test_parse_challenge():
    c = parse_challenge('Bearer realm="https://auth.example.com/token",service="registry.example.com",'
                        'scope="repository:a/b:pull,push"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example.com/token", "service": "registry.example.com",
                        "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="Registry Realm"') .params == {"realm": "Registry Realm"}
    assert parse_challenge("Bearer realm=http://x/t, service=s").params == {"realm": "http://x/t", "service": "s"}


def test_docker_config_credentials(tmp_path, monkeypatch):
    config = {"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:hub-pass-1").decode()},
        "127.0.0.1:5000": {"username": "u", "password": "p:with:colons"},
        "https://reg.example.com": {"identitytoken": "refresh-token-xyz"},
    }}
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    store = CredentialStore.from_docker_config()
    hub = store.lookup("docker.io")
    assert hub.username == "hubuser" and hub.password.reveal() == "hub-pass-1"
    assert store.lookup("registry-1.docker.io") is hub
    assert store.lookup("127.0.0.1:5000").password.reveal() == "p:with:colons"
    assert store.lookup("reg.example.com").identity_token.reveal() == "refresh-token-xyz"
    assert store.lookup("other.example.com") is None
    for text in (repr(store), repr(hub), str(hub.password), f"{hub.password}", repr(store.lookup("reg.example.com"))):
        assert "hub-pass-1" not in text and "refresh-token-xyz" not in text
    (tmp_path / "config.json").write_text('{"auths": {"x": {"auth": "***"}}}')
    with pytest.raises(RegistryError, match="base64") as excinfo:
        CredentialStore.from_docker_config()
    assert "***" not in str(excinfo.value)


def test_missing_docker_config_is_empty(tmp_path):
    assert CredentialStore.from_docker_config(tmp_path / "absent.json").by_registry == {}


def test_secret_and_credentials_repr():
    creds = Credentials("alice", Secret("s3cr3t-value"))
    assert "s3cr3t-value" not in repr(creds) and "alice" in repr(creds)
    assert creds.basic_header() == "Basic " + base64.b64encode(b"alice:s3cr3t-value").decode()


def test_retry_after_parsing():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("garbage") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_backoff_grows_with_jitter_and_honours_retry_after():
    policy = RetryPolicy(attempts=10, base_delay=1.0, max_delay=8.0)
    for failures, cap in [(1, 1), (2, 2), (3, 4), (4, 8), (6, 8)]:
        for _ in range(20):
            assert cap / 2 <= policy.backoff(failures) <= cap
    assert policy.backoff(1, retry_after=30.0) == 30.0
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


async def test_retry_timing_with_mock_clock(autojump_clock):
    policy = RetryPolicy(attempts=4, base_delay=1.0, max_delay=100.0, deadline=None)
    calls = []

    async def attempt():
        calls.append(trio.current_time())
        if len(calls) == 2:
            raise TransientFailure("429", status=429, retry_after=20.0)
        if len(calls) < 4:
            raise TransientFailure("reset")
        return "done"

    start = trio.current_time()
    assert await run_with_retries(policy, attempt, what="op", error_factory=lambda m, s: RegistryError(m)) == "done"
    gaps = [b - a for a, b in zip([start] + calls, calls)]
    assert gaps[0] == 0
    assert 0.5 <= gaps[1] <= 1.0          # first backoff: base * [0.5, 1]
    assert gaps[2] == 20.0                # Retry-After wins over the 1-2 s backoff
    assert 2.0 <= gaps[3] <= 4.0


async def test_retry_gives_up_with_status_and_deadline(autojump_clock):
    async def always_503():
        raise TransientFailure("HTTP 503", status=503)

    def factory(message, status):
        return RegistryError(message, status=status, registry="r", repository="p", digest=DIGEST)

    with pytest.raises(RegistryError) as excinfo:
        await run_with_retries(RetryPolicy(attempts=3, base_delay=0.1), always_503, what="GET x",
                               error_factory=factory)
    assert excinfo.value.status == 503 and "after 3 attempts" in str(excinfo.value)
    assert "registry=r" in str(excinfo.value) and DIGEST in str(excinfo.value)

    start = trio.current_time()
    with pytest.raises(RegistryError, match="deadline"):
        await run_with_retries(RetryPolicy(attempts=100, base_delay=1.0, max_delay=4.0, deadline=30.0),
                               always_503, what="GET x", error_factory=factory)
    assert trio.current_time() - start <= 30.0



# -- untrusted input never crashes: it parses or raises our own error ---------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
_descriptorish = st.fixed_dictionaries({}, optional={
    "mediaType": st.sampled_from([OCI_MANIFEST, "x"]) | _json_values,
    "digest": st.just(DIGEST) | _json_values,
    "size": st.integers(-5, 10**9) | _json_values,
    "annotations": _json_values,
    "platform": st.fixed_dictionaries({"os": st.just("linux"), "architecture": st.just("amd64")}) | _json_values,
    "urls": _json_values,
})
_manifestish = st.fixed_dictionaries({}, optional={
    "schemaVersion": _json_values,
    "mediaType": st.sampled_from([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST]) | _json_values,
    "config": _descriptorish | _json_values,
    "layers": st.lists(_descriptorish, max_size=3) | _json_values,
    "manifests": st.lists(_descriptorish, max_size=3) | _json_values,
})


@settings(max_examples=300, deadline=None)
@given(st.one_of(_manifestish.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200)),
       st.sampled_from([None, OCI_MANIFEST, OCI_INDEX, "text/plain"]))
def test_manifest_parsing_of_untrusted_bytes(data, media_type):
    try:
        manifest = Manifest.from_bytes(data, media_type)
        manifest.layers, manifest.manifests
        if not manifest.is_index:
            manifest.config
        else:
            manifest.select_platform(Platform("linux", "amd64"))
    except RegistryError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80) | st.from_regex(r"[a-z0-9.:/@_-]{1,40}", fullmatch=True))
def test_reference_parsing_of_untrusted_text(text):
    try:
        ref = parse_any_reference(text)
    except InvalidReference:
        return
    assert parse_any_reference(str(ref)) == ref


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_challenge_parsing_of_untrusted_text(text):
    challenge = parse_challenge(text)
    assert isinstance(challenge.params, dict)

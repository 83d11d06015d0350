"""Traces carried by the registry: an OCI artifact attached to the image it was recorded on.

The artifact (image spec 1.1 "artifact" guidance) is an image manifest:

    {"schemaVersion": 2,
     "mediaType": "application/vnd.oci.image.manifest.v1+json",
     "artifactType": "application/vnd.lazyfs.trace.v1",
     "config": the empty descriptor (application/vnd.oci.empty.v1+json, the 2-byte blob "{}"),
     "layers": [{"mediaType": "application/vnd.lazyfs.trace.v1.text", "digest", "size"}],
     "subject": the image manifest's descriptor (for an index: the platform manifest used),
     "annotations": {"org.opencontainers.image.created": RFC 3339 UTC time of the push}}

It is found through the subject: the registry's referrers API (GET /v2/<name>/referrers/<digest>,
distribution spec 1.1) where there is one, else the referrers tag schema: the tag
``sha256-<hex of the subject digest>`` holds an image index whose entries are the referrers'
descriptors (with their artifactType and annotations), kept up to date by each pusher with a
read-modify-write. OCI image layouts have no API and use the tag schema too.

``pull_trace`` takes the newest (by the created annotation) that passes every check: the
manifest by digest, its type and subject, one layer of bounded size, the blob by digest, and
the trace itself parsed strictly against the image's layers (format.decode_untrusted).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from lazyfs.registry import ImageStore, Manifest, ManifestNotFound, Platform, RegistryError
from lazyfs.registry.manifest import OCI_INDEX, OCI_MANIFEST, referrer_entries, sha256_digest

from .format import MAX_UNTRUSTED_SIZE, Trace, TraceError, decode_untrusted

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "application/vnd.lazyfs.trace.v1"
TRACE_MEDIA_TYPE = "application/vnd.lazyfs.trace.v1.text"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
CREATED = "org.opencontainers.image.created"
KEEP_IN_TAG_INDEX = 8  # our newest entries kept in a referrers-tag index (others' all kept)
TAG_UPDATE_ATTEMPTS = 5  # read-modify-write rounds when another pusher races us
CANDIDATES = KEEP_IN_TAG_INDEX  # how many of the newest traces a pull tries before giving up


class ShareError(Exception):
    """No usable trace, or the push could not be completed."""


@dataclass(frozen=True)
class PulledTrace:
    trace: Trace
    data: bytes
    artifact: str  # digest of the artifact manifest
    created: str


def referrers_tag(digest: str) -> str:
    """The referrers tag schema's tag for a subject: ``<algorithm>-<hex>``."""
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}-{hexpart}"


async def image_manifest(store: ImageStore, reference: str | None = None,
                         platform: Platform | None = None) -> Manifest:
    """The image manifest a trace is attached to (an index resolves to the platform's)."""
    return await store.resolve_manifest(reference, platform)


def artifact_manifest(subject: Manifest, trace_digest: str, trace_size: int, created: str) -> bytes:
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": sha256_digest(EMPTY_BLOB),
                   "size": len(EMPTY_BLOB), "data": "e30="},
        "layers": [{"mediaType": TRACE_MEDIA_TYPE, "digest": trace_digest, "size": trace_size}],
        "subject": subject.descriptor.to_json(),
        "annotations": {CREATED: created},
    }, indent=2).encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def push_trace(store: ImageStore, subject: Manifest, trace: Trace, *, created: str | None = None) -> str:
    """Store ``trace`` as an artifact referring to ``subject``; the artifact manifest's digest."""
    data = trace.encode()
    if len(data) > MAX_UNTRUSTED_SIZE:
        raise ShareError(f"trace of {len(data)} bytes is over the {MAX_UNTRUSTED_SIZE}-byte limit readers apply")
    created = created or _now()
    await store.push_blob(EMPTY_BLOB, media_type=EMPTY_MEDIA_TYPE)
    blob = await store.push_blob(data, media_type=TRACE_MEDIA_TYPE)
    manifest = artifact_manifest(subject, blob.digest, blob.size, created)
    digest = await store.push_manifest(manifest, OCI_MANIFEST)
    if await store.list_referrers(subject.digest) is None:
        entry = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest),
                 "artifactType": ARTIFACT_TYPE, "annotations": {CREATED: created}}
        await _add_to_tag_index(store, subject.digest, entry)
    log.info("trace %s pushed to %s for %s", digest, store.name, subject.digest)
    return digest


async def _tag_index(store: ImageStore, subject: str) -> list[dict]:
    try:
        index = await store.get_manifest(referrers_tag(subject))
    except ManifestNotFound:
        return []
    if not index.is_index:
        raise ShareError(f"tag {referrers_tag(subject)} of {store.name} is not an image index")
    return referrer_entries(index)


async def _add_to_tag_index(store: ImageStore, subject: str, entry: dict) -> None:
    """Read-modify-write of the referrers tag: other entries are kept; of ours the newest
    KEEP_IN_TAG_INDEX. A pusher racing us can overwrite our write: read back and try again."""
    for _ in range(TAG_UPDATE_ATTEMPTS):
        entries = [e for e in await _tag_index(store, subject) if e.get("digest") != entry["digest"]]
        ours = sorted([e for e in entries if e.get("artifactType") == ARTIFACT_TYPE], key=_created, reverse=True)
        dropped = {e["digest"] for e in ours[KEEP_IN_TAG_INDEX - 1:]}
        kept = [e for e in entries if e["digest"] not in dropped] + [entry]
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": kept}, indent=2).encode()
        await store.push_manifest(index, OCI_INDEX, tag=referrers_tag(subject))
        if any(e.get("digest") == entry["digest"] for e in await _tag_index(store, subject)):
            return
    raise ShareError(f"the referrers tag {referrers_tag(subject)} kept changing under us")


def _created(entry: dict) -> datetime:
    text = (entry.get("annotations") or {}).get(CREATED, "")
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, TypeError, AttributeError):
        return datetime.min.replace(tzinfo=timezone.utc)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


async def find_traces(store: ImageStore, subject: str) -> list[dict]:
    """Descriptors of the trace artifacts referring to ``subject``, newest first."""
    entries = await store.list_referrers(subject)
    if entries is None:
        entries = await _tag_index(store, subject)
    ours = [e for e in entries if isinstance(e, dict) and e.get("artifactType") == ARTIFACT_TYPE]
    return sorted(ours, key=_created, reverse=True)


async def pull_trace(store: ImageStore, subject: Manifest, *, max_size: int = MAX_UNTRUSTED_SIZE,
                     candidates: list[dict] | None = None) -> PulledTrace:
    """The newest trace attached to ``subject`` that passes every check (see the module);
    ``candidates``: what find_traces gave, if the caller asked already."""
    layers = [layer.digest for layer in subject.layers]
    if candidates is None:
        candidates = await find_traces(store, subject.digest)
    if not candidates:
        raise ShareError(f"no lazyfs trace is attached to {subject.digest} in {store.name}")
    problems = []
    for entry in candidates[:CANDIDATES]:
        try:
            return await _fetch_checked(store, subject, entry["digest"], layers, max_size)
        except (ShareError, TraceError, RegistryError) as e:
            log.warning("ignoring trace %s of %s in %s: %s", entry["digest"], subject.digest, store.name, e)
            problems.append(str(e))
    raise ShareError(f"no usable lazyfs trace for {subject.digest} in {store.name}: {problems[0]}")


async def _fetch_checked(store: ImageStore, subject: Manifest, digest: str, layers: list[str],
                         max_size: int) -> PulledTrace:
    manifest = await store.get_manifest(digest)  # verified against the digest
    document = manifest.json
    if manifest.is_index or document.get("artifactType") != ARTIFACT_TYPE:
        raise ShareError(f"{digest} is not a {ARTIFACT_TYPE} manifest")
    subject_field = document.get("subject")
    if not isinstance(subject_field, dict) or subject_field.get("digest") != subject.digest:
        raise ShareError(f"{digest} is attached to another image")
    blobs = manifest.layers
    if len(blobs) != 1 or blobs[0].media_type != TRACE_MEDIA_TYPE:
        raise ShareError(f"{digest} does not hold exactly one {TRACE_MEDIA_TYPE} blob")
    if blobs[0].size > max_size:
        raise ShareError(f"trace blob of {blobs[0].size} bytes is over the {max_size}-byte limit")
    data = await store.get_blob(blobs[0].digest, max_size=max_size)  # verified against the digest
    trace = decode_untrusted(data, layers, max_size=max_size)
    created = (document.get("annotations") or {}).get(CREATED, "")
    return PulledTrace(trace, data, digest, created if isinstance(created, str) else "")

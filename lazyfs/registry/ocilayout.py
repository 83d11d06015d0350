"""A local OCI image layout (image-spec image-layout.md) as an ImageStore, source and destination.

    DIR/oci-layout            {"imageLayoutVersion": "1.0.0"}
    DIR/index.json            an OCI index; tagged entries carry org.opencontainers.image.ref.name
    DIR/blobs/sha256/<hex>    content-addressed blobs (manifests, configs, layers)

Every write goes to a temporary file in the same directory and is published by rename, so a
crash leaves either the old or the new file, never a torn one. Reads verify like the registry
client: whole blobs against their digest, ranges through the caller's check.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from .blobio import download_blob_atomically, fetch_blob_verified, fetch_config, measure_source
from .errors import BlobNotFound, DigestMismatch, ManifestNotFound, RegistryError
from .manifest import (
    MANIFEST_MEDIA_TYPES, MAX_MANIFEST_SIZE, OCI_INDEX, OCI_LAYER_GZIP, Descriptor, Manifest, Platform,
)
from .reference import is_digest, validate_digest
from .retry import RetryPolicy
from .store import BlobSource, RangeCheck

log = logging.getLogger(__name__)

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = "1.0.0"
_READ_BLOCK = 1 << 20


class OCILayoutStore:
    """The ImageStore of a local OCI image layout directory (created on first write)."""

    def __init__(self, path: os.PathLike[str] | str, reference: str | None = None,
                 *, retry: RetryPolicy | None = None) -> None:
        self.path = Path(path)
        self.reference = reference
        # Only whole-blob reads retry here (a blob that fails its digest twice is corrupt on disk).
        self.retry = retry or RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0)

    def __repr__(self) -> str:
        return f"OCILayoutStore({str(self.path)!r})"

    @property
    def name(self) -> str:
        return f"oci:{self.path}"

    @property
    def error_context(self) -> dict[str, str | None]:
        """What every RegistryError of this store names (no registry: the layout path)."""
        return {"registry": None, "repository": self.name}

    async def __aenter__(self) -> "OCILayoutStore":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Nothing is held open between calls."""

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hexpart = validate_digest(digest).partition(":")
        return self.path / "blobs" / algorithm / hexpart

    # -- manifests ---------------------------------------------------------------------------

    async def get_manifest(self, reference: str | None = None) -> Manifest:
        target = reference or self.reference
        if target is not None and is_digest(target):
            descriptor = self._find_in_index(lambda d: d.digest == target)
            media_type = descriptor.media_type if descriptor else None
            digest = target
        else:
            descriptor = self._select_tagged(target)
            media_type, digest = descriptor.media_type, descriptor.digest
        try:
            data = await self.get_blob(digest, max_size=MAX_MANIFEST_SIZE)
        except BlobNotFound:
            raise ManifestNotFound("manifest blob missing from the layout", repository=self.name,
                                   digest=digest) from None
        return Manifest.from_bytes(data, media_type if media_type in MANIFEST_MEDIA_TYPES else None)

    async def resolve_manifest(self, reference: str | None = None, platform: Platform | None = None) -> Manifest:
        manifest = await self.get_manifest(reference)
        if not manifest.is_index:
            return manifest
        chosen = manifest.select_platform(platform)
        image = await self.get_manifest(chosen.digest)
        if image.is_index:
            raise RegistryError("index entry is itself an index", repository=self.name, digest=chosen.digest)
        return image

    async def get_config(self, manifest: Manifest) -> dict:
        return await fetch_config(self, manifest)

    async def list_referrers(self, digest: str) -> list[dict] | None:
        """A layout has no referrers API: None (callers use the referrers tag schema)."""
        validate_digest(digest)
        return None

    async def push_manifest(self, data: bytes, media_type: str, tag: str | None = None) -> str:
        descriptor = await self.push_blob(data, media_type=media_type)
        entry = descriptor.to_json()
        if tag is not None:
            entry["annotations"] = {REF_NAME_ANNOTATION: tag}
        await anyio.to_thread.run_sync(self._add_to_index, entry, tag)
        return descriptor.digest

    def _add_to_index(self, entry: dict, tag: str | None) -> None:
        """Read-modify-write index.json under an flock, so concurrent writers do not lose entries.
        A tag moves to the new manifest; an untagged manifest is listed once."""
        with open(self.path / ".index.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = self._read_index()
            self._index_descriptors()  # refuse to rewrite an index we cannot read
            kept = [m for m in index["manifests"]
                    if not (tag is not None and (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) == tag)
                    and not (tag is None and m.get("digest") == entry["digest"] and not m.get("annotations"))]
            index["manifests"] = kept + [entry]
            self._write_atomically(self.path / "index.json", json.dumps(index, indent=2).encode())

    def tags(self) -> list[str]:
        return [d.annotations[REF_NAME_ANNOTATION] for d in self._index_descriptors()
                if REF_NAME_ANNOTATION in d.annotations]

    # -- blobs ---------------------------------------------------------------------------------

    async def blob_size(self, digest: str) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    async def get_blob(self, digest: str, *, max_size: int = 64 * 1024 * 1024) -> bytes:
        return await fetch_blob_verified(self, digest, max_size)

    async def iter_blob(self, digest: str) -> AsyncIterator[bytes]:
        path = self.blob_path(digest)
        hasher = hashlib.sha256()
        try:
            async with await anyio.open_file(path, "rb") as f:
                while block := await f.read(_READ_BLOCK):
                    hasher.update(block)
                    yield block
        except FileNotFoundError:
            raise BlobNotFound("blob not in the layout", repository=self.name, digest=digest) from None
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            raise DigestMismatch(f"blob file hashes to {actual}", repository=self.name, digest=digest)

    async def download_blob(self, digest: str, path: os.PathLike[str] | str) -> int:
        return await download_blob_atomically(self, digest, Path(path))

    async def read_range(self, digest: str, offset: int, length: int, *, verify: RangeCheck | None = None,
                         what: str | None = None, retry: RetryPolicy | None = None) -> bytes:
        # A local file is read once (`retry` is for network stores): wrong bytes here are on disk.
        if offset < 0 or length < 0:
            raise ValueError(f"invalid range offset={offset} length={length}")
        path = self.blob_path(digest)

        def read() -> bytes:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(length)

        try:
            data = await anyio.to_thread.run_sync(read)
        except FileNotFoundError:
            raise BlobNotFound("blob not in the layout", repository=self.name, digest=digest) from None
        if verify is not None and length and not verify(data):
            raise DigestMismatch(f"{what or 'blob'}: bytes {offset}-{offset + length - 1} failed verification",
                                 repository=self.name, digest=digest)
        return data

    async def push_blob(
        self, source: BlobSource, *, digest: str | None = None, media_type: str = OCI_LAYER_GZIP,
        mount_from: str | None = None,
    ) -> Descriptor:
        """Copy a blob into the layout (`mount_from` has no meaning here and is ignored)."""
        size, digest = await measure_source(source, digest)
        target = self.blob_path(digest)
        if not target.exists():
            await anyio.to_thread.run_sync(self._ensure_layout)
            if isinstance(source, (bytes, bytearray, memoryview)):
                await anyio.to_thread.run_sync(self._write_atomically, target, bytes(source))
            else:
                await anyio.to_thread.run_sync(self._copy_atomically, Path(source), target, digest)
        return Descriptor(media_type, digest, size)

    # -- files ---------------------------------------------------------------------------------

    def _ensure_layout(self) -> None:
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        marker = self.path / "oci-layout"
        if not marker.exists():
            self._write_atomically(marker, json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode())
        if not (self.path / "index.json").exists():
            self._write_atomically(self.path / "index.json", json.dumps(_empty_index()).encode())

    def _read_index(self) -> dict:
        path = self.path / "index.json"
        try:
            index = json.loads(path.read_bytes())
        except FileNotFoundError:
            return _empty_index()
        except (ValueError, UnicodeDecodeError):
            raise RegistryError("index.json is not valid JSON", repository=self.name) from None
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise RegistryError("index.json has no manifests list", repository=self.name)
        return index

    def _index_descriptors(self) -> list[Descriptor]:
        try:
            return [Descriptor.from_json(m) for m in self._read_index()["manifests"]]
        except ValueError as e:
            raise RegistryError(f"invalid descriptor in index.json: {e}", repository=self.name) from None

    def _find_in_index(self, predicate) -> Descriptor | None:
        return next((d for d in self._index_descriptors() if predicate(d)), None)

    def _select_tagged(self, tag: str | None) -> Descriptor:
        descriptors = self._index_descriptors()
        if tag is None:
            if len(descriptors) == 1:
                return descriptors[0]
            raise ManifestNotFound(f"the layout holds {len(descriptors)} manifests; name one by tag or digest",
                                   repository=self.name)
        for descriptor in descriptors:
            if descriptor.annotations.get(REF_NAME_ANNOTATION) == tag:
                return descriptor
        raise ManifestNotFound(f"no manifest tagged {tag!r} in the layout", repository=self.name)

    def _write_atomically(self, target: Path, data: bytes) -> None:
        temporary = target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")
        try:
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)

    def _copy_atomically(self, source: Path, target: Path, digest: str) -> None:
        temporary = target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")
        hasher = hashlib.sha256()
        try:
            with open(source, "rb") as src, open(temporary, "wb") as dst:
                while block := src.read(_READ_BLOCK):
                    hasher.update(block)
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
            if "sha256:" + hasher.hexdigest() != digest:
                raise DigestMismatch("push source changed while it was copied", repository=self.name,
                                     digest=digest)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)


def _empty_index() -> dict:
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


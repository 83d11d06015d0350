"""The interface every image store implements: a registry repository (RegistryClient) or a
local OCI image layout (OCILayoutStore). Code above this package uses only these methods."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Protocol, runtime_checkable

from .manifest import Descriptor, Manifest, Platform
from .retry import RetryPolicy

BlobSource = bytes | os.PathLike[str] | str
"""What push_blob accepts: the bytes, or the path of a file holding them."""

RangeCheck = Callable[[bytes], bool]
"""A caller's verification of ranged bytes (e.g. a chunk digest); False means corrupt: refetch."""


def sha256_check(expected: bytes) -> RangeCheck:
    """A RangeCheck for bytes whose sha256 is known (a layer's metadata, its chunk table)."""
    return lambda data: hashlib.sha256(data).digest() == expected


@runtime_checkable
class ImageStore(Protocol):
    """One repository of images: manifests by tag or digest, blobs by digest."""

    @property
    def name(self) -> str:
        """What the store is, for messages: `registry/repository` or `oci:DIR`."""

    async def get_manifest(self, reference: str | None = None) -> Manifest:
        """The manifest or index for a tag or digest (default: the store's own reference).
        Fetched by digest, it is verified against that digest."""

    async def resolve_manifest(self, reference: str | None = None, platform: Platform | None = None) -> Manifest:
        """Like get_manifest, but an index is resolved to the image manifest for `platform`
        (default linux + host architecture)."""

    async def get_config(self, manifest: Manifest) -> dict:
        """The image configuration (JSON object) of an image manifest, sha256-verified."""

    async def list_referrers(self, digest: str) -> list[dict] | None:
        """Descriptors of the manifests whose subject is ``digest`` (referrers API), or None
        when the store has no referrers API."""

    async def get_blob(self, digest: str, *, max_size: int = ...) -> bytes:
        """A whole blob in memory, sha256-verified (for configs and small blobs)."""

    def iter_blob(self, digest: str) -> AsyncIterator[bytes]:
        """Stream a blob. A failed transfer resumes where it stopped; the sha256 is checked at
        the end and DigestMismatch raised after the last chunk if it is wrong, so callers must
        not publish what they streamed before the iteration finishes."""

    async def download_blob(self, digest: str, path: os.PathLike[str] | str) -> int:
        """Stream a blob into `path` atomically (temp + rename after verification); its size."""

    async def read_range(self, digest: str, offset: int, length: int, *, verify: RangeCheck | None = None,
                         what: str | None = None, retry: RetryPolicy | None = None) -> bytes:
        """Exactly `length` bytes of a blob from `offset` (fewer only at the blob's end).
        `verify` lets the caller reject corrupt bytes, which are then fetched again; `what`
        names the bytes in the final error ("layer metadata"); `retry` replaces the store's
        policy for this read (the chunk fetcher, which retries itself, asks for fewer attempts)."""

    async def blob_size(self, digest: str) -> int | None:
        """The blob's size, or None when the store does not have it."""

    async def push_blob(
        self, source: BlobSource, *, digest: str | None = None, media_type: str = ...,
        mount_from: str | None = None,
    ) -> Descriptor:
        """Store a blob unless it is already there; returns its descriptor."""

    async def push_manifest(self, data: bytes, media_type: str, tag: str | None = None) -> str:
        """Store a manifest or index (under `tag` if given); returns its digest."""

    async def aclose(self) -> None:
        """Release connections and files."""

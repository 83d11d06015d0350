"""Blob plumbing shared by every ImageStore: verified whole-blob reads, atomic downloads,
and reading push sources (bytes or a file) off the event loop."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path

import anyio

from .errors import DigestMismatch, RegistryError
from .manifest import MAX_MANIFEST_SIZE, Manifest, sha256_digest
from .retry import TransientFailure, run_with_retries
from .store import BlobSource


async def fetch_config(store, manifest: Manifest) -> dict:
    descriptor = manifest.config
    data = await fetch_blob_verified(store, descriptor.digest, MAX_MANIFEST_SIZE, what="image config")
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        config = None
    if not isinstance(config, dict):
        raise RegistryError("image config is not a JSON object", digest=descriptor.digest)
    return config


async def fetch_blob_verified(store, digest: str, max_size: int, what: str = "blob") -> bytes:
    """Collect iter_blob into memory, retrying the whole transfer when the digest is wrong.
    `what` names the blob in the final error ("image config")."""

    async def attempt() -> bytes:
        buffer = bytearray()
        try:
            async with contextlib.aclosing(store.iter_blob(digest)) as chunks:
                async for chunk in chunks:
                    buffer += chunk
                    if len(buffer) > max_size:
                        raise RegistryError(f"blob is larger than {max_size} bytes", digest=digest)
        except DigestMismatch as e:
            raise TransientFailure(e.message, kind=DigestMismatch) from None
        return bytes(buffer)

    return await run_with_retries(store.retry, attempt, what=f"GET {what} {digest}",
                                  error_factory=_store_error_factory(store, digest))


async def download_blob_atomically(store, digest: str, path: Path) -> int:
    temporary = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")

    async def attempt() -> int:
        size = 0
        try:
            async with await anyio.open_file(temporary, "wb") as out, \
                    contextlib.aclosing(store.iter_blob(digest)) as chunks:
                async for chunk in chunks:
                    await out.write(chunk)
                    size += len(chunk)
        except DigestMismatch as e:
            raise TransientFailure(e.message, kind=DigestMismatch) from None
        os.replace(temporary, path)
        return size

    try:
        return await run_with_retries(store.retry, attempt, what=f"download blob {digest}",
                                      error_factory=_store_error_factory(store, digest))
    finally:
        temporary.unlink(missing_ok=True)


def _store_error_factory(store, digest: str):
    def make(message: str, status: int | None) -> RegistryError:
        return RegistryError(message, status=status, digest=digest, **store.error_context)
    return make


async def measure_source(source: BlobSource, digest: str | None) -> tuple[int, str]:
    """Size and sha256 digest of a push source (hashing a file off the event loop)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        actual = sha256_digest(bytes(source))
        size = len(source)
    else:
        size, actual = await anyio.to_thread.run_sync(_hash_file, Path(source))
    if digest is not None and digest != actual:
        raise DigestMismatch(f"push source hashes to {actual}", digest=digest)
    return size, actual


def _hash_file(path: Path) -> tuple[int, str]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            hasher.update(block)
            size += len(block)
    return size, "sha256:" + hasher.hexdigest()


async def read_source(source: BlobSource, offset: int, length: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[offset:offset + length])

    def read() -> bytes:
        with open(source, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return await anyio.to_thread.run_sync(read)

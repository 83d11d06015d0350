"""The registry error contract: every failure of a store raises RegistryError or a subclass.

Messages name the registry, the repository, the digest (or tag) and the HTTP status when
known. They never contain credentials: nothing from an Authorization header, a token or a
password is ever put into a message.
"""

from __future__ import annotations


class InvalidReference(ValueError):
    """An image reference string that does not parse (bad name, tag or digest)."""


class RegistryError(Exception):
    """A registry or image-layout operation failed for good (after any retries)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        registry: str | None = None,
        repository: str | None = None,
        digest: str | None = None,
    ) -> None:
        self.message = message
        self.status = status
        self.registry = registry
        self.repository = repository
        self.digest = digest
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.registry:
            where.append(f"registry={self.registry}")
        if self.repository:
            where.append(f"repository={self.repository}")
        if self.digest:
            where.append(f"digest={self.digest}")
        if self.status is not None:
            where.append(f"HTTP status={self.status}")
        return f"{self.message} ({', '.join(where)})" if where else self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class BlobNotFound(RegistryError):
    """The blob does not exist in the repository (HTTP 404 / missing file in a layout)."""


class ManifestNotFound(RegistryError):
    """The manifest (tag or digest) does not exist (HTTP 404 / not in index.json)."""


class AuthenticationError(RegistryError):
    """The registry refused our credentials or token (HTTP 401/403 after authenticating)."""


class DigestMismatch(RegistryError):
    """Content did not match its digest (or a caller-supplied check) on every attempt."""


class NoMatchingPlatform(RegistryError):
    """An image index has no manifest for the requested platform."""

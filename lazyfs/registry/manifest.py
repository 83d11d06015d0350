"""Manifests, indexes, descriptors and platforms of both media-type families (OCI and Docker v2)."""

from __future__ import annotations

import hashlib
import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from .errors import NoMatchingPlatform, RegistryError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
IMAGE_MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_MEDIA_TYPES = INDEX_MEDIA_TYPES | IMAGE_MANIFEST_MEDIA_TYPES
# What we send as Accept when fetching manifests: every type we can read.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])
MAX_MANIFEST_SIZE = 4 * 1024 * 1024

_HOST_ARCHITECTURES = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "i386": ("386", None), "i686": ("386", None),
    "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def host(cls) -> "Platform":
        """linux plus this machine's architecture (x86_64 -> amd64, aarch64 -> arm64/v8)."""
        arch, variant = _HOST_ARCHITECTURES.get(_platform.machine(), (_platform.machine(), None))
        return cls("linux", arch, variant)

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """`os/arch[/variant]`, e.g. linux/arm64/v8."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {text!r} (expected os/arch[/variant])")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, other: dict[str, Any]) -> bool:
        """Does a descriptor's `platform` object satisfy this (wanted) platform?"""
        if other.get("os") != self.os or other.get("architecture") != self.architecture:
            return False
        if self.variant is None:
            return True
        their_variant = other.get("variant")
        # arm64 images usually omit the (only) variant v8.
        if their_variant is None and self.architecture == "arm64" and self.variant == "v8":
            return True
        return their_variant == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: Any) -> "Descriptor":
        from .reference import validate_digest

        if not isinstance(obj, dict):
            raise ValueError("descriptor is not an object")
        media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        if not isinstance(media_type, str) or not isinstance(digest, str):
            raise ValueError("descriptor lacks mediaType or digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"descriptor {digest} has an invalid size")
        validate_digest(digest)
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise ValueError(f"descriptor {digest} has invalid annotations")
        platform = obj.get("platform")
        urls = obj.get("urls") or []
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ValueError(f"descriptor {digest} has invalid urls")
        return cls(
            media_type=media_type, digest=digest, size=size,
            annotations={str(k): str(v) for k, v in annotations.items()},
            platform=platform if isinstance(platform, dict) else None,
            urls=tuple(urls),
        )

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        if self.platform:
            obj["platform"] = dict(self.platform)
        if self.urls:
            obj["urls"] = list(self.urls)
        return obj


@dataclass(frozen=True)
class Manifest:
    """A manifest or index exactly as stored: its bytes, media type and digest (sha256 of the bytes)."""

    data: bytes
    media_type: str
    digest: str

    @classmethod
    def from_bytes(cls, data: bytes, media_type: str | None = None) -> "Manifest":
        """Wrap raw manifest bytes; the media type defaults to the document's `mediaType` field."""
        if media_type not in MANIFEST_MEDIA_TYPES:
            document = _parse_json(data)
            declared = document.get("mediaType")
            if isinstance(declared, str) and declared in MANIFEST_MEDIA_TYPES:
                media_type = declared
            else:
                # An OCI manifest may omit mediaType; tell the two OCI kinds apart by shape.
                media_type = OCI_INDEX if "manifests" in document else OCI_MANIFEST
        return cls(data=data, media_type=media_type, digest=sha256_digest(data))

    @property
    def json(self) -> dict[str, Any]:
        return _parse_json(self.data)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.data))

    @property
    def manifests(self) -> list[Descriptor]:
        """The entries of an index (empty for an image manifest)."""
        return self._descriptors("manifests") if self.is_index else []

    @property
    def config(self) -> Descriptor:
        if self.is_index:
            raise RegistryError(f"{self.digest} is an index, not an image manifest", digest=self.digest)
        try:
            return Descriptor.from_json(self.json.get("config"))
        except ValueError as e:
            raise RegistryError(f"invalid config descriptor in manifest: {e}", digest=self.digest) from None

    @property
    def layers(self) -> list[Descriptor]:
        return [] if self.is_index else self._descriptors("layers")

    def select_platform(self, wanted: Platform | None = None) -> Descriptor:
        """The index entry for `wanted` (default: linux + host architecture)."""
        wanted = wanted or Platform.host()
        for desc in self.manifests:
            if desc.platform is not None and wanted.matches(desc.platform):
                return desc
        available = ", ".join(
            str(Platform(d.platform.get("os", "?"), d.platform.get("architecture", "?"), d.platform.get("variant")))
            for d in self.manifests if d.platform
        )
        raise NoMatchingPlatform(
            f"no manifest for platform {wanted} in index (available: {available or 'none'})", digest=self.digest
        )

    def _descriptors(self, key: str) -> list[Descriptor]:
        items = self.json.get(key)
        if not isinstance(items, list):
            raise RegistryError(f"manifest has no {key!r} list", digest=self.digest)
        try:
            return [Descriptor.from_json(item) for item in items]
        except ValueError as e:
            raise RegistryError(f"invalid descriptor in manifest {key}: {e}", digest=self.digest) from None


def referrer_entries(index: Manifest) -> list[dict[str, Any]]:
    """The entries of a referrers index (API answer or referrers-tag index) as JSON objects,
    each checked to be a valid descriptor; the extra fields (artifactType, annotations) kept."""
    entries = index.json.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError("referrers index has no 'manifests' list", digest=index.digest)
    try:
        for entry in entries:
            Descriptor.from_json(entry)
    except ValueError as e:
        raise RegistryError(f"invalid descriptor in referrers index: {e}", digest=index.digest) from None
    return entries


def _parse_json(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise RegistryError(f"manifest is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RegistryError("manifest is not a JSON object")
    return obj

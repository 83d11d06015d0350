"""Image references as users write them, normalised the way docker and containerd do.

    alpine                         -> docker.io/library/alpine:latest
    library/alpine:3               -> docker.io/library/alpine:3
    ghcr.io/org/app@sha256:<hex>   -> registry ghcr.io, repository org/app, digest only
    127.0.0.1:5000/ns/repo:v1      -> registry 127.0.0.1:5000
    localhost/x                    -> registry localhost (the name "localhost" is a host)
    oci:some/dir[:tag]             -> a local OCI image layout (LayoutReference)

The first path component is a registry host when it contains "." or ":" or is "localhost";
otherwise the image is on docker.io, where one-component names live under "library/".
docker.io is served by registry-1.docker.io (Reference.endpoint).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import InvalidReference

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DEFAULT_TAG = "latest"
_DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_HOST_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY_RE = re.compile(
    rf"(?:{_HOST_COMPONENT}(?:\.{_HOST_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]{{1,5}})?"
)
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_MAX_NAME_LENGTH = 255


def validate_digest(digest: str) -> str:
    """Return `digest` if it is `algorithm:hex` with a known algorithm and length, else raise."""
    algorithm, sep, hexpart = digest.partition(":")
    if not sep or algorithm not in _DIGEST_HEX_LENGTH:
        raise InvalidReference(f"unsupported or malformed digest {digest!r}")
    if len(hexpart) != _DIGEST_HEX_LENGTH[algorithm] or not re.fullmatch(r"[0-9a-f]+", hexpart):
        raise InvalidReference(f"digest {digest!r} is not {_DIGEST_HEX_LENGTH[algorithm]} lowercase hex digits")
    return digest


def validate_tag_or_digest(text: str) -> str:
    """What may follow /manifests/ in a URL: a digest or a tag (nothing else reaches the URL)."""
    if ":" in text:
        return validate_digest(text)
    if not _TAG_RE.fullmatch(text):
        raise InvalidReference(f"invalid tag {text!r}")
    return text


def is_digest(text: str) -> bool:
    try:
        validate_digest(text)
    except InvalidReference:
        return False
    return True


@dataclass(frozen=True)
class Reference:
    """A reference to an image in a registry: registry/repository[:tag][@digest]."""

    registry: str
    repository: str
    tag: str | None = DEFAULT_TAG
    digest: str | None = None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def endpoint(self) -> str:
        """The host[:port] that serves the registry API (docker.io is registry-1.docker.io)."""
        return DOCKER_HUB_ENDPOINT if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def object(self) -> str:
        """What to put after /manifests/: the digest when there is one (it wins), else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> "Reference":
        return replace(self, digest=validate_digest(digest))

    def with_tag(self, tag: str) -> "Reference":
        if not _TAG_RE.fullmatch(tag):
            raise InvalidReference(f"invalid tag {tag!r}")
        return replace(self, tag=tag, digest=None)

    def with_repository(self, repository: str) -> "Reference":
        return parse_reference(f"{self.registry}/{repository}:{self.tag or DEFAULT_TAG}")


@dataclass(frozen=True)
class LayoutReference:
    """A reference into a local OCI image layout directory: oci:DIR[:TAG or @DIGEST]."""

    path: Path
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = f"oci:{self.path}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def object(self) -> str | None:
        return self.digest if self.digest is not None else self.tag


def parse_reference(text: str) -> Reference:
    """Parse a registry image reference (see the module docstring); raise InvalidReference."""
    if not text or text != text.strip():
        raise InvalidReference(f"invalid image reference {text!r}")
    remainder, digest = text, None
    if "@" in remainder:
        remainder, _, digest = remainder.partition("@")
        validate_digest(digest)
    tag = None
    slash, colon = remainder.rfind("/"), remainder.rfind(":")
    if colon > slash:
        remainder, tag = remainder[:colon], remainder[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidReference(f"invalid tag {tag!r} in {text!r}")
    first, sep, rest = remainder.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
        if not _REGISTRY_RE.fullmatch(registry):
            raise InvalidReference(f"invalid registry host {registry!r} in {text!r}")
    else:
        registry, repository = DEFAULT_REGISTRY, remainder
    if registry in _DOCKER_HUB_ALIASES:
        registry = DEFAULT_REGISTRY
        if "/" not in repository:
            repository = f"library/{repository}"
    if not _REPOSITORY_RE.fullmatch(repository):
        raise InvalidReference(
            f"invalid repository name {repository!r} in {text!r} "
            "(lowercase letters, digits and separators . _ __ - /)"
        )
    if len(repository) > _MAX_NAME_LENGTH:
        raise InvalidReference(f"repository name longer than {_MAX_NAME_LENGTH} characters in {text!r}")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest)


def parse_layout_reference(text: str) -> LayoutReference:
    """Parse `oci:DIR`, `oci:DIR:TAG` or `oci:DIR@DIGEST` (skopeo's syntax)."""
    if not text.startswith("oci:") or len(text) == 4:
        raise InvalidReference(f"invalid OCI layout reference {text!r} (expected oci:DIR[:TAG])")
    body = text[4:]
    digest = None
    if "@" in body:
        body, _, digest = body.rpartition("@")
        validate_digest(digest)
    tag = None
    head, sep, last = body.rpartition(":")
    if sep and head and "/" not in last:
        if not _TAG_RE.fullmatch(last):
            raise InvalidReference(f"invalid tag {last!r} in {text!r}")
        body, tag = head, last
    if not body:
        raise InvalidReference(f"OCI layout reference {text!r} has no directory")
    return LayoutReference(path=Path(body), tag=tag, digest=digest)


def parse_any_reference(text: str) -> Reference | LayoutReference:
    """A registry reference, or a local OCI layout when the text starts with `oci:`."""
    if text.startswith("oci:"):
        return parse_layout_reference(text)
    return parse_reference(text)

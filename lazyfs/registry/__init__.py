"""Image stores: OCI distribution registries (httpx) and local OCI image layouts, one interface.

    store = open_store("127.0.0.1:5000/app:v1")      # or "oci:some/dir:v1"
    manifest = await store.resolve_manifest()       # an index resolves to linux/<host arch>
    data = await store.read_range(layer.digest, offset, length)

See docs/parts/registry.md for auth, retries, redirects and errors.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import httpx

from .auth import Authenticator, CredentialStore, Credentials, Secret
from .client import RegistryClient, is_insecure_registry, make_http_client
from .hosts import DEFAULT_HOSTS_DIR, HostsConfigError, RegistryHost, registry_hosts
from .errors import (
    AuthenticationError, BlobNotFound, DigestMismatch, InvalidReference, ManifestNotFound, NoMatchingPlatform,
    RegistryError,
)
from .manifest import Descriptor, Manifest, Platform
from .ocilayout import OCILayoutStore
from .reference import LayoutReference, Reference, parse_any_reference, parse_layout_reference, parse_reference
from .retry import RetryPolicy
from .store import ImageStore, RangeCheck, sha256_check


def open_store(
    reference: str,
    *,
    http: httpx.AsyncClient | None = None,
    authenticator: Authenticator | None = None,
    retry: RetryPolicy | None = None,
    insecure_registries: Iterable[str] = (),
    hosts_dir: Path | None = None,
    auth_file: Path | None = None,
) -> RegistryClient | OCILayoutStore:
    """The store a reference string names: `oci:DIR[:TAG]` is a local layout, anything else a
    registry repository. Without an `authenticator`, credentials come from `auth_file` (a
    Docker config.json; default $DOCKER_CONFIG or ~/.docker). `hosts_dir` is a containerd
    certs.d directory naming mirrors (lazyfs.registry.hosts); None: none. Without `http`,
    the store owns a new client (closed by aclose())."""
    parsed = parse_any_reference(reference)
    if isinstance(parsed, LayoutReference):
        return OCILayoutStore(parsed.path, parsed.object, retry=retry)
    if authenticator is None:
        authenticator = Authenticator(CredentialStore.from_docker_config(auth_file))
    insecure = is_insecure_registry(parsed.registry, insecure_registries)
    return RegistryClient(
        parsed,
        http if http is not None else make_http_client(),
        authenticator=authenticator,
        retry=retry,
        insecure=insecure,
        owns_http=http is None,
        hosts=registry_hosts(parsed.registry, parsed.endpoint, hosts_dir=hosts_dir, insecure=insecure),
    )


__all__ = [
    "AuthenticationError", "Authenticator", "BlobNotFound", "CredentialStore", "Credentials", "DEFAULT_HOSTS_DIR",
    "Descriptor", "DigestMismatch", "HostsConfigError", "RegistryHost", "registry_hosts", "ImageStore", "InvalidReference", "LayoutReference", "Manifest", "ManifestNotFound",
    "NoMatchingPlatform", "OCILayoutStore", "Platform", "Reference", "RegistryClient", "RegistryError",
    "RangeCheck", "RetryPolicy", "Secret", "is_insecure_registry", "make_http_client", "open_store", "parse_any_reference",
    "parse_layout_reference", "parse_reference", "sha256_check",
]

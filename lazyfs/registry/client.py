"""RegistryClient: one repository of an OCI distribution registry, over an injected httpx.AsyncClient.

Every operation is a series of attempts run by the RetryPolicy: connection errors, timeouts,
short or corrupt bodies, 429 and 5xx are retried with backoff (honouring Retry-After); 404
raises BlobNotFound/ManifestNotFound at once; anything else raises RegistryError. Bytes are
only returned after verification: manifests fetched by digest and whole blobs against their
sha256, ranged reads against the Content-Range we asked for and the caller's own check
(`verify`, e.g. sha256_check). No request waits without bound: its answer (headers) within the
policy's attempt_timeout, then its body at least 1 MiB per attempt_timeout.

Blob GETs follow redirects (to a CDN, say) without sending our registry credentials there,
and remember the final URL per blob: later reads of that blob go straight to it until it
fails, then we ask the registry again.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import anyio
import httpx

from .auth import Authenticator
from .hosts import HostHealth, RegistryHost
from .errors import (
    AuthenticationError, BlobNotFound, DigestMismatch, ManifestNotFound, RegistryError,
)
from .manifest import (
    MANIFEST_ACCEPT, MAX_MANIFEST_SIZE, OCI_INDEX, OCI_LAYER_GZIP, Descriptor, Manifest, Platform, referrer_entries,
    sha256_digest,
)
from .reference import Reference, is_digest, validate_digest, validate_tag_or_digest
from .retry import (
    Retrier, RetryPolicy, StreamProgress, TransientFailure, parse_retry_after, run_with_retries,
)
from .blobio import download_blob_atomically, fetch_blob_verified, fetch_config, measure_source, read_source
from .store import BlobSource, RangeCheck

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_MAX_BLOB_IN_MEMORY = 64 * 1024 * 1024
DEFAULT_MONOLITHIC_LIMIT = 16 * 1024 * 1024
DEFAULT_UPLOAD_CHUNK_SIZE = 8 * 1024 * 1024
_MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHECK_ON_LOOP_MAX = 1 << 20
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def registry_host(registry: str) -> str:
    """The host part of `host[:port]` (IPv6 brackets removed)."""
    if registry.startswith("["):
        return registry[1:registry.index("]")]
    return registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry


def is_insecure_registry(registry: str, insecure_registries: Iterable[str] = ()) -> bool:
    """Plain HTTP is used for loopback registries and those listed (host or host:port)."""
    host = registry_host(registry)
    listed = set(insecure_registries)
    if registry in listed or host in listed or host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_http_client(*, timeout: float = 30.0, max_connections: int = 32) -> httpx.AsyncClient:
    """An AsyncClient suited to registries: TLS verified, bounded pool, no automatic redirects
    (RegistryClient follows them itself so credentials never leak to another host)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        follow_redirects=False,
        verify=True,
    )


class RegistryClient:
    """The ImageStore of one registry repository (reference.registry / reference.repository)."""

    def __init__(
        self,
        reference: Reference,
        http: httpx.AsyncClient,
        *,
        authenticator: Authenticator | None = None,
        retry: RetryPolicy | None = None,
        insecure: bool | None = None,
        monolithic_limit: int = DEFAULT_MONOLITHIC_LIMIT,
        upload_chunk_size: int = DEFAULT_UPLOAD_CHUNK_SIZE,
        owns_http: bool = False,
        hosts: Sequence[RegistryHost] | None = None,
    ) -> None:
        self.reference = reference
        self.retry = retry or RetryPolicy()
        self._http = http
        self._auth = authenticator or Authenticator()
        self._owns_http = owns_http
        if insecure is None:
            insecure = is_insecure_registry(reference.registry)
        scheme = "http" if insecure else "https"
        # Reads go to the hosts in order (mirrors first, lazyfs.registry.hosts); uploads and
        # redirect targets are relative to the last one, the registry's server.
        self.hosts = list(hosts) if hosts else [RegistryHost(f"{scheme}://{reference.endpoint}/v2")]
        server = self.hosts[-1]
        self._origin = f"{server.api_root.split('://', 1)[0]}://{server.netloc}"
        self._base = f"{server.api_root}/{reference.repository}"
        self._health = HostHealth()
        self._unasked = UnaskedBytes()
        self._tls_clients: dict[RegistryHost, httpx.AsyncClient] = {}
        self.monolithic_limit = monolithic_limit
        self.upload_chunk_size = upload_chunk_size
        self._blob_locations: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"RegistryClient({self.name!r}, base={self._base!r})"

    @property
    def name(self) -> str:
        return f"{self.reference.registry}/{self.reference.repository}"

    async def __aenter__(self) -> "RegistryClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._unasked.close()
        for client in self._tls_clients.values():
            await client.aclose()
        self._tls_clients.clear()
        if self._owns_http:
            await self._http.aclose()

    @property
    def error_context(self) -> dict[str, str]:
        """What every RegistryError of this store names."""
        return {"registry": self.reference.registry, "repository": self.reference.repository}

    def remembered_location(self, digest: str) -> str | None:
        """The redirect target remembered for a blob, if any."""
        return self._blob_locations.get(digest)

    # -- manifests ---------------------------------------------------------------------------

    async def get_manifest(self, reference: str | None = None) -> Manifest:
        target = validate_tag_or_digest(reference or self.reference.object)
        by_digest = is_digest(target)

        async def attempt() -> Manifest:
            response = await self._send_via_hosts("pull" if by_digest else "resolve", "GET",
                                                  f"/manifests/{target}", stream=True,
                                                  headers={"Accept": MANIFEST_ACCEPT})
            try:
                await self._check(response, (200,), f"GET manifest {target}", target, ManifestNotFound)
                data = await _read_capped(response, MAX_MANIFEST_SIZE, f"manifest {target}",
                                          self.retry.attempt_timeout)
            finally:
                await response.aclose()
            digest = sha256_digest(data)
            if by_digest and digest != target:
                raise TransientFailure(f"manifest bytes hash to {digest}, not the requested digest",
                                       kind=DigestMismatch)
            announced = response.headers.get("docker-content-digest", "")
            if not by_digest and announced.startswith("sha256:") and announced != digest:
                raise TransientFailure(f"manifest bytes hash to {digest}, registry announced {announced}",
                                       kind=DigestMismatch)
            media_type = response.headers.get("content-type", "").split(";")[0].strip() or None
            return Manifest.from_bytes(data, media_type)

        return await run_with_retries(self.retry, attempt, what=f"GET manifest {target}",
                                      error_factory=self._error_factory(target))

    async def resolve_manifest(self, reference: str | None = None, platform: Platform | None = None) -> Manifest:
        manifest = await self.get_manifest(reference)
        if not manifest.is_index:
            return manifest
        chosen = manifest.select_platform(platform)
        image = await self.get_manifest(chosen.digest)
        if image.is_index:
            raise RegistryError("index entry is itself an index", registry=self.reference.registry,
                                repository=self.reference.repository, digest=chosen.digest)
        return image

    async def get_config(self, manifest: Manifest) -> dict:
        return await fetch_config(self, manifest)

    async def list_referrers(self, digest: str) -> list[dict] | None:
        """The descriptors (raw JSON objects, with artifactType and annotations) of the manifests
        whose subject is ``digest``, from the referrers API (distribution spec 1.1); None when
        the registry has no such API (404, 400 or 406, or a 200 that is not an OCI index), and
        the caller falls back on the referrers tag schema."""
        validate_digest(digest)

        async def attempt() -> list[dict] | None:
            response = await self._send("GET", f"{self._base}/referrers/{digest}", stream=True,
                                        headers={"Accept": OCI_INDEX})
            try:
                if response.status_code in (400, 404, 406):
                    return None
                await self._check(response, (200,), f"GET referrers of {digest}", digest)
                if response.headers.get("content-type", "").split(";")[0].strip() != OCI_INDEX:
                    return None
                data = await _read_capped(response, MAX_MANIFEST_SIZE, f"referrers of {digest}")
            finally:
                await response.aclose()
            return referrer_entries(Manifest.from_bytes(data, OCI_INDEX))

        return await run_with_retries(self.retry, attempt, what=f"GET referrers of {digest}",
                                      error_factory=self._error_factory(digest))

    async def push_manifest(self, data: bytes, media_type: str, tag: str | None = None) -> str:
        digest = sha256_digest(data)
        target = validate_tag_or_digest(tag) if tag else digest

        async def attempt() -> str:
            response = await self._send("PUT", f"{self._base}/manifests/{target}", push=True,
                                        headers={"Content-Type": media_type}, content=data)
            try:
                await self._check(response, (200, 201), f"PUT manifest {target}", digest)
            finally:
                await response.aclose()
            announced = response.headers.get("docker-content-digest")
            if announced and announced != digest:
                raise RegistryError(f"registry stored the manifest as {announced}", status=response.status_code,
                                    registry=self.reference.registry, repository=self.reference.repository,
                                    digest=digest)
            return digest

        return await run_with_retries(self.retry, attempt, what=f"PUT manifest {target}",
                                      error_factory=self._error_factory(digest))

    # -- blobs: reads --------------------------------------------------------------------------

    async def blob_size(self, digest: str, *, capability: str = "pull") -> int | None:
        """The blob's size, asking the hosts with `capability` ("push": whether an upload is
        needed, which a mirror cannot answer for the registry)."""
        validate_digest(digest)

        async def attempt() -> int | None:
            response = await self._send_via_hosts(capability, "HEAD", f"/blobs/{digest}")
            hops = 0
            while response.status_code in _REDIRECT_STATUSES and hops < _MAX_REDIRECTS:
                hops += 1
                response = await self._transmit("HEAD", _redirect_target(response), {}, None, stream=False)
            if response.status_code == 404:
                return None
            await self._check(response, (200,), f"HEAD blob {digest}", digest)
            length = response.headers.get("content-length")
            if length is None or not length.isdigit():
                raise RegistryError("HEAD blob answer has no Content-Length", status=response.status_code,
                                    registry=self.reference.registry, repository=self.reference.repository,
                                    digest=digest)
            return int(length)

        return await run_with_retries(self.retry, attempt, what=f"HEAD blob {digest}",
                                      error_factory=self._error_factory(digest))

    async def get_blob(self, digest: str, *, max_size: int = DEFAULT_MAX_BLOB_IN_MEMORY) -> bytes:
        return await fetch_blob_verified(self, digest, max_size)

    async def iter_blob(self, digest: str) -> AsyncIterator[bytes]:
        validate_digest(digest)
        hasher = hashlib.sha256()
        received = 0
        retrier = Retrier(self.retry, f"GET blob {digest}", self._error_factory(digest))
        while True:
            try:
                headers = {"Range": f"bytes={received}-"} if received else {}
                response = await self._open_blob(digest, headers)
                progress = StreamProgress(self.retry.attempt_timeout)
                try:
                    if received and response.status_code == 416:
                        break  # the failure came after the last byte: nothing left to resume
                    await self._check(response, (200, 206), f"GET blob {digest}", digest, BlobNotFound)
                    skip = received if response.status_code == 200 else 0
                    if response.status_code == 206:
                        start, _, _ = _content_range(response)
                        if start != received:
                            raise TransientFailure(f"asked to resume at {received}, got bytes from {start}")
                    async for chunk in response.aiter_bytes():
                        if skip:
                            cut = min(skip, len(chunk))
                            chunk, skip = chunk[cut:], skip - cut
                            if not chunk:
                                continue
                        progress.arrived(len(chunk))  # too slow: this piece is fetched again
                        hasher.update(chunk)
                        received += len(chunk)
                        yield chunk
                    if skip:
                        raise TransientFailure("body ended before the resume offset")
                finally:
                    await response.aclose()
                break
            except httpx.TransportError as e:
                await retrier.failed(TransientFailure(_describe_transport_error(e)))
            except TransientFailure as failure:
                await retrier.failed(failure)
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            raise DigestMismatch(f"blob content hashes to {actual}", registry=self.reference.registry,
                                 repository=self.reference.repository, digest=digest)

    async def download_blob(self, digest: str, path: os.PathLike[str] | str) -> int:
        return await download_blob_atomically(self, digest, Path(path))

    async def read_range(self, digest: str, offset: int, length: int, *, verify: RangeCheck | None = None,
                         what: str | None = None, retry: RetryPolicy | None = None) -> bytes:
        validate_digest(digest)
        if offset < 0 or length < 0:
            raise ValueError(f"invalid range offset={offset} length={length}")
        if length == 0:
            return b""
        last = offset + length - 1
        kept = self._unasked.get(digest, offset, length)
        if kept is not None:
            if verify is None or await _passes(verify, kept):
                return kept
            self._unasked.drop(digest)

        policy = retry or self.retry

        async def attempt() -> bytes:
            response = await self._open_blob(digest, {"Range": f"bytes={offset}-{last}"})
            progress = StreamProgress(policy.attempt_timeout)
            try:
                if response.status_code == 416:
                    raise RegistryError(f"range {offset}-{last} is beyond the end of the blob", status=416,
                                        registry=self.reference.registry,
                                        repository=self.reference.repository, digest=digest)
                await self._check(response, (200, 206), f"GET blob {digest} range {offset}-{last}", digest, BlobNotFound)
                if response.status_code == 206:
                    data = await _read_partial_content(response, offset, last, progress)
                else:
                    # A 200 carries the whole blob (a pull-through cache that has not cached
                    # it yet answers so): the bytes before ours came too; keep them.
                    spool = self._unasked.spool()
                    try:
                        data, received = await _read_full_body_head(response, offset, length, spool, progress)
                    except BaseException:
                        spool.close()
                        raise
                    self._unasked.keep(digest, spool, received)
            except httpx.TransportError as e:
                self._blame(response)
                raise TransientFailure(_describe_transport_error(e)) from None
            except TransientFailure:
                self._blame(response)
                raise
            finally:
                await response.aclose()
            if verify is not None and not await _passes(verify, data):
                self._unasked.drop(digest)
                self._blame(response)
                raise TransientFailure(f"bytes {offset}-{last} failed verification", kind=DigestMismatch)
            return data

        label = f"GET blob {digest} range {offset}-{last}" if what is None else f"{what} (bytes {offset}-{last})"
        # Streamed: a long range may take long; it must keep arriving (see StreamProgress).
        return await run_with_retries(policy, attempt, what=label, error_factory=self._error_factory(digest))

    async def iter_range(self, digest: str, offset: int, length: int) -> AsyncIterator[bytes]:
        """The bytes of a range as they arrive, exactly `length` of them (or a RegistryError).

        Unlike read_range nothing is verified here (the caller checks what it cuts out of the
        pieces); a transfer that fails before its end is resumed where it stopped, under the same
        retry policy, so the pieces never repeat or skip a byte."""
        validate_digest(digest)
        if offset < 0 or length < 0:
            raise ValueError(f"invalid range offset={offset} length={length}")
        last = offset + length - 1
        what = f"GET blob {digest} range {offset}-{last}"
        retrier = Retrier(self.retry, what, self._error_factory(digest))
        received = 0
        while received < length:
            position = offset + received
            try:
                response = await self._open_blob(digest, {"Range": f"bytes={position}-{last}"})
                try:
                    if response.status_code == 416:
                        raise RegistryError(f"range {position}-{last} is beyond the end of the blob", status=416,
                                            **self.error_context, digest=digest)
                    await self._check(response, (200, 206), what, digest, BlobNotFound)
                    skip = 0
                    if response.status_code == 206:
                        start, end, _ = _content_range(response)
                        if start != position or end != last:
                            raise TransientFailure(f"asked for bytes {position}-{last}, got {start}-{end}")
                    else:  # a 200 carries the whole blob
                        skip = position
                    progress = StreamProgress(self.retry.attempt_timeout)
                    async for piece in response.aiter_bytes():
                        progress.arrived(len(piece))
                        if skip:
                            cut = min(skip, len(piece))
                            piece, skip = piece[cut:], skip - cut
                        piece = piece[:length - received]
                        if piece:
                            received += len(piece)
                            yield piece
                        if received >= length:
                            break
                    if received < length:
                        raise TransientFailure(f"short body: {received} of {length} bytes")
                finally:
                    await response.aclose()
            except httpx.TransportError as e:
                await retrier.failed(TransientFailure(_describe_transport_error(e)))
            except TransientFailure as failure:
                await retrier.failed(failure)

    # -- blobs: writes -------------------------------------------------------------------------

    async def push_blob(
        self, source: BlobSource, *, digest: str | None = None, media_type: str = OCI_LAYER_GZIP,
        mount_from: str | None = None,
    ) -> Descriptor:
        size, digest = await measure_source(source, digest)
        existing = await self.blob_size(digest, capability="push")
        if existing is not None:
            log.debug("blob %s already in %s", digest, self.name)
            return Descriptor(media_type, digest, existing)

        async def attempt() -> None:
            location = await self._start_upload(digest, mount_from)
            if location is None:
                return
            if size <= self.monolithic_limit:
                data = await read_source(source, 0, size)
                await self._finish_upload(location, digest, data)
                return
            offset = 0
            while offset < size:
                piece = await read_source(source, offset, min(self.upload_chunk_size, size - offset))
                response = await self._send(
                    "PATCH", location, push=True, content=piece,
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Range": f"{offset}-{offset + len(piece) - 1}"})
                try:
                    await self._check(response, (202,), f"PATCH upload of {digest}", digest)
                finally:
                    await response.aclose()
                location = self._absolute(response.headers.get("location") or location)
                offset += len(piece)
            await self._finish_upload(location, digest, b"")

        await run_with_retries(self.retry, attempt, what=f"push blob {digest}",
                               error_factory=self._error_factory(digest))
        return Descriptor(media_type, digest, size)

    async def _start_upload(self, digest: str, mount_from: str | None) -> str | None:
        """POST an upload; None when a cross-repository mount made the blob appear at once."""
        url = f"{self._base}/blobs/uploads/"
        extra: tuple[str, ...] = ()
        if mount_from and mount_from != self.reference.repository:
            url = str(httpx.URL(url, params={"mount": digest, "from": mount_from}))
            extra = (f"repository:{mount_from}:pull",)
        response = await self._send("POST", url, push=True, extra_scopes=extra)
        try:
            await self._check(response, (201, 202), f"start upload of {digest}", digest)
        finally:
            await response.aclose()
        if response.status_code == 201:
            log.debug("mounted %s into %s from %s", digest, self.name, mount_from)
            return None
        location = response.headers.get("location")
        if not location:
            raise RegistryError("upload started without a Location", status=202, registry=self.reference.registry,
                                repository=self.reference.repository, digest=digest)
        return self._absolute(location)

    async def _finish_upload(self, location: str, digest: str, data: bytes) -> None:
        url = str(httpx.URL(location).copy_merge_params({"digest": digest}))
        response = await self._send("PUT", url, push=True, content=data,
                                    headers={"Content-Type": "application/octet-stream"})
        try:
            await self._check(response, (201,), f"PUT upload of {digest}", digest)
        finally:
            await response.aclose()
        announced = response.headers.get("docker-content-digest")
        if announced and announced != digest:
            raise RegistryError(f"registry stored the blob as {announced}", status=201,
                                registry=self.reference.registry, repository=self.reference.repository,
                                digest=digest)

    # -- HTTP plumbing -------------------------------------------------------------------------

    def _scopes(self, push: bool, extra: Iterable[str] = ()) -> tuple[str, ...]:
        actions = "pull,push" if push else "pull"
        return (f"repository:{self.reference.repository}:{actions}", *extra)

    def _absolute(self, location: str) -> str:
        return str(httpx.URL(self._origin).join(location))

    async def _send_via_hosts(
        self, capability: str, method: str, path: str, *, headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """A read request to the first host (mirror or server) that has the capability and
        answers it. A host that cannot be reached, fails, or lacks the object is passed over
        for the next; the last host's answer (or failure) is the result."""
        if capability == "push":  # uploads go to the server, so the question of what it has does too
            candidates = self.hosts[-1:]
        else:
            candidates = [host for host in self.hosts if capability in host.capabilities] or self.hosts[-1:]
        now = time.monotonic()
        usable = [host for host in candidates if self._health.usable(host, now)]
        ordered = usable + [host for host in candidates if host not in usable]  # failed ones as a last resort
        for position, host in enumerate(ordered):
            last = position == len(ordered) - 1
            try:
                response = await self._send(method, host.url(self.reference.repository, path), headers=headers,
                                            stream=stream, host=host)
            except (TransientFailure, AuthenticationError) as failure:
                if last:
                    raise
                if isinstance(failure, TransientFailure):
                    self._health.failed(host, time.monotonic())
                log.info("%s %s via %s failed (%s); trying the next host", method, path, host.netloc,
                         getattr(failure, "reason", failure))
                continue
            status = response.status_code
            if last or status < 400 or status == 416:
                self._health.succeeded(host)
                return response
            await response.aclose()
            if status >= 500 or status == 429:
                self._health.failed(host, time.monotonic())
            log.info("%s %s via %s answered HTTP %d; trying the next host", method, path, host.netloc, status)
        raise AssertionError("unreachable: the last host's answer is returned")

    def _blame(self, response: httpx.Response) -> None:
        """A mirror whose answer was cut short or corrupt goes last for a while (the retry then
        asks the next host): one bad mirror must not fail every read."""
        url = response.request.url
        netloc = f"{url.host}:{url.port}" if url.port else url.host
        for host in self.hosts[:-1]:
            if host.netloc == netloc:
                self._health.failed(host, time.monotonic())

    def _http_for(self, host: RegistryHost | None) -> httpx.AsyncClient:
        """The injected client, or for a host with its own TLS settings (skip_verify, ca,
        client certificates) or connect timeout (dial_timeout) a client of its own."""
        if host is None or not host.needs_own_client:
            return self._http
        client = self._tls_clients.get(host)
        if client is None:
            timeout = self._http.timeout
            if host.dial_timeout is not None:
                timeout = httpx.Timeout(timeout.read, connect=host.dial_timeout)
            client = httpx.AsyncClient(verify=host.ssl_context(), timeout=timeout, follow_redirects=False)
            self._tls_clients[host] = client
        return client

    async def _send(
        self, method: str, url: str, *, push: bool = False, extra_scopes: Iterable[str] = (),
        headers: dict[str, str] | None = None, content: bytes | None = None, stream: bool = False,
        host: RegistryHost | None = None,
    ) -> httpx.Response:
        """One request to the registry (or a host standing in for it) with authentication
        (answering one 401 challenge). A mirror's credentials are those of its own name."""
        registry = host.netloc if host is not None and host.is_mirror else self.reference.registry
        http = self._http_for(host)
        scopes = self._scopes(push, extra_scopes)
        request_headers = {**dict(host.headers if host else ()), **(headers or {})}
        authorization = self._auth.authorization(registry, scopes)
        if authorization:
            request_headers["Authorization"] = authorization
        response = await self._transmit(method, url, request_headers, content, stream, http)
        if response.status_code != 401:
            return response
        challenge = response.headers.get("www-authenticate")
        await response.aclose()
        request_headers["Authorization"] = await self._auth.respond(
            http, registry, challenge, scopes, repository=self.reference.repository, rejected=authorization)
        response = await self._transmit(method, url, request_headers, content, stream, http)
        if response.status_code == 401:
            await response.aclose()
            raise AuthenticationError(f"{method} refused after authenticating", status=401,
                                      registry=registry, repository=self.reference.repository)
        return response

    async def _transmit(
        self, method: str, url: str, headers: dict[str, str], content: bytes | None, stream: bool,
        http: httpx.AsyncClient | None = None,
    ) -> httpx.Response:
        http = http or self._http
        request = http.build_request(method, url, headers=headers, content=content)
        seconds = self.retry.attempt_timeout
        try:
            # Bounded as a whole: a server that drips its headers is not held by a read timeout.
            with anyio.move_on_after(seconds if seconds is not None else math.inf):
                return await http.send(request, stream=stream, follow_redirects=False)
        except httpx.TransportError as e:
            raise TransientFailure(f"{method} {request.url.path}: {_describe_transport_error(e)}") from None
        raise TransientFailure(f"{method} {request.url.path}: no answer within {seconds:g}s")

    async def _open_blob(self, digest: str, headers: dict[str, str]) -> httpx.Response:
        """A streaming GET of a blob, through the remembered redirect target if there is one."""
        remembered = self._blob_locations.get(digest)
        if remembered is not None:
            try:
                response = await self._transmit("GET", remembered, headers, None, stream=True)
            except TransientFailure as failure:
                log.info("remembered location for %s failed (%s); asking the registry", digest, failure.reason)
            else:
                if response.status_code in (200, 206):
                    return response
                log.info("remembered location for %s answered %d; asking the registry", digest,
                         response.status_code)
                await response.aclose()
            self._blob_locations.pop(digest, None)
        response = await self._send_via_hosts("pull", "GET", f"/blobs/{digest}", headers=headers, stream=True)
        hops = 0
        while response.status_code in _REDIRECT_STATUSES:
            target = _redirect_target(response)
            await response.aclose()
            hops += 1
            if hops > _MAX_REDIRECTS:
                raise RegistryError("too many redirects", status=response.status_code,
                                    registry=self.reference.registry, repository=self.reference.repository,
                                    digest=digest)
            # Registry credentials stay with the registry: the target gets only the Range.
            response = await self._transmit("GET", target, headers, None, stream=True)
            if response.status_code in (200, 206):
                self._blob_locations[digest] = target
            elif response.status_code not in _REDIRECT_STATUSES | {416}:
                # A failing CDN URL is worth another round through the registry (a fresh URL).
                status = response.status_code
                await response.aclose()
                raise TransientFailure(f"redirect target answered HTTP {status}", status,
                                       parse_retry_after(response.headers.get("retry-after")))
        return response

    async def _check(
        self, response: httpx.Response, expected: tuple[int, ...], what: str, digest: str | None,
        not_found: type[RegistryError] = RegistryError,
    ) -> None:
        status = response.status_code
        if status in expected:
            return
        where = dict(status=status, registry=self.reference.registry, repository=self.reference.repository,
                     digest=digest)
        if status == 404:
            raise not_found(f"{what}: not found", **where)
        if status == 429 or status >= 500:
            raise TransientFailure(f"{what}: HTTP {status}", status,
                                   parse_retry_after(response.headers.get("retry-after")))
        if status in (401, 403):
            raise AuthenticationError(f"{what}: access denied", **where)
        raise RegistryError(f"{what}: unexpected answer{await _error_detail(response)}", **where)

    def _error_factory(self, digest: str | None):
        def make(message: str, status: int | None) -> RegistryError:
            return RegistryError(message, status=status, registry=self.reference.registry,
                                 repository=self.reference.repository, digest=digest)
        return make


async def _read_capped(response: httpx.Response, cap: int, what: str, seconds: float | None = None) -> bytes:
    buffer = bytearray()
    progress = StreamProgress(seconds)
    try:
        async for chunk in response.aiter_bytes():
            progress.arrived(len(chunk))
            buffer += chunk
            if len(buffer) > cap:
                raise RegistryError(f"{what} is larger than {cap} bytes")
    except httpx.TransportError as e:
        raise TransientFailure(_describe_transport_error(e)) from None
    return bytes(buffer)


async def _passes(verify: RangeCheck, data: bytes) -> bool:
    """The caller's check; hashing megabytes (a layer's metadata) runs in a worker thread."""
    if len(data) < _CHECK_ON_LOOP_MAX:
        return verify(data)
    return await anyio.to_thread.run_sync(verify, data)


def _content_range(response: httpx.Response) -> tuple[int, int, int | None]:
    header = response.headers.get("content-range", "")
    m = _CONTENT_RANGE_RE.fullmatch(header.strip())
    if not m:
        raise TransientFailure(f"206 answer with an invalid Content-Range {header[:60]!r}")
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


async def _read_partial_content(response: httpx.Response, offset: int, last: int, progress: StreamProgress) -> bytes:
    """The body of a 206: it must start at `offset`; it may end early only at the blob's end."""
    start, end, total = _content_range(response)
    if start != offset or end > last or end < start:
        raise TransientFailure(f"asked for bytes {offset}-{last}, got {start}-{end}")
    if end < last and (total is None or end != total - 1):
        raise TransientFailure(f"asked for bytes {offset}-{last}, got {start}-{end} of {total}")
    wanted = end - start + 1
    # Each piece goes straight into one buffer of the announced size: a growing buffer, a
    # slice and bytes() copied megabytes three times, and pieces kept until a join left the
    # heap fragmented (100 MiB of a metadata section stayed in the daemon's RSS).
    body = bytearray(wanted)
    view = memoryview(body)
    received = 0
    # Read to the end of the body (normally exactly `wanted` bytes) so the connection goes back
    # to the pool; stop early only if the server sends more than it promised.
    async for chunk in response.aiter_bytes():
        progress.arrived(len(chunk))
        fits = min(len(chunk), wanted - received)
        view[received:received + fits] = chunk[:fits] if fits < len(chunk) else chunk
        received += len(chunk)
        if received > wanted:
            break
    if received < wanted:
        raise TransientFailure(f"short body: {received} of {wanted} bytes")
    view.release()
    return bytes(body)


# After the range asked for, a whole-blob answer is read on to the blob's end when at most
# this much is left: a lazy layer's metadata, table and footer are its last bytes, read one
# after the other at attach, and each would otherwise bring the whole blob again.
READ_ON_TO_END = 8 << 20


async def _read_full_body_head(response: httpx.Response, offset: int, length: int, spool,
                               progress: StreamProgress) -> tuple[bytes, int]:
    """A 200 to a ranged request carries the whole blob: (the `length` bytes at `offset`
    (fewer at the blob's end), how many bytes of the body were read). Every byte read also goes
    to `spool` (a file), not to memory. Reading stops at the end of the range (the caller
    closes the connection), or at the blob's end if that is at most READ_ON_TO_END further,
    rather than download the rest of the blob."""
    announced = response.headers.get("content-length")
    total = int(announced) if announced and announced.isdigit() else None
    if total is not None and offset >= total:
        raise RegistryError(f"range starts at {offset}, beyond the blob's {total} bytes", status=200)
    wanted = length if total is None else min(length, total - offset)
    stop_at = offset + wanted
    if total is not None and total - stop_at <= READ_ON_TO_END:
        stop_at = total
    position = 0
    buffer = bytearray()
    async for chunk in response.aiter_bytes():
        progress.arrived(len(chunk))
        spool.write(chunk)  # page-cache writes of one body piece at a time
        chunk_end = position + len(chunk)
        if chunk_end > offset and len(buffer) < wanted:
            buffer += chunk[max(0, offset - position):offset + wanted - position]
        position = chunk_end
        if position >= stop_at:
            break
    if len(buffer) < wanted:
        raise TransientFailure(f"short body: {len(buffer)} of {wanted} bytes at offset {offset}")
    return bytes(buffer), position


class UnaskedBytes:
    """Blob bytes that came unasked with a whole-blob answer (a 200 to a Range request, as a
    pull-through cache gives for a blob it has not cached yet): everything before the range
    asked for, kept in unnamed temporary files so that later ranged reads within them need no
    request. Bounded in bytes (oldest dropped first); callers verify what is served from here
    as they verify what the registry sends."""

    def __init__(self, limit: int = 1 << 30):
        self.limit = limit
        self._kept: dict[str, tuple[object, int]] = {}  # digest -> (file holding [0, end), end)

    def spool(self):
        return tempfile.TemporaryFile()

    def keep(self, digest: str, spool, end: int) -> None:
        """Keep the first `end` bytes of the blob, written to `spool`."""
        spool.flush()
        if end > self.limit or end <= self._kept.get(digest, (None, 0))[1]:
            spool.close()
            return
        self.drop(digest)
        while self._kept and sum(size for _, size in self._kept.values()) + end > self.limit:
            self.drop(next(iter(self._kept)))
        self._kept[digest] = (spool, end)

    def drop(self, digest: str) -> None:
        kept = self._kept.pop(digest, None)
        if kept is not None:
            kept[0].close()

    def get(self, digest: str, offset: int, length: int) -> bytes | None:
        kept = self._kept.get(digest)
        if kept is None or offset + length > kept[1]:
            return None
        return os.pread(kept[0].fileno(), length, offset)

    def close(self) -> None:
        for digest in list(self._kept):
            self.drop(digest)


def _redirect_target(response: httpx.Response) -> str:
    location = response.headers.get("location")
    if not location:
        raise RegistryError(f"redirect ({response.status_code}) without a Location", status=response.status_code)
    return str(response.url.join(location))


def _describe_transport_error(error: httpx.TransportError) -> str:
    detail = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}{': ' + detail if detail else ''}"


async def _error_detail(response: httpx.Response) -> str:
    """`: CODE message` from a registry error body, if it is one (bounded; never headers)."""
    try:
        body = json.loads(await _read_capped(response, 64 * 1024, "error body"))
    except (ValueError, UnicodeDecodeError, RegistryError, TransientFailure):
        return ""
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return f": {str(errors[0].get('code', ''))[:40]} {str(errors[0].get('message', ''))[:120]}"
    return ""

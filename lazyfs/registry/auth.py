"""Registry authentication: Docker config.json credentials, Basic auth and bearer tokens.

Flow (the distribution token protocol): a request without usable credentials gets 401 with
`WWW-Authenticate`. For `Basic`, we answer with the user's username/password. For
`Bearer realm=...,service=...,scope=...`, we ask the realm for a token (GET with Basic
credentials if we have them, anonymously otherwise; or an OAuth2 refresh-token POST when
config.json holds an `identitytoken`), cache it per (registry, scopes) until it expires, and
resend. A 401 on a request that carried a cached token (expired or revoked in the middle of a
long series of reads) drops that token and fetches a fresh one once.

Secrets are held in `Secret`, whose str() and repr() are redacted; `Credentials` and
`Authenticator` reprs never show them, and no message or log line includes them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx

from .errors import AuthenticationError, RegistryError
from .retry import TransientFailure, parse_retry_after

if TYPE_CHECKING:
    from collections.abc import Iterable

log = logging.getLogger(__name__)

_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")
_DEFAULT_TOKEN_LIFETIME = 60.0
# Refresh a token this many seconds before the server says it expires.
_TOKEN_EXPIRY_MARGIN = 5.0


class Secret:
    """A string that never shows itself in str(), repr() or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('<redacted>')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, repr=False)
class Credentials:
    username: str | None = None
    password: Secret | None = None
    identity_token: Secret | None = None

    def __repr__(self) -> str:
        kinds = [k for k, v in (("password", self.password), ("identity_token", self.identity_token)) if v]
        return f"Credentials(username={self.username!r}, secrets={kinds})"

    def basic_header(self) -> str | None:
        if self.username is None or self.password is None:
            return None
        raw = f"{self.username}:{self.password.reveal()}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def docker_config_path() -> Path:
    """$DOCKER_CONFIG/config.json, else ~/.docker/config.json."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _registry_key(key: str) -> str:
    """'https://host:port/v1/' and 'host:port' name the same registry."""
    key = re.sub(r"^[a-z]+://", "", key.strip())
    return key.split("/", 1)[0].lower()


@dataclass(repr=False)
class CredentialStore:
    """Credentials per registry host (as written in config.json `auths`)."""

    by_registry: dict[str, Credentials] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"CredentialStore(registries={sorted(self.by_registry)})"

    def add(self, registry: str, credentials: Credentials) -> None:
        self.by_registry[_registry_key(registry)] = credentials

    def lookup(self, registry: str) -> Credentials | None:
        key = _registry_key(registry)
        keys = [key]
        if key in _DOCKER_HUB_KEYS:
            keys = [_registry_key(k) for k in _DOCKER_HUB_KEYS]
        for candidate in keys:
            if candidate in self.by_registry:
                return self.by_registry[candidate]
        return None

    @classmethod
    def from_docker_config(cls, path: Path | None = None) -> "CredentialStore":
        """Read `auths` from a Docker config.json; a missing file gives an empty store.

        Each entry may hold `auth` (base64 "user:password"), `username`/`password`, and/or
        `identitytoken`. Credential helpers (`credsStore`, `credHelpers`) are not consulted.
        """
        path = path or docker_config_path()
        store = cls()
        try:
            text = path.read_text()
        except FileNotFoundError:
            return store
        except OSError as e:
            raise RegistryError(f"cannot read Docker config {path}: {e.strerror}") from None
        try:
            config = json.loads(text)
        except ValueError:
            raise RegistryError(f"Docker config {path} is not valid JSON") from None
        auths = config.get("auths") if isinstance(config, dict) else None
        if not isinstance(auths, dict):
            return store
        for registry, entry in auths.items():
            if not isinstance(entry, dict):
                continue
            username, password = entry.get("username"), entry.get("password")
            if entry.get("auth"):
                try:
                    decoded = base64.b64decode(entry["auth"], validate=True).decode()
                except (binascii.Error, UnicodeDecodeError, TypeError):
                    raise RegistryError(
                        f"Docker config {path}: the `auth` field for {registry} is not base64 user:password"
                    ) from None
                username, sep, password = decoded.partition(":")
                if not sep:
                    raise RegistryError(f"Docker config {path}: the `auth` field for {registry} has no ':'")
            token = entry.get("identitytoken")
            store.add(registry, Credentials(
                username=username or None,
                password=Secret(password) if password else None,
                identity_token=Secret(token) if token else None,
            ))
        return store


@dataclass(frozen=True)
class Challenge:
    scheme: str
    params: dict[str, str]


_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> Challenge:
    """Parse `WWW-Authenticate: Bearer realm="...",service="...",scope="..."` (one challenge)."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


@dataclass
class _Token:
    value: Secret
    expires_at: float


class Authenticator:
    """Holds credentials and per-registry auth state; shared by every client of a process."""

    def __init__(self, credentials: CredentialStore | None = None) -> None:
        self._credentials = credentials or CredentialStore()
        self._scheme: dict[str, str] = {}
        self._challenge: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, frozenset[str]], _Token] = {}
        self._locks: dict[tuple[str, frozenset[str]], anyio.Lock] = {}
        self.token_requests = 0

    def __repr__(self) -> str:
        return f"Authenticator({self._credentials!r}, tokens={len(self._tokens)})"

    def authorization(self, registry: str, scopes: Iterable[str]) -> str | None:
        """The Authorization header to send up front, if we already know what works."""
        scheme = self._scheme.get(registry)
        if scheme == "basic":
            creds = self._credentials.lookup(registry)
            return creds.basic_header() if creds else None
        if scheme == "bearer":
            token = self._tokens.get((registry, frozenset(scopes)))
            if token and anyio.current_time() < token.expires_at:
                return f"Bearer {token.value.reveal()}"
        return None

    async def respond(
        self, http: httpx.AsyncClient, registry: str, header: str | None, scopes: Iterable[str],
        *, repository: str | None = None, rejected: str | None = None,
    ) -> str:
        """Answer a 401: return the Authorization header to resend with, or raise.

        `rejected` is the Authorization the refused request carried. Concurrent refusals of the
        same token wait for one another, and all but the first reuse the token it fetched."""
        scopes = frozenset(scopes)
        lock = self._locks.setdefault((registry, scopes), anyio.Lock())
        async with lock:
            current = self.authorization(registry, scopes)
            if current is not None and current != rejected and self._scheme.get(registry) == "bearer":
                return current
            return await self._respond_locked(http, registry, header, scopes, repository)

    async def _respond_locked(
        self, http: httpx.AsyncClient, registry: str, header: str | None, scopes: frozenset[str],
        repository: str | None,
    ) -> str:
        if not header:
            raise AuthenticationError("401 without a WWW-Authenticate challenge", status=401,
                                      registry=registry, repository=repository)
        challenge = parse_challenge(header)
        creds = self._credentials.lookup(registry)
        if challenge.scheme == "basic":
            basic = creds.basic_header() if creds else None
            if basic is None:
                raise AuthenticationError("registry requires Basic authentication and no credentials are "
                                          "configured for it", status=401, registry=registry, repository=repository)
            self._scheme[registry] = "basic"
            return basic
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise AuthenticationError(f"unsupported authentication scheme {challenge.scheme!r}", status=401,
                                      registry=registry, repository=repository)
        self._scheme[registry] = "bearer"
        self._tokens.pop((registry, scopes), None)
        wanted = set(scopes)
        if challenge.params.get("scope"):
            wanted.update(challenge.params["scope"].split(" "))
        token = await self._fetch_token(http, registry, challenge, sorted(wanted), creds, repository)
        self._tokens[(registry, scopes)] = token
        return f"Bearer {token.value.reveal()}"

    async def _fetch_token(
        self, http: httpx.AsyncClient, registry: str, challenge: Challenge, scopes: list[str],
        creds: Credentials | None, repository: str | None,
    ) -> _Token:
        realm = challenge.params["realm"]
        service = challenge.params.get("service")
        self.token_requests += 1
        log.debug("requesting a token from %s for %s", realm, " ".join(scopes))
        try:
            if creds is not None and creds.identity_token is not None:
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token.reveal(),
                        "client_id": "lazyfs", "scope": " ".join(scopes)}
                if service:
                    form["service"] = service
                response = await http.post(realm, data=form)
            else:
                params = [("scope", s) for s in scopes]
                if service:
                    params.append(("service", service))
                headers = {}
                basic = creds.basic_header() if creds else None
                if basic:
                    headers["Authorization"] = basic
                response = await http.get(realm, params=params, headers=headers)
        except httpx.TransportError as e:
            raise TransientFailure(f"token request to {_origin(realm)} failed: {type(e).__name__}") from None
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientFailure(f"token server answered {response.status_code}", response.status_code,
                                   parse_retry_after(response.headers.get("retry-after")))
        if response.status_code != 200:
            raise AuthenticationError(f"token server {_origin(realm)} refused the request",
                                      status=response.status_code, registry=registry, repository=repository)
        try:
            body = response.json()
            value = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            value = None
        if not isinstance(value, str) or not value:
            raise AuthenticationError(f"token server {_origin(realm)} sent no token", status=200,
                                      registry=registry, repository=repository)
        expires_at = anyio.current_time() + max(0.0, lifetime - min(_TOKEN_EXPIRY_MARGIN, lifetime / 2))
        return _Token(Secret(value), expires_at)


def _origin(url: str) -> str:
    """scheme://host of a URL (what messages may show of a realm)."""
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode()}"

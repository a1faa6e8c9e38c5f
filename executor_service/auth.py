"""Bearer API keys, each mapped to a tenant.

Keys come from ``ES_API_KEYS`` (comma separated) and/or ``ES_API_KEYS_FILE``
(one per line, ``#`` comments). An entry is ``tenant:key`` or a bare ``key``
(tenant ``default``). Every presented key is compared with every configured
key in constant time, so the answer time does not reveal a matching prefix.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from flask import Flask, g, request

from .config import CommonSettings, ConfigError
from .errors import Unauthorized

DEFAULT_TENANT = "default"
# Routes a platform probes without credentials; they reveal nothing but liveness.
PUBLIC_PATHS = frozenset({"/health", "/ready"})
# Endpoints a role declares public (``public_endpoint``): pages and their static files,
# which carry no data (the page's script sends the key with each API call).
PUBLIC_ENDPOINTS_KEY = "public_endpoints"


@dataclass(frozen=True)
class KeyRing:
    """The configured keys; empty means the server runs open."""

    entries: tuple[tuple[bytes, str], ...] = ()

    @classmethod
    def parse(cls, lines: Iterable[str]) -> KeyRing:
        entries: list[tuple[bytes, str]] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            tenant, sep, key = line.partition(":")
            if not sep:
                tenant, key = DEFAULT_TENANT, line
            tenant, key = tenant.strip(), key.strip()
            if not tenant or not key:
                raise ConfigError(f"API key entry {line[:3]}... must be 'tenant:key' or 'key'")
            entries.append((key.encode(), tenant))
        # One key, two tenants: every request with it would silently be the first's.
        seen: dict[bytes, str] = {}
        for key_bytes, tenant in entries:
            if key_bytes in seen and seen[key_bytes] != tenant:
                raise ConfigError(
                    f"the same API key is configured twice (tenants {seen[key_bytes]!r} and "
                    f"{tenant!r}): each key must be one tenant's"
                )
            seen[key_bytes] = tenant
        return cls(tuple(entries))

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> KeyRing:
        lines = settings.api_keys.split(",") if settings.api_keys else []
        if settings.api_keys_file is not None:
            try:
                lines += settings.api_keys_file.read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"ES_API_KEYS_FILE: cannot read: {exc}") from None
        return cls.parse(lines)

    @property
    def open(self) -> bool:
        return not self.entries

    def tenant_for(self, presented: str) -> str | None:
        """The tenant whose key this is, or None; time does not depend on which key matched."""
        candidate = presented.encode()
        found: str | None = None
        for key, tenant in self.entries:
            if hmac.compare_digest(candidate, key) and found is None:
                found = tenant
        return found


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def init_app(app: Flask, keyring: KeyRing) -> None:
    """Require a key on every route but the public probes; put the tenant in ``g.tenant``."""
    app.extensions["keyring"] = keyring

    @app.before_request
    def _authenticate() -> None:
        if keyring.open:
            g.tenant = DEFAULT_TENANT
            return
        if request.path in PUBLIC_PATHS:
            return
        if request.endpoint in app.extensions.get(PUBLIC_ENDPOINTS_KEY, ()):
            return
        token = bearer_token()
        tenant = keyring.tenant_for(token) if token else None
        if tenant is None:
            raise Unauthorized(headers={"WWW-Authenticate": 'Bearer realm="executor-service"'})
        g.tenant = tenant


def public_endpoint(app: Flask, endpoint: str) -> None:
    """Serve ``endpoint`` without a key (it must carry no tenant data)."""
    app.extensions.setdefault(PUBLIC_ENDPOINTS_KEY, set()).add(endpoint)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in {"localhost", ""}:
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_open_bind(binds: Iterable[str], keyring: KeyRing, allow_open: bool) -> None:
    """Refuse to serve without keys on a non-loopback address unless told it is open."""
    if not keyring.open or allow_open:
        return
    for bind in binds:
        if bind.startswith("unix:"):
            continue
        host = bind.rsplit(":", 1)[0] if ":" in bind else bind
        if not is_loopback(host):
            raise ConfigError(
                f"no API key is configured and the server would listen on {bind}: set "
                "ES_API_KEYS or ES_API_KEYS_FILE, bind to 127.0.0.1, or set ES_ALLOW_OPEN=true "
                "to serve without authentication"
            )

"""Bearer API keys for the /v1 endpoints, and the bind check the launcher runs.

Keys come from `Settings.api_keys`; a request's key is compared with every configured key with
`hmac.compare_digest` (constant time, no early exit), so timing reveals neither a key nor which
one matched. With no key configured the API is open, and `check_bind` then refuses any
non-loopback address: an open reward service is only ever reachable from its own host.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence

from pydantic import SecretStr

from service.settings import Settings


def configured_keys(keys: Sequence[SecretStr | str]) -> list[bytes]:
    """Non-blank keys as bytes (a blank key would accept `Authorization: Bearer `)."""
    out = []
    for key in keys:
        value = key.get_secret_value() if isinstance(key, SecretStr) else str(key)
        if value.strip():
            out.append(value.strip().encode("utf-8"))
    return out


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_matches(token: str | None, keys: Sequence[bytes]) -> bool:
    if token is None:
        return False
    given = token.encode("utf-8")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other host name may resolve to a public address


def check_bind(host: str, settings: Settings) -> None:
    """Raise ValueError (one line) for a non-loopback `host` when no API key is configured."""
    if is_loopback(host) or configured_keys(settings.api_keys):
        return
    raise ValueError(
        f"refusing to bind {host!r} without an API key: set REWARD_API_KEYS "
        "(e.g. '[\"<key>\"]') or bind 127.0.0.1"
    )

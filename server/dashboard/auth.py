"""Who may see the dashboard and act through it: the bearer token, a signed session cookie, CSRF tokens.

A browser signs in once with the token and gets an HttpOnly, SameSite=Strict cookie that is an HMAC of a
random session id under the token, so it is never the token itself and changing the token ends every
session. Each session's CSRF token is another HMAC of its id. Scripts may send `Authorization: Bearer`
instead; a browser cannot attach that header to a cross-site request, so those need no CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

COOKIE = "engrain_session"
SESSION_MAX_AGE_S = 7 * 24 * 3600
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


@dataclass(frozen=True)
class Session:
    kind: Literal["cookie", "bearer"]
    csrf: str | None  # what forms must carry back; None for bearer requests


class Guard:
    def __init__(self, token: str) -> None:
        self._key = token.encode()

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def token_ok(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self._key)

    def new_cookie(self, now: float | None = None) -> str:
        issued = int(now if now is not None else time.time())
        sid = f"{issued}.{secrets.token_urlsafe(16)}"
        return f"{sid}.{self._mac('session', sid)}"

    def session_id(self, cookie: str, now: float | None = None) -> str | None:
        """The session id of a valid, unexpired cookie."""
        sid, _, mac = cookie.rpartition(".")
        issued, _, _ = sid.partition(".")
        if not sid or not issued.isdigit() or not hmac.compare_digest(mac, self._mac("session", sid)):
            return None
        if (now if now is not None else time.time()) - int(issued) > SESSION_MAX_AGE_S:
            return None
        return sid

    def authenticate(self, request: Request) -> Session | None:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials:
            return Session("bearer", None) if self.token_ok(credentials.strip()) else None
        sid = self.session_id(request.cookies.get(COOKIE, ""))
        return Session("cookie", self._mac("csrf", sid)) if sid else None


def cross_site_reason(request: Request) -> str | None:
    """Why a state-changing request looks cross-site, or None. Browsers send these headers; scripts may not."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {site!r}"
    origin = request.headers.get("origin")
    if origin is not None:
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin != own:
            return f"Origin {origin!r} is not this dashboard's ({own!r})"
    return None


def csrf_reason(session: Session, submitted: str | None) -> str | None:
    if session.csrf is None:
        return None
    if not submitted or not hmac.compare_digest(submitted, session.csrf):
        return "the form's CSRF token is missing or stale; reload the page and try again"
    return None


def host_allowed(host: str, extra: tuple[str, ...]) -> bool:
    """Loopback names on any port, plus `--allowed-host` entries ('name:port' or 'name:*')."""
    name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if not name:
        name, port = host, ""
    if name in LOOPBACK_HOSTS:
        return True
    for allowed in extra:
        a_name, _, a_port = allowed.rpartition(":")
        if not a_name:
            a_name, a_port = allowed, ""
        if a_name == name and a_port in ("*", port, ""):
            return True
    return False

"""Browser sessions: log in once with a password or an API token, then a cookie.

* The cookie (:data:`SESSION_COOKIE`) holds 32 random bytes; the database keeps only their
  SHA-256, with the role, an absolute expiry and an idle timeout. It is ``HttpOnly`` (scripts
  cannot read it), ``SameSite=Strict`` (no other site's page sends it) and ``Secure`` over HTTPS.
* Every session has a CSRF token, which the page reads from ``GET /dashboard/session`` (a
  same-origin read another site cannot make) and sends back in the :data:`CSRF_HEADER` header
  on every mutating request; a cookie-authenticated POST, PUT or DELETE without it is refused,
  and so is one whose ``Origin`` names another host. Requests with ``Authorization: Bearer``
  carry no cookie and are checked as before.
* A session ends at its expiry, after :data:`SESSION_IDLE_S` without a request, at logout, and
  as soon as its user is deleted or its API token revoked (checked on every request). The role
  is read from the user or token each time, so a change applies at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

from sqlalchemy import delete, select

from edge.errors import AuthError, ConfigError, ForbiddenError
from edge.fleet import auth
from edge.fleet.auth import Principal, Role
from edge.fleet.dashboard.tables import sessions_t, users_t
from edge.fleet.dashboard.users import verify_user
from edge.fleet.db import Clock, Database, now, tokens_t

SESSION_COOKIE = "edge_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A working day: long enough not to interrupt a rollout being watched, short enough that a
# stolen cookie is worth little by the next morning.
SESSION_TTL_S = 8 * 3600.0
# An unattended browser is locked out after an hour (an open live stream is not activity).
SESSION_IDLE_S = 3600.0
# last_seen is written at most this often: a write per request would contend with ingestion.
TOUCH_EVERY_S = 60.0
# Failed logins allowed per user name (and per address) in the window, then refused until the
# oldest failure leaves it: slows guessing without letting a stranger lock an admin out for long.
MAX_FAILURES = 5
FAILURE_WINDOW_S = 300.0


@dataclass(frozen=True)
class SessionPolicy:
    """How long sessions last."""

    ttl_s: float = SESSION_TTL_S
    idle_s: float = SESSION_IDLE_S

    def __post_init__(self) -> None:
        if not 60 <= self.ttl_s <= 30 * 86400 or not 60 <= self.idle_s <= self.ttl_s:
            raise ConfigError("session lifetimes must be 60 s to 30 days, the idle timeout within the lifetime")


@dataclass(frozen=True)
class Session:
    """One logged-in browser."""

    id: str  # SHA-256 of the cookie value
    csrf: str
    kind: str  # "user" or "token"
    subject: str
    name: str
    role: Role
    created_at: float
    expires_at: float
    idle_s: float
    last_seen: float

    def principal(self) -> Principal:
        """Return the caller this session stands for."""
        return Principal(f"session:{self.kind}:{self.subject}", self.name, self.role)

    def to_public(self) -> dict[str, Any]:
        """Describe the session to its own page (CSRF token included, never the cookie)."""
        return {"name": self.name, "role": self.role.value, "kind": self.kind, "csrf": self.csrf,
                "created_at": self.created_at, "expires_at": self.expires_at, "idle_s": self.idle_s}


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def open_session(db: Database, kind: str, subject: str, name: str, role: Role, policy: SessionPolicy = SessionPolicy(),
                 address: str = "", clock: Clock = now) -> tuple[str, Session]:
    """Store a new session; return the cookie value (shown to the browser only) and the session."""
    value = secrets.token_urlsafe(32)
    t = clock()
    session = Session(_hash(value), secrets.token_urlsafe(32), kind, subject, name, role, t, t + policy.ttl_s,
                      policy.idle_s, t)
    with db.write() as conn:
        # Sweep expired sessions now and then: logins are rare, so this costs nothing noticeable.
        conn.execute(delete(sessions_t).where(sessions_t.c.expires_at < t))
        conn.execute(sessions_t.insert().values(
            id=session.id, csrf=session.csrf, kind=kind, subject=subject, name=name, role=role.value,
            created_at=t, expires_at=session.expires_at, idle_s=policy.idle_s, last_seen=t, address=address[:64]))
    return value, session


def login_password(db: Database, name: str, password: str, policy: SessionPolicy = SessionPolicy(),
                   address: str = "", clock: Clock = now) -> tuple[str, Session]:
    """Open a session for a user whose password this is, or raise AuthError."""
    user = verify_user(db, name, password)
    return open_session(db, "user", user["name"], user["name"], Role(user["role"]), policy, address, clock)


def login_token(db: Database, token: str, policy: SessionPolicy = SessionPolicy(), address: str = "",
                clock: Clock = now) -> tuple[str, Session]:
    """Open a session for the holder of an API token, or raise AuthError."""
    if not isinstance(token, str) or not token.strip():
        raise AuthError("no API token given")
    principal = auth.authenticate(db, f"Bearer {token.strip()}")
    return open_session(db, "token", principal.token_id, f"token {principal.name}", principal.role, policy,
                        address, clock)


def find_session(db: Database, cookie_value: str, clock: Clock = now, touch: bool = True) -> Session | None:
    """Return the live session of a cookie value, or None (expired, idle, ended, or its subject gone).

    ``touch`` counts this as activity (a request), postponing the idle timeout.
    """
    t, sid = clock(), _hash(cookie_value)
    with db.read() as conn:
        row = conn.execute(select(sessions_t).where(sessions_t.c.id == sid)).mappings().first()
        role = None
        if row is not None:
            if row["kind"] == "user":
                role = conn.execute(select(users_t.c.role).where(users_t.c.name == row["subject"])).scalar()
            else:
                role = conn.execute(select(tokens_t.c.role).where(
                    tokens_t.c.id == row["subject"], tokens_t.c.revoked.is_(False))).scalar()
    if row is None:
        return None
    if role is None or t >= row["expires_at"] or t >= row["last_seen"] + row["idle_s"]:
        with db.write() as conn:
            conn.execute(delete(sessions_t).where(sessions_t.c.id == sid))
        return None
    last_seen = row["last_seen"]
    if touch and t - last_seen >= TOUCH_EVERY_S:
        last_seen = t
        with db.write() as conn:
            conn.execute(sessions_t.update().where(sessions_t.c.id == sid).values(last_seen=t))
    return Session(sid, row["csrf"], row["kind"], row["subject"], row["name"], Role(role), row["created_at"],
                   row["expires_at"], row["idle_s"], last_seen)


def close_session(db: Database, cookie_value: str) -> None:
    """End the session of a cookie value (logout); unknown values are ignored."""
    with db.write() as conn:
        conn.execute(delete(sessions_t).where(sessions_t.c.id == _hash(cookie_value)))


def check_origin(headers: Mapping[str, str]) -> None:
    """Refuse a browser request that another site's page made (Origin or Sec-Fetch-Site say so)."""
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise ForbiddenError("cross-site request refused", hint="use the dashboard's own pages")
    origin = headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != headers.get("host", ""):
        raise ForbiddenError(f"request from origin {origin} refused", hint="use the dashboard's own pages")
    if origin == "null":
        raise ForbiddenError("request from an opaque origin refused")


def check_csrf(method: str, headers: Mapping[str, str], session: Session) -> None:
    """Refuse a mutating request that does not carry the session's CSRF token from its own origin."""
    if method.upper() in SAFE_METHODS:
        return
    check_origin(headers)
    sent = headers.get(CSRF_HEADER, "")
    if not sent or not hmac.compare_digest(sent, session.csrf):
        raise ForbiddenError("missing or wrong CSRF token", hint=f"send the session's token in the {CSRF_HEADER} header "
                             "(reload the page if it was open across a new login)")


def authenticate(db: Database, request: Any, clock: Clock = now) -> Principal | None:
    """Return the caller of a request carrying a session cookie (None without one).

    This is the hook :func:`edge.fleet.auth.authenticate_request` calls for requests with no
    Authorization header; it raises AuthError for a dead session, ForbiddenError for a CSRF miss.
    """
    value = request.cookies.get(SESSION_COOKIE)
    if not value:
        return None
    session = find_session(db, value, clock)
    if session is None:
        raise AuthError("your session expired or was ended", hint="log in again")
    check_csrf(request.method, request.headers, session)
    return session.principal()


def cookie_header(value: str, policy: SessionPolicy, secure: bool) -> str:
    """Return the Set-Cookie value that stores a session in the browser."""
    parts = [f"{SESSION_COOKIE}={value}", "Path=/", "HttpOnly", "SameSite=Strict", f"Max-Age={int(policy.ttl_s)}"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def clearing_cookie_header(secure: bool) -> str:
    """Return the Set-Cookie value that removes the session cookie."""
    return f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0" + ("; Secure" if secure else "")


class LoginThrottle:
    """Count failed logins per key (user name, address) and refuse more than MAX_FAILURES a window."""

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = FAILURE_WINDOW_S,
                 clock: Clock = time.monotonic) -> None:
        self.max_failures, self.window_s, self.clock = max_failures, window_s, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, t: float) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        while q and q[0] <= t - self.window_s:
            q.popleft()
        return q

    def wait_s(self, *keys: str) -> float:
        """Return how many seconds these keys must wait before trying again (0: go ahead)."""
        t = self.clock()
        with self._lock:
            waits = [q[0] + self.window_s - t for k in keys if len(q := self._recent(k, t)) >= self.max_failures]
        return max(waits, default=0.0)

    def failed(self, *keys: str) -> None:
        """Record one failed login for each key."""
        t = self.clock()
        with self._lock:
            for k in keys:
                self._recent(k, t).append(t)
            if len(self._failures) > 10_000:  # bound memory under a spray of names
                for k in [k for k, q in self._failures.items() if not q]:
                    del self._failures[k]

    def succeeded(self, *keys: str) -> None:
        """Forget the failures of these keys."""
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)

"""Users, API tokens, login sessions, CSRF and the failed-login limiter.

Passwords are hashed with argon2id. Tokens and session ids are random 256-bit values of
which only the SHA-256 is stored, so a copy of the database logs nobody in.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import NamedTuple

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session

from edgecam.errors import EdgecamError
from edgecam.ratelimit import Failures, client_key
from edgecam.server.db import SessionRow, Token, User

__all__ = [
    "Login",
    "LoginLimiter",
    "Principal",
    "check_login",
    "check_session",
    "check_token",
    "create_token",
    "create_user",
    "delete_user",
    "end_session",
    "list_tokens",
    "password_stamp",
    "revoke_token",
    "start_session",
]

USER_NAME = r"^[A-Za-z0-9_.@-]{1,64}$"
MIN_PASSWORD = 8
_hasher = PasswordHasher()
# Verified against when the user does not exist, so that timing does not tell names apart.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who makes a request: a user by session (with its CSRF token) or by API token."""

    user_id: int
    name: str
    via: str  # "session" or "token"
    csrf: str | None = None
    device: str | None = None  # a token limited to one device's clip uploads
    token_id: int | None = None


def create_user(engine: Engine, name: str, password: str) -> None:
    """Create user ``name``, or set a new password when it exists: that ends every session
    of the user (a stolen cookie dies with the old password; API tokens stay, each revoked
    on its own or with the user, :func:`delete_user`)."""
    if not re.match(USER_NAME, name):
        raise EdgecamError(f"user name {name!r}: use 1-64 letters, digits, _ . @ -")
    if len(password) < MIN_PASSWORD:
        raise EdgecamError(f"the password must have at least {MIN_PASSWORD} characters")
    digest = _hasher.hash(password)
    with Session(engine) as s, s.begin():
        user = s.scalar(select(User).where(User.name == name))
        if user is None:
            s.add(User(name=name, password_hash=digest, created=time.time()))
        else:
            user.password_hash = digest
            s.execute(delete(SessionRow).where(SessionRow.user_id == user.id))


def delete_user(engine: Engine, name: str) -> None:
    """Delete user ``name`` with its sessions and API tokens: cut off at once."""
    with Session(engine) as s, s.begin():
        user = _user(s, name)
        s.execute(delete(SessionRow).where(SessionRow.user_id == user.id))
        s.execute(delete(Token).where(Token.user_id == user.id))
        s.delete(user)


def _user(s: Session, name: str) -> User:
    user = s.scalar(select(User).where(User.name == name))
    if user is None:
        raise EdgecamError(f"no user named {name!r} (create it with edgecam server create-user)")
    return user


def create_token(
    engine: Engine, user: str, label: str | None = None, device: str | None = None
) -> tuple[int, str]:
    """A new API token of ``user``: (its id, the token). Only its hash is kept."""
    token = "ect_" + secrets.token_urlsafe(32)
    with Session(engine) as s, s.begin():
        row = Token(
            user_id=_user(s, user).id,
            token_hash=_sha(token),
            label=label,
            device=device,
            created=time.time(),
        )
        s.add(row)
        s.flush()
        return row.id, token


def list_tokens(engine: Engine, user_id: int) -> list[Token]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(select(Token).where(Token.user_id == user_id).order_by(Token.id)))


def revoke_token(engine: Engine, token_id: int, user_id: int | None = None) -> bool:
    """Revoke a token (of ``user_id`` when given); whether there was one to revoke."""
    stmt = update(Token).where(Token.id == token_id, Token.revoked.is_(None))
    if user_id is not None:
        stmt = stmt.where(Token.user_id == user_id)
    with Session(engine) as s, s.begin():
        return bool(s.execute(stmt.values(revoked=time.time())).rowcount)  # type: ignore[attr-defined]


def check_token(engine: Engine, token: str) -> Principal | None:
    with Session(engine) as s:
        row = s.execute(
            select(Token.id, Token.device, User.id, User.name)
            .join(User, User.id == Token.user_id)
            .where(Token.token_hash == _sha(token), Token.revoked.is_(None))
        ).first()
    if row is None:
        return None
    return Principal(user_id=row[2], name=row[3], via="token", device=row[1], token_id=row[0])


class Login(NamedTuple):
    """A user whose password was right, and that password's :func:`password_stamp`."""

    user_id: int
    stamp: str


def check_login(engine: Engine, name: str, password: str) -> Login | None:
    """The user when ``password`` is right for ``name``."""
    with Session(engine) as s:
        user = s.scalar(select(User).where(User.name == name))
    digest = user.password_hash if user is not None else _DUMMY_HASH
    try:
        _hasher.verify(digest, password)
    except (VerificationError, InvalidHashError):
        return None
    return Login(user.id, _stamp(digest)) if user is not None else None


def password_stamp(engine: Engine, name: str) -> str | None:
    """A digest of ``name``'s password hash, which changes with the password (what a
    known-browser cookie is signed with); None when there is no such user."""
    with Session(engine) as s:
        digest = s.scalar(select(User.password_hash).where(User.name == name))
    return None if digest is None else _stamp(digest)


def _stamp(password_hash: str) -> str:
    return _sha(password_hash)


def start_session(engine: Engine, user_id: int, hours: float) -> str:
    """A new session of ``user_id``: the cookie value."""
    value = secrets.token_urlsafe(32)
    now = time.time()
    with Session(engine) as s, s.begin():
        s.execute(delete(SessionRow).where(SessionRow.expires < now))
        s.add(
            SessionRow(
                id_hash=_sha(value),
                user_id=user_id,
                csrf=secrets.token_urlsafe(24),
                created=now,
                expires=now + hours * 3600,
            )
        )
    return value


def check_session(engine: Engine, value: str) -> Principal | None:
    with Session(engine) as s:
        row = s.execute(
            select(SessionRow.csrf, User.id, User.name)
            .join(User, User.id == SessionRow.user_id)
            .where(SessionRow.id_hash == _sha(value), SessionRow.expires > time.time())
        ).first()
    if row is None:
        return None
    return Principal(user_id=row[1], name=row[2], via="session", csrf=row[0])


def end_session(engine: Engine, value: str) -> None:
    with Session(engine) as s, s.begin():
        s.execute(delete(SessionRow).where(SessionRow.id_hash == _sha(value)))


def same_secret(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


class LoginLimiter:
    """Failed logins counted per user name at a client address, per address and per name:
    too many in the window lock that name at that address (``max_failures``), the whole
    address (``ADDRESS_FACTOR`` times as many: people behind one router share it), or the
    name for browsers it has never logged in from (``NAME_FACTOR`` times as many: many
    addresses guessing one password), until the window has passed.

    A browser the name logged in from before (a :meth:`known_value` cookie) is not held by
    the name's own lock: failing on purpose, from however many addresses, must not lock the
    owner out of the dashboard (the "device cookie" defence, OWASP). Addresses are counted
    as :func:`~edgecam.ratelimit.client_key` keys (an IPv6 /64 as one).
    """

    ADDRESS_FACTOR = 4
    NAME_FACTOR = 10
    KNOWN_DAYS = 90

    def __init__(self, max_failures: int, window_s: float, secret: bytes | None = None) -> None:
        self._max = max_failures
        self._failures = Failures(window_s)
        # Signs the known-browser cookies; one of this process's own unless given (a
        # restart then forgets the browsers, which only matters under attack).
        self._secret = secret or secrets.token_bytes(32)

    @staticmethod
    def _keys(name: str, address: str) -> tuple[tuple[str, str], str, tuple[str]]:
        key = client_key(address)
        return (name.lower(), key), key, (name.lower(),)

    def _limits(self, name: str, address: str, known: bool) -> dict[Hashable, int]:
        pair, whole, alone = self._keys(name, address)
        limits: dict[Hashable, int] = {pair: self._max, whole: self._max * self.ADDRESS_FACTOR}
        if not known:
            limits[alone] = self._max * self.NAME_FACTOR
        return limits

    def locked(self, name: str, address: str, known: bool = False) -> bool:
        """Whether a login as ``name`` from ``address`` is refused now."""
        return any(
            self._failures.count(k) >= limit
            for k, limit in self._limits(name, address, known).items()
        )

    def attempt(self, name: str, address: str, known: bool = False) -> bool:
        """In one step: False when locked; else True, the attempt counted as a failure
        until :meth:`succeeded` takes it back. Logins sent at once cannot all be tried
        before the lock: each takes its place first. ``known``: the browser showed a
        :meth:`known_value` cookie of this name."""
        return self._failures.add_within(self._limits(name, address, known))

    def __len__(self) -> int:
        """Names at addresses, addresses and names tracked."""
        return len(self._failures)

    def succeeded(self, name: str, address: str, known: bool = False) -> None:
        """The attempt had the right password: that name's failures at that address are
        forgotten, and the address's and the name's counts are given their places back."""
        pair, whole, alone = self._keys(name, address)
        self._failures.forget(pair)
        self._failures.undo(whole)
        if not known:
            self._failures.undo(alone)

    def cancel(self, name: str, address: str, known: bool = False) -> None:
        """The attempt could not be judged (the database failed): it is taken back whole,
        so that retrying through an outage locks nobody out."""
        pair, whole, alone = self._keys(name, address)
        self._failures.undo(pair)
        self._failures.undo(whole)
        if not known:
            self._failures.undo(alone)

    def known_value(self, name: str, stamp: str, now: float | None = None) -> str:
        """A cookie value saying that this browser logged in as ``name`` while its password
        had this :func:`password_stamp`: a new password makes it unknown again."""
        expires = int(time.time() if now is None else now) + self.KNOWN_DAYS * 86400
        return f"{expires}.{self._known_sig(name, stamp, expires)}"

    def is_known(
        self, value: str | None, name: str, stamp: str | None, now: float | None = None
    ) -> bool:
        """Whether ``value`` is a :meth:`known_value` of ``name`` with its password's
        ``stamp`` now (None: no such user), unexpired."""
        expires, _, sig = (value or "").partition(".")
        if stamp is None or not re.fullmatch(r"[0-9]{1,12}", expires):
            return False
        if int(expires) < (time.time() if now is None else now):
            return False
        expected = self._known_sig(name, stamp, int(expires))
        return hmac.compare_digest(sig.encode(), expected.encode())

    def _known_sig(self, name: str, stamp: str, expires: int) -> str:
        msg = f"known-browser\n{name.lower()}\n{stamp}\n{expires}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

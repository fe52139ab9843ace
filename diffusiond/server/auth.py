"""Bearer tokens: who may call the server, known by name.

Tokens come from a file (``--auth-tokens FILE``) or the ``DIFFUSIOND_AUTH_TOKENS``
environment variable, one ``name:token`` pair per line (the variable may also
separate pairs with commas; ``#`` starts a comment). The file is read again
when it changes (checked at most once a second) and on SIGHUP; a file that no
longer parses keeps the tokens already loaded, and says why in the log.

A token is compared with every known token in constant time, so neither the
timing nor the answer tells a caller which token, or how much of one, was
right. Only a token's *name* ever reaches logs and metrics.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
import time
from pathlib import Path

from diffusiond.errors import FailedPrecondition, Unauthenticated

log = logging.getLogger(__name__)

ENV_VAR = "DIFFUSIOND_AUTH_TOKENS"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
MIN_TOKEN_CHARS = 16
RECHECK_S = 1.0


def parse_tokens(text: str, origin: str) -> dict[str, str]:
    """``name:token`` pairs -> {token: name}; FailedPrecondition names the line at fault."""
    tokens: dict[str, str] = {}
    names: set[str] = set()
    entries = [line for raw in text.splitlines() for line in raw.split(",")] if origin == ENV_VAR else text.splitlines()
    for number, entry in enumerate(entries, start=1):
        line = entry.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, token = line.partition(":")
        name, token = name.strip(), token.strip()
        where = f"{origin}, entry {number}"
        if not sep or not token:
            raise FailedPrecondition(f"{where}: expected name:token")
        if not NAME_PATTERN.fullmatch(name):
            raise FailedPrecondition(f"{where}: a token's name is 1 to 64 of A-Z a-z 0-9 _ . @ -")
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
            raise FailedPrecondition(f"{where}: token {name!r} must be at least {MIN_TOKEN_CHARS} characters, no spaces")
        if name in names or token in tokens:
            raise FailedPrecondition(f"{where}: token name or token {name!r} appears twice")
        names.add(name)
        tokens[token] = name
    if not tokens:
        raise FailedPrecondition(f"{origin} holds no name:token pair; authentication would refuse every call")
    return tokens


class TokenStore:
    """The tokens a server accepts, kept current with their file."""

    def __init__(self, path: Path | None = None, text: str | None = None) -> None:
        if (path is None) == (text is None):
            raise ValueError("give the tokens' file or their text, not both")
        self.path = path
        self._lock = threading.Lock()
        self._mtime: int | None = None
        self._checked = 0.0
        self._tokens = parse_tokens(text, ENV_VAR) if text is not None else self._read()

    @classmethod
    def configured(cls, path: str | None) -> TokenStore | None:
        """The store ``--auth-tokens`` or the environment asks for; None: authentication off."""
        if path:
            return cls(path=Path(path))
        text = os.environ.get(ENV_VAR, "")
        return cls(text=text) if text.strip() else None

    @property
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._tokens.values())

    def _read(self) -> dict[str, str]:
        assert self.path is not None
        try:
            stat = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise FailedPrecondition(f"cannot read the auth tokens file {self.path}: {exc.strerror}") from None
        tokens = parse_tokens(text, str(self.path))
        self._mtime = stat.st_mtime_ns
        return tokens

    def reload(self) -> bool:
        """Read the file again (SIGHUP); keep the current tokens if it no longer parses."""
        if self.path is None:
            return False
        try:
            tokens = self._read()
        except FailedPrecondition as exc:
            log.error("auth tokens not reloaded, keeping the %d loaded: %s", len(self._tokens), exc)
            return False
        with self._lock:
            self._tokens = tokens
        log.info("auth tokens reloaded from %s: %s", self.path, ", ".join(sorted(tokens.values())))
        return True

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < RECHECK_S:
            return
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return
        if mtime != self._mtime:
            self.reload()

    def name_for(self, token: str) -> str | None:
        """The name of ``token``, or None; every known token is compared, each in constant time."""
        self._reload_if_changed()
        with self._lock:
            known = list(self._tokens.items())
        found = None
        offered = token.encode()
        for candidate, name in known:
            if hmac.compare_digest(offered, candidate.encode()):
                found = name
        return found


def bearer_token(metadata: object) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, if there is one."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def authenticate(tokens: TokenStore | None, headers: object, anonymous: str) -> str:
    """The caller's name from its ``authorization`` header (gRPC metadata or HTTP headers, as
    lower-case ``(key, value)`` pairs); ``anonymous`` when authentication is off."""
    if tokens is None:
        return anonymous
    token = bearer_token(headers)
    if token is None:
        raise Unauthenticated("this server needs an 'authorization: Bearer <token>' header")
    name = tokens.name_for(token)
    if name is None:
        raise Unauthenticated("the bearer token is not one this server knows")
    return name

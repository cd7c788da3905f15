"""``KeyStore``: API keys in ``<data_dir>/keys.sqlite`` or in the shared database (``store.url``, where every
orchestrator replica knows every key), each stored as the SHA-256 of the key.

A key made here is ``trk_`` and 43 URL-safe characters (256 random bits), so a plain SHA-256 is a
safe hash (a slow hash such as argon2 guards low-entropy passwords; it adds nothing to a 256-bit
secret and would cost every request milliseconds). A key's ``id`` is the first 16 hex digits of
its hash: the store looks the row up by id and compares the whole hash in constant time. Every call
reads the database, so a key made or revoked by another process (``tritonrag keys``) counts at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Float, MetaData, Table, Text, insert, select, update

from tritonrag.clients.wire.auth import ApiKeyCreated, ApiKeyInfo, Scope
from tritonrag.server.errors import InvalidArgumentError, NotFoundError
from tritonrag.server.store.database import StoreLocation

KEYS_FILE = "keys.sqlite"  # in the data directory
KEYS = "keys"  # the store's name (its schema, in a shared database)
KEY_PREFIX = "trk_"
MIN_KEY_CHARS = 32  # an operator's own key (auth.admin_key) is refused when shorter

_TABLES = MetaData()
_keys = Table(
    "api_keys",
    _TABLES,
    Column("id", Text, primary_key=True),
    Column("hash", Text, nullable=False),
    Column("tenant", Text, nullable=False),
    Column("scopes", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)
_INFO = (_keys.c.id, _keys.c.tenant, _keys.c.scopes, _keys.c.name, _keys.c.created_at, _keys.c.revoked_at)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh key: ``trk_`` and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    """The API keys of one orchestrator, or of every one sharing the file or the database; thread-safe."""

    def __init__(self, path: Path, location: StoreLocation | None = None) -> None:
        """Open or create the store at ``path`` (readable by its owner alone), or in ``location``'s shared database."""
        location = location or StoreLocation()
        if not location.shared:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._database = location.database(path, KEYS)
        self.where = f"the shared store (schema {self._database.schema})" if location.shared else str(path)
        with self._database.write() as conn:
            self._database.create_tables(conn, _TABLES)
        if not location.shared:
            path.chmod(0o600)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._database.close()

    def create(self, tenant: str, scopes: Iterable[Scope], name: str = "") -> ApiKeyCreated:
        """Make and store a new key; the answer holds the key, which is not kept."""
        key = new_key()
        info = self.add(key, tenant, scopes, name)
        return ApiKeyCreated(**info.model_dump(), key=key)

    def add(self, key: str, tenant: str, scopes: Iterable[Scope], name: str = "") -> ApiKeyInfo:
        """Store the hash of ``key`` (one an operator chose); a key stored before is left as it is."""
        if len(key) < MIN_KEY_CHARS:
            raise InvalidArgumentError(f"a key needs at least {MIN_KEY_CHARS} characters", field="key")
        digest = _digest(key)
        ordered = ",".join(sorted({Scope(scope) for scope in scopes}))
        row = {"id": digest[:16], "hash": digest, "tenant": tenant, "scopes": ordered, "name": name}
        with self._lock, self._database.write() as conn:
            if conn.execute(select(_keys.c.id).where(_keys.c.id == digest[:16])).first() is None:
                conn.execute(insert(_keys).values(**row, created_at=time.time()))
        return self.get(digest[:16])

    def get(self, key_id: str) -> ApiKeyInfo:
        """The key ``key_id``; ``NotFoundError`` when there is none."""
        with self._database.read() as conn:
            row = conn.execute(select(*_INFO).where(_keys.c.id == key_id)).first()
        if row is None:
            raise NotFoundError(f"key {key_id!r} does not exist", field="key_id")
        return _info(row)

    def list(self, tenant: str | None = None) -> list[ApiKeyInfo]:
        """Every key (of ``tenant`` when given), oldest first, revoked ones included."""
        query = select(*_INFO).order_by(_keys.c.created_at, _keys.c.id)
        if tenant is not None:
            query = query.where(_keys.c.tenant == tenant)
        with self._database.read() as conn:
            return [_info(row) for row in conn.execute(query)]

    def revoke(self, key_id: str) -> ApiKeyInfo:
        """Revoke the key ``key_id`` from now on (revoking twice keeps the first time); ``NotFoundError``."""
        with self._lock, self._database.write() as conn:
            conn.execute(
                update(_keys).where(_keys.c.id == key_id, _keys.c.revoked_at.is_(None)).values(revoked_at=time.time())
            )
        return self.get(key_id)

    def verify(self, key: str) -> ApiKeyInfo | None:
        """The stored key that ``key`` is, unless unknown or revoked."""
        digest = _digest(key)
        with self._database.read() as conn:
            row = conn.execute(select(_keys.c.hash, *_INFO).where(_keys.c.id == digest[:16])).first()
        if row is None or not hmac.compare_digest(row[0], digest):
            return None
        info = _info(row[1:])
        return info if info.revoked_at is None else None


def _info(row: Sequence[Any]) -> ApiKeyInfo:
    key_id, tenant, scopes, name, created_at, revoked_at = row
    return ApiKeyInfo.model_validate(
        {
            "id": key_id,
            "tenant": tenant,
            "scopes": str(scopes).split(","),
            "name": name,
            "created_at": created_at,
            "revoked_at": revoked_at,
        }
    )

"""``KeyStore``: API keys in ``<data_dir>/keys.sqlite``, each stored as the SHA-256 of the key.

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
from collections.abc import Iterable
from pathlib import Path

from tritonrag.clients.wire.auth import ApiKeyCreated, ApiKeyInfo, Scope
from tritonrag.server.errors import InvalidArgumentError, NotFoundError
from tritonrag.server.store.sqlite import connect, transaction

KEYS_FILE = "keys.sqlite"  # in the data directory
KEY_PREFIX = "trk_"
MIN_KEY_CHARS = 32  # an operator's own key (auth.admin_key) is refused when shorter

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    tenant TEXT NOT NULL,
    scopes TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""
_COLUMNS = "id, tenant, scopes, name, created_at, revoked_at"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh key: ``trk_`` and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    """The API keys of one orchestrator (or of every one sharing the file); thread-safe."""

    def __init__(self, path: Path) -> None:
        """Open or create the store at ``path`` (readable by its owner alone)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = connect(path)
        path.chmod(0o600)
        self._lock = threading.Lock()
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

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
        with self._lock, transaction(self._conn) as conn:
            conn.execute(
                "INSERT OR IGNORE INTO api_keys(id, hash, tenant, scopes, name, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (digest[:16], digest, tenant, ordered, name, time.time()),
            )
        return self.get(digest[:16])

    def get(self, key_id: str) -> ApiKeyInfo:
        """The key ``key_id``; ``NotFoundError`` when there is none."""
        with self._lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"key {key_id!r} does not exist", field="key_id")
        return _info(row)

    def list(self, tenant: str | None = None) -> list[ApiKeyInfo]:
        """Every key (of ``tenant`` when given), oldest first, revoked ones included."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM api_keys WHERE ?1 IS NULL OR tenant = ?1 ORDER BY created_at, id", (tenant,)
            ).fetchall()
        return [_info(row) for row in rows]

    def revoke(self, key_id: str) -> ApiKeyInfo:
        """Revoke the key ``key_id`` from now on (revoking twice keeps the first time); ``NotFoundError``."""
        with self._lock:
            self._conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), key_id)
            )
        return self.get(key_id)

    def verify(self, key: str) -> ApiKeyInfo | None:
        """The stored key that ``key`` is, unless unknown or revoked."""
        digest = _digest(key)
        with self._lock:
            row = self._conn.execute(f"SELECT hash, {_COLUMNS} FROM api_keys WHERE id = ?", (digest[:16],)).fetchone()
        if row is None or not hmac.compare_digest(row[0], digest):
            return None
        info = _info(row[1:])
        return info if info.revoked_at is None else None


def _info(row: tuple[object, ...]) -> ApiKeyInfo:
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

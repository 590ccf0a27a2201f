"""Who may ask and how much they have used: API keys, per-key quotas and a persistent usage store.

Keys come from ``ZSDB3KD_SERVE_TOKEN`` (one key, named ``default``) and a TOML keys file::

    [keys.alice]
    token_sha256 = "<64 hex digits>"   # printf %s "$TOKEN" | sha256sum
    max_queries = 100000               # optional; default: --max-queries

With neither, the server is open and every client is the key ``anonymous``. A request's
``Authorization: Bearer <token>`` is hashed and the hash looked up, so the keys file
holds no secret and the comparison reveals nothing about a token.

:class:`UsageStore` keeps each key's usage and the answers of recent requests (by
request id, for replays) in one SQLite database, written in one transaction per billed
request *before* the answer is sent: a server killed at any point has billed exactly the
answers it committed, and a retry of one of them is answered from the store for free.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from ..settings import ConfigError, Settings, validate


@dataclass(frozen=True)
class Key:
    """One client identity: its name (never its token) and its quota (``None``: unlimited)."""

    name: str
    max_queries: int | None = None


class KeyEntry(Settings):
    """One ``[keys.NAME]`` table of a keys file."""

    token_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="hex sha256 of the key's token")
    max_queries: int | None = Field(None, ge=0, description="this key's quota (default: --max-queries)")


class Keys:
    """The keys a server accepts (see the module docstring)."""

    def __init__(self, by_digest: dict[bytes, Key], anonymous: Key | None) -> None:
        self._by_digest = by_digest
        self.anonymous = anonymous

    @classmethod
    def load(cls, keys_file: str | None = None, token: str | None = None, max_queries: int | None = None) -> Keys:
        """Keys from a keys file and/or one token; open to all (``anonymous``) if neither."""
        by_digest: dict[bytes, Key] = {}
        if token:
            by_digest[hashlib.sha256(token.encode()).digest()] = Key("default", max_queries)
        if keys_file is not None:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            try:
                raw = tomllib.loads(Path(keys_file).read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f"keys file {keys_file}: {e}") from None
            if set(raw) != {"keys"} or not isinstance(raw["keys"], dict):
                raise ConfigError(f"keys file {keys_file}: expected only [keys.NAME] tables, got {sorted(raw)}")
            for name, entry in raw["keys"].items():
                e = validate(KeyEntry, entry, where=f"{keys_file} [keys.{name}]")
                digest = bytes.fromhex(e.token_sha256)
                if name in {k.name for k in by_digest.values()} or digest in by_digest:
                    raise ConfigError(f"keys file {keys_file}: key {name!r} repeats a name or a token "
                                      "(ZSDB3KD_SERVE_TOKEN is the key 'default')")
                by_digest[digest] = Key(name, e.max_queries if e.max_queries is not None else max_queries)
        return cls(by_digest, None if by_digest else Key("anonymous", max_queries))

    @property
    def has_quota(self) -> bool:
        return any(k.max_queries is not None for k in [*self._by_digest.values(), self.anonymous] if k)

    def identify(self, authorization: str | None) -> Key | None:
        """The key of an ``Authorization`` header, or ``None`` if it names none."""
        if self.anonymous is not None:
            return self.anonymous
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._by_digest.get(hashlib.sha256(token.strip().encode()).digest())


_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (key TEXT PRIMARY KEY, queries INTEGER NOT NULL, requests INTEGER NOT NULL,
                                  replayed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS answers (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, rid TEXT NOT NULL,
                                    model TEXT NOT NULL, digest BLOB NOT NULL, labels BLOB NOT NULL,
                                    UNIQUE (key, rid));
"""


class UsageStore:
    """Per-key usage and the replay cache, in SQLite at ``path`` (``":memory:"``: not kept).

    Every method takes the store's lock; the server calls them from its one model thread.
    """

    def __init__(self, path: str = ":memory:", *, cache_size: int = 50_000, model: str | None = None) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path, self.cache_size, self.model = path, cache_size, model or ""
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        try:
            self._db.execute("PRAGMA journal_mode=WAL")  # a kill loses nothing committed; readers never block
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            rows = self._db.execute("SELECT key, queries, requests, replayed FROM usage").fetchall()
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"state file {path}: {e}") from None
        self._usage = {k: [q, r, p] for k, q, r, p in rows}
        self.billed = 0  # images billed since this store was opened
        self._inserts = 0

    def used(self, key: str) -> int:
        """Images billed to ``key`` so far (all runs)."""
        return self._usage.get(key, [0])[0]

    def usage(self, key: Key) -> dict:
        """What ``GET /usage`` reports to the holder of ``key``."""
        queries, requests, replayed = self._usage.get(key.name, [0, 0, 0])
        remaining = None if key.max_queries is None else max(key.max_queries - queries, 0)
        return {"key": key.name, "queries": queries, "max_queries": key.max_queries, "remaining": remaining,
                "requests": requests, "replayed": replayed}

    def lookup(self, key: str, rid: str) -> tuple[bytes, np.ndarray] | None:
        """``(body digest, labels)`` of the request ``rid`` of ``key`` answered by this model, if cached."""
        if self.cache_size == 0:
            return None
        with self._lock:
            row = self._db.execute("SELECT digest, labels FROM answers WHERE key = ? AND rid = ? AND model = ?",
                                   (key, rid, self.model)).fetchone()
        return None if row is None else (row[0], np.frombuffer(row[1], dtype="<i4").astype(np.int64))

    def note_replay(self, key: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO usage VALUES (?, 0, 0, 1) ON CONFLICT (key) DO UPDATE SET "
                             "replayed = replayed + 1", (key,))
            self._usage.setdefault(key, [0, 0, 0])[2] += 1

    def bill(self, key: str, n: int, rid: str | None = None, digest: bytes = b"", labels=None) -> None:
        """Bill ``n`` images to ``key`` and remember the answer to ``rid``, in one transaction."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT INTO usage VALUES (?, ?, 1, 0) ON CONFLICT (key) DO UPDATE SET "
                           "queries = queries + excluded.queries, requests = requests + 1", (key, n))
                if rid is not None and self.cache_size:
                    blob = np.asarray(labels, dtype="<i4").tobytes()
                    db.execute("INSERT OR REPLACE INTO answers (key, rid, model, digest, labels) "
                               "VALUES (?, ?, ?, ?, ?)", (key, rid, self.model, digest, blob))
                    self._inserts += 1
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            entry = self._usage.setdefault(key, [0, 0, 0])
            entry[0] += n
            entry[1] += 1
            self.billed += n
            if self._inserts >= max(self.cache_size // 16, 64):
                self._inserts = 0
                db.execute("DELETE FROM answers WHERE seq <= (SELECT MAX(seq) FROM answers) - ?", (self.cache_size,))

    def close(self) -> None:
        with self._lock:
            self._db.close()

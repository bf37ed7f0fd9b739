"""The backend's database: protected features and their embeddings in SQLite, never z or images.

One table, written only inside a transaction per enrollment, so an enrollment is stored whole or
not at all. ``feature`` holds the plug-in's answer byte-for-byte (its dtype and shape beside it);
``embedding`` is R(feature), kept so that matching is one matrix product instead of a pass of R
over the whole gallery per probe. R ships with the backend, so anyone holding ``feature`` can
compute ``embedding``: storing it reveals nothing more. ``recognizer`` names the R that computed
it; rows computed by another R are re-embedded from ``feature`` when the backend starts, which is
why the feature itself is kept (swapping R needs no re-enrollment).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA = """\
CREATE TABLE IF NOT EXISTS faces (
    face_id       INTEGER PRIMARY KEY AUTOINCREMENT,
    person_id     TEXT    NOT NULL,
    feature       BLOB    NOT NULL,  -- the plug-in's protected feature, raw little-endian bytes
    feature_dtype TEXT    NOT NULL,  -- 'float32' or 'float16', as the plug-in answered
    feature_shape TEXT    NOT NULL,  -- JSON list, e.g. [64, 77, 77]
    plugin_model  TEXT    NOT NULL,  -- bundle version the plug-in reported for this face
    embedding     BLOB    NOT NULL,  -- R(feature): float32 unit vector
    recognizer    TEXT    NOT NULL,  -- version of the R that computed embedding
    enrolled_at   REAL    NOT NULL   -- Unix time
);
CREATE INDEX IF NOT EXISTS faces_person ON faces (person_id);
"""


@dataclass(frozen=True)
class Gallery:
    """Every enrolled face's embedding, row-aligned with its person and face id."""

    face_ids: list[int]
    person_ids: list[str]
    embeddings: np.ndarray  # (N, D) float32


class Store:
    """A SQLite file shared by the HTTP server's threads; one connection, guarded by a lock."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, person_id: str, features: np.ndarray, plugin_model: str, embeddings: np.ndarray,
            recognizer: str) -> list[int]:
        """Stores one enrollment (N faces of one person) in a single transaction; returns the face ids."""
        shape = json.dumps(list(features.shape[1:]))
        dtype = np.dtype(features.dtype).name
        now = time.time()
        rows = [(person_id, np.ascontiguousarray(f, dtype=f.dtype.newbyteorder("<")).tobytes(), dtype, shape,
                 plugin_model, np.asarray(e, "<f4").tobytes(), recognizer, now)
                for f, e in zip(features, embeddings, strict=True)]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                ids = [self._db.execute(
                    "INSERT INTO faces (person_id, feature, feature_dtype, feature_shape, plugin_model, embedding, "
                    "recognizer, enrolled_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row).lastrowid for row in rows]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [int(i) for i in ids if i is not None]

    def gallery(self, person_id: str | None = None) -> Gallery:
        """The embeddings of one person, or of everyone."""
        query = "SELECT face_id, person_id, embedding FROM faces"
        args: tuple[str, ...] = ()
        if person_id is not None:
            query, args = query + " WHERE person_id = ?", (person_id,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY face_id", args).fetchall()
        embeddings = (np.stack([np.frombuffer(r[2], "<f4") for r in rows]) if rows
                      else np.zeros((0, 0), np.float32))
        return Gallery([r[0] for r in rows], [r[1] for r in rows], embeddings.astype(np.float32))

    def counts(self) -> tuple[int, int]:
        """(faces, persons) enrolled."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*), COUNT(DISTINCT person_id) FROM faces").fetchone()

    def stale(self, recognizer: str) -> Iterator[tuple[int, np.ndarray]]:
        """(face_id, stored feature) of every row whose embedding another R computed."""
        with self._lock:
            rows = self._db.execute("SELECT face_id, feature, feature_dtype, feature_shape FROM faces "
                                    "WHERE recognizer != ? ORDER BY face_id", (recognizer,)).fetchall()
        for face_id, blob, dtype, shape in rows:
            yield face_id, np.frombuffer(blob, np.dtype(dtype).newbyteorder("<")).reshape(json.loads(shape))

    def set_embedding(self, face_id: int, embedding: np.ndarray, recognizer: str) -> None:
        with self._lock:
            self._db.execute("UPDATE faces SET embedding = ?, recognizer = ? WHERE face_id = ?",
                             (np.asarray(embedding, "<f4").tobytes(), recognizer, face_id))

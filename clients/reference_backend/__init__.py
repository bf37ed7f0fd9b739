"""A reference face-recognition backend that stores only AdvFace Guard-protected features.

It shows the plug-in dropped into a recognition backend, end to end: enrollment runs the clean
features z (sent by the client device, or computed here with E from a photo) through the
plug-in with :class:`advface_client.GuardClient` and stores only the plug-in's answer and its
embedding R(answer) in SQLite; verify and identify embed the clean probe with the same R and
compare by cosine against a threshold. z and images are never written anywhere.

Modules, one job each: ``store`` (SQLite), ``recognition`` (E and R from the bundle), ``inputs``
(request body -> z), ``matching`` (cosine scores, threshold), ``backend`` (enroll / verify /
identify), ``http_api`` (HTTP/JSON), ``cli`` (``advface-backend``, or ``python -m reference_backend``).

The database is one table (``store.SCHEMA``, checked against this text by the tests)::

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

The embedding is stored beside the feature so that a probe costs one pass of R, not one per
enrolled face; the feature is kept so that a new R re-embeds the gallery at start-up without
re-enrolling anyone.
"""

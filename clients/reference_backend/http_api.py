"""The backend's HTTP/JSON API, on the standard library's threading HTTP server.

HTTP rather than a second gRPC service: a backend team can call it with curl or any HTTP client,
it needs no generated stubs, and bodies go as raw bytes (a photo, or a .npy of z), so a 1.5 MB
feature is not inflated by base64 or JSON.

    POST /v1/persons/{person_id}/faces    body: image/* or application/x-npy   -> 201 {"person_id", "face_ids", "plugin_model"}
    POST /v1/persons/{person_id}/verify   body: one probe face                  -> 200 {"person_id", "score", "threshold", "match"}
    POST /v1/identify?top_k=5             body: one probe face                  -> 200 {"candidates": [{"person_id", "score"}], "threshold", "match"}
    GET  /v1/health                                                             -> 200 {"status", "faces", "persons", "recognizer", "bundle", "threshold"}

Errors are JSON ``{"error": "..."}``: 400 bad body, 404 unknown person or route, 411/413 missing
or oversized body, 415 unsupported Content-Type, 502 the plug-in did not protect an enrollment
(nothing was stored), 500 anything else (logged with its traceback). Neither bodies nor features
ever reach a log line.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from reference_backend.backend import Backend, PluginError, UnknownPerson
from reference_backend.inputs import BadInput, UnsupportedType, features_from_body

log = logging.getLogger(__name__)
PERSON_ROUTE = re.compile(r"^/v1/persons/([^/]+)/(faces|verify)$")
MAX_PERSON_ID = 128


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class BackendHTTPServer(ThreadingHTTPServer):
    """Serves one :class:`Backend`; ``max_body_bytes`` bounds what a request may upload."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: Backend, max_body_bytes: int) -> None:
        super().__init__(address, _Handler)
        self.backend, self.max_body_bytes = backend, max_body_bytes

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: BackendHTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _get(self) -> tuple[HTTPStatus, dict[str, Any]]:
        if urlsplit(self.path).path != "/v1/health":
            raise ApiError(HTTPStatus.NOT_FOUND, f"no route GET {urlsplit(self.path).path}")
        backend = self.server.backend
        faces, persons = backend.store.counts()
        return HTTPStatus.OK, {"status": "ok", "faces": faces, "persons": persons,
                               "recognizer": backend.recognition.version,
                               "bundle": backend.recognition.bundle_version, "threshold": backend.threshold}

    def _post(self) -> tuple[HTTPStatus, dict[str, Any]]:
        url = urlsplit(self.path)
        backend = self.server.backend
        if url.path == "/v1/identify":
            top_k = _top_k(parse_qs(url.query))
            result = backend.identify(self._features(), top_k)
            return HTTPStatus.OK, {"candidates": [asdict(c) for c in result.candidates],
                                   "threshold": result.threshold, "match": result.match}
        route = PERSON_ROUTE.match(url.path)
        if route is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no route POST {url.path}")
        person_id, action = _person_id(route.group(1)), route.group(2)
        if action == "faces":
            enrollment = backend.enroll(person_id, self._features())
            return HTTPStatus.CREATED, asdict(enrollment)
        verification = backend.verify(person_id, self._features())
        return HTTPStatus.OK, {**asdict(verification), "match": verification.match}

    def _features(self) -> np.ndarray:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        if int(length) > self.server.max_body_bytes:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"body of {length} bytes is over the limit of {self.server.max_body_bytes}")
        body = self.rfile.read(int(length))
        return features_from_body(body, self.headers.get("Content-Type", ""), self.server.backend.recognition)

    def _answer(self, route: Callable[[], tuple[HTTPStatus, dict[str, Any]]]) -> None:
        try:
            status, body = route()
        except ApiError as e:
            status, body = e.status, {"error": str(e)}
        except UnsupportedType as e:
            status, body = HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": str(e)}
        except BadInput as e:
            status, body = HTTPStatus.BAD_REQUEST, {"error": str(e)}
        except UnknownPerson as e:
            status, body = HTTPStatus.NOT_FOUND, {"error": str(e)}
        except PluginError as e:
            log.error("enrollment failed: %s", e)
            status, body = HTTPStatus.BAD_GATEWAY, {"error": str(e)}
        except Exception:  # a bug or a broken database: answered, and logged with its traceback
            log.exception("%s %s failed", self.command, urlsplit(self.path).path)
            status, body = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the backend's log"}
        payload = json.dumps(body).encode()
        if status >= 400 and self.headers.get("Content-Length"):
            self.close_connection = True  # the body may be unread: do not parse it as the next request
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


def _person_id(raw: str) -> str:
    person_id = unquote(raw)
    if not 0 < len(person_id) <= MAX_PERSON_ID or not person_id.isprintable():
        raise ApiError(HTTPStatus.BAD_REQUEST, f"a person id is 1 to {MAX_PERSON_ID} printable characters")
    return person_id


def _top_k(query: dict[str, list[str]]) -> int:
    try:
        top_k = int(query.get("top_k", ["5"])[0])
    except ValueError:
        top_k = 0
    if top_k < 1:
        raise ApiError(HTTPStatus.BAD_REQUEST, "top_k must be a positive integer")
    return top_k

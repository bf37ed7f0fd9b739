"""`advface-backend`: run the reference recognition backend in front of a running AdvFace Guard plug-in."""

from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from advface_client.connection import connection_parser, tls_from_args, token_from_args

from reference_backend.matching import DEFAULT_THRESHOLD

if TYPE_CHECKING:  # torch comes with these: imported after parsing, so --help answers at once
    from reference_backend.http_api import BackendHTTPServer

log = logging.getLogger("reference_backend")
# Enrollments wait for a plug-in that is not ready (gRPC wait_for_ready): without a deadline, one
# that is down would hold every enrolling HTTP request forever.
PLUGIN_TIMEOUT = 60.0

EPILOG = """\
endpoints (bodies are a face photo, image/*, or clean features z as application/x-npy):
  POST /v1/persons/PERSON/faces    enroll: z goes through the plug-in, only its output is stored
  POST /v1/persons/PERSON/verify   1:1 -> score, threshold, match
  POST /v1/identify?top_k=5        1:N -> candidates best first, match or null
  GET  /v1/health                  faces and persons enrolled, recogniser and bundle versions

The connection flags (--target is the plug-in) are advface-client's, with the same environment
variables; here --timeout defaults to 60 s, so that an enrollment fails with 502 rather than
waiting forever when the plug-in is down.

example:
  advface serve --port 50051 &
  advface-backend --target localhost:50051 --db faces.sqlite3 --port 8080 &
  curl -X POST -H 'Content-Type: image/jpeg' --data-binary @alice.jpg localhost:8080/v1/persons/alice/faces
  curl -X POST -H 'Content-Type: image/jpeg' --data-binary @probe.jpg localhost:8080/v1/identify
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="advface-backend", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[connection_parser(with_defaults=True)],
        description="A reference face-recognition backend (HTTP) that stores only AdvFace Guard-protected features "
                    "in SQLite and matches with the bundle's recogniser R.")
    parser.add_argument("--db", type=Path, default=Path("advface-backend.sqlite3"),
                        help="SQLite file, created if missing (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port, 0 for any free one (default %(default)s)")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="the plug-in's model bundle, for E and R (default: the embedded bundle)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="cosine at or above which a probe matches (default %(default)s: the embedded models' "
                             "measured threshold for protected-vs-clean features on LFW)")
    parser.add_argument("--protector", default="", help="plug-in protector to ask for (default: the plug-in's)")
    parser.add_argument("--steps", type=int, default=0, help="PGD steps to ask for (default: the plug-in's)")
    parser.add_argument("--eps", type=float, default=None, help="perturbation bound to ask for (default: the plug-in's)")
    parser.add_argument("--max-body-mb", type=float, default=64.0,
                        help="largest request body (default %(default)s MB, about 40 faces of z)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.set_defaults(timeout=PLUGIN_TIMEOUT)
    return parser


def open_backend(args: argparse.Namespace) -> BackendHTTPServer:
    """The HTTP server for ``args``, bound and ready to serve; raises BundleError, sqlite3.Error, OSError or ValueError."""
    from advface_client import GuardClient, Options

    from reference_backend.backend import Backend
    from reference_backend.http_api import BackendHTTPServer
    from reference_backend.recognition import Recognition
    from reference_backend.store import Store

    recognition = Recognition(args.bundle)
    plugin = GuardClient(args.target, tls=tls_from_args(args), timeout=args.timeout, token=token_from_args(args))
    backend = Backend(plugin, recognition, Store(args.db), args.threshold,
                      Options(args.protector, args.steps, args.eps))
    backend.refresh_embeddings()
    return BackendHTTPServer((args.host, args.port), backend, int(args.max_body_mb * (1 << 20)))


def _plugin_mismatch(server: BackendHTTPServer) -> str | None:
    """Why the plug-in cannot serve this backend (another bundle), or None; an unreachable plug-in is only logged."""
    import grpc

    backend = server.backend
    try:
        if backend.plugin.health() != "SERVING":
            log.warning("the plug-in at %s is not SERVING yet; enrollments wait for it up to --timeout",
                        backend.plugin.target)
            return None
        version = backend.plugin.info().model_version
    except grpc.RpcError as e:
        log.warning("the plug-in at %s is unreachable (%s); enrollments wait for it up to --timeout",
                    backend.plugin.target, e.code().name)
        return None
    if version != backend.recognition.bundle_version:
        return (f"the plug-in at {backend.plugin.target} serves bundle {version}, this backend loaded bundle "
                f"{backend.recognition.bundle_version}; pass the plug-in's bundle with --bundle")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from plugin_service.bundle import BundleError

    try:
        server = open_backend(args)
    except (BundleError, sqlite3.Error, OSError, ValueError) as e:  # ValueError: TLS files or token file
        print(f"advface-backend: {e}", file=sys.stderr)
        return 2
    backend = server.backend
    try:
        if (problem := _plugin_mismatch(server)) is not None:
            print(f"advface-backend: {problem}", file=sys.stderr)
            return 2
        faces, persons = backend.store.counts()
        print(f"[advface-backend] serving {server.url} with {faces} faces of {persons} persons in {args.db}; "
              f"bundle {backend.recognition.bundle_version}, recogniser {backend.recognition.version}, "
              f"plug-in {backend.plugin.target}, threshold {backend.threshold}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    finally:
        server.server_close()
        backend.plugin.close()
        backend.store.close()
    return 0


"""Connection flags (address, TLS, token) and error reporting shared by `advface-client`, `advface enroll` and `advface demo`.

The flags live in argparse *parent* parsers, so they are accepted before and after the
sub-command (``advface-client health --target host:port``). The copy given to sub-commands
defaults to ``SUPPRESS``: a flag not repeated after the sub-command leaves the value parsed
before it (or the environment default) alone instead of resetting it.

Each flag has an environment variable. The token has no flag of its own value, only a file
(``--token-file``) or ``ADVFACE_TOKEN``: a command line is visible to every user in ``ps``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from advface_client.client import GuardClient, TLSConfig

TOKEN_ENV = "ADVFACE_TOKEN"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def connection_parser(with_defaults: bool, with_target: bool = True) -> argparse.ArgumentParser:
    """A parent parser with the connection flags; ``with_defaults=False`` for the sub-commands' copy."""
    def default(value: Any) -> Any:
        return value if with_defaults else argparse.SUPPRESS

    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("connection")
    if with_target:
        group.add_argument("--target", default=default(os.environ.get("ADVFACE_TARGET", "localhost:50051")),
                           help="HOST:PORT of the service (host name or IP, IPv6 as [ADDR]:PORT); comma-separate "
                           "several for round-robin [env ADVFACE_TARGET; default: localhost:50051]")
    group.add_argument("--tls", action="store_true", default=default(os.environ.get("ADVFACE_TLS", "") == "1"),
                       help="use TLS, trusting the system roots unless --ca-cert; implied by the other TLS flags "
                       "[env ADVFACE_TLS=1]")
    group.add_argument("--ca-cert", type=Path, default=default(_env_path("ADVFACE_CA_CERT")),
                       help="PEM root certificate(s) that signed the server's certificate [env ADVFACE_CA_CERT]")
    group.add_argument("--client-cert", type=Path, default=default(_env_path("ADVFACE_CLIENT_CERT")),
                       help="PEM client certificate for mutual TLS (with --client-key) [env ADVFACE_CLIENT_CERT]")
    group.add_argument("--client-key", type=Path, default=default(_env_path("ADVFACE_CLIENT_KEY")),
                       help="PEM private key of --client-cert [env ADVFACE_CLIENT_KEY]")
    group.add_argument("--server-name", default=default(os.environ.get("ADVFACE_SERVER_NAME")),
                       help="name the server's certificate must carry, when it is not the host in --target "
                       "[env ADVFACE_SERVER_NAME]")
    group.add_argument("--token-file", type=Path, default=default(_env_path("ADVFACE_TOKEN_FILE")),
                       help="file holding the bearer token sent with every call [env ADVFACE_TOKEN_FILE; or the "
                       f"token itself in env {TOKEN_ENV}]")
    group.add_argument("--timeout", type=float, default=default(None),
                       help="per-call deadline in seconds (default: none)")
    return parser


def tls_from_args(args: argparse.Namespace) -> TLSConfig | None:
    """TLS when asked for, or when any TLS file or name is given (a CA alone must not mean plaintext)."""
    if not (args.tls or args.ca_cert or args.client_cert or args.client_key or args.server_name):
        return None
    return TLSConfig(args.ca_cert, args.client_cert, args.client_key, args.server_name)


def token_from_args(args: argparse.Namespace) -> str | None:
    """The token from --token-file (its one line), else from the environment; None without either."""
    if args.token_file is not None:
        lines = [line.strip() for line in Path(args.token_file).read_text().splitlines() if line.strip()]
        if len(lines) != 1:
            raise ValueError(f"--token-file {args.token_file}: expected the token alone on one line, "
                             f"found {len(lines)} non-empty lines")
        return lines[0]
    return os.environ.get(TOKEN_ENV) or None


def client_from_args(args: argparse.Namespace, target: str | None = None) -> GuardClient:
    return GuardClient(target or args.target, tls=tls_from_args(args), timeout=args.timeout,
                       token=token_from_args(args))


def run_reporting_errors(prog: str, args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    """``command(args)``, with a failed call (exit 1) or bad input (exit 2) as one line on stderr, no traceback."""
    try:
        return int(command(args))
    except grpc.RpcError as e:
        print(f"{prog}: {args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2

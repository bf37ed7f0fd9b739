"""`advface-client`: query a running AdvFace Guard service (health, model info).

Torch-free on purpose: it needs only the wire package, grpcio and numpy. Enrolling photos runs E
(PyTorch) next to the client, so it is `advface enroll`, in the service package.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from advface_client.connection import client_from_args, connection_parser, run_reporting_errors


def _cmd_health(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def _cmd_info(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToJson

    with client_from_args(args) as client:
        print(MessageToJson(client.info(), preserving_proto_field_name=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advface-client", description="Client for the AdvFace Guard gRPC plug-in. "
                                     "The connection flags are accepted before or after the command.",
                                     parents=[connection_parser(with_defaults=True)])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    connection = connection_parser(with_defaults=False)

    p = sub.add_parser("health", help="print the service's grpc.health.v1 status (exit 0 when SERVING)",
                       parents=[connection])
    p.add_argument("--service", default="", help="service name to check (default: the whole server)")
    p.set_defaults(func=_cmd_health)

    p = sub.add_parser("info", help="print the served bundle, protector, limits and device as JSON", parents=[connection])
    p.set_defaults(func=_cmd_info)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_reporting_errors("advface-client", args, args.func)


if __name__ == "__main__":
    sys.exit(main())

"""From the addresses a user gives to one gRPC channel target, balanced round-robin.

One address (``guard.internal:50051``, ``10.0.0.5:50051``, ``[fd00::5]:50051``) becomes a
``dns:///`` target: gRPC resolves it, balances over every address the name has (a Kubernetes
headless Service lists one per replica) and re-resolves when connections drop, so replicas that
come and go are followed. Targets that already name a gRPC scheme (``dns:``, ``ipv4:``,
``unix:``...) are used as given.

gRPC's resolvers take one name per target, so several comma-separated addresses are resolved
here, once, when the client is built, and given to gRPC as IP literals (``ipv4:`` when every
address is IPv4, else ``ipv6:`` with IPv4 addresses written as ``::ffff:a.b.c.d``). For TLS the
first address's host names the server (unless a server name is set): the replicas' certificates
must all be valid for it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


@dataclass(frozen=True)
class ChannelTarget:
    target: str  # what grpc.*_channel gets
    authority: str | None  # host name TLS must verify when it differs from the target's own (several addresses)


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); a clear ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT (IPv6 literals as [ADDR]:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"address {address!r}: write an IPv6 literal in brackets, [ADDR]:PORT")
    return host, int(port)


def _ips(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve {host!r}: {e.strerror}") from None
    return [ipaddress.ip_address(info[4][0]) for info in infos]


def channel_target(spec: str) -> ChannelTarget:
    """The gRPC target for ``spec``: one address, a gRPC target URI, or several comma-separated addresses."""
    addresses = [a.strip() for a in spec.split(",") if a.strip()]
    if not addresses:
        raise ValueError("no service address given")
    if len(addresses) == 1:
        (address,) = addresses
        if address.startswith(GRPC_SCHEMES):
            return ChannelTarget(address, None)
        split_host_port(address)  # a clear error now rather than a resolver failure later
        return ChannelTarget(f"dns:///{address}", None)
    endpoints: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
    for address in addresses:
        host, port = split_host_port(address)
        for ip in _ips(host, port):
            if (ip, port) not in endpoints:
                endpoints.append((ip, port))
    first_host = split_host_port(addresses[0])[0]
    if all(ip.version == 4 for ip, _ in endpoints):
        return ChannelTarget("ipv4:" + ",".join(f"{ip}:{port}" for ip, port in endpoints), first_host)
    mapped = (ip if ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{ip}") for ip, _ in endpoints)
    return ChannelTarget("ipv6:" + ",".join(f"[{ip}]:{port}" for ip, (_, port) in zip(mapped, endpoints)), first_host)

"""Workers found by DNS: a `dns:///name:port` address stands for every address the name resolves
to (a Kubernetes headless Service: one per ready pod). The router keeps one worker per resolved
address, rather than one gRPC channel balancing over them, so it measures, predicts and routes
each pod on its own."""

from __future__ import annotations

import asyncio
import socket

DNS_SCHEME = "dns:///"


def is_dns_target(address: str) -> bool:
    return address.startswith(DNS_SCHEME)


def split_target(address: str) -> tuple[str, int]:
    host, sep, port = address.removeprefix(DNS_SCHEME).rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r}: expected dns:///NAME:PORT")
    return host, int(port)


async def resolve(address: str) -> list[str]:
    """Every "ip:port" the target resolves to now, sorted; empty when the name does not resolve."""
    host, port = split_target(address)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    found = set()
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        found.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(found)

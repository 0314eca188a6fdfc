"""Workers found by DNS: a `dns:///name:port` address stands for every address the name resolves
to (a Kubernetes headless Service: one per ready pod). The router keeps one worker per resolved
address, rather than one gRPC channel balancing over them, so it measures, predicts and routes
each pod on its own.

A lookup that fails (no DNS server answers in time, or it answers SERVFAIL) says nothing about the
workers: the router keeps those it last resolved, and their health checks say whether they serve.
Only an answer drops an address: one without it, or that the name has no address (NODATA) or does
not exist (NXDOMAIN)."""

from __future__ import annotations

import asyncio
import socket

DNS_SCHEME = "dns:///"
# getaddrinfo's errors that are answers: the name does not exist, or has no address now.
NO_ADDRESS = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


class LookupFailed(Exception):
    """A dns:/// target could not be resolved now; the message says why."""


def is_dns_target(address: str) -> bool:
    return address.startswith(DNS_SCHEME)


def split_target(address: str) -> tuple[str, int]:
    host, sep, port = address.removeprefix(DNS_SCHEME).rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r}: expected dns:///NAME:PORT")
    return host, int(port)


async def resolve(address: str) -> list[str]:
    """Every "ip:port" the target resolves to now, sorted (empty: DNS answered that there is none);
    LookupFailed when DNS gave no answer."""
    host, port = split_target(address)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        if error.errno in NO_ADDRESS:
            return []
        raise LookupFailed(f"{host}: {error.strerror}") from None
    except UnicodeError as error:  # a name no DNS server could be asked (e.g. a label too long)
        raise LookupFailed(f"{host}: {error}") from None
    found = set()
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        found.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(found)

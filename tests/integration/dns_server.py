"""A small authoritative DNS server for the discovery test: answers A queries from a JSON file
({"name.": ["ip", ...]}) read afresh for every query, with TTL 0, so the test changes the answers by
rewriting the file. Names it does not hold are NXDOMAIN; a name held as null is SERVFAIL (a DNS
server that fails); other record types of a held name get an empty answer.
Run: python -m tests.integration.dns_server --address A --port P --zone FILE."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from dnslib import QTYPE, RCODE, RR, A, DNSRecord  # type: ignore[import-untyped]
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer  # type: ignore[import-untyped]


class ZoneFileResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: Path) -> None:
        self.zone = zone

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> Any:
        reply = request.reply()
        name = str(request.q.qname).lower()
        records: dict[str, list[str] | None] = json.loads(self.zone.read_text(encoding="utf-8"))
        if name not in records:
            reply.header.rcode = RCODE.NXDOMAIN
        elif records[name] is None:
            reply.header.rcode = RCODE.SERVFAIL
        elif request.q.qtype == QTYPE.A:
            for ip in records[name] or ():
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=0))
        return reply


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--zone", type=Path, required=True)
    args = parser.parse_args()
    resolver = ZoneFileResolver(args.zone)
    # Logs each request and reply, so the test can see the router really asked.
    logger = DNSLogger("request,reply,error", prefix=False)
    servers = [
        DNSServer(resolver, address=args.address, port=args.port, tcp=tcp, logger=logger)
        for tcp in (False, True)
    ]
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.set())
    for server in servers:
        server.start_thread()
    print(f"dns server on {args.address}:{args.port}", flush=True)
    stopped.wait()
    for server in servers:
        server.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()

"""A raw TLS handshake with a gRPC server, to tell a refusal at the handshake from one after it.

TLS 1.2, so the server's verdict on a client certificate is part of the handshake itself (with
TLS 1.3 the client finishes first and learns of the refusal only when it reads).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

# The HTTP/2 client preface; a gRPC server answers an accepted connection with its SETTINGS frame.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS_FRAME_TYPE = 4


def tls_handshake(
    address: str, server_name: str, ca: Path, certificate: tuple[Path, Path] | None = None
) -> str | None:
    """Connect to `address` verifying the server as `server_name` by `ca`, presenting `certificate`
    (cert, key) if given. None when the handshake succeeds and the server speaks HTTP/2; else why
    it failed (the handshake's error)."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])  # gRPC servers refuse connections that do not offer it
    if certificate is not None:
        context.load_cert_chain(str(certificate[0]), str(certificate[1]))
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        tls = context.wrap_socket(raw, server_hostname=server_name, do_handshake_on_connect=False)
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError) as error:
            return f"{type(error).__name__}: {error}"
        tls.sendall(HTTP2_PREFACE)
        header = tls.recv(9)
        tls.close()
    if len(header) < 4 or header[3] != SETTINGS_FRAME_TYPE:
        return f"handshake done, but no HTTP/2 SETTINGS frame: {header!r}"
    return None

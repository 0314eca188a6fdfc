"""Run the Node.js example client (examples/node) from tests."""

from __future__ import annotations

from tests.npm import REPO, ensure_installed, node

EXAMPLE_DIR = REPO / "examples" / "node"


def node_client_command(address: str, *args: str) -> list[str]:
    """The command that runs the example against `address`; skips the test when it cannot run."""
    ensure_installed(EXAMPLE_DIR, "@grpc/grpc-js")
    return [node(), str(EXAMPLE_DIR / "client.js"), "--address", address, *args]

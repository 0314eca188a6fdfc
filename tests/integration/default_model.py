"""Configs of the default model for the integration tests that start routers and workers one by one,
with the session pool's short card (conftest.py), so their tiers load from the artifact cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.integration.conftest import pool_config_data
from tests.integration.processes import Server, spawn, stop, wait_until, write_config

# The tiers load from the artifact cache in seconds; a fresh machine builds them first (minutes).
START_TIMEOUT_S = 600


def default_model(**sections: Any) -> dict[str, Any]:
    """A config of the default model; `sections` add top-level tables (router, workers, security)."""
    return {
        "limits": {"max_new_tokens": 64, "default_max_new_tokens": 8},
        "data": pool_config_data()["data"],
        "metrics": {"enabled": False},
        **sections,
    }


def start_router(tmp_path: Path, dial_host: str = "127.0.0.1", **sections: Any) -> tuple[Server, str]:
    """`tierserve router` on the default model once it listens: the process and the address to dial."""
    router = spawn(
        "router", ["router"], write_config(tmp_path / "router.toml", default_model(**sections)), tmp_path
    )
    try:
        wait_until(router.port, "the router listens", [router], 60)
    except BaseException:
        stop(router)
        print(router.tail())
        raise
    return router, f"{dial_host}:{router.port()}"

"""`tierserve up` with [security] on the default model: TLS and a token to the router, mutual TLS to
the workers, certificates from `tierserve certs`; and every CLI command that dials the router talks to
the secured pool through its TLS and token options, or their environment variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tierserve_client.v1 import generate_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.integration.default_pool import default_model_config, stop_pool
from tests.integration.test_launcher import start_pool

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "tierserve.cli"]
TOKEN = "s3cret"
WORKERS = [("a", "bf16")]


@dataclass(frozen=True)
class SecurePool:
    address: str
    certs: Path
    run_dir: Path
    token_file: Path

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("TIERSERVE_")}
        return subprocess.run(
            [*CLI, *args], capture_output=True, text=True, timeout=120, env={**clean, **(env or {})}
        )


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecurePool]:
    tmp_path = tmp_path_factory.mktemp("secure")
    certs = tmp_path / "certs"
    plain = default_model_config(tmp_path / "plain.toml", WORKERS)
    made = subprocess.run(
        [*CLI, "certs", "--out", str(certs), "--config", str(plain)], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    token_file = tmp_path / "tokens.txt"
    token_file.write_text(f"{TOKEN} ops\n")
    (tmp_path / "token").write_text(f"{TOKEN}\n")
    security = {
        "ca": str(certs / "ca.pem"),
        "router_cert": str(certs / "router.pem"),
        "router_key": str(certs / "router.key"),
        "worker_cert": str(certs / "worker-{name}.pem"),
        "worker_key": str(certs / "worker-{name}.key"),
        "router_client_cert": str(certs / "router-client.pem"),
        "router_client_key": str(certs / "router-client.key"),
        "tokens_file": str(token_file),
    }
    config = default_model_config(tmp_path / "pool.toml", WORKERS, security=security)
    address, launcher, _ = start_pool(config, tmp_path)
    try:
        yield SecurePool(address, certs, tmp_path / "run", tmp_path / "token")
    finally:
        assert stop_pool(launcher) == 0


def test_a_secured_pool_serves_only_tls_callers_with_a_token(pool: SecurePool) -> None:
    request = generate_pb2.GenerateRequest(prompt="The capital of France is", max_new_tokens=3)
    ca = (pool.certs / "ca.pem").read_bytes()
    with grpc.secure_channel(pool.address, grpc.ssl_channel_credentials(ca)) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        token = (("authorization", f"Bearer {TOKEN}"),)
        assert list(router.Generate(request, timeout=60, metadata=token))[-1].summary.generated_tokens == 3
        with pytest.raises(grpc.RpcError) as missing:
            list(router.Generate(request, timeout=60))
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            list(router.Generate(request, timeout=60, metadata=(("authorization", "Bearer nope"),)))
        assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with grpc.insecure_channel(pool.address) as channel, pytest.raises(grpc.RpcError) as refused:
        list(router_pb2_grpc.RouterStub(channel).Generate(request, timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    worker_port = (pool.run_dir / "worker-a.port").read_text().strip()
    worker_creds = grpc.ssl_channel_credentials(ca)  # TLS, but no client certificate
    with grpc.secure_channel(f"127.0.0.1:{worker_port}", worker_creds) as channel:
        with pytest.raises(grpc.RpcError) as stranger:
            worker_pb2_grpc.WorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=10)
        assert stranger.value.code() == grpc.StatusCode.UNAVAILABLE


def test_every_client_command_reaches_the_secured_router(pool: SecurePool) -> None:
    ca, token_file = str(pool.certs / "ca.pem"), str(pool.token_file)
    secured = ["--address", pool.address, "--ca-cert", ca, "--token-file", token_file]

    health = pool.cli("health", *secured)
    assert health.returncode == 0 and ": SERVING" in health.stderr, health.stdout + health.stderr
    workers = pool.cli("workers", "--json", *secured)
    assert workers.returncode == 0, workers.stderr
    assert [w["workerId"] for w in json.loads(workers.stdout)["workers"]] == ["a"]
    generated = pool.cli("generate", "The capital of France is", "--max-new-tokens", "4", "--plain", *secured)
    assert generated.returncode == 0 and "Paris" in generated.stdout, generated.stdout + generated.stderr
    top = pool.cli("top", "--once", *secured)
    assert top.returncode == 0 and "bf16" in top.stdout, top.stdout + top.stderr
    planned = pool.cli(
        "plan", "--router", pool.address, "--json", "--ca-cert", ca, "--token-file", token_file
    )
    # The plan is made from the secured pool's measured figures: its one tier.
    assert planned.returncode in (0, 1), planned.stderr
    assert [t["tier"] for t in json.loads(planned.stdout)["tiers"]] == ["bf16"]

    # The same from the environment, the token itself in TIERSERVE_TOKEN.
    env = {"TIERSERVE_CA_CERT": ca, "TIERSERVE_TOKEN": TOKEN}
    from_env = pool.cli("workers", "--address", pool.address, env=env)
    assert from_env.returncode == 0 and "serving" in from_env.stdout, from_env.stdout + from_env.stderr

    # Without the options: the TLS handshake fails, or the router refuses the missing token.
    plaintext = pool.cli("health", "--address", pool.address)
    assert plaintext.returncode == 1 and "NOT SERVING" in plaintext.stderr
    no_token = pool.cli("workers", "--address", pool.address, "--ca-cert", ca)
    assert no_token.returncode != 0 and "UNAUTHENTICATED" in no_token.stdout + no_token.stderr
    for command in (["top", "--once"], ["generate", "hello"]):
        refused = pool.cli(*command, "--address", pool.address, "--ca-cert", ca)
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stdout + refused.stderr

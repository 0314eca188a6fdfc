"""`tierserve up` with [security] on the tiny model: TLS and a token to the router, mutual TLS to the
workers, certificates from `tierserve certs`."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.integration.test_launcher import start_pool, tiny_model
from tierserve.config import config_to_toml, parse_config
from tierserve.v1 import generate_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.integration

__all__ = ["tiny_model"]

CLI = [sys.executable, "-m", "tierserve.cli"]


def test_a_secured_pool_serves_only_tls_callers_with_a_token(tmp_path: Path, tiny_model: Path) -> None:
    certs = tmp_path / "certs"
    workers = [{"name": "a", "tier": "fp32", "warmup_runs": 0}]
    plain = tmp_path / "plain.toml"
    plain.write_text(config_to_toml(parse_config({"model": {"path": str(tiny_model)}, "workers": workers})))
    made = subprocess.run(
        [*CLI, "certs", "--out", str(certs), "--config", str(plain)], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    (tmp_path / "tokens.txt").write_text("s3cret ops\n")
    security = {
        "ca": str(certs / "ca.pem"),
        "router_cert": str(certs / "router.pem"),
        "router_key": str(certs / "router.key"),
        "worker_cert": str(certs / "worker-{name}.pem"),
        "worker_key": str(certs / "worker-{name}.key"),
        "router_client_cert": str(certs / "router-client.pem"),
        "router_client_key": str(certs / "router-client.key"),
        "tokens_file": str(tmp_path / "tokens.txt"),
    }
    config = tmp_path / "pool.toml"
    data = {
        "model": {"path": str(tiny_model)},
        "router": {"port": 0, "health_interval_s": 0.3},
        "security": security,
        "workers": workers,
    }
    config.write_text(config_to_toml(parse_config(data)))
    address, launcher, _ = start_pool(config, tmp_path)
    try:
        request = generate_pb2.GenerateRequest(prompt="hello", max_new_tokens=3)
        ca = (certs / "ca.pem").read_bytes()
        with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            token = (("authorization", "Bearer s3cret"),)
            assert (
                list(router.Generate(request, timeout=60, metadata=token))[-1].summary.generated_tokens == 3
            )
            with pytest.raises(grpc.RpcError) as missing:
                list(router.Generate(request, timeout=60))
            assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as refused:
            list(router_pb2_grpc.RouterStub(channel).Generate(request, timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        worker_port = (tmp_path / "run" / "worker-a.port").read_text().strip()
        worker_creds = grpc.ssl_channel_credentials(ca)  # TLS, but no client certificate
        with grpc.secure_channel(f"127.0.0.1:{worker_port}", worker_creds) as channel:
            with pytest.raises(grpc.RpcError) as stranger:
                worker_pb2_grpc.WorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=10)
            assert stranger.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=60) == 0

"""What the two distributions install: the server wheel only `tierserve` (router and worker inside it,
copied through the links), the light client's wheel only `tierserve_client` with its stubs, depending on
grpcio and protobuf alone."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "clients" / "python"
# setuptools writes wheels itself from 70.1 on; older ones need the `wheel` package.
SETUPTOOLS_WITH_BDIST_WHEEL = (70, 1)


@dataclass(frozen=True)
class Wheel:
    names: list[str]
    dist_info: str
    metadata: Message

    @property
    def top_level(self) -> set[str]:
        return {name.split("/")[0] for name in self.names} - {self.dist_info}

    def requirements(self) -> set[str]:
        """The distributions it depends on (extras left out)."""
        required = self.metadata.get_all("Requires-Dist") or []
        return {_name(r) for r in required if "extra ==" not in r}


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", requirement)
    assert match, requirement
    return match.group(0).lower().replace("_", "-")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def _isolation_flags() -> list[str]:
    """Build with this environment's setuptools when it can write wheels, else let pip fetch one."""
    try:
        importlib.metadata.version("wheel")
        return ["--no-build-isolation"]
    except importlib.metadata.PackageNotFoundError:
        setuptools = _version(importlib.metadata.version("setuptools"))
        return ["--no-build-isolation"] if setuptools >= SETUPTOOLS_WITH_BDIST_WHEEL else []


def build_wheel(source: Path, out: Path) -> Wheel:
    """Build `source` into a wheel in `out`, with setuptools' build and egg-info directories in `out`
    too: leftovers of an earlier build/ in the working tree would otherwise be packaged."""
    out.mkdir()
    build_config = out / "build.cfg"
    build_config.write_text(f"[build]\nbuild_base = {out / 'build'}\n[egg_info]\negg_base = {out}\n")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", *_isolation_flags(), "-w", str(out)]
    result = subprocess.run(
        [*command, str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DIST_EXTRA_CONFIG": str(build_config)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("*.whl")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        (metadata_name,) = (n for n in names if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        metadata = message_from_bytes(archive.read(metadata_name))
    return Wheel(names, metadata_name.split("/")[0], metadata)


@pytest.fixture(scope="module")
def server_wheel(tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    return build_wheel(REPO, tmp_path_factory.mktemp("wheels") / "server")


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    return build_wheel(CLIENT, tmp_path_factory.mktemp("wheels") / "client")


def test_server_wheel_installs_only_the_tierserve_package(server_wheel: Wheel) -> None:
    assert server_wheel.dist_info.startswith("tierserve-")
    assert server_wheel.top_level == {"tierserve"}, "router, worker, tests, bench live under tierserve"


def test_server_wheel_holds_every_router_and_worker_module(server_wheel: Wheel) -> None:
    assert {"tierserve/router/service.py", "tierserve/worker/engine.py"} <= set(server_wheel.names)
    for room in ("router", "worker"):
        modules = {f"tierserve/{p.relative_to(REPO).as_posix()}" for p in (REPO / room).rglob("*.py")}
        missing = modules - set(server_wheel.names)
        assert not missing, f"{room}/ modules left out of the wheel: {sorted(missing)}"


def test_server_depends_on_the_light_client(server_wheel: Wheel) -> None:
    assert "tierserve-client" in server_wheel.requirements()


def test_client_wheel_installs_only_the_sdk_and_its_stubs(client_wheel: Wheel) -> None:
    assert client_wheel.dist_info.startswith("tierserve_client-")
    assert client_wheel.top_level == {"tierserve_client"}
    stubs = {f"tierserve_client/v1/{proto}_pb2" for proto in ("generate", "router", "worker")}
    expected = {f"{stub}{suffix}" for stub in stubs for suffix in (".py", "_grpc.py", ".pyi", "_grpc.pyi")}
    expected |= {"tierserve_client/py.typed", "tierserve_client/client.py", "tierserve_client/aio.py"}
    assert expected <= set(client_wheel.names), sorted(expected - set(client_wheel.names))


def test_client_depends_only_on_grpcio_and_protobuf(client_wheel: Wheel) -> None:
    assert client_wheel.requirements() == {"grpcio", "protobuf"}

"""`tierserve certs`: local certificate authorities and the certificates a pool needs, for development.

Every certificate is for one role, and carries that role's name, so none can stand in for another:

- the pool CA (`ca.pem`) signs the servers' certificates (the router's, which clients verify; each
  worker's, named for that worker, which the router verifies against the worker's name) and the
  router's client certificate (named for the router; workers take Worker calls from it only);
- the client CA (`client-ca.pem`) signs the certificates of the router's callers: API clients
  (`client.pem`) and workers registering themselves (`worker-<name>-client.pem`, named for the
  worker). Workers never trust it, so an API client's certificate fails the handshake with a worker.

Private keys are created readable by their owner only (0600), never through a symbolic link, and
never over an existing file. Production pools use certificates from their own CAs; the file names
and config keys are the same.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tierserve.domain.config import ConfigError, SecurityConfig
from tierserve.rpc.identity import NAME_PLACEHOLDER, worker_name

VALID_DAYS = 365
# Names the router's server certificate covers: tests and single-host pools dial these.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
# What an API client's certificate is named: no worker name, not the router's.
CLIENT_NAME = "client.tierserve"

PrivateKey = ec.EllipticCurvePrivateKey
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


class CertificateFileError(ConfigError):
    """A certificate or key file cannot be written safely; the message names it."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tierserve development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _alt_names(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _refuse_existing(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise CertificateFileError(f"{path} is a symbolic link; refusing to write through it")
    raise CertificateFileError(f"{path} already exists; refusing to write over it (choose an empty --out)")


def write_new_file(path: Path, data: bytes, private: bool = False) -> None:
    """Create `path` with `data`: 0600 when `private` (from the moment it exists), else 0644 less the
    umask.
    Never follows a symbolic link and never replaces an existing file (O_EXCL | O_NOFOLLOW)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    mode = 0o600 if private else 0o644
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        _refuse_existing(path)
        raise CertificateFileError(f"{path} already exists; refusing to write over it") from None
    except OSError as error:
        raise CertificateFileError(f"cannot create {path}: {error.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        if private:
            os.fchmod(fd, mode)  # exactly 0600, whatever the umask took away
        out.write(data)


def _pem_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _save(out_dir: Path, stem: str, cert: x509.Certificate, key: PrivateKey) -> Issued:
    issued = Issued(out_dir / f"{stem}.pem", out_dir / f"{stem}.key")
    write_new_file(issued.key, _pem_key(key), private=True)
    write_new_file(issued.cert, cert.public_bytes(serialization.Encoding.PEM))
    return issued


class LocalCA:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, key: PrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert
        self.name = cert.subject

    @classmethod
    def create(cls, common_name: str = "tierserve development CA") -> LocalCA:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = _name(common_name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, cert: Path, key: Path) -> LocalCA:
        """A CA written by `save` (to issue more certificates from it)."""
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise CertificateFileError(f"{key}: not an elliptic-curve private key")
        return cls(private, x509.load_pem_x509_certificate(cert.read_bytes()))

    def save(self, out_dir: Path, stem: str) -> Path:
        write_new_file(out_dir / f"{stem}.key", _pem_key(self.key), private=True)
        write_new_file(out_dir / f"{stem}.pem", self.cert.public_bytes(serialization.Encoding.PEM))
        return out_dir / f"{stem}.pem"

    def issue(
        self, common_name: str, names: Iterable[str], server: bool = True
    ) -> tuple[x509.Certificate, PrivateKey]:
        """A certificate for `names` (DNS names or IP addresses), for a TLS server or a TLS client:
        one purpose only, so a server's certificate cannot authenticate a caller, nor a client's a
        server."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(_alt_names(names), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert, key


@dataclass(frozen=True)
class PoolCertificates:
    ca: Path
    client_ca: Path
    router: Issued
    router_client: Issued
    client: Issued
    workers: dict[str, Issued]
    # Each worker's client certificate, for registering itself with the router.
    worker_clients: dict[str, Issued]


def _worker_server_names(security: SecurityConfig, name: str, hosts: list[str]) -> list[str]:
    # As the router verifies them (worker_server_name): the worker's own name; with an empty
    # worker_server_name, the hosts it is dialled at (workers are then not told apart).
    if security.worker_server_name:
        return [worker_name(security.worker_server_name, name)]
    return [*LOCAL_NAMES, *hosts]


def make_pool_certificates(
    out_dir: Path,
    worker_names: Iterable[str],
    hosts: Iterable[str] = (),
    security: SecurityConfig | None = None,
) -> PoolCertificates:
    """Write ca.pem and client-ca.pem (with their keys), router.pem/.key, router-client.pem/.key,
    client.pem/.key, and worker-<name>.pem/.key and worker-<name>-client.pem/.key for every worker
    into `out_dir`, named as `security` (worker_server_name, router_client_name) expects. The
    router's server certificate covers localhost, loopback and `hosts`. Refuses to write over any
    existing file."""
    security = security or SecurityConfig()
    hosts, names = list(hosts), list(worker_names)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = ["ca", "client-ca", "router", "router-client", "client"]
    stems += [stem for name in names for stem in (f"worker-{name}", f"worker-{name}-client")]
    for stem in stems:  # before writing anything, so a refusal leaves no half-made set
        for suffix in (".pem", ".key"):
            _refuse_existing(out_dir / f"{stem}{suffix}")

    ca, client_ca = LocalCA.create(), LocalCA.create("tierserve development client CA")
    router_name = security.router_client_name or "tierserve router"
    workers, worker_clients = {}, {}
    for name in names:
        server_names = _worker_server_names(security, name, hosts)
        workers[name] = _save(out_dir, f"worker-{name}", *ca.issue(f"worker {name}", server_names))
        # Named as the router reads a registration certificate: the worker's name in worker_server_name.
        client_names = [worker_name(security.worker_server_name or NAME_PLACEHOLDER, name)]
        worker_clients[name] = _save(
            out_dir, f"worker-{name}-client", *client_ca.issue(f"worker {name}", client_names, server=False)
        )
    return PoolCertificates(
        ca=ca.save(out_dir, "ca"),
        client_ca=client_ca.save(out_dir, "client-ca"),
        router=_save(out_dir, "router", *ca.issue("tierserve router", [*LOCAL_NAMES, *hosts])),
        router_client=_save(out_dir, "router-client", *ca.issue(router_name, [router_name], server=False)),
        client=_save(out_dir, "client", *client_ca.issue("tierserve client", [CLIENT_NAME], server=False)),
        workers=workers,
        worker_clients=worker_clients,
    )


def security_toml(certs: PoolCertificates, security: SecurityConfig | None = None) -> str:
    """The [security] table that uses these files (the worker files through `{name}`)."""
    security = security or SecurityConfig()
    out = certs.ca.parent
    return "\n".join(
        [
            "[security]",
            f'ca = "{certs.ca}"',
            f'router_cert = "{certs.router.cert}"',
            f'router_key = "{certs.router.key}"',
            f'router_client_cert = "{certs.router_client.cert}"',
            f'router_client_key = "{certs.router_client.key}"',
            f'router_client_name = "{security.router_client_name}"   # workers take calls from it only',
            f'worker_cert = "{out / "worker-{name}.pem"}"',
            f'worker_key = "{out / "worker-{name}.key"}"',
            f'worker_server_name = "{security.worker_server_name}"   # the router checks each worker\'s',
            f'# client_ca = "{certs.client_ca}"   # require client certificates (client.pem) from callers',
            f'# registration_cert = "{out / "worker-{name}-client.pem"}"   # a worker registering itself',
            f'# registration_key = "{out / "worker-{name}-client.key"}"',
            '# tokens_file = "tokens.txt"          # bearer tokens: `TOKEN [NAME] [MAX_CONCURRENT]` per line',
            '# registration_token_file = "registration.txt"   # workers\' tokens: `TOKEN NAME IDS` per line',
            "",
        ]
    )

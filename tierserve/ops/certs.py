"""`tierserve certs`: a local certificate authority and the certificates a pool needs, for development.

One CA signs everything: the router's server certificate (clients verify it), each worker's server
certificate (the router verifies it), the router's client certificate (workers accept only callers
whose certificate this CA signed) and a client certificate for callers of a router that asks for one.
Production pools use certificates from their own CA; the file names and config keys are the same.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365
# Names every server certificate covers: tests and single-host pools dial these.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")

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


def _write(path: Path, data: bytes, private: bool = False) -> None:
    # Keys are readable by their owner only, from the moment they exist.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _save(out_dir: Path, stem: str, cert: x509.Certificate, key: PrivateKey) -> Issued:
    issued = Issued(out_dir / f"{stem}.pem", out_dir / f"{stem}.key")
    _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM))
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(issued.key, pem_key, private=True)
    return issued


class LocalCA:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, common_name: str = "tierserve development CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.name = _name(common_name)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self, common_name: str, names: Iterable[str] = (), server: bool = True
    ) -> tuple[x509.Certificate, PrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(_alt_names([*LOCAL_NAMES, *names]), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


@dataclass(frozen=True)
class PoolCertificates:
    ca: Path
    router: Issued
    router_client: Issued
    client: Issued
    workers: dict[str, Issued]


def make_pool_certificates(
    out_dir: Path, worker_names: Iterable[str], hosts: Iterable[str] = ()
) -> PoolCertificates:
    """Write ca.pem, router.pem/.key, router-client.pem/.key, client.pem/.key and
    worker-<name>.pem/.key for every worker into `out_dir`. Server certificates cover
    localhost, loopback and `hosts`; a worker's also covers its name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hosts = list(hosts)
    ca = LocalCA()
    ca_path = out_dir / "ca.pem"
    _write(ca_path, ca.cert.public_bytes(serialization.Encoding.PEM))
    _write(
        out_dir / "ca.key",
        ca.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        private=True,
    )
    workers = {
        name: _save(out_dir, f"worker-{name}", *ca.issue(f"worker {name}", [name, *hosts]))
        for name in worker_names
    }
    return PoolCertificates(
        ca=ca_path,
        router=_save(out_dir, "router", *ca.issue("tierserve router", hosts)),
        router_client=_save(out_dir, "router-client", *ca.issue("tierserve router", server=False)),
        client=_save(out_dir, "client", *ca.issue("tierserve client", server=False)),
        workers=workers,
    )


def security_toml(certs: PoolCertificates) -> str:
    """The [security] table that uses these files (the worker files through `{name}`)."""
    out = certs.ca.parent
    return "\n".join(
        [
            "[security]",
            f'ca = "{certs.ca}"',
            f'router_cert = "{certs.router.cert}"',
            f'router_key = "{certs.router.key}"',
            f'router_client_cert = "{certs.router_client.cert}"',
            f'router_client_key = "{certs.router_client.key}"',
            f'worker_cert = "{out / "worker-{name}.pem"}"',
            f'worker_key = "{out / "worker-{name}.key"}"',
            '# client_ca = "' + str(certs.ca) + '"   # also require client certificates (client.pem)',
            '# tokens_file = "tokens.txt"          # bearer tokens: `TOKEN [NAME] [MAX_CONCURRENT]` per line',
            "",
        ]
    )

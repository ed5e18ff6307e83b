"""A throw-away local certificate authority for the broker and the simulated things.

Like AWS IoT, every client proves who it is with its own X.509 certificate; the
broker takes the certificate's common name as the MQTT user name
(`use_identity_as_username`), which its ACL patterns then use the way IoT
policies use `${iot:Connection.Thing.ThingName}`. Keys are EC P-256: fast to
make (a fleet of simulated devices gets one each) and accepted by both
mosquitto (OpenSSL) and the device SDK (awscrt / s2n).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")  # AWS IoT thing-name characters
VALIDITY = dt.timedelta(days=30)


class CertificateError(Exception):
    """A certificate could not be made (bad name, missing CA)."""


@dataclass(frozen=True)
class ClientCredentials:
    """What one MQTT client needs to connect: its identity and three PEM files."""

    name: str
    cert_path: Path
    key_path: Path
    ca_path: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MLEdgeDeploy local stack"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class LocalCA:
    """A CA in `directory`: `ca.pem` + `ca.key`, and the certificates it issues."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.ca_path = self.directory / "ca.pem"
        self.ca_key_path = self.directory / "ca.key"
        self._cert: x509.Certificate | None = None
        self._key: ec.EllipticCurvePrivateKey | None = None

    @classmethod
    def create(cls, directory: Path) -> LocalCA:
        ca = cls(directory)
        ca.directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = _name("MLEdgeDeploy local CA")
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_key(ca.ca_key_path, key)
        _write_cert(ca.ca_path, cert)
        ca._cert, ca._key = cert, key
        return ca

    @classmethod
    def load(cls, directory: Path) -> LocalCA:
        ca = cls(directory)
        try:
            ca._cert = x509.load_pem_x509_certificate(ca.ca_path.read_bytes())
            key = serialization.load_pem_private_key(ca.ca_key_path.read_bytes(), password=None)
        except FileNotFoundError as exc:
            raise CertificateError(f"no local CA in {directory}: {exc.filename} is missing") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{ca.ca_key_path} is not an EC private key")
        ca._key = key
        return ca

    def _issue(self, common_name: str, *, server: bool, stem: str) -> tuple[Path, Path]:
        assert self._cert is not None and self._key is not None
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=False, crl_sign=False,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=True, encipher_only=False, decipher_only=False,
            ), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path = self.directory / f"{stem}.pem"
        key_path = self.directory / f"{stem}.key"
        _write_key(key_path, key)
        _write_cert(cert_path, cert)
        return cert_path, key_path

    def issue_server(self, stem: str = "server") -> tuple[Path, Path]:
        """The broker's certificate, valid for `localhost` and `127.0.0.1`."""
        return self._issue("localhost", server=True, stem=stem)

    def issue_client(self, name: str) -> ClientCredentials:
        """A client certificate whose CN (so its MQTT user name) is `name`."""
        if not CLIENT_NAME.match(name):
            raise CertificateError(
                f"client name {name!r} must be 1-128 letters, digits or _.:- (a thing name)"
            )
        existing = ClientCredentials(name, self.directory / "clients" / f"{name}.pem",
                                     self.directory / "clients" / f"{name}.key", self.ca_path)
        if existing.cert_path.exists() and existing.key_path.exists():
            return existing
        (self.directory / "clients").mkdir(exist_ok=True)
        cert_path, key_path = self._issue(name, server=False, stem=f"clients/{name}")
        return ClientCredentials(name, cert_path, key_path, self.ca_path)

"""
Throwaway certificate authorities and certificates for the TLS tests.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Authority:
    """
    A certificate authority that signs certificates into a directory.

    @ivar path: Its own certificate, in C{roots}.
    @ivar roots: A directory holding only its certificate: trusted roots,
        as Twisted's C{tls:} client endpoint takes them.
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = self._sign(
            _name(name),
            self._key.public_key(),
            [(x509.BasicConstraints(ca=True, path_length=None), True)],
        )
        self.roots = directory / f"{name}-roots"
        self.roots.mkdir()
        self.path = self.roots / f"{name}.pem"
        self.path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def _sign(self, subject, public_key, extensions) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(_name(self.name))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(self._key, hashes.SHA256())

    def issue(self, name: str) -> tuple[Path, Path]:
        """
        A certificate for C{name}, valid for 127.0.0.1 and localhost.

        @return: The paths of its certificate and of its private key.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        alternative_names = x509.SubjectAlternativeName(
            [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]
        )
        certificate = self._sign(
            _name(name), key.public_key(), [(alternative_names, False)]
        )
        certificate_path = self.directory / f"{name}.crt"
        key_path = self.directory / f"{name}.key"
        certificate_path.write_bytes(
            certificate.public_bytes(serialization.Encoding.PEM)
        )
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return certificate_path, key_path

"""Certificates for the TLS tests, made at run time with the `cryptography` package.

``make_certs(directory)`` writes, and returns the paths of:

- ``ca_pem``: a CA that signs the server and the client certificate;
- ``server_pem`` / ``server_key``: the server's certificate for CN ``localhost``, SAN ``DNS:localhost`` and
  ``IP:127.0.0.1``;
- ``client_pem`` / ``client_key``: a client certificate (CN ``milvus-cdc-client``) signed by the CA;
- ``other_ca_pem``: a second CA that signed nothing here (the "wrong CA");
- ``other_client_pem`` / ``other_client_key``: a client certificate signed by the other CA;
- ``not_a_cert``: a text file that is neither a certificate nor a key;
- ``bad_key``: a file named like a key that holds no key (the "unreadable client key").

Keys are EC P-256 (fast to make, accepted by Go's and BoringSSL's TLS). Everything is valid from an hour ago
for 30 days.
"""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "localhost"


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "milvus-cdc tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=30))


def _ca(common_name: str):
    key = _key()
    name = _name(common_name)
    cert = _validity(x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(key.public_key()).serial_number(x509.random_serial_number())) \
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True) \
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True) \
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False) \
        .sign(key, hashes.SHA256())
    return cert, key


def _leaf(common_name: str, ca_cert, ca_key, server: bool, sans: list[x509.GeneralName] | None = None):
    key = _key()
    builder = _validity(x509.CertificateBuilder().subject_name(_name(common_name))
                        .issuer_name(ca_cert.subject).public_key(key.public_key())
                        .serial_number(x509.random_serial_number())) \
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True) \
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True) \
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False) \
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write_cert(path: Path, cert) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _write_key(path: Path, key) -> str:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return str(path)


def make_certs(directory: Path) -> dict[str, str]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca("milvus-cdc test CA")
    other_ca_cert, other_ca_key = _ca("milvus-cdc unrelated CA")
    server_cert, server_key = _leaf(SERVER_NAME, ca_cert, ca_key, server=True, sans=[
        x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_cert, client_key = _leaf("milvus-cdc-client", ca_cert, ca_key, server=False)
    other_client_cert, other_client_key = _leaf("milvus-cdc-client", other_ca_cert, other_ca_key, server=False)
    paths = {
        "ca_pem": _write_cert(directory / "ca.pem", ca_cert),
        "server_pem": _write_cert(directory / "server.pem", server_cert),
        "server_key": _write_key(directory / "server.key", server_key),
        "client_pem": _write_cert(directory / "client.pem", client_cert),
        "client_key": _write_key(directory / "client.key", client_key),
        "other_ca_pem": _write_cert(directory / "other-ca.pem", other_ca_cert),
        "other_client_pem": _write_cert(directory / "other-client.pem", other_client_cert),
        "other_client_key": _write_key(directory / "other-client.key", other_client_key),
    }
    not_a_cert = directory / "not-a-cert.pem"
    not_a_cert.write_text("this file is not a certificate\n")
    paths["not_a_cert"] = str(not_a_cert)
    bad_key = directory / "bad-client.key"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    paths["bad_key"] = str(bad_key)
    return paths


if __name__ == "__main__":
    import json
    import sys
    print(json.dumps(make_certs(Path(sys.argv[1] if len(sys.argv) > 1 else "certs")), indent=2))

"""TLS verification of destinations: bad certificates fail before any header is sent."""

import datetime
import ipaddress
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from integrations.standin import QualtricsStandin
from integrations.transport import post_json

pytestmark = pytest.mark.usefixtures("allow_loopback")

NOW = datetime.datetime.now(datetime.UTC)


def make_cert(name, issuer_cert=None, issuer_key=None, *, ca=False, days=(-1, 30)):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + datetime.timedelta(days=days[0]))
        .not_valid_after(NOW + datetime.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return cert, key


def write_pem(path: Path, *certs, key=None) -> Path:
    data = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)
    if key is not None:
        data += key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    root, root_key = make_cert("Test Root CA", ca=True, days=(-1, 365))
    intermediate, intermediate_key = make_cert("Test Intermediate", root, root_key, ca=True, days=(-1, 365))
    trusted, trusted_key = make_cert("trusted", root, root_key)
    expired, expired_key = make_cert("expired", root, root_key, days=(-30, -1))
    self_signed, self_signed_key = make_cert("self-signed")
    leaf, leaf_key = make_cert("leaf", intermediate, intermediate_key)
    return {
        "bundle": str(write_pem(folder / "ca.pem", root)),
        "trusted": write_pem(folder / "trusted.pem", trusted, key=trusted_key),
        "expired": write_pem(folder / "expired.pem", expired, key=expired_key),
        "self_signed": write_pem(folder / "self.pem", self_signed, key=self_signed_key),
        "chain_incomplete": write_pem(folder / "leaf.pem", leaf, key=leaf_key),
    }


@pytest.fixture
def https_standin():
    servers = []

    def start(cert_file):
        server = QualtricsStandin(quiet=True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"https://127.0.0.1:{server.port}/inbound-event/v1/events/json/triggers"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def send(url, bundle):
    return post_json(url, b"{}", {"Authorization": "Basic c2VjcmV0"}, connect_timeout=2, total_timeout=5, verify=bundle)


@pytest.mark.parametrize("case", ["self_signed", "expired", "chain_incomplete"])
def test_bad_certificate_fails_unsent(pki, https_standin, case):
    server, url = https_standin(pki[case])

    outcome = send(url, pki["bundle"])

    assert outcome.status_code is None
    assert outcome.error.startswith("TLS error")
    assert server.records == []


def test_trusted_ca_bundle_succeeds(pki, https_standin):
    server, url = https_standin(pki["trusted"])

    outcome = send(url, pki["bundle"])

    assert outcome.status_code == 200
    assert server.records[0]["headers"]["Authorization"] == "Basic c2VjcmV0"


def test_default_bundle_rejects_test_ca(pki, https_standin):
    _, url = https_standin(pki["trusted"])

    assert send(url, True).error.startswith("TLS error")

"""Optional TLS under the authenticated frames of `vstore.net.wire` (DESIGN "Sites and links"; the
HMAC-SHA256 frames, the nonce handshake and replay refusal run unchanged inside it).

Keeps true:
- TLS is on for a lab exactly when its topology.toml has a `[tls]` table naming a certificate, its
  private key and the CA that signed it (paths relative to the lab). Every daemon then serves TLS
  only, and every client of the lab (CLI, daemons, shipper) presents the certificate and checks the
  peer's against the CA and the address it dialled; the HMAC'd frames run unchanged inside.
- `vstore lab init --tls` makes a private lab CA and one certificate for every site address of the
  topology (the private key is written 0600 by `vstore.net.keys.write_private`). Real deployments
  put their own files in `[tls]`.
- Both ends require TLS 1.2 or newer and a certificate signed by the lab's CA (mutual TLS).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Mapping
from pathlib import Path

from vstore.blocks.errors import TricopyError
from vstore.net.keys import write_private

TLS_DIR = "tls"


def make_ssl_contexts(cert: Path, key: Path, ca: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) for mutual TLS: both ends present `cert` and trust `ca`."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    server.load_cert_chain(str(cert), str(key))
    server.load_verify_locations(str(ca))
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_2
    client.load_cert_chain(str(cert), str(key))
    client.load_verify_locations(str(ca))
    return server, client


def contexts(lab: Path, tls: Mapping[str, str] | None) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server context, client context) for this lab's `[tls]` table, or (None, None) when TLS is off."""
    if tls is None:
        return None, None
    paths = {name: lab / tls[name] for name in ("cert", "key", "ca")}
    for name, path in paths.items():
        if not path.is_file():
            raise TricopyError(f"TLS {name} file {path} (topology.toml [tls] {name}) does not exist")
    try:
        return make_ssl_contexts(paths["cert"], paths["key"], paths["ca"])
    except (ssl.SSLError, OSError) as exc:
        raise TricopyError(f"cannot load the TLS files named in {lab}/topology.toml [tls]: {exc}") from None


def client_context(lab: Path, tls: Mapping[str, str] | None) -> ssl.SSLContext | None:
    """The client half of `contexts` (None when TLS is off)."""
    return contexts(lab, tls)[1]


def create_lab_certificates(lab: Path, hosts: list[str]) -> dict[str, str]:
    """A lab CA and a certificate for `hosts` (IP addresses or names), under LAB/tls/. Returns the
    `[tls]` table for topology.toml."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = lab / TLS_DIR
    folder.mkdir(mode=0o700, exist_ok=False)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=3650)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tricopy lab CA {lab.name}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))

    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "127.0.0.1", "localhost"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    site_key = ec.generate_private_key(ec.SECP256R1())
    site = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tricopy lab {lab.name}")]))
            .issuer_name(ca_name).public_key(site_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "cert.pem").write_bytes(site.public_bytes(pem))
    write_private(folder / "key.pem", site_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
    # The CA key is not kept: nobody can mint another certificate this lab trusts.
    return {"cert": f"{TLS_DIR}/cert.pem", "key": f"{TLS_DIR}/key.pem", "ca": f"{TLS_DIR}/ca.pem"}

"""Throw-away TLS material for the secured test services, made with the ``openssl`` command.

:func:`make_certs` writes a CA and a server certificate signed by it for ``127.0.0.1`` and
``localhost`` (valid two days), the server key as encrypted PKCS#8, and the broker's PEM
keystore (that key followed by the certificate chain, as Kafka's ``ssl.keystore.type=PEM``
reads it).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certs:
    """Paths of the generated files (PEM) and the server key's password."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    kafka_keystore: Path
    key_password: str


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(  # noqa: S603 - fixed arguments
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr[-1000:]}")


def make_certs(folder: Path, key_password: str) -> Certs:
    """A CA, a server certificate and key for loopback, and Kafka's PEM keystore in ``folder``.

    Raises:
        RuntimeError: ``openssl`` is missing or failed.
    """
    if shutil.which("openssl") is None:
        raise RuntimeError("the `openssl` command is needed to make the test certificates "
                           "(`apt-get install openssl`)")
    folder.mkdir(parents=True, exist_ok=True)
    rsa = ["-newkey", "rsa:2048", "-nodes"]
    _openssl("req", "-x509", *rsa, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=fmstream test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    _openssl("req", *rsa, "-keyout", "server.plain.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=folder)
    (folder / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-sha256",
             "-extfile", "server.ext", cwd=folder)
    # PKCS#5 v1 (PBE-SHA1-3DES): Java 17, which reads the broker keystore, has no PBES2 (AES).
    _openssl("pkcs8", "-topk8", "-v1", "PBE-SHA1-3DES", "-in", "server.plain.key",
             "-out", "server.key", "-passout", f"pass:{key_password}", cwd=folder)
    (folder / "server.plain.key").unlink()
    (folder / "ca.key").unlink()  # nothing else is ever signed
    keystore = folder / "kafka-keystore.pem"
    keystore.write_text((folder / "server.key").read_text() + (folder / "server.pem").read_text()
                        + (folder / "ca.pem").read_text())
    for path in folder.iterdir():
        path.chmod(0o600)
    return Certs(folder / "ca.pem", folder / "server.pem", folder / "server.key", keystore,
                 key_password)

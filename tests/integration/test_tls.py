"""DICOM TLS on the listener (PS3.15 B.1): TLS 1.2 or newer, optional client certificates."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support.serve import ServeProcess

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _echo(port: int, context: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="TLS_SCU")
    ae.add_requested_context(Verification)
    tls = (context, "127.0.0.1") if context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE", tls_args=tls)  # type: ignore[arg-type]
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return bool(ok)


def _client_context(server_cert: Path, min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
    context.minimum_version = min_version
    return context


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_listener_requires_client_certificates(tmp_path: Path) -> None:
    server_cert, server_key = _certificate(tmp_path, "server")
    client_cert, client_key = _certificate(tmp_path, "client")
    config = {
        "dicom": {
            "tls_cert": str(server_cert),
            "tls_key": str(server_key),
            "tls_ca": str(client_cert),
            "tls_require_client_cert": True,
        }
    }
    with ServeProcess(tmp_path / "srv", config) as server:
        trusted = _client_context(server_cert)
        trusted.load_cert_chain(str(client_cert), str(client_key))
        assert _echo(server.port, trusted)
        assert not _echo(server.port, _client_context(server_cert)), "client without certificate accepted"
        assert not _echo(server.port, None), "plain TCP accepted on a TLS port"
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(str(server_cert))
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        try:
            old.load_cert_chain(str(client_cert), str(client_key))
            assert not _echo(server.port, old), "TLS 1.1 accepted"
        except ssl.SSLError:
            pass
        assert _echo(server.port, trusted), "server did not survive the refused clients"

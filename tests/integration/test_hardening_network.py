"""Hostile and broken peers (raw sockets) never starve a real client; every read is bounded by time and size.

Hostile peers connect from other loopback addresses (127.0.0.2 and up), so
that the per-host limit applies to them and not to the real client on
127.0.0.1.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from tests.support.dicom_files import make_radiograph
from tests.support.hostile import associate_rq, connect, pdata_header, raw_c_store, read_pdu
from tests.support.serve import ServeProcess

DX = "1.2.840.10008.5.1.4.1.1.1.1"
PIXELS = (np.arange(32 * 32).reshape(32, 32) % 97).astype(np.float64)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the server closes (or resets) the connection within ``timeout``; anything it sends is read."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def store_small(port: int, count: int) -> list[int]:
    ae = AE(ae_title="REAL_SCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE")
    assert assoc.is_established, "the real client could not associate"
    study_uid = generate_uid()
    statuses = [
        int(assoc.send_c_store(make_radiograph(PIXELS, study_uid, instance_number=n + 1)).Status) for n in range(count)
    ]
    assoc.release()
    return statuses


def trickle(sock: socket.socket, data: bytes, interval: float, stop: threading.Event) -> None:
    for byte in data:
        if stop.wait(interval):
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return


def test_idle_slow_flooding_and_oversized_peers_while_a_real_client_stores(tmp_path: Path) -> None:
    config = {
        "dicom": {
            "acse_timeout": 3,
            "network_timeout": 4,
            "max_associations": 8,
            "max_associations_per_host": 3,
            "max_pdu_size": 65536,
        }
    }
    with ServeProcess(tmp_path / "srv", config) as server:
        assert server.proc is not None
        rss_before = rss_kib(server.proc.pid)
        stop = threading.Event()
        # 1. A flood from one host: 3 connections are held, the other 17 closed at once.
        flood = [connect(server.port, source="127.0.0.2") for _ in range(20)]
        refused = sum(closed_by_peer(sock, 0.5) for sock in flood)
        assert refused >= 17, refused
        # 2. Three peers that send their A-ASSOCIATE-RQ one byte every 0.5 s.
        slow = [connect(server.port, source="127.0.0.3") for _ in range(3)]
        tricklers = [threading.Thread(target=trickle, args=(s, associate_rq(), 0.5, stop), daemon=True) for s in slow]
        for thread in tricklers:
            thread.start()
        # 3. A P-DATA-TF PDU that declares 4 GB after a proper association.
        huge = connect(server.port, source="127.0.0.4")
        huge.sendall(associate_rq(abstract_syntaxes=(DX,)))
        accepted = read_pdu(huge)
        assert accepted is not None and accepted[0] == 0x02, accepted
        huge.sendall(pdata_header(0xFFFFFFF0) + b"\x00" * (1 << 20))
        answer = read_pdu(huge)
        assert answer is not None and answer[0] == 0x07, f"expected an A-ABORT, got {answer}"
        assert closed_by_peer(huge, 5)
        # 4. A PDU just longer than the 64 KiB we announced.
        longer = connect(server.port, source="127.0.0.5")
        longer.sendall(associate_rq(abstract_syntaxes=(DX,)))
        assert (read_pdu(longer) or (0,))[0] == 0x02
        longer.sendall(pdata_header(65536 + 1000) + b"\x00" * (65536 + 1000))
        answer = read_pdu(longer)
        assert answer is not None and answer[0] == 0x07, f"expected an A-ABORT, got {answer}"

        # Meanwhile the real client stores, and again once the slow peers are gone.
        assert store_small(server.port, 5) == [0] * 5
        assert all(closed_by_peer(s, 8) for s in slow), "a peer trickling its association request was not cut off"
        assert all(closed_by_peer(s, 8) for s in flood), "an idle connection was not closed"
        assert store_small(server.port, 5) == [0] * 5
        stop.set()
        rss_after = rss_kib(server.proc.pid)
        assert rss_after - rss_before < 150 * 1024, f"RSS grew from {rss_before} to {rss_after} KiB"
        log = server.log()
        assert "max_associations_per_host" in log
        assert "did not send the association request within [dicom] acse_timeout" in log
        assert "exceeds [dicom] max_pdu_size announced (65536)" in log
        assert "Traceback" not in log
        for sock in (*flood, *slow, huge, longer):
            sock.close()


def test_instance_growing_past_the_limit_is_refused_while_it_arrives(tmp_path: Path) -> None:
    with ServeProcess(tmp_path / "srv", {"dicom": {"max_instance_mb": 0.5}}) as server:
        assert server.proc is not None
        big = make_radiograph(np.random.default_rng(1).random((1024, 1024)), generate_uid(), bits_stored=16)
        small = make_radiograph(PIXELS, big.StudyInstanceUID, instance_number=2)
        ae = AE(ae_title="BIG_SCU")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="PACS_BRIDGE", max_pdu=16384)
        assert assoc.is_established
        assert int(assoc.send_c_store(big).Status) == 0xA700
        assert int(assoc.send_c_store(small).Status) == 0, "the association did not go on after the refusal"
        assoc.release()
        assert "exceeds [dicom] max_instance_mb after" in server.log()
        assert [p.stem for p in (server.data_dir / "spool").glob("*/*.dcm")] == [small.SOPInstanceUID]


def test_requests_pynetdicom_cannot_serve_are_aborted_with_a_reason(tmp_path: Path) -> None:
    """PDVs on a context never accepted, C-STORE commands without the UIDs PS3.7 requires, C-FIND or C-MOVE
    on a storage context: A-ABORT with the reason at WARNING, no traceback, the listener goes on."""
    with ServeProcess(tmp_path / "srv") as server:
        ds = make_radiograph(PIXELS, generate_uid())
        encoded = encode(ds, False, True)
        sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
        cases = {
            "presentation context 7, which was not accepted": {"context_id": 7},
            "without an Affected SOP Instance UID": {"omit": (0x1000,)},
            "without an Affected SOP Class UID": {"omit": (0x0002,)},
            "without a Command Field or Command Data Set Type": {"omit": (0x0800,)},
            "command 0x0020 requested; this listener serves C-STORE and C-ECHO only": {"command_field": 0x0020},
            "command 0x0021 requested": {"command_field": 0x0021},
        }
        for reason, kwargs in cases.items():
            status = raw_c_store(
                server.port,
                encoded,
                command_sop_class=sop_class,
                command_sop_instance=sop_instance,
                context_sop_class=sop_class,
                **kwargs,
            )
            assert status is None, f"{reason}: answered {status}"
            assert reason in server.log(), reason
        log = server.log()
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
        assert not list((server.data_dir / "spool").glob("*/*.dcm"))
        assert store_small(server.port, 2) == [0, 0], "the listener did not go on"
        assert not [p for p in (server.data_dir / "tmp").iterdir()], "a received data set was left in tmp/"


def _certificate(folder: Path) -> tuple[Path, Path]:
    key, cert = folder / "server.key", folder / "server.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=server"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_idle_connection_does_not_block_the_tls_listener(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    config = {"dicom": {"tls_cert": str(cert), "tls_key": str(key), "acse_timeout": 4}}
    with ServeProcess(tmp_path / "srv", config) as server:
        idle = connect(server.port, source="127.0.0.2")  # never sends a ClientHello
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        results: list[bool] = []

        def echo() -> None:
            ae = AE(ae_title="TLS_SCU")
            ae.add_requested_context(Verification)
            ae.acse_timeout = ae.connection_timeout = 10
            assoc = ae.associate("127.0.0.1", server.port, ae_title="PACS_BRIDGE", tls_args=(context, "127.0.0.1"))
            results.append(assoc.is_established and int(assoc.send_c_echo().Status) == 0)
            if assoc.is_established:
                assoc.release()

        client = threading.Thread(target=echo, daemon=True)
        client.start()
        client.join(timeout=15)
        assert results == [True], "a TLS client waited behind an idle connection"
        # A peer speaking plain DICOM to the TLS port: its handshake fails and is logged.
        plain = connect(server.port, source="127.0.0.3")
        plain.sendall(associate_rq())
        assert closed_by_peer(plain, 5)
        assert closed_by_peer(idle, 8), "the idle connection was never closed"
        time.sleep(0.5)
        log = server.log()
        assert "TLS handshake with 127.0.0.3 failed" in log
        assert "TLS handshake with 127.0.0.2 failed: no handshake within [dicom] acse_timeout" in log
        idle.close()
        plain.close()

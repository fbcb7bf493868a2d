"""C-STORE requests fragmented in every way PS3.8 Annex E allows are stored byte for byte and answered.

A raw-socket requestor (``tests/support/hostile.py``) splits its command sets
and data sets over fragments and PDUs as a peer may: a command in two
fragments of two PDUs, the first data set fragment in the PDU of the last
command fragment, many fragments in one PDU, one-byte fragments, a C-ECHO
between two stores on one association. The responses are read as they
arrive and decoded with pydicom, not with the code under test.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.filereader import read_dataset
from pydicom.uid import generate_uid
from pynetdicom.dsutils import encode

from tests.support.dicom_files import make_radiograph
from tests.support.hostile import associate_rq, connect, pdata_header, read_pdu
from tests.support.serve import ServeProcess

DX = "1.2.840.10008.5.1.4.1.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _element(element: int, value: bytes) -> bytes:
    value += b"\0" * (len(value) % 2)
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def command(field: int, message_id: int, sop_class: str, sop_instance: str | None) -> bytes:
    elements = _element(0x0002, sop_class.encode()) + _element(0x0100, struct.pack("<H", field))
    elements += _element(0x0110, struct.pack("<H", message_id))
    if sop_instance is not None:
        elements += _element(0x0700, struct.pack("<H", 0))
    elements += _element(0x0800, struct.pack("<H", 0x0000 if sop_instance else 0x0101))
    if sop_instance is not None:
        elements += _element(0x1000, sop_instance.encode())
    return struct.pack("<HHII", 0, 0, 4, len(elements)) + elements


def pdu(*items: tuple[int, int, bytes]) -> bytes:
    """One P-DATA-TF PDU of (presentation context ID, control header, fragment) items."""
    body = b"".join(struct.pack(">IB", len(data) + 2, cid) + bytes([control]) + data for cid, control, data in items)
    return pdata_header(len(body)) + body


def responses(sock: object, count: int) -> list[dict[str, int | str]]:
    """The next ``count`` response command sets, decoded by pydicom."""
    found: list[dict[str, int | str]] = []
    gathered = b""
    while len(found) < count:
        answer = read_pdu(sock, timeout=30)  # type: ignore[arg-type]
        assert answer is not None and answer[0] == 0x04, f"no response PDU: {answer!r}"
        body, offset = answer[1], 0
        while offset + 6 <= len(body):
            (length,) = struct.unpack(">I", body[offset : offset + 4])
            control = body[offset + 5]
            assert control & 1, "a response carries no data set"
            gathered += body[offset + 6 : offset + 4 + length]
            offset += 4 + length
            if control & 2:
                ds = read_dataset(io.BytesIO(gathered), is_implicit_VR=True, is_little_endian=True)
                assert int(ds.CommandGroupLength) == len(gathered) - 12, "wrong Command Group Length"
                gathered = b""
                found.append(
                    {
                        "field": int(ds.CommandField),
                        "id": int(ds.MessageIDBeingRespondedTo),
                        "status": int(ds.Status),
                        "class": str(ds.get("AffectedSOPClassUID", "")),
                        "instance": str(ds.get("AffectedSOPInstanceUID", "")),
                    }
                )
    return found


def test_fragmented_stores_and_an_echo_on_one_association_are_stored_byte_for_byte(tmp_path: Path) -> None:
    study = generate_uid()
    pixels = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.float64)
    sets = [make_radiograph(pixels, study, instance_number=n + 1) for n in range(3)]
    encoded = [encode(ds, False, True) for ds in sets]
    with ServeProcess(tmp_path / "srv") as server:
        sock = connect(server.port)
        try:
            sock.sendall(associate_rq(abstract_syntaxes=(DX, VERIFICATION), transfer_syntaxes=(EXPLICIT_LE,)))
            accepted = read_pdu(sock)
            assert accepted is not None and accepted[0] == 0x02
            # 1: the command in two fragments in two PDUs; the first data set fragment shares the PDU of the
            # command's last fragment; the rest as many small fragments in one PDU.
            first = command(0x0001, 1, DX, str(sets[0].SOPInstanceUID))
            data = encoded[0]
            sock.sendall(pdu((1, 0x01, first[:20])))
            sock.sendall(pdu((1, 0x03, first[20:]), (1, 0x00, data[:100])))
            rest = [data[n : n + 997] for n in range(100, len(data), 997)]
            sock.sendall(pdu(*[(1, 0x02 if n == len(rest) - 1 else 0x00, part) for n, part in enumerate(rest)]))
            got = responses(sock, 1)  # each request waits for its answer: no asynchronous operations
            # 2: a C-ECHO on the Verification context, served by the other path.
            sock.sendall(pdu((3, 0x03, command(0x0030, 2, VERIFICATION, None))))
            got += responses(sock, 1)
            # 3: one-byte fragments for the first 64 bytes, then the rest in one PDU each of 4000 bytes.
            third = command(0x0001, 3, DX, str(sets[1].SOPInstanceUID))
            data = encoded[1]
            sock.sendall(pdu((1, 0x03, third)))
            sock.sendall(pdu(*[(1, 0x00, data[n : n + 1]) for n in range(64)]))
            chunks = [data[n : n + 4000] for n in range(64, len(data), 4000)]
            for n, part in enumerate(chunks):
                sock.sendall(pdu((1, 0x02 if n == len(chunks) - 1 else 0x00, part)))
            got += responses(sock, 1)
            # 4: a C-STORE whose command names another instance than its data set: refused, nothing kept.
            fourth = command(0x0001, 4, DX, generate_uid())
            sock.sendall(pdu((1, 0x03, fourth), (1, 0x02, encoded[2])))
            got += responses(sock, 1)
            sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + b"\0" * 4)  # A-RELEASE-RQ
            released = read_pdu(sock)
            assert released is not None and released[0] == 0x06, "no A-RELEASE-RP"
        finally:
            sock.close()
        assert got[0] == {
            "field": 0x8001,
            "id": 1,
            "status": 0,
            "class": DX,
            "instance": str(sets[0].SOPInstanceUID),
        }
        assert got[1]["field"] == 0x8030 and got[1]["id"] == 2 and got[1]["status"] == 0
        assert got[2]["field"] == 0x8001 and got[2]["id"] == 3 and got[2]["status"] == 0
        assert got[3]["id"] == 4 and got[3]["status"] == 0xA900, got[3]
        for ds, data in zip(sets[:2], encoded[:2], strict=True):
            stored = server.data_dir / "spool" / study / f"{ds.SOPInstanceUID}.dcm"
            kept = dcmread(stored)
            assert str(kept.file_meta.TransferSyntaxUID) == EXPLICIT_LE
            assert str(kept.file_meta.MediaStorageSOPInstanceUID) == str(ds.SOPInstanceUID)
            assert stored.read_bytes().endswith(data), "the data set was not kept as received"
        assert not (server.data_dir / "spool" / study / f"{sets[2].SOPInstanceUID}.dcm").exists()
        assert not list((server.data_dir / "tmp").iterdir()), "a received data set was left in tmp/"
        log = server.log()
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]

"""Hostile and broken DICOM peers on raw sockets, for the hardening tests and benchmarks.

Each builds PS3.8 PDUs by hand (so that they can lie about lengths, trickle
bytes or stop half-way) and none of them uses pynetdicom's requestor.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Sequence

__all__ = [
    "associate_rq",
    "connect",
    "deflate_bomb",
    "pdata_header",
    "raw_c_store",
    "raw_file_store",
    "read_pdu",
    "set_element_vr",
]

_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_VERIFICATION = "1.2.840.10008.1.1"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(
    called: str = "PACS_BRIDGE",
    calling: str = "HOSTILE",
    abstract_syntaxes: Sequence[str] = (_VERIFICATION,),
    transfer_syntaxes: Sequence[str] = (_EXPLICIT_LE, _IMPLICIT_LE),
    max_length: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) with one presentation context per abstract syntax."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + b"\x00" * 32
    body += _item(0x10, _APPLICATION_CONTEXT.encode())
    for n, abstract in enumerate(abstract_syntaxes):
        context = struct.pack(">BBBB", (2 * n + 1) % 256, 0, 0, 0) + _item(0x30, abstract.encode())
        for ts in transfer_syntaxes:
            context += _item(0x40, ts.encode())
        body += _item(0x20, context)
    body += _item(0x50, _item(0x51, struct.pack(">I", max_length)))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def pdata_header(length: int) -> bytes:
    """The 6-byte header of a P-DATA-TF PDU announcing ``length`` bytes (PS3.8 9.3.5)."""
    return struct.pack(">BBI", 0x04, 0, length)


def connect(
    port: int,
    *,
    source: str = "127.0.0.1",
    host: str = "127.0.0.1",
    timeout: float = 10.0,
) -> socket.socket:
    """A TCP connection from ``source`` (another loopback address counts as another host)."""
    sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_pdu(sock: socket.socket | ssl.SSLSocket, timeout: float = 10.0) -> tuple[int, bytes] | None:
    """The next PDU's type and body, or None if the peer closed the connection."""
    sock.settimeout(timeout)
    header = b""
    deadline = time.monotonic() + timeout
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return None
        header += chunk
        if time.monotonic() > deadline:
            raise TimeoutError("no PDU")
    pdu_type, _, length = struct.unpack(">BBI", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(min(65536, length - len(body)))
        if not chunk:
            return None
        body += chunk
    return pdu_type, body


def set_element_vr(data: bytes, tag: tuple[int, int], vr: bytes) -> bytes:
    """``data`` (Explicit VR Little Endian) with the VR of the first ``tag`` element replaced by ``vr``.

    Only the two VR bytes change (a short-form VR stays short-form), so the
    element's length and everything after it are unchanged.
    """
    needle = struct.pack("<HH", *tag)
    found = data.find(needle, 132)
    while found != -1 and not data[found + 4 : found + 6].isalpha():
        found = data.find(needle, found + 1)
    if found == -1:
        raise ValueError(f"tag {tag} not found")
    return data[: found + 4] + vr + data[found + 6 :]


def deflate_bomb(inflated_bytes: int, sop_instance_uid: str, study_uid: str, series_uid: str) -> bytes:
    """A PS3.10 Secondary Capture file in Deflated Explicit VR Little Endian that inflates to ``inflated_bytes``."""
    import io
    import zlib

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        value += b"\0" * (len(value) % 2)
        return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

    sc = "1.2.840.10008.5.1.4.1.1.7"
    header = (
        element(0x0008, 0x0016, b"UI", sc.encode())
        + element(0x0008, 0x0018, b"UI", sop_instance_uid.encode())
        + element(0x0020, 0x000D, b"UI", study_uid.encode())
        + element(0x0020, 0x000E, b"UI", series_uid.encode())
        + struct.pack("<HH", 0x0009, 0x1001)
        + b"OB\0\0"
        + struct.pack("<I", inflated_bytes)
    )
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(header)]
    zeros = b"\0" * (1 << 22)
    remaining = inflated_bytes
    while remaining > 0:
        parts.append(deflater.compress(zeros[: min(remaining, len(zeros))]))
        remaining -= len(zeros)
    parts.append(deflater.flush())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sc
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue() + b"".join(parts)


def raw_file_store(assoc: object, path: str) -> int:
    """C-STORE the file at ``path`` byte for byte (no re-encoding); the status, -1 for none."""
    from pynetdicom import _config

    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)  # type: ignore[attr-defined]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return int(status.Status) if status and "Status" in status else -1


def _command_element(element: int, value: bytes) -> bytes:
    value += b"\0" * (len(value) % 2)
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _command_status(command: bytes) -> int | None:
    """The Status (0000,0900) of an Implicit VR Little Endian command set, or None."""
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack("<HHI", command[offset : offset + 8])
        if (group, element) == (0x0000, 0x0900):
            return int(struct.unpack("<H", command[offset + 8 : offset + 10])[0])
        offset += 8 + length
    return None


def raw_c_store(
    port: int,
    dataset: bytes,
    *,
    command_sop_class: str,
    command_sop_instance: str,
    context_sop_class: str,
    transfer_syntax: str = _EXPLICIT_LE,
    fragment: int = 8192,
    context_id: int = 1,
    omit: Sequence[int] = (),
    command_field: int = 0x0001,
) -> int | None:
    """One C-STORE-RQ (PS3.7 9.3.1.1) whose command says what the caller wants, on a fresh association.

    The command set is built by hand, so its Affected SOP Class and Instance
    UIDs may differ from the data set's (as a broken or hostile SCU's may);
    ``omit`` leaves out command elements (group 0000 element numbers),
    ``command_field`` makes it another command (0x0020: C-FIND-RQ) and
    ``context_id`` names the presentation context the PDVs claim (the one
    negotiated is 1). Returns the response's Status, or None if none came
    (association refused, aborted or closed).
    """
    sock = connect(port)
    try:
        sock.sendall(associate_rq(abstract_syntaxes=(context_sop_class,), transfer_syntaxes=(transfer_syntax,)))
        answer = read_pdu(sock)
        if answer is None or answer[0] != 0x02:
            return None
        elements = {
            0x0002: command_sop_class.encode(),
            0x0100: struct.pack("<H", command_field),
            0x0110: struct.pack("<H", 1),
            0x0700: struct.pack("<H", 0),
            0x0800: struct.pack("<H", 0x0000),
            0x1000: command_sop_instance.encode(),
        }
        command = b"".join(_command_element(tag, value) for tag, value in elements.items() if tag not in omit)
        command = struct.pack("<HHII", 0x0000, 0x0000, 4, len(command)) + command

        def pdv(control: int, data: bytes) -> bytes:
            item = struct.pack(">IB", len(data) + 2, context_id) + bytes([control]) + data
            return pdata_header(len(item)) + item

        sock.sendall(pdv(0x03, command))
        chunks = [dataset[n : n + fragment] for n in range(0, len(dataset), fragment)] or [b""]
        for n, chunk in enumerate(chunks):
            sock.sendall(pdv(0x02 if n == len(chunks) - 1 else 0x00, chunk))
        response = b""
        while True:
            pdu = read_pdu(sock, timeout=30)
            if pdu is None or pdu[0] != 0x04:
                return None
            body = pdu[1]
            offset = 0
            while offset + 6 <= len(body):
                (length,) = struct.unpack(">I", body[offset : offset + 4])
                control = body[offset + 5]
                response += body[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if control & 0x01 and control & 0x02:
                    sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + b"\0" * 4)  # A-RELEASE-RQ
                    read_pdu(sock)
                    return _command_status(response)
    finally:
        sock.close()

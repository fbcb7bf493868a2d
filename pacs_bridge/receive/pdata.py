"""C-STORE requests served straight from their P-DATA-TF PDUs, in the association's reader thread.

pynetdicom turns every P-DATA-TF PDU (PS3.8 §9.3.5) into objects, hands them
through the upper layer's state machine to its DIMSE provider, which gathers
the message (PS3.8 Annex E), queues it for the association's thread, which
calls the handler, whose status is built into a response message, encoded,
queued back to the reader thread and sent. For a 40 KB instance that path
costs more than the store itself. :class:`StoreReader` serves C-STORE-RQ
messages (PS3.7 §9.3.1) itself, as the PDUs are read:

- the PDVs are walked in place; a command set (Implicit VR Little Endian,
  PS3.7 §6.3) is checked by :func:`~pacs_bridge.receive.network.command_problem`
  and its few elements read without building a data set;
- the data set fragments of a C-STORE-RQ go into a spool temp file as they
  arrive, in the DICOM File Format (PS3.10 §7: preamble, ``DICM``, File Meta
  Information from the request and its presentation context's transfer
  syntax, then the data set as received), exactly the file pynetdicom's
  ``STORE_RECV_CHUNKED_DATASET`` writes (``receive/streaming.py``);
- a data set growing past ``[dicom] max_instance_mb`` stops being written;
  its remaining fragments are read and dropped, and the request answered
  0xA700;
- once the last fragment is in, the store runs (the file is made durable and
  indexed, :meth:`pacs_bridge.receive.handlers.Handlers.store`) and the
  C-STORE-RSP (PS3.7 §9.3.1.2: Affected SOP Class and Instance UID as
  requested, Message ID Being Responded To, no data set, the status) goes
  back in one P-DATA-TF PDU.

Everything else (C-ECHO, a C-STORE-RQ without a data set, A-RELEASE, A-ABORT)
is left to pynetdicom: its PDVs are handed on as a P-DATA-TF PDU of their own.
The upper layer's state does not change (Sta6, data transfer: a P-DATA-TF
received or sent is DT-2 or DT-1, which stay in Sta6), and no request is
pending in pynetdicom while a store is served here, as asynchronous
operations are not negotiated (PS3.7 D.3.3.3).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from pacs_bridge.receive.handlers import ReceivedStore
from pacs_bridge.receive.streaming import SpoolTempFile, take_write_error

__all__ = ["StoreReader", "c_store_response", "command_values", "file_preamble_and_meta"]

LOGGER = logging.getLogger(__name__)

_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_TAG_AFFECTED_SOP_CLASS = 0x00000002
_TAG_COMMAND_FIELD = 0x00000100
_TAG_MESSAGE_ID = 0x00000110
_TAG_DATA_SET_TYPE = 0x00000800
_TAG_AFFECTED_SOP_INSTANCE = 0x00001000


def command_values(command: bytes) -> dict[int, bytes]:
    """The raw values of a command set's elements by tag (PS3.7 §6.3, Implicit VR Little Endian).

    The set must already have passed :func:`~pacs_bridge.receive.network.command_problem`.
    """
    values: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHL", command, offset)
        offset += 8
        values[(group << 16) | element] = command[offset : offset + length]
        offset += length
    return values


def _us(values: dict[int, bytes], tag: int) -> int | None:
    raw = values.get(tag, b"")
    return struct.unpack("<H", raw)[0] if len(raw) == 2 else None


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"  # UI values are padded with NUL to an even length (PS3.5 9.1)
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def c_store_response(message_id: int, sop_class: bytes, sop_instance: bytes, status: int) -> bytes:
    """The command set of a C-STORE-RSP (PS3.7 §9.3.1.2), group length first, Implicit VR Little Endian."""
    body = b"".join(
        (
            _element(_TAG_AFFECTED_SOP_CLASS, sop_class),
            _element(_TAG_COMMAND_FIELD, struct.pack("<H", _C_STORE_RSP)),
            _element(0x00000120, struct.pack("<H", message_id)),
            _element(_TAG_DATA_SET_TYPE, struct.pack("<H", _NO_DATA_SET)),
            _element(0x00000900, struct.pack("<H", status)),
            _element(_TAG_AFFECTED_SOP_INSTANCE, sop_instance),
        )
    )
    return _element(0x00000000, struct.pack("<L", len(body))) + body


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    """One element in Explicit VR Little Endian (PS3.5 7.1.2): OB with a 4-byte length, the others with 2."""
    if vr == b"OB":
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _ui(text: str) -> bytes:
    # A UID has at most 64 characters (PS3.5 9.1); a longer one is invalid and its store refused later.
    raw = text.encode("ascii", "replace")[:64]
    return raw + b"\x00" if len(raw) % 2 else raw


def file_preamble_and_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """The start of a PS3.10 file (§7.1): 128-byte preamble, ``DICM``, File Meta Information.

    Group 0002 in Explicit VR Little Endian with its group length, version
    00 01, the Media Storage SOP Class and Instance UIDs, the Transfer Syntax
    UID, and pynetdicom's Implementation Class UID and Version Name: byte for
    byte what pydicom's ``write_file_meta_info`` writes for pynetdicom's
    ``create_file_meta`` (``tests/unit/test_receive_file_meta.py``), at a
    fraction of its cost per instance.
    """
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    body = b"".join(
        (
            _explicit(0x00020001, b"OB", b"\x00\x01"),
            _explicit(0x00020002, b"UI", _ui(sop_class)),
            _explicit(0x00020003, b"UI", _ui(sop_instance)),
            _explicit(0x00020010, b"UI", _ui(transfer_syntax)),
            _explicit(0x00020012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID)),
            _explicit(0x00020013, b"SH", version + b" " if len(version) % 2 else version),
        )
    )
    return b"\x00" * 128 + b"DICM" + _explicit(0x00020000, b"UL", struct.pack("<L", len(body))) + body


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip("\x00 ")


@dataclass
class _Incoming:
    """The C-STORE-RQ whose data set is arriving."""

    context_id: int
    message_id: int
    sop_class: bytes
    sop_instance: bytes
    file: SpoolTempFile | None
    received: int = 0
    cut_at: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    data_offset: int | None = None
    """Where the data set begins in ``file`` (after the preamble and File Meta Information written here)."""


class StoreReader:
    """Serves the C-STORE-RQ messages of one association from its P-DATA-TF PDUs (see the module docstring).

    ``store`` makes one received request durable and returns its status;
    ``open_file`` makes the temp file a data set is written into; ``send``
    writes bytes to the peer; ``refuse`` aborts the association with a reason.
    """

    def __init__(
        self,
        assoc: Any,
        *,
        max_instance_bytes: int,
        store: Callable[[Any, ReceivedStore], int],
        open_file: Callable[[], SpoolTempFile],
        send: Callable[[bytes], None],
        refuse: Callable[[str], None],
        pending_elsewhere: Callable[[], bool],
        accepted: Callable[[], frozenset[int]],
        problem: Callable[[bytes], str | None],
        max_command_bytes: int,
    ) -> None:
        self.assoc = assoc
        self.max_instance_bytes = max_instance_bytes
        self._store = store
        self._open_file = open_file
        self._send = send
        self._refuse = refuse
        self._pending_elsewhere = pending_elsewhere
        self._accepted = accepted
        self._problem = problem
        self._max_command = max_command_bytes
        self._command = bytearray()
        self._command_context: int | None = None
        self._incoming: _Incoming | None = None
        self._forwarding = False  # a message pynetdicom serves is under way: its data set goes there too

    def take(self, pdu: bytes | bytearray) -> list[tuple[int, bytes]] | None:
        """Serve what this P-DATA-TF PDU (header included) holds; return the PDVs for pynetdicom, None if refused."""
        view = memoryview(pdu)
        offset, end = 6, len(pdu)
        forward: list[tuple[int, bytes]] = []
        while offset < end:
            if offset + 4 > end:
                self._refuse("P-DATA-TF PDU ends inside a presentation data value item (PS3.8 9.3.5.1)")
                return None
            (length,) = struct.unpack_from(">L", pdu, offset)
            if length < 2 or offset + 4 + length > end:
                self._refuse(
                    "empty presentation data value" if length < 2 else "presentation data value item overruns its PDU"
                )
                return None
            context_id = pdu[offset + 4]
            control = pdu[offset + 5]
            fragment = view[offset + 6 : offset + 4 + length]
            offset += 4 + length
            if context_id not in self._accepted():
                self._refuse(
                    f"presentation data value for presentation context {context_id}, which was not accepted "
                    "(PS3.8 9.3.5.1)"
                )
                return None
            if not self._fragment(context_id, control, fragment, forward):
                return None
        return forward

    def _fragment(self, context_id: int, control: int, fragment: memoryview, forward: list[tuple[int, bytes]]) -> bool:
        last = bool(control & 2)
        if control & 1:
            return self._command_fragment(context_id, last, fragment, forward)
        incoming = self._incoming
        if incoming is not None:
            if context_id != incoming.context_id:
                self._refuse("data set fragment on another presentation context than its command (PS3.8 E.2)")
                return False
            self._data(incoming, fragment)
            if last:
                self._incoming = None
                self._complete(incoming)
            return True
        if self._forwarding:
            forward.append((context_id, bytes([control]) + bytes(fragment)))
            self._forwarding = not last
            return True
        self._refuse("data set without a command")
        return False

    def _command_fragment(
        self, context_id: int, last: bool, fragment: memoryview, forward: list[tuple[int, bytes]]
    ) -> bool:
        if self._incoming is not None or self._forwarding:
            self._refuse("new request before the previous one was answered (no asynchronous operations)")
            return False
        if not self._command:
            if self._pending_elsewhere():
                self._refuse("new request before the previous one was answered (no asynchronous operations)")
                return False
            self._command_context = context_id
        elif context_id != self._command_context:
            self._refuse("command fragment on another presentation context than the first (PS3.8 E.2)")
            return False
        if len(self._command) + len(fragment) > self._max_command:
            self._refuse(f"command set longer than {self._max_command} bytes")
            return False
        self._command.extend(fragment)
        if not last:
            return True
        command = bytes(self._command)
        self._command.clear()
        problem = self._problem(command)
        if problem:
            self._refuse(problem)
            return False
        values = command_values(command)
        has_data_set = _us(values, _TAG_DATA_SET_TYPE) != _NO_DATA_SET
        message_id = _us(values, _TAG_MESSAGE_ID)
        if _us(values, _TAG_COMMAND_FIELD) != _C_STORE_RQ or not has_data_set or message_id is None:
            forward.append((context_id, b"\x03" + command))
            self._forwarding = has_data_set
            return True
        self._begin(context_id, message_id, values)
        return True

    def _begin(self, context_id: int, message_id: int, values: dict[int, bytes]) -> None:
        sop_class = values[_TAG_AFFECTED_SOP_CLASS]
        sop_instance = values[_TAG_AFFECTED_SOP_INSTANCE]
        temp = self._open_file()
        incoming = _Incoming(context_id, message_id, sop_class, sop_instance, temp)
        context = self.assoc._accepted_cx[context_id]
        incoming.meta = {
            "context_class": str(context.abstract_syntax),
            "transfer_syntax": str(context.transfer_syntax[0]),
        }
        if temp.error is None:
            # The File Meta Information as pynetdicom writes it for a streamed data set (PS3.10 7.1).
            head = file_preamble_and_meta(_text(sop_class), _text(sop_instance), incoming.meta["transfer_syntax"])
            temp.write(head)
            incoming.data_offset = len(head)
        self._incoming = incoming

    def _data(self, incoming: _Incoming, fragment: memoryview) -> None:
        incoming.received += len(fragment)
        if incoming.cut_at is not None:
            return  # being dropped
        if incoming.received > self.max_instance_bytes:
            incoming.cut_at = incoming.received
            LOGGER.warning(
                "data set of request %d from %s exceeds [dicom] max_instance_mb after %d bytes; "
                "the rest is read and dropped, and the store refused",
                incoming.message_id,
                self._peer,
                incoming.received,
            )
            self._discard(incoming)
            return
        if incoming.file is not None:
            incoming.file.write(fragment)

    @property
    def _peer(self) -> str:
        try:
            return str(self.assoc.requestor.address)
        except Exception:
            return "unknown peer"

    def _discard(self, incoming: _Incoming) -> None:
        temp, incoming.file = incoming.file, None
        if temp is None:
            return
        temp.close()
        take_write_error(temp.name)
        try:
            os.unlink(temp.name)
        except OSError:
            pass

    def _complete(self, incoming: _Incoming) -> None:
        temp = incoming.file
        staged = Path(temp.name) if temp is not None else None
        if temp is not None:
            temp.close()
        received = ReceivedStore(
            message_id=incoming.message_id,
            affected_sop_class=_text(incoming.sop_class),
            affected_sop_instance=_text(incoming.sop_instance),
            context_class=incoming.meta["context_class"],
            transfer_syntax=incoming.meta["transfer_syntax"],
            staged=staged,
            write_error=take_write_error(staged) if staged is not None else None,
            cut_at=incoming.cut_at,
            data_offset=incoming.data_offset,
        )
        try:
            status = self._store(self.assoc, received)
        except Exception:  # the store answers with a status and never raises; if it did, refuse
            LOGGER.exception("C-STORE from %s failed unexpectedly; refused, nothing stored", self._peer)
            status = 0xA700
        finally:
            self._discard(incoming)  # the spool's link to the file stays
        response = c_store_response(incoming.message_id, incoming.sop_class, incoming.sop_instance, status)
        item = struct.pack(">LBB", len(response) + 2, incoming.context_id, 0x03) + response
        self._send(struct.pack(">BBL", 0x04, 0x00, len(item)) + item)

    def close(self) -> None:
        """The association ended: a data set still arriving was not acknowledged; its temp file goes."""
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            self._discard(incoming)

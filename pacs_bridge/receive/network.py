"""The listener's defences against broken and hostile peers: every read bounded by time and size.

pynetdicom reads a PDU with blocking ``recv`` calls that have no deadline,
buffers whatever length a PDU header declares, and (with TLS) does the TLS
handshake in the thread that accepts connections. One idle or slow peer can
therefore hold the listener or memory for ever. This module plugs into
pynetdicom's documented extension points (``AE.make_server(server_class=...,
request_handler=...)``) and replaces the one method that reads PDUs:

- :class:`GuardedServer` wraps TLS sockets without handshaking in the
  accept thread (``do_handshake_on_connect=False``) and refuses a new TCP
  connection when its host already holds ``[dicom] max_associations_per_host``
  connections, or when ``2 x max_associations`` connections are open in all.
- :class:`GuardedRequestHandler` does the TLS handshake in the connection's
  own thread, within ``acse_timeout``, and logs a failed handshake at WARNING
  with the peer address and the reason; it then gives the association a
  :class:`GuardedDUL`.
- :class:`GuardedDUL` reads each PDU (PS3.8 §9.3) against a deadline: the
  A-ASSOCIATE-RQ must be whole within ``acse_timeout`` of the connection,
  every later PDU within ``network_timeout`` of its first byte (a peer that
  trickles a byte at a time is cut off, however steady). A PDU longer than
  we announced (P-DATA-TF: our Maximum Length, PS3.8 D.1; A-ASSOCIATE-RQ:
  1 MiB; others: their fixed size) is refused before its body is read, with
  an A-ABORT through the state machine (Evt19, invalid PDU). A command set
  over 64 KiB, or a new request sent before the previous one was answered
  (asynchronous operations are not negotiated, PS3.7 D.3.3.3), aborts too.
  A data set that grows past ``[dicom] max_instance_mb`` while it arrives is
  cut short: the message is completed empty at that point, the rest of its
  fragments are read and dropped, and the C-STORE handler answers 0xA700
  for it (see :meth:`GuardedDUL.take_refusal`), so memory never holds more
  than the limit and the association goes on.

Both loops of an association wait for their work instead of polling: the
DUL reactor sleeps in ``select`` on the socket and a wake-up socket that
every primitive handed to it (a C-STORE response, an A-RELEASE-RP) rings,
and the association reactor (:class:`PromptAssociation`) waits on its
message queue. pynetdicom sleeps a fixed millisecond in each loop, up to
three sleeps per C-STORE, and wakes a thousand times a second while idle.
pynetdicom's own log handlers, which format every PDU for its DEBUG log, are
unbound unless that log is on.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from pacs_bridge.receive.pdata import StoreReader
from pacs_bridge.receive.streaming import temp_file_factory

__all__ = ["GuardedDUL", "GuardedRequestHandler", "GuardedServer", "NetworkLimits", "PromptAssociation"]

LOGGER = logging.getLogger(__name__)

_PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)
# A-ASSOCIATE-RQ/AC: 128 presentation contexts and user identity tokens fit with room to spare.
_MAX_ASSOCIATE_PDU = 1 << 20
# A-ASSOCIATE-RJ, A-RELEASE-RQ/RP, A-ABORT carry 4 bytes (PS3.8 9.3.4, 9.3.6-9.3.8).
_MAX_SMALL_PDU = 64
_MAX_COMMAND_SET = 64 * 1024
_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)
# Longest wait of an idle reactor before it looks at its timers (ARTIM, idle, release and abort flags).
_IDLE_WAIT = 0.05
_REACTOR_WAIT = 0.1


@dataclass(frozen=True)
class NetworkLimits:
    """The bounds every connection is held to (from ``[dicom]``)."""

    max_pdu_bytes: int
    max_instance_bytes: int
    acse_timeout: float
    network_timeout: float
    max_per_host: int
    max_connections: int
    reuse_port: bool = False


class _Deadline(Exception):
    def __init__(self, received: int) -> None:
        super().__init__(received)
        self.received = received


class _Throttled:
    """Log a repeated warning at most once per ``interval`` seconds per key, with the count skipped."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last, skipped = self._last.get(key, (0.0, 0))
            if last and now - last < self.interval:
                self._last[key] = (last, skipped + 1)
                return
            self._last[key] = (now, 0)
            if len(self._last) > 10_000:
                self._last.clear()
        suffix = f" ({skipped} more like this in the last {self.interval:.0f} s)" if skipped else ""
        LOGGER.warning(message + suffix, *args)


_THROTTLED = _Throttled()


def _recv_into(raw: socket.socket, view: memoryview, deadline: float) -> int:
    """Fill ``view`` from the socket before ``deadline``; fewer bytes if the peer closes. Raises :class:`_Deadline`.

    The bytes land in their final buffer: a P-DATA-TF of megabytes is not
    gathered in pieces and copied again.
    """
    received = 0
    while received < len(view):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline(received)
        raw.settimeout(remaining)
        try:
            count = raw.recv_into(view[received:])
        except TimeoutError:
            raise _Deadline(received) from None
        if not count:
            break
        received += count
    return received


def _recv_exactly(raw: socket.socket, count: int, deadline: float) -> bytes:
    """Read ``count`` bytes before ``deadline``; fewer if the peer closes. Raises :class:`_Deadline`."""
    buf = bytearray(count)
    return bytes(buf[: _recv_into(raw, memoryview(buf), deadline)])


def _p_data_tf(items: list[tuple[int, bytes]]) -> bytearray:
    """A P-DATA-TF PDU (PS3.8 9.3.5) of ``(presentation context ID, control header + fragment)`` items."""
    body = b"".join(struct.pack(">LB", len(value) + 1, context_id) + value for context_id, value in items)
    return bytearray(struct.pack(">BBL", 0x04, 0x00, len(body)) + body)


_C_STORE_RQ = 0x0001
_NO_DATA_SET = 0x0101
# C-STORE-RQ, C-ECHO-RQ, C-CANCEL-RQ (PS3.7 E.1): what an acceptor of storage and verification is sent.
_SERVED_COMMANDS = frozenset({_C_STORE_RQ, 0x0030, 0x0FFF})
_TAG_AFFECTED_SOP_CLASS = 0x00000002
_TAG_COMMAND_FIELD = 0x00000100
_TAG_DATA_SET_TYPE = 0x00000800
_TAG_AFFECTED_SOP_INSTANCE = 0x00001000


def command_problem(command: bytes) -> str | None:
    """Why a complete command set (PS3.7 §6.3, Implicit VR Little Endian) cannot be served, or None.

    Its elements are walked without decoding their values: a set that does
    not parse, a command other than C-STORE-RQ, C-ECHO-RQ and C-CANCEL-RQ
    (a C-FIND, C-GET or C-MOVE sent on a storage context), or a C-STORE-RQ
    with a data set but without Affected SOP Class UID or Affected SOP
    Instance UID (PS3.7 9.3.1.1, both required), is refused before
    pynetdicom builds the message from it.
    """
    values: dict[int, bytes] = {}
    offset = 0
    while offset < len(command):
        if offset + 8 > len(command):
            return "command set ends inside an element header"
        group, element, length = struct.unpack_from("<HHL", command, offset)
        offset += 8
        if group != 0x0000 or length > len(command) - offset:
            return "command set holds an element outside group 0000 or longer than the set"
        values[(group << 16) | element] = command[offset : offset + length]
        offset += length
    field = values.get(_TAG_COMMAND_FIELD, b"")
    data_set = values.get(_TAG_DATA_SET_TYPE, b"")
    if len(field) != 2 or len(data_set) != 2:
        return "command set without a Command Field or Command Data Set Type"
    command_field = struct.unpack("<H", field)[0]
    if command_field not in _SERVED_COMMANDS:
        return f"command 0x{command_field:04X} requested; this listener serves C-STORE and C-ECHO only (PS3.7 9.3)"
    if command_field == _C_STORE_RQ and struct.unpack("<H", data_set)[0] != _NO_DATA_SET:
        for tag, name in ((_TAG_AFFECTED_SOP_CLASS, "Class"), (_TAG_AFFECTED_SOP_INSTANCE, "Instance")):
            if not values.get(tag, b"").strip(b"\x00 "):
                return f"C-STORE request without an Affected SOP {name} UID (PS3.7 9.3.1.1)"
    return None


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's queue of primitives for its association (A-RELEASE, A-ABORT...); a put wakes the reactor."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class GuardedDUL(DULServiceProvider):
    """pynetdicom's DICOM Upper Layer with bounded PDU reads (see the module docstring)."""

    def __init__(self, assoc: Any, limits: NetworkLimits, connected_at: float) -> None:
        super().__init__(assoc)
        self.to_user_queue = _WakingQueue(self._wake_association)
        self.limits = limits
        self.connected_at = connected_at
        self._refused: dict[int, int] = {}
        self._refused_lock = threading.Lock()
        self._closing = False
        self._command = bytearray()  # the command set being received (PS3.7 6.3), cleared once complete
        self._accepted: frozenset[int] | None = None
        self._dataset_bytes = 0
        self._discarding = False
        self.store_reader: StoreReader | None = None  # C-STORE served from the PDUs (receive/pdata.py)
        self._bell_rx, self._bell_tx = socket.socketpair()
        self._bell_rx.setblocking(False)
        self._bell_tx.setblocking(False)

    def _wake_association(self) -> None:
        """Wake the association's reactor (:class:`PromptAssociation`), which waits on its message queue."""
        dimse = getattr(self.assoc, "dimse", None)
        if dimse is None:
            return
        messages = dimse.msg_queue
        with messages.not_empty:
            messages.not_empty.notify_all()

    def _ring(self) -> None:
        """Wake the reactor if it waits (a byte on the wake-up socket)."""
        try:
            self._bell_tx.send(b"\0")
        except OSError:  # already ringing (buffer full) or closed with the reactor
            pass

    def send_pdu(self, primitive: Any) -> None:
        """Queue a primitive for the peer (PS3.8 §9.1) and wake the reactor to send it now."""
        super().send_pdu(primitive)
        self._ring()

    def kill_dul(self) -> None:
        """Stop the reactor at once."""
        super().kill_dul()
        self._ring()

    def _wait_for_work(self) -> None:
        """Sleep until the socket is readable, a primitive is queued, or :data:`_IDLE_WAIT` has passed."""
        wrapper = self.socket
        raw = wrapper.socket if wrapper is not None else None
        if raw is None or raw.fileno() < 0:
            time.sleep(0.001)
            return
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return  # decrypted bytes wait in the TLS layer, where select cannot see them
        try:
            select.select([raw, self._bell_rx], [], [], _IDLE_WAIT)
        except (OSError, ValueError):
            time.sleep(0.001)
        try:
            while self._bell_rx.recv(4096):
                pass
        except OSError:
            pass

    def run_reactor(self) -> None:
        """The DUL reactor (PS3.8 §9.2 state machine), waiting for work instead of polling.

        One step per turn, as in pynetdicom: send a queued primitive, or read a
        PDU, then run the next state machine event; when a turn found nothing
        to do the reactor waits in :meth:`_wait_for_work`.
        """
        self._idle_timer.start()
        idle = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if idle:
                    self._wait_for_work()
                if self._kill_thread:
                    return
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if not self._process_recv_primitive() and self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:
                    LOGGER.exception("association from %s: upper layer failed; aborted", self._peer)
                    self._abort_hard()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    idle = True
                    continue
                try:
                    self.state_machine.do_action(event)
                except Exception:
                    # pynetdicom has logged it; the association cannot go on, the listener does.
                    self._abort_hard()
                    return
                idle = False
        finally:
            if self.store_reader is not None:
                self.store_reader.close()
            self._bell_rx.close()
            self._bell_tx.close()
            self._wake_association()  # it ends once it sees this thread gone

    def _abort_hard(self) -> None:
        """A-ABORT sent past the state machine, whose state can no longer be trusted (PS3.8 §9.3.8)."""
        pdu = A_ABORT_RQ()
        pdu.source = 0x02
        pdu.reason_diagnostic = 0x00
        try:
            if self.socket is not None:
                self.socket.send(pdu.encode())
        except Exception:
            pass
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True

    @property
    def _peer(self) -> str:
        try:
            return str(self.assoc.requestor.address)
        except Exception:
            return "unknown peer"

    def take_refusal(self, message_id: int) -> int | None:
        """Bytes received of the data set of request ``message_id`` if it was cut short for its size."""
        with self._refused_lock:
            return self._refused.pop(message_id, None)

    def refuse(self, reason: str) -> None:
        """Abort the association for ``reason`` (logged at WARNING with the peer)."""
        self._refuse_pdu("%s", reason)

    def send_bytes(self, data: bytes) -> None:
        """Write an encoded PDU to the peer from the reactor's thread (a closed connection queues Evt17)."""
        if self.socket is not None:
            self.socket.send(data)

    def accepted_ids(self) -> frozenset[int]:
        """The IDs of the accepted presentation contexts (PS3.8 9.3.3.2)."""
        return self._accepted_ids()

    def _refuse_pdu(self, reason: str, *args: Any) -> None:
        """A-ABORT through the state machine (Evt19, invalid PDU); the connection closes after it."""
        LOGGER.warning("association from %s aborted: " + reason, self._peer, *args)
        self._closing = True
        self.event_queue.put("Evt19")

    def _close(self) -> None:
        if self.socket is not None:
            self.socket.close()  # Evt17, transport connection closed

    def _read_pdu_data(self) -> None:
        wrapper = self.socket
        raw = wrapper.socket if wrapper is not None else None
        if wrapper is None or raw is None or self._closing:
            # After a refused PDU its body is still in the socket: never parse it, close instead.
            self._close()
            return
        if self.state_machine.current_state == "Sta2":
            deadline = self.connected_at + self.limits.acse_timeout
            what = f"the association request within [dicom] acse_timeout ({self.limits.acse_timeout:g} s)"
        else:
            deadline = time.monotonic() + self.limits.network_timeout
            what = f"a whole PDU within [dicom] network_timeout ({self.limits.network_timeout:g} s)"
        try:
            header = _recv_exactly(raw, 6, deadline)
            if len(header) < 6:
                self._close()
                return
            pdu_type, _, pdu_length = struct.unpack(">BBL", header)
            if pdu_type not in _PDU_TYPES:
                self._refuse_pdu("unknown PDU type 0x%02X", pdu_type)
                return
            if pdu_type == 0x04:
                limit, name = self.limits.max_pdu_bytes, "[dicom] max_pdu_size announced"
            elif pdu_type in (0x01, 0x02):
                limit, name = _MAX_ASSOCIATE_PDU, "the association request limit"
            else:
                limit, name = _MAX_SMALL_PDU, "the size of its PDU type"
            if pdu_length > limit:
                self._refuse_pdu("PDU type 0x%02X of %d bytes exceeds %s (%d)", pdu_type, pdu_length, name, limit)
                return
            # Whole PDU in one buffer (the length is bounded above), as the decoder takes it.
            pdu_bytes = bytearray(6 + pdu_length)
            pdu_bytes[:6] = header
            received = _recv_into(raw, memoryview(pdu_bytes)[6:], deadline)
        except _Deadline as exc:
            _THROTTLED.warning(
                f"slow:{self._peer}",
                "connection from %s closed: it did not send %s (%d bytes received of the PDU)",
                self._peer,
                what,
                exc.received,
            )
            self._close()
            return
        except OSError:
            self._close()
            return
        finally:
            if wrapper.socket is not None:
                # Writes to the peer are bounded too: a peer that stops reading is cut off.
                try:
                    raw.settimeout(self.limits.network_timeout)
                except OSError:
                    pass
        if received != pdu_length:
            self._close()  # the peer closed in the middle of a PDU
            return
        if pdu_type == 0x04 and self.store_reader is not None and self.state_machine.current_state == "Sta6":
            forward = self.store_reader.take(pdu_bytes)
            if not forward:
                return  # served here (C-STORE), or refused (the abort is queued)
            pdu_bytes = _p_data_tf(forward)
        try:
            pdu, event = self._decode_pdu(pdu_bytes)
        except Exception as exc:
            self._refuse_pdu("PDU type 0x%02X cannot be decoded (%s)", pdu_type, type(exc).__name__)
            return
        if pdu_type == 0x04 and not self._admit(pdu):
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _accepted_ids(self) -> frozenset[int]:
        if self._accepted is None:
            self._accepted = frozenset(int(cx.context_id or 0) for cx in self.assoc.accepted_contexts)
        return self._accepted

    def _current_message_id(self) -> int | None:
        message = self.assoc.dimse.message
        command = getattr(message, "command_set", None) if message is not None else None
        value = getattr(command, "MessageID", None) if command is not None else None
        return int(value) if value is not None else None

    def _admit(self, pdu: Any) -> bool:
        """Account the PDVs of a P-DATA-TF PDU (PS3.8 E.2); cut data sets that grow too large."""
        kept = []
        for item in pdu.presentation_data_value_items:
            data = item.presentation_data_value
            if not data:
                self._refuse_pdu("empty presentation data value")
                return False
            if item.presentation_context_id not in self._accepted_ids():
                self._refuse_pdu(
                    "presentation data value for presentation context %d, which was not accepted (PS3.8 9.3.5.1)",
                    item.presentation_context_id,
                )
                return False
            control = data[0]
            last = bool(control & 2)
            if control & 1:  # command fragment
                if not self._command and self.assoc.dimse.msg_queue.qsize() > 0:
                    self._refuse_pdu("new request before the previous one was answered (no asynchronous operations)")
                    return False
                self._discarding = False
                if len(self._command) + len(data) - 1 > _MAX_COMMAND_SET:
                    self._refuse_pdu("command set longer than %d bytes", _MAX_COMMAND_SET)
                    return False
                self._command.extend(memoryview(data)[1:])
                if last:
                    problem = command_problem(bytes(self._command))
                    self._command.clear()
                    if problem:
                        self._refuse_pdu("%s", problem)
                        return False
                    self._dataset_bytes = 0
                kept.append(item)
                continue
            if self._discarding:
                self._discarding = not last
                continue
            self._dataset_bytes += len(data) - 1
            if self._dataset_bytes > self.limits.max_instance_bytes:
                message_id = self._current_message_id()
                if message_id is None:
                    self._refuse_pdu("data set without a command")
                    return False
                with self._refused_lock:
                    self._refused[message_id] = self._dataset_bytes
                LOGGER.warning(
                    "data set of request %d from %s exceeds [dicom] max_instance_mb after %d bytes; "
                    "the rest is read and dropped, and the store refused",
                    message_id,
                    self._peer,
                    self._dataset_bytes,
                )
                item.presentation_data_value = bytes([control | 2])  # ends the data set here, empty
                kept.append(item)
                self._discarding = not last
                self._dataset_bytes = 0
                continue
            if last:
                self._dataset_bytes = 0
            kept.append(item)
        pdu.presentation_data_value_items = kept
        return True


class PromptAssociation(Association):
    """An acceptor association whose reactor waits on its message queue instead of sleeping."""

    def _run_reactor(self) -> None:
        """Serve DIMSE requests (PS3.7 §9) as they complete; end on release, abort or timeout.

        The checks are pynetdicom's, in its order; only the wait differs: a
        request that completes, a primitive from the upper layer (A-RELEASE,
        A-ABORT) and the end of the DUL thread wake the loop at once; otherwise
        it looks again every :data:`_REACTOR_WAIT` seconds (a kill from another
        thread, the idle timer), instead of pynetdicom's busy loop.
        """
        self._is_paused = False
        messages = self.dimse.msg_queue
        while not self._kill:
            with messages.not_empty:  # holds the queue's own mutex: look at its deque, not qsize()
                if not messages.queue:
                    messages.not_empty.wait(_REACTOR_WAIT)
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, message = self.dimse.get_msg(block=False)
            if message:
                self._serve_request(message, int(context_id or 0))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.debug("association released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for the A-ABORT
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                LOGGER.warning(
                    "association from %s ended: no PDU within [dicom] network_timeout", self.requestor.address
                )
                self.abort()  # the listener never sets network_timeout_response to A-RELEASE
                self.kill()
                return


class GuardedRequestHandler(RequestHandler):
    """Per connection, in its own thread: the TLS handshake, then an association with a :class:`GuardedDUL`."""

    server: GuardedServer

    def setup(self) -> None:
        self.connected_at = time.monotonic()

    def handle(self) -> None:
        try:
            if isinstance(self.request, ssl.SSLSocket) and not self._handshake():
                return
            super().handle()
        finally:
            self.server.release_pending(self.client_address[0])

    def _handshake(self) -> bool:
        sock = self.request
        assert isinstance(sock, ssl.SSLSocket)
        peer = self.client_address[0]
        limits = self.server.limits
        try:
            sock.settimeout(limits.acse_timeout)
            sock.do_handshake()
        except TimeoutError:
            reason = f"no handshake within [dicom] acse_timeout ({limits.acse_timeout:g} s)"
        except ssl.SSLError as exc:
            reason = exc.reason or exc.strerror or str(exc)
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
        else:
            return True
        _THROTTLED.warning(f"tls:{peer}:{reason}", "TLS handshake with %s failed: %s; connection closed", peer, reason)
        self.server.shutdown_request(sock)
        return False

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        assoc.__class__ = PromptAssociation  # only _run_reactor differs; built by pynetdicom as usual
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            # pynetdicom's own handlers format every PDU and DIMSE message for its DEBUG log even when
            # nothing prints it; they stay when that log is on, to debug a peer.
            for event, handler in _STANDARD_LOG_HANDLERS:
                assoc.unbind(event, handler)
        # Swap in the guarded DUL before the association thread starts. The socket
        # wrapper queued its transport-connection event (Evt5) on the first DUL: move it.
        plain = assoc.dul
        guarded = GuardedDUL(assoc, self.server.limits, self.connected_at)
        guarded.socket = plain.socket
        while not plain.event_queue.empty():
            guarded.event_queue.put(plain.event_queue.get())
        assoc.dul = guarded
        store, open_file = self.server.store, temp_file_factory()
        if store is not None and open_file is not None:
            guarded.store_reader = StoreReader(
                assoc,
                max_instance_bytes=self.server.limits.max_instance_bytes,
                store=store,
                open_file=open_file,
                send=guarded.send_bytes,
                refuse=guarded.refuse,
                pending_elsewhere=lambda: assoc.dimse.msg_queue.qsize() > 0,
                accepted=guarded.accepted_ids,
                problem=command_problem,
                max_command_bytes=_MAX_COMMAND_SET,
            )
        # The timeouts live in the DUL's timers: apply them to the new one.
        assoc.acse_timeout = assoc.acse_timeout
        assoc.network_timeout = assoc.network_timeout
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """The association server: lazy TLS, connection limits per host and in all."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self, *args: Any, limits: NetworkLimits, store: Callable[[Any, Any], int] | None = None, **kwargs: Any
    ) -> None:
        self.limits = limits
        self.store = store
        self._pending: Counter[str] = Counter()
        self._pending_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        """Bind; with ``[dicom] reuse_port``, as one of several processes that share the port (SO_REUSEPORT)."""
        if self.limits.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept; with TLS, wrap without handshaking here (the handler does it, bounded)."""
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def connections(self) -> Counter[str]:
        """Open connections per peer host: associations, and connections still being set up."""
        with self._pending_lock:
            counts = Counter(self._pending)
        for assoc in self.active_associations:
            try:
                counts[str(assoc.requestor.address)] += 1
            except Exception:
                continue
        return counts

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver's hook, in the accept thread: refuse a connection over a limit (closed at once)."""
        host = str(client_address[0])
        counts = self.connections()
        if counts[host] >= self.limits.max_per_host:
            _THROTTLED.warning(
                f"host:{host}",
                "connection from %s refused: it already holds %d connections ([dicom] max_associations_per_host)",
                host,
                counts[host],
            )
            return False
        if sum(counts.values()) >= self.limits.max_connections:
            _THROTTLED.warning(
                "all",
                "connection from %s refused: %d connections open (2 x [dicom] max_associations)",
                host,
                sum(counts.values()),
            )
            return False
        with self._pending_lock:
            self._pending[host] += 1
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log an unexpected error of one connection through logging (socketserver would print it)."""
        LOGGER.exception("connection from %s failed unexpectedly; closed", client_address[0] if client_address else "?")

    def release_pending(self, host: str) -> None:
        """The connection of ``host`` is an association now (counted as such) or closed."""
        with self._pending_lock:
            self._pending[host] -= 1
            if self._pending[host] <= 0:
                del self._pending[host]

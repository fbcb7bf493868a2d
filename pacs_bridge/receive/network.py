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
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

__all__ = ["GuardedDUL", "GuardedRequestHandler", "GuardedServer", "NetworkLimits"]

LOGGER = logging.getLogger(__name__)

_PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)
# A-ASSOCIATE-RQ/AC: 128 presentation contexts and user identity tokens fit with room to spare.
_MAX_ASSOCIATE_PDU = 1 << 20
# A-ASSOCIATE-RJ, A-RELEASE-RQ/RP, A-ABORT carry 4 bytes (PS3.8 9.3.4, 9.3.6-9.3.8).
_MAX_SMALL_PDU = 64
_MAX_COMMAND_SET = 64 * 1024
_RECV_CHUNK = 1 << 16


@dataclass(frozen=True)
class NetworkLimits:
    """The bounds every connection is held to (from ``[dicom]``)."""

    max_pdu_bytes: int
    max_instance_bytes: int
    acse_timeout: float
    network_timeout: float
    max_per_host: int
    max_connections: int


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


def _recv_exactly(raw: socket.socket, count: int, deadline: float) -> bytes:
    """Read ``count`` bytes before ``deadline``; fewer if the peer closes. Raises :class:`_Deadline`."""
    buf = bytearray()
    while len(buf) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline(len(buf))
        raw.settimeout(remaining)
        try:
            chunk = raw.recv(min(count - len(buf), _RECV_CHUNK))
        except TimeoutError:
            raise _Deadline(len(buf)) from None
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


class GuardedDUL(DULServiceProvider):
    """pynetdicom's DICOM Upper Layer with bounded PDU reads (see the module docstring)."""

    def __init__(self, assoc: Any, limits: NetworkLimits, connected_at: float) -> None:
        super().__init__(assoc)
        self.limits = limits
        self.connected_at = connected_at
        self._refused: dict[int, int] = {}
        self._refused_lock = threading.Lock()
        self._closing = False
        self._command_bytes = 0
        self._dataset_bytes = 0
        self._discarding = False

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
            body = _recv_exactly(raw, pdu_length, deadline)
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
        if len(body) != pdu_length:
            self._close()  # the peer closed in the middle of a PDU
            return
        try:
            pdu, event = self._decode_pdu(bytearray(header + body))
        except Exception as exc:
            self._refuse_pdu("PDU type 0x%02X cannot be decoded (%s)", pdu_type, type(exc).__name__)
            return
        if pdu_type == 0x04 and not self._admit(pdu):
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

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
            control = data[0]
            last = bool(control & 2)
            if control & 1:  # command fragment
                if self._command_bytes == 0 and self.assoc.dimse.msg_queue.qsize() > 0:
                    self._refuse_pdu("new request before the previous one was answered (no asynchronous operations)")
                    return False
                self._discarding = False
                self._command_bytes += len(data) - 1
                if self._command_bytes > _MAX_COMMAND_SET:
                    self._refuse_pdu("command set longer than %d bytes", _MAX_COMMAND_SET)
                    return False
                if last:
                    self._command_bytes = 0
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
        # Swap in the guarded DUL before the association thread starts. The socket
        # wrapper queued its transport-connection event (Evt5) on the first DUL: move it.
        plain = assoc.dul
        guarded = GuardedDUL(assoc, self.server.limits, self.connected_at)
        guarded.socket = plain.socket
        while not plain.event_queue.empty():
            guarded.event_queue.put(plain.event_queue.get())
        assoc.dul = guarded
        # The timeouts live in the DUL's timers: apply them to the new one.
        assoc.acse_timeout = assoc.acse_timeout
        assoc.network_timeout = assoc.network_timeout
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """The association server: lazy TLS, connection limits per host and in all."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, limits: NetworkLimits, **kwargs: Any) -> None:
        self.limits = limits
        self._pending: Counter[str] = Counter()
        self._pending_lock = threading.Lock()
        super().__init__(*args, **kwargs)

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

"""An HL7 v2 receiver for tests: a real MLLP listener on a free localhost port.

It plays a RIS: each MLLP block it receives (``0x0B`` message ``0x1C 0x0D``)
is kept as text in :attr:`MllpListener.messages` and answered with an ACK
built with ``hl7apy`` whose MSA-1 is :attr:`MllpListener.ack_code` (``"AA"``,
``"AE"``, ``"AR"``, ...) and MSA-2 the received MSH-10; with ``ack_code =
None`` it reads the message and never answers (a receiver that hangs).

Use it as a context manager::

    with MllpListener() as ris:
        ris.ack_code = "AE"
        ...  # send to 127.0.0.1:ris.port
        message = parse_message(ris.messages[0], find_groups=True)
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

from hl7apy.core import Message
from hl7apy.parser import parse_message

__all__ = ["MllpListener", "build_ack"]

_START = b"\x0b"
_END = b"\x1c\x0d"


def build_ack(received: str, code: str, text: str = "") -> str:
    """An ACK (HL7 v2.5.1 ACK^R01^ACK) to the ER7 message ``received`` with MSA-1 ``code``."""
    incoming = parse_message(received, find_groups=False)
    ack = Message("ACK", version="2.5.1")
    ack.msh.msh_3 = "TEST_RIS"
    ack.msh.msh_5 = incoming.msh.msh_3.value or ""
    ack.msh.msh_9 = "ACK^R01^ACK"
    ack.msh.msh_10 = "ACK" + incoming.msh.msh_10.value
    ack.msh.msh_11 = "P"
    ack.msa.msa_1 = code
    ack.msa.msa_2 = incoming.msh.msh_10.value
    if text:
        ack.msa.msa_3 = text
    return str(ack.to_er7())


class MllpListener:
    """A threaded MLLP server on 127.0.0.1; one thread per connection, several messages per connection."""

    def __init__(self, ack_code: str | None = "AA") -> None:
        self.ack_code = ack_code
        self.messages: list[str] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="mllp-listener", daemon=True)
        self._lock = threading.Lock()

    def _accept(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            conn.settimeout(10)
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while _END in buffer:
                    block, buffer = buffer.split(_END, 1)
                    text = block[block.find(_START) + 1 :].decode("utf-8")
                    with self._lock:
                        self.messages.append(text)
                        code = self.ack_code
                    if code is None:
                        continue  # a receiver that never answers
                    conn.sendall(_START + build_ack(text, code, f"test {code}").encode("utf-8") + _END)

    def __enter__(self) -> MllpListener:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(timeout=5)

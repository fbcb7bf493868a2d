"""The DICOM listener: Application Entity, presentation contexts, TLS.

Storage SCP for radiographs (PS3.4 Annex B) and Verification SCP (PS3.4
Annex A). Accepted SOP classes and transfer syntaxes are listed in
``docs/conformance.md``; any other abstract syntax is refused at
presentation-context negotiation (PS3.8 §9.3.3.2, result 3 "abstract syntax
not supported"). DICOM TLS follows PS3.15 Annex B.1 (TLS 1.2 or newer).
Every connection is held to the bounds of :mod:`pacs_bridge.receive.network`
(PDU size and time, TLS handshake time, connections per host).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from datetime import datetime
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_bridge.config import DicomSettings
from pacs_bridge.receive.handlers import Handlers
from pacs_bridge.receive.network import GuardedRequestHandler, GuardedServer, NetworkLimits

__all__ = ["STORAGE_SOP_CLASSES", "TRANSFER_SYNTAXES", "DicomListener", "server_ssl_context"]

LOGGER = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}

TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian (retired)",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 & 4)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless, Non-Hierarchical (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 SV1)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Lossy (Near-Lossless)",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.91": "JPEG 2000 Image Compression",
    "1.2.840.10008.1.2.4.201": "High-Throughput JPEG 2000 (Lossless Only)",
    "1.2.840.10008.1.2.4.202": "High-Throughput JPEG 2000 with RPCL Options (Lossless Only)",
    "1.2.840.10008.1.2.4.203": "High-Throughput JPEG 2000",
}


def server_ssl_context(settings: DicomSettings) -> ssl.SSLContext | None:
    """The TLS context of the listener, or None when TLS is off."""
    if settings.tls_cert is None:
        return None
    if settings.tls_key is None:
        raise ValueError("[dicom] tls_cert is set but tls_key is not")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=settings.tls_cert, keyfile=settings.tls_key)
    if settings.tls_ca is not None:
        context.load_verify_locations(cafile=settings.tls_ca)
    if settings.tls_require_client_cert:
        if settings.tls_ca is None:
            raise ValueError("[dicom] tls_require_client_cert needs tls_ca")
        context.verify_mode = ssl.CERT_REQUIRED
    elif settings.tls_ca is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class DicomListener:
    """Owns the AE and its server thread."""

    def __init__(self, settings: DicomSettings, handlers: Handlers) -> None:
        self.settings = settings
        self.handlers = handlers
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_associations = settings.max_associations
        ae.maximum_pdu_size = settings.max_pdu_size
        ae.network_timeout = settings.network_timeout
        ae.acse_timeout = settings.acse_timeout
        ae.dimse_timeout = settings.dimse_timeout
        ae.require_called_aet = settings.require_called_aet
        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification, list(TRANSFER_SYNTAXES)[:3])
        self.ae = ae
        self.server: Any = None
        self.limits = NetworkLimits(
            max_pdu_bytes=settings.max_pdu_size,
            max_instance_bytes=int(settings.max_instance_mb * 1024 * 1024),
            acse_timeout=settings.acse_timeout,
            network_timeout=settings.network_timeout,
            max_per_host=settings.max_associations_per_host,
            max_connections=2 * settings.max_associations,
            reuse_port=settings.reuse_port,
        )

    def start(self) -> None:
        """Listen (non-blocking)."""
        context = server_ssl_context(self.settings)
        # AE.start_server(block=False) with pynetdicom's documented server_class/request_handler hooks.
        server = self.ae.make_server(
            (self.settings.host, self.settings.port),
            ssl_context=context,
            evt_handlers=self.handlers.bindings(),
            server_class=GuardedServer,
            request_handler=GuardedRequestHandler,
            limits=self.limits,
            store=self.handlers.store,
        )
        stamp = datetime.now().strftime("%Y%m%d%H%M%S")
        thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}", daemon=True)
        thread.start()
        self.ae._servers.append(server)
        self.server = server
        LOGGER.info(
            "DICOM listener %s on %s:%d%s%s, %d storage SOP classes, %d transfer syntaxes",
            self.settings.ae_title,
            self.settings.host,
            self.settings.port,
            " (TLS)" if context else "",
            " (port shared, SO_REUSEPORT)" if self.settings.reuse_port else "",
            len(STORAGE_SOP_CLASSES),
            len(TRANSFER_SYNTAXES),
        )

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop accepting, let open associations finish their stores, then close."""
        if self.server is None:
            return
        self.server.shutdown()
        self.server = None
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            if not [a for a in self.ae.active_associations if a.is_acceptor]:
                break
            time.sleep(0.1)
        remaining = [a for a in self.ae.active_associations if a.is_acceptor]
        for assoc in remaining:
            # Stores not yet answered were not acknowledged: the sender keeps them.
            assoc.abort()
        LOGGER.info("DICOM listener stopped (%d associations aborted after the grace period)", len(remaining))

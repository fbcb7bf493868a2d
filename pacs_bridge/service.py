"""``pacs-bridge serve``: every long-running part, started and stopped in order.

Start: database (migrations), spool (partial files removed, orphans indexed),
model, analysis worker, outbox, DICOM listener, folder watcher. Stop on
SIGTERM or SIGINT in the reverse order: no new associations, stores in flight
finished, the study in hand finished, then exit 0. Work left queued resumes at
the next start.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

from pacs_bridge.config import Settings
from pacs_bridge.errors import ConfigError
from pacs_bridge.receive.handlers import AssociationPolicy, Handlers
from pacs_bridge.receive.ingest import Ingestor
from pacs_bridge.receive.scp import DicomListener
from pacs_bridge.receive.watcher import FolderWatcher
from pacs_bridge.store.db import Database, open_database
from pacs_bridge.store.spool import Spool

__all__ = ["Service", "load_analyser"]

LOGGER = logging.getLogger(__name__)


def load_analyser(settings: Settings) -> Any | None:
    """The model and its analyser, or None (logged) when analysis is off or no model loads."""
    if not settings.analysis.enabled:
        LOGGER.info("analysis disabled ([analysis] enabled = false): studies are stored and queued only")
        return None
    from pacs_bridge.inference.analyse import Analyser
    from pacs_bridge.inference.model import default_model_dir, load_model

    folder = settings.analysis.model_dir or default_model_dir()
    try:
        model = load_model(
            folder,
            providers=settings.analysis.providers,
            intra_op_threads=settings.analysis.intra_op_threads,
        )
    except Exception as exc:
        LOGGER.error("no model loaded from %s: %s; studies stay queued until a model is configured", folder, exc)
        return None
    return Analyser(
        model,
        batch_size=settings.analysis.batch_size,
        max_pixels=settings.analysis.max_pixels,
        heatmap_threshold=settings.analysis.box_threshold,
    )


def _publisher(settings: Settings) -> Any | None:
    if not (settings.report.structured_report or settings.report.annotated_image):
        return None
    try:
        from pacs_bridge.report.publish import publish_study
    except ImportError as exc:
        LOGGER.warning("result objects not available: %s", exc)
        return None
    return publish_study


class Service:
    """The running service; ``run()`` blocks until a stop signal."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop_event = threading.Event()
        self.db: Database | None = None
        self.listener: DicomListener | None = None
        self.watcher: FolderWatcher | None = None
        self.worker: Any = None
        self.outbox: Any = None

    def start(self) -> None:
        """Start every part; raises ConfigError on a setting that cannot work."""
        settings = self.settings
        data_dir = settings.storage.data_dir
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"[storage] data_dir {data_dir} cannot be created: {exc}") from exc
        LOGGER.info("pacs-bridge starting; data folder %s", data_dir.resolve())
        self.db = open_database(settings.storage.resolved_database_url())
        spool = Spool(data_dir, min_free_mb=settings.storage.min_free_mb, fsync=settings.storage.fsync)
        removed = spool.clean_tmp()
        if removed:
            LOGGER.info("removed %d partial files left by an interrupted store", removed)
        ingestor = Ingestor(spool, self.db, max_instance_bytes=int(settings.dicom.max_instance_mb * 1024 * 1024))
        recovered = ingestor.reconcile()
        if recovered:
            LOGGER.warning("indexed %d spool files that had no database row", recovered)

        from pacs_bridge.pipeline.worker import Worker

        if settings.destinations:
            try:
                from pacs_bridge.send.outbox import Outbox
            except ImportError as exc:
                LOGGER.warning("result delivery not available: %s", exc)
            else:
                self.outbox = Outbox(self.db, settings)
                self.outbox.start()
        self.worker = Worker(
            settings,
            self.db,
            load_analyser(settings),
            _publisher(settings),
            on_published=self.outbox.wake if self.outbox is not None else None,
        )
        self.worker.start()

        if not settings.dicom.allowed_calling_aets:
            LOGGER.warning("[dicom] allowed_calling_aets is empty: any calling AE title may store here")
        handlers = Handlers(ingestor, AssociationPolicy(tuple(settings.dicom.allowed_calling_aets)), self._stored)
        self.listener = DicomListener(settings.dicom, handlers)
        try:
            self.listener.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {settings.dicom.host}:{settings.dicom.port}: {exc.strerror or exc}"
            ) from exc
        if settings.watch.enabled:
            self.watcher = FolderWatcher(
                Path(settings.inbox),
                data_dir / "failed",
                ingestor,
                stable_seconds=settings.watch.stable_seconds,
                poll_seconds=settings.watch.poll_seconds,
                on_stored=self._stored,
            )
            self.watcher.start()
        LOGGER.info("pacs-bridge ready")

    def _stored(self, _study_uid: str) -> None:
        # The worker polls; nothing to do per instance. Kept as the seam for notifications.
        return None

    def stop(self) -> None:
        """Stop in reverse order of start."""
        LOGGER.info("pacs-bridge stopping")
        if self.listener is not None:
            self.listener.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.worker is not None:
            self.worker.stop()
        if self.outbox is not None:
            self.outbox.stop()
        if self.db is not None:
            self.db.dispose()
        LOGGER.info("pacs-bridge stopped")

    def run(self) -> int:
        """Start, wait for SIGTERM/SIGINT, stop; the exit status."""

        def _signal(signum: int, _frame: Any) -> None:
            LOGGER.info("received %s", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        try:
            self.start()
            while not self.stop_event.wait(1.0):
                pass
        finally:
            self.stop()
        return 0

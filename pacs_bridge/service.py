"""``pacs-bridge serve``: every long-running part of a node, started and stopped in order.

A node runs some or all of the roles (``[queue] roles``, ``serve --roles``):

- ``receive``: the DICOM listener and the folder watcher (spool + index);
- ``settle``, ``analyse``, ``publish``, ``send``: one stage of the pipeline
  each, taking its jobs from the shared queue (:mod:`pacs_bridge.pipeline.queue`);
- ``web``: the console and HTTP API.

Start: database (migrations when this node runs every role; a split node
requires ``pacs-bridge migrate`` first), spool (this node's partial files
removed, orphans indexed), model, stages, listener, watcher, console. Stop on
SIGTERM or SIGINT in the reverse order: no new associations, stores in flight
finished, jobs in hand finished, then exit 0. Work left queued resumes at the
next start, on this node or another.
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from pacs_bridge.config import ROLES, Settings
from pacs_bridge.errors import ConfigError
from pacs_bridge.health import Health
from pacs_bridge.pipeline.runner import StageRunner
from pacs_bridge.store.db import Database, open_database
from pacs_bridge.store.folders import check_data_dir

__all__ = ["Service", "load_analyser"]

LOGGER = logging.getLogger(__name__)

_HEARTBEAT_SECONDS = 5.0


def load_analyser(settings: Settings) -> Any | None:
    """The model and its analyser, or None (logged) when analysis is off or no model loads."""
    if not settings.analysis.enabled:
        LOGGER.info("analysis disabled ([analysis] enabled = false): studies are stored and queued only")
        return None
    from pacs_bridge.inference.analyse import Analyser
    from pacs_bridge.inference.model import default_model_dir, load_model

    folder = settings.analysis.model_dir or default_model_dir()
    model = load_model(
        folder,
        providers=settings.analysis.providers,
        intra_op_threads=settings.analysis.intra_op_threads,
    )
    return Analyser(
        model,
        batch_size=settings.analysis.batch_size,
        max_pixels=settings.analysis.max_pixels,
        heatmap_threshold=settings.analysis.box_threshold,
    )


class Service:
    """The running node; ``run()`` blocks until a stop signal."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.roles = tuple(r for r in ROLES if r in settings.queue.roles)
        self.stop_event = threading.Event()
        self.health = Health(settings.queue.node_name or None)
        self.db: Database | None = None
        self.ingestor: Any = None
        self.analyser: Any = None
        self.listener: Any = None
        self.watcher: Any = None
        self.web: Any = None
        self.runners: dict[str, StageRunner] = {}
        self._heartbeat: threading.Thread | None = None

    @property
    def node(self) -> str:
        """This process's name in leases and heartbeats (``host:pid``)."""
        return self.health.node

    def start(self) -> None:
        """Start every role of this node; raises ConfigError on a setting that cannot work."""
        settings = self.settings
        check_data_dir(settings)
        data_dir = settings.storage.data_dir
        LOGGER.info(
            "pacs-bridge starting on %s; roles %s; data folder %s", self.node, ",".join(self.roles), data_dir.resolve()
        )
        every_role = set(self.roles) == set(ROLES)
        self.db = open_database(settings.storage.resolved_database_url(), upgrade=every_role)
        if not every_role:
            self.db.require_current()
        from pacs_bridge.health import forget_dead_nodes

        forget_dead_nodes(self.db)

        if "receive" in self.roles:
            self._start_ingest()
        self._start_stages()
        if "receive" in self.roles:
            self._start_listeners()
        if "web" in self.roles and settings.web.enabled:
            self._start_web()
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._heartbeat.start()
        LOGGER.info("pacs-bridge ready")

    def _start_ingest(self) -> None:
        from pacs_bridge.receive.ingest import Ingestor
        from pacs_bridge.store.spool import Spool

        assert self.db is not None
        settings = self.settings
        spool = Spool(
            settings.storage.data_dir,
            min_free_mb=settings.storage.min_free_mb,
            fsync=settings.storage.fsync,
            node=settings.queue.node_name or None,
        )
        # Only this node's own partial files: another receiving node may be storing into tmp/ now.
        removed = spool.clean_tmp()
        if removed:
            LOGGER.info("removed %d partial files left by an interrupted store on this node", removed)
        self.ingestor = Ingestor(
            spool,
            self.db,
            max_instance_bytes=int(settings.dicom.max_instance_mb * 1024 * 1024),
            settle_seconds=settings.study.settle_seconds,
        )
        recovered = self.ingestor.reconcile()
        if recovered:
            LOGGER.warning("indexed %d spool files that had no database row", recovered)

    def _start_stages(self) -> None:
        from pacs_bridge.pipeline.analysis import AnalyseStage
        from pacs_bridge.pipeline.publishing import PublishStage
        from pacs_bridge.pipeline.settle import SettleStage
        from pacs_bridge.send.deliver import DeliverStage

        assert self.db is not None
        settings = self.settings
        stages: list[Any] = []
        if "settle" in self.roles:
            stages.append(SettleStage(settings.study, self.db))
        if "analyse" in self.roles:
            try:
                self.analyser = load_analyser(settings)
            except Exception as exc:
                self.health.register("analyse")
                self.health.dead(
                    "analyse",
                    f"no model loaded from {settings.analysis.model_dir or 'the bundled model folder'}: {exc}; "
                    "studies stay queued until a model is configured",
                )
            if self.analyser is not None:
                stages.append(AnalyseStage(settings, self.db, self.analyser))
        if "publish" in self.roles:
            stages.append(PublishStage(settings, self.db))
        if "send" in self.roles:
            stages.append(DeliverStage(settings, self.db))
        for stage in stages:
            runner = StageRunner(
                stage,
                self.db,
                self.health,
                owner=self.node,
                lease_seconds=settings.queue.lease_seconds,
                poll_seconds=settings.queue.poll_seconds,
            )
            self.runners[stage.role] = runner
            runner.start()
        # Within one process, a stage that finished work wakes the next one at once.
        for current, following in itertools.pairwise(("settle", "analyse", "publish", "send")):
            if current in self.runners and following in self.runners:
                self.runners[current].on_progress = self.runners[following].wake
        if "send" in self.roles and not settings.destinations:
            LOGGER.warning(
                "no [[destinations]] configured: result objects stay in %s", settings.storage.data_dir / "outputs"
            )

    def _start_listeners(self) -> None:
        from pacs_bridge.receive.handlers import AssociationPolicy, Handlers
        from pacs_bridge.receive.scp import DicomListener
        from pacs_bridge.receive.streaming import stream_into
        from pacs_bridge.receive.watcher import FolderWatcher

        settings = self.settings
        self.health.register("receive")
        assert self.ingestor is not None
        # C-STORE data sets go to the spool's temp folder while they arrive, not to memory.
        stream_into(self.ingestor.spool.tmp, self.ingestor.spool.prefix, early_sync=settings.storage.fsync)
        if not settings.dicom.allowed_calling_aets:
            LOGGER.warning("[dicom] allowed_calling_aets is empty: any calling AE title may store here")
        handlers = Handlers(self.ingestor, AssociationPolicy(tuple(settings.dicom.allowed_calling_aets)), self._stored)
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
                settings.storage.data_dir / "failed",
                self.ingestor,
                stable_seconds=settings.watch.stable_seconds,
                poll_seconds=settings.watch.poll_seconds,
                on_stored=self._stored,
            )
            self.watcher.start()

    def _start_web(self) -> None:
        try:
            from pacs_bridge.web.server import WebServer
        except ImportError as exc:
            LOGGER.warning("web console not available: %s", exc)
            return
        assert self.db is not None
        self.health.register("web")
        self.web = WebServer(self.settings, self.db, self.health, self.ingestor, lambda: self.analyser)
        self.web.start()

    def _stored(self, _study_uid: str) -> None:
        runner = self.runners.get("settle")
        if runner is not None:
            runner.wake()

    def _beat(self) -> None:
        assert self.db is not None
        while not self.stop_event.wait(_HEARTBEAT_SECONDS):
            if "receive" in self.roles and self.listener is not None:
                self.health.beat("receive")
            if self.web is not None:
                self.health.beat("web")
            try:
                self.health.flush(self.db)
            except Exception as exc:
                LOGGER.warning("could not record this node's heartbeat: %s", exc)

    def stop(self) -> None:
        """Stop in reverse order of start."""
        LOGGER.info("pacs-bridge stopping")
        self.stop_event.set()
        if self.web is not None:
            self.web.stop()
        if self.listener is not None:
            self.listener.stop()
        if self.watcher is not None:
            self.watcher.stop()
        for runner in reversed(list(self.runners.values())):
            runner.stop()
        for role in self.roles:
            self.health.stopped(role)
        if self.ingestor is not None:
            self.ingestor.close()
        if self.db is not None:
            try:
                self.health.flush(self.db)
            except Exception as exc:
                LOGGER.warning("could not record this node's stop: %s", exc)
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

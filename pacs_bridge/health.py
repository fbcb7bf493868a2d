"""Is every part of the service alive and making progress?

Each role of a running node (receive, settle, analyse, publish, send, web)
registers here and calls :meth:`Health.beat` every time round its loop, and
:meth:`Health.progress` when it finished a piece of work. A role whose loop
stopped beating (a stuck or dead thread), or that recorded that it cannot go
on (:meth:`Health.dead`), makes the node unhealthy: the ``/healthz`` endpoint
answers 503 and ``pacs-bridge results`` says so. The heartbeats are also
written to the ``node_roles`` table (:meth:`Health.flush`) so that other
processes and nodes see them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select

from pacs_bridge.store.db import Database
from pacs_bridge.store.models import NodeRole, utcnow
from pacs_bridge.store.spool import pid_alive

__all__ = ["Health", "HealthReport", "RoleStatus", "default_node_name", "forget_dead_nodes", "read_node_roles"]

LOGGER = logging.getLogger(__name__)

STALE_AFTER_SECONDS = 60.0
"""A role that has not beaten for this long is unhealthy."""


def default_node_name() -> str:
    """This machine's name, the default ``[queue] node_name``."""
    return socket.gethostname()[:100] or "node"


@dataclass
class RoleStatus:
    """The health of one role on this node."""

    role: str
    status: str = "starting"
    started: float = field(default_factory=time.monotonic)
    last_beat: float = field(default_factory=time.monotonic)
    last_progress: float | None = None
    beat_at: datetime = field(default_factory=utcnow)
    error: str | None = None
    done: int = 0

    def healthy(self, now: float, stale_after: float) -> bool:
        """True if the role is running and beat recently."""
        if self.status in ("dead", "failing"):
            return False
        if self.status == "stopped":
            return True
        return now - self.last_beat <= stale_after


@dataclass(frozen=True)
class HealthReport:
    """A snapshot: overall verdict and one entry per role."""

    ok: bool
    node: str
    roles: dict[str, dict[str, Any]]


class Health:
    """The health registry of one node (one process)."""

    def __init__(self, node: str | None = None, *, stale_after: float = STALE_AFTER_SECONDS) -> None:
        self.node = f"{node or default_node_name()}:{os.getpid()}"
        self.stale_after = stale_after
        self._roles: dict[str, RoleStatus] = {}
        self._lock = threading.Lock()

    def register(self, role: str) -> None:
        """Start tracking ``role``."""
        with self._lock:
            self._roles[role] = RoleStatus(role)

    def roles(self) -> list[str]:
        """The registered roles."""
        with self._lock:
            return list(self._roles)

    def _get(self, role: str) -> RoleStatus:
        status = self._roles.get(role)
        if status is None:
            status = self._roles[role] = RoleStatus(role)
        return status

    def beat(self, role: str) -> None:
        """The role's loop went round once; clears a transient error."""
        with self._lock:
            status = self._get(role)
            status.last_beat = time.monotonic()
            status.beat_at = utcnow()
            if status.status in ("starting", "failing"):
                status.status = "running"
                status.error = None

    def progress(self, role: str, count: int = 1) -> None:
        """The role finished ``count`` pieces of work."""
        with self._lock:
            status = self._get(role)
            status.last_progress = time.monotonic()
            status.done += count

    def failing(self, role: str, message: str) -> None:
        """The role's last round failed (it will try again); unhealthy until a round succeeds."""
        with self._lock:
            status = self._get(role)
            status.status = "failing"
            status.error = message[:2000]
            status.last_beat = time.monotonic()
            status.beat_at = utcnow()

    def dead(self, role: str, message: str) -> None:
        """The role cannot go on: the node is unhealthy until restarted."""
        LOGGER.error("the %s stage stopped and cannot go on: %s", role, message)
        with self._lock:
            status = self._get(role)
            status.status = "dead"
            status.error = message[:2000]

    def stopped(self, role: str) -> None:
        """The role stopped on purpose (shutdown)."""
        with self._lock:
            self._get(role).status = "stopped"

    def report(self) -> HealthReport:
        """The verdict now."""
        now = time.monotonic()
        roles: dict[str, dict[str, Any]] = {}
        ok = True
        with self._lock:
            for name, status in self._roles.items():
                healthy = status.healthy(now, self.stale_after)
                ok = ok and healthy
                roles[name] = {
                    "status": status.status if healthy or status.status != "running" else "stalled",
                    "healthy": healthy,
                    "seconds_since_beat": round(now - status.last_beat, 1),
                    "seconds_since_progress": None
                    if status.last_progress is None
                    else round(now - status.last_progress, 1),
                    "done": status.done,
                    "error": status.error,
                }
        return HealthReport(ok=ok, node=self.node, roles=roles)

    def flush(self, db: Database) -> None:
        """Write this node's roles and their last heartbeat to ``node_roles``."""
        with self._lock:
            snapshot = [(s.role, s.status, s.beat_at, s.error) for s in self._roles.values()]
        with db.session() as session:
            for role, status, beat_at, error in snapshot:
                row = session.get(NodeRole, (self.node, role))
                if row is None:
                    row = NodeRole(node=self.node, role=role, pid=os.getpid(), started_at=utcnow())
                    session.add(row)
                row.status = status
                row.heartbeat_at = beat_at
                row.error = error


def read_node_roles(db: Database, *, stale_after: float = STALE_AFTER_SECONDS) -> list[dict[str, Any]]:
    """Every node role recorded in the database, with a ``healthy`` verdict (for ``results``)."""
    now = utcnow()
    out: list[dict[str, Any]] = []
    with db.sessions() as session:
        for row in session.scalars(select(NodeRole).order_by(NodeRole.node, NodeRole.role)):
            beat = row.heartbeat_at if row.heartbeat_at.tzinfo else row.heartbeat_at.replace(tzinfo=now.tzinfo)
            stale = now - beat > timedelta(seconds=stale_after)
            healthy = row.status == "stopped" or (row.status in ("running", "starting") and not stale)
            out.append(
                {
                    "node": row.node,
                    "role": row.role,
                    "status": "stalled" if row.status == "running" and stale else row.status,
                    "healthy": healthy,
                    "heartbeat_at": beat.isoformat(),
                    "error": row.error,
                }
            )
    return out


def forget_dead_nodes(db: Database, host: str | None = None) -> int:
    """Delete the heartbeats of this host's processes that no longer exist; returns how many rows."""
    prefix = f"{host or default_node_name()}:"
    with db.session() as session:
        rows = session.execute(select(NodeRole.node, NodeRole.pid).where(NodeRole.node.startswith(prefix))).all()
        gone = sorted({node for node, pid in rows if pid != os.getpid() and not pid_alive(pid)})
        if gone:
            session.execute(delete(NodeRole).where(NodeRole.node.in_(gone)))
    return len(gone)

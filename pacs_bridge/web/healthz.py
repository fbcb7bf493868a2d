"""``/healthz``: can this node do its work right now?

Green only when the database answers, the spool's disk has more free space
than ``[storage] min_free_mb`` (below it the receiver refuses instances with
0xA700), a model is loaded where this node analyses, and every role of the
node is alive and making progress (:meth:`pacs_bridge.health.Health.report`:
a dead or stalled stage turns it red). Answered with HTTP 200 or 503 so that
load balancers and supervisors can act on it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from pacs_bridge.config import Settings
from pacs_bridge.health import Health
from pacs_bridge.store.db import Database

__all__ = ["health_check"]

LOGGER = logging.getLogger(__name__)


def health_check(
    settings: Settings, db: Database, health: Health, analyser: Callable[[], Any | None]
) -> tuple[bool, dict[str, Any]]:
    """The verdict and one entry per check (``ok`` and a ``detail`` for the administrator)."""
    checks: dict[str, dict[str, Any]] = {}
    try:
        with db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = {"ok": True, "detail": "reachable"}
    except Exception as exc:
        checks["database"] = {"ok": False, "detail": f"not reachable: {type(exc).__name__}"}

    data_dir = settings.storage.data_dir
    try:
        free_mb = shutil.disk_usage(data_dir).free / (1024 * 1024)
        ok = free_mb >= settings.storage.min_free_mb
        checks["disk"] = {
            "ok": ok,
            "detail": f"{free_mb:.0f} MiB free, at least {settings.storage.min_free_mb:g} MiB needed",
            "free_mb": round(free_mb, 1),
        }
    except OSError as exc:
        checks["disk"] = {"ok": False, "detail": f"data folder unreadable: {exc.strerror or exc}"}

    if "analyse" in settings.queue.roles and settings.analysis.enabled:
        model = analyser()
        if model is None:
            checks["model"] = {"ok": False, "detail": "no model loaded: studies stay queued"}
        else:
            manifest = model.model.manifest
            checks["model"] = {"ok": True, "detail": f"{manifest.name} {manifest.version} on {model.model.provider}"}
    else:
        checks["model"] = {"ok": True, "detail": "this node does not analyse"}

    report = health.report()
    checks["roles"] = {"ok": report.ok, "detail": report.roles, "node": report.node}
    return all(check["ok"] for check in checks.values()), checks

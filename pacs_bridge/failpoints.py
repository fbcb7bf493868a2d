"""Named points where a test can make the process die or stall, to prove crash safety.

``PACS_BRIDGE_FAILPOINTS="publish.before-commit=kill,analyse.before-commit=sleep:30"``
makes the process send itself SIGKILL (as a power cut or the OOM killer
would) or sleep when it reaches that point; ``=exit`` raises SystemExit there,
which ends the stage's thread (a stage that cannot go on). Unset (always, in production),
:func:`hit` costs one dictionary lookup. The points sit at every hand-over
between pipeline stages: ``<kind>.before-commit`` (the work is done, its
outcome not yet committed) and ``<kind>.after-commit`` for the job kinds
settle, analyse, publish and deliver.
"""

from __future__ import annotations

import logging
import os
import signal
import time

__all__ = ["hit"]

LOGGER = logging.getLogger(__name__)


def _parse(text: str) -> dict[str, str]:
    points: dict[str, str] = {}
    for item in text.split(","):
        name, _, action = item.strip().partition("=")
        if name:
            points[name] = action or "kill"
    return points


_POINTS = _parse(os.environ.get("PACS_BRIDGE_FAILPOINTS", ""))


def hit(name: str) -> None:
    """Act on the failpoint ``name`` if it is armed."""
    action = _POINTS.get(name)
    if action is None:
        return
    if action == "kill":
        LOGGER.error("failpoint %s: killing this process with SIGKILL", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        LOGGER.error("failpoint %s: ending this thread with SystemExit", name)
        raise SystemExit(f"failpoint {name}")
    elif action.startswith("sleep:"):
        seconds = float(action.split(":", 1)[1])
        LOGGER.error("failpoint %s: sleeping %.1f s", name, seconds)
        time.sleep(seconds)

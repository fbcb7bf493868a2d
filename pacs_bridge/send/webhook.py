"""Webhook: POST a study result document (JSON) to a URL.

The body is the study result as published (:class:`~pacs_bridge.report.study_result.StudyResult`,
``Content-Type: application/json``, its ``"schema"`` key names the format), with
the header ``X-PACS-Bridge-Event: study-result``. Any 2xx answer is success;
5xx, 408, 425 and 429 are transient failures, the other answers permanent
(:mod:`pacs_bridge.send.http`). The receiver should treat a repeated
``study_instance_uid`` + ``revision`` as the same delivery: a result is sent
again when a delivery is retried or resent.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx

from pacs_bridge.config import DestinationSettings
from pacs_bridge.report.study_result import StudyResult
from pacs_bridge.send.dimse import Failure, SendResult
from pacs_bridge.send.http import describe_response, http_client, http_failure, transport_error

__all__ = ["EVENT_HEADER", "send_result"]

LOGGER = logging.getLogger(__name__)

EVENT_HEADER = "X-PACS-Bridge-Event"


def send_result(destination: DestinationSettings, path: Path, timeout: float) -> SendResult:
    """POST the study result document at ``path`` to ``destination`` (a ``webhook`` destination)."""
    try:
        result = StudyResult.from_json(path.read_bytes())
    except (OSError, ValueError) as exc:
        error = f"unreadable study result: {type(exc).__name__}: {exc}"
        return SendResult(path, None, False, error=error, failure=Failure.PERMANENT)
    headers = {"Content-Type": "application/json", EVENT_HEADER: "study-result"}
    try:
        with http_client(destination, timeout) as client:
            response = client.post(str(destination.url), content=result.to_json().encode("utf-8"), headers=headers)
    except httpx.HTTPError as exc:
        return SendResult(path, None, False, error=transport_error(destination, exc), failure=Failure.TRANSIENT)
    except (OSError, ValueError) as exc:  # TLS files that cannot be read, a URL httpx refuses
        error = f"cannot send to {destination.name}: {type(exc).__name__}: {exc}"
        return SendResult(path, None, False, error=error, failure=Failure.PERMANENT)
    LOGGER.debug(
        "webhook for study %s to %s: HTTP %d", result.study_instance_uid, destination.name, response.status_code
    )
    if response.is_success:
        return SendResult(path, None, True)
    return SendResult(path, None, False, error=describe_response(response), failure=http_failure(response.status_code))

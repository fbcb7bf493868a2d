"""The DICOMweb routes: STOW-RS ``POST /dicomweb/studies`` and ``/dicomweb/studies/{study}`` (PS3.18 10.5).

Parsing and storing are in :mod:`pacs_bridge.web.stow`; this module binds
them to HTTP: authentication (a bearer token for scripts, or a console
session with its CSRF token), the size limit, and the
``application/dicom+json`` response.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from pacs_bridge.store.spool import valid_uid
from pacs_bridge.web.auth import Principal
from pacs_bridge.web.context import console_of, require_writer
from pacs_bridge.web.limits import limited_body
from pacs_bridge.web.stow import StowError, parse_multipart_related, store_parts

__all__ = ["DICOM_JSON", "router"]

LOGGER = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])


async def _stow(request: Request, study_uid: str | None) -> JSONResponse:
    console = console_of(request)
    if console.ingestor is None:
        raise HTTPException(503, "this node does not receive studies (no receive role)")
    if study_uid is not None and not valid_uid(study_uid):
        raise HTTPException(404, "not a Study Instance UID")
    limit = int(console.settings.web.max_upload_mb * 1024 * 1024)
    body = await limited_body(request, limit)
    try:
        parts = parse_multipart_related(request.headers.get("content-type", ""), body)
    except StowError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)
    result = await run_in_threadpool(store_parts, console.ingestor, parts, study_uid=study_uid, max_bytes=limit)
    return JSONResponse(result.to_json(), status_code=result.status, media_type=DICOM_JSON)


_STOW_DOC = (
    'Store instances (PS3.18 10.5): multipart/related; type="application/dicom". 200 all stored, '
    "202 some failed, 409 none stored, 400 not multipart/related, 415 another type."
)


@router.post("/studies", summary="STOW-RS: store instances", description=_STOW_DOC)
async def stow_studies(request: Request, _who: Annotated[Principal, Depends(require_writer)]) -> JSONResponse:
    """Store instances of any study."""
    return await _stow(request, None)


@router.post("/studies/{study_uid}", summary="STOW-RS: store instances of one study", description=_STOW_DOC)
async def stow_study(
    request: Request, study_uid: str, _who: Annotated[Principal, Depends(require_writer)]
) -> JSONResponse:
    """Instances of another study are refused with FailureReason 0xC409."""
    return await _stow(request, study_uid)

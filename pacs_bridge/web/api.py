"""The HTTP API: JSON for scripts and for the console's JavaScript (``/api/...``).

Read endpoints need a login or a bearer token; endpoints that change
something also need the CSRF token when called with a console session
(:func:`pacs_bridge.web.context.require_writer`). Actions are those of the
command line (:mod:`pacs_bridge.pipeline.actions`): each changes a study's
state and queues a job in one transaction.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from pacs_bridge.pipeline import actions
from pacs_bridge.web.auth import Principal
from pacs_bridge.web.context import Console, console_of, require_reader, require_writer
from pacs_bridge.web.limits import limited_request
from pacs_bridge.web.studies import StudyFilter, failures, list_studies, study_detail
from pacs_bridge.web.upload import UploadError, UploadResult, analyse_upload

__all__ = ["model_card", "router", "store_upload"]

LOGGER = logging.getLogger(__name__)

router = APIRouter(prefix="/api", tags=["api"])

Reader = Annotated[Principal, Depends(require_reader)]
Writer = Annotated[Principal, Depends(require_writer)]

_MAX_FILES = 20


def _console(request: Request) -> Console:
    return console_of(request)


@router.get("/studies", summary="Studies, newest first, filtered and paged")
def get_studies(
    request: Request,
    _who: Reader,
    state: str | None = None,
    finding: str | None = None,
    date_from: Annotated[str | None, Query(alias="from")] = None,
    date_to: Annotated[str | None, Query(alias="to")] = None,
    page: Annotated[int, Query(ge=1)] = 1,
    per_page: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """State: receiving/settled/queued/analysing/done/failed/skipped; finding: fracture/none/unknown."""
    flt = StudyFilter(state or None, finding or None, date_from or None, date_to or None, page, per_page)
    try:
        return list_studies(_console(request).db, flt)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc


@router.get("/studies/{study_uid}", summary="One study: instances, results, deliveries, jobs")
def get_study(request: Request, study_uid: str, _who: Reader) -> dict[str, Any]:
    """404 for an unknown Study Instance UID."""
    detail = study_detail(_console(request).db, study_uid)
    if detail is None:
        raise HTTPException(404, "no such study")
    return detail


def _audit(who: Principal, action: str, study_uid: str, outcome: str) -> None:
    LOGGER.info("web: %s asked to %s study %s: %s", who.name, action, study_uid, outcome)


@router.post("/studies/{study_uid}/reanalyse", summary="Forget the results and analyse again")
def post_reanalyse(request: Request, study_uid: str, who: Writer) -> dict[str, Any]:
    """Queues an analyse job; 404 for an unknown study."""
    if not actions.reanalyse(_console(request).db, study_uid):
        raise HTTPException(404, "no such study")
    _audit(who, "re-analyse", study_uid, "queued")
    return {"study_instance_uid": study_uid, "queued": True}


@router.post("/studies/{study_uid}/resend", summary="Send the result objects again to every destination")
def post_resend(request: Request, study_uid: str, who: Writer) -> dict[str, Any]:
    """Returns the number of deliveries queued; 404 for an unknown study."""
    console = _console(request)
    try:
        count = actions.resend(console.db, console.settings, study_uid)
    except LookupError as exc:
        raise HTTPException(404, "no such study") from exc
    _audit(who, "resend", study_uid, f"{count} deliveries queued")
    return {"study_instance_uid": study_uid, "deliveries_queued": count}


@router.post("/studies/{study_uid}/force-settle", summary="Settle a receiving study now")
def post_force_settle(request: Request, study_uid: str, who: Writer) -> dict[str, Any]:
    """409 if the study is not receiving; 404 if unknown."""
    console = _console(request)
    if not actions.force_settle(console.db, console.settings, study_uid):
        if study_detail(console.db, study_uid) is None:
            raise HTTPException(404, "no such study")
        raise HTTPException(409, "the study is not receiving: nothing to settle")
    _audit(who, "force-settle", study_uid, "settled")
    return {"study_instance_uid": study_uid, "settled": True}


@router.get("/failures", summary="Failed instances, failed studies and dead jobs")
def get_failures(request: Request, _who: Reader) -> dict[str, Any]:
    """Each with its reason; retry with ``POST /api/jobs/{id}/retry`` or a re-analysis."""
    return failures(_console(request).db)


@router.post("/jobs/{job_id}/retry", summary="Queue a dead job's work again")
def post_retry(request: Request, job_id: int, who: Writer) -> dict[str, Any]:
    """409 if the job is not dead (or does not exist)."""
    if not actions.retry_job(_console(request).db, job_id):
        raise HTTPException(409, "no dead job with this id")
    LOGGER.info("web: %s asked to retry job %d", who.name, job_id)
    return {"job_id": job_id, "queued": True}


@router.get("/queue", summary="Jobs per kind: pending, running, dead, oldest pending age")
def get_queue(request: Request, _who: Reader) -> dict[str, dict[str, Any]]:
    """The queue as ``pacs-bridge results`` sees it."""
    with _console(request).db.sessions() as session:
        return actions.queue_stats(session)


def model_card(console: Console) -> dict[str, Any]:
    """The manifest, evaluation metrics and figure names of the model in use."""
    from pacs_bridge.inference.model import default_model_dir

    folder = Path(console.settings.analysis.model_dir or default_model_dir())
    card: dict[str, Any] = {"folder": str(folder), "loaded": console.model_identity() is not None}
    for name, key in (("model.json", "manifest"), ("metrics.json", "metrics")):
        try:
            card[key] = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            card[key] = None
    card["figures"] = model_figures(folder)
    return card


def model_figures(folder: Path) -> list[str]:
    """The PNG figures of a model folder (``*.png`` and ``plots/*.png``), as relative names."""
    names: list[str] = []
    for sub in (folder, folder / "plots"):
        if sub.is_dir():
            names += sorted(str(p.relative_to(folder)) for p in sub.glob("*.png") if p.is_file())
    return names


@router.get("/model", summary="The model in use: manifest, metrics, figures")
def get_model(request: Request, _who: Reader) -> dict[str, Any]:
    """Figures are served at ``/model/figures/{name}``."""
    return model_card(_console(request))


async def _read_uploads(request: Request, limit: int) -> list[tuple[str, bytes]]:
    replay = await limited_request(request, limit)
    form = await replay.form(max_files=_MAX_FILES, max_fields=10)
    files: list[tuple[str, bytes]] = []
    for _key, value in form.multi_items():
        if isinstance(value, str):
            continue
        files.append((value.filename or "upload", await value.read()))
        await value.close()
    await form.close()
    return files


@router.post("/uploads", summary="Analyse uploaded DICOM, PNG or JPEG files (multipart/form-data, field 'files')")
async def post_uploads(request: Request, who: Writer) -> dict[str, Any]:
    """One entry per file: the finding, or an ``error`` saying why it cannot be analysed. Nothing is stored."""
    console = _console(request)
    limit = int(console.settings.web.max_upload_mb * 1024 * 1024)
    files = await _read_uploads(request, limit)
    if not files:
        raise HTTPException(400, "no file in the request (multipart/form-data, field 'files')")
    analyser = await run_in_threadpool(console.analyser)
    if analyser is None:
        raise HTTPException(503, "no model is loaded on this node: uploads cannot be analysed")
    results: list[dict[str, Any]] = []
    for name, data in files:
        try:
            result = await run_in_threadpool(
                analyse_upload,
                analyser,
                name,
                data,
                owner=who.name,
                max_pixels=console.settings.analysis.max_pixels,
            )
        except UploadError as exc:
            results.append({"name": name[:100], "error": str(exc)})
            continue
        console.uploads.add(result)
        results.append(result.to_json())
    analysed = sum(1 for r in results if "error" not in r)
    LOGGER.info("web: %s uploaded %d file(s), %d analysed", who.name, len(results), analysed)
    return {"results": results}


def _upload(request: Request, upload_id: str, who: Principal) -> UploadResult:
    result = _console(request).uploads.get(upload_id, who.name)
    if result is None:
        raise HTTPException(404, "no such upload (uploads are kept for 30 minutes)")
    return result


@router.get("/uploads/{upload_id}", summary="An analysed upload")
def get_upload(request: Request, upload_id: str, who: Reader) -> dict[str, Any]:
    """Only its uploader sees it."""
    return _upload(request, upload_id, who).to_json()


def store_upload(console: Console, result: UploadResult, who: Principal) -> dict[str, Any]:
    """Store an uploaded DICOM file as a study through the one ingest path; raises HTTPException."""
    if result.dicom is None:
        raise HTTPException(409, "only DICOM uploads can be stored as a study")
    if console.ingestor is None:
        raise HTTPException(503, "this node does not receive studies")
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(result.dicom))
    outcome = console.ingestor.ingest(
        ds,
        (result.dicom,),
        size=len(result.dicom),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        calling_aet=None,
        source="web",
    )
    if not outcome.ok:
        raise HTTPException(422, f"refused (0x{outcome.status:04X}): {outcome.message}")
    result.stored_study_uid = outcome.study_instance_uid
    LOGGER.info(
        "web: %s stored an upload as instance %s of study %s%s",
        who.name,
        outcome.sop_instance_uid,
        outcome.study_instance_uid,
        " (duplicate)" if outcome.duplicate else "",
    )
    return {
        "study_instance_uid": outcome.study_instance_uid,
        "sop_instance_uid": outcome.sop_instance_uid,
        "duplicate": outcome.duplicate,
    }


@router.post("/uploads/{upload_id}/store", summary="Store an uploaded DICOM file as a study")
def post_store_upload(request: Request, upload_id: str, who: Writer) -> dict[str, Any]:
    """Through the same durable ingest as C-STORE; the study is then analysed and its results sent."""
    return store_upload(_console(request), _upload(request, upload_id, who), who)


@router.get("/uploads/{upload_id}/report.pdf", summary="The PDF report of an analysed upload")
def get_upload_report(request: Request, upload_id: str, who: Reader) -> Response:
    """Radiograph, heatmap, probability, threshold, model, and the disclaimer."""
    from pacs_bridge.web.report_pdf import build_report

    result = _upload(request, upload_id, who)
    return Response(
        build_report(result),
        media_type="application/pdf",
        headers={"Content-Disposition": 'attachment; filename="ai-fracture-report.pdf"'},
    )


@router.get("/uploads/{upload_id}/image.png", include_in_schema=False)
def get_upload_image(request: Request, upload_id: str, who: Reader) -> Response:
    """The uploaded radiograph, scaled for the screen."""
    return Response(_upload(request, upload_id, who).image_png, media_type="image/png")


@router.get("/uploads/{upload_id}/heatmap.png", include_in_schema=False)
def get_upload_heatmap(request: Request, upload_id: str, who: Reader) -> Response:
    """The heatmap of an upload, transparent where cold; 404 if the model gives none."""
    result = _upload(request, upload_id, who)
    if result.heatmap_png is None:
        raise HTTPException(404, "the model gives no heatmap")
    return Response(result.heatmap_png, media_type="image/png")


def json_error(status: int, message: str) -> JSONResponse:
    """The API's error body."""
    return JSONResponse({"detail": message}, status_code=status)

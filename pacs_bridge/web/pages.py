"""The console's HTML pages: login, studies, one study, failures, upload, model.

Server-rendered Jinja2 templates (``templates/``) with a little JavaScript
(``static/console.js``) for the heatmap opacity and the upload page; every
form that changes something carries the session's CSRF token. URLs name
studies by Study Instance UID (PS3.3 C.7.2.1), never by patient name or ID,
and the list filters are state, finding and date only, so no patient
identifier ever appears in a URL or an access log.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import pydicom
from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from pacs_bridge.imaging.dicom import DicomDecodeError
from pacs_bridge.pipeline import actions
from pacs_bridge.web.api import model_card, model_figures, store_upload
from pacs_bridge.web.auth import COOKIE_NAME, Principal
from pacs_bridge.web.context import Console, console_of, current_principal, require_reader, require_writer
from pacs_bridge.web.images import display_image, heatmap_png, load_heatmap, to_png
from pacs_bridge.web.studies import FINDINGS, STATES, StudyFilter, failures, instance_files, list_studies, study_detail

__all__ = ["router", "templates"]

LOGGER = logging.getLogger(__name__)

templates = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))

router = APIRouter(include_in_schema=False)

Reader = Annotated[Principal, Depends(require_reader)]
Writer = Annotated[Principal, Depends(require_writer)]

_LOGIN_CSRF_COOKIE = "pb_login"

_DONE = {
    "reanalyse": "Re-analysis queued.",
    "resend": "Result objects queued for delivery again.",
    "resend-none": "Nothing to resend: no result objects, or no destination takes them.",
    "settle": "Study settled: it is queued for analysis.",
    "settle-no": "The study is not receiving: nothing to settle.",
    "retry": "Job queued again.",
    "retry-no": "That job is not dead any more.",
    "stored": "Stored as a study.",
}


def _render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    principal: Principal | None = getattr(request.state, "principal", None)
    base = {
        "user": principal.name if principal else None,
        "csrf": principal.csrf if principal else "",
        "done": _DONE.get(request.query_params.get("done", "")),
        "path": request.url.path,
    }
    return templates.TemplateResponse(request, name, {**base, **context}, status_code=status)


def _safe_next(value: str | None) -> str:
    """Only paths of this site (``/...``, not ``//host``) are followed after login."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/studies"


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.get("/login")
def login_page(request: Request, next: str | None = None, error: str | None = None) -> HTMLResponse:
    """The login form, with a fresh login CSRF token (double submit: cookie and field)."""
    console = console_of(request)
    token = secrets.token_urlsafe(24)
    response = _render(
        request,
        "login.html",
        {
            "login_csrf": token,
            "next": _safe_next(next),
            "error": error,
            "first_login": not console.settings.web.users,
        },
    )
    response.set_cookie(
        _LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=console.secure_cookies, path="/login"
    )
    return response


@router.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    login_csrf: Annotated[str, Form(max_length=100)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/studies",
) -> Response:
    """Check the password (slowed after repeated failures); on success set the session cookie."""
    console = console_of(request)
    address = _client(request)
    target = _safe_next(next)
    cookie_token = request.cookies.get(_LOGIN_CSRF_COOKIE, "")
    if not login_csrf or not hmac.compare_digest(login_csrf, cookie_token):
        return _login_again(request, target, "The login form expired: please try again.", 403)
    wait = console.throttle.wait_seconds(username, address)
    if wait > 0:
        LOGGER.warning("web: login for %r from %s refused: too many failures, %.0f s to wait", username, address, wait)
        return _login_again(request, target, f"Too many failed logins: wait {wait:.0f} s and try again.", 429)
    if not console.auth.check_password(username, password):
        delay = console.throttle.failed(username, address)
        LOGGER.warning("web: failed login for %r from %s", username, address)
        message = "Wrong user name or password."
        if delay > 0:
            message += f" Too many failures: wait {delay:.0f} s before the next try."
        return _login_again(request, target, message, 401)
    console.throttle.succeeded(username, address)
    cookie, _csrf = console.signer.issue(username)
    LOGGER.info("web: %s logged in from %s", username, address)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        cookie,
        max_age=int(console.signer.seconds),
        httponly=True,
        samesite="strict",
        secure=console.secure_cookies,
        path="/",
    )
    response.delete_cookie(_LOGIN_CSRF_COOKIE, path="/login")
    return response


def _login_again(request: Request, target: str, error: str, status: int) -> HTMLResponse:
    response = login_page(request, next=target, error=error)
    response.status_code = status
    return response


@router.post("/logout")
def logout(request: Request, who: Writer) -> Response:
    """Forget the session cookie."""
    LOGGER.info("web: %s logged out", who.name)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/")
    return response


@router.get("/")
def home(request: Request) -> Response:
    """The study list, or the login page."""
    return RedirectResponse("/studies" if current_principal(request) else "/login", status_code=303)


@router.get("/studies")
def studies_page(
    request: Request,
    _who: Reader,
    page: int = 1,
) -> HTMLResponse:
    """Studies, newest first, with filters and pages."""
    params = request.query_params
    flt = StudyFilter(
        state=params.get("state") or None,
        finding=params.get("finding") or None,
        date_from=params.get("from") or None,
        date_to=params.get("to") or None,
        page=max(1, page),
    )
    error = None
    try:
        listing = list_studies(console_of(request).db, flt)
    except ValueError as exc:
        error = str(exc)
        listing = list_studies(console_of(request).db, StudyFilter(page=1))
    query = {
        k: v
        for k, v in (("state", flt.state), ("finding", flt.finding), ("from", flt.date_from), ("to", flt.date_to))
        if v
    }
    return _render(
        request,
        "studies.html",
        {
            **listing,
            "filter": flt,
            "states": STATES,
            "findings": FINDINGS,
            "query": "&".join(f"{k}={quote(v)}" for k, v in query.items()),
            "error": error,
        },
    )


def _dimensions(path: Path) -> tuple[int, int] | None:
    """Columns and Rows of a stored instance, read from its header only."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(ds.Columns), int(ds.Rows)
    except Exception:
        return None


def _boxes(result: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not result:
        return []
    boxes = result.get("boxes")
    if boxes:
        return [b for b in boxes if isinstance(b, dict) and isinstance(b.get("box"), list) and len(b["box"]) == 4]
    if result.get("box"):
        return [{"box": result["box"], "score": None}]
    return []


@router.get("/studies/{study_uid}")
def study_page(request: Request, study_uid: str, _who: Reader) -> HTMLResponse:
    """A study: its instances with heatmaps and boxes, deliveries, jobs and actions."""
    console = console_of(request)
    detail = study_detail(console.db, study_uid)
    if detail is None:
        return _render(request, "missing.html", {"what": "study"}, status=404)
    for instance in detail["instances_detail"]:
        files = instance_files(console.db, console.settings.storage.data_dir, study_uid, instance["sop_instance_uid"])
        instance["size"] = _dimensions(files[0]) if files else None
        instance["boxes"] = _boxes(instance["result"])
    return _render(request, "study.html", {"study": detail})


def _action_redirect(study_uid: str, done: str) -> RedirectResponse:
    return RedirectResponse(f"/studies/{study_uid}?done={done}", status_code=303)


@router.post("/studies/{study_uid}/reanalyse")
def reanalyse_action(request: Request, study_uid: str, who: Writer) -> Response:
    """Form action: re-analyse."""
    if not actions.reanalyse(console_of(request).db, study_uid):
        raise HTTPException(404, "no such study")
    LOGGER.info("web: %s asked to re-analyse study %s", who.name, study_uid)
    return _action_redirect(study_uid, "reanalyse")


@router.post("/studies/{study_uid}/resend")
def resend_action(request: Request, study_uid: str, who: Writer) -> Response:
    """Form action: resend."""
    console = console_of(request)
    try:
        count = actions.resend(console.db, console.settings, study_uid)
    except LookupError as exc:
        raise HTTPException(404, "no such study") from exc
    LOGGER.info("web: %s asked to resend study %s: %d deliveries queued", who.name, study_uid, count)
    return _action_redirect(study_uid, "resend" if count else "resend-none")


@router.post("/studies/{study_uid}/force-settle")
def settle_action(request: Request, study_uid: str, who: Writer) -> Response:
    """Form action: settle now."""
    console = console_of(request)
    if study_detail(console.db, study_uid) is None:
        raise HTTPException(404, "no such study")
    settled = actions.force_settle(console.db, console.settings, study_uid)
    LOGGER.info("web: %s asked to settle study %s: %s", who.name, study_uid, "settled" if settled else "not receiving")
    return _action_redirect(study_uid, "settle" if settled else "settle-no")


@router.post("/jobs/{job_id}/retry")
def retry_action(
    request: Request, job_id: int, who: Writer, back: Annotated[str, Form(max_length=2000)] = "/failures"
) -> Response:
    """Form action: retry a dead job."""
    queued = actions.retry_job(console_of(request).db, job_id)
    LOGGER.info("web: %s asked to retry job %d: %s", who.name, job_id, "queued" if queued else "not dead")
    target = _safe_next(back)
    separator = "&" if "?" in target else "?"
    return RedirectResponse(f"{target}{separator}done={'retry' if queued else 'retry-no'}", status_code=303)


def _instance_files(console: Console, study_uid: str, sop_uid: str) -> tuple[Path, Path | None]:
    files = instance_files(console.db, console.settings.storage.data_dir, study_uid, sop_uid)
    if files is None:
        raise HTTPException(404, "no such instance")
    return files


@router.get("/studies/{study_uid}/instances/{sop_uid}/image.png")
def instance_image(request: Request, study_uid: str, sop_uid: str, _who: Reader) -> Response:
    """The radiograph, decoded with the service's LUT chain and scaled for the screen."""
    console = console_of(request)
    path, _heatmap = _instance_files(console, study_uid, sop_uid)
    try:
        image = display_image(path, max_pixels=console.settings.analysis.max_pixels)
    except (DicomDecodeError, OSError) as exc:
        raise HTTPException(422, "this instance cannot be shown as an image") from exc
    return Response(to_png(image.pixels), media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@router.get("/studies/{study_uid}/instances/{sop_uid}/heatmap.png")
def instance_heatmap(request: Request, study_uid: str, sop_uid: str, _who: Reader) -> Response:
    """The instance's heatmap, resized to the picture of ``image.png``; 404 if none."""
    console = console_of(request)
    path, heatmap_path = _instance_files(console, study_uid, sop_uid)
    if heatmap_path is None or not heatmap_path.is_file():
        raise HTTPException(404, "no heatmap for this instance")
    try:
        image = display_image(path, max_pixels=console.settings.analysis.max_pixels)
        heatmap = load_heatmap(heatmap_path)
    except (DicomDecodeError, OSError, ValueError) as exc:
        raise HTTPException(422, "the heatmap cannot be drawn") from exc
    height, width = image.pixels.shape
    return Response(
        heatmap_png(heatmap, width, height), media_type="image/png", headers={"Cache-Control": "private, max-age=300"}
    )


@router.get("/failures")
def failures_page(request: Request, _who: Reader) -> HTMLResponse:
    """What failed, why, and a retry for each."""
    return _render(request, "failures.html", failures(console_of(request).db))


@router.get("/upload")
def upload_page(request: Request, _who: Reader) -> HTMLResponse:
    """Drop files, see the finding, download a report."""
    console = console_of(request)
    return _render(
        request,
        "upload.html",
        {"max_upload_mb": console.settings.web.max_upload_mb, "can_store": console.ingestor is not None},
    )


@router.get("/model")
def model_page(request: Request, _who: Reader) -> HTMLResponse:
    """The model card's figures and numbers of the model in use."""
    return _render(request, "model.html", {"card": model_card(console_of(request))})


@router.get("/model/figures/{name:path}")
def model_figure(request: Request, name: str, _who: Reader) -> Response:
    """One PNG figure of the model folder (only names the folder lists)."""
    from pacs_bridge.inference.model import default_model_dir

    folder = Path(console_of(request).settings.analysis.model_dir or default_model_dir())
    if name not in model_figures(folder):
        raise HTTPException(404, "no such figure")
    return FileResponse(folder / name, media_type="image/png")


@router.post("/uploads/{upload_id}/store")
def store_upload_action(request: Request, upload_id: str, who: Writer) -> Response:
    """Form action: store a DICOM upload as a study, then show the study."""
    console = console_of(request)
    result = console.uploads.get(upload_id, who.name)
    if result is None:
        raise HTTPException(404, "no such upload (uploads are kept for 30 minutes)")
    stored = store_upload(console, result, who)
    return RedirectResponse(f"/studies/{stored['study_instance_uid']}?done=stored", status_code=303)
